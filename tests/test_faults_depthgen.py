"""Faults in depth generation (stage 1) on a real local Ray and in real processes.

* SIGINT: ``launch/generate_depth.py``'s ``main`` runs as its own process (its own Ray) with a hook
  that pauses the job after its first complete shard (``tests/events.py``); the test sends SIGINT
  while it is paused, so the job can never finish first. It leaves no manifest, and a rerun
  resumes (complete shards untouched) to the same bytes as an uninterrupted run.
* Depth actors crashing mid-run (``ray.kill(..., no_restart=False)`` right after the first shard,
  while the next units are in flight): Ray restarts them and resubmits their units
  (``cluster.raycluster``: ``max_restarts`` / ``max_task_retries``); every sample is present exactly once.
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
from depthg import shards
from depthg.config import load_config
from depthg.data import build_source
from events import wait_for_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 16 synthetic scenes of 96x128, one per shard, five-cropped: ~0.17 s of work per shard on this CPU
SLOW = ["data.dataset=synthetic", "data.num_train=16", "data.height=96", "data.width=128",
        "shards.samples_per_shard=1", "depthgen.num_actors=2", "model.backbone=tiny_vit", "data.resolution=32"]


def _cfg(root: str, *extra: str):
    return load_config(None, SLOW + [f"shards.root={root}", *extra])


def _read(path: str) -> str:
    with open(path, errors="replace") as fh:
        return fh.read()


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


CAP_S = 900  # a cap against a hung job, never a timing expectation


@pytest.mark.slow
def test_sigint_then_rerun_equals_an_uninterrupted_run(tmp_path, ray_local):
    from launch import generate_depth

    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    t0 = time.monotonic()
    depthgen.generate_depth(_cfg(full), "train", progress=False)
    t1 = time.monotonic()
    folder = shards.split_dir(part, "train", "depth")
    events = str(tmp_path / "events")
    cmd = [sys.executable, os.path.join(REPO, "tests", "events.py"), events, "generate_depth", "--config", "none",
           "--quiet", "--skip-mining", "--splits", "train", "--address", "local", *SLOW, f"shards.root={part}"]
    log = str(tmp_path / "job.log")  # a file, not a pipe: a pipe nobody reads while waiting can fill and block the job
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONPATH": REPO, "RAY_USAGE_STATS_ENABLED": "0",
                                     "PYTHONUNBUFFERED": "1"})
    try:  # the job pauses after its first complete shard until "go" exists: it never does
        paused = wait_for_file(os.path.join(events, "first.json"), proc, timeout=CAP_S)
        assert paused, "the job never paused: " + (_read(log) if proc.poll() is not None else "")
        proc.send_signal(signal.SIGINT)
        try:  # the job stops its actors and its own local Ray: a minute or two
            proc.wait(timeout=CAP_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the interrupted job did not exit within {CAP_S} s; its output:\n"
                                 f"{_read(log)[-3000:]}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = _read(log)
    t2 = time.monotonic()
    assert proc.returncode != 0, output[-2000:]  # interrupted, not finished
    assert "KeyboardInterrupt" in output or "interrupted" in output
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


@pytest.mark.slow
def test_depth_actor_killed_mid_run_every_sample_once(tmp_path, ray_local):
    import ray

    cfg = _cfg(str(tmp_path / "out"))
    killed, pids = [], []

    with depthgen.depth_group(cfg) as group:
        # the processes the actors run in before the crash (asked once both are placed): a result from any other
        # process proves a restart, whichever actor happened to be ready first under load
        before = set(ray.get([a.__ray_call__.remote(lambda self: os.getpid()) for a in group.start(16)]))

        def crash_all_after_first(result):  # runs after the first shard, with the next units in flight
            pids.append(result["pid"])
            if not killed:
                killed.extend(group.actors)
                for actor in group.actors:
                    ray.kill(actor, no_restart=False)  # like a crash: Ray restarts it and resubmits its calls

        manifest = depthgen.generate_depth(cfg, "train", progress=False, group=group, on_unit=crash_all_after_first)
    assert len(killed) == 2
    assert len(before) == 2 and set(pids) - before, "no result came from a restarted actor's process"
    assert manifest["total"] == 16 * 5 and len(manifest["shards"]) == 16 and manifest["skipped"] == []
    keys = [raw["__key__"] for url in shards.shard_urls(cfg.shards.root, "train", "depth")
            for raw in shards.iter_shard(url)]
    expected = [f"{i}_c{k}" for i in build_source(cfg.data, "train").ids() for k in range(5)]
    assert sorted(keys) == sorted(expected) and len(keys) == len(set(keys))  # every sample exactly once
