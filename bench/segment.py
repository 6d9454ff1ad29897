"""Distributed segmentation throughput: images/s per actor with and without I/O overlap, 2 actors against 1
(cluster/segmentation.py).

    python launch/benchmark.py segment [--images 48] [--storage s3|local] [--resolutions 320 96] [--crf]
                                       [--actors 1 2] [--variants serial overlap]

Writes synthetic photos (``--height`` x ``--width`` PNGs) and an untrained segmenter (throughput does not depend on
the weights), then runs the real job (``cluster.segmentation.segment``: read, score, finish, PNG label + overlay
written atomically, a record per unit, the manifest) on a local Ray with CPU actors of 1 torch thread each. With
``--storage s3`` (default) the photos and every output live on a moto S3 server started here on loopback (real
HTTP requests, one per image read and one per output file), else on the local disk.

Variants, both in the same run: ``serial`` = ``prefetch 0, io_threads 1``: each unit reads its images one after
the other, scores, writes, and the next unit starts after (how every unit ran before); ``overlap`` = ``prefetch 1,
io_threads 8``: the next unit's reads and the last unit's writes run beside the scoring (one lock around the
scoring per actor). ``--repeats`` runs each (resolution, actors, variant), the fastest kept; each run a new output
folder. Two resolutions by default: 320 px (the evaluation's; on this CPU the scoring takes ~25x the reads, as it
never does on a GPU) and 96 px (scoring about as long as the I/O, the ratio a GPU actor sees at 320 px).

Figures per row: wall seconds including actor start-up; warm images/s = the images of the units completed after the
first round (one unit per actor, which pays start-up) over the time from the end of that round to the last unit;
per image the actor's read seconds and scoring seconds (from the unit records), i.e. how much of a unit is I/O.
Each row records the 1-minute load average: the machine is shared, so a second actor or thread may not find a
free core.
"""
from __future__ import annotations

import os
import tempfile
import time

import numpy as np

VARIANTS = {"serial": {"prefetch": 0, "io_threads": 1}, "overlap": {"prefetch": 1, "io_threads": 8}}


def add_arguments(parser) -> None:
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--backbone", default="effnet_lite0")
    parser.add_argument("--weights", default="random", help="backbone weights ('random' = untrained)")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[320, 96])
    parser.add_argument("--classes", type=int, default=27)
    parser.add_argument("--unit-size", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--crf", action="store_true", help="dense CRF as 1-CPU Ray tasks (competes for the cores)")
    parser.add_argument("--storage", choices=("s3", "local"), default="s3",
                        help="photos and outputs on a moto S3 server on loopback (default) or the local disk")
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=2)


def _setup(root: str, store: str, args) -> tuple[str, list]:
    from cluster import evaluator
    from depthg import inference, io
    from depthg.checkpoint import save_segmenter
    from depthg.config import Config

    folder = io.join(store, "images")
    rng = np.random.default_rng(0)
    for i in range(args.images):
        io.write_bytes(io.join(folder, f"photo{i:04d}.png"), inference.png_bytes(
            rng.integers(0, 255, (args.height, args.width, 3), dtype=np.uint8)))
    cfg = Config()
    cfg.model.backbone, cfg.model.weights, cfg.model.code_dim, cfg.model.n_classes = (
        args.backbone, args.weights, 70, args.classes)
    ckpt = os.path.join(root, "segmenter.pt")
    save_segmenter(ckpt, cfg, evaluator.RandomModel(args.backbone, args.weights, 70, args.classes, 0)()[1], {})
    return ckpt, inference.list_inputs(folder)


def _run(args, ckpt: str, items: list, output: str, actors: int, variant: str, resolution: int) -> dict:
    from cluster import evaluator, segmentation

    settings = {"checkpoint": ckpt, "input": "", "output": output, "probe": "cluster", "crf": bool(args.crf),
                "resolution": resolution, "flip": True, "mapping": None,
                "palette": [[(i * 37) % 256, (i * 91) % 256, (i * 53) % 256] for i in range(args.classes)],
                "overlays": True, "probs": False, "unit_size": args.unit_size, "batch_size": args.batch_size,
                **VARIANTS[variant]}
    arrivals = []
    start = time.perf_counter()
    segmentation.segment(settings, evaluator.CheckpointModel(ckpt), items, workers=actors, progress=False,
                         on_unit=lambda r: arrivals.append((time.perf_counter(), len(r["images"]))), device="cpu")
    wall = time.perf_counter() - start
    first = arrivals[actors - 1][0]
    warm_images = sum(n for _, n in arrivals[actors:])
    records = segmentation.read_records(output)
    return {"resolution": resolution, "actors": actors, "variant": variant, **VARIANTS[variant],
            "images": len(items), "wall_s": wall,
            "warm_images_per_s": warm_images / max(arrivals[-1][0] - first, 1e-9),
            "actor_s_per_image": sum(r["seconds"] for r in records) / len(items),
            "read_s_per_image": sum(r["read_s"] for r in records) / len(items),
            "score_s_per_image": sum(r["score_s"] for r in records) / len(items),
            "load_avg_1min": os.getloadavg()[0]}


