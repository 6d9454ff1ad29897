"""Placement (issue 28.7): ``--nodes 2 --gpus-per-node 1`` on two simulated nodes of 2 logical GPUs each puts one
worker on each node (before: Ray Train's PACK put both on one node), and the workers report where they are.

``launch/train.py --nodes 4 --gpus-per-node 1`` on a simulated 4-node Ray cluster (``ray.cluster_utils``:
a head without CPUs for the driver and the Train controller, 4 nodes of 1 CPU and 1 logical GPU each, whose
workers train on the CPU: ``DEPTHG_EMULATED_GPUS=1``), checkpoints on moto S3.

The run pauses before batch 2 (after the checkpoint of batch 2 is complete: the event the test waits on);
the test removes the node of rank 1 and adds a fresh one, as an autoscaler would. Ray Train restarts the
group, which resumes from the last checkpoint and ends at the same final batch, with no batch trained twice.
Every simulated node has the same IP, so Ray Train gives all workers NODE_RANK 0: placement is checked with
Ray node ids.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from ray._common.utils import get_ray_address_file

from cluster.distributed import free_port
from cluster.simcluster import private_cluster
from depthg import io, shards

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rows(path: str) -> list[dict]:
    return [json.loads(line) for line in open(path) if line.strip()] if os.path.exists(path) else []


def _tail(path: str, n: int = 6000) -> str:
    with open(path, errors="replace") as fh:
        return fh.read()[-n:]


def _wait_for(condition, proc, log: str, what: str, timeout: float = 900.0) -> None:
    """Poll ``condition`` (an event: a file, an object) while the run is alive; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (status {proc.returncode}) before {what}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.s3
def test_simulated_nodes_four_node_run_survives_losing_a_node(s3, tmp_path):
    root, out, trace, pause = str(tmp_path / "shards"), f"{s3}/runs/nodes4", str(tmp_path / "trace"), str(tmp_path / "pause")
    shards.write_test_shards(root, 64, size=(32, 32), num_positives=2, samples_per_shard=8)
    machine_file = get_ray_address_file(None)  # what a user's ray.init() / launch script would join
    with private_cluster([{"num_cpus": 0, "gcs_server_port": free_port()}] + [{"num_cpus": 1, "num_gpus": 1}] * 4,
                         connect=False) as cluster:
        # a test cluster is never published to the machine's other processes
        assert not os.path.exists(machine_file) or open(machine_file).read().strip() != cluster.address
        workers = [n for n in cluster.list_all_nodes() if n is not cluster.head_node]
        cmd = [sys.executable, os.path.join(REPO, "tests", "train_hooks.py"), "--pause", f"2:{pause}", "--trace", trace,
               "--nodes", "4", "--gpus-per-node", "1", "--address", cluster.address,
               "--config", os.path.join(REPO, "configs", "smoke.yaml"), f"shards.root={root}", f"train.output={out}",
               "train.num_batches=5", "train.ckpt_every=2", "train.val_every=0", "train.log_every=1"]
        env = {**os.environ, "PYTHONPATH": REPO, "RAY_USAGE_STATS_ENABLED": "0", "DEPTHG_EMULATED_GPUS": "1"}
        # output to a file, not a pipe: a pipe nobody reads while waiting fills up and blocks the run
        log = str(tmp_path / "run.log")
        with open(log, "w") as fh:
            proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, text=True)
        try:
            _wait_for(lambda: io.exists(f"{out}/ckpt/step-00000002/COMPLETE")
                      and len([n for n in os.listdir(pause)] if os.path.isdir(pause) else []) == 4,
                      proc, log, "checkpoint 2 with every rank paused before batch 2")
            rows = _rows(os.path.join(trace, "start.jsonl"))
            first = {r["rank"]: r["node_id"] for r in rows}
            assert sorted(first) == [0, 1, 2, 3] and len(set(first.values())) == 4  # 4 workers on 4 distinct nodes
            assert all(r["gpus"] for r in rows)  # each holds its node's GPU
            victim = next(n for n in workers if n.node_id == first[1])
            cluster.remove_node(victim)
            replacement = cluster.add_node(num_cpus=1, num_gpus=1)
            try:
                proc.wait(timeout=900)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise AssertionError(f"the run did not end within 900 s of the node's removal:\n{_tail(log)}") from None
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, _tail(log)

    starts = _rows(os.path.join(trace, "start.jsonl"))
    assert len(starts) == 8  # the first group and the restarted one
    second = {r["rank"]: r["node_id"] for r in starts[4:]}
    assert len(set(second.values())) == 4 and replacement.node_id in second.values() and first[1] not in second.values()
    trained = {}  # rank -> [(pid, batch)] of the batches each process started
    for rank in range(4):
        rows = _rows(os.path.join(trace, f"rank{rank}.jsonl"))
        batches = [r["batch"] for r in rows]
        assert batches == [0, 1, 2, 3, 4], (rank, batches)  # resumed at the last checkpoint (2), nothing twice
        assert len({r["pid"] for r in rows if r["batch"] < 2} & {r["pid"] for r in rows if r["batch"] >= 2}) == 0
        trained[rank] = {i for r in rows for i in r["ids"]}
    assert sum(map(len, trained.values())) == len(set().union(*trained.values())) == 5 * 4 * 2  # disjoint samples
    metrics = [json.loads(line) for line in io.read_bytes(f"{out}/metrics.jsonl").decode().splitlines()]
    assert [m["batch"] for m in metrics if "total" in m] == [0, 1, 2, 3, 4]
    for step in (2, 4, 5):
        assert io.exists(f"{out}/ckpt/step-{step:08d}/COMPLETE")  # on S3
    assert io.exists(f"{out}/segmenter.pt")


