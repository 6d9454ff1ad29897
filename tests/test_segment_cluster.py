"""Segmenting a bucket (cluster/segmentation.py): resume after a stop, settings and layout guards, names that never
move, no orphan probability shards, reads overlapping the scoring, the driver's done-set and parallel record reads,
Ray actors with CRF tasks equal one process, s3:// input and output on a real S3 server (moto)."""
from __future__ import annotations

import glob
import io as _pyio
import json
import os
import threading

import numpy as np
import pytest
import torch
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
    first = _records(out)  # the unit being read beside the first one may have finished too
    assert 1 <= len(first) <= 2 and not os.path.exists(os.path.join(out, "manifest.json"))
    done = {e["source"] for r in first for e in r["images"]}
    seen = []
    segment_script.main(args, on_unit=lambda r: seen.extend(e["source"] for e in r["images"]))
    items = inference.list_inputs(src)
    assert sorted(seen) == sorted(f for f, _ in items if f not in done)  # only the rest was segmented
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    _check_exactly_once(out, items, manifest)
    assert os.path.exists(os.path.join(out, "sub", "img04.png_label.png"))  # nested inputs keep their folders
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
    pages = io.iter_s3_keys(f"{s3}/images", page=2)  # the listing streamed page by page, in key order
    assert list(pages) == io.find(f"{s3}/images")
    out = f"{s3}/labels"
    segment_script.main(["--checkpoint", checkpoint, "--input", f"{s3}/images", "--output", out,
                         "--workers", "2", "--unit-size", "2", "--no-overlays", "--probs"])
    written = [f"{out}/{f}" for r in _records(out) for e in r["images"] for f in e["files"].values()]
    assert sorted(written) == sorted(f"{out}/{n}.png_label.png" for n in ("img00", "img01", "img02", "sub/img03"))
    label = np.array(Image.open(_pyio.BytesIO(io.read_bytes(f"{out}/img01.png_label.png"))))
    assert label.shape == (24, 36) and label.max() < 4
    manifest = json.loads(io.read_bytes(f"{out}/manifest.json"))
    _check_exactly_once(out, inference.list_inputs(f"{s3}/images"), manifest)
    assert not io.exists(f"{out}/img00.png_overlay.png") and io.exists(f"{out}/{manifest['probs_shards'][0]}")


def test_unreadable_images_are_skipped_and_named(checkpoint, tmp_path):
    src = _local_images(tmp_path / "in", n=2)
    (tmp_path / "in" / "broken.png").write_bytes(b"not a png")
    out = str(tmp_path / "out")
    segment_script.main(["--checkpoint", checkpoint, "--input", src, "--output", out])
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["images"] == 2 and manifest["inputs"] == 3
    assert [s["source"] for s in manifest["skipped"]] == [str(tmp_path / "in" / "broken.png")]
    assert "cannot read image" in manifest["skipped"][0]["error"]


# ----------------------------------------------------------------------------- issue 28.2: names that never move
def _save(path, size, seed=0, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path, format=fmt)


def _outputs(out):
    """Every output file of every record: relative name -> bytes."""
    return {f: open(os.path.join(out, f), "rb").read() for r in _records(out) for e in r["images"]
            for f in e["files"].values()}


def test_a_new_file_beside_a_colliding_name_moves_no_output(checkpoint, tmp_path):
    src, out = tmp_path / "in", str(tmp_path / "out")
    _save(str(src / "a.jpg"), (30, 40), 1, "JPEG")
    _save(str(src / "a.png"), (24, 36), 2)
    _save(str(src / "b.png"), (33, 33), 3)
    args = ["--checkpoint", checkpoint, "--input", str(src), "--output", out, "--unit-size", "2"]
    segment_script.main(args)
    before = _outputs(out)
    _save(str(src / "a.bmp"), (20, 44), 4, "BMP")  # sorts first: on the old layout every index moved
    segment_script.main(args)
    names = [e["name"] for r in _records(out) for e in r["images"]]
    assert sorted(names) == ["a.bmp", "a.jpg", "a.png", "b.png"]  # one name per source, from its path alone
    after = _outputs(out)
    assert all(after[f] == data for f, data in before.items())  # no finished output rewritten
    assert np.array(Image.open(os.path.join(out, "a.bmp_label.png"))).shape == (20, 44)


def test_a_name_held_for_another_source_is_refused(checkpoint, tmp_path):
    out = str(tmp_path / "out")
    _save(str(tmp_path / "one" / "a.png"), (30, 40), 1)
    _save(str(tmp_path / "two" / "a.png"), (24, 36), 2)
    segment_script.main(["--checkpoint", checkpoint, "--input", str(tmp_path / "one"), "--output", out])
    label = open(os.path.join(out, "a.png_label.png"), "rb").read()
    with pytest.raises(segmentation.SegmentError, match=r"'a.png' of .*two/a.png is held by _units/unit-000000.json "
                                                        "for another source"):
        segment_script.main(["--checkpoint", checkpoint, "--input", str(tmp_path / "two"), "--output", out])
    assert open(os.path.join(out, "a.png_label.png"), "rb").read() == label  # nothing written


def test_records_of_the_earlier_layout_are_refused_by_name(checkpoint, tmp_path):
    src, out = _local_images(tmp_path / "in", n=2), str(tmp_path / "out")
    old = {"schema": "depthg-segment/1", "unit": 0, "settings": "x", "images": [
        {"source": os.path.join(src, "img00.png"), "name": "img00", "files": {"label": "img00_label.png"}}],
        "skipped": [], "probs": None}
    io.write_bytes(os.path.join(out, "_units", "unit-000000.json"), json.dumps(old).encode())
    args = ["--checkpoint", checkpoint, "--input", src, "--output", out]
    with pytest.raises(segmentation.SegmentError, match=f"output {out} holds 1 unit record.s. of depthg-segment/1 .*"
                                                        "new --output, or add --overwrite"):
        segment_script.main(args)
    manifest = segment_script.main(args + ["--overwrite"])
    assert manifest["images"] == 2 and [r["schema"] for r in _records(out)] == [segmentation.SCHEMA]


