"""launch/segment.py and launch/evaluate.py end to end through main(), on a tiny checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cluster import evaluator, segmentation
from depthg import inference, shards
from depthg.checkpoint import save_segmenter
from depthg.config import Config
from launch import evaluate as evaluate_script
from launch import segment as segment_script


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = Config()
    cfg.model.backbone, cfg.model.weights = "tiny_vit", "random"
    cfg.model.code_dim, cfg.model.n_classes, cfg.model.extra_clusters = 16, 3, 1
    cfg.eval.resolution, cfg.eval.batch_size, cfg.eval.crf, cfg.eval.report_images = 32, 2, False, 2
    _, segmenter = evaluator.RandomModel("tiny_vit", "random", 16, 3, 1, seed=3)()
    url = str(tmp_path_factory.mktemp("run") / "segmenter.pt")
    save_segmenter(url, cfg, segmenter, {})
    return url


def _images(folder, n=3, sizes=((30, 40), (48, 36), (33, 33))):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(os.path.join(folder, f"img{i}.png"))
    return folder


def test_segment_folder_of_three_images_writes_six_files(checkpoint, tmp_path):
    src = _images(str(tmp_path / "in"))
    out = str(tmp_path / "out")
    manifest = segment_script.main(["--checkpoint", checkpoint, "--input", src, "--output", out, "--crf",
                                    "--batch-size", "2"])
    written = [f for r in segmentation.read_records(out) for e in r["images"] for f in e["files"].values()]
    assert manifest["images"] == manifest["inputs"] == 3 and len(written) == 6
    assert sorted(os.listdir(out)) == sorted(written + ["_units", "manifest.json"])
    label = np.array(Image.open(os.path.join(out, "img1.png_label.png")))  # the name keeps the extension
    assert label.shape == (48, 36) and label.max() < 4  # 4 clusters, at the input's own size
    overlay = np.array(Image.open(os.path.join(out, "img1.png_overlay.png")))
    assert overlay.shape == (48, 36, 3)


def test_an_output_inside_the_input_is_never_segmented_as_input(checkpoint, tmp_path):
    """A rerun (resume, or after adding images) used to list the first run's label maps and overlays as new images."""
    src = _images(str(tmp_path / "in"), n=2)
    out = os.path.join(src, "out")
    args = ["--checkpoint", checkpoint, "--input", src, "--output", out, "--batch-size", "2"]
    assert segment_script.main(args)["inputs"] == 2
    _images(src, n=3)  # one image added: the rerun lists 3 inputs, not 3 + the 4 files written
    manifest = segment_script.main(args)
    assert manifest["inputs"] == 3
    sources = [e["source"] for r in segmentation.read_records(out) for e in r["images"]]
    assert sorted(os.path.basename(s) for s in sources) == ["img0.png", "img1.png", "img2.png"]


def test_segment_labels_equal_library_prediction(checkpoint, tmp_path):
    src = _images(str(tmp_path / "in"), n=1)
    out = str(tmp_path / "out")
    segment_script.main(["--checkpoint", checkpoint, "--input", os.path.join(src, "*.png"), "--output", out,
                         "--no-crf", "--probe", "linear"])
    _, backbone, segmenter = segment_script.load_model(checkpoint)
    image = inference.read_image(os.path.join(src, "img0.png"))
    expect = inference.segment_images(backbone.eval(), segmenter.eval(), [image], 32, "linear", True, False)[0]
    np.testing.assert_array_equal(np.array(Image.open(os.path.join(out, "img0.png_label.png"))), expect)


def test_segment_bad_paths_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a folder nor a glob"):
        segment_script.main(["--checkpoint", "x.pt", "--input", str(tmp_path / "nope*.png"), "--output", "o"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        segment_script.main(["--checkpoint", "x.pt", "--input", str(tmp_path / "empty"), "--output", "o"])
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image .*bad.png"):
        inference.read_image(str(tmp_path / "bad.png"))


def test_segment_missing_checkpoint(tmp_path):
    src = _images(str(tmp_path / "in"), n=1)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        segment_script.main(["--checkpoint", str(tmp_path / "missing.pt"), "--input", src, "--output", "o"])


def test_evaluate_main_writes_report_beside_checkpoint(checkpoint, tmp_path):
    root = str(tmp_path / "shards")
    shards.write_test_shards(root, n_samples=3, size=(36, 40), with_positives=False, samples_per_shard=2,
                             split="val", n_classes=3)
    out = evaluate_script.main(["--checkpoint", checkpoint, "--shards", root, "--workers", "0",
                                "eval.crf=true"])
    folder = os.path.dirname(checkpoint)
    for name in ("eval.json", "eval.md", "confusion.png", "samples.png", "eval_config.yaml"):
        assert os.path.exists(os.path.join(folder, name)), name
    data = json.load(open(os.path.join(folder, "eval.json")))
    assert data["meta"]["backbone"] == "tiny_vit" and data["meta"]["depth source"] == "synthetic-test"
    assert data["images"] == 3 and set(data["scores"]) == {"cluster", "cluster_crf", "linear", "linear_crf"}
    assert len(data["scores"]["cluster"]["assignment"]) == 4
    assert out["scores"]["linear"]["accuracy"] == data["scores"]["linear"]["accuracy"]


def test_a_ray_evaluation_driver_never_imports_torch(checkpoint, tmp_path, ray_local):
    """launch/evaluate.py with Ray actors, as its own process: the checkpoint's config is read in a child process and
    k-means is fitted on an actor, so the driver never imports torch (its memory is the reduced results, not torch's
    ~600 MB); its report equals the in-process evaluation's."""
    root = str(tmp_path / "shards")
    shards.write_test_shards(root, n_samples=5, size=(36, 40), with_positives=False, samples_per_shard=2,
                             split="val", n_classes=3)
    common = ["--checkpoint", checkpoint, "--shards", root, "eval.kmeans=true"]
    evaluate_script.main([*common, "--workers", "0", "--output", str(tmp_path / "here")])
    code = ("import json, sys; from launch import evaluate; evaluate.main(sys.argv[1:]); "
            "print(json.dumps({'torch': 'torch' in sys.modules}))")
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    proc = subprocess.run([sys.executable, "-c", code, *common, "--workers", "1", "--output", str(tmp_path / "ray")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"torch": False}
    here, ray_run = (json.load(open(tmp_path / name / "eval.json")) for name in ("here", "ray"))
    assert set(here["scores"]) == {"cluster", "linear", "kmeans"} and here["images"] == ray_run["images"] == 5
    assert ray_run["scores"] == here["scores"] and ray_run["meta"]["workers"] == 1
