"""Segmentation metrics from confusion matrices: Hungarian matching, accuracy, IoU, mIoU.

Evaluation sums before it matches: every worker returns integer confusion matrices
(``confusion``), the driver adds them and calls ``hungarian_scores`` (cluster head, unsupervised)
or ``identity_scores`` (linear probe) once for the whole split.

Conventions: a confusion matrix is int64 ``[n_pred, n_classes]``, rows = predicted cluster / class,
columns = ground truth; pixels whose target is negative (-1 = ignore) are never counted.

Over-clustering (``n_pred > n_classes``): the reference metric silently drops pixels of clusters
with an id >= n_classes. Here every pixel counts: one Hungarian assignment (maximising matched
pixels) pairs ``n_classes`` clusters with the classes one to one, and every remaining cluster is
mapped to its majority class. With ``n_pred < n_classes`` the unmatched classes simply receive no
prediction (IoU 0 where they occur).

``CodeSample`` is the other split-wide reduction: the seeded, bounded sample of code vectors that k-means is
fitted on. numpy and scipy only (no torch): an evaluation driver imports this module and stays light.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
from scipy.optimize import linear_sum_assignment


def confusion(pred, target, n_pred: int, n_classes: int) -> np.ndarray:
    """int64 ``[n_pred, n_classes]`` counts of (prediction, target) pairs; targets < 0 dropped.

    ``pred`` and ``target`` are integer arrays / tensors of the same shape. A prediction outside
    ``[0, n_pred)`` or a target >= ``n_classes`` is an error (not silently dropped).
    """
    pred = _to_numpy(pred).reshape(-1).astype(np.int64)
    target = _to_numpy(target).reshape(-1).astype(np.int64)
    if pred.shape != target.shape:
        raise ValueError(f"confusion: pred has {pred.size} pixels, target {target.size}")
    keep = target >= 0
    pred, target = pred[keep], target[keep]
    if pred.size and (pred.min() < 0 or pred.max() >= n_pred):
        raise ValueError(f"confusion: predictions must lie in [0, {n_pred}), got [{pred.min()}, {pred.max()}]")
    if target.size and target.max() >= n_classes:
        raise ValueError(f"confusion: targets must lie in [0, {n_classes}) or be -1, got max {target.max()}")
    counts = np.bincount(pred * n_classes + target, minlength=n_pred * n_classes)
    return counts.reshape(n_pred, n_classes).astype(np.int64)


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor (this module never imports torch: evaluation drivers stay without it)
        return x.detach().cpu().numpy()
    return np.asarray(x)


def assign_clusters(conf: np.ndarray) -> np.ndarray:
    """Cluster -> class map (int64 ``[n_pred]``), maximising matched pixels.

    One-to-one Hungarian first; clusters left over (over-clustering) go to their majority class.
    """
    conf = np.asarray(conf, dtype=np.int64)
    n_pred, n_classes = conf.shape
    rows, cols = linear_sum_assignment(conf, maximize=True)
    mapping = np.full(n_pred, -1, dtype=np.int64)
    mapping[rows] = cols
    leftover = mapping < 0
    mapping[leftover] = conf[leftover].argmax(axis=1)
    return mapping


def remap_confusion(conf: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    """Fold a ``[n_pred, n_classes]`` matrix into ``[n_classes, n_classes]`` by the cluster map."""
    conf = np.asarray(conf, dtype=np.int64)
    n_classes = conf.shape[1]
    out = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(out, np.asarray(mapping, dtype=np.int64), conf)
    return out


def identity_scores(conf: np.ndarray) -> dict:
    """Accuracy, per-class IoU and mIoU of a square matrix whose rows already are classes."""
    conf = np.asarray(conf, dtype=np.int64)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"identity_scores needs a square confusion matrix, got shape {conf.shape}")
    tp = np.diag(conf).astype(np.float64)
    fp = conf.sum(axis=1) - tp  # predicted as the class, labelled otherwise
    fn = conf.sum(axis=0) - tp  # labelled as the class, predicted otherwise
    total = conf.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = tp / (tp + fp + fn)  # NaN where the class is neither present nor predicted
    valid = ~np.isnan(iou)
    return {
        "accuracy": float(tp.sum() / total) if total else float("nan"),
        "miou": float(iou[valid].mean()) if valid.any() else float("nan"),
        "iou": [float(v) for v in iou],
        "pixels": int(total),
    }


def hungarian_scores(conf: np.ndarray) -> dict:
    """Scores of an unsupervised clustering: match clusters to classes, then ``identity_scores``.

    Returns ``{"accuracy", "miou", "iou": [n_classes], "assignment": [n_pred], "pixels"}``;
    ``assignment[k]`` is the class cluster ``k`` is mapped to.
    """
    mapping = assign_clusters(conf)
    scores = identity_scores(remap_confusion(conf, mapping))
    scores["assignment"] = [int(c) for c in mapping]
    return scores


def score_confusions(confs: Mapping[str, np.ndarray]) -> dict:
    """Score a dict of summed matrices: keys starting with ``linear`` by identity, others by Hungarian."""
    out = {}
    for name, conf in confs.items():
        out[name] = identity_scores(conf) if name.startswith("linear") else hungarian_scores(conf)
    return out


def paired_difference(a, b) -> dict:
    """Paired difference ``a - b`` over seeds (``a[i]`` and ``b[i]`` share a seed): mean, sample std and the
    two-sided 95% t interval of the mean (``ci95`` None from one seed). Used by the quality benchmark and the
    reproduction sweep's ablation rows (``cluster.reproduce``)."""
    from scipy import stats

    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    if len(d) < 2:
        return {"mean": float(d.mean()) if len(d) else float("nan"), "std": 0.0, "ci95": None, "n": len(d)}
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return {"mean": float(d.mean()), "std": float(d.std(ddof=1)), "ci95": [float(d.mean() - half), float(d.mean() + half)],
            "n": len(d)}


