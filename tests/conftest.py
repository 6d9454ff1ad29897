"""Shared fixtures: a real S3 server (moto_server on loopback), a real local Ray, tiny data.

Nothing here is a mock: ``s3`` starts the ``moto_server`` HTTP process and points fsspec at it
through ``AWS_ENDPOINT_URL``; ``ray_local`` starts Ray with 2 CPUs and 2 *logical* GPUs so that
``num_gpus=1`` actors schedule on this CPU-only machine.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from cluster.distributed import free_port  # noqa: E402 - after the path set-up
from cluster.world import patched_environ  # noqa: E402


# Tiers: a test that uses one of these fixtures gets the markers, so `-m "not slow"` is the fast tier
# (pure unit tests) and `-m ray` / `-m s3` select the integration tests by what they start.
FIXTURE_MARKERS = {"ray_local": ("ray", "slow"), "s3": ("s3", "slow"), "s3_server": ("s3", "slow")}


def pytest_collection_modifyitems(config, items):
    for item in items:
        for fixture, markers in FIXTURE_MARKERS.items():
            if fixture in getattr(item, "fixturenames", ()):
                for marker in markers:
                    item.add_marker(marker)


MOTO_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}  # moto accepts any


@pytest.fixture(scope="session")
def s3_server():
    """Start ``moto_server`` on 127.0.0.1 and yield its endpoint URL."""
    exe = shutil.which("moto_server") or os.path.join(os.path.dirname(sys.executable), "moto_server")
    port = free_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
            break
        except Exception:  # noqa: BLE001 - not up yet
            if proc.poll() is not None:
                raise RuntimeError("moto_server exited at start")
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("moto_server did not start within 30 s")
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture()
def s3(s3_server, monkeypatch):
    """A fresh bucket on the moto server; yields ``s3://bucket`` with the environment pointed at it."""
    import uuid

    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    for key, value in MOTO_CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    bucket = f"depthg-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield f"s3://{bucket}"
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray with 2 CPUs and 2 logical GPUs, shared by the session's tests."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        # Workers of a local Ray inherit the raylet's environment: that is how the dummy moto
        # credentials reach them (credentials never travel in a runtime env: cluster.ray_train.worker_env)
        with patched_environ(MOTO_CREDENTIALS):
            # address="local": always a private Ray, never a cluster another process recorded in
            # /tmp/ray/ray_current_cluster (ray.cluster_utils.Cluster and `ray start` write it)
            ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONPATH": REPO}})
    yield ray
    ray.shutdown()
