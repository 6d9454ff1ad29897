"""Stage 1 + 2 of the data pipeline: depth shards, then training shards (positives by reference).

    python launch/generate_depth.py                                   # synthetic demo -> shards/synthetic
    python launch/generate_depth.py shards.root=s3://bucket/depthg    # the same, on S3 (fsspec/s3fs)
    python launch/generate_depth.py --config configs/coco_vits8.yaml  # on a Ray cluster: attaches to it
    python launch/generate_depth.py --skip-mining                     # stop after the depth shards

Writes ``{root}/depth/{split}/`` (one sample per crop, depth in [0,1]) and then
``{root}/{split}/`` (each sample once at ``data.resolution``, encoded per ``mining.rgb_codec`` /
``mining.depth_codec``, with its ``mining.num_positives`` nearest neighbours as sample indices), each
folder's ``manifest.json`` last. The driver lists each split's source once, into
``{root}/depth/{split}/listing.jsonl``, and hands the depth actors units of it by byte range (no actor
lists the source); it keeps per-shard counts, not ids. Reruns skip complete shards (``shards.overwrite=true``
redoes them). Ray: attaches to a running cluster (``--address``, ``RAY_ADDRESS`` or a local ``ray start``),
else starts a local one for the job. ``--device`` (``depthgen.device`` and ``mining.device``):
``auto`` runs one actor per GPU whenever the cluster has GPUs or its autoscaler may add GPU nodes
(the actors' GPU requests make it start them), ``cuda`` always asks for GPUs, ``cpu`` uses CPU shares.
Without ``--config`` the demo config (``configs/demo.yaml``, the one ``launch/train.py`` uses) is
read; ``--config none`` gives the bare code defaults.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from cluster.raycluster import DEVICE_HELP, DEVICES
from depthg import io
from depthg.config import load_config, save_config, split_cli
from launch import DEMO_CONFIG, run

log = logging.getLogger("generate_depth")


def parse_args(argv, description=__doc__, mining_flag=True):
    overrides, rest = split_cli(argv)
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML config (sparse diff); default configs/demo.yaml")
    parser.add_argument("--splits", default="train,val", help="comma-separated splits (default train,val)")
    parser.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, a local `ray start`, or new)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--device", choices=DEVICES, default=None,
                        help=f"sets depthgen.device and mining.device ({DEVICE_HELP})")
    if mining_flag:
        parser.add_argument("--skip-mining", action="store_true", help="stop after the depth shards")
    args = parser.parse_args(rest)
    args.overrides = overrides + ([f"depthgen.device={args.device}", f"mining.device={args.device}"]
                                  if args.device else [])
    return args


def resolve_config(args):
    path = args.config if args.config is not None else (DEMO_CONFIG if os.path.isfile(DEMO_CONFIG) else None)
    path = None if str(path).lower() in ("", "none") else path
    return load_config(path, args.overrides)


def check_backbone(cfg) -> None:
    """Build the mining backbone once on the driver, so missing weights fail before hours of depth."""
    from depthg.models import build_backbone

    try:
        build_backbone(cfg.model.backbone, cfg.model.weights)
    except Exception as exc:  # noqa: BLE001 - re-raised with the keys to change
        raise SystemExit(f"cannot build the mining backbone model.backbone={cfg.model.backbone} "
                         f"model.weights={cfg.model.weights!r}: {exc}\n"
                         "Set model.weights=<local file> or pick an offline backbone (model.backbone=effnet_lite0).")


def run_mining(cfg, splits, quiet: bool) -> dict:
    """Stage 2 for each split on one pool of mining actors (Ray connected)."""
    from cluster.mining import mine_neighbors, mining_group

    out = {}
    with mining_group(cfg) as group:
        for split in splits:
            m = mine_neighbors(cfg, split, progress=not quiet, group=group)
            log.info("train shards %s: %d samples in %d shards, %d positives each", split, m["total"],
                     len(m["shards"]), m["num_positives"])
            out[split] = m
    return out


def main(argv=None, on_unit=None) -> dict:
    """``on_unit(result)``: called on the driver after each depth shard is complete (tests' hook)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = resolve_config(args)
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    if not args.skip_mining:
        check_backbone(cfg)
    from cluster.depthgen import depth_group, generate_depth
    from cluster.raycluster import connect

    import ray

    started = connect(args.address)
    try:
        save_config(cfg, io.join(cfg.shards.root, "generate_depth.yaml"))  # resolved, secrets masked
        out = {}
        with depth_group(cfg) as group:  # one pool of actors for all splits
            for split in splits:
                m = generate_depth(cfg, split, progress=not args.quiet, group=group, on_unit=on_unit)
                log.info("depth %s: %d samples in %d shards, %d skipped", split, m["total"], len(m["shards"]),
                         len(m["skipped"]))
                out[f"depth/{split}"] = m
        if not args.skip_mining:
            out.update(run_mining(cfg, splits, args.quiet))
        log.info("shards written under %s", cfg.shards.root)
        return out
    finally:
        if started:
            ray.shutdown()


if __name__ == "__main__":
    run(main)
