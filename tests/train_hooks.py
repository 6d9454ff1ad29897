"""Training hooks for tests (``cluster.trainer.Hooks``), and a launcher script that trains with them.

As a script it is what torchrun / ``deepspeed`` run in the multi-process tests (``launch/train.py``'s
``main`` with hooks built from this script's own options)::

    python tests/train_hooks.py [--trace DIR] [--fail RANK:BATCH:MARKER [--kill]] [--pause BATCH:DIR] \
        <launch/train.py arguments>

Ray Train workers get the hook objects pickled by value (``cloudpickle.register_pickle_by_value``).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

from cluster.trainer import Hooks


class TraceSamples(Hooks):
    """Every rank appends ``{"batch", "step", "ids", "pid"}`` of each micro batch to ``folder/rank{R}.jsonl``,
    and at the start ``{"rank", "pid", "node_id", "node", "gpus"}`` to ``folder/start.jsonl`` (under Ray: the Ray
    node id and the GPU ids Ray assigned to the worker)."""

    def __init__(self, folder: str):
        self.folder = folder

    def _append(self, name: str, row: dict) -> None:
        os.makedirs(self.folder, exist_ok=True)
        with open(os.path.join(self.folder, name), "a") as fh:
            fh.write(json.dumps(row) + "\n")

    def on_start(self, world) -> None:
        node_id, gpus = None, None
        try:
            import ray

            if ray.is_initialized():
                node_id = ray.get_runtime_context().get_node_id()
                gpus = list(ray.get_runtime_context().get_accelerator_ids().get("GPU", []))
        except ImportError:
            pass
        self._append("start.jsonl", {"rank": world.rank, "pid": os.getpid(), "node_id": node_id, "node": world.node,
                                     "gpus": gpus})

    def on_batch(self, world, batch_idx: int, batch: dict) -> None:
        self._append(f"rank{world.rank}.jsonl", {"batch": batch_idx, "step": int(batch.get("step", -1)),
                                                 "ids": list(batch["id"]), "pid": os.getpid()})


class FailOnce(Hooks):
    """Rank ``rank`` fails once at ``batch`` (the ``marker`` file records that it did): an exception, or
    with ``kill`` a SIGKILL of its own process (like an OOM-killed worker: no exception, no cleanup)."""

    def __init__(self, rank: int, batch: int, marker: str, kill: bool = False):
        self.rank, self.batch, self.marker, self.kill = rank, batch, marker, kill

    def on_batch(self, world, batch_idx: int, batch: dict) -> None:
        if world.rank == self.rank and batch_idx == self.batch and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected failure on rank {self.rank} at batch {self.batch}")


class PauseAt(Hooks):
    """A process that started at batch 0 writes ``folder/paused-{rank}`` before ``batch`` and waits there
    (at most ``limit`` seconds) for the test to act, e.g. remove its node; once per rank: a restarted group
    passes straight through."""

    def __init__(self, batch: int, folder: str, limit: float = 900.0):
        self.batch, self.folder, self.limit, self.first = batch, folder, limit, None

    def on_batch(self, world, batch_idx: int, batch: dict) -> None:
        self.first = batch_idx if self.first is None else self.first
        mark = os.path.join(self.folder, f"paused-{world.rank}")
        if batch_idx != self.batch or self.first != 0 or os.path.exists(mark):  # once per rank
            return
        os.makedirs(self.folder, exist_ok=True)
        open(mark, "w").close()
        deadline = time.monotonic() + self.limit
        while time.monotonic() < deadline:  # ended by the test (the process is killed), not by time
            time.sleep(0.1)
        raise RuntimeError(f"rank {world.rank}: nobody acted on the pause before batch {self.batch}")


class HookList(Hooks):
    def __init__(self, *hooks: Hooks):
        self.hooks = hooks

    def on_start(self, world) -> None:
        for hook in self.hooks:
            hook.on_start(world)

    def on_batch(self, world, batch_idx: int, batch: dict) -> None:
        for hook in self.hooks:
            hook.on_batch(world, batch_idx, batch)


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--trace", default=None)
    parser.add_argument("--fail", default=None, help="RANK:BATCH:MARKER")
    parser.add_argument("--kill", action="store_true")
    parser.add_argument("--pause", default=None, help="BATCH:FOLDER (see PauseAt)")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    hooks = []
    if args.pause:  # before the trace: a paused batch is not recorded
        batch, folder = args.pause.split(":", 1)
        hooks.append(PauseAt(int(batch), folder))
    if args.trace:
        hooks.append(TraceSamples(args.trace))
    if args.fail:
        rank, batch, marker = args.fail.split(":", 2)
        hooks.append(FailOnce(int(rank), int(batch), marker, args.kill))
    from launch import train as launch_train

    return launch_train.main(rest, hooks=HookList(*hooks))


if __name__ == "__main__":
    main()
