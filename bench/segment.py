"""Distributed segmentation throughput: images/s per actor, and 2 actors against 1 (cluster/segmentation.py).

    python launch/benchmark.py segment [--images 48] [--backbone effnet_lite0] [--resolution 320] [--crf]

Writes synthetic photos (``--height`` x ``--width`` PNGs) and an untrained segmenter (throughput does not depend on
the weights) to a temporary folder, then runs the real job (``cluster.segmentation.segment``: read, score, finish,
PNG label + overlay written atomically, a record per unit, the manifest) on a local Ray with 1 and with 2 CPU
actors of 1 torch thread each (``--repeats`` runs each, the fastest kept; each run a new output folder).

Figures per row: wall seconds including actor start-up; warm images/s = the images of the units completed after the
first round (one unit per actor, which pays start-up) over the time from the end of that round to the last unit;
CPU seconds per image of the actors' own unit work. The goal is >= 1.8x for 2 actors over 1 on 2 free cores; each
row records the 1-minute load average, since on a shared machine the second actor may not find a free core.
"""
from __future__ import annotations

import os
import tempfile
import time

import numpy as np


def add_arguments(parser) -> None:
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--backbone", default="effnet_lite0")
    parser.add_argument("--weights", default="random", help="backbone weights ('random' = untrained)")
    parser.add_argument("--resolution", type=int, default=320)
    parser.add_argument("--classes", type=int, default=27)
    parser.add_argument("--unit-size", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--crf", action="store_true", help="dense CRF as 1-CPU Ray tasks (competes for the cores)")
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2)


def _setup(root: str, args) -> tuple[str, list]:
    from PIL import Image

    from cluster import evaluator
    from depthg import inference
    from depthg.checkpoint import save_segmenter
    from depthg.config import Config

    folder = os.path.join(root, "images")
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for i in range(args.images):
        Image.fromarray(rng.integers(0, 255, (args.height, args.width, 3), dtype=np.uint8)).save(
            os.path.join(folder, f"photo{i:04d}.png"))
    cfg = Config()
    cfg.model.backbone, cfg.model.weights, cfg.model.code_dim, cfg.model.n_classes = (
        args.backbone, args.weights, 70, args.classes)
    ckpt = os.path.join(root, "segmenter.pt")
    save_segmenter(ckpt, cfg, evaluator.RandomModel(args.backbone, args.weights, 70, args.classes, 0)()[1], {})
    return ckpt, inference.list_inputs(folder)


def _run(args, ckpt: str, items: list, output: str, actors: int) -> dict:
    from cluster import evaluator, segmentation

    settings = {"checkpoint": ckpt, "input": "", "output": output, "probe": "cluster", "crf": bool(args.crf),
                "resolution": args.resolution, "flip": True, "mapping": None,
                "palette": [[(i * 37) % 256, (i * 91) % 256, (i * 53) % 256] for i in range(args.classes)],
                "overlays": True, "probs": False, "unit_size": args.unit_size, "batch_size": args.batch_size}
    arrivals = []
    start = time.perf_counter()
    segmentation.segment(settings, evaluator.CheckpointModel(ckpt), items, workers=actors, progress=False,
                         on_unit=lambda r: arrivals.append((time.perf_counter(), len(r["images"]))), device="cpu")
    wall = time.perf_counter() - start
    first = arrivals[actors - 1][0]
    warm_images = sum(n for _, n in arrivals[actors:])
    records = segmentation.read_records(output)
    return {"actors": actors, "images": len(items), "wall_s": wall,
            "warm_images_per_s": warm_images / max(arrivals[-1][0] - first, 1e-9),
            "actor_s_per_image": sum(r["seconds"] for r in records) / len(items),
            "load_avg_1min": os.getloadavg()[0]}


def run(args) -> dict:
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=max(2, max(args.actors)), include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="depthg-bench-segment-") as root:
            ckpt, items = _setup(root, args)
            for actors in args.actors:
                runs = [_run(args, ckpt, items, os.path.join(root, f"out-{actors}-{k}"), actors)
                        for k in range(args.repeats)]
                best = max(runs, key=lambda r: r["warm_images_per_s"])
                best["repeats"] = [round(r["warm_images_per_s"], 3) for r in runs]
                rows.append(best)
    finally:
        if started:
            ray.shutdown()
    by = {r["actors"]: r for r in rows}
    speedup = {"2_vs_1": by[2]["warm_images_per_s"] / by[1]["warm_images_per_s"]} if 1 in by and 2 in by else {}
    table = _table(rows, speedup)
    print(table)
    settings = {k: getattr(args, k) for k in ("images", "height", "width", "backbone", "weights", "resolution",
                                               "classes", "unit_size", "batch_size", "crf", "repeats")}
    return {"settings": settings, "threads_per_actor": 1, "cores": os.cpu_count(), "rows": rows,
            "images_per_s_per_actor": {r["actors"]: r["warm_images_per_s"] / r["actors"] for r in rows},
            "speedup": speedup, "table": table}


def _table(rows: list[dict], speedup: dict) -> str:
    lines = ["| actors (1 thread each) | images | wall s (incl. start) | warm images/s | images/s per actor "
             "| actor s / image | load avg |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['actors']} | {r['images']} | {r['wall_s']:.1f} | {r['warm_images_per_s']:.2f} "
                     f"| {r['warm_images_per_s'] / r['actors']:.2f} | {r['actor_s_per_image']:.3f} "
                     f"| {r['load_avg_1min']:.1f} |")
    if speedup:
        lines.append(f"\n2 actors vs 1: {speedup['2_vs_1']:.2f}x (goal >= 1.8x)")
    return "\n".join(lines)
