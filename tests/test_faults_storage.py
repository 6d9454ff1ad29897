"""Storage faults: an S3 endpoint that is down gives a bounded number of retries, then a
``StorageError`` naming the URL (and the endpoint), never a hang and never an empty answer.

Two kinds of "down": a closed port (connection refused) and a port that accepts and drops every
connection (a crashed proxy); the second lets the test count the connection attempts, which the
retry settings of ``depthg.io`` (botocore ``max_attempts`` x s3fs ``retries``) must bound.
"""
from __future__ import annotations

import socket
import threading

import pytest

from depthg import io


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class DroppingServer:
    """Accepts TCP connections on loopback and closes them at once, counting them."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port, self.count = self.sock.getsockname()[1], 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.count += 1
            conn.close()

    def close(self):
        self.sock.close()


@pytest.fixture()
def endpoint(monkeypatch):
    """Point depthg.io at a given endpoint with dummy keys; fresh s3fs instances before and after."""
    import s3fs

    def point(url: str) -> str:
        monkeypatch.setenv("AWS_ENDPOINT_URL", url)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        s3fs.S3FileSystem.clear_instance_cache()
        return url

    yield point
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.slow
def test_refused_endpoint_fails_naming_the_url(endpoint):
    url = endpoint(f"http://127.0.0.1:{_closed_port()}")
    calls = [(io.read_bytes, ("s3://bucket/shards/train/manifest.json",)),
             (io.listdir, ("s3://bucket",)),  # a bucket root: s3fs's exists() would swallow the error
             (io.exists, ("s3://bucket/runs/a/ckpt/step-00000002/COMPLETE",))]
    for fn, args in calls:  # no timing asserted: the retry bound is counted in the next test
        with pytest.raises(io.StorageError) as info:
            fn(*args)
        assert args[0] in str(info.value) and url in str(info.value), str(info.value)


@pytest.mark.slow
def test_dropping_endpoint_retries_a_bounded_number_of_times(endpoint):
    import s3fs

    server = DroppingServer()
    try:
        url = endpoint(f"http://127.0.0.1:{server.port}")
        fs, _ = io.filesystem("s3://bucket/x")
        botocore_attempts = io.storage_options("s3://b")["config_kwargs"]["retries"]["max_attempts"]
        assert botocore_attempts <= 3 and fs.retries == s3fs.S3FileSystem.retries
        with pytest.raises(io.StorageError, match=r"s3://bucket/data/shard-000000\.tar") as info:
            io.read_bytes("s3://bucket/data/shard-000000.tar")
        attempts = server.count
    finally:
        server.close()
    assert url in str(info.value)
    # measured 40 connections in ~20 s (s3fs 5 tries x botocore 3 attempts, aiohttp reconnecting a
    # dropped keep-alive once per attempt); the bound: at most 3 connections per botocore attempt
    assert 1 < attempts <= fs.retries * botocore_attempts * 3, attempts


def test_listdir_on_a_live_server_is_empty_only_when_truly_empty(s3):
    assert io.listdir(f"{s3}/nothing/here") == []
    io.write_bytes(f"{s3}/runs/a/ckpt/step-00000001/COMPLETE", b"{}")
    assert io.listdir(f"{s3}/runs/a/ckpt") == ["step-00000001"]
    assert io.listdir(s3) == ["runs"]
