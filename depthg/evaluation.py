"""The per-batch evaluation math (METHOD.md section 9), pure torch / numpy.

For every validation image: resize the shorter side to ``resolution`` (nearest) and centre-crop
a square (``depthg.data.transforms.resize_center_crop``); codes = head(backbone(x)), averaged with the codes of the horizontally flipped image
(flipped back); codes bilinearly upsampled to the image size; then

* cluster head: ``cluster_probe`` log-probs -> argmax (and, with CRF, dense-CRF refined);
* linear probe: logits -> argmax (and CRF refined);
* optionally k-means: centroids fitted on codes of the split (``fit_kmeans``; at most a fixed number of
  them, a seeded sample reduced as shards arrive: ``depthg.metrics.CodeSample``), cosine argmax.

Each batch returns int64 confusion matrices (``depthg.metrics.confusion``) that the caller sums
over the split before any matching. Nothing here knows about workers or Ray.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from depthg import crf as crf_mod
from depthg import metrics
from depthg.data.transforms import resize_center_crop


# ----------------------------------------------------------------------------- inputs
def prepare(sample: dict, size: int) -> dict:
    """Resize + crop one decoded sample (``image``, optional ``depth`` / ``label``) to ``size``
    with the project's one resize (``depthg.data.transforms.resize_center_crop``)."""
    out = {"id": sample.get("id", ""), "image": resize_center_crop(sample["image"], size)}
    for key in ("depth", "label"):
        value = sample.get(key)
        out[key] = None if value is None else resize_center_crop(value, size)
    return out


