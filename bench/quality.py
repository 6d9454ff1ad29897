"""Quality benchmark: does depth guidance help? (synthetic scenes with true depth, and CamVid val)

    python launch/benchmark.py quality [--steps 120 --seeds 3] [--quick]

Backbone: EfficientNet-Lite0 (ImageNet-*supervised*, offline), a STAND-IN for DINO. Features of every
train crop and val image are computed once (``quality_data``), optionally projected by an uncentred PCA,
and each variant trains a fresh head + probes on the cache with ``depthg.step.losses_from_features`` and a
plain Adam (head ``train.lr``, probes ``train.probe_lr``); positives are drawn uniformly from each crop's
top-k cosine neighbours (self excluded). Evaluation: cluster-probe predictions (one Hungarian matching over
the whole val split) and the linear probe, on codes bilinearly upsampled to the label resolution; no CRF,
no flip averaging. Baseline: cosine k-means (``fit_kmeans``, n_classes clusters) on the raw backbone
features, same matching. Markdown report: ``--results-md``.
"""
from __future__ import annotations

import os
import shlex
import sys
import time

import numpy as np
import torch

from bench import quality_data as qd
from bench.quality_data import MARKER, headline, write_markdown  # noqa: F401 (re-exported)
from bench.quality_train import (correlation_stats, evaluate, finish_probes, fit_probes,  # noqa: F401
                                 kmeans_baseline, quantile_shifts, reseed_dead_centroids, summarise, train_variant)
from depthg.config import load_config
from depthg.data import SyntheticSource, build_source
from depthg.models import build_backbone

