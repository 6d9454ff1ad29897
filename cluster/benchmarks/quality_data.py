"""Feature caches for the quality benchmark: every crop through the frozen backbone exactly once.

The backbone is frozen and training uses no augmentation, so the features of every training crop and
every validation image are computed once and kept in memory (float16), together with the crop's depth,
labels and kNN positives (cosine top-k of the global-average-pooled features, self excluded, within the
split). Training then only runs the head (``depthg.step.losses_from_features``) on cached features.

An optional uncentred PCA (``fit_projection``) maps the 704-channel EfficientNet-Lite0 features to fewer
channels: it keeps the directions that carry most of the second moment, so cosine correlations of the
projected features approximate those of the raw ones, and it makes the head (and the correlations) several
times cheaper on a 2-core CPU. The retained energy is reported.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from depthg.data import five_crop, to_tensor_image, transform_record
from depthg.knn import topk_cosine


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


def _records(source, limit: int, crop: bool, ratio: float, res: int):
    ids = source.ids()[:limit] if limit else source.ids()
    for id_ in ids:
        rec = source.load(id_)
        for r in (five_crop(rec, ratio) if crop else [rec]):
            yield transform_record(r, res)


@torch.no_grad()
def build_set(source, backbone, res: int, crop: bool, ratio: float = 0.5, limit: int = 0,
              batch: int = 16, knn: int = 0) -> FeatureSet:
    """Load (and five-crop) ``source``, resize to ``res`` x ``res``, run the backbone once per image."""
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
    for rec in _records(source, limit, crop, ratio, res):
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


def sample_vectors(feats: torch.Tensor, per_image: int, generator: torch.Generator) -> torch.Tensor:
    """``per_image`` random feature vectors of each map -> float32 [N*per_image, C]."""
    n, c, h, w = feats.shape
    flat = feats.flatten(2)  # [N,C,hw]
    idx = torch.randint(h * w, (n, per_image), generator=generator)
    return torch.gather(flat, 2, idx[:, None, :].expand(-1, c, -1)).permute(0, 2, 1).reshape(-1, c).float()


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
