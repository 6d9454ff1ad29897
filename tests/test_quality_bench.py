"""Smoke and unit tests of the quality benchmark (bench/quality.py), tiny sizes."""
from __future__ import annotations

import argparse
import itertools
import json

import numpy as np
import pytest
import torch

from bench import quality, quality_data as qd
from depthg.config import load_config


def _args(tmp_path, *extra):
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(tmp_path / "q.json"))
    quality.add_arguments(parser)
    return parser.parse_args(["--quick", "--variants", "stego,depthg", "--skip-camvid",
                              "--results-md", str(tmp_path / "RESULTS.md"), *extra])


def _fake_set(n=6, c=8, h=4, w=4, n_classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, c, h, w, generator=g).to(torch.float16)
    labels = torch.randint(-1, n_classes, (n, 2 * h, 2 * w), generator=g)
    depth = torch.rand(n, 1, 2 * h, 2 * w, generator=g)
    nn = torch.stack([torch.tensor([(i + 1) % n, (i + 2) % n]) for i in range(n)])
    return qd.FeatureSet(feats, labels, depth, nn, [str(i) for i in range(n)])


def test_quick_run_structure_and_ranges(tmp_path):
    args = _args(tmp_path)
    result = quality.run(args)
    json.dumps(result)  # JSON-serialisable as the dispatcher writes it
    syn = result["datasets"]["synthetic"]
    assert set(syn["variants"]) == {"stego", "depthg"}
    assert set(syn["kmeans_raw"]) == {"fit_train", "fit_val"}
    entries = list(syn["variants"].values()) + list(syn["kmeans_raw"].values())
    for s in entries:
        assert s["seeds"] == args.seeds == len(s["runs"])
        for key, value in s.items():
            if key.endswith("_mean") or key.endswith("_std"):
                assert 0.0 <= value <= 1.0, (key, value)
        for run in s["runs"]:
            for probe in ("unsupervised", "linear"):
                if probe in run:
                    assert 0.0 <= run[probe]["accuracy"] <= 1.0 and 0.0 <= run[probe]["miou"] <= 1.0
                    assert len(run[probe]["iou"]) == syn["setup"]["n_classes"] == 8
    assert syn["setup"]["train_crops"] == 5 * args.num_train and syn["setup"]["val_images"] == args.num_val
    assert 0.0 < syn["setup"]["pca_energy_kept"] <= 1.0 + 1e-6
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| DepthG (paper depth loss + FPS) |" in text and quality.MARKER in text
    # hand-written text after the marker survives a rewrite
    (tmp_path / "RESULTS.md").write_text(text + "\nmy notes\n")
    quality.write_markdown({**result, "machine": {}}, str(tmp_path / "RESULTS.md"))
    assert (tmp_path / "RESULTS.md").read_text().endswith("\nmy notes\n")


def _brute_force_miou(pred, target, n_classes):
    """Best mIoU over every one-to-one relabelling of the predictions (accuracy-maximising permutation)."""
    keep = target >= 0
    pred, target = pred[keep], target[keep]
    best = None
    for perm in itertools.permutations(range(n_classes)):
        mapped = np.array(perm)[pred]
        acc = (mapped == target).mean()
        if best is None or acc > best[0]:
            ious = []
            for c in range(n_classes):
                union = ((mapped == c) | (target == c)).sum()
                if union:
                    ious.append(((mapped == c) & (target == c)).sum() / union)
            best = (acc, float(np.mean(ious)))
    return best


def test_evaluate_matches_brute_force():
    val = _fake_set()
    cfg = load_config(None, ["model.n_classes=3", "model.code_dim=5"])
    from depthg.models import build_segmenter

    torch.manual_seed(0)
    seg = build_segmenter(cfg.model, 8).eval()
    scores = quality.evaluate(seg, val, 3)
    with torch.no_grad():
        codes = torch.nn.functional.interpolate(seg.head(val.feats.float()), size=(8, 8), mode="bilinear",
                                                align_corners=False)
        pred = seg.cluster_probe.predict(codes).numpy().ravel()
        lin = seg.linear_probe(codes).argmax(1).numpy().ravel()
    target = val.labels.numpy().ravel()
    acc, miou = _brute_force_miou(pred, target, 3)
    assert scores["unsupervised"]["accuracy"] == pytest.approx(acc)
    assert scores["unsupervised"]["miou"] == pytest.approx(miou)
    keep = target >= 0
    assert scores["linear"]["accuracy"] == pytest.approx((lin[keep] == target[keep]).mean())


