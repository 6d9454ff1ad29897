"""Evaluation throughput: the dense CRF as 1-CPU Ray tasks (1 vs 2 at a time), and whole evaluations.

    python launch/benchmark.py eval [--images 16] [--resolution 320] [--backbone effnet_lite0]

Writes a small set of synthetic validation shards to a temporary folder and an untrained segmenter
(throughput does not depend on the weights). Two tables:

1. CRF tasks: each image's probe scores (``depthg.evaluation.predict_scores``, computed once here)
   go to ``cluster.evaluator.crf_task`` as a 1-CPU Ray task, exactly as the evaluation actors send
   them; images/s with at most 1 and at most 2 tasks running. The CRF is single-threaded, so tasks
   scale with free cores: the target is >= 1.8x for 2 tasks over 1 (``speedup.crf_tasks_2_vs_1``).
2. Whole evaluations (``cluster.evaluator.evaluate``) with 1 and 2 actors, with and without CRF:
   wall seconds including actor start-up, and the CPU seconds per image of the actors' own work.

Each row records the 1-minute load average: on a shared machine a speed-up is only meaningful when
the load leaves the cores free.
"""
from __future__ import annotations

import os
import tempfile
import time

import torch

from cluster import evaluator
from depthg import evaluation, shards
from depthg.config import Config


def add_arguments(parser) -> None:
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=320)
    parser.add_argument("--classes", type=int, default=27, help="classes = clusters (CRF cost grows with them)")
    parser.add_argument("--backbone", default="effnet_lite0")
    parser.add_argument("--weights", default="", help="backbone weights ('' = default, 'random' = untrained)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", default="1,2", help="comma-separated actor counts for table 2")


def _config(args, crf: bool) -> Config:
    cfg = Config()
    cfg.model.backbone, cfg.model.n_classes, cfg.model.extra_clusters = args.backbone, args.classes, 0
    cfg.eval.resolution, cfg.eval.batch_size, cfg.eval.crf = args.resolution, args.batch_size, crf
    cfg.eval.report_images = 0
    return cfg


def crf_inputs(args, model, urls) -> list[tuple]:
    """Per image: the arguments an evaluation actor sends to ``crf_task``."""
    backbone, segmenter = model()
    opts = evaluation.EvalOptions(args.classes, crf=True)
    rows = evaluation.n_predictions(segmenter, opts)
    out = []
    for url in urls:
        batch = [evaluation.prepare(shards.decode_sample(raw), args.resolution) for raw in shards.iter_shard(url)]
        images, labels = evaluation.collate(batch)
        scores, _ = evaluation.predict_scores(backbone.eval(), segmenter.eval(), images, opts)
        for i in range(len(batch)):
            out.append((images[i:i + 1], {k: v[i:i + 1] for k, v in scores.items()}, labels[i:i + 1], rows,
                        args.classes, opts.crf_params))
    return out


def timed_crf_task(*args) -> float:
    """``cluster.evaluator.crf_task`` as the evaluation sends it, returning the task's CPU seconds."""
    start = time.process_time()
    evaluator.crf_task(*args)
    return time.process_time() - start


def crf_tasks(inputs: list[tuple], parallel: int) -> dict:
    """images/s of the CRF with at most ``parallel`` 1-CPU tasks running (and CPU seconds per image)."""
    import ray

    remote = ray.remote(num_cpus=1)(timed_crf_task)
    ray.get([remote.remote(*inputs[0]) for _ in range(parallel)])  # warm-up: workers started, pydensecrf imported
    start, running, cpu = time.perf_counter(), [], []
    for task_args in inputs:  # submitted as an actor submits them (large arguments go to the object store)
        if len(running) >= parallel:
            ready, running = ray.wait(running, num_returns=1)
            cpu += ray.get(ready)
        running.append(remote.remote(*task_args))
    cpu += ray.get(running)
    seconds = time.perf_counter() - start
    return {"parallel_tasks": parallel, "images": len(cpu), "seconds": seconds, "images_per_s": len(cpu) / seconds,
            "cpu_s_per_image": sum(cpu) / len(cpu), "load_avg_1min": os.getloadavg()[0]}


def run(args) -> dict:
    import ray

    counts = [int(w) for w in str(args.workers).split(",")]
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=max(2, max(counts)), include_dashboard=False, log_to_driver=False)
    model = evaluator.RandomModel(args.backbone, args.weights, 70, args.classes, 0)
    rows, crf_rows = [], []
    try:
        with tempfile.TemporaryDirectory(prefix="depthg-bench-eval-") as root:
            shards.write_test_shards(root, args.images, size=(args.resolution * 3 // 4, args.resolution),
                                     with_positives=False, samples_per_shard=max(1, args.images // 8), split="val",
                                     n_classes=args.classes)
            urls = evaluator.shard_list(root, "val")
            with torch.no_grad():
                inputs = crf_inputs(args, model, urls)
            crf_rows = [crf_tasks(inputs, n) for n in (1, 2)]
            for crf in (False, True):
                for workers in counts:
                    start = time.perf_counter()
                    out = evaluator.evaluate(_config(args, crf), model, urls, workers)
                    rows.append({"crf": crf, "workers": workers, "images": out["images"],
                                 "wall_s": time.perf_counter() - start,
                                 "actor_cpu_s_per_image": sum(out["shard_cpu_seconds"]) / out["images"],
                                 "load_avg_1min": os.getloadavg()[0]})
    finally:
        if started:
            ray.shutdown()
    speedup = {"crf_tasks_2_vs_1": crf_rows[1]["images_per_s"] / crf_rows[0]["images_per_s"]}
    table = _tables(crf_rows, rows, speedup)
    print(table)
    return {"settings": {k: getattr(args, k) for k in ("images", "resolution", "classes", "backbone", "batch_size")},
            "cores": os.cpu_count(), "crf_tasks": crf_rows, "rows": rows, "speedup": speedup, "table": table}


def _tables(crf_rows: list[dict], rows: list[dict], speedup: dict) -> str:
    lines = ["| CRF tasks at once | images | seconds | images/s | CPU s / image (2 heads) | load avg |",
             "|---|---|---|---|---|---|"]
    for r in crf_rows:
        lines.append(f"| {r['parallel_tasks']} | {r['images']} | {r['seconds']:.1f} | {r['images_per_s']:.2f} "
                     f"| {r['cpu_s_per_image']:.2f} | {r['load_avg_1min']:.1f} |")
    lines.append(f"\n2 tasks vs 1: {speedup['crf_tasks_2_vs_1']:.2f}x (goal >= 1.8x)\n")
    lines += ["| CRF | actors | images | wall s (incl. actor start) | actor CPU s / image | load avg |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {'yes' if r['crf'] else 'no'} | {r['workers']} | {r['images']} | {r['wall_s']:.1f} "
                     f"| {r['actor_cpu_s_per_image']:.2f} | {r['load_avg_1min']:.1f} |")
    return "\n".join(lines)
