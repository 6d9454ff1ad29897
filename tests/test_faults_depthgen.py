"""Faults in depth generation (stage 1) on a real local Ray and in real processes.

* SIGINT: ``launch/generate_depth.py`` runs as its own process (its own Ray) and is interrupted with
  SIGINT once the first shard is on disk; it leaves no manifest, and a rerun resumes (complete
  shards untouched) to the same bytes as an uninterrupted run.
* A depth actor killed mid-run (``ray.kill``): the job still completes and every sample is present
  exactly once (``ActorGroup.map`` replaces the dead actor and resubmits its unit).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cluster import depthgen
from cluster.raycluster import ActorGroup
from depthg import shards
from depthg.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 16 synthetic scenes of 96x128, one per shard, five-cropped: ~0.17 s of work per shard on this CPU
SLOW = ["data.dataset=synthetic", "data.num_train=16", "data.height=96", "data.width=128",
        "shards.samples_per_shard=1", "depthgen.num_actors=2", "model.backbone=tiny_vit", "data.resolution=32"]


def _cfg(root: str, *extra: str):
    return load_config(None, SLOW + [f"shards.root={root}", *extra])


def _tree(folder: str) -> dict[str, bytes]:
    out = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as fh:
            out[name] = fh.read()
    return out


def _manifest(data: bytes, root: str) -> dict:
    manifest = json.loads(data)
    assert manifest["config"]["shards"].pop("root") == root
    return manifest


def _wait_for(predicate, timeout: float, proc=None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return predicate()
        time.sleep(0.02)
    return False


@pytest.mark.slow
def test_sigint_then_rerun_equals_an_uninterrupted_run(tmp_path, ray_local):
    from launch import generate_depth

    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    t0 = time.monotonic()
    depthgen.generate_depth(_cfg(full), "train", progress=False)
    t1 = time.monotonic()
    folder = shards.split_dir(part, "train", "depth")
    cmd = [sys.executable, os.path.join(REPO, "launch", "generate_depth.py"), "--config", "none", "--quiet",
           "--skip-mining", "--splits", "train", "--address", "local", *SLOW, f"shards.root={part}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": REPO, "RAY_USAGE_STATS_ENABLED": "0"})
    try:
        first = lambda: os.path.isdir(folder) and any(n.endswith(".json") for n in os.listdir(folder))  # noqa: E731
        assert _wait_for(first, 180, proc), "no shard appeared: " + (proc.stdout.read() if proc.poll() is not None else "")
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    t2 = time.monotonic()
    assert proc.returncode != 0, output[-2000:]  # interrupted, not finished
    assert "KeyboardInterrupt" in output
    assert not os.path.exists(os.path.join(folder, shards.MANIFEST))  # nothing claims to be complete
    done = {n for n in os.listdir(folder) if n.endswith(".tar") and os.path.exists(
        os.path.join(folder, shards.sidecar_name(n)))}
    assert 1 <= len(done) < 16, sorted(done)
    stamps = {n: os.stat(os.path.join(folder, n)).st_mtime_ns for n in done}

    out = generate_depth.main(["--config", "none", "--quiet", "--skip-mining", "--splits", "train", *SLOW,
                               f"shards.root={part}"])
    assert out["depth/train"]["total"] == 16 * 5
    assert stamps == {n: os.stat(os.path.join(folder, n)).st_mtime_ns for n in done}  # resumed, not redone
    visible = {k: v for k, v in _tree(folder).items() if not k.startswith(".")}
    reference = _tree(shards.split_dir(full, "train", "depth"))
    assert visible.keys() == reference.keys()
    for name in sorted(reference):
        if name == shards.MANIFEST:  # equal but for the output root recorded in its config
            assert _manifest(visible[name], part) == _manifest(reference[name], full)
        else:
            assert visible[name] == reference[name], name  # shards and sidecars byte-identical
    leftovers = sorted(k for k in _tree(folder) if k.startswith("."))
    print(f"SIGINT after {len(done)}/16 shards; hidden temp files left by the killed actors: {leftovers}; "
          f"reference {t1 - t0:.1f} s, interrupted process {t2 - t1:.1f} s, rerun {time.monotonic() - t2:.1f} s")


class _KillAfterFirst(ActorGroup):
    """An actor group that ``ray.kill``s one of its (busy) actors as soon as the first unit is done."""

    def __init__(self, *args):
        super().__init__(*args)
        self.killed: list = []

    def map(self, method, calls, desc="", progress=True):
        import ray

        for i, result in enumerate(super().map(method, calls, desc, progress)):
            if i == 0:
                victim = self.actors[0]
                ray.kill(victim)
                self.killed.append(victim)
            yield result


@pytest.mark.slow
def test_depth_actor_killed_mid_run_every_sample_once(tmp_path, ray_local):
    from depthg.config import to_dict

    cfg = _cfg(str(tmp_path / "out"))
    group = _KillAfterFirst(depthgen.DepthWorker, (to_dict(cfg),), 2)
    with group:
        manifest = depthgen.generate_depth(cfg, "train", progress=False, group=group)
    assert len(group.killed) == 1
    assert manifest["total"] == 16 * 5 and len(manifest["shards"]) == 16 and manifest["skipped"] == []
    keys = [raw["__key__"] for url in shards.shard_urls(cfg.shards.root, "train", "depth")
            for raw in shards.iter_shard(url)]
    expected = [f"{i}_c{k}" for i in depthgen.source_info(cfg, "train")["ids"] for k in range(5)]
    assert sorted(keys) == sorted(expected) and len(keys) == len(set(keys))  # every sample exactly once
