"""Smoke and unit tests of the quality benchmark (bench/quality.py), tiny sizes."""
from __future__ import annotations

import argparse
import itertools
import json

import numpy as np
import pytest
import torch

from bench import quality, quality_data as qd, quality_diag, quality_train as qt
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
    # the recipe is the demo config's (what `python launch/train.py` runs), not the benchmark's own
    demo = load_config("configs/demo.yaml")
    assert syn["setup"]["config"] == "configs/demo.yaml" and syn["setup"]["raw_dim"] == 704
    assert syn["setup"]["recipe"]["loss"]["shift_mode"] == demo.loss.shift_mode == "quantile"
    assert syn["setup"]["recipe"]["lr"] == demo.train.lr and syn["setup"]["recipe"]["finish"] == "fit"
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
    assert quality_diag.reseed_dead_centroids(probe, codes, torch.Generator().manual_seed(0)) == 1
    after = probe.centroids.detach()
    assert torch.equal(after[:2], before[:2])
    flat = codes.permute(0, 2, 3, 1).reshape(-1, 3)
    assert (flat == after[2]).all(dim=1).any()  # moved onto one of the code vectors
    assert quality_diag.reseed_dead_centroids(probe, codes, torch.Generator().manual_seed(0)) == 0  # now alive


def test_split_holdout_keeps_images_together():
    data = _fake_set(n=10)
    data.ids = [f"img{i // 5}_c{i % 5}" for i in range(10)]  # two images x five crops
    fit, held = qd.split_holdout(data, 0.5, knn=2)
    assert fit.ids == [f"img0_c{k}" for k in range(5)] and held.ids == [f"img1_c{k}" for k in range(5)]
    assert torch.equal(held.feats, data.feats[5:]) and torch.equal(fit.depth, data.depth[:5])
    for sub in (fit, held):  # positives index into the subset, never the crop itself
        assert sub.nn.shape == (5, 2) and int(sub.nn.max()) < 5
        assert not (sub.nn == torch.arange(5)[:, None]).any()


def test_paired_interval_and_headline():
    p = qt.paired([3.0, 4.0, 5.0], [1.0, 1.0, 1.0])
    assert p["mean"] == pytest.approx(3.0) and p["ci95"][0] < 3.0 < p["ci95"][1]
    assert p["ci95"][0] == pytest.approx(3.0 - 4.302653 * 1.0 / np.sqrt(3), rel=1e-5)  # t(0.975, 2) * sd / sqrt(n)
    run = lambda m, lin=0.5: {"unsupervised": {"miou": m, "accuracy": m}, "linear": {"miou": lin, "accuracy": lin}}
    syn = {"kmeans_raw": {"fit_train": qt.summarise([run(0.30), run(0.32)])},
           "variants": {"stego": qt.summarise([run(0.30, 0.40), run(0.34, 0.41)]),
                        "depthg": qt.summarise([run(0.35), run(0.37)]),
                        "fps_only": qt.summarise([run(0.33, 0.45), run(0.35, 0.47)])}}
    hl = quality.headline({"datasets": {"synthetic": syn}})
    assert hl["synthetic_depthg_minus_stego_miou"] == pytest.approx(4.0)
    assert hl["synthetic_head_minus_kmeans_miou"] == pytest.approx(1.0) and hl["synthetic_head_target_met"]
    assert hl["synthetic_depthg_minus_kmeans_miou"] == pytest.approx(5.0)
    assert hl["synthetic_fps_linear_gain_miou"] == pytest.approx(5.5)
    low, high = hl["synthetic_depthg_minus_stego_ci95"]
    assert low < 4.0 < high and hl["synthetic_depthg_target_met"] == (low > 0)
    assert "camvid_head_minus_kmeans_miou" not in hl


def test_code_stats_sees_a_collapse():
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(8, 16, 4, 4, generator=g)
    collapsed = torch.randn(8, 1, 1, 1, generator=g).sign() * torch.ones(8, 16, 4, 4) + 0.01 * spread
    assert qt.code_stats(spread)["eff_rank"] > 8 and qt.code_stats(collapsed)["eff_rank"] < 2
    assert abs(qt.code_stats(spread)["mean_cos"]) < 0.2
    same_way = torch.ones(8, 16, 4, 4) + 0.01 * spread  # all codes one direction, tiny isotropic noise
    assert qt.code_stats(same_way)["mean_cos"] > 0.99 and qt.code_stats(same_way)["eff_rank"] < 1.1