VARIANTS = {  # name -> config overrides (on top of the shared base)
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

# Chosen on a held-out quarter of the *train* images (docs/QUALITY_DIAGNOSIS.md), the same rule for both datasets:
# the negative term alone, its shift at the 90% quantile of the negative pairs' feature correlations
# (--shift-quantiles; label-free), head lr 2e-3. The self / kNN terms at any shift we tried lost to it on
# synthetic held-out crops and tied on CamVid; at the earlier fixed shifts (about their 25-35% quantiles) they
# collapse the codes. b_depth 0.9 for the paper mode: with 10 m-clipped depth D = d_i d_j is near 1 for half the
# pairs, and b_depth 0.03 / 0.1 collapse the codes (held-out 15.8 / 16.1 vs 28.6 mIoU).
SYN_BASE = ["loss.self_weight=0", "loss.knn_weight=0", "train.lr=0.002", "loss.depth.shift=0.9"]
CAMVID_BASE = ["loss.self_weight=0", "loss.knn_weight=0", "train.lr=0.002"]
SHIFT_QUANTILES = "0.5,0.5,0.9"


def add_arguments(parser) -> None:
    a = parser.add_argument
    a("--steps", type=int, default=80, help="training batches per synthetic run")
    a("--camvid-steps", type=int, default=0, help="training batches per CamVid run (0 = --steps)")
    a("--seeds", type=int, default=3)
    a("--batch", type=int, default=32)
    a("--samples", type=int, default=7, help="S (S*S sampled locations per crop)")
    a("--num-train", type=int, default=120, help="synthetic train scenes (x5 crops)")
    a("--num-val", type=int, default=60, help="synthetic val scenes (full images)")
    a("--crop-res", type=int, default=112, help="synthetic train crop resolution (120x160 crops)")
    a("--val-res", type=int, default=224, help="synthetic val resolution (240x320 scenes)")
    a("--camvid-root", default="/work/shared/data/camvid")
    a("--camvid-train", type=int, default=150, help="CamVid train images (0 = all 367)")
    a("--camvid-crop", type=int, default=0, help="five-crop CamVid train images (1) or use them whole (0)")
    a("--camvid-res", type=int, default=224, help="CamVid train-crop and val resolution")
    a("--camvid-val", type=int, default=0, help="CamVid val images (0 = all 101)")
    a("--pca-dim", type=int, default=128, help="project backbone features to this many channels (0 = off)")
    a("--knn", type=int, default=7)
    a("--probe-steps", type=int, default=150, help="probe-only steps on the final train codes (0 = off)")
    a("--finish", default="fit", choices=("adam", "fit"), help="after training: adam = --probe-steps probe-only Adam "
      "steps with dead-centroid re-seeding; fit = cluster centroids by k-means on the train codes (label-free, best of "
      "5) and a converged (L-BFGS) linear probe (quality_train.fit_probes)")
    a("--variants", default=",".join(VARIANTS))
    a("--base", nargs="*", default=SYN_BASE, help="config overrides for every synthetic run (chosen on held-out train)")
    a("--camvid-base", nargs="*", default=CAMVID_BASE, help="config overrides for the CamVid runs")
    a("--skip-camvid", action="store_true")
    a("--skip-synthetic", action="store_true")
    a("--results-md", default="docs/RESULTS.md", help="Markdown report ('' = none)")
    a("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared, oversubscribed CPU)")
    a("--cache-dir", default="", help="reuse cached features from this folder (development only)")
    a("--tune-grid", default="", help="JSON list of [variant, [overrides...]]: only tune on a held-out quarter "
      "of the train images of the first dataset (synthetic, or camvid with --tune-camvid)")
    a("--tune-camvid", action="store_true")
    a("--shift-quantiles", default=SHIFT_QUANTILES, help="label-free shifts: 'q_self,q_knn,q_neg' quantiles of the train split's "
      "feature correlations (e.g. 0.75,0.75,0.9) replace the fixed shifts of --base / --camvid-base ('' = off)")
    a("--depth-max", type=float, default=10.0, help="synthetic depth: clip metric depth here (m) before the per-image "
      "min-max, like ZoeDepth-NYU (10, the library default); 0 = full metric range (sky at 150 m)")
    a("--depth-per-crop", action="store_true", help="renormalise each train crop's depth to [0,1] (the paper's text)")
    a("--depth-power", type=float, default=1.0, help="experiment: train depth d -> d**p (1 = as given)")
    a("--quick", action="store_true", help="tiny smoke run (tests)")


def _quick(args) -> None:
    args.steps, args.seeds, args.batch, args.num_train, args.num_val = 3, 1, 4, 2, 2
    args.crop_res, args.val_res, args.pca_dim, args.camvid_train, args.camvid_val = 64, 64, 16, 1, 2
    args.camvid_res, args.samples, args.probe_steps = 64, 4, 3


def base_overrides(args, n_classes: int, extra=()) -> list[str]:
    s = args.samples
    return [f"model.n_classes={n_classes}", "model.backbone=effnet_lite0", f"sampling.samples={s}",
            f"sampling.min_samples={s}", "sampling.decay_every=0", *extra]


# ----------------------------------------------------------------------------- tuning (train split only)
def tune(args, train: qd.FeatureSet, n_classes: int, grid: list[list[str]], variant: str, log,
         kmeans: bool = False) -> list[dict]:
    """Cluster-probe mIoU on held-out *train* images for each override set of ``grid`` (``--seeds`` seeds).

    A grid entry ``shift_q=a,b,c`` stands for the label-free shifts at those quantiles of the fit part
    (``quantile_shifts``). With ``kmeans``, the first rows are k-means on the input features of the same split."""
    fit, held = qd.split_holdout(train, 0.25, args.knn)
    out = []
    for seed in range(args.seeds if kmeans else 0):
        scores = kmeans_baseline(fit.feats, held, n_classes, seed, "train")
        out.append({"overrides": ["kmeans_features"], "variant": "kmeans", "seed": seed, "heldout": scores})
        log(f"  tune k-means on the input features, seed {seed}: held-out mIoU {100 * scores['unsupervised']['miou']:.1f}")
    for extra in grid:
        extra = list(extra)
        base = base_overrides(args, n_classes, args.base) + VARIANTS[variant]
        for item in [x for x in extra if x.startswith("shift_q=")]:
            extra.remove(item)
            extra += quantile_shifts(load_config(None, base + extra), fit, parse_quantiles(item[8:]), args.batch)
        cfg = load_config(None, base + extra)
        for seed in range(args.seeds):
            seg, terms = train_variant(cfg, fit, args.steps, args.batch, seed)
            finish(args, seg, fit, cfg, seed)
            scores = evaluate(seg, held, n_classes, fit)
            out.append({"overrides": list(extra), "variant": variant, "seed": seed, "heldout": scores,
                        "final_terms": terms, "depth_power": args.depth_power})
            log(f"  tune {variant} {' '.join(extra)} seed {seed} (depth^{args.depth_power:g}): held-out mIoU "
                f"{100 * scores['unsupervised']['miou']:.1f} acc {100 * scores['unsupervised']['accuracy']:.1f} "
                f"linear {100 * scores['linear']['miou']:.1f} codes-k-means {100 * scores['codes_kmeans']['miou']:.1f}")
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
    if args.depth_power != 1.0 and train.depth is not None:  # experiment: spread sky-dominated min-max depth
        train.depth = train.depth.clamp(min=0) ** args.depth_power
    # the linear probe trains against labels at twice the feature grid (nearest): 4-8x cheaper, same signal
    stride = max(1, train.labels.shape[-1] // (2 * train.feats.shape[-1]))
    train.labels = train.labels[:, stride // 2::stride, stride // 2::stride].contiguous()
    info = {"train_crops": len(train), "val_images": len(val), "train_res": train_kwargs["res"],
            "val_res": val_kwargs["res"], "raw_dim": int(train.feats.shape[1]),
            "cache_seconds": time.perf_counter() - t0, "n_classes": src_train.n_classes,
            "classes": list(src_train.class_names)}
    if cfg.data.dataset == "synthetic":
        info.update(depth_max=args.depth_max, depth_per_crop=bool(args.depth_per_crop))
    log(f"  cached {len(train)} train crops + {len(val)} val images in {info['cache_seconds']:.0f} s")
    return train, val, info, src_train.n_classes


def _projected(args, train, val, info):
    raw_train, raw_val = train.feats, val.feats
    if args.pca_dim and args.pca_dim < raw_train.shape[1]:
        basis, kept = qd.fit_projection(raw_train, args.pca_dim, torch.Generator().manual_seed(0))
        info.update(pca_dim=args.pca_dim, pca_energy_kept=kept)
        ptrain = qd.FeatureSet(qd.project(raw_train, basis), train.labels, train.depth, train.nn, train.ids)
        pval = qd.FeatureSet(qd.project(raw_val, basis), val.labels, val.depth, None, val.ids)
        return ptrain, pval
    info.update(pca_dim=0, pca_energy_kept=1.0)
    return train, val


def finish(args, seg, data: qd.FeatureSet, cfg, seed: int) -> None:
    """The probes after training (``--finish``)."""
    if args.finish == "fit":
        fit_probes(seg, data, seed)
    else:
        finish_probes(seg, data, args.probe_steps, 64, cfg.train.probe_lr, seed)


def parse_quantiles(text: str) -> list[float]:
    """``--shift-quantiles`` -> [q_self, q_knn, q_neg] ([] when empty); one clear error otherwise."""
    if not text:
        return []
    try:
        qs = [float(q) for q in text.split(",")]
    except ValueError:
        qs = []
    if len(qs) != 3 or not all(0.0 <= q <= 1.0 for q in qs):
        raise ValueError(f"--shift-quantiles: expected three quantiles in [0,1] (self,knn,neg), got {text!r}")
    return qs


def shift_overrides(args, cfg, train: qd.FeatureSet, log) -> list[str]:
    """``--shift-quantiles``: the label-free shifts of this train split (``quantile_shifts``), or none."""
    qs = parse_quantiles(args.shift_quantiles)
    if not qs:
        return []
    extra = quantile_shifts(cfg, train, qs, args.batch)
    log(f"  label-free shifts at quantiles {qs}: {' '.join(extra)}")
    return extra


def run_dataset(args, name, data_overrides, train_kwargs, val_kwargs, variants, base, steps, log) -> dict:
    log(f"[{name}] caching features")
    train, val, info, n_classes = _prepare(args, data_overrides, train_kwargs, val_kwargs, log)
    result = {"setup": info, "kmeans_raw": {}, "variants": {}}
    for fit_on in ("train", "val"):
        runs = [kmeans_baseline(train.feats, val, n_classes, seed, fit_on) for seed in range(args.seeds)]
        result["kmeans_raw"][f"fit_{fit_on}"] = summarise(runs)
        log(f"  k-means raw (fit on {fit_on}): {fmt(result['kmeans_raw'][f'fit_{fit_on}'])}")
    ptrain, pval = _projected(args, train, val, info)
    del train
    base_cfg = load_config(None, base_overrides(args, n_classes, base))
    result["setup"]["correlations"] = correlation_stats(base_cfg, ptrain, args.batch, 0)
    base = list(base) + shift_overrides(args, base_cfg, ptrain, log)
    result["setup"]["base_overrides"] = base_overrides(args, n_classes, base)
    for vname in variants:
        cfg = load_config(None, base_overrides(args, n_classes, base) + VARIANTS[vname])
        runs = []
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            seg, terms = train_variant(cfg, ptrain, steps, args.batch, seed)
            finish(args, seg, ptrain, cfg, seed)
            scores = evaluate(seg, pval, n_classes, ptrain)
            scores.update(seconds=time.perf_counter() - t0, final_terms=terms)
            runs.append(scores)
        result["variants"][vname] = summarise(runs)
        result["variants"][vname]["overrides"] = VARIANTS[vname]
        log(f"  {vname}: {fmt(result['variants'][vname])} ({np.mean([r['seconds'] for r in runs]):.0f} s/run)")
    result["steps"] = steps
    return result


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


def _run_tuning(args, syn, log, t_start) -> dict:
    import json

    grid = json.loads(args.tune_grid)
    name = "camvid" if args.tune_camvid else "synthetic"
    overrides, tk, vk = _datasets(args, syn)[name]
    if args.tune_camvid and args.camvid_base is not None:
        args.base = args.camvid_base
    train, val, info, n_classes = _prepare(args, overrides, tk, vk, log)
    ptrain, _ = _projected(args, train, val, info)
    info["correlations"] = correlation_stats(load_config(None, base_overrides(args, n_classes, args.base)), ptrain,
                                             args.batch, 0)
    log(f"  correlations: {info['correlations']}")
    results = []
    for k, (variant, extra) in enumerate(grid):
        results += tune(args, ptrain, n_classes, [extra], variant, log, kmeans=k == 0)
    return {"tuning": {name: {"setup": info, "results": results}}, "seconds_total": time.perf_counter() - t_start}


def run(args) -> dict:
    if args.quick:
        _quick(args)
    torch.set_num_threads(max(1, args.threads))
    t_start = time.perf_counter()
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    parse_quantiles(args.shift_quantiles)  # fail before any work
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"--variants: unknown {unknown}; valid: {', '.join(VARIANTS)}")
    result = {"args": {k: v for k, v in vars(args).items() if k != "func"}, "backbone": "effnet_lite0 (ImageNet-"
              "supervised EfficientNet-Lite0: a stand-in for DINO)", "datasets": {}}
    syn = [f"data.num_train={args.num_train}", f"data.num_val={args.num_val}"]
    if args.tune_grid:
        return _run_tuning(args, syn, log, t_start)
    if not args.skip_synthetic:
        result["datasets"]["synthetic"] = run_dataset(args, "synthetic", *_datasets(args, syn)["synthetic"],
                                                      variants, args.base, args.steps, log)
    if not args.skip_camvid:
        cbase = args.base if args.camvid_base is None else args.camvid_base
        result["datasets"]["camvid"] = run_dataset(args, "camvid", *_datasets(args, syn)["camvid"], ["stego"], cbase,
                                                   args.camvid_steps or args.steps, log)
    result["headline"] = headline(result)
    result["seconds_total"] = time.perf_counter() - t_start
    log(f"total {result['seconds_total']:.0f} s; headline {result['headline']}")
    result["command"] = "python " + " ".join(shlex.quote(x) for x in sys.argv)
    if args.results_md:
        from bench import machine

        write_markdown({**result, "machine": machine()}, args.results_md)
    return result
