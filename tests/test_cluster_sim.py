"""The Ray stages on clusters emulated on this machine (cluster/simcluster.py), drivers in their own
process (tests/sim_scenarios.py).

* fake_autoscaler: Ray's fake-multinode autoscaler with a CPU head (CPU 0), a GPU worker type (logical
  GPUs) and a CPU worker type beside it. generate_depth with depthgen.device=auto sees GPU node types in
  the autoscaler's config, asks for GPU actors; the autoscaler adds fake GPU nodes and every unit runs
  there. ``launch/train.py --gpus-per-node 1`` asks Ray Train for a GPU worker before any GPU node is up;
  the autoscaler adds a GPU node and the worker holds a GPU there.
* multinode: a 3-node ray.cluster_utils.Cluster (CPU head, two 1-GPU nodes) runs depth, mining and
  evaluation with actors on several nodes; the node of the first finished depth unit is killed
  right then (a hook, no timing) and a replacement added (the autoscaler's job on a real cluster):
  Ray restarts the lost actor there and redoes its units; every sample is present exactly once.
* mining bytes: stage 2 with two MiningWorker actors on each of two simulated nodes reads each depth shard
  once in the whole cluster (a unit's actor streams its own depth shards), counted by a wrapping fsspec file
  system; a shard cache per node (the design before) read it once per node, twice in all.
* segment_node_loss: distributed segmentation (2 actors, CRF as Ray tasks) on a 3-node cluster; the node of the
  first finished unit is removed from the driver's hook and replaced: every image in exactly one complete unit,
  its label written once under its name, one probability shard per unit, the manifest last.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import ray._private.utils as ray_utils

from cluster.simcluster import FakeAutoscaler

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCENARIOS = os.path.join(REPO, "tests", "sim_scenarios.py")


def _run(args: list[str], env: dict, out: str) -> dict:
    log = out + ".log"
    with open(log, "w") as fh:
        proc = subprocess.run([sys.executable, SCENARIOS, *args, out], env=env, stdout=fh, stderr=subprocess.STDOUT,
                              text=True, timeout=1500)
    if proc.returncode != 0:
        with open(log) as fh:
            lines = [line for line in fh if not line.lstrip().startswith("[20")]  # drop raylet log lines
        trace = [i for i, line in enumerate(lines) if line.startswith("Traceback")]
        raise AssertionError("".join(lines[trace[0]:] if trace else lines[-80:])[-8000:])
    with open(out) as fh:
        return json.load(fh)


# beside the GPU type a CPU-only type the autoscaler could start instead: a request without GPUs would get it
WORKER_TYPES = {"gpu_worker": {"CPU": 1, "GPU": 1, "max_workers": 2}, "cpu_worker": {"CPU": 2, "max_workers": 1}}


@pytest.mark.slow
@pytest.mark.ray
def test_fake_autoscaler_adds_gpu_nodes_for_depth_actors(tmp_path):
    with FakeAutoscaler(WORKER_TYPES, head={"CPU": 0}, pythonpath=REPO) as fake:
        seen = _run(["fake-driver", fake.address, str(tmp_path / "shards")], fake.env(), str(tmp_path / "out.json"))
        # the machine's address file (what a user's `ray.init()` / launch script would join) never names it
        recorded = ray_utils.read_ray_address(None)
    assert recorded != fake.address
    assert seen["resources_before"].get("GPU", 0) == 0  # no GPU node until the stage asked for GPUs
    assert seen["plan"]["device"] == "cuda" and seen["plan"]["count"] == 2
    assert seen["plan"]["options"] == {"num_gpus": 1, "num_cpus": 1}  # the GPU type's CPUs per GPU
    gpu_nodes = {n for n, r in seen["nodes"].items() if r.get("GPU", 0) >= 1}
    assert gpu_nodes and seen["head"] not in gpu_nodes
    assert len(seen["unit_nodes"]) == 4 and set(seen["unit_nodes"]) <= gpu_nodes  # every unit on a fake GPU node
    assert seen["total"] == 4 * 5


def _lost_node_scenario(name: str, root: str, out: str) -> dict:
    """Run a lost-node scenario in its own driver process; check a worker node (not the head) was replaced."""
    env = {**os.environ, "PYTHONPATH": REPO, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    seen = _run([name, root], env, out)
    assert seen["killed"] and seen["killed"] != seen["head"] and seen["added"] not in (seen["head"], seen["killed"])
    return seen


@pytest.mark.slow
@pytest.mark.ray
def test_fake_autoscaler_starts_a_gpu_node_for_a_training_worker(tmp_path, s3):
    """``--gpus-per-node 1`` on a cluster whose only GPU node type is not up yet. Before, Ray Train's use_gpu came
    from the GPUs alive at launch (none): a CPU worker, which the autoscaler placed on a CPU node."""
    # the fake nodes' GPUs are logical: their workers train on the CPU with gloo (cluster.ray_train.emulated_gpus)
    with FakeAutoscaler(WORKER_TYPES, head={"CPU": 0}, pythonpath=REPO) as fake:
        env = {**fake.env(), "DEPTHG_EMULATED_GPUS": "1"}
        # train.output on S3: a local one is refused on a cluster the driver did not start (issue 28.1)
        seen = _run(["fake-train", fake.address, str(tmp_path), f"{s3}/runs/fake"], env, str(tmp_path / "out.json"))
    assert seen["resources_before"].get("GPU", 0) == 0
    assert seen["plan"] == {"nodes": 1, "per_node": 1, "use_gpu": True, "cpus_per_worker": 1.0}
    (start,) = seen["starts"]
    assert start["gpus"], "the training worker holds no GPU"  # Ray assigned it one
    assert seen["nodes"][start["node_id"]].get("GPU", 0) >= 1 and start["node_id"] != seen["head"]
    assert seen["segmenter"]


@pytest.mark.slow
@pytest.mark.ray
def test_multinode_stages_survive_a_lost_node_every_sample_once(tmp_path):
    seen = _lost_node_scenario("multinode", str(tmp_path / "shards"), str(tmp_path / "out.json"))
    head, killed, added = seen["head"], seen["killed"], seen["added"]
    # depth: every crop exactly once although a node was lost with units in flight
    keys = seen["depth_keys"]
    assert seen["depth_total"] == 8 * 5 and len(keys) == 40 and len(set(keys)) == 40
    after = seen["depth"][1:]
    assert added in after and head not in seen["depth"]  # the restarted actor worked on the new node
    # mining and evaluation: actors on several nodes, results complete and equal to one process
    assert seen["mined"] == {"train": 40, "val": 4}
    assert len(set(seen["mining"])) >= 2 and killed not in seen["mining"]
    assert seen["eval_workers"] == 2 and len(seen["eval_nodes"]) >= 2
    assert seen["eval_equal"] and {"cluster_crf", "linear_crf"} <= set(seen["eval_heads"])


@pytest.mark.slow
@pytest.mark.ray
def test_mining_reads_each_depth_shard_once_per_cluster(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    seen = _run(["mining-bytes", str(tmp_path / "work")], env, str(tmp_path / "out.json"))
    total, per_node = seen["depth_shard_bytes"], seen["bytes_read_per_node"]
    assert seen["actors"] == 4 and seen["samples"] == 64
    assert len(per_node) == 2  # both nodes' actors read depth shards ...
    assert total <= sum(per_node.values()) <= 1.2 * total, sum(per_node.values()) / total  # ... each once in all
    assert seen["driver_shard_bytes"] == 0


@pytest.mark.slow
@pytest.mark.ray
def test_segment_survives_a_lost_node_every_image_once(tmp_path):
    seen = _lost_node_scenario("segment-node-loss", str(tmp_path / "root"), str(tmp_path / "out.json"))
    killed, added = seen["killed"], seen["added"]
    inputs = sorted(seen["inputs"])
    # every image in exactly one complete unit (the lost node's running unit was redone, not duplicated)
    sources = [s for r in seen["records"] for s in r["sources"]]
    assert sorted(sources) == inputs and len(set(sources)) == len(inputs) == 12
    assert sorted(s for u in seen["units"] for s in u["sources"]) == inputs  # each unit reported once
    assert seen["labels"] == sorted(os.path.basename(f) + "_label.png" for f in inputs)  # names keep the extension
    manifest = seen["manifest"]
    assert manifest["images"] == manifest["inputs"] == 12 and len(manifest["probs_shards"]) == 6
    # the lost node's actor held two units (one scored, one read beside it: --prefetch 1) when it was removed; only
    # those can still report it (finished before the removal), every later unit ran elsewhere
    assert sum(u["node"] == killed for u in seen["units"][1:]) <= 2 and added in {u["node"] for u in seen["units"]}
