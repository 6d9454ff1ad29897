"""Bad inputs at the job level: each gives a clear error naming the file or key and what was
expected, and no partial output is left that looks complete (no manifest, no shard without its
sidecar, no run folder for a config that was rejected).

The readers' own messages are unit-tested in test_data.py / test_config.py; here the same faults
go through the jobs that users run (the depth worker of stage 1, the launchers, training set-up).
The depth worker runs in-process (the same class Ray wraps as an actor) to keep these fast.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from cluster import depthgen
from depthg import shards
from depthg.config import ConfigError, load_config, to_dict
from depthg.data.base import SourceError

TINY = ["data.dataset=folder", "model.n_classes=3", "shards.samples_per_shard=8", "model.backbone=tiny_vit",
        "data.resolution=32", "data.five_crop=false"]


def _folder_dataset(root: str, n: int = 4) -> str:
    """``root/images/im{i}.png`` 16x20 RGB, ``depth/im{i}.npy`` in [0,1], ``labels/im{i}.png`` ids 0..2."""
    rng = np.random.default_rng(0)
    for sub in ("images", "depth", "labels"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)).save(f"{root}/images/im{i}.png")
        np.save(f"{root}/depth/im{i}.npy", rng.random((16, 20), dtype=np.float32))
        Image.fromarray(rng.integers(0, 3, (16, 20), dtype=np.uint8)).save(f"{root}/labels/im{i}.png")
    with open(os.path.join(root, "classes.txt"), "w") as fh:
        fh.write("a\nb\nc\n")
    return root


def _worker(data_root: str, out_root: str, *extra: str):
    cfg = load_config(None, TINY + [f"data.root={data_root}", f"shards.root={out_root}", *extra])
    folder = shards.split_dir(cfg.shards.root, "val", "depth")
    return depthgen.DepthWorker(to_dict(cfg)), folder


def _files(folder: str) -> list[str]:
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def _run_unit(worker, folder, ids):
    return worker.run_unit("val", 0, ids, folder)


IDS = ["im0", "im1", "im2", "im3"]


def test_corrupt_image_is_skipped_and_listed_or_fatal_with_strict(tmp_path):
    data = _folder_dataset(str(tmp_path / "data"))
    with open(f"{data}/images/im2.png", "wb") as fh:
        fh.write(b"\x89PNG truncated")
    worker, folder = _worker(data, str(tmp_path / "out"))
    info = _run_unit(worker, folder, IDS)
    assert info["ids"] == ["im0", "im1", "im3"] and info["count"] == 3
    assert [s["id"] for s in info["skipped"]] == ["im2"] and "images/im2.png" in info["skipped"][0]["error"]
    assert shards.read_sidecar(folder, "shard-000000.tar")["skipped"] == info["skipped"]

    strict, sfolder = _worker(data, str(tmp_path / "strict"), "shards.strict=true")
    with pytest.raises(SourceError, match=r"'im2'.*images/im2\.png.*shards\.strict=false"):
        _run_unit(strict, sfolder, IDS)
    assert _files(sfolder) == []  # nothing written: no shard, no sidecar, no manifest


def test_missing_depth_names_the_image_and_the_expected_files(tmp_path):
    data = _folder_dataset(str(tmp_path / "data"))
    os.remove(f"{data}/depth/im1.npy")
    worker, folder = _worker(data, str(tmp_path / "out"), "depthgen.source=dataset")
    info = _run_unit(worker, folder, IDS)
    assert [s["id"] for s in info["skipped"]] == ["im1"]
    err = info["skipped"][0]["error"]
    assert "missing depth for image" in err and "images/im1.png" in err and "depth/im1.npy" in err
    strict, sfolder = _worker(data, str(tmp_path / "strict"), "shards.strict=true")
    with pytest.raises(SourceError, match=r"im1.*expected .*depth/im1\.png or .*depth/im1\.npy"):
        _run_unit(strict, sfolder, IDS)
    assert _files(sfolder) == []


def test_label_ids_out_of_range_name_the_label_file(tmp_path):
    data = _folder_dataset(str(tmp_path / "data"))
    Image.fromarray(np.full((16, 20), 7, np.uint8)).save(f"{data}/labels/im3.png")
    strict, folder = _worker(data, str(tmp_path / "strict"), "shards.strict=true")
    with pytest.raises(SourceError, match=r"labels/im3\.png: label ids \[7\] out of range for 3 classes \(expected 0\.\.2"):
        _run_unit(strict, folder, IDS)
    assert _files(folder) == []
    worker, folder = _worker(data, str(tmp_path / "out"))
    info = _run_unit(worker, folder, IDS)
    assert [s["id"] for s in info["skipped"]] == ["im3"] and info["count"] == 3


def test_empty_dataset_fails_before_any_output(tmp_path, ray_local):
    from launch import generate_depth

    data = str(tmp_path / "data")
    os.makedirs(f"{data}/images")
    out = str(tmp_path / "out")
    with pytest.raises(SourceError, match=r"no images found in .*images"):
        generate_depth.main(["--config", "none", "--quiet", "--skip-mining", "--splits", "val", *TINY,
                             f"data.root={data}", f"shards.root={out}"])
    assert not os.path.exists(os.path.join(out, "depth"))  # no split folder, no manifest
    # an empty shard split reaching training: the error says how to fix it
    from depthg import streaming

    shards.write_manifest(shards.split_dir(str(tmp_path / "empty"), "train", "train"),
                          {"kind": "train", "split": "train", "shards": []})
    spec, _ = streaming.open_split(str(tmp_path / "empty"), "train", micro_batch=2)
    with pytest.raises(ValueError, match=r"0 samples cannot fill one optimizer step.*train\.micro_batch_per_gpu"):
        spec.steps_per_epoch


@pytest.mark.parametrize("override,pattern", [
    ("train.lr_max=1", r"unknown config key 'train\.lr_max' in train; valid keys: .*micro_batch_per_gpu"),
    ("trian.lr=1", r"unknown config key 'trian' in the top level; valid keys: data, shards"),
    ("train.micro_batch_per_gpu=eight", r"'train\.micro_batch_per_gpu': expected an integer, got 'eight'"),
    ("train.lr=fast", r"'train\.lr': expected a number, got 'fast'"),
    ("data.five_crop=maybe", r"'data\.five_crop': expected true/false, got 'maybe'"),
    ("model.backbone=resnet", r"'model\.backbone': 'resnet' is not one of dino_vits8"),
])
def test_bad_config_is_rejected_by_the_launcher_before_any_output(tmp_path, override, pattern):
    from launch import train as launch_train

    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=pattern):
        launch_train.main(["--launcher", "env", "--config", "none", f"train.output={out}",
                           f"shards.root={tmp_path}/none", override])
    assert not out.exists()


def test_unknown_key_in_a_yaml_file_names_it(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  micro_batch_per_gpu: 4\nloss:\n  depth:\n    wieght: 0.2\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'loss\.depth\.wieght'.*valid keys: mode, weight"):
        load_config(str(path))


def test_missing_weights_file_fails_before_any_shard(tmp_path, ray_local):
    from depthg.models import build_backbone
    from launch import generate_depth

    missing = str(tmp_path / "weights" / "dino.pth")
    with pytest.raises(FileNotFoundError, match=r"backbone weights file not found: .*weights/dino\.pth"):
        build_backbone("tiny_vit", missing)
    out = str(tmp_path / "out")
    with pytest.raises(SystemExit, match=r"model\.weights='.*dino\.pth'.*backbone weights file not found"):
        generate_depth.main(["--config", "none", "--quiet", "data.dataset=synthetic", "data.num_val=2",
                             "model.backbone=tiny_vit", f"model.weights={missing}", f"shards.root={out}"])
    assert not os.path.exists(out)


def test_missing_shards_name_the_manifest_and_the_fix(tmp_path):
    from cluster import trainer

    cfg = load_config(None, [f"shards.root={tmp_path}/nowhere", "model.backbone=tiny_vit"])
    with pytest.raises(FileNotFoundError, match=r"no shard manifest at .*nowhere/train/manifest\.json: run generate_depth"):
        trainer.prepare(cfg, trainer.World())
