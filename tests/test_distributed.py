"""Collectives valid under NCCL, emulated on the CPU with 2 real processes.

NCCL serves only CUDA tensors. A gloo group created for the CUDA device type alone (``"cuda:gloo"``) has
the same restriction, and an all-reduce of a CPU tensor on it raises ``No backend type associated with
device type cpu``, exactly what a CPU tensor meets under NCCL (checked below as a control). The tests run
the trainer's collective helpers (``cluster.distributed``) in such a group, and the backend the launch
paths choose on GPUs (``process_group_backend("cuda")``, used by the deepspeed path
``cluster.engine.start_process_group`` and Ray Train's ``cluster.ray_train.torch_config``) with NCCL
replaced by its emulation.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import weakref

import pytest
import torch

from cluster import distributed, engine, ray_train
from depthg.world import World

pytestmark = pytest.mark.slow


def emulate_nccl(backend: str) -> str:
    """NCCL -> gloo restricted to the device types NCCL serves: ``nccl`` -> ``cuda:gloo``, ``cuda:nccl`` ->
    ``cuda:gloo``; other entries unchanged."""
    out = []
    for item in backend.split(","):
        device, _, name = item.rpartition(":")
        out.append(f"{device or 'cuda'}:gloo" if name == "nccl" else item)
    return ",".join(out)


def _rank(rank: int, backend: str, via_engine: bool, port: int, out: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu"})
    world = World(rank=rank, world_size=2, local_rank=rank)
    if via_engine:  # the torchrun / deepspeed launch path
        engine.start_process_group(world, torch.device("cpu"), backend=backend)
    else:
        torch.distributed.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    result = {"backend": torch.distributed.get_backend_config()}
    try:  # a CPU tensor straight on the default group, as the old helpers did
        raw = torch.ones(1)
        torch.distributed.all_reduce(raw)
        result["default_group_cpu"] = float(raw)
    except RuntimeError as exc:
        result["default_group_cpu"] = str(exc)
    conf = torch.arange(6, dtype=torch.int64).reshape(2, 3) * (rank + 1)
    result["sum"] = distributed.all_reduce_sum(torch.tensor([1.5 * (rank + 1)], dtype=torch.float64), world).tolist()
    result["confusion"] = distributed.all_reduce_sum(conf, world).tolist()
    result["mean"] = distributed.mean_over_ranks({"loss": float(rank), "lr": 0.5}, world)
    result["bad"] = distributed.count_over_ranks(rank == 1, world)
    distributed.barrier(world)
    result["own_cpu_group"] = distributed.cpu_group() is not torch.distributed.group.WORLD
    groups = [weakref.ref(g) for g in {torch.distributed.group.WORLD, distributed.cpu_group()}]
    threads = len(os.listdir("/proc/self/task"))
    if via_engine:  # the trainer's teardown
        distributed.shutdown(world)
    else:  # someone else's (Ray Train's): cluster.distributed must not keep the groups alive either
        torch.distributed.destroy_process_group()
    # no reference left anywhere: torch freed the groups, and gloo joined their threads, before this process exits
    result["groups_alive"] = [g() is not None for g in groups]
    result["threads_joined"] = threads - len(os.listdir("/proc/self/task"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump(result, fh)


def _run_two(tmp_path, backend: str, via_engine: bool) -> list[dict]:
    ctx = multiprocessing.get_context("spawn")
    port = distributed.free_port()
    procs = [ctx.Process(target=_rank, args=(r, backend, via_engine, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def _check_helpers(results: list[dict]) -> None:
    for r in results:
        assert not any(r["groups_alive"]) and r["threads_joined"] > 0, r  # torn down before the process exits
        assert r["sum"] == [4.5]
        assert r["confusion"] == [[0, 3, 6], [9, 12, 15]]  # int64, exact
        assert r["mean"] == {"loss": 0.5, "lr": 0.5}
        assert r["bad"] == 1  # both ranks agree that one rank saw a non-finite loss


def test_nccl_like_group_runs_the_trainer_collectives(tmp_path):
    """A group serving only CUDA (like NCCL, here gloo for "cuda" alone): a CPU all-reduce on it fails, and
    the trainer's helpers still work (on a gloo group of their own)."""
    results = _run_two(tmp_path, emulate_nccl("nccl"), via_engine=False)
    for r in results:
        assert r["backend"] == "cuda:gloo"
        assert "No backend type associated with device type cpu" in r["default_group_cpu"]  # the NCCL failure
        assert r["own_cpu_group"]
    _check_helpers(results)


def test_nccl_launch_paths_create_a_group_that_serves_cpu_tensors(tmp_path):
    """Both launch paths choose ``cpu:gloo,cuda:nccl`` on GPUs; created through the deepspeed path (with
    NCCL emulated), the default group serves CPU tensors and the helpers use it directly; ``shutdown`` (the trainer's
    last call) frees the group and joins gloo's threads before the process exits (once a race that aborted rank 0
    at exit, after its results were written)."""
    backend = distributed.process_group_backend("cuda")
    assert backend == "cpu:gloo,cuda:nccl"
    assert ray_train.torch_config(use_gpu=True).backend == backend  # Ray Train's TorchConfig, the same choice
    assert ray_train.torch_config(use_gpu=False).backend == distributed.process_group_backend("cpu") == "gloo"
    results = _run_two(tmp_path, emulate_nccl(backend), via_engine=True)
    for r in results:
        assert r["backend"] == "cpu:gloo,cuda:gloo"
        assert r["default_group_cpu"] == 2.0 and not r["own_cpu_group"]
    _check_helpers(results)
