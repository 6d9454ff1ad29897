"""Local launches with torchrun: one agent per emulated node on this machine.

``run_local(script, argv, nodes, per_node)`` starts ``nodes`` torchrun agents (``--nnodes``, ``--node_rank``,
a loopback rendezvous on a free port), each running ``script argv --launcher env`` in ``per_node``
processes, and returns the first non-zero exit status (0 when all succeed). On a machine without CUDA the
workers get ``DS_ACCELERATOR=cpu`` and an even share of the cores as ``OMP_NUM_THREADS``. The workers find
this repository first on their path (``PYTHONPATH``).
"""
from __future__ import annotations

import os
import subprocess
import sys

from cluster.distributed import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def without_option(argv, name: str) -> list[str]:
    """``argv`` minus ``name VALUE`` / ``name=VALUE``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


def worker_env(nodes: int, per_node: int) -> dict:
    import torch

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    if not os.environ.get("CUDA_VISIBLE_DEVICES") and not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // (nodes * per_node))))
    return env


def run_local(script: str, argv, nodes: int, per_node: int) -> int:
    """Run ``script`` in ``nodes x per_node`` local processes under torchrun; the first failing status."""
    port = free_port()
    child = without_option(argv, "--launcher") + ["--launcher", "env"]
    env = worker_env(nodes, per_node)
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}",
                               f"--node_rank={node}", f"--nproc_per_node={per_node}", "--master_addr=127.0.0.1",
                               f"--master_port={port}", os.path.abspath(script), *child], env=env)
             for node in range(nodes)]
    codes = [p.wait() for p in procs]
    return next((c for c in codes if c), 0)
