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
from depthg import losses, metrics
from depthg.config import load_config
from depthg.data import build_source
from depthg.evaluation import fit_kmeans, kmeans_assign
from depthg.models import build_backbone, build_segmenter
from depthg.step import losses_from_features

VARIANTS = {  # name -> config overrides (on top of the shared base)
    "stego": ["loss.depth.mode=none", "sampling.mode=random"],
    "depth_only": ["loss.depth.mode=paper", "sampling.mode=random"],
    "fps_only": ["loss.depth.mode=none", "sampling.mode=fps"],
    "depthg": ["loss.depth.mode=paper", "sampling.mode=fps"],
    "depthg_lhp": ["loss.depth.mode=paper", "sampling.mode=fps", "loss.lhp.enabled=true"],
    # distance-mode targets 1 - d/d_max lie mostly in [0.5, 1]: b_depth 0.5 (tuned on held-out train; 0.1 -> 22 mIoU)
    "depthg_distance": ["loss.depth.mode=distance", "sampling.mode=fps", "loss.depth.shift=0.5"],
    "depthg_reference": ["loss.depth.mode=reference", "sampling.mode=fps"],
}

# Tuned on a held-out quarter of the *train* images (docs/RESULTS.md): self/kNN shifts at the 25% quantile
# of their pointwise-centred feature correlations, negative shift near the 75% quantile, head lr 2e-3.
SYN_BASE = ["loss.self_shift=0.42", "loss.knn_shift=0.38", "loss.neg_shift=0.37", "train.lr=0.002",
            "loss.depth.shift=0.1"]
CAMVID_BASE = ["loss.self_shift=0.25", "loss.knn_shift=0.23", "loss.neg_shift=0.33", "train.lr=0.002"]


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
    a("--variants", default=",".join(VARIANTS))
    a("--base", nargs="*", default=SYN_BASE, help="config overrides for every synthetic run (tuned shifts)")
    a("--camvid-base", nargs="*", default=CAMVID_BASE, help="config overrides for the CamVid runs")
    a("--skip-camvid", action="store_true")
    a("--skip-synthetic", action="store_true")
    a("--results-md", default="docs/RESULTS.md", help="Markdown report ('' = none)")
    a("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared, oversubscribed CPU)")
    a("--cache-dir", default="", help="reuse cached features from this folder (development only)")
    a("--tune-grid", default="", help="JSON list of [variant, [overrides...]]: only tune on a held-out quarter "
      "of the train images of the first dataset (synthetic, or camvid with --tune-camvid)")
    a("--tune-camvid", action="store_true")
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


