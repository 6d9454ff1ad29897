"""Metrics against brute force: confusion counting, Hungarian matching, IoU, over-clustering."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from depthg import metrics


def brute_confusion(pred, target, n_pred, n_classes):
    conf = np.zeros((n_pred, n_classes), dtype=np.int64)
    for p, t in zip(pred.ravel(), target.ravel()):
        if t >= 0:
            conf[p, t] += 1
    return conf


def brute_scores(conf):
    """Try every one-to-one cluster->class map (square matrices); score with explicit loops."""
    n = conf.shape[0]
    best = max(itertools.permutations(range(n)), key=lambda perm: sum(conf[k, perm[k]] for k in range(n)))
    total = conf.sum()
    acc = sum(conf[k, best[k]] for k in range(n)) / total
    ious = []
    for c in range(n):
        k = best.index(c)
        tp = conf[k, c]
        fp = conf[k].sum() - tp
        fn = conf[:, c].sum() - tp
        ious.append(tp / (tp + fp + fn) if tp + fp + fn else float("nan"))
    valid = [v for v in ious if v == v]
    return acc, sum(valid) / len(valid), ious, sum(conf[k, best[k]] for k in range(n))


def test_confusion_matches_brute_force_and_drops_ignore():
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 5, size=(3, 17, 13))
    target = rng.integers(-1, 4, size=(3, 17, 13))
    conf = metrics.confusion(torch.from_numpy(pred), target, 5, 4)
    assert conf.dtype == np.int64
    np.testing.assert_array_equal(conf, brute_confusion(pred, target, 5, 4))
    assert conf.sum() == (target >= 0).sum()


def test_confusion_rejects_out_of_range_predictions():
    with pytest.raises(ValueError, match=r"predictions must lie in \[0, 3\)"):
        metrics.confusion(np.array([0, 3]), np.array([0, 1]), 3, 2)


@pytest.mark.parametrize("seed", range(12))
def test_hungarian_equals_brute_force_on_random_matrices(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 6))
    conf = rng.integers(0, 50, size=(n, n)).astype(np.int64)
    if seed % 3 == 0:  # an absent, never-predicted class -> NaN IoU, left out of the mean
        conf[:, 1] = 0
        conf[1, :] = 0
    acc, miou, ious, matched = brute_scores(conf)
    got = metrics.hungarian_scores(conf)
    mapping = np.array(got["assignment"])
    assert sum(conf[k, mapping[k]] for k in range(n)) == matched  # optimal (ties may differ in map)
    assert got["accuracy"] == pytest.approx(acc)
    # IoUs depend on the map itself: recompute brute-force IoU for the map found
    for c in range(n):
        k = int(np.where(mapping == c)[0][0])
        tp, fp, fn = conf[k, c], conf[k].sum() - conf[k, c], conf[:, c].sum() - conf[k, c]
        expect = tp / (tp + fp + fn) if tp + fp + fn else float("nan")
        assert got["iou"][c] == pytest.approx(expect, nan_ok=True)
    if _unique_optimum(conf):
        assert got["miou"] == pytest.approx(miou, nan_ok=True)


def _unique_optimum(conf):
    n = conf.shape[0]
    sums = sorted((sum(conf[k, p[k]] for k in range(n)) for p in itertools.permutations(range(n))), reverse=True)
    return len(sums) == 1 or sums[0] > sums[1]


def test_perfect_clustering_under_random_permutation_scores_100():
    rng = np.random.default_rng(3)
    target = rng.integers(0, 6, size=(4, 20, 20))
    target[0, :3] = -1
    perm = rng.permutation(6)
    pred = perm[np.clip(target, 0, None)]
    got = metrics.hungarian_scores(metrics.confusion(pred, target, 6, 6))
    assert got["accuracy"] == 1.0
    assert got["miou"] == 1.0
    assert [got["assignment"][perm[c]] for c in range(6)] == list(range(6))


def test_identity_scores_against_loops():
    rng = np.random.default_rng(5)
    conf = rng.integers(0, 30, size=(4, 4)).astype(np.int64)
    got = metrics.identity_scores(conf)
    assert got["accuracy"] == pytest.approx(np.trace(conf) / conf.sum())
    for c in range(4):
        union = conf[c].sum() + conf[:, c].sum() - conf[c, c]
        assert got["iou"][c] == pytest.approx(conf[c, c] / union)
    assert got["miou"] == pytest.approx(np.mean(got["iou"]))


def test_over_clustering_keeps_every_pixel():
    # 5 clusters, 3 classes: clusters 3 and 4 are sub-clusters of classes 0 and 2
    rng = np.random.default_rng(7)
    target = rng.integers(0, 3, size=(50, 50))
    pred = target.copy()
    pred[(target == 0) & (rng.random(target.shape) < 0.4)] = 3
    pred[(target == 2) & (rng.random(target.shape) < 0.3)] = 4
    conf = metrics.confusion(pred, target, 5, 3)
    got = metrics.hungarian_scores(conf)
    assert got["pixels"] == target.size  # nothing dropped
    assert got["assignment"] == [0, 1, 2, 0, 2]
    assert got["accuracy"] == 1.0 and got["miou"] == 1.0


@pytest.mark.parametrize("seed", range(6))
def test_over_clustering_equals_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    n_pred, n_classes = int(rng.integers(4, 7)), int(rng.integers(2, 4))
    conf = rng.integers(0, 40, size=(n_pred, n_classes)).astype(np.int64)
    # brute force: best injective class -> cluster choice, leftover clusters to their majority class
    best = max(itertools.permutations(range(n_pred), n_classes),
               key=lambda ks: sum(conf[k, c] for c, k in enumerate(ks)))
    mapping = [int(conf[k].argmax()) for k in range(n_pred)]
    for c, k in enumerate(best):
        mapping[k] = c
    matched = sum(conf[k, mapping[k]] for k in range(n_pred))
    got = metrics.hungarian_scores(conf)
    assert got["pixels"] == conf.sum()
    assert got["accuracy"] == pytest.approx(matched / conf.sum())
    assert sorted(set(got["assignment"])) == list(range(n_classes))  # every class matched once at least


def test_under_clustering_leaves_classes_unmatched():
    conf = np.array([[10, 0, 5], [0, 8, 0]], dtype=np.int64)  # 2 clusters, 3 classes
    got = metrics.hungarian_scores(conf)
    assert got["assignment"] == [0, 1]
    assert got["accuracy"] == pytest.approx(18 / 23)
    assert got["iou"][2] == 0.0
    assert got["miou"] == pytest.approx((10 / 15 + 1.0 + 0.0) / 3)


def test_score_confusions_dispatches_by_name():
    conf = np.array([[0, 4], [6, 0]], dtype=np.int64)
    out = metrics.score_confusions({"cluster": conf, "linear": conf})
    assert out["cluster"]["accuracy"] == 1.0
    assert out["linear"]["accuracy"] == 0.0
