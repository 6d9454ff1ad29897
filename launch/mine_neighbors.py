"""Stage 2 alone: neighbour mining over existing depth shards -> training shards.

    python launch/mine_neighbors.py [--config FILE] [--splits train,val] [--device auto|cpu|cuda] [key=value ...]

Reads ``{root}/depth/{split}/manifest.json`` (written by ``launch/generate_depth.py``) and, on Ray actors,
streams each depth shard once in the cluster (units of up to 16 random depth shards): every sample's global
backbone feature (kept under ``{root}/features/``) and its training sample at ``data.resolution``
(``mining.rgb_codec``, ``rgb_quality``, ``depth_codec``), written as ``{root}/{split}/`` shards; then the
exact cosine top-``mining.k`` over the split, its query rows split over every actor, gives each sample its
``mining.num_positives`` positives, written with their byte ranges in each shard's row file; the offsets
table, then the manifest. A rerun with another ``mining.k`` / ``num_positives`` rewrites only the row files.
Rerun it after changing ``data.resolution`` or the encoding, and to convert a split of an earlier layout
(positives in ``meta.json``, or embedded: schema depthg-shards/1): the depth shards are reused.
"""
from __future__ import annotations

import logging
import os
import sys

from launch import run
from launch.generate_depth import check_backbone, parse_args, resolve_config, run_mining


def main(argv=None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv, __doc__, mining_flag=False)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = resolve_config(args)
    check_backbone(cfg)
    import ray

    from cluster.raycluster import connect

    started = connect(args.address)
    try:
        return run_mining(cfg, [s.strip() for s in args.splits.split(",") if s.strip()], args.quiet)
    finally:
        if started:
            ray.shutdown()


if __name__ == "__main__":
    run(main)
