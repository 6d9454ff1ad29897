"""Depth generation: samples/s of a plain in-process loop vs the Ray pipeline, and autocast's error.

All rows run the same work: synthetic scenes -> a small transformers depth model (a randomly
initialised DPT saved to a temporary folder, real model computation, no download) -> five crops ->
PNG encoding -> atomic shard writes, through ``cluster.depthgen.DepthWorker``. The plain loop calls
``run_unit`` in this process; the Ray runs call ``generate_depth`` on a local Ray (actors read the
scenes themselves):

* ``ray N actor(s), serial``: one unit at a time per actor, one thread (encoding after the model);
* ``ray 1 actor, overlapped, T thr``: two units in flight per actor (one's PNG encoding and upload
  overlap the other's depth model), T torch + T encoding threads (``--overlap-threads``): the
  images/s per actor a depth actor now reaches. On this CPU-only machine the "GPU" work is CPU work
  on the same cores, so the overlap can only use otherwise idle cores; on a GPU node it hides the
  encoding (about 28 ms of CPU per 240 x 320 crop, ``bench/depthgen.json``) behind the model.

Each figure is measured warm (actors started and model loaded by a one-unit warm-up; the fastest of
``--repeats`` timed runs) and also reported cold (start-up + first run). Bytes per sample are
measured on the written depth shards and on training shards mined from them.

Precision: the largest absolute difference of normalised depth (in [0, 1]) between autocast bf16 /
fp16 and fp32, on this CPU, for tiny random models: DPT and ZoeDepth as initialised (their maps are
nearly constant, so min-max normalisation magnifies any rounding: an upper bound, not a typical
error) and a DPT initialised with larger weights whose maps have a real range.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time

from depthg import io, shards
from depthg.config import load_config, to_dict


def add_arguments(parser) -> None:
    parser.add_argument("--images", type=int, default=32, help="synthetic source images (train split, five-cropped)")
    parser.add_argument("--height", type=int, default=120)
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--per-shard", type=int, default=4, help="source images per shard (work unit)")
    parser.add_argument("--model-size", type=int, default=64, help="DPT hidden size (4 layers)")
    parser.add_argument("--model-res", type=int, default=128, help="DPT input resolution")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--positives", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the plain loop and of each actor "
                        "(equal, so 1 actor vs the loop compares the pipeline, not threading)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per pipeline; the fastest is kept "
                        "(the machine may be shared)")
    parser.add_argument("--overlap-threads", default="1,2", help="threads of the overlapped actor, one row each "
                        "(its CPU share: depthgen.cpus_per_actor)")


def make_tiny_dpt(folder: str, hidden: int, res: int, init: float = 0.02) -> str:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.DPTConfig(hidden_size=hidden, num_hidden_layers=4, num_attention_heads=4,
                                 intermediate_size=4 * hidden, image_size=res, patch_size=16,
                                 backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[16, 32, 64, 64],
                                 fusion_hidden_size=32, initializer_range=init)
    transformers.DPTForDepthEstimation(cfg).eval().save_pretrained(folder)
    transformers.DPTImageProcessor(size={"height": res, "width": res}, keep_aspect_ratio=False).save_pretrained(folder)
    return folder


def _config(args, root: str, model: str, extra=()):
    return load_config(None, [
        "data.dataset=synthetic", f"data.num_train={args.images}", f"data.height={args.height}",
        f"data.width={args.width}", f"shards.root={root}", f"shards.samples_per_shard={args.per_shard}",
        "depthgen.source=transformers", f"depthgen.model={model}", f"depthgen.batch_size={args.batch_size}",
        "depthgen.device=auto", "shards.overwrite=true", f"mining.num_positives={args.positives}", *extra])


def plain_loop(args, root: str, model: str) -> dict:
    import torch

    from cluster.depthgen import DepthWorker, list_units
    from depthg.data import build_source

    cfg = _config(args, root, model)
    start = time.perf_counter()
    worker = DepthWorker(to_dict(cfg), threads=args.threads)
    folder = shards.split_dir(root, "train", "depth")
    os.makedirs(root, exist_ok=True)
    listing = os.path.join(root, "listing.jsonl")  # the units as the Ray driver hands them out
    plan = list_units(build_source(cfg.data, "train", listed=False), listing, cfg.shards.samples_per_shard)
    calls = [("train", u, listing, plan.start(u), plan.stop(u), folder) for u in range(len(plan))]
    worker.run_listed(*calls[0])  # warm-up: model loaded, first batch run
    cold = time.perf_counter() - start
    times = []
    for _ in range(max(args.repeats, 1)):
        t0 = time.perf_counter()
        count = sum(worker.run_listed(*call)["count"] for call in calls)
        times.append(time.perf_counter() - t0)
    return {"samples": count, "warm_s": min(times), "runs_s": times, "cold_s": cold + times[0],
            "threads": torch.get_num_threads()}


def make_tiny_zoe(folder: str) -> str:
    import torch
    import transformers

    torch.manual_seed(0)
    backbone = transformers.BeitConfig(hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                                       intermediate_size=32, image_size=32, patch_size=8,
                                       out_features=["stage1", "stage2", "stage3", "stage4"],
                                       use_auxiliary_head=False, reshape_hidden_states=False)
    cfg = transformers.ZoeDepthConfig(backbone_config=backbone, neck_hidden_sizes=[8, 8, 16, 16], fusion_hidden_size=8,
                                      bottleneck_features=8, num_relative_features=8, bin_embedding_dim=8,
                                      num_attractors=[4, 4, 2, 1],
                                      bin_configurations=[{"n_bins": 8, "min_depth": 0.001, "max_depth": 10.0}])
    transformers.ZoeDepthForDepthEstimation(cfg).eval().save_pretrained(folder)
    transformers.ZoeDepthImageProcessor(size={"height": 32, "width": 32}, ensure_multiple_of=8).save_pretrained(folder)
    return folder


def precision_errors(args, tmp: str) -> list[dict]:
    """Max |autocast - fp32| of normalised depth on this CPU, per tiny random model and precision."""
    import numpy as np

    from depthg.data.synthetic import SyntheticSource
    from depthg.depth import TransformersDepth

    source = SyntheticSource(8, args.height, args.width, seed=0, split="train")
    images = [source.load(i).image for i in source.ids()]
    models = {"DPT (default init, near-constant maps)": make_tiny_dpt(os.path.join(tmp, "p-dpt"), 16, 32),
              "DPT (init 0.2, maps with a range)": make_tiny_dpt(os.path.join(tmp, "p-dpt2"), 16, 32, init=0.2),
              "ZoeDepth (default init, near-constant maps)": make_tiny_zoe(os.path.join(tmp, "p-zoe"))}
    rows = []
    for name, folder in models.items():
        ref = TransformersDepth(folder, "cpu", precision="fp32")(images)
        for precision in ("bf16", "fp16"):
            est = TransformersDepth(folder, "cpu", precision=precision)
            out = est(images)
            rows.append({"model": name, "precision": precision, "ran_autocast": est.amp is not None,
                         "max_abs_diff": max(float(np.abs(a - b).max()) for a, b in zip(out, ref)),
                         "mean_abs_diff": float(np.mean([np.abs(a - b).mean() for a, b in zip(out, ref)]))})
    return rows


def encode_ms_per_crop(repeats: int = 20) -> float:
    """CPU milliseconds to PNG-encode one 240 x 320 crop (RGB, 16-bit depth, label), one thread."""
    from depthg import shards as fmt
    from depthg.data.synthetic import SyntheticSource

    rec = SyntheticSource(1, 240, 320, seed=0, split="train").load("syn-train-000000")
    start = time.process_time()
    for i in range(repeats):
        fmt.encode_sample(f"s{i}", rec.image, rec.depth, rec.label, {"id": f"s{i}"})
    return 1000 * (time.process_time() - start) / repeats


def ray_pipeline(args, root: str, model: str, actors: int, threads: int | None = None, in_flight: int = 1) -> dict:
    from cluster.depthgen import depth_group, generate_depth

    cfg = _config(args, root, model, [f"depthgen.num_actors={actors}"])
    start = time.perf_counter()
    with depth_group(cfg, threads=threads or args.threads, in_flight=in_flight) as group:
        # warm-up: one unit per actor (start-up, model load); the timed run redoes them (overwrite)
        generate_depth(cfg, "train", max_units=actors, progress=False, group=group)
        cold = time.perf_counter() - start
        times = []
        for _ in range(max(args.repeats, 1)):
            t0 = time.perf_counter()
            manifest = generate_depth(cfg, "train", progress=False, group=group)
            times.append(time.perf_counter() - t0)
    return {"samples": manifest["total"], "warm_s": min(times), "runs_s": times, "cold_s": cold + times[0],
            "actors": actors, "threads": threads or args.threads, "units_in_flight": in_flight}


def shard_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder) if n.endswith(".tar"))


def run(args) -> dict:
    import ray

    from cluster.mining import mine_neighbors
    from cluster.raycluster import connect

    tmp = tempfile.mkdtemp(prefix="depthg-bench-")
    try:
        model = make_tiny_dpt(os.path.join(tmp, "dpt"), args.model_size, args.model_res)
        precision = precision_errors(args, tmp)
        rows = {"plain loop": plain_loop(args, os.path.join(tmp, "plain"), model)}
        started = connect("local", num_cpus=os.cpu_count(), num_gpus=0)  # a private Ray, never a shared one
        try:
            for n in args.actors:
                rows[f"ray {n} actor{'s' if n > 1 else ''}, serial"] = ray_pipeline(
                    args, os.path.join(tmp, f"ray{n}"), model, n)
            for t in [int(x) for x in str(args.overlap_threads).split(",")]:
                rows[f"ray 1 actor, overlapped, {t} thr"] = ray_pipeline(
                    args, os.path.join(tmp, f"overlap{t}"), model, 1, threads=t, in_flight=2)
            root = os.path.join(tmp, f"ray{args.actors[0]}")
            mine_neighbors(_config(args, root, model, ["model.backbone=tiny_vit", "data.resolution=64"]), "train",
                           progress=False)
        finally:
            if started:
                ray.shutdown()
        depth_folder, train_folder = shards.split_dir(root, "train", "depth"), shards.split_dir(root, "train", "train")
        total = shards.read_manifest(depth_folder)["total"]
        result = {"rows": rows, "settings": dict(vars(args)), "precision": precision,
                  "encode_ms_per_crop_240x320": encode_ms_per_crop(),
                  "bytes_per_depth_sample": shard_bytes(depth_folder) / total,
                  "bytes_per_training_sample": shard_bytes(train_folder) / total}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = rows["plain loop"]["samples"] / rows["plain loop"]["warm_s"]
    crops = 5  # five-cropped train split: samples = 5 x source images
    print(f"{'pipeline':<32}{'samples':>8}{'warm s':>9}{'samples/s':>11}{'images/s/actor':>16}{'vs plain':>10}{'cold s':>9}")
    for name, r in rows.items():
        r["samples_per_s"] = r["samples"] / r["warm_s"]
        r["images_per_s_per_actor"] = r["samples_per_s"] / crops / r.get("actors", 1)
        r["vs_plain"] = r["samples_per_s"] / base
        print(f"{name:<32}{r['samples']:>8}{r['warm_s']:>9.2f}{r['samples_per_s']:>11.2f}"
              f"{r['images_per_s_per_actor']:>16.2f}{r['vs_plain']:>9.2f}x{r['cold_s']:>9.2f}")
    print(f"\n{'model (CPU, tiny, random)':<46}{'precision':>10}{'max |d - fp32|':>16}{'mean':>9}")
    for p in precision:
        print(f"{p['model']:<46}{p['precision']:>10}{p['max_abs_diff']:>16.4f}{p['mean_abs_diff']:>9.4f}")
    result["load_avg_1min"] = os.getloadavg()[0]
    print(f"PNG encoding: {result['encode_ms_per_crop_240x320']:.1f} ms of CPU per 240 x 320 crop")
    print(f"bytes per depth sample {result['bytes_per_depth_sample']:.0f}, per training sample "
          f"({args.positives} positives) {result['bytes_per_training_sample']:.0f}")
    return result
