"""Why do the trained codes lose what the backbone knows? Controls on the quality benchmark's cached features.

    python launch/benchmark.py quality-diag --dataset camvid --controls baseline,supervised,neg_only --seeds 3 \\
        --cache-dir /tmp/qcache --threads 1

Every control trains the quality benchmark's head (``bench.quality_train``: the trainer's step on cached
features) with one factor changed and reports, on the val split: the cluster probe (unsupervised mIoU), the
linear probe, a *fresh* linear probe fitted to convergence on the final train codes (``linear_fresh``: what the
codes keep, independent of the probes' training), k-means on the codes, and the codes' shape (``code_stats``:
effective rank, norm). References without a head: fresh linear probes and k-means on the input features.

Two starting points. ``new_*`` controls start from the benchmark's procedure, i.e. the config's recipe
(``--config`` / ``--camvid-config``, ``train.finish``). The others start from the procedure of the first
docs/RESULTS.md run (``OLD_BASE``): all three STEGO terms at fixed shifts tuned on held-out train images, the
probes finished by ``--probe-steps`` Adam steps with dead-centroid re-seeding (``finish_probes``, a diagnostic
here, not the product's), on a ``--pca-dim`` PCA of the features (docs/QUALITY_DIAGNOSIS.md used 128).
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
from depthg.probes import fit_linear_probe

# The procedure of the earlier docs/RESULTS.md run ("old"): all three STEGO terms at fixed shifts tuned on held-out
# train images (about the 25-35% quantile of the self / kNN correlations), probes finished by 150 Adam steps with
# dead-centroid re-seeding. The controls below change one factor of it; "new_*" controls start from the quality
# benchmark's current defaults instead (--base / --camvid-base, --shift-quantiles, --finish).
_OLD = ["loss.self_weight=0.58", "loss.knn_weight=0.36", "loss.shift_mode=fixed", "train.lr=0.002",
        "train.finish=none", "loss.depth.decay_every=250", "sampling.decay_every=0"]
OLD_BASE = {"synthetic": _OLD + ["loss.self_shift=0.42", "loss.knn_shift=0.38", "loss.neg_shift=0.37",
                                 "loss.depth.shift=0.1"],
            "camvid": _OLD + ["loss.self_shift=0.25", "loss.knn_shift=0.23", "loss.neg_shift=0.33"]}

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


@torch.no_grad()
def reseed_dead_centroids(probe, codes: torch.Tensor, gen: torch.Generator) -> int:
    """Move every centroid that wins no code vector of the batch onto a random code vector (k-means practice).

    The learned k-means only moves winning centroids, so a badly initialised one stays dead for good and the
    probe ends with fewer clusters than classes.
    """
    flat = codes.permute(0, 2, 3, 1).reshape(-1, codes.shape[1])
    wins = torch.bincount(probe.cosine(codes).argmax(dim=1).flatten(), minlength=probe.n_clusters)
    dead = torch.nonzero(wins == 0).flatten()
    if len(dead):
        probe.centroids[dead] = flat[torch.randint(flat.shape[0], (len(dead),), generator=gen)]
    return len(dead)


def finish_probes(seg, data: qd.FeatureSet, steps: int, batch: int, lr: float, seed: int, reseed: bool = True) -> None:
    """Extra probe-only Adam steps on the final (frozen, dropout-free) codes of the train crops.

    With ``reseed``, dead cluster centroids are re-seeded during the first half (``reseed_dead_centroids``).
    """
    if steps <= 0:
        return
    codes = qt.all_codes(seg, data)
    opt = torch.optim.Adam(seg.probe_parameters(), lr=lr)
    gen = torch.Generator().manual_seed(20_000 + seed)
    for step in range(steps):
        idx = torch.randint(len(data), (min(batch, len(data)),), generator=gen)
        c = codes[idx]
        if reseed and step < steps // 2:
            reseed_dead_centroids(seg.cluster_probe, c, gen)
        loss = seg.cluster_probe.loss(c) + seg.linear_probe.loss(seg.linear_probe(c), data.labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def quantile_shifts(quantiles) -> list[str]:
    """Label-free shifts at the given quantiles (q_self, q_knn, q_neg) of each batch's correlations
    (``loss.shift_mode=quantile``; docs/QUALITY_DIAGNOSIS.md's phase 1 took them once from 4 train batches)."""
    return ["loss.shift_mode=quantile"] + [f"loss.{n}_shift={q}" for n, q in zip(("self", "knn", "neg"), quantiles)]


def projected(args, train, val, info):
    """``--pca-dim``: both splits projected on the train split's uncentred PCA basis (the old controls' input)."""
    if not args.pca_dim or args.pca_dim >= train.feats.shape[1]:
        info.update(pca_dim=0)
        return train, val
    basis, kept = qd.fit_projection(train.feats, args.pca_dim, torch.Generator().manual_seed(0))
    info.update(pca_dim=args.pca_dim, pca_energy_kept=kept)
    return (qd.FeatureSet(qd.project(train.feats, basis), train.labels, train.depth, train.nn, train.ids),
            qd.FeatureSet(qd.project(val.feats, basis), val.labels, val.depth, None, val.ids))




def add_arguments(parser) -> None:
    quality.add_arguments(parser)
    a = parser.add_argument
    a("--dataset", default="camvid", choices=("camvid", "synthetic"))
    a("--variant", default="stego", help="the quality benchmark variant the controls start from")
    a("--controls", default="baseline,untrained,supervised", help=f"comma list of {', '.join(CONTROLS)}")
    a("--fresh-cells", type=int, default=256, help="grid cells per train map for the fresh (L-BFGS) linear probe")
    a("--references", type=int, default=1, help="also fresh probes / k-means on raw and PCA features (1) or not (0)")
    a("--pca-dim", type=int, default=0, help="the old controls' input: an uncentred PCA of the features (0 = off)")
    a("--probe-steps", type=int, default=150, help="the old controls' probe finishing: probe-only Adam steps")


def _fresh(args, maps, train_labels, val_maps, val_labels, n_classes, seed, normalise=False) -> dict:
    if normalise:
        maps = torch.nn.functional.normalize(maps.float(), dim=1)
    probe = fit_linear_probe(maps, train_labels, n_classes, seed, args.fresh_cells)
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
        qt.finish(seg, data, dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, finish="fit")), seed)
    elif opts["finish"] == "adam":
        finish_probes(seg, data, opts.get("probe_steps", args.probe_steps), 64,
                      opts.get("probe_lr", cfg.train.probe_lr), seed, opts.get("reseed", True))
    else:
        qt.finish(seg, data, cfg, seed)  # the config's train.finish
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
    path = args.camvid_config if args.dataset == "camvid" else args.config
    praw, pval = projected(args, raw, val, info)
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
        head = quality.VARIANTS[args.variant] + ([] if new else OLD_BASE[args.dataset])
        data, dval = {"raw": (raw, val), "centred": centred}.get(opts.get("feats"), (praw, pval))
        if new:
            data, dval = {"centred": centred}.get(opts.get("feats"), (raw, val))
        if "shift_q" in opts:
            extra = extra + quantile_shifts(opts["shift_q"])
        cfg = load_config(path, quality.recipe(args, path, n_classes, head + extra))
        opts = {"finish": "config" if new else "adam", **opts}
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