class CodeSample:
    """A seeded uniform sample of at most ``size`` code vectors of a split, reduced shard by shard as the shards'
    codes arrive, in any order: each vector gets a key from a generator seeded by ``(seed, shard position)``
    and the ``size`` smallest keys are kept (a bottom-k sample: the same vectors whatever the arrival order).
    ``codes()`` returns them in shard order, so a split with at most ``size`` vectors gives all of them, as
    their concatenation in shard order. Once ``size`` are held, a newcomer whose key is not below the largest
    kept key cannot enter and is dropped at once; the others wait in a buffer of ``size // 4`` that is merged
    when full. Memory: ``1.25 x size`` vectors."""

    def __init__(self, size: int, seed: int = 0):
        if size < 1:
            raise ValueError(f"CodeSample: size must be >= 1, got {size}")
        self.size, self.seed, self.filled = int(size), int(seed), 0
        self.capacity = self.size + max(self.size // 4, 1)
        self.rows: np.ndarray | None = None
        self.keys = np.empty(self.capacity, np.float64)
        self.order = np.empty(self.capacity, np.int64)  # shard position << 32 | row: the shard order
        self.bound = np.inf  # every kept key is below it once `size` are held

    def add(self, position: int, codes) -> None:
        codes = np.asarray(codes, np.float32)
        if not len(codes):
            return
        if self.rows is None:
            self.rows = np.empty((self.capacity, codes.shape[1]), np.float32)
        keys = np.random.default_rng([self.seed, int(position)]).random(len(codes))
        rows = np.flatnonzero(keys < self.bound)
        while len(rows):
            room = self.capacity - self.filled
            if not room:
                self._merge()
                rows = rows[keys[rows] < self.bound]
                continue
            take, rows = rows[:room], rows[room:]
            end = self.filled + len(take)
            self.rows[self.filled:end], self.keys[self.filled:end] = codes[take], keys[take]
            self.order[self.filled:end] = (int(position) << 32) + take
            self.filled = end

    def _merge(self) -> None:
        """Keep the ``size`` smallest keys in slots ``[0, size)``; the bound becomes the largest of them."""
        if self.filled > self.size:
            kept = np.zeros(self.filled, bool)
            kept[np.argpartition(self.keys[:self.filled], self.size - 1)[:self.size]] = True
            holes, movers = np.flatnonzero(~kept[:self.size]), self.size + np.flatnonzero(kept[self.size:])
            self.rows[holes], self.keys[holes], self.order[holes] = self.rows[movers], self.keys[movers], self.order[movers]
            self.filled = self.size
        if self.filled == self.size:
            self.bound = float(self.keys[:self.size].max())

    def __len__(self) -> int:
        return min(self.filled, self.size)

    def codes(self) -> np.ndarray:
        """The kept vectors ``[n, Q]`` in shard order (then row order within a shard)."""
        if self.rows is None:
            return np.zeros((0, 0), np.float32)
        self._merge()
        return self.rows[np.argsort(self.order[:self.filled], kind="stable")]
