"""Evaluation: the per-batch math against direct formulas, and Ray workers == one process."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cluster import evaluator
from depthg import evaluation, metrics, shards
from depthg.config import Config
from depthg.data.transforms import resize_center_crop

pytest.importorskip("pydensecrf.densecrf")


def _cfg(**eval_kw) -> Config:
    cfg = Config()
    cfg.model.n_classes, cfg.model.extra_clusters = 3, 2  # over-clustering: 5 clusters for 3 classes
    cfg.eval.resolution, cfg.eval.batch_size, cfg.eval.report_images = 32, 2, 3
    for k, v in eval_kw.items():
        setattr(cfg.eval, k, v)
    return cfg


@pytest.fixture(scope="module")
def val_shards(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shards"))
    shards.write_test_shards(root, n_samples=7, size=(40, 48), with_positives=False, samples_per_shard=2,
                             split="val", n_classes=3, seed=1)
    return root, evaluator.shard_list(root, "val")


def test_evaluate_batch_matches_direct_computation():
    backbone, segmenter = evaluator.RandomModel("tiny_vit", "random", 16, 3, 2)()
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 32, 32, generator=gen)
    labels = torch.randint(-1, 3, (2, 32, 32), generator=gen)
    opts = evaluation.EvalOptions(n_classes=3, flip=True)
    confs, preds = evaluation.evaluate_batch(backbone, segmenter, images, labels, opts)
    with torch.no_grad():
        c1 = segmenter.head(backbone(images))
        c2 = segmenter.head(backbone(images.flip(3))).flip(3)
        up = F.interpolate((c1 + c2) / 2, size=(32, 32), mode="bilinear", align_corners=False)
        cluster = segmenter.cluster_probe(up).argmax(1)
        linear = segmenter.linear_probe(up).argmax(1)
    assert torch.equal(preds["cluster"], cluster) and torch.equal(preds["linear"], linear)
    np.testing.assert_array_equal(confs["cluster"], metrics.confusion(cluster, labels, 5, 3))
    np.testing.assert_array_equal(confs["linear"], metrics.confusion(linear, labels, 3, 3))
    assert confs["cluster"].shape == (5, 3) and confs["cluster"].sum() == (labels >= 0).sum()


def test_fit_kmeans_recovers_separated_clusters():
    gen = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(4, 8, generator=gen), dim=1) * 5
    truth = torch.arange(200) % 4
    x = centres[truth] + 0.1 * torch.randn(200, 8, generator=gen)
    cent = evaluation.fit_kmeans(x, 4, seed=0)
    pred = evaluation.kmeans_assign(x.T.reshape(1, 8, 200, 1), cent).reshape(-1)
    assert metrics.hungarian_scores(metrics.confusion(pred, truth, 4, 4))["accuracy"] == 1.0


def _expected_pixels(urls, size):
    total = 0
    for url in urls:
        for raw in shards.iter_shard(url):
            total += int((resize_center_crop(shards.decode_sample(raw)["label"], size) >= 0).sum())
    return total


def test_single_process_counts_every_pixel_with_over_clustering(val_shards):
    _, urls = val_shards
    cfg = _cfg(crf=True, kmeans=True)
    out = evaluator.evaluate(cfg, evaluator.RandomModel("tiny_vit", "random", 16, 3, 2), urls, workers=0)
    assert out["images"] == 7
    expected = _expected_pixels(urls, 32)
    assert set(out["confusion"]) == {"cluster", "cluster_crf", "linear", "linear_crf", "kmeans"}
    for name, conf in out["confusion"].items():
        assert conf.dtype == np.int64 and conf.sum() == expected, name
        assert out["scores"][name]["pixels"] == expected  # over-clustering: no pixel dropped
    assert out["confusion"]["cluster"].shape == (5, 3) and out["confusion"]["kmeans"].shape == (5, 3)
    assert [s["id"] for s in out["samples"]] == ["val-00000", "val-00001", "val-00002"]


def test_ray_two_workers_equal_single_process(val_shards, ray_local):
    _, urls = val_shards
    cfg = _cfg(crf=True, kmeans=True)
    model = evaluator.RandomModel("tiny_vit", "random", 16, 3, 2)
    single = evaluator.evaluate(cfg, model, urls, workers=0)
    dist = evaluator.evaluate(cfg, model, urls, workers=2)
    assert dist["images"] == single["images"] == 7
    assert dist["workers"] == 2 and single["workers"] == 0 and len(dist["shard_seconds"]) == len(urls)
    for name, conf in single["confusion"].items():
        np.testing.assert_array_equal(dist["confusion"][name], conf, err_msg=name)
        assert dist["scores"][name] == single["scores"][name]
    assert (single["confusion"]["cluster"].sum(axis=1) > 0).sum() >= 2  # a non-trivial prediction
    assert [s["id"] for s in dist["samples"]] == [s["id"] for s in single["samples"]]


def test_eval_actors_hold_a_gpu_and_no_cpu_so_crf_tasks_can_run():
    cfg = _cfg(crf=True)
    group = evaluator.eval_group(cfg, {"crf": True}, evaluator.RandomModel("tiny_vit"), 0, 4)
    assert group.init_kwargs == {"crf_tasks": True} and group.device == "auto"
    assert group.options_fn("cuda", {"num_gpus": 1, "num_cpus": 12}) == {"num_gpus": 1, "num_cpus": 0}
    assert group.options_fn("cpu", {"num_gpus": 0, "num_cpus": 1}) == {}  # Ray's default: placed on a free CPU, holds none
    assert cfg.eval.num_workers == 0  # one actor per GPU by default


def test_shard_list_names_what_it_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        evaluator.shard_list(str(tmp_path), "val")


def test_code_sample_is_bounded_seeded_and_independent_of_arrival_order():
    rng = np.random.default_rng(0)
    parts = [rng.random((n, 4), dtype=np.float32) for n in (5, 0, 7, 3, 6)]
    small = metrics.CodeSample(100, seed=3)
    for i in (4, 2, 0, 3, 1):
        small.add(i, parts[i])
    np.testing.assert_array_equal(small.codes(), np.concatenate(parts))  # all of them, in shard order
    a, b = metrics.CodeSample(8, seed=3), metrics.CodeSample(8, seed=3)
    for i in range(5):
        a.add(i, parts[i])
    for i in (3, 0, 4, 2, 1):
        b.add(i, parts[i])
    assert len(a) == 8 and np.array_equal(a.codes(), b.codes())
    every = np.concatenate(parts)
    keys = np.concatenate([np.random.default_rng([3, i]).random(len(p)) for i, p in enumerate(parts)])
    np.testing.assert_array_equal(a.codes(), every[np.sort(np.argsort(keys)[:8])])  # the 8 smallest keys
    c = metrics.CodeSample(8, seed=4)
    for i in range(5):
        c.add(i, parts[i])
    assert not np.array_equal(a.codes(), c.codes())  # the seed picks the sample


def test_results_are_reduced_as_they_arrive_keeping_the_samples_shown():
    def result(shard, ids):
        conf = np.full((5, 3), shard, np.int64)
        return {"confusion": {"cluster": conf}, "images": len(ids), "seconds": 1.0, "cpu_seconds": 0.5, "node": "n",
                "samples": [{"id": i} for i in ids[:2]]}

    results = [result(0, ["c", "d"]), result(1, ["a", "e"]), {"confusion": {}, "images": 0}, result(2, ["b"])]
    totals = evaluator.EvalTotals(report_images=2)
    for r in reversed(results):
        totals.add(r)
    out = totals.result()
    assert out["confusion"]["cluster"].dtype == np.int64 and (out["confusion"]["cluster"] == 3).all()
    assert out["images"] == 5 and [s["id"] for s in out["samples"]] == ["a", "b"] and len(totals.samples) == 2
    assert evaluator.sum_results(results, 2)["samples"] == out["samples"]
    with pytest.raises(ValueError, match="saw no images"):
        evaluator.EvalTotals(2).result()