def collate(samples: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prepared samples -> images float ``[B,3,S,S]`` in [0,1], labels int64 ``[B,S,S]`` (or None)."""
    images = torch.from_numpy(np.stack([s["image"] for s in samples])).permute(0, 3, 1, 2).float() / 255.0
    if any(s.get("label") is None for s in samples):
        return images, None
    return images, torch.from_numpy(np.stack([s["label"] for s in samples]).astype(np.int64))


# ----------------------------------------------------------------------------- codes and predictions
@torch.no_grad()
def compute_codes(backbone, head, images: torch.Tensor, flip: bool = True) -> torch.Tensor:
    """Codes ``[B,Q,h,w]`` at the feature grid, averaged with the flipped image's codes when ``flip``."""
    codes = head(backbone(images))
    if flip:
        codes_flipped = head(backbone(images.flip(dims=[3])))
        codes = (codes + codes_flipped.flip(dims=[3])) / 2
    return codes


def upsample(codes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(codes, size=size, mode="bilinear", align_corners=False)


PROBES = ("cluster", "linear")


def probe_scores(segmenter, codes: torch.Tensor, size: tuple[int, int],
                 probes: Sequence[str] = PROBES) -> dict[str, torch.Tensor]:
    """The one evaluation path from codes to scores: codes ``[B,Q,h,w]`` bilinearly upsampled to ``size``,
    then each probe -> ``{"cluster": log-probs [B,K,*size], "linear": logits [B,n_classes,*size]}``.

    Used by evaluation (``predict``), inference (``segment_images``), the trainer's validation and the
    quality benchmark; argmax of a score map is that probe's prediction.
    """
    unknown = [p for p in probes if p not in PROBES]
    if unknown:
        raise ValueError(f"probe must be one of {', '.join(PROBES)}, got {unknown[0]!r}")
    dtype = next(segmenter.cluster_probe.parameters()).dtype  # bf16 under a bf16 engine
    up = upsample(codes.to(dtype), tuple(size))
    modules = {"cluster": segmenter.cluster_probe, "linear": segmenter.linear_probe}
    return {name: modules[name](up).float() for name in probes}


@dataclass
class EvalOptions:
    n_classes: int
    flip: bool = True
    crf: bool = False
    crf_params: crf_mod.CRFParams = crf_mod.CRFParams()
    centroids: torch.Tensor | None = None  # k-means centroids [K,Q] (None = no k-means head)


@torch.no_grad()
def predict(backbone, segmenter, images: torch.Tensor, opts: EvalOptions) -> dict[str, torch.Tensor]:
    """Hard predictions ``[B,S,S]`` (int64, on the CPU) for each evaluated head.

    Keys: ``cluster``, ``linear``, with CRF also ``cluster_crf``, ``linear_crf``, with centroids
    ``kmeans``. Cluster ids are raw (not yet matched to classes).
    """
    scores, preds = predict_scores(backbone, segmenter, images, opts)
    if opts.crf:
        preds.update(crf_predictions(images, scores, opts.crf_params))
    return preds


@torch.no_grad()
def predict_scores(backbone, segmenter, images: torch.Tensor, opts: EvalOptions):
    """``(scores, preds)``: each probe's scores ``[B,C,S,S]`` (``probe_scores``) and the predictions of
    ``predict`` without the CRF heads, whose input the scores are (the CRF can then run elsewhere)."""
    size = tuple(images.shape[2:])
    codes = compute_codes(backbone, segmenter.head, images, opts.flip)
    scores = probe_scores(segmenter, codes, size)
    preds = {name: s.argmax(dim=1).cpu() for name, s in scores.items()}
    if opts.centroids is not None:
        preds["kmeans"] = kmeans_assign(upsample(codes, size), opts.centroids.to(codes.device)).cpu()
    return scores, preds


def crf_predictions(images: torch.Tensor, scores: dict[str, torch.Tensor], params: crf_mod.CRFParams):
    """``{name + "_crf": [B,S,S]}``: dense-CRF refined predictions of each probe's scores."""
    return {name + "_crf": crf_mod.crf_batch(images.cpu(), s.cpu(), params).argmax(dim=1) for name, s in scores.items()}


def n_predictions(segmenter, opts: EvalOptions) -> dict[str, int]:
    """Number of rows of each head's confusion matrix."""
    rows = {"cluster": int(segmenter.cluster_probe.n_clusters), "linear": int(opts.n_classes)}
    if opts.crf:
        rows.update({"cluster_crf": rows["cluster"], "linear_crf": rows["linear"]})
    if opts.centroids is not None:
        rows["kmeans"] = int(opts.centroids.shape[0])
    return rows


def batch_confusions(preds: dict[str, torch.Tensor], labels: torch.Tensor, rows: dict[str, int],
                     n_classes: int) -> dict[str, np.ndarray]:
    """int64 confusion matrix per head for one batch (ignore labels dropped)."""
    return {name: metrics.confusion(pred, labels, rows[name], n_classes) for name, pred in preds.items()}


def evaluate_batch(backbone, segmenter, images, labels, opts: EvalOptions):
    """(confusions, predictions) of one batch: the unit every evaluation worker repeats."""
    preds = predict(backbone, segmenter, images, opts)
    return batch_confusions(preds, labels, n_predictions(segmenter, opts), opts.n_classes), preds


# ----------------------------------------------------------------------------- k-means on codes
@torch.no_grad()
def sample_codes(backbone, segmenter, images: torch.Tensor, per_image: int, flip: bool,
                 generator: torch.Generator) -> torch.Tensor:
    """Up to ``per_image`` code vectors ``[N,Q]`` per image, at the feature grid, for k-means fitting."""
    codes = compute_codes(backbone, segmenter.head, images, flip)
    flat = codes.permute(0, 2, 3, 1).reshape(codes.shape[0], -1, codes.shape[1]).cpu()
    take = min(per_image, flat.shape[1])
    idx = torch.stack([torch.randperm(flat.shape[1], generator=generator)[:take] for _ in range(flat.shape[0])])
    return torch.gather(flat, 1, idx[..., None].expand(-1, -1, flat.shape[2])).reshape(-1, flat.shape[2])


def fit_kmeans(x: torch.Tensor, k: int, iters: int = 50, seed: int = 0) -> torch.Tensor:
    """Spherical (cosine) k-means on ``x`` ``[N,Q]``; returns unit centroids ``[k,Q]``. Deterministic."""
    x = F.normalize(x.float(), dim=1)
    if x.shape[0] < k:
        raise ValueError(f"fit_kmeans: {x.shape[0]} code vectors for {k} clusters")
    centroids = _kmeanspp(x, k, torch.Generator().manual_seed(seed))
    for _ in range(iters):
        assign = (x @ centroids.T).argmax(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        empty = counts == 0  # keep an empty cluster's centroid where it was
        new = torch.where(empty[:, None], centroids, F.normalize(sums, dim=1))
        if torch.equal(new, centroids):
            break
        centroids = new
    return centroids


def _kmeanspp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding with cosine distance (1 - cos), drawn from ``gen``."""
    chosen = [int(torch.randint(x.shape[0], (1,), generator=gen))]
    dist = (1 - x @ x[chosen[0]]).clamp(min=0)
    for _ in range(1, k):
        weights = dist**2 if dist.sum() > 0 else torch.ones_like(dist)
        chosen.append(int(torch.multinomial(weights, 1, generator=gen)))
        dist = torch.minimum(dist, (1 - x @ x[chosen[-1]]).clamp(min=0))
    return x[chosen].clone()


def kmeans_assign(codes: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Cosine argmax of codes ``[B,Q,H,W]`` against centroids ``[K,Q]`` -> ``[B,H,W]``."""
    return torch.einsum("bqhw,kq->bkhw", F.normalize(codes, dim=1), F.normalize(centroids, dim=1)).argmax(dim=1)
