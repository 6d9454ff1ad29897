"""Why do the trained codes lose what the backbone knows? Controls on the quality benchmark's cached features.

    python launch/benchmark.py quality_diag --dataset camvid --controls baseline,supervised,raw704 --seeds 3 \\
        --cache-dir /tmp/qcache --threads 1

Every control trains the quality benchmark's head (``bench.quality_train``) with one factor changed and reports,
on the val split: the cluster probe (unsupervised mIoU), the in-training linear probe (after the benchmark's
probe finishing), a *fresh* linear probe trained to convergence on the final train codes (``linear_fresh``: what
the codes keep, independent of the probe's own training: L-BFGS logistic regression), k-means on the codes, and the codes' shape
(``code_stats``: effective rank, norm). References without a head: fresh linear probes and k-means on the raw
704-d features and on the PCA input. Defaults are the quality benchmark's (``--steps``, ``--base`` ...).
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from bench import quality
from bench import quality_data as qd
from bench import quality_train as qt
from depthg.config import load_config

# The procedure of the earlier docs/RESULTS.md run ("old"): all three STEGO terms at fixed shifts tuned on held-out
# train images (about the 25-35% quantile of the self / kNN correlations), probes finished by 150 Adam steps with
# dead-centroid re-seeding. The controls below change one factor of it; "new_*" controls start from the quality
# benchmark's current defaults instead (--base / --camvid-base, --shift-quantiles, --finish).
OLD_BASE = {"synthetic": ["loss.self_shift=0.42", "loss.knn_shift=0.38", "loss.neg_shift=0.37", "train.lr=0.002",
                          "loss.depth.shift=0.1"],
            "camvid": ["loss.self_shift=0.25", "loss.knn_shift=0.23", "loss.neg_shift=0.33", "train.lr=0.002"]}

# name -> (extra config overrides, options); options: steps_mult, objective, feats ("pca" | "raw" | "centred"),
# probe_steps, probe_lr, reseed, finish, shift_q. Overrides come after the base and the variant's.
CONTROLS = {
    "baseline": ([], {}),
    "untrained": ([], {"steps_mult": 0}),  # the random head: what a 1x1 MLP keeps before any training
    "supervised": ([], {"objective": "supervised"}),  # head trained by CE through the linear probe: the ceiling
    "raw704": ([], {"feats": "raw"}),
    "code_dim_16": (["model.code_dim=16"], {}),
    "code_dim_256": (["model.code_dim=256"], {}),
    "self_only": (["loss.knn_weight=0", "loss.neg_weight=0"], {}),
    "knn_only": (["loss.self_weight=0", "loss.neg_weight=0"], {}),
    "neg_only": (["loss.self_weight=0", "loss.knn_weight=0"], {}),
    "no_neg": (["loss.neg_weight=0"], {}),
    "lr_5e-4": (["train.lr=0.0005"], {}),
    "lr_1e-2": (["train.lr=0.01"], {}),
    "budget_3x": ([], {"steps_mult": 3}),
    "budget_10x": ([], {"steps_mult": 10}),
    "probe_lr_5e-2": (["train.probe_lr=0.05"], {"probe_lr": 0.05}),
    "probe_steps_0": ([], {"probe_steps": 0}),
    "probe_steps_2000": ([], {"probe_steps": 2000}),
    "no_reseed": ([], {"reseed": False}),
    "finish_adam": ([], {"finish": "adam"}),
    "finish_fit": ([], {"finish": "fit"}),
    "shifts_coco": (["loss.self_shift=0.07", "loss.knn_shift=0.025", "loss.neg_shift=0.761"], {}),
    "shifts_low": (["loss.self_shift=0.0", "loss.knn_shift=0.0", "loss.neg_shift=0.0"], {}),
    "shifts_high": (["loss.self_shift=0.55", "loss.knn_shift=0.5", "loss.neg_shift=0.45"], {}),
    "no_pointwise": (["loss.pointwise=false"], {}),
    "no_zero_clamp": (["loss.zero_clamp=false"], {}),
    "no_dropout": (["model.dropout=0.0"], {}),
    "samples_11": (["sampling.samples=11", "sampling.min_samples=11"], {}),
    # features centred by their train mean (the head is affine, so only the correlation target F changes):
    # CamVid PCA-128 pointwise-centred correlations then have medians self 0.06 / kNN 0.03 / negatives -0.03
    "q50_q50_q90": ([], {"shift_q": (0.5, 0.5, 0.9)}),  # label-free shifts (quantile_shifts)
    "q75_q75_q90": ([], {"shift_q": (0.75, 0.75, 0.9)}),
    "q90_q90_q95": ([], {"shift_q": (0.9, 0.9, 0.95)}),
    "q75_q75_q90_fit": ([], {"shift_q": (0.75, 0.75, 0.9), "finish": "fit"}),
    "q75_q75_q95_fit": ([], {"shift_q": (0.75, 0.75, 0.95), "finish": "fit"}),
    "q90_q90_q95_fit": ([], {"shift_q": (0.9, 0.9, 0.95), "finish": "fit"}),
    "q50_q50_q90_fit": ([], {"shift_q": (0.5, 0.5, 0.9), "finish": "fit"}),
    "neg_only_fit": (["loss.self_weight=0", "loss.knn_weight=0"], {"finish": "fit"}),
    # from the benchmark's current procedure (negative term only, shift at its 90% quantile, k-means cluster head)
    "new_baseline": ([], {"base": "new"}),
    "new_untrained": ([], {"base": "new", "steps_mult": 0}),
    "new_budget_3x": ([], {"base": "new", "steps_mult": 3}),
    "new_budget_10x": ([], {"base": "new", "steps_mult": 10}),
    "new_code_dim_16": (["model.code_dim=16"], {"base": "new"}),
    "new_code_dim_256": (["model.code_dim=256"], {"base": "new"}),
    "new_lr_5e-4": (["train.lr=0.0005"], {"base": "new"}),
    "new_raw704": ([], {"base": "new", "feats": "raw"}),
    "new_with_self_knn_q75": (["loss.self_weight=0.58", "loss.knn_weight=0.36"], {"base": "new", "shift_q": (0.75, 0.75, 0.9)}),
    "new_finish_adam": ([], {"base": "new", "finish": "adam"}),
    "centred": ([], {"feats": "centred"}),
    "centred_medians": (["loss.self_shift=0.06", "loss.knn_shift=0.03", "loss.neg_shift=0.17"], {"feats": "centred"}),
    "centred_coco": (["loss.self_shift=0.07", "loss.knn_shift=0.025", "loss.neg_shift=0.761"], {"feats": "centred"}),
}


def add_arguments(parser) -> None:
    quality.add_arguments(parser)
    a = parser.add_argument
    a("--dataset", default="camvid", choices=("camvid", "synthetic"))
    a("--variant", default="stego", help="the quality benchmark variant the controls start from")
    a("--controls", default="baseline,untrained,supervised", help=f"comma list of {', '.join(CONTROLS)}")
    a("--fresh-cells", type=int, default=256, help="grid cells per train map for the fresh (L-BFGS) linear probe")
    a("--references", type=int, default=1, help="also fresh probes / k-means on raw and PCA features (1) or not (0)")


def _fresh(args, maps, train_labels, val_maps, val_labels, n_classes, seed, normalise=False) -> dict:
    probe = qt.fit_linear_probe(maps, train_labels, n_classes, seed, args.fresh_cells, normalise=normalise)
    return qt.evaluate_linear(probe, val_maps, val_labels, n_classes, normalise)


def references(args, raw, praw, val, pval, n_classes, log) -> dict:
    """Heads-free references: fresh linear probes on raw / PCA features (plain and L2-normalised input)."""
    out = {}
    for name, tr, va in (("raw704", raw, val), (f"pca{args.pca_dim}", praw, pval)):
        for normalise in (False, True):
            key = f"{name}{'_l2' if normalise else ''}"
            runs = [{"linear_fresh": _fresh(args, tr.feats, tr.labels, va.feats, va.labels, n_classes, s, normalise)}
                    for s in range(args.seeds)]
            out[key] = qt.summarise(runs)
            log(f"  reference fresh linear probe on {key}: mIoU {100 * out[key]['linear_fresh_miou_mean']:.1f} "
                f"+- {100 * out[key]['linear_fresh_miou_std']:.1f}")
    return out


def centre(train: qd.FeatureSet, val: qd.FeatureSet):
    """Both splits minus the train split's mean feature vector (float16 maps, as cached)."""
    mean = train.feats.float().mean(dim=(0, 2, 3), keepdim=True)
    return tuple(dataclasses.replace(s, feats=(s.feats.float() - mean).to(torch.float16)) for s in (train, val))