def test_quick_diag_and_supervised_control(tmp_path):
    parser = argparse.ArgumentParser()
    quality_diag.add_arguments(parser)
    args = parser.parse_args(["--quick", "--dataset", "synthetic", "--controls", "baseline,supervised,untrained,new_baseline"])
    result = quality_diag.run(args)
    json.dumps(result)
    assert set(result["controls"]) == {"baseline", "supervised", "untrained", "new_baseline"}
    assert {"raw704", "raw704_l2", "kmeans_raw_fit_train"} <= set(result["references"])
    for s in result["controls"].values():
        assert 0.0 <= s["linear_fresh_miou_mean"] <= 1.0 and s["eff_rank_mean"] >= 1.0
    with pytest.raises(ValueError, match="unknown"):
        quality_diag.run(parser.parse_args(["--quick", "--controls", "nope"]))


def test_cached_step_equals_the_trainers_step_on_the_same_batch(tmp_path):
    """The benchmark's cached path (features cached once from the source, ``quality_train.cached_step``) and the
    trainer's step on shards (``compute_losses``: decode, resize, backbone) give the same losses on the same
    crops, positives, generator state and config (the demo recipe: quantile shifts, FPS, the paper depth term)."""
    from depthg import shards, streaming
    from depthg.data import SyntheticSource, five_crop, transform_record
    from depthg.models import build_backbone, build_segmenter
    from depthg.step import compute_losses

    res, src = 64, SyntheticSource(2, 60, 80, 0, "train")
    crops = [transform_record(c, res) for id_ in src.ids() for c in five_crop(src.load(id_), 0.5)]
    nxt = [(i + 1) % len(crops) for i in range(len(crops))]  # each crop's one positive: the next crop
    folder = shards.split_dir(str(tmp_path), "train", "train")
    samples = [shards.encode_sample(f"c{i}", c.image, c.depth, c.label, {"positives": [j]}, shards.LOSSLESS)
               for i, (c, j) in enumerate(zip(crops, nxt))]
    info = shards.put_shard(folder, shards.shard_name(0), samples)
    shards.write_index(folder, [info])
    shards.write_manifest(folder, {"kind": "train", "split": "train", "shards": [{"name": shards.shard_name(0),
                                   "count": len(samples)}], "n_classes": src.n_classes, "num_positives": 1,
                                   "index": shards.INDEX, "resolution": res})
    torch.manual_seed(0)
    backbone = build_backbone("tiny_vit").eval()
    data = qd.build_set(src, backbone, res=res, crop=True)
    data.nn = torch.tensor(nxt)[:, None]
    cfg = load_config("configs/demo.yaml", [f"model.n_classes={src.n_classes}", "sampling.samples=4"])
    seg = build_segmenter(cfg.model, data.feats.shape[1], False)
    spec, _ = streaming.open_split(str(tmp_path), "train", micro_batch=4, resolution=res, shuffle_buffer=0)
    batch = next(iter(streaming.eval_batches(spec)))
    idx = torch.tensor([int(i[1:]) for i in batch["id"]])
    assert torch.equal(batch["label"], data.labels[idx])  # the same crops, resized the same way
    stream = compute_losses(backbone, seg, batch, cfg, 3, torch.Generator().manual_seed(5))
    cached = qt.cached_step(seg, data, idx, data.nn[idx, 0], cfg, 3, torch.Generator().manual_seed(5))
    for key in ("self", "knn", "neg", "depth", "stego", "head", "cluster_probe", "linear_probe", "total"):
        assert float(cached[key].detach()) == pytest.approx(float(stream[key].detach()), rel=2e-3, abs=2e-4), key
    assert (cached["lambda"], cached["b_depth"], cached["S"]) == (stream["lambda"], stream["b_depth"], stream["S"])
