"""Segmenting a bucket (cluster/segmentation.py): resume after a stop, settings guard, Ray actors with CRF tasks equal
one process, probability shards, s3:// input and output on a real S3 server (moto)."""
from __future__ import annotations

import io as _pyio
import json
import os

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from cluster import evaluator, segmentation
from depthg import inference, io
from depthg.checkpoint import save_segmenter
from depthg.config import Config
from launch import segment as segment_script

pytest.importorskip("pydensecrf.densecrf")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = Config()
    cfg.model.backbone, cfg.model.weights = "tiny_vit", "random"
    cfg.model.code_dim, cfg.model.n_classes, cfg.model.extra_clusters = 16, 3, 1
    cfg.eval.resolution, cfg.eval.batch_size, cfg.eval.crf = 32, 2, False
    _, segmenter = evaluator.RandomModel("tiny_vit", "random", 16, 3, 1, seed=3)()
    url = str(tmp_path_factory.mktemp("run") / "segmenter.pt")
    save_segmenter(url, cfg, segmenter, {})
    return url


def _images(write, n: int):
    """``n`` small images of a few sizes, one in a subfolder; ``write(relpath, png bytes)``."""
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = ((30, 40), (24, 36), (33, 33))[i % 3]
        buf = _pyio.BytesIO()
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
        write(f"{'sub/' if i == n - 1 else ''}img{i:02d}.png", buf.getvalue())


def _local_images(folder, n=5):
    _images(lambda rel, data: io.write_bytes(os.path.join(folder, rel), data), n)
    return str(folder)


def _records(output):
    return sorted(segmentation.read_records(output), key=lambda r: r["unit"])


def _check_exactly_once(output, items, manifest):
    """Every input in exactly one complete unit, its label written, a manifest counting them all."""
    records = _records(output)
    sources = [e["source"] for r in records for e in r["images"]]
    assert sorted(sources) == sorted(f for f, _ in items) and len(set(sources)) == len(sources)
    for r in records:
        for e in r["images"]:
            assert io.exists(io.join(output, e["files"]["label"]))
    assert manifest["images"] == manifest["inputs"] == len(items) and not manifest["skipped"]
    assert json.loads(io.read_bytes(io.join(output, segmentation.MANIFEST)))["units"] == manifest["units"]


class Stop(Exception):
    pass


def test_a_stopped_job_resumes_with_the_images_no_unit_holds(checkpoint, tmp_path):
    src = _local_images(tmp_path / "in", n=5)
    out = str(tmp_path / "out")
    args = ["--checkpoint", checkpoint, "--input", src, "--output", out, "--unit-size", "2", "--crf"]

    def stop_after_first(record):
        raise Stop(record["unit"])

    with pytest.raises(Stop):
        segment_script.main(args, on_unit=stop_after_first)
    first = _records(out)
    assert len(first) == 1 and not os.path.exists(os.path.join(out, "manifest.json"))
    done = {e["source"] for e in first[0]["images"]}
    seen = []
    segment_script.main(args, on_unit=lambda r: seen.extend(e["source"] for e in r["images"]))
    items = inference.list_inputs(src)
    assert sorted(seen) == sorted(f for f, _ in items if f not in done)  # only the rest was segmented
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    _check_exactly_once(out, items, manifest)
    assert os.path.exists(os.path.join(out, "sub", "img04_label.png"))  # nested inputs keep their folders
    seen.clear()
    segment_script.main(args, on_unit=lambda r: seen.append(r))  # all complete: nothing to do, manifest again
    assert seen == [] and json.load(open(os.path.join(out, "manifest.json")))["images"] == 5
    with pytest.raises(segmentation.SegmentError, match=f"output {out} holds 3 unit"):
        segment_script.main(args[:-1] + ["--no-crf"])  # other settings: refused, nothing mixed
    segment_script.main(args[:-1] + ["--no-crf", "--overwrite"])


def test_ray_actors_with_crf_tasks_equal_one_process(checkpoint, tmp_path, ray_local):
    src = _local_images(tmp_path / "in", n=5)
    common = ["--checkpoint", checkpoint, "--input", src, "--unit-size", "2", "--crf", "--probs"]
    segment_script.main(common + ["--output", str(tmp_path / "one")])
    segment_script.main(common + ["--output", str(tmp_path / "ray"), "--workers", "2"])
    manifest = json.load(open(tmp_path / "ray" / "manifest.json"))
    assert manifest["workers"] == 2 and len(manifest["probs_shards"]) == 3
    _check_exactly_once(str(tmp_path / "ray"), inference.list_inputs(src), manifest)
    for r in _records(str(tmp_path / "one")):
        for e in r["images"]:
            for f in e["files"].values():
                assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "ray" / f).read_bytes(), f
    keys, total = [], 0
    for shard in manifest["probs_shards"]:
        for sample in wds.WebDataset(str(tmp_path / "ray" / shard), shardshuffle=False):
            probs = np.load(_pyio.BytesIO(sample["probs.npy"]))
            meta = json.loads(sample["json"])
            assert probs.dtype == np.float16 and probs.shape[0] == 4 and list(probs.shape[1:]) == meta["score_size"]
            assert np.allclose(probs.astype(np.float32).sum(0), 1, atol=1e-2)
            keys.append(sample["__key__"])
            total += 1
    assert total == 5 and len(set(keys)) == 5


def test_s3_input_and_output(checkpoint, s3, ray_local):
    _images(lambda rel, data: io.write_bytes(f"{s3}/images/{rel}", data), 4)
    io.write_bytes(f"{s3}/images/notes.txt", b"not an image")
    out = f"{s3}/labels"
    written = segment_script.main(["--checkpoint", checkpoint, "--input", f"{s3}/images", "--output", out,
                                   "--workers", "2", "--unit-size", "2", "--no-overlays", "--probs"])
    assert sorted(written) == sorted(f"{out}/{n}_label.png" for n in ("img00", "img01", "img02", "sub/img03"))
    label = np.array(Image.open(_pyio.BytesIO(io.read_bytes(f"{out}/img01_label.png"))))
    assert label.shape == (24, 36) and label.max() < 4
    manifest = json.loads(io.read_bytes(f"{out}/manifest.json"))
    _check_exactly_once(out, inference.list_inputs(f"{s3}/images"), manifest)
    assert not io.exists(f"{out}/img00_overlay.png") and io.exists(f"{out}/{manifest['probs_shards'][0]}")


def test_unreadable_images_are_skipped_and_named(checkpoint, tmp_path):
    src = _local_images(tmp_path / "in", n=2)
    (tmp_path / "in" / "broken.png").write_bytes(b"not a png")
    out = str(tmp_path / "out")
    segment_script.main(["--checkpoint", checkpoint, "--input", src, "--output", out])
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["images"] == 2 and manifest["inputs"] == 3
    assert [s["source"] for s in manifest["skipped"]] == [str(tmp_path / "in" / "broken.png")]
    assert "cannot read image" in manifest["skipped"][0]["error"]


def test_plan_units_numbers_after_the_records():
    items = [(f"s{i}", f"n{i}") for i in range(7)]
    records = [{"unit": 4, "images": [{"source": "s1"}, {"source": "s2"}], "skipped": [{"source": "s3"}]}]
    units = segmentation.plan_units(items, records, 3)
    assert [u["id"] for u in units] == [5, 6]
    assert [s for u in units for s, _ in u["items"]] == ["s0", "s3", "s4", "s5", "s6"]  # skipped ones again
