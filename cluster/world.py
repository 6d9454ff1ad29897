"""``detect() -> World``: the ONE place that reads rank / world size from the environment.

Launchers and the variables they set (all read here, nowhere else):

* ``torchrun``: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK (node index).
* ``deepspeed`` (incl. ``--no_ssh``): RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_SIZE, CROSS_RANK, CROSS_SIZE,
  and ``--local_rank=N`` on the command line (accepted by ``launch/train.py``).
* Ray Train ``TorchTrainer`` (V2): RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, NODE_RANK, set on each
  worker before the training function runs.
* Slurm-style users exporting NODE_RANK / NUM_NODES themselves.

With none of these set, the process is a single-process world (``World()``).
"""
from __future__ import annotations

import contextlib
import os
from typing import Mapping

from depthg.world import World


def _int(env: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        value = env.get(name, "")
        if value.strip() != "":
            try:
                return int(value)
            except ValueError as exc:
                raise ValueError(f"environment variable {name}={value!r} is not an integer") from exc
    return None


def detect(env: Mapping[str, str] | None = None, local_rank: int | None = None) -> World:
    """The World of this process; ``local_rank`` (from ``--local_rank=N``) overrides LOCAL_RANK."""
    env = os.environ if env is None else env
    world_size = _int(env, "WORLD_SIZE")
    rank = _int(env, "RANK")
    if world_size is None or rank is None:
        return World(local_rank=local_rank or 0)
    lrank = local_rank if local_rank is not None else _int(env, "LOCAL_RANK")
    lrank = rank if lrank is None else lrank
    local_world = _int(env, "LOCAL_WORLD_SIZE", "LOCAL_SIZE") or world_size
    num_nodes = _int(env, "NUM_NODES", "NNODES", "CROSS_SIZE") or max(1, world_size // local_world)
    node = _int(env, "NODE_RANK", "GROUP_RANK", "CROSS_RANK")
    node = rank // local_world if node is None else node
    return World(rank=rank, world_size=world_size, local_rank=lrank, node=node, num_nodes=num_nodes)


@contextlib.contextmanager
def patched_environ(values: Mapping[str, str]):
    """Set ``values`` in ``os.environ`` for the ``with`` block, then put back what was there (or nothing)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
