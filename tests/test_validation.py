"""Validation at any world size: 3 real ranks (gloo), 10 val samples, micro batch 4. Each rank reads its
slice once with a partial last batch, the int64 confusions are summed over ranks, and the result equals a
single process's: every val sample counted exactly once. Plus the checkpoint choices of ``train.select``."""
from __future__ import annotations

import json
import multiprocessing
import os

import pytest
import torch

from cluster import distributed, validation
from depthg import shards
from depthg.config import load_config
from depthg.world import World

TINY = ["model.backbone=tiny_vit", "data.resolution=32", "model.code_dim=8", "sampling.samples=3",
        "sampling.min_samples=2", "loss.neg_rounds=2", "train.micro_batch_per_gpu=4", "model.n_classes=3"]


def _cfg(root: str, *extra: str):
    return load_config(None, [f"shards.root={root}", *TINY, *extra])


def _sums(cfg, world: World) -> tuple[list, list]:
    from cluster.engine import build_models

    backbone, segmenter = build_models(cfg, torch.device("cpu"))  # seeded: the same weights on every rank
    conf, sums = validation.val_sums(backbone, segmenter.eval(), cfg, world)
    return conf.tolist(), sums.tolist()


def _rank(rank: int, world_size: int, root: str, port: int, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world_size)
    world = World(rank=rank, world_size=world_size)
    conf, sums = _sums(_cfg(root), world)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump({"conf": conf, "sums": sums}, fh)
    distributed.shutdown(world)  # as the trainer ends (no gloo thread left for interpreter exit)


@pytest.mark.slow
def test_three_ranks_count_each_of_ten_val_samples_once(tmp_path):
    root = str(tmp_path / "shards")
    shards.write_test_shards(root, 10, size=(32, 32), num_positives=2, samples_per_shard=4, split="val")
    ctx, port = multiprocessing.get_context("spawn"), distributed.free_port()
    procs = [ctx.Process(target=_rank, args=(r, 3, root, port, str(tmp_path))) for r in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    single_conf, single_sums = _sums(_cfg(root), World())
    labelled = sum(int((shards.decode_sample(raw)["label"] >= 0).sum())
                   for url in shards.shard_urls(root, "val") for raw in shards.iter_shard(url))
    for r in results:
        assert r["sums"][2] == single_sums[2] == 10  # samples: each once
        assert r["conf"] == single_conf  # int64 sums over ranks equal one process over the whole split
    assert sum(map(sum, single_conf)) == labelled  # every labelled pixel of the 10 samples, once


def test_select_criteria_and_the_kept_file_says_whether_labels_were_used(tmp_path):
    from cluster.engine import build_models
    from depthg.checkpoint import load_segmenter

    assert validation.improved("label_free", {"val/stego": 0.2}, {}) and validation.improved("val_miou", {"val/miou": 0.1}, {})
    assert validation.improved("label_free", {"val/stego": 0.2}, {"val/stego": 0.3})
    assert not validation.improved("label_free", {"val/stego": 0.3}, {"val/stego": 0.2})
    assert validation.improved("val_miou", {"val/miou": 0.3}, {"val/miou": 0.2})
    assert not validation.improved("val_miou", {"val/miou": 0.2}, {"val/miou": 0.2})
    for select, labels in (("label_free", False), ("val_miou", True)):
        cfg = _cfg(str(tmp_path), f"train.output={tmp_path / select}", f"train.select={select}")
        _, segmenter = build_models(cfg, torch.device("cpu"))
        validation.keep_best(cfg, segmenter, {"val/miou": 0.4, "val/stego": 0.1}, 7)
        extra = load_segmenter(str(tmp_path / select / "segmenter_best.pt"))[2]
        assert extra["batch"] == 7 and extra["select"] == select and extra["uses_labels"] is labels


@pytest.mark.slow
def test_training_with_select_val_miou_keeps_the_labelled_pick(tmp_path):
    """A real run (one process): validation every batch, ``segmenter.pt`` is the pick and says it used labels."""
    from depthg.checkpoint import load_segmenter
    from launch import train as launch_train

    root, out = str(tmp_path / "shards"), str(tmp_path / "run")
    shards.write_test_shards(root, 12, size=(32, 32), num_positives=2, samples_per_shard=3)
    shards.write_test_shards(root, 5, size=(32, 32), num_positives=2, samples_per_shard=2, split="val")
    launch_train.main(["--launcher", "env", "--config", "none", f"shards.root={root}", f"train.output={out}", *TINY,
                       "train.micro_batch_per_gpu=2", "train.loader_workers=0", "train.num_batches=3",
                       "train.val_every=1", "train.select=val_miou", "train.log_every=1"])
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    val = [r for r in rows if "val/miou" in r]
    assert len(val) == 3 and all(r["val/samples"] == 5 for r in val)
    extra = load_segmenter(os.path.join(out, "segmenter.pt"))[2]
    assert extra["select"] == "val_miou" and extra["uses_labels"] is True
    assert extra["val/miou"] == max(r["val/miou"] for r in val)
    assert load_segmenter(os.path.join(out, "segmenter_last.pt"))[2]["select"] == "none"
    # train.finish=fit refits the probes of the pick (not of the last state); segmenter_best.pt keeps its own
    _, best, best_extra = load_segmenter(os.path.join(out, "segmenter_best.pt"))
    chosen = load_segmenter(os.path.join(out, "segmenter.pt"))[1]
    assert extra["finish/crops"] == 12 and "finish/crops" not in best_extra
    assert all(torch.equal(v, chosen.head.state_dict()[k]) for k, v in best.head.state_dict().items())
    assert not torch.equal(best.cluster_probe.centroids, chosen.cluster_probe.centroids)
    from launch import evaluate  # the evaluation report says so too

    result = evaluate.main(["--checkpoint", os.path.join(out, "segmenter.pt"), "--workers", "0", "--shards", root,
                            "eval.crf=false", "eval.resolution=32", "eval.batch_size=4"])
    assert "USES THE VALIDATION LABELS" in result["meta"]["checkpoint selection"]
    assert "USES THE VALIDATION LABELS" in open(result["paths"]["eval.md"]).read()
