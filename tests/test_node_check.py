"""A node whose start-up check failed (issue 28.5): every Ray stage on it fails once, with the check's message.

ray_cluster.yaml writes the check's message into the node's check file (``DEPTHG_NODE_CHECK`` overrides its path:
how these tests make a "failed" node) and never fails the node's setup (the autoscaler would relaunch it in a loop).
Before, only a training worker read the file, and Ray Train restarted the group on it ``train.max_failures`` times
(forever at -1); depth, mining, evaluation and segmentation actors ignored it and failed with a generic CUDA error.
"""
from __future__ import annotations

import pytest

from cluster import raycluster
from cluster.raycluster import NodeCheckError
from depthg.config import Config, load_config, to_dict

MESSAGE = "NVIDIA driver 535.104.05 is older than 580.65.06, which torch 2.14 (CUDA 13.0) needs"


@pytest.fixture()
def failed_node(tmp_path, monkeypatch):
    """This machine as a node whose check failed: the check file holds the message, ``DEPTHG_NODE_CHECK`` names it."""
    path = tmp_path / "node-check.txt"
    path.write_text(MESSAGE + "\n")
    monkeypatch.setenv(raycluster.NODE_CHECK_ENV, str(path))
    return str(path)


def test_every_gpu_actor_stops_first_with_the_check_message(failed_node, tmp_path, monkeypatch):
    from cluster.depthgen import DepthWorker
    from cluster.evaluator import EvalWorker
    from cluster.mining import MiningWorker
    from cluster.segmentation import SegmentWorker

    def model_fn():
        raise AssertionError("no model is built on a failed node")

    cfg = to_dict(Config())
    for build in (lambda: DepthWorker(cfg), lambda: MiningWorker(cfg, "job"), lambda: EvalWorker({}, 3, model_fn),
                  lambda: SegmentWorker({}, model_fn)):
        with pytest.raises(NodeCheckError, match=r"failed its start-up check .*535\.104\.05 is older"):
            build()
    rows = [{"Alive": True, "NodeManagerAddress": "10.0.0.5", "Labels": {raycluster.NODE_CHECK_LABEL: "failed"}},
            {"Alive": True, "NodeManagerAddress": "10.0.0.6", "Labels": {}}]
    with pytest.raises(NodeCheckError, match=r"node\(s\) 10\.0\.0\.5 failed .* before starting MiningWorker"):
        raycluster.refuse_failed_nodes(rows, "starting MiningWorker actors")
    raycluster.refuse_failed_nodes(rows[1:], "training")
    monkeypatch.setenv(raycluster.NODE_CHECK_ENV, str(tmp_path / "absent.txt"))
    raycluster.check_node()  # a node without the check (a laptop, a local Ray): nothing to refuse


@pytest.mark.slow
@pytest.mark.ray
def test_a_stage_on_a_failed_node_fails_once_with_the_check_message(ray_local, failed_node, tmp_path):
    """A GPU actor (max_restarts=3) on the failed node: its constructor runs once (Ray never restarts an actor whose
    constructor raised) and the stage ends with the check's message, not Ray's wrapping of it."""
    from cluster.mining import MiningWorker

    inits = tmp_path / "inits"

    class CountedMining(MiningWorker):  # defined here so Ray ships it by value (workers cannot import test modules)
        def __init__(self, *args, **kwargs):
            with open(inits, "a") as fh:
                fh.write("init\n")
            super().__init__(*args, **kwargs)

    # a real cluster gives the node's actors the check file through the raylet's environment; here, the runtime env
    env = {"runtime_env": {"env_vars": {raycluster.NODE_CHECK_ENV: failed_node}}}
    group = raycluster.ActorGroup(CountedMining, (to_dict(Config()), "job"), num_actors=1, device="cuda",
                                  options_fn=lambda device, plan: {**plan, **env})
    with group, pytest.raises(NodeCheckError, match=r"failed its start-up check .*535\.104\.05 is older") as err:
        list(group.map("close", [()], progress=False))
    assert group.plan["options"]["max_restarts"] == raycluster.MAX_RESTARTS > 0
    assert inits.read_text() == "init\n"  # the actor is dead for good (an error of its creation task): no restart
    assert "ActorDiedError" not in str(err.value) and str(err.value).count(MESSAGE) == 1


@pytest.mark.slow
@pytest.mark.ray
def test_training_on_a_failed_node_ends_after_one_attempt(ray_local, failed_node, tmp_path):
    """Before, Ray Train restarted the group on the broken node (train.max_failures=2: three attempts, forever at -1);
    now the first worker's NodeCheckError ends the run and launch raises it (one Ray Train start, ~20 s here)."""
    from ray._private import state

    from cluster import ray_train

    def train_workers() -> int:
        return sum(a["ActorClassName"].endswith("RayTrainWorker") for a in state.actors().values())

    before = train_workers()
    cfg = load_config(None, ["model.backbone=tiny_vit", "train.max_failures=2", f"train.output={tmp_path / 'run'}"])
    with pytest.raises(NodeCheckError, match=r"failed its start-up check .*535\.104\.05 is older"):
        ray_train.launch(cfg, ray_train.TrainPlan(1, 1, False, 1.0))  # the workers get DEPTHG_* (worker_env)
    assert train_workers() - before == 1  # one attempt: Ray Train did not restart the group on the broken node
