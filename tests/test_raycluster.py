"""Planning a stage's actors (pure): CPU or GPU, how many, what each asks Ray for."""
from __future__ import annotations

import os

import pytest
import yaml

from cluster import raycluster

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _yaml_types():
    with open(os.path.join(REPO, "ray_cluster.yaml")) as fh:
        return raycluster.node_types_from_config(yaml.safe_load(fh))


def test_gpu_stage_on_a_cluster_whose_gpu_nodes_are_not_up_yet():
    # `ray up ray_cluster.yaml`: only the CPU head is up (it runs no tasks). The old plan ran
    # (2 actors, num_gpus=0) on the head's CPUs; now the stage asks for the 16 GPUs the autoscaler
    # can bring (4 x g5.12xlarge), 12 CPUs each (48 per node / 4 GPUs), and the pending actors make
    # the autoscaler start the nodes.
    types = _yaml_types()
    head = {"CPU": 0}
    assert raycluster.plan_actors(head, 0, "auto", 0, types) == (16, {"num_gpus": 1, "num_cpus": 12}, "cuda")
    assert raycluster.plan_actors(head, 4, "auto", 2, types) == (4, {"num_gpus": 1, "num_cpus": 2}, "cuda")
    assert raycluster.plan_actors(head, 40, "auto", 0, types)[0] == 16  # never more than it can reach
    # with one node up the plan is the same: it is sized to what the cluster can hold, not what is up
    assert raycluster.plan_actors({"CPU": 48, "GPU": 4}, 0, "auto", 0, types)[0] == 16


def test_cpu_and_gpu_choices():
    assert raycluster.plan_actors({"CPU": 16}, 0) == (2, {"num_gpus": 0, "num_cpus": 8}, "cpu")
    assert raycluster.plan_actors({"CPU": 2}, 1) == (1, {"num_gpus": 0, "num_cpus": 2}, "cpu")
    assert raycluster.plan_actors({"CPU": 2}, 4) == (2, {"num_gpus": 0, "num_cpus": 1}, "cpu")
    assert raycluster.plan_actors({"CPU": 64, "GPU": 8}, 0) == (8, {"num_gpus": 1, "num_cpus": 8}, "cuda")
    assert raycluster.plan_actors({"CPU": 64, "GPU": 8}, 0, "cpu") == (2, {"num_gpus": 0, "num_cpus": 32}, "cpu")
    # cuda on a cluster with no GPU and no autoscaler: still ask (the request is what scales a cluster up)
    assert raycluster.plan_actors({"CPU": 8}, 0, "cuda") == (1, {"num_gpus": 1, "num_cpus": 1}, "cuda")
    assert raycluster.plan_actors({"CPU": 8}, 3, "cuda") == (3, {"num_gpus": 1, "num_cpus": 1}, "cuda")
    with pytest.raises(ValueError, match="device must be one of"):
        raycluster.plan_actors({"CPU": 8}, 0, "tpu")


def test_node_types_from_an_autoscaler_config():
    types = {t["name"]: t for t in _yaml_types()}
    head = types.pop("head_cpu")
    assert head["CPU"] == 0 and head["GPU"] == 0  # the head does no work
    assert all(t["GPU"] > 0 and t["max_workers"] >= 1 for t in types.values())
    capped = raycluster.node_types_from_config({"max_workers": 1, "available_node_types": {
        "g": {"resources": {"CPU": 8, "GPU": 1}, "max_workers": 5}}})
    assert capped == [{"name": "g", "CPU": 8, "GPU": 1, "max_workers": 1}]
    assert raycluster.resolve_device("auto", {"CPU": 4}, capped) == "cuda"
    assert raycluster.resolve_device("auto", {"CPU": 4}, []) == "cpu"


@pytest.mark.slow
@pytest.mark.ray
def test_calls_go_only_to_actors_the_cluster_has_placed(ray_local):
    class Echo:  # defined here so Ray ships it by value (workers cannot import test modules)
        def __init__(self, threads: int = 1):
            self.pid = os.getpid()

        def call(self, i: int) -> tuple[int, int]:
            return i, self.pid

    # two actors asking for 2 CPUs each on a 2-CPU cluster: the second is never placed (on a real
    # cluster it would wait for the autoscaler). Every call still completes, on the placed actor.
    group = raycluster.ActorGroup(Echo, (), num_actors=2, device="cpu", options_fn=lambda device, plan: {"num_cpus": 2})
    with group:
        results = list(group.map("call", [(i,) for i in range(6)], progress=False))
        assert len(group.actors) == 2
    assert sorted(i for i, _ in results) == list(range(6))
    assert len({pid for _, pid in results}) == 1
