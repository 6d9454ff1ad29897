"""Report: Markdown table, JSON, confusion PNG and qualitative grid drawn from known inputs."""
from __future__ import annotations

import io as pyio
import json

import numpy as np
from PIL import Image

from depthg import io, metrics, report


def _result():
    rng = np.random.default_rng(0)
    label = rng.integers(-1, 3, size=(8, 8))
    pred = np.where(label < 0, 4, (label + 1) % 3)  # cluster k+1 is class k; cluster 4 extra
    conf = metrics.confusion(pred, label, 5, 3)
    lin = metrics.confusion(np.clip(label, 0, None), label, 3, 3)
    confusion = {"cluster": conf, "cluster_crf": conf, "linear": lin, "linear_crf": lin}
    image = rng.integers(0, 255, size=(8, 8, 3), dtype=np.uint8)
    samples = [{"id": "a", "image": image, "depth": np.full((8, 8), 128, np.uint8), "label": label, "pred": pred},
               {"id": "b", "image": image, "depth": None, "label": label, "pred": pred}]
    return {"confusion": confusion, "scores": metrics.score_confusions(confusion), "samples": samples, "images": 2}


def test_markdown_lists_every_head_with_percentages():
    result = _result()
    text = report.markdown(result["scores"], {"backbone": "tiny_vit", "depth source": "zoe"}, ["a", "b", "c"])
    assert "- backbone: tiny_vit" in text and "- depth source: zoe" in text
    assert "| cluster + CRF | 100.0 | 100.0 |" in text
    assert "| linear probe | 100.0 | 100.0 |" in text
    assert "k-means" not in text  # not evaluated, not reported


def test_write_report_files_and_pixels(tmp_path):
    result = _result()
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    paths = report.write_report(str(tmp_path), result, {"backbone": "x"}, ["a", "b", "c"], palette)
    data = json.loads(open(paths["eval.json"]).read())
    assert data["scores"]["cluster"]["assignment"][:3] == [2, 0, 1]
    assert data["confusion"]["linear"] == result["confusion"]["linear"].tolist()
    grid = np.array(Image.open(paths["samples.png"]))
    assert grid.shape == (report.HEADER + 2 * 160, 4 * 160, 3)  # 2 rows; image | depth | truth | prediction
    s = result["samples"][0]
    y, x = 3, 5
    cy, cx = report.HEADER + y * 20 + 10, x * 20 + 10  # centre of the 20 px block of pixel (y, x)
    mapped = palette[data["scores"]["cluster_crf"]["assignment"][s["pred"][y, x]]]
    np.testing.assert_array_equal(grid[cy, 3 * 160 + cx], mapped)
    truth = palette[s["label"][y, x]] if s["label"][y, x] >= 0 else [0, 0, 0]
    np.testing.assert_array_equal(grid[cy, 2 * 160 + cx], truth)
    np.testing.assert_array_equal(grid[cy, 160 + cx], [128, 128, 128])
    np.testing.assert_array_equal(grid[160 + cy, 160 + cx], [0, 0, 0])  # no depth in row 2
    assert "| cluster (unsupervised) |" in open(paths["eval.md"]).read()


def test_confusion_image_diagonal_is_saturated():
    conf = np.diag([5, 7, 9]).astype(np.int64)
    img = np.array(report.confusion_image(conf, ["a", "b", "c"], cell=18))
    left, top = img.shape[1] - 4 - 3 * 18, 16
    for i in range(3):
        for j in range(3):
            colour = img[top + i * 18 + 9, left + j * 18 + 9]
            np.testing.assert_array_equal(colour, [0, 0, 255] if i == j else [255, 255, 255])


def test_colorize_and_dataset_style():
    names, palette = report.dataset_style("camvid", 11)
    assert len(names) == 11 and palette.shape == (11, 3)
    generic, pal = report.dataset_style("folder", 4)
    assert generic == ["class 0", "class 1", "class 2", "class 3"] and pal.shape == (4, 3)
    out = report.colorize(np.array([[-1, 0], [1, 9]]), palette[:2])
    np.testing.assert_array_equal(out[0, 0], [0, 0, 0])
    np.testing.assert_array_equal(out[1, 0], palette[1])
    np.testing.assert_array_equal(out[1, 1], [0, 0, 0])


def test_report_to_s3(s3):
    result = _result()
    paths = report.write_report(f"{s3}/run", result, {}, ["a", "b", "c"], report.dataset_style("x", 3)[1])
    assert io.exists(paths["confusion.png"])
    assert Image.open(pyio.BytesIO(io.read_bytes(paths["samples.png"]))).size == (4 * 160, report.HEADER + 2 * 160)
