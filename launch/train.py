"""Train the DepthG head: one loop (``cluster.trainer.train``) under four launchers.

    python launch/train.py                                  # demo: 2 local CPU workers (gloo), minutes
    python launch/train.py --config configs/coco_vits8.yaml --nodes 4 --gpus-per-node 8 \\
        train.output=s3://bucket/runs/coco                  # Ray Train on a Ray cluster
    torchrun --nproc_per_node 8 launch/train.py --config ...          # Slurm / single node
    deepspeed --no_ssh --hostfile H --node_rank 0 launch/train.py ... # accepts --local_rank=N

``--launcher``: ``env`` runs this process as one rank of an existing launch (torchrun, deepspeed);
``local`` starts ``nodes x gpus-per-node`` workers here with torchrun (``cluster.torchrun``, one agent
per emulated node); ``ray`` submits a Ray Train ``TorchTrainer`` (``cluster.ray_train``); ``auto`` picks
``env`` when RANK/WORLD_SIZE are set, ``ray`` for ``--nodes > 1`` or when RAY_ADDRESS is set, else ``local``.

On Ray, ``--gpus-per-node G`` asks for G GPUs on each of ``--nodes`` nodes whether or not GPU nodes are up:
the waiting workers make the autoscaler start them; without G the cluster's GPU node types decide (CPU
workers when it has none); ``--device cpu`` trains on CPU workers (G per node, default 2). Exactly G workers run
on each of the N nodes (each reserves a G-th of a node's CPUs; the workers print where Ray placed them, and
another layout stops the run). A request the
cluster's node types cannot hold is refused before anything starts. On a Ray cluster this process did not
start (``--address``, RAY_ADDRESS, ``ray up``), even with ``--nodes 1``, the workers run on other machines:
``train.output`` must be shared storage (``train.output=s3://...``), else the run is refused before any worker
starts; only a local Ray started by this launch keeps a local ``train.output``.

One output folder holds one run: a new run into a non-empty ``train.output`` is refused; ``--resume auto``
continues from the newest complete checkpoint there (``--resume URL`` from that one), refusing other model
settings. Without ``--config`` the demo config (``configs/demo.yaml``, a tiny budget) is used; ``--config
none`` gives the bare code defaults. Needs the shards of ``python launch/generate_depth.py``. Every check
that needs no worker (``cluster.preflight``) runs here before anything starts and prints one
``error: ...`` line naming the key or file.
"""
from __future__ import annotations

import argparse
import os
import sys

from depthg.config import load_config, split_cli
from launch import DEMO_CONFIG, run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML config (sparse diff); default configs/demo.yaml")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=0,
                        help="training ranks per node, one GPU each (default: the GPUs per node of the cluster, or "
                             "of this machine for --launcher local; 2 CPU ranks where there are none)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="Ray launcher: cuda = GPU workers, cpu = CPU workers, auto = GPU workers when "
                             "--gpus-per-node is given or the cluster has or can add GPU nodes")
    parser.add_argument("--launcher", choices=("auto", "local", "ray", "env"), default="auto")
    parser.add_argument("--resume", default=None,
                        help="auto (continue the newest complete checkpoint in train.output, if any) | checkpoint "
                             "URL; sets train.resume. Without it train.output must be empty (a new run). DeepSpeed's "
                             "files are loaded with weights_only=True (only its own checkpoint records allowed; "
                             "anything else is refused unopened), but their weights are trusted: resume from your "
                             "own storage")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    parser.add_argument("--print-schedule", action="store_true",
                        help="print the guidance schedules (lambda, b_depth, FPS samples) as JSON and exit")
    parser.add_argument("--print-schedule-at", default=None, metavar="B0,B1,...",
                        help="batches (from 0) for --print-schedule (default: depthg.schedules.DEFAULT_BATCHES)")
    return parser


def parse_args(argv):
    overrides, rest = split_cli(argv)
    args = build_parser().parse_args(rest)
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


def output_shared(args) -> bool:
    """Whether ``train.output`` must be shared storage for this launch: the Ray launcher on a Ray that this process
    did not start (connects first: ``cluster.raycluster.connect``, then ``started_here``)."""
    if pick_launcher(args) != "ray":
        return False
    from cluster import raycluster

    raycluster.connect(args.address)
    return not raycluster.started_here()


def launch_ray(cfg, args, hooks=None) -> dict:
    """Connect to Ray, plan the workers from the request and the cluster's node types, check, then fit."""
    from cluster import preflight, ray_train, raycluster
    from depthg.config import ConfigError

    raycluster.connect(args.address)
    try:
        plan = ray_train.cluster_plan(args.nodes, args.gpus_per_node, args.device)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    preflight.check(cfg, plan.num_workers, shared=not raycluster.started_here())
    print(f"ray: asking for {plan.nodes} node(s) x {plan.per_node} {'GPU' if plan.use_gpu else 'CPU'} worker(s), "
          f"{plan.cpus_per_worker:g} CPU(s) each (at most {plan.per_node} per node); the workers print where Ray "
          "placed them", flush=True)
    return ray_train.launch(cfg, plan, hooks=hooks)


def main(argv=None, hooks=None):
    """``hooks``: a ``cluster.trainer.Hooks`` for the loop (``env`` and ``ray`` launchers; tests)."""
    from cluster import preflight

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    cfg = resolve_config(args)
    if args.print_schedule or args.print_schedule_at:
        return print_schedule(cfg, args.print_schedule_at)
    launcher = pick_launcher(args)
    if launcher == "env":
        from cluster.trainer import train
        from cluster.world import detect

        world = detect(local_rank=args.local_rank)
        preflight.check(cfg, world.world_size)
        return train(cfg, world, hooks=hooks)
    if launcher == "ray":
        return launch_ray(cfg, args, hooks)
    per_node = workers_per_node(args)
    preflight.check(cfg, args.nodes * per_node)
    from cluster.torchrun import run_local

    code = run_local(__file__, argv, args.nodes, per_node)
    if code:
        raise SystemExit(f"error: a training worker exited with status {code}")
    return {"output": cfg.train.output}


if __name__ == "__main__":
    run(main)
