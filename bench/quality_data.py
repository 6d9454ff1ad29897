"""Feature caches (and the Markdown report) for the quality benchmark: every crop through the backbone once.

The backbone is frozen and training uses no augmentation, so the features of every training crop and
every validation image are computed once and kept in memory (float16), together with the crop's depth,
labels and kNN positives (cosine top-k of the global-average-pooled features, self excluded, within the
split). Training then only runs the head (``depthg.step.losses_from_features``) on cached features.

The benchmark trains on the full 704-channel EfficientNet-Lite0 features. ``fit_projection`` / ``project`` (an
uncentred PCA) serve only the diagnosis's older controls (``quality_diag --pca-dim``).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from depthg.data import five_crop, to_tensor_image, transform_record
from depthg.knn import topk_cosine
from depthg.probes import sample_vectors


@dataclass
class FeatureSet:
    """Cached tensors of one split.

    feats  float16 [N,C,h,w] (backbone features, possibly projected);
    depth  float32 [N,1,H,W] or None; labels int64 [N,H,W] (-1 = ignore);
    nn     int64 [N,k] kNN indices (self excluded) or None; ids: source id per row.
    """

    feats: torch.Tensor
    labels: torch.Tensor
    depth: torch.Tensor | None = None
    nn: torch.Tensor | None = None
    ids: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.feats.shape[0]


def _records(source, limit: int, crop: bool, ratio: float, res: int, renormalise_depth: bool):
    ids = source.ids()[:limit] if limit else source.ids()
    for id_ in ids:
        rec = source.load(id_)
        for r in (five_crop(rec, ratio, renormalise_depth) if crop else [rec]):
            yield transform_record(r, res)


@torch.no_grad()
def build_set(source, backbone, res: int, crop: bool, ratio: float = 0.5, limit: int = 0,
              batch: int = 16, knn: int = 0, renormalise_depth: bool = False) -> FeatureSet:
    """Load (and five-crop) ``source``, resize to ``res`` x ``res``, run the backbone once per image.

    ``renormalise_depth``: each crop's depth is min-max normalised again (``five_crop``)."""
    t_load = t_bb = 0.0
    feats, depths, labels, ids, pending = [], [], [], [], []

    def flush():
        nonlocal t_bb
        t0 = time.perf_counter()
        x = torch.stack([to_tensor_image(r.image) for r in pending])
        feats.append(backbone(x).to(torch.float16))
        t_bb += time.perf_counter() - t0
        pending.clear()

    t0 = time.perf_counter()
    for rec in _records(source, limit, crop, ratio, res, renormalise_depth):
        ids.append(rec.id)
        labels.append(torch.from_numpy(np.asarray(rec.label, dtype=np.int64)))
        if rec.depth is not None:
            depths.append(torch.from_numpy(np.asarray(rec.depth, dtype=np.float32)))
        pending.append(rec)
        if len(pending) == batch:
            t_load += time.perf_counter() - t0
            flush()
            t0 = time.perf_counter()
    t_load += time.perf_counter() - t0
    if pending:
        flush()
    if not ids:
        raise ValueError(f"quality benchmark: source {source!r} yielded no images")
    out = FeatureSet(torch.cat(feats), torch.stack(labels),
                     torch.stack(depths).unsqueeze(1) if len(depths) == len(ids) else None, None, ids)
    if knn:
        t0 = time.perf_counter()
        glob = out.feats.float().mean(dim=(2, 3))
        out.nn = topk_cosine(glob, knn)[1]
        out.seconds["knn"] = time.perf_counter() - t0
    out.seconds.update({"load": t_load, "backbone": t_bb})
    return out


def fit_projection(feats: torch.Tensor, dim: int, generator: torch.Generator, per_image: int = 24):
    """Uncentred PCA basis [C, dim] from sampled vectors, and the fraction of the second moment it keeps."""
    x = sample_vectors(feats, per_image, generator).double()
    second = x.T @ x / x.shape[0]
    evals, evecs = torch.linalg.eigh(second)  # ascending
    basis = evecs[:, -dim:].flip(1).float()
    kept = float(evals[-dim:].sum() / evals.sum())
    return basis, kept