def run_control(args, name, cfg, data, val, n_classes, steps, seed, opts) -> dict:
    t0 = time.perf_counter()
    seg, terms = qt.train_variant(cfg, data, int(steps * opts.get("steps_mult", 1)), args.batch, seed,
                                  opts.get("objective", "stego"))
    if opts["finish"] == "fit":
        qt.fit_probes(seg, data, seed)
    else:
        qt.finish_probes(seg, data, opts.get("probe_steps", args.probe_steps), 64,
                         opts.get("probe_lr", cfg.train.probe_lr), seed, opts.get("reseed", True))
    scores = qt.evaluate(seg, val, n_classes, data)
    codes = qt.all_codes(seg, data)
    with torch.no_grad():
        val_codes = torch.cat([seg.head(val.feats[i:i + 16].float()) for i in range(0, len(val), 16)])
    scores["linear_fresh"] = _fresh(args, codes, data.labels, val_codes, val.labels, n_classes, seed)
    scores.update(code_stats=qt.code_stats(codes), final_terms=terms, seconds=time.perf_counter() - t0)
    return scores


def run(args) -> dict:
    if args.quick:
        quality._quick(args)
        args.fresh_cells = 8
    torch.set_num_threads(max(1, args.threads))
    t_start = time.perf_counter()
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    names = [c.strip() for c in args.controls.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONTROLS]
    if unknown or args.variant not in quality.VARIANTS:
        raise ValueError(f"--controls: unknown {unknown or args.variant}; valid: {', '.join(CONTROLS)}")
    syn = [f"data.num_train={args.num_train}", f"data.num_val={args.num_val}"]
    overrides, tk, vk = quality._datasets(args, syn)[args.dataset]
    steps = args.camvid_steps or args.steps if args.dataset == "camvid" else args.steps
    raw, val, info, n_classes = quality._prepare(args, overrides, tk, vk, log)
    praw, pval = quality._projected(args, raw, val, info)
    centred = centre(praw, pval)
    result = {"args": {k: v for k, v in vars(args).items() if k != "func"}, "setup": info, "controls": {}}
    if args.references:
        result["references"] = references(args, raw, praw, val, pval, n_classes, log)
        for key, tr, va in (("kmeans_raw_fit_train", raw, val), (f"kmeans_pca{args.pca_dim}_fit_train", praw, pval)):
            runs = [qt.kmeans_baseline(tr.feats, va, n_classes, s, "train") for s in range(args.seeds)]
            result["references"][key] = qt.summarise(runs)
            log(f"  reference {key}: mIoU {100 * result['references'][key]['unsupervised_miou_mean']:.1f}")
    for name in names:
        extra, opts = CONTROLS[name]
        new = opts.get("base") == "new"
        base = (args.camvid_base if args.dataset == "camvid" else args.base) if new else OLD_BASE[args.dataset]
        head = quality.base_overrides(args, n_classes, base) + quality.VARIANTS[args.variant]
        data, dval = {"raw": (raw, val), "centred": centred}.get(opts.get("feats"), (praw, pval))
        quantiles = opts.get("shift_q", quality.parse_quantiles(args.shift_quantiles) if new else None)
        if quantiles:
            extra = extra + qt.quantile_shifts(load_config(None, head + extra), data, quantiles, args.batch)
            log(f"  {name}: {' '.join(extra)}")
        cfg = load_config(None, head + extra)
        opts = {"finish": args.finish if new else "adam", **opts}
        runs = [run_control(args, name, cfg, data, dval, n_classes, steps, seed, opts) for seed in range(args.seeds)]
        s = qt.summarise(runs)
        for key in ("eff_rank", "norm_mean", "top3_share", "mean_cos"):
            s[f"{key}_mean"] = float(np.mean([r["code_stats"][key] for r in runs]))
        result["controls"][name] = s
        log(f"  {name}: " + row(s) + f" ({np.mean([r['seconds'] for r in runs]):.0f} s/run)")
    result["seconds_total"] = time.perf_counter() - t_start
    print(table(result))
    return result


