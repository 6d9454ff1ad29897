"""Quality benchmark: does depth guidance help, and does the trained head beat raw-feature k-means?

    python launch/benchmark.py quality [--seeds 5] [--quick]

The product's procedure on cached backbone features. The training recipe (``loss``, ``sampling``, ``model``,
``train.lr`` / ``probe_lr`` / ``finish``) is read from the configs a user runs: ``--config`` (default
``configs/demo.yaml``) for the synthetic scenes and ``--camvid-config`` (``configs/camvid_stego.yaml``) for
CamVid; the benchmark sets only the data sizes, the budget (``--steps`` batches of ``--batch``) and each
variant's switches (``VARIANTS``). Backbone: EfficientNet-Lite0 (ImageNet-*supervised*, offline), a STAND-IN for
DINO. Features of every train crop and val image are computed once (``quality_data``), full 704 channels, and
each run trains a fresh head + probes through ``quality_train.cached_step`` (the trainer's step after the
backbone), then ``train.finish`` as the trainer (``quality_train.finish``). Evaluation: cluster probe (one
Hungarian matching over the whole val split) and linear probe, codes bilinearly upsampled to the label
resolution; no CRF, no flip averaging. Baseline: cosine k-means (n_classes clusters, fit on ~20k train
vectors) on the raw backbone features, same matching. Markdown report: ``--results-md``.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import time

import numpy as np
import torch

from bench import quality_data as qd
from bench.quality_data import MARKER, headline, write_markdown  # noqa: F401 (re-exported)
from bench.quality_train import correlation_stats, evaluate, finish, kmeans_baseline, summarise, train_variant
from depthg.config import load_config
from depthg.data import SyntheticSource, build_source
from depthg.models import build_backbone

VARIANTS = {  # name -> config overrides (after the config's recipe)
    "stego": ["loss.depth.mode=none", "sampling.mode=random"],
    "depth_only": ["loss.depth.mode=paper", "sampling.mode=random"],
    "fps_only": ["loss.depth.mode=none", "sampling.mode=fps"],
    "depthg": ["loss.depth.mode=paper", "sampling.mode=fps"],
    "depthg_lhp": ["loss.depth.mode=paper", "sampling.mode=fps", "loss.lhp.enabled=true"],
    # distance-mode targets 1 - d/d_max have median ~0.6 on 10 m-clipped depth: b_depth 0.6 (held-out train:
    # 26.3 mIoU vs 24.2 at 0.5; docs/QUALITY_DIAGNOSIS.md)
    "depthg_distance": ["loss.depth.mode=distance", "sampling.mode=fps", "loss.depth.shift=0.6"],
    "depthg_reference": ["loss.depth.mode=reference", "sampling.mode=fps"],
}
DEFAULT_VARIANTS = "stego,fps_only,depthg,depthg_distance"


def add_arguments(parser) -> None:
    a = parser.add_argument
    a("--config", default="configs/demo.yaml", help="the synthetic runs' training recipe (loss, sampling, model, "
      "train.lr/probe_lr/finish): the config the demo runs")
    a("--camvid-config", default="configs/camvid_stego.yaml", help="the CamVid runs' training recipe")
    a("--overrides", nargs="*", default=[], help="extra config overrides for every run (experiments)")
    a("--steps", type=int, default=80, help="training batches per synthetic run")
    a("--camvid-steps", type=int, default=0, help="training batches per CamVid run (0 = --steps)")
    a("--seeds", type=int, default=5)
    a("--batch", type=int, default=32)
    a("--num-train", type=int, default=120, help="synthetic train scenes (x5 crops)")
    a("--num-val", type=int, default=60, help="synthetic val scenes (full images)")
    a("--crop-res", type=int, default=112, help="synthetic train crop resolution (120x160 crops)")
    a("--val-res", type=int, default=224, help="synthetic val resolution (240x320 scenes)")
    a("--camvid-root", default="/work/shared/data/camvid")
    a("--camvid-train", type=int, default=150, help="CamVid train images (0 = all 367)")
    a("--camvid-crop", type=int, default=0, help="five-crop CamVid train images (1) or use them whole (0)")
    a("--camvid-res", type=int, default=224, help="CamVid train-crop and val resolution")
    a("--camvid-val", type=int, default=0, help="CamVid val images (0 = all 101)")
    a("--knn", type=int, default=7, help="cached top-k neighbours per train crop (the positives)")
    a("--variants", default=DEFAULT_VARIANTS, help=f"comma list of {', '.join(VARIANTS)}")
    a("--skip-camvid", action="store_true")
    a("--skip-synthetic", action="store_true")
    a("--results-md", default="docs/RESULTS.md", help="Markdown report ('' = none)")
    a("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared, oversubscribed CPU)")
    a("--jobs", type=int, default=1, help="datasets run in parallel processes (2: synthetic and CamVid at once)")
    a("--cache-dir", default="", help="reuse cached features from this folder (development only)")
    a("--tune-grid", default="", help="JSON list of [variant, [overrides...]]: only tune on a held-out quarter "
      "of the train images of the first dataset (synthetic, or camvid with --tune-camvid)")
    a("--tune-camvid", action="store_true")
    a("--depth-max", type=float, default=10.0, help="synthetic depth: clip metric depth here (m) before the per-image "
      "min-max, like ZoeDepth-NYU (10, the library default); 0 = full metric range (sky at 150 m)")
    a("--depth-per-crop", action="store_true", help="renormalise each train crop's depth to [0,1] (the paper's text)")
    a("--quick", action="store_true", help="tiny smoke run (tests)")


def _quick(args) -> None:
    args.steps, args.seeds, args.batch, args.num_train, args.num_val = 3, 1, 4, 2, 2
    args.crop_res, args.val_res, args.camvid_train, args.camvid_val, args.camvid_res = 64, 64, 3, 2, 64
    args.overrides = ["sampling.samples=4", "sampling.decay_every=0", "train.finish_samples=8", *args.overrides]


def recipe(args, path: str, n_classes: int, extra=()) -> list[str]:
    """(config path, overrides) of one run: the config's recipe, the dataset's classes, the stand-in backbone,
    ``extra`` (a variant's switches) and ``--overrides``; checked once by ``load_config``."""
    overrides = [f"model.n_classes={n_classes}", "model.backbone=effnet_lite0", *extra, *args.overrides]
    load_config(path, overrides)
    return overrides


# ----------------------------------------------------------------------------- tuning (train split only)
def tune(args, path, train: qd.FeatureSet, n_classes: int, grid, log) -> list[dict]:
    """Cluster-probe mIoU on held-out *train* images for each ``[variant, overrides]`` of ``grid``; the first
    rows are k-means on the input features of the same split."""
    fit, held = qd.split_holdout(train, 0.25, args.knn)
    out = []
    for seed in range(args.seeds):
        scores = kmeans_baseline(fit.feats, held, n_classes, seed, "train")
        out.append({"overrides": ["kmeans_features"], "variant": "kmeans", "seed": seed, "heldout": scores})
        log(f"  tune k-means on the input features, seed {seed}: held-out mIoU {100 * scores['unsupervised']['miou']:.1f}")
    for variant, extra in grid:
        cfg = load_config(path, recipe(args, path, n_classes, VARIANTS[variant] + list(extra)))
        for seed in range(args.seeds):
            seg, terms = train_variant(cfg, fit, args.steps, args.batch, seed)
            finish(seg, fit, cfg, seed)
            scores = evaluate(seg, held, n_classes, fit)
            out.append({"overrides": list(extra), "variant": variant, "seed": seed, "heldout": scores,
                        "final_terms": terms})
            log(f"  tune {variant} {' '.join(extra)} seed {seed}: held-out mIoU "
                f"{100 * scores['unsupervised']['miou']:.1f} linear {100 * scores['linear']['miou']:.1f}")
    return out


# ----------------------------------------------------------------------------- one dataset
def _sources(args, cfg):
    """(train, val) sources; synthetic depth is clipped at ``--depth-max`` metres before its min-max."""
    if cfg.data.dataset == "synthetic":
        d = cfg.data
        return tuple(SyntheticSource(num, d.height, d.width, d.seed, split, depth_max=args.depth_max)
                     for num, split in ((d.num_train, "train"), (d.num_val, "val")))
    return build_source(cfg.data, "train"), build_source(cfg.data, "val")


def _prepare(args, data_overrides, train_kwargs, val_kwargs, log):
    cfg = load_config(None, data_overrides)
    backbone = build_backbone("effnet_lite0")
    src_train, src_val = _sources(args, cfg)
    t0 = time.perf_counter()
    key = "_".join(x.split("=")[-1].replace("/", "") for x in data_overrides) + f"_{train_kwargs}_{val_kwargs}"
    if cfg.data.dataset == "synthetic":
        key += f"_dmax{args.depth_max:g}".replace(".", "p")
    path = os.path.join(args.cache_dir, "".join(c for c in key if c.isalnum() or c == "_") + ".pt")
    if args.cache_dir and os.path.exists(path):
        with torch.serialization.safe_globals([qd.FeatureSet]):  # tensors + this dataclass only
            train, val = torch.load(path, weights_only=True)
    else:
        train = qd.build_set(src_train, backbone, knn=args.knn, **train_kwargs)
        val = qd.build_set(src_val, backbone, **val_kwargs)
        if args.cache_dir:
            os.makedirs(args.cache_dir, exist_ok=True)
            torch.save((train, val), path)
    info = {"train_crops": len(train), "val_images": len(val), "train_res": train_kwargs["res"],
            "val_res": val_kwargs["res"], "raw_dim": int(train.feats.shape[1]),
            "cache_seconds": time.perf_counter() - t0, "n_classes": src_train.n_classes,
            "classes": list(src_train.class_names)}
    if cfg.data.dataset == "synthetic":
        info.update(depth_max=args.depth_max, depth_per_crop=bool(args.depth_per_crop))
    log(f"  cached {len(train)} train crops + {len(val)} val images in {info['cache_seconds']:.0f} s")
    return train, val, info, src_train.n_classes


def run_dataset(args, name, data_overrides, train_kwargs, val_kwargs, variants, path, steps, log) -> dict:
    log(f"[{name}] caching features")
    train, val, info, n_classes = _prepare(args, data_overrides, train_kwargs, val_kwargs, log)
    result = {"setup": info, "kmeans_raw": {}, "variants": {}}
    for fit_on in ("train", "val"):
        runs = [kmeans_baseline(train.feats, val, n_classes, seed, fit_on) for seed in range(args.seeds)]
        result["kmeans_raw"][f"fit_{fit_on}"] = summarise(runs)
        log(f"  k-means raw (fit on {fit_on}): {fmt(result['kmeans_raw'][f'fit_{fit_on}'])}")
    base = load_config(path, recipe(args, path, n_classes))
    result["setup"].update(config=path, recipe={"loss": _asdict(base.loss), "sampling": _asdict(base.sampling),
                                                "model": _asdict(base.model), "lr": base.train.lr,
                                                "probe_lr": base.train.probe_lr, "finish": base.train.finish,
                                                "finish_samples": base.train.finish_samples},
                           overrides=list(args.overrides), correlations=correlation_stats(base, train, args.batch, 0))
    for vname in variants:
        cfg = load_config(path, recipe(args, path, n_classes, VARIANTS[vname]))
        runs = []
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            seg, terms = train_variant(cfg, train, steps, args.batch, seed)
            finish(seg, train, cfg, seed)
            scores = evaluate(seg, val, n_classes, train)
            scores.update(seconds=time.perf_counter() - t0, final_terms=terms)
            runs.append(scores)
            log(f"    {vname} seed {seed}: unsup. mIoU {100 * scores['unsupervised']['miou']:.1f}, linear "
                f"{100 * scores['linear']['miou']:.1f} ({scores['seconds']:.0f} s)")
        result["variants"][vname] = summarise(runs)
        result["variants"][vname]["overrides"] = VARIANTS[vname]
        log(f"  {vname}: {fmt(result['variants'][vname])} ({np.mean([r['seconds'] for r in runs]):.0f} s/run)")
    result["steps"] = steps
    return result


def _asdict(section) -> dict:
    import dataclasses

    return dataclasses.asdict(section)


def fmt(s: dict) -> str:
    parts = []
    for probe in ("unsupervised", "linear"):
        if f"{probe}_miou_mean" in s:
            parts.append(f"{probe} acc {100 * s[f'{probe}_accuracy_mean']:.1f} mIoU {100 * s[f'{probe}_miou_mean']:.1f}"
                         f" (+-{100 * s[f'{probe}_miou_std']:.1f})")
    return ", ".join(parts)


def _datasets(args, syn):
    cam = ["data.dataset=camvid", f"data.root={args.camvid_root}"]
    syn_train = dict(res=args.crop_res, crop=True, limit=0, renormalise_depth=args.depth_per_crop)
    return {"synthetic": (syn, syn_train, dict(res=args.val_res, crop=False, limit=0)),
            "camvid": (cam, dict(res=args.camvid_res, crop=args.camvid_crop, limit=args.camvid_train),
                       dict(res=args.camvid_res, crop=False, limit=args.camvid_val))}


def _run_dataset_job(args, name, job) -> dict:
    torch.set_num_threads(max(1, args.threads))
    tag = f"[{name}]"
    return run_dataset(args, name, *job, lambda msg: print(msg if msg.startswith(tag) else f"{tag} {msg}", flush=True))


def _run_tuning(args, syn, log, t_start) -> dict:
    grid = json.loads(args.tune_grid)
    name = "camvid" if args.tune_camvid else "synthetic"
    path = args.camvid_config if args.tune_camvid else args.config
    overrides, tk, vk = _datasets(args, syn)[name]
    train, val, info, n_classes = _prepare(args, overrides, tk, vk, log)
    results = tune(args, path, train, n_classes, grid, log)
    return {"tuning": {name: {"setup": info, "config": path, "results": results}},
            "seconds_total": time.perf_counter() - t_start}


def run(args) -> dict:
    if args.quick:
        _quick(args)
    torch.set_num_threads(max(1, args.threads))
    t_start = time.perf_counter()
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"--variants: unknown {unknown}; valid: {', '.join(VARIANTS)}")
    for path in (args.config, args.camvid_config):  # fail on a bad config or override before any work
        recipe(args, path, 1)
    result = {"args": {k: v for k, v in vars(args).items() if k != "func"}, "backbone": "effnet_lite0 (ImageNet-"
              "supervised EfficientNet-Lite0: a stand-in for DINO)", "datasets": {}}
    syn = [f"data.num_train={args.num_train}", f"data.num_val={args.num_val}"]
    if args.tune_grid:
        return _run_tuning(args, syn, log, t_start)
    jobs = {}  # dataset -> run_dataset arguments
    if not args.skip_synthetic:
        jobs["synthetic"] = (*_datasets(args, syn)["synthetic"], variants, args.config, args.steps)
    if not args.skip_camvid:
        jobs["camvid"] = (*_datasets(args, syn)["camvid"], ["stego"], args.camvid_config,
                          args.camvid_steps or args.steps)
    if args.jobs > 1 and len(jobs) > 1:  # one process per dataset (each single-threaded by --threads)
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(args.jobs, len(jobs))) as pool:
            futures = {name: pool.submit(_run_dataset_job, args, name, job) for name, job in jobs.items()}
            result["datasets"] = {name: f.result() for name, f in futures.items()}
    else:
        result["datasets"] = {name: run_dataset(args, name, *job, log) for name, job in jobs.items()}
    result["headline"] = headline(result)
    result["seconds_total"] = time.perf_counter() - t_start
    log(f"total {result['seconds_total']:.0f} s; headline {result['headline']}")
    result["command"] = "python " + " ".join(shlex.quote(x) for x in sys.argv)
    if args.results_md:
        from bench import machine

        write_markdown({**result, "machine": machine()}, args.results_md)
    return result