# ----------------------------------------------------------------------------- issue 28.3: orphan shards
def test_a_crash_between_shard_and_record_leaves_each_image_in_one_shard(checkpoint, tmp_path):
    src, out = _local_images(tmp_path / "in", n=5), str(tmp_path / "out")
    args = ["--checkpoint", checkpoint, "--input", src, "--output", out, "--unit-size", "2", "--probs",
            "--no-overlays"]
    segment_script.main(args)
    # what a crash of unit 0 between its shard upload and its record leaves while units 1 and 2 finished:
    # probs/shard-000000.tar and the labels written, no record
    os.remove(os.path.join(out, "_units", "unit-000000.json"))
    segment_script.main(args)
    keys = [sample["__key__"] for shard in sorted(glob.glob(os.path.join(out, "probs", "*.tar")))
            for sample in wds.WebDataset(shard, shardshuffle=False)]
    assert sorted(keys) == sorted(segmentation.shard_key(n) for _, n in inference.list_inputs(src))  # each once
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert sorted(manifest["probs_shards"]) == sorted(os.path.relpath(p, out) for p in glob.glob(f"{out}/probs/*.tar"))


def test_shard_keys_stay_distinct():
    names = ["a.b.png", "a_b.png", "a%2Eb.png", "sub/a.png"]
    keys = [segmentation.shard_key(n) for n in names]
    assert len(set(keys)) == len(keys) and all("." not in k for k in keys)


# ----------------------------------------------------------------------------- issue 28.11: reads beside the scoring
class _Gate(torch.nn.Module):
    """A backbone whose first forward waits (capped) until the next unit's first image is being read."""

    def __init__(self, backbone, opened: threading.Event):
        super().__init__()
        self.inner, self.opened, self.waited = backbone, opened, None
        self.stride, self.dim = backbone.stride, backbone.dim

    def forward(self, x):
        if self.waited is None:
            self.waited = self.opened.wait(timeout=60)
        return self.inner(x)


def test_the_next_units_reads_overlap_the_scoring(checkpoint, tmp_path, monkeypatch):
    src = _local_images(tmp_path / "in", n=4)
    items = inference.list_inputs(src)
    _, backbone, segmenter = segment_script.load_model(checkpoint)
    opened = threading.Event()
    gate = _Gate(backbone, opened)
    read = inference.read_image

    def reading(path):
        if path == items[2][0]:  # the first image of unit 1
            opened.set()
        return read(path)

    monkeypatch.setattr(inference, "read_image", reading)
    settings = {"checkpoint": checkpoint, "input": src, "output": str(tmp_path / "out"), "probe": "cluster",
                "crf": False, "resolution": 32, "flip": True, "mapping": None, "palette": [[0, 0, 0]] * 4,
                "overlays": False, "probs": False, "unit_size": 2, "batch_size": 2, "prefetch": 1}
    manifest = segmentation.segment(settings, lambda: (gate, segmenter), items, workers=0, progress=False)
    assert gate.waited is True  # unit 1 was being read while unit 0 was scored
    assert manifest["images"] == 4


# ----------------------------------------------------------------------------- issue 26: the driver
def _record(unit, pairs, digest="d", probs=None):
    return {"schema": segmentation.SCHEMA, "unit": unit, "settings": digest, "probs": probs, "node": None,
            "images": [{"source": s, "name": n, "size": [1, 1], "files": {}} for s, n in pairs], "skipped": []}


def test_plan_skips_done_names_numbers_after_the_records_and_spools(tmp_path):
    items = [(f"s3://b/in/{n}", n) for n in ("a.png", "b.png", "c.png", "d.png", "e.png", "f.png", "g.png")]
    done = segmentation.Tally()
    done.add(_record(4, [items[1], items[2]]))
    done.add(_record(2, [items[5]], probs="probs/shard-000002.tar"))
    spool = str(tmp_path / "units.jsonl")
    job = segmentation.plan(iter(items), done, 3, spool, "out")
    assert (job.listed, job.done, job.units, job.first) == (7, 3, 2, 5)
    units = list(segmentation.spooled_units(spool))
    assert [u["id"] for u in units] == [5, 6]
    assert [tuple(it) for u in units for it in u["items"]] == [items[i] for i in (0, 3, 4, 6)]
    other = segmentation.Tally()
    other.add(_record(0, [("s3://b/elsewhere/c.png", "c.png")]))
    with pytest.raises(segmentation.SegmentError, match="'c.png' of s3://b/in/c.png is held by _units/unit-000000"):
        segmentation.plan(iter(items), other, 3, spool, "out")


def test_a_rerun_reads_its_records_in_parallel(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    for unit in range(4):
        io.write_bytes(os.path.join(out, "_units", segmentation.unit_name(unit)),
                       json.dumps(_record(unit, [(f"/in/{unit}.png", f"{unit}.png")])).encode())
    together, lock, active, most = threading.Event(), threading.Lock(), [0], [0]
    read = io.read_bytes

    def reading(url):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
            if active[0] >= 2:
                together.set()
        together.wait(timeout=20)  # capped: one GET after the other never gets here twice at once
        try:
            return read(url)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(io, "read_bytes", reading)
    assert sorted(r["unit"] for r in segmentation.read_records(out)) == [0, 1, 2, 3] and most[0] >= 2
    done = segmentation.tally(out)  # the job's reduction of the same reads
    assert done.units == {0, 1, 2, 3} and done.images == 4