def _pm(s, key) -> str:
    return f"{100 * s[f'{key}_mean']:.1f} +- {100 * s[f'{key}_std']:.1f}" if f"{key}_mean" in s else "-"


def row(s: dict) -> str:
    return (f"unsup {_pm(s, 'unsupervised_miou')} | linear {_pm(s, 'linear_miou')} | fresh linear "
            f"{_pm(s, 'linear_fresh_miou')} | codes k-means {_pm(s, 'codes_kmeans_miou')} | eff. rank "
            f"{s.get('eff_rank_mean', float('nan')):.1f} | mean cos {s.get('mean_cos_mean', float('nan')):.2f} | norm "
            f"{s.get('norm_mean_mean', float('nan')):.2f}")


def table(result: dict) -> str:
    lines = ["| control | unsup. mIoU | linear mIoU | fresh linear mIoU | k-means on codes | eff. rank | mean cos | "
             "code norm |", "|---|---|---|---|---|---|---|---|"]
    for name, s in result.get("references", {}).items():
        key = "linear_fresh_miou" if "linear_fresh_miou_mean" in s else "unsupervised_miou"
        cells = ["-", "-", _pm(s, key), "-"] if key == "linear_fresh_miou" else [_pm(s, key), "-", "-", "-"]
        lines.append(f"| ref: {name} | " + " | ".join(cells) + " | - | - | - |")
    for name, s in result["controls"].items():
        lines.append(f"| {name} | {_pm(s, 'unsupervised_miou')} | {_pm(s, 'linear_miou')} | "
                     f"{_pm(s, 'linear_fresh_miou')} | {_pm(s, 'codes_kmeans_miou')} | {s['eff_rank_mean']:.1f} | "
                     f"{s.get('mean_cos_mean', float('nan')):.2f} | {s['norm_mean_mean']:.2f} |")
    return "\n".join(lines)