def test_training_is_seeded_and_moves_the_head():
    data = _fake_set()
    cfg = load_config(None, ["model.n_classes=3", "model.code_dim=5", "sampling.samples=3",
                             "sampling.min_samples=3", "loss.depth.mode=paper", "sampling.mode=fps"])
    seg_a, terms_a = quality.train_variant(cfg, data, steps=3, batch=4, seed=1)
    seg_b, terms_b = quality.train_variant(cfg, data, steps=3, batch=4, seed=1)
    seg_0, _ = quality.train_variant(cfg, data, steps=0, batch=4, seed=1)
    for pa, pb in zip(seg_a.parameters(), seg_b.parameters()):
        assert torch.equal(pa, pb)
    assert terms_a == terms_b and "depth" in terms_a
    moved = [not torch.equal(pa, p0) for pa, p0 in zip(seg_a.head.parameters(), seg_0.head.parameters())]
    assert all(moved)


def test_summarise_and_projection():
    runs = [{"unsupervised": {"accuracy": a, "miou": m}} for a, m in ((0.5, 0.2), (0.7, 0.4))]
    s = quality.summarise(runs)
    assert s["unsupervised_miou_mean"] == pytest.approx(0.3) and s["unsupervised_miou_std"] == pytest.approx(0.1)
    assert "linear_miou_mean" not in s
    feats = _fake_set(c=8).feats
    basis, kept = qd.fit_projection(feats, 8, torch.Generator().manual_seed(0), per_image=16)
    assert kept == pytest.approx(1.0, abs=1e-6)  # full rank: nothing lost
    assert torch.allclose(basis.T @ basis, torch.eye(8), atol=1e-5)
    proj = qd.project(feats, basis).float()
    # an orthonormal change of basis keeps every cosine correlation (up to float16 rounding)
    a = torch.nn.functional.normalize(feats.float().flatten(2), dim=1)
    b = torch.nn.functional.normalize(proj.flatten(2), dim=1)
    assert torch.allclose(a.transpose(1, 2) @ a, b.transpose(1, 2) @ b, atol=5e-3)


def test_reseed_dead_centroids_moves_only_dead_ones():
    from depthg.models.heads import ClusterProbe

    probe = ClusterProbe(code_dim=3, n_clusters=3)
    with torch.no_grad():
        probe.centroids.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-1.0, -1.0, -1.0]]))
    codes = torch.rand(2, 3, 4, 4) + 0.05  # all positive: centroid 2 never wins
    codes[:, 1] += 2 * (torch.arange(4) >= 2).float().view(1, 4, 1)  # half the pixels lean to centroid 1
    before = probe.centroids.detach().clone()
    assert quality.reseed_dead_centroids(probe, codes, torch.Generator().manual_seed(0)) == 1
    after = probe.centroids.detach()
    assert torch.equal(after[:2], before[:2])
    flat = codes.permute(0, 2, 3, 1).reshape(-1, 3)
    assert (flat == after[2]).all(dim=1).any()  # moved onto one of the code vectors
    assert quality.reseed_dead_centroids(probe, codes, torch.Generator().manual_seed(0)) == 0  # now alive


def test_split_holdout_keeps_images_together():
    data = _fake_set(n=10)
    data.ids = [f"img{i // 5}_c{i % 5}" for i in range(10)]  # two images x five crops
    fit, held = qd.split_holdout(data, 0.5, knn=2)
    assert fit.ids == [f"img0_c{k}" for k in range(5)] and held.ids == [f"img1_c{k}" for k in range(5)]
    assert torch.equal(held.feats, data.feats[5:]) and torch.equal(fit.depth, data.depth[:5])
    for sub in (fit, held):  # positives index into the subset, never the crop itself
        assert sub.nn.shape == (5, 2) and int(sub.nn.max()) < 5
        assert not (sub.nn == torch.arange(5)[:, None]).any()
