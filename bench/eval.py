"""Evaluation throughput: images/s with and without dense CRF, for 1 and 2 Ray workers.

    python launch/benchmark.py eval [--images 16] [--resolution 320] [--backbone effnet_lite0]

Writes a small set of synthetic validation shards to a temporary folder, evaluates them with an
untrained segmenter (throughput does not depend on the weights) and reports, per setting,
images / s = images / the slowest worker's evaluation time (actor start-up excluded, reported
apart as wall time), the CPU seconds per image (independent of other load on the machine) and
the 1-minute load average (on a shared machine the speed-up is only meaningful when it is low).
Each actor runs one torch thread; the CRF is CPU-bound and single-threaded, so workers should
scale with free cores: the target is >= 1.8x for 2 workers over 1 with CRF.
"""
from __future__ import annotations

import os
import tempfile
import time

from cluster import evaluator
from depthg import shards
from depthg.config import Config


def add_arguments(parser) -> None:
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=320)
    parser.add_argument("--classes", type=int, default=27, help="classes = clusters (CRF cost grows with them)")
    parser.add_argument("--backbone", default="effnet_lite0")
    parser.add_argument("--weights", default="", help="backbone weights ('' = default, 'random' = untrained)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")


def _config(args, crf: bool) -> Config:
    cfg = Config()
    cfg.model.backbone, cfg.model.n_classes, cfg.model.extra_clusters = args.backbone, args.classes, 0
    cfg.eval.resolution, cfg.eval.batch_size, cfg.eval.crf = args.resolution, args.batch_size, crf
    cfg.eval.report_images = 0
    return cfg


def run(args) -> dict:
    import ray

    counts = [int(w) for w in str(args.workers).split(",")]
    if not ray.is_initialized():
        ray.init(num_cpus=max(counts), include_dashboard=False, log_to_driver=False)
    model = evaluator.RandomModel(args.backbone, args.weights, 70, args.classes, 0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="depthg-bench-eval-") as root:
        per_shard = max(1, args.images // (2 * max(counts)))  # equal shares for every worker count
        shards.write_test_shards(root, args.images, size=(args.resolution * 3 // 4, args.resolution),
                                 with_positives=False, samples_per_shard=per_shard, split="val",
                                 n_classes=args.classes)
        urls = evaluator.shard_list(root, "val")
        for crf in (False, True):
            for workers in counts:
                start = time.perf_counter()
                out = evaluator.evaluate(_config(args, crf), model, urls, workers)
                wall = time.perf_counter() - start
                busy = max(out["worker_seconds"])
                cpu = sum(out["worker_cpu_seconds"])
                rows.append({"crf": crf, "workers": workers, "images": out["images"],
                             "images_per_s": out["images"] / busy, "eval_s": busy, "wall_s": wall,
                             "cpu_s_per_image": cpu / out["images"], "load_avg_1min": os.getloadavg()[0]})
    table = _table(rows)
    print(table)
    return {"settings": {k: getattr(args, k) for k in ("images", "resolution", "classes", "backbone", "batch_size")},
            "threads_per_worker": 1, "cores": os.cpu_count(), "rows": rows,
            "speedup": _speedups(rows), "table": table}


def _speedups(rows: list[dict]) -> dict:
    out = {}
    for crf in (False, True):
        base = next((r for r in rows if r["crf"] == crf and r["workers"] == 1), None)
        for r in rows:
            if base and r["crf"] == crf and r["workers"] > 1:
                out[f"{'crf' if crf else 'no_crf'}_{r['workers']}_vs_1"] = r["images_per_s"] / base["images_per_s"]
    return out


def _table(rows: list[dict]) -> str:
    lines = ["| CRF | workers | images | images/s | eval s | wall s (incl. actor start) | CPU s / image | load avg |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {'yes' if r['crf'] else 'no'} | {r['workers']} | {r['images']} | {r['images_per_s']:.2f} "
                     f"| {r['eval_s']:.2f} | {r['wall_s']:.2f} | {r['cpu_s_per_image']:.2f} "
                     f"| {r['load_avg_1min']:.1f} |")
    return "\n".join(lines)