# ----------------------------------------------------------------------------- training and evaluation
def train_variant(cfg, data: qd.FeatureSet, steps: int, batch: int, seed: int):
    """A fresh segmenter trained for ``steps`` batches on cached features; returns (segmenter, last terms)."""
    n, k = len(data), data.nn.shape[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        seg = build_segmenter(cfg.model, data.feats.shape[1], cfg.loss.lhp.enabled)
    opt = torch.optim.Adam([{"params": seg.head_parameters(), "lr": cfg.train.lr},
                            {"params": seg.probe_parameters(), "lr": cfg.train.probe_lr}])
    gen = torch.Generator().manual_seed(10_000 + seed)
    order, pos_in_order, terms = torch.randperm(n, generator=gen), 0, {}
    seg.train()
    for step in range(steps):
        if pos_in_order + batch > n:
            order, pos_in_order = torch.randperm(n, generator=gen), 0
        idx = order[pos_in_order:pos_in_order + batch]
        pos_in_order += batch
        pos = data.nn[idx, torch.randint(k, (len(idx),), generator=gen)]
        if data.depth is not None:
            depth, pos_depth = data.depth[idx], data.depth[pos]
        else:
            depth = pos_depth = torch.zeros(len(idx), 1, *data.feats.shape[-2:])
        out = losses_from_features(seg, data.feats[idx].float(), data.feats[pos].float(), depth, pos_depth,
                                   data.labels[idx], cfg, step, gen, training=True)
        opt.zero_grad(set_to_none=True)
        out["total"].backward()
        opt.step()
        terms = {key: float(v.detach()) if torch.is_tensor(v) else float(v) for key, v in out.items() if key in ("self", "knn", "neg", "depth", "head")}
    seg.eval()
    return seg, terms


@torch.no_grad()
def _reseed_dead_centroids(probe, codes: torch.Tensor, gen: torch.Generator) -> int:
    """Move every centroid that wins no code vector of the batch onto a random code vector (k-means practice).

    The learned k-means only moves winning centroids, so a badly initialised one stays dead for good and the
    probe ends with fewer clusters than classes: the main source of seed variance with short budgets.
    """
    flat = codes.permute(0, 2, 3, 1).reshape(-1, codes.shape[1])
    wins = torch.bincount(probe.cosine(codes).argmax(dim=1).flatten(), minlength=probe.n_clusters)
    dead = torch.nonzero(wins == 0).flatten()
    if len(dead):
        probe.centroids[dead] = flat[torch.randint(flat.shape[0], (len(dead),), generator=gen)]
    return len(dead)


def finish_probes(seg, data: qd.FeatureSet, steps: int, batch: int, lr: float, seed: int) -> None:
    """Extra probe-only Adam steps on the final (frozen, dropout-free) codes of the train crops.

    The probes are trained on detached codes anyway; with short head budgets this lets both probes converge
    on the final codes so that variants are compared on their codes, not on probe convergence. During the
    first half, dead cluster centroids are re-seeded (``_reseed_dead_centroids``).
    """
    if steps <= 0:
        return
    with torch.no_grad():
        codes = torch.cat([seg.head(data.feats[i:i + 64].float()) for i in range(0, len(data), 64)])
    opt = torch.optim.Adam(seg.probe_parameters(), lr=lr)
    gen = torch.Generator().manual_seed(20_000 + seed)
    for step in range(steps):
        idx = torch.randint(len(data), (min(batch, len(data)),), generator=gen)
        c = codes[idx]
        if step < steps // 2:
            _reseed_dead_centroids(seg.cluster_probe, c, gen)
        loss = seg.cluster_probe.loss(c) + seg.linear_probe.loss(seg.linear_probe(c), data.labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


@torch.no_grad()
def evaluate(seg, val: qd.FeatureSet, n_classes: int, train: qd.FeatureSet | None = None) -> dict:
    """Cluster probe (Hungarian over the split) and linear probe (identity) on upsampled val codes.

    With ``train``: also ``codes_kmeans``, cosine k-means (n_classes) fitted on train codes, a check that the
    learned cluster probe has converged.
    """
    size = tuple(val.labels.shape[-2:])
    n_clusters = seg.cluster_probe.n_clusters
    confs = {"c": np.zeros((n_clusters, n_classes), np.int64), "l": np.zeros((n_classes, n_classes), np.int64),
             "k": np.zeros((n_classes, n_classes), np.int64)}
    codes = torch.cat([seg.head(val.feats[i:i + 16].float()) for i in range(0, len(val), 16)])
    cent = None
    if train is not None:
        tcodes = torch.cat([seg.head(train.feats[i:i + 64].float()) for i in range(0, len(train), 64)])
        vecs = qd.sample_vectors(tcodes, max(1, 20_000 // len(train)), torch.Generator().manual_seed(0))
        cent = fit_kmeans(vecs, n_classes, iters=30, seed=0)
    for start, up in qd.upsample_chunks(codes, size):
        lab = val.labels[start:start + up.shape[0]]
        confs["c"] += metrics.confusion(seg.cluster_probe.predict(up), lab, n_clusters, n_classes)
        confs["l"] += metrics.confusion(seg.linear_probe(up).argmax(dim=1), lab, n_classes, n_classes)
        if cent is not None:
            confs["k"] += metrics.confusion(kmeans_assign(up, cent), lab, n_classes, n_classes)
    out = {"unsupervised": _brief(metrics.hungarian_scores(confs["c"])),
           "linear": _brief(metrics.identity_scores(confs["l"]))}
    if cent is not None:
        out["codes_kmeans"] = _brief(metrics.hungarian_scores(confs["k"]))
    return out


def _brief(s: dict) -> dict:
    return {"accuracy": s["accuracy"], "miou": s["miou"], "iou": s["iou"]}


@torch.no_grad()
def kmeans_baseline(train_raw: torch.Tensor, val: qd.FeatureSet, n_classes: int, seed: int, fit_on: str) -> dict:
    """Cosine k-means on raw backbone vectors (of ``train_raw`` or the val maps), Hungarian on val.

    Centroids are fitted on about 20k vectors sampled from the train crops (``fit_on="train"``) or from the
    val images themselves (``"val"``, transductive); val pixels take the argmax of the bilinearly upsampled
    cosine scores.
    """
    gen = torch.Generator().manual_seed(seed)
    source = train_raw if fit_on == "train" else val.feats
    per = max(1, 20_000 // source.shape[0])
    cent = fit_kmeans(qd.sample_vectors(source, per, gen), n_classes, iters=30, seed=seed)
    conf = np.zeros((n_classes, n_classes), np.int64)
    # cosine scores on the feature grid, bilinearly upsampled (704 -> n_classes channels before upsampling)
    scores = torch.cat([torch.einsum("bchw,kc->bkhw", torch.nn.functional.normalize(val.feats[i:i + 8].float(), dim=1),
                                     cent) for i in range(0, len(val), 8)])
    for start, up in qd.upsample_chunks(scores, tuple(val.labels.shape[-2:]), chunk=8):
        conf += metrics.confusion(up.argmax(dim=1), val.labels[start:start + up.shape[0]], n_classes, n_classes)
    return {"unsupervised": _brief(metrics.hungarian_scores(conf))}


@torch.no_grad()
def correlation_stats(cfg, data: qd.FeatureSet, batch: int, seed: int, rounds: int = 4) -> dict:
    """Mean / quantiles of the (pointwise-centred) feature correlations of self, kNN and negative pairs.

    The label-free statistic used to set the loss shifts for new data (train split only).
    """
    gen = torch.Generator().manual_seed(seed)
    vals = {"self": [], "knn": [], "neg": []}
    s = cfg.sampling.samples
    for _ in range(rounds):
        idx = torch.randperm(len(data), generator=gen)[:batch]
        pos = data.nn[idx, torch.randint(data.nn.shape[1], (len(idx),), generator=gen)]
        neg = idx[losses.permutation_without_fixed_points(len(idx), gen)]
        coords = [torch.rand(len(idx), s, s, 2, generator=gen) * 2 - 1 for _ in range(2)]
        f1 = losses.sample_features(data.feats[idx].float(), coords[0])
        for name, other in (("self", idx), ("knn", pos), ("neg", neg)):
            f2 = f1 if name == "self" else losses.sample_features(data.feats[other].float(), coords[1])
            corr = losses.correlation(f1, f2)
            if cfg.loss.pointwise:
                corr = corr - corr.mean(dim=(3, 4), keepdim=True) + corr.mean()
            vals[name].append(corr.flatten())
    out = {}
    for name, v in vals.items():
        v = torch.cat(v)
        q = torch.quantile(v[torch.randperm(v.numel(), generator=gen)[:100_000]], torch.tensor([0.25, 0.5, 0.75]))
        out[name] = {"mean": float(v.mean()), "q25": float(q[0]), "median": float(q[1]), "q75": float(q[2])}
    return out


# ----------------------------------------------------------------------------- tuning (train split only)
def tune(args, train: qd.FeatureSet, n_classes: int, grid: list[list[str]], variant: str, log) -> list[dict]:
    """Cluster-probe mIoU on held-out *train* images for each override set of ``grid`` (one seed)."""
    fit, held = qd.split_holdout(train, 0.25, args.knn)
    out = []
    for extra in grid:
        cfg = load_config(None, base_overrides(args, n_classes, args.base) + VARIANTS[variant] + list(extra))
        for seed in range(args.seeds):
            seg, terms = train_variant(cfg, fit, args.steps, args.batch, seed)
            finish_probes(seg, fit, args.probe_steps, 64, cfg.train.probe_lr, seed)
            scores = evaluate(seg, held, n_classes, fit)
            out.append({"overrides": list(extra), "variant": variant, "seed": seed, "heldout": scores,
                        "final_terms": terms, "depth_power": args.depth_power})
            log(f"  tune {variant} {' '.join(extra)} seed {seed} (depth^{args.depth_power:g}): held-out mIoU "
                f"{100 * scores['unsupervised']['miou']:.1f} acc {100 * scores['unsupervised']['accuracy']:.1f} "
                f"linear {100 * scores['linear']['miou']:.1f} codes-k-means {100 * scores['codes_kmeans']['miou']:.1f}")
    return out


# ----------------------------------------------------------------------------- one dataset
def _prepare(args, data_overrides, n_classes_hint, train_kwargs, val_kwargs, log):
    cfg = load_config(None, data_overrides)
    backbone = build_backbone("effnet_lite0")
    src_train, src_val = build_source(cfg.data, "train"), build_source(cfg.data, "val")
    t0 = time.perf_counter()
    key = "_".join(x.split("=")[-1].replace("/", "") for x in data_overrides) + f"_{train_kwargs}_{val_kwargs}"
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


def run_dataset(args, name, data_overrides, train_kwargs, val_kwargs, variants, base, steps, log) -> dict:
    log(f"[{name}] caching features")
    train, val, info, n_classes = _prepare(args, data_overrides, None, train_kwargs, val_kwargs, log)
    result = {"setup": info, "kmeans_raw": {}, "variants": {}}
    for fit_on in ("train", "val"):
        runs = [kmeans_baseline(train.feats, val, n_classes, seed, fit_on) for seed in range(args.seeds)]
        result["kmeans_raw"][f"fit_{fit_on}"] = summarise(runs)
        log(f"  k-means raw (fit on {fit_on}): {fmt(result['kmeans_raw'][f'fit_{fit_on}'])}")
    ptrain, pval = _projected(args, train, val, info)
    del train
    base_cfg = load_config(None, base_overrides(args, n_classes, base))
    result["setup"]["correlations"] = correlation_stats(base_cfg, ptrain, args.batch, 0)
    result["setup"]["base_overrides"] = base_overrides(args, n_classes, base)
    for vname in variants:
        cfg = load_config(None, base_overrides(args, n_classes, base) + VARIANTS[vname])
        runs = []
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            seg, terms = train_variant(cfg, ptrain, steps, args.batch, seed)
            finish_probes(seg, ptrain, args.probe_steps, 64, cfg.train.probe_lr, seed)
            scores = evaluate(seg, pval, n_classes, ptrain)
            scores.update(seconds=time.perf_counter() - t0, final_terms=terms)
            runs.append(scores)
        result["variants"][vname] = summarise(runs)
        result["variants"][vname]["overrides"] = VARIANTS[vname]
        log(f"  {vname}: {fmt(result['variants'][vname])} ({np.mean([r['seconds'] for r in runs]):.0f} s/run)")
    result["steps"] = steps
    return result


def summarise(runs: list[dict]) -> dict:
    """mean / std (population std over seeds) of accuracy and mIoU for each probe, plus the raw runs."""
    out = {"runs": runs, "seeds": len(runs)}
    for probe in ("unsupervised", "linear", "codes_kmeans"):
        if probe not in runs[0]:
            continue
        for metric in ("accuracy", "miou"):
            v = np.array([r[probe][metric] for r in runs], dtype=np.float64)
            out[f"{probe}_{metric}_mean"] = float(v.mean())
            out[f"{probe}_{metric}_std"] = float(v.std())
    return out


def fmt(s: dict) -> str:
    parts = []
    for probe in ("unsupervised", "linear"):
        if f"{probe}_miou_mean" in s:
            parts.append(f"{probe} acc {100 * s[f'{probe}_accuracy_mean']:.1f} mIoU {100 * s[f'{probe}_miou_mean']:.1f}"
                         f" (+-{100 * s[f'{probe}_miou_std']:.1f})")
    return ", ".join(parts)


def _datasets(args, syn):
    cam = ["data.dataset=camvid", f"data.root={args.camvid_root}"]
    return {"synthetic": (syn, dict(res=args.crop_res, crop=True, limit=0), dict(res=args.val_res, crop=False, limit=0)),
            "camvid": (cam, dict(res=args.camvid_res, crop=args.camvid_crop, limit=args.camvid_train),
                       dict(res=args.camvid_res, crop=False, limit=args.camvid_val))}


def _run_tuning(args, syn, log, t_start) -> dict:
    import json

    grid = json.loads(args.tune_grid)
    name = "camvid" if args.tune_camvid else "synthetic"
    overrides, tk, vk = _datasets(args, syn)[name]
    if args.tune_camvid and args.camvid_base is not None:
        args.base = args.camvid_base
    train, val, info, n_classes = _prepare(args, overrides, None, tk, vk, log)
    ptrain, _ = _projected(args, train, val, info)
    info["correlations"] = correlation_stats(load_config(None, base_overrides(args, n_classes, args.base)), ptrain,
                                             args.batch, 0)
    log(f"  correlations: {info['correlations']}")
    results = []
    for variant, extra in grid:
        results += tune(args, ptrain, n_classes, [extra], variant, log)
    return {"tuning": {name: {"setup": info, "results": results}}, "seconds_total": time.perf_counter() - t_start}


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
    result["seconds_total"] = time.perf_counter() - t_start
    log(f"total {result['seconds_total']:.0f} s")
    result["command"] = "python " + " ".join(shlex.quote(x) for x in sys.argv)
    if args.results_md:
        from bench import machine

        write_markdown({**result, "machine": machine()}, args.results_md)
    return result
