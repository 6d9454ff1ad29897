"""Train the DepthG head: one loop (``cluster.trainer.train``) under four launchers.

    python launch/train.py                                  # demo: 2 local CPU workers (gloo), minutes
    python launch/train.py --config configs/coco_vits8.yaml --nodes 4 --gpus-per-node 8 \\
        train.output=s3://bucket/runs/coco                  # Ray Train on a Ray cluster
    torchrun --nproc_per_node 8 launch/train.py --config ...          # Slurm / single node
    deepspeed --no_ssh --hostfile H --node_rank 0 launch/train.py ... # accepts --local_rank=N

``--launcher``: ``env`` runs this process as one rank of an existing launch (torchrun, deepspeed);
``local`` starts ``nodes x gpus-per-node`` workers here with torchrun (one agent per emulated node);
``ray`` submits a Ray Train ``TorchTrainer`` (``cluster.ray_train``); ``auto`` picks ``env`` when
RANK/WORLD_SIZE are set, ``ray`` for ``--nodes > 1`` or when RAY_ADDRESS is set, else ``local``.
Without ``--config`` the demo config (``configs/demo.yaml``, a tiny budget) is used; ``--config none``
gives the bare code defaults. ``--resume auto`` continues from the newest complete checkpoint under
``train.output``; ``--resume URL`` from that one. Needs the shards of ``python launch/generate_depth.py``.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys

from depthg.config import load_config, split_cli
from launch import DEMO_CONFIG, REPO, run


def parse_args(argv):
    overrides, rest = split_cli(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML config (sparse diff); default configs/demo.yaml")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=0,
                        help="workers per node (default: the visible GPUs, or 2 CPU workers)")
    parser.add_argument("--launcher", choices=("auto", "local", "ray", "env"), default="auto")
    parser.add_argument("--resume", default=None, help="auto | checkpoint URL (sets train.resume)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    parser.add_argument("--print-schedule", action="store_true",
                        help="print the guidance schedules (lambda, b_depth, FPS samples) as JSON and exit")
    parser.add_argument("--print-schedule-at", default=None, metavar="B0,B1,...",
                        help="batches (from 0) for --print-schedule (default: depthg.schedules.DEFAULT_BATCHES)")
    args = parser.parse_args(rest)
    args.overrides = overrides
    return args


def resolve_config(args):
    path = args.config if args.config is not None else DEMO_CONFIG
    path = None if str(path).lower() in ("", "none") else path
    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    return load_config(path, overrides)


def print_schedule(cfg, at: str | None) -> dict:
    """``--print-schedule``: the schedule values the loss uses at the chosen batches, as one JSON line."""
    import json

    from depthg import schedules

    try:
        batches = [int(b) for b in at.split(",")] if at else list(schedules.DEFAULT_BATCHES)
    except ValueError:
        raise SystemExit(f"error: --print-schedule-at expects batch numbers like 0,1,250, got {at!r}")
    if any(b < 0 for b in batches):
        raise SystemExit(f"error: --print-schedule-at: batches count from 0, got {at!r}")
    table = schedules.table(cfg, batches)
    print(json.dumps(table))
    return table


def pick_launcher(args) -> str:
    if args.launcher != "auto":
        return args.launcher
    if os.environ.get("WORLD_SIZE") and os.environ.get("RANK"):
        return "env"
    if args.nodes > 1 or os.environ.get("RAY_ADDRESS") or args.address:
        return "ray"
    return "local"


def workers_per_node(args) -> int:
    if args.gpus_per_node > 0:
        return args.gpus_per_node
    import torch

    return torch.cuda.device_count() or 2


def check_shards(cfg) -> None:
    """Fail early, in the launching process, when the training shards are missing."""
    from depthg import shards

    shards.read_manifest(shards.split_dir(cfg.shards.root, "train", "train"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _without_option(argv, name: str) -> list[str]:
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


def run_local(argv, nodes: int, per_node: int) -> int:
    """Start one torchrun agent per emulated node on this machine, each with ``per_node`` workers."""
    port = _free_port()
    child = _without_option(argv, "--launcher") + ["--launcher", "env"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    if not any(os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES",)) and not _has_cuda():
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // (nodes * per_node))))
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}",
                               f"--node_rank={node}", f"--nproc_per_node={per_node}", "--master_addr=127.0.0.1",
                               f"--master_port={port}", os.path.abspath(__file__), *child], env=env)
             for node in range(nodes)]
    codes = [p.wait() for p in procs]
    return next((c for c in codes if c), 0)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    cfg = resolve_config(args)
    if args.print_schedule or args.print_schedule_at:
        return print_schedule(cfg, args.print_schedule_at)
    launcher = pick_launcher(args)
    if launcher == "env":
        from cluster.trainer import train
        from cluster.world import detect

        return train(cfg, detect(local_rank=args.local_rank))
    try:
        check_shards(cfg)
    except FileNotFoundError as exc:
        raise SystemExit(f"error: {exc}")
    per_node = workers_per_node(args)
    if launcher == "ray":
        from cluster.ray_train import launch

        return launch(cfg, num_workers=args.nodes * per_node, address=args.address)
    code = run_local(argv, args.nodes, per_node)
    if code:
        raise SystemExit(f"error: a training worker exited with status {code}")
    return {"output": cfg.train.output}


if __name__ == "__main__":
    run(main)
