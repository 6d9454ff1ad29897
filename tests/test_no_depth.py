"""Datasets without depth (``depthgen.source=none``): shards without depth maps, the STEGO baseline trained
through the product, and every setting that reads depth refused with its name before work starts."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from depthg import io, shards, streaming
from depthg.config import ConfigError, load_config
from depthg.models import build_segmenter
from depthg.step import losses_from_features

STEGO = ["depthgen.source=none", "loss.depth.mode=none", "sampling.mode=random"]


@pytest.mark.parametrize("setting", ["loss.depth.mode=paper", "sampling.mode=fps", "sampling.mode=fps_reference",
                                     "loss.lhp.enabled=true"])
def test_settings_that_read_depth_are_refused_by_name(setting):
    key = setting.split("=")[0]
    overrides = [o for o in STEGO if not o.startswith(key)] + [setting]
    with pytest.raises(ConfigError, match=rf"depthgen.source=none has no depth maps, but .*{setting}"):
        load_config(None, overrides)
    load_config(None, STEGO)  # the STEGO baseline needs no depth


def test_sample_without_depth_round_trips_and_streams_without_depth_keys():
    image = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    label = np.random.default_rng(1).integers(-1, 3, (40, 48))
    raw = shards.encode_sample("a", image, None, label, {"positives": [0]}, shards.TRAIN_DEFAULT)
    assert not any(k.startswith("depth") for k in raw)
    sample = shards.decode_sample(raw)
    assert sample["depth"] is None
    sample["pos_image"], sample["pos_depth"] = sample["image"], None
    tensors = streaming.to_tensors(sample, 32)
    assert "depth" not in tensors and "pos_depth" not in tensors and tensors["label"].shape == (32, 32)
    assert streaming.required_members({"depth_source": "none"}) == ("rgb",)
    assert streaming.required_members({"depth_source": "dataset"}) == ("rgb", "depth")


def _step(cfg, depth, pos_depth):
    torch.manual_seed(0)
    seg = build_segmenter(cfg.model, 16, False)
    gen = torch.Generator().manual_seed(5)
    feats = torch.randn(4, 16, 6, 6, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(-1, 3, (4, 24, 24), generator=torch.Generator().manual_seed(2))
    return losses_from_features(seg, feats, feats.flip(0), depth, pos_depth, labels, cfg, 0, gen)


def test_stego_step_without_depth_equals_the_step_with_depth():
    cfg = load_config(None, STEGO + ["sampling.samples=3", "model.code_dim=8", "loss.neg_rounds=2", "model.n_classes=3"])
    depth = torch.rand(4, 1, 24, 24, generator=torch.Generator().manual_seed(3))
    with_depth, without = _step(cfg, depth, depth.flip(0)), _step(cfg, None, None)
    for key in ("self", "knn", "neg", "stego", "total"):
        assert float(with_depth[key].detach()) == float(without[key].detach()), key
    fps = load_config(None, ["sampling.samples=3", "model.code_dim=8", "loss.depth.mode=none", "model.n_classes=3"])
    with pytest.raises(ConfigError, match="this batch .* sampling.mode=fps"):
        _step(fps, None, None)


def _tiny_camvid(root: str, n: int = 6) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        lines = []
        for i in range(n if split == "train" else 3):
            os.makedirs(f"{root}/{split}", exist_ok=True)
            os.makedirs(f"{root}/{split}annot", exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(f"{root}/{split}/f{i}.png")
            Image.fromarray(rng.integers(0, 11, (48, 64), dtype=np.uint8)).save(f"{root}/{split}annot/f{i}.png")
            lines.append(f"{split}/f{i}.png {split}annot/f{i}.png")
        with open(f"{root}/{split}.txt", "w") as fh:
            fh.write("\n".join(lines) + "\n")


@pytest.mark.slow
def test_stego_baseline_on_a_dataset_without_depth_through_the_product(tmp_path, ray_local):
    from launch import generate_depth
    from launch import train as launch_train

    data, root, out = str(tmp_path / "camvid"), str(tmp_path / "shards"), str(tmp_path / "run")
    _tiny_camvid(data)
    common = ["--config", "configs/smoke.yaml", "data.dataset=camvid", f"data.root={data}", f"shards.root={root}",
              *STEGO]
    generate_depth.main([*common, "--quiet"])
    manifest = shards.read_manifest(shards.split_dir(root, "train", "train"))
    assert manifest["depth_source"] == "none" and manifest["total"] == 30
    first = next(shards.iter_shard(io.join(shards.split_dir(root, "train", "train"), manifest["shards"][0]["name"])))
    assert "rgb.jpg" in first and not any("depth" in k or k.startswith("pos") for k in first)
    spec, _ = streaming.open_split(root, "train", micro_batch=2, resolution=32, num_steps=1)
    batch = next(iter(streaming.make_loader(spec, 0)))  # positives by reference without depth
    assert "pos_depth" not in batch and batch["pos_image"].shape == (2, 3, 32, 32) and batch["pos_id"] != batch["id"]
    launch_train.main(["--launcher", "env", *common, f"train.output={out}", "train.num_batches=2"])
    rows = [json.loads(r) for r in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["batch"] for r in rows] == [0, 1] and all(np.isfinite(r["total"]) for r in rows)
    assert "depth" not in rows[-1] and os.path.isfile(os.path.join(out, "segmenter.pt"))
    with pytest.raises(ConfigError, match=r"written with depthgen.source=none.*sampling.mode=fps"):
        launch_train.main(["--launcher", "env", "--config", "configs/smoke.yaml", "data.dataset=camvid",
                           f"data.root={data}", f"shards.root={root}", "loss.depth.mode=none",
                           f"train.output={tmp_path / 'refused'}"])
    assert not os.path.exists(tmp_path / "refused")