def project(feats: torch.Tensor, basis: torch.Tensor, chunk: int = 128) -> torch.Tensor:
    """Apply the channel projection ``basis`` [C, D] to float16 maps [N,C,h,w] -> float16 [N,D,h,w]."""
    out = []
    for start in range(0, feats.shape[0], chunk):
        x = feats[start:start + chunk].float()
        out.append(torch.einsum("nchw,cd->ndhw", x, basis).to(torch.float16))
    return torch.cat(out)


def upsample_chunks(x: torch.Tensor, size, chunk: int = 4):
    """Yield (start, bilinear upsample of ``x[start:start+chunk]`` to ``size``) in float32."""
    for start in range(0, x.shape[0], chunk):
        yield start, F.interpolate(x[start:start + chunk].float(), size=size, mode="bilinear", align_corners=False)


def split_holdout(data: FeatureSet, fraction: float, knn: int):
    """(fit, held-out) subsets of a train set, split by source image (all crops of an image together)."""
    images = sorted({i.rsplit("_c", 1)[0] for i in data.ids})
    held = set(images[int(len(images) * (1 - fraction)):])
    rows = torch.tensor([i.rsplit("_c", 1)[0] in held for i in data.ids])
    parts = []
    for mask in (~rows, rows):
        idx = torch.nonzero(mask).flatten()
        sub = FeatureSet(data.feats[idx], data.labels[idx], None if data.depth is None else data.depth[idx],
                         None, [data.ids[i] for i in idx])
        sub.nn = topk_cosine(sub.feats.float().mean(dim=(2, 3)), knn)[1]
        parts.append(sub)
    return parts


# ----------------------------------------------------------------------------- Markdown report
MARKER = "<!-- hand-written below: kept when the benchmark rewrites this file -->"
LABELS = {"stego": "STEGO (no depth, random sampling)", "depth_only": "+ depth correlation only (paper, random)",
          "fps_only": "+ FPS only (no depth loss)", "depthg": "DepthG (paper depth loss + FPS)",
          "depthg_lhp": "DepthG + 3D-LHP", "depthg_distance": "DepthG, distance mode (+ FPS)",
          "depthg_reference": "DepthG, reference mode (+ FPS)"}


def _pm(s: dict, key: str) -> str:
    if f"{key}_mean" not in s:
        return "-"
    return f"{100 * s[f'{key}_mean']:.1f} +- {100 * s[f'{key}_std']:.1f}"


def _vs(s: dict, ref: dict | None) -> str:
    """Paired (by seed) unsupervised-mIoU difference to ``ref`` with its 95% interval."""
    from bench.quality_train import paired

    if ref is None or s is ref:
        return "-"
    p = paired(_per_seed(s), _per_seed(ref))
    ci = "" if p["ci95"] is None else f" [{p['ci95'][0]:+.1f}, {p['ci95'][1]:+.1f}]"
    return f"{p['mean']:+.1f}{ci}"


def _table(ds: dict) -> list[str]:
    rows = ["| method | unsup. acc | unsup. mIoU | vs STEGO (paired, 95% CI) | linear acc | linear mIoU | "
            "k-means on codes mIoU | s / run |", "|---|---|---|---|---|---|---|---|"]
    ref = ds["variants"].get("stego")
    for fit_on, s in ds["kmeans_raw"].items():
        rows.append(f"| raw-feature k-means ({fit_on.replace('_', ' ')}) | {_pm(s, 'unsupervised_accuracy')} | "
                    f"{_pm(s, 'unsupervised_miou')} | {_vs(s, ref)} | - | - | - | - |")
    for name, s in ds["variants"].items():
        secs = np.mean([r["seconds"] for r in s["runs"]])
        rows.append(f"| {LABELS.get(name, name)} | {_pm(s, 'unsupervised_accuracy')} | {_pm(s, 'unsupervised_miou')} | "
                    f"{_vs(s, ref)} | {_pm(s, 'linear_accuracy')} | {_pm(s, 'linear_miou')} | "
                    f"{_pm(s, 'codes_kmeans_miou')} | {secs:.0f} |")
    return rows


def _per_seed(summary: dict, probe: str = "unsupervised") -> list[float]:
    return [100 * r[probe]["miou"] for r in summary["runs"]]