def run(args) -> dict:
    import ray

    from cluster.world import patched_environ

    moto, env = None, {}
    if args.storage == "s3":
        import boto3

        from bench.train import _moto

        moto, endpoint = _moto()
        env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
               "AWS_DEFAULT_REGION": "us-east-1"}
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bench",
                     aws_secret_access_key="bench").create_bucket(Bucket="bench")
    rows = []
    try:
        with patched_environ(env), tempfile.TemporaryDirectory(prefix="depthg-bench-segment-") as root:
            started = not ray.is_initialized()
            if started:  # after the environment is set: the actors inherit the storage settings from the raylet
                ray.init(address="local", num_cpus=max(2, max(args.actors)), include_dashboard=False,
                         log_to_driver=False)
            try:
                store = "s3://bench" if moto else root
                ckpt, items = _setup(root, store, args)
                for res in args.resolutions:
                    for actors in args.actors:
                        for variant in args.variants:  # both variants in the same run, under the same load
                            runs = [_run(args, ckpt, items, f"{store}/out-{res}-{actors}-{variant}-{k}", actors,
                                         variant, res) for k in range(args.repeats)]
                            best = max(runs, key=lambda r: r["warm_images_per_s"])
                            best["repeats"] = [round(r["warm_images_per_s"], 3) for r in runs]
                            rows.append(best)
            finally:
                if started:
                    ray.shutdown()
    finally:
        if moto is not None:
            moto.terminate()
    by = {(r["resolution"], r["actors"], r["variant"]): r["warm_images_per_s"] for r in rows}
    per_actor, gain, speedup = {}, {}, {}
    for res in args.resolutions:
        per_actor[res] = {v: {a: by[(res, a, v)] / a for a in args.actors if (res, a, v) in by}
                          for v in args.variants}
        gain[res] = {a: by[(res, a, "overlap")] / by[(res, a, "serial")] for a in args.actors
                     if (res, a, "overlap") in by and (res, a, "serial") in by}
        speedup[res] = {v: by[(res, 2, v)] / by[(res, 1, v)] for v in args.variants
                        if (res, 1, v) in by and (res, 2, v) in by}
    table = _table(rows, gain, speedup)
    print(table)
    settings = {k: getattr(args, k) for k in ("images", "height", "width", "backbone", "weights", "resolutions",
                                               "classes", "unit_size", "batch_size", "crf", "storage", "repeats")}
    return {"settings": settings, "variants": VARIANTS, "threads_per_actor": 1, "cores": os.cpu_count(),
            "rows": rows, "images_per_s_per_actor": per_actor, "overlap_over_serial": gain, "speedup": speedup,
            "table": table}


def _table(rows: list[dict], gain: dict, speedup: dict) -> str:
    lines = ["| px | actors (1 thread each) | variant | images | wall s (incl. start) | warm images/s "
             "| images/s per actor | read s / image | score s / image | load avg |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['resolution']} | {r['actors']} | {r['variant']} | {r['images']} | {r['wall_s']:.1f} "
                     f"| {r['warm_images_per_s']:.2f} | {r['warm_images_per_s'] / r['actors']:.2f} "
                     f"| {r['read_s_per_image']:.3f} | {r['score_s_per_image']:.3f} | {r['load_avg_1min']:.1f} |")
    lines.append("")
    for res, by_actors in gain.items():
        for a, g in by_actors.items():
            lines.append(f"{res} px, {a} actor(s): overlap / serial {g:.2f}x")
    for res, by_variant in speedup.items():
        for v, x in by_variant.items():
            lines.append(f"{res} px, 2 actors vs 1 ({v}): {x:.2f}x")
    return "\n".join(lines)
