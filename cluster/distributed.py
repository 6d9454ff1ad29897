"""Cross-rank plumbing of the runtime: the process-group backend, the trainer's collectives, one device
picker and one free-port finder for the whole project.

Collectives under NCCL. On GPUs the process group is NCCL, and NCCL serves only CUDA tensors: an
all-reduce of a CPU tensor raises ``No backend type associated with device type cpu``. The trainer's
own collectives (the non-finite-loss flag of every micro batch, metric means, int64 validation
confusions, barriers) move small CPU tensors, so two things hold them up:

* ``process_group_backend(device_type)`` is the backend BOTH launch paths create the group with:
  ``"cpu:gloo,cuda:nccl"`` on CUDA (gloo for CPU tensors, NCCL for CUDA ones), ``"gloo"`` on CPU.
  ``cluster.engine.start_process_group`` passes it to ``deepspeed.init_distributed`` (torchrun,
  ``deepspeed``, a single process) and ``cluster.ray_train.torch_config`` to Ray Train's ``TorchConfig``
  (Ray 2.60 accepts such comma-separated lists: ``ray.train.torch.config._is_backend_nccl``).
* The helpers below never assume it: they run on ``cpu_group()``, which is the default group when that
  serves CPU tensors and otherwise a gloo group of their own (a group someone else created with plain
  ``"nccl"``). Every rank calls the helpers in the same order, as collectives require, so the lazily
  created group is created by all ranks at the same point.

Teardown. ``torch.distributed.destroy_process_group()`` does not stop gloo's threads: a group's worker and
transport threads are joined only when the last Python reference to it goes. A group that lives on into
interpreter exit aborts the process now and then (SIGABRT, ``terminate called without an active exception``):
a gloo worker thread that was still releasing the last collective's work (descheduled on a loaded machine after
it had signalled completion) needs the GIL to free the tensors' Python objects while Python is finalizing, and
the thread exits inside a ``noexcept`` destructor. A rank that aborts after finishing turns a finished run into a
failed one (torchrun reports it, Ray Train retries it). So this module holds its groups weakly (``cpu_group``'s
cache never keeps a destroyed group alive), and ``shutdown(world)`` is every rank's last call (the trainer's):
a barrier, so that no peer is still inside a collective, then the CPU group of its own and the default group
destroyed, in that order on every rank; no reference is left, so the threads are joined there and then.

Every helper takes the ``World`` and is the identity (no process group needed) in a single process.
"""
from __future__ import annotations

import os
import socket
import weakref

import torch
import torch.distributed as dist

from depthg.device import resolve_device
from depthg.world import World

MAX_AUTO_LOADER_WORKERS = 16
# {default group: the gloo group of its own for CPU tensors, or None when the default group serves them}; weak keys,
# so that a default group destroyed by anyone (shutdown, Ray Train, a test) is freed with its CPU group at once
_CPU_GROUP: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (rendezvous of local launches, tests)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pick_device(world: World | None = None, device: str = "auto") -> torch.device:
    """``device``: auto (this rank's GPU, ``local_rank`` modulo the visible GPUs, else the CPU) | cpu | cuda.
    Selecting a GPU also makes it the current CUDA device of the process."""
    chosen = resolve_device(device, world.local_rank if world else 0)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    return chosen


def loader_workers(setting: int, world: World, cpus: int | None = None) -> int:
    """``train.loader_workers``; -1 (auto): the CPUs of this node (``cpus``, default: those this process
    may use) per rank (on a GPU node, the CPUs per GPU) minus one for the training process itself, at most
    ``MAX_AUTO_LOADER_WORKERS``."""
    if setting >= 0:
        return setting
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_rank = cpus // max(1, world.world_size // world.num_nodes)
    return max(0, min(per_rank - 1, MAX_AUTO_LOADER_WORKERS))


def process_group_backend(device_type: str) -> str:
    """The torch.distributed backend of the launch paths: CPU tensors always have gloo."""
    return "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"


def _active(world: World) -> bool:
    return world.distributed and dist.is_available() and dist.is_initialized()


def cpu_group():
    """The process group used for CPU tensors: the default one when it serves them, else a gloo group."""
    default = dist.group.WORLD
    if default not in _CPU_GROUP:
        serves_cpu = any(item.split(":")[0] == "cpu" for item in dist.get_backend_config().split(","))
        _CPU_GROUP[default] = None if serves_cpu else dist.new_group(backend="gloo")
    own = _CPU_GROUP[default]
    return default if own is None else own


def shutdown(world: World) -> None:
    """End this rank's process groups while the interpreter is whole; every rank's last collective call.

    A barrier (every rank has finished its collectives, so no peer is still working on a group), then the CPU
    group of its own (if any) and the default group destroyed, in that order on every rank. This module keeps no
    reference to either, so their gloo threads are joined here rather than during interpreter exit (module
    docstring). A no-op in a single process or when no group is up (e.g. destroyed already)."""
    if not _active(world):
        return
    group = cpu_group()
    dist.barrier(group=group)
    if group is not dist.group.WORLD:
        dist.destroy_process_group(group)
    dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """Sum a CPU ``tensor`` over ranks, in place (float or int64); the identity in a single process."""
    if tensor.device.type != "cpu":
        raise ValueError(f"all_reduce_sum takes CPU tensors, got one on {tensor.device}")
    if _active(world):
        dist.all_reduce(tensor, group=cpu_group())
    return tensor


def barrier(world: World) -> None:
    if _active(world):
        dist.barrier(group=cpu_group())


def mean_over_ranks(values: dict[str, float], world: World) -> dict[str, float]:
    """Per-key mean of scalar ``values`` over ranks (float64)."""
    keys = sorted(values)
    total = all_reduce_sum(torch.tensor([float(values[k]) for k in keys], dtype=torch.float64), world)
    return {k: float(v) / world.world_size for k, v in zip(keys, total)}


def count_over_ranks(flag: bool, world: World) -> int:
    """How many ranks passed ``flag=True`` (every rank gets the same answer, so all take the same branch)."""
    return int(all_reduce_sum(torch.tensor([int(bool(flag))], dtype=torch.int64), world).item())