def headline(result: dict) -> dict:
    """The targets of issue 13 as numbers (percentage points, paired by seed; ci95 = the paired difference's
    two-sided 95% t interval): trained head (STEGO, the variant without depth that both datasets run; on
    synthetic also DepthG) - raw-feature k-means (fit on train), DepthG - STEGO on synthetic val, and FPS's
    gain on the linear probe (FPS only - STEGO)."""
    from bench.quality_train import paired

    out = {}

    def diff(key, a, b, probe_a="unsupervised", probe_b="unsupervised"):
        p = paired(_per_seed(a, probe_a), _per_seed(b, probe_b))
        out[f"{key}_miou"], out[f"{key}_ci95"] = p["mean"], p["ci95"]

    for ds, variant, key in (("camvid", "stego", "camvid_head"), ("synthetic", "stego", "synthetic_head"),
                             ("synthetic", "depthg", "synthetic_depthg")):
        d = result["datasets"].get(ds)
        if d and variant in d["variants"]:
            diff(f"{key}_minus_kmeans", d["variants"][variant], d["kmeans_raw"]["fit_train"])
            out[f"{key}_target_met"] = bool(out[f"{key}_minus_kmeans_miou"] >= 0)
    syn = result["datasets"].get("synthetic", {}).get("variants", {})
    if "stego" in syn and "depthg" in syn:
        diff("synthetic_depthg_minus_stego", syn["depthg"], syn["stego"])
        ci = out["synthetic_depthg_minus_stego_ci95"]
        out["synthetic_depthg_target_met"] = bool(ci is not None and ci[0] > 0)
    if "stego" in syn and "fps_only" in syn:
        diff("synthetic_fps_linear_gain", syn["fps_only"], syn["stego"], "linear", "linear")
    return out


def _num(v) -> str:
    if isinstance(v, float):
        return f"{v:.2f}"
    if isinstance(v, list):
        return "[" + ", ".join(_num(x) for x in v) + "]"
    return str(v)


def write_markdown(result: dict, path: str) -> None:
    """Tables, setup and timing as Markdown; text after ``MARKER`` in an existing file is kept."""
    kept = ""
    if os.path.exists(path):
        with open(path) as fh:
            old = fh.read()
        if MARKER in old:
            kept = old[old.index(MARKER) + len(MARKER):]
    a = result["args"]
    lines = ["# Quality benchmark: does depth guidance help?", "",
             f"Backbone: **{result['backbone']}**. All numbers are % on the *val* splits, mean +- std over "
             f"{a['seeds']} seeds (population std). Unsupervised = cluster probe, one Hungarian matching over the "
             "whole val split; linear = linear probe on the same codes. No CRF, no flip averaging.", ""]
    hl = headline(result)
    if hl:
        lines += ["## Headline", "", "```", *(f"{k}: {_num(v)}" for k, v in hl.items()), "```", ""]
    for name, ds in result["datasets"].items():
        st = ds["setup"]
        lines += [f"## {name}", "", *_table(ds), "",
                  f"- {st['train_crops']} train crops at {st['train_res']}x{st['train_res']}, {st['val_images']} val "
                  f"images at {st['val_res']}x{st['val_res']} ({st['n_classes']} classes: {', '.join(st['classes'])}); "
                  f"{ds['steps']} batches of {a['batch']} per run.",
                  f"- features: all {st['raw_dim']} channels of the frozen backbone, cached once "
                  f"({st['cache_seconds']:.0f} s).",
                  f"- training recipe: `{st['config']}` (loss, sampling, model, train.lr / probe_lr / finish) "
                  f"with `model.n_classes`, the variant's switches" + (f" and `{' '.join(st['overrides'])}`"
                                                                       if st.get("overrides") else "") + ".",
                  *([f"- depth: metric depth clipped at {st['depth_max']:g} m (0 = not clipped) before the per-image "
                     f"min-max; train crops {'renormalised to [0,1] each' if st['depth_per_crop'] else 'not renormalised'}."]
                    if "depth_max" in st else []),
                  "- pointwise-centred feature correlations on train (mean / median): " + ", ".join(
                      f"{k} {v['mean']:.3f} / {v['median']:.3f}" for k, v in st["correlations"].items()), ""]
    m = result.get("machine", {})
    lines += ["## Run", "", f"- total time: {result['seconds_total'] / 60:.1f} min on {m.get('cores', '?')} CPU cores "
              f"({m.get('cpu', '?')}, torch {m.get('torch', '?')}, GPU: {m.get('gpu')}); load average "
              f"{m.get('load_avg', '?')} (1, 5, 15 min) at the end.",
              f"- command: `{result.get('command', '')}`", "", MARKER]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + (kept if kept else "\n"))