PLACE = """
import json, os, sys
import ray
from ray.train import RunConfig
from ray.train.torch import TorchTrainer
from cluster import ray_train
from cluster.raycluster import connect

address, out, storage = sys.argv[1:4]
connect(address)
plan = ray_train.cluster_plan(2, 1, "auto")

def loop(config):
    from cluster.world import detect
    world = detect()
    with open(os.path.join(config["out"], f"rank{world.rank}.json"), "w") as fh:
        json.dump({"node": ray.get_runtime_context().get_node_id()}, fh)
    ray_train.check_layout(world, config["plan"])  # prints the layout on rank 0

trainer = TorchTrainer(loop, train_loop_config={"out": out, "plan": plan}, torch_config=ray_train.torch_config(True),
                       scaling_config=ray_train.scaling_config(plan), run_config=RunConfig(storage_path=storage))
trainer.fit()
print("PLAN " + json.dumps(plan.__dict__))
"""


@pytest.mark.slow
@pytest.mark.ray
def test_simulated_nodes_two_nodes_of_two_gpus_get_one_worker_each(tmp_path):
    out = tmp_path / "ranks"
    out.mkdir()
    with private_cluster([{"num_cpus": 0}] + [{"num_cpus": 2, "num_gpus": 2}] * 2, pythonpath=REPO,
                         connect=False) as cluster:
        nodes = {n.node_id for n in cluster.list_all_nodes() if n is not cluster.head_node}
        env = {**os.environ, "PYTHONPATH": REPO, "RAY_USAGE_STATS_ENABLED": "0", "DEPTHG_EMULATED_GPUS": "1"}
        run = subprocess.run([sys.executable, "-c", PLACE, cluster.address, str(out), str(tmp_path / "ray")], env=env,
                             cwd=REPO, capture_output=True, text=True, timeout=600)
    placed = [json.loads((out / f"rank{r}.json").read_text())["node"] for r in range(2) if (out / f"rank{r}.json").exists()]
    assert len(placed) == 2, run.stdout[-3000:] + run.stderr[-3000:]
    assert len(set(placed)) == 2 and set(placed) <= nodes  # one worker on each node, none packed onto one
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert json.loads(run.stdout.split("PLAN ", 1)[1].splitlines()[0])["cpus_per_worker"] == 2.0
    shown = [line for line in (run.stdout + run.stderr).splitlines() if "workers placed on 2 node(s)" in line]
    assert shown and all(n[:12] in shown[0] for n in placed)  # the printed layout names the nodes Ray chose
