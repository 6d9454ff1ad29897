"""Depth generation on a real local Ray: coverage, counts, crops, resume, skips, S3 end to end."""
from __future__ import annotations

import os

import numpy as np
import pytest

from cluster import depthgen
from depthg import io, shards
from depthg.config import load_config
from depthg.data import build_source, five_crop

TINY = ["data.dataset=synthetic", "data.num_train=4", "data.num_val=3", "data.height=48", "data.width=64",
        "shards.samples_per_shard=2", "depthgen.num_actors=2", "model.backbone=tiny_vit", "data.resolution=32",
        "mining.k=5", "mining.num_positives=3", "mining.batch_size=8"]


def _cfg(root, *extra):
    return load_config(None, TINY + [f"shards.root={root}", *extra])


def _read_all(urls):
    return [raw for u in urls for raw in shards.iter_shard(u)]


def _images(root, names, size=(16, 20)):
    """``root/images/NAME`` and its depth ``root/depth/STEM.npy`` (a folder dataset)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for sub in ("images", "depth"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(os.path.join(root, "images", name))
        np.save(os.path.join(root, "depth", os.path.splitext(name)[0] + ".npy"), rng.random(size, dtype=np.float32))


def test_listing_is_written_once_and_an_actor_reads_only_its_unit(tmp_path):
    from depthg.data.listing import ids_digest, unit_entries

    data = str(tmp_path / "data")
    _images(data, [f"im{i}.png" for i in range(7)] + ["x.y.png"])
    cfg = _cfg(str(tmp_path / "out"), "data.dataset=folder", f"data.root={data}", "model.n_classes=3",
               "shards.samples_per_shard=3")
    unlisted = build_source(cfg.data, "val", n_classes=3, listed=False)
    assert len(unlisted) == 0 and unlisted.n_classes == 3  # class facts, no ids held
    listing = str(tmp_path / "listing.jsonl")
    plan = depthgen.list_units(unlisted, listing, 3)
    ids = build_source(cfg.data, "val", n_classes=3).ids()
    assert plan.images == 8 and len(plan) == 3 and ids[-1] == "x_y"
    units = [unit_entries(listing, plan.start(u), plan.stop(u)) for u in range(3)]
    assert [i for unit in units for i, _ in unit] == ids and units[2] == [("im6", "im6.png"), ("x_y", "x.y.png")]
    assert plan.keys == [ids_digest(ids[0:3]), ids_digest(ids[3:6]), ids_digest(ids[6:8])]
    # an actor never lists the source: a folder that no longer lists (two files map to one id) still serves it
    _images(data, ["x_y.png"])
    with pytest.raises(Exception, match="two images map to the id 'x_y'"):
        build_source(cfg.data, "val", n_classes=3)
    worker = depthgen.DepthWorker(depthgen.to_dict(cfg))
    folder = shards.split_dir(cfg.shards.root, "val", "depth")
    result = worker.run_listed("val", 2, listing, plan.start(2), plan.stop(2), folder)
    assert set(result) == {"index", *depthgen.UNIT_SUMMARY} and result["count"] == 2 and result["index"] == 2
    assert len(worker.source("val", listed=False)) == 0
    side = shards.read_sidecar(folder, shards.shard_name(2))
    assert side["ids"] == ["im6", "x_y"] and ids_digest(side["source_ids"]) == plan.keys[2]
    with pytest.raises(Exception, match="unknown image id 'im0'"):
        unlisted.share(units[2]).load("im0")


def test_rerun_check_lists_the_folder_once_and_reduces_sidecars(tmp_path):
    from depthg.data.listing import ids_digest

    cfg = _cfg(str(tmp_path / "out"), "data.num_val=5", "shards.samples_per_shard=1")
    folder = shards.split_dir(cfg.shards.root, "val", "depth")
    listing = str(tmp_path / "listing.jsonl")
    plan = depthgen.list_units(build_source(cfg.data, "val", listed=False), listing, 1)
    digest = depthgen.depth_digest(cfg, "val")
    worker = depthgen.DepthWorker(depthgen.to_dict(cfg))
    for u in range(4):
        worker.run_listed("val", u, listing, plan.start(u), plan.stop(u), folder)
    os.remove(os.path.join(folder, shards.shard_name(1)))  # a sidecar without its shard: not complete
    stale = shards.read_json(os.path.join(folder, "shard-000002.json"))
    shards.write_json(os.path.join(folder, "shard-000002.json"), {**stale, "digest": "other settings"})
    # a sidecar as the code before wrote it (the same fields): still complete
    old = shards.read_json(os.path.join(folder, "shard-000003.json"))
    assert ids_digest(old["source_ids"]) == plan.keys[3]
    tally = depthgen.check_units(folder, plan, digest, threads=2)
    assert tally.pending().tolist() == [1, 2, 4] and tally.counts.tolist() == [1, -1, -1, 1, -1]
    assert depthgen.check_units(folder, plan, digest, overwrite=True).pending().tolist() == [0, 1, 2, 3, 4]
    tally.add(4, 0, [{"id": "b", "error": "x"}])
    tally.add(1, 1, [{"id": "a", "error": "y"}])
    assert [s["id"] for s in tally.skipped_list()] == ["a", "b"]  # unit order, not arrival order


def test_depth_shards_cover_every_sample_once(tmp_path, ray_local):
    cfg = _cfg(str(tmp_path))
    results = []
    train = depthgen.generate_depth(cfg, "train", progress=False, on_unit=results.append)
    # the driver receives a summary per unit (no ids, no offsets) and hands out units of one listing file
    assert sorted(r["index"] for r in results) == [0, 1] and all(set(r) == {"index", *depthgen.UNIT_SUMMARY}
                                                                  for r in results)
    with open(os.path.join(cfg.shards.root, "depth", "train", "listing.jsonl")) as fh:
        assert len(fh.read().splitlines()) == 2
    val = depthgen.generate_depth(cfg, "val", progress=False)
    assert train["total"] == 4 * 5 and [s["count"] for s in train["shards"]] == [10, 10]
    assert val["total"] == 3 and [s["count"] for s in val["shards"]] == [2, 1]
    assert train["five_crop"] and not val["five_crop"] and train["schema"] == shards.SCHEMA
    assert train["n_classes"] == build_source(cfg.data, "train").n_classes
    src = build_source(cfg.data, "train")
    expected = {c.id: c for i in src.ids() for c in five_crop(src.load(i), 0.5)}
    raws = _read_all(shards.shard_urls(cfg.shards.root, "train", "depth"))
    assert sorted(r["__key__"] for r in raws) == sorted(expected) and len(raws) == len(expected)
    for raw in raws:
        dec, ref = shards.decode_sample(raw), expected[raw["__key__"]]
        assert dec["image"].shape == (24, 32, 3) and np.array_equal(dec["image"], ref.image)
        assert np.abs(dec["depth"] - ref.depth).max() <= 1.0 / 65535
        assert np.array_equal(dec["label"], ref.label)
        assert dec["meta"]["crop"] == int(raw["__key__"][-1]) and dec["meta"]["split"] == "train"
    vsrc = build_source(cfg.data, "val")
    vraws = _read_all(shards.shard_urls(cfg.shards.root, "val", "depth"))
    assert [r["__key__"] for r in vraws] == vsrc.ids()
    assert shards.decode_sample(vraws[0])["image"].shape == (48, 64, 3)  # val is never cropped


def test_interrupted_run_resumes_to_identical_shards(tmp_path, ray_local):
    full, part = _cfg(str(tmp_path / "full")), _cfg(str(tmp_path / "part"), "data.num_train=5")
    full = _cfg(str(tmp_path / "full"), "data.num_train=5")
    depthgen.generate_depth(full, "train", progress=False)
    assert depthgen.generate_depth(part, "train", max_units=1, progress=False) is None
    folder = os.path.join(part.shards.root, "depth", "train")
    assert not os.path.exists(os.path.join(folder, "manifest.json"))
    done = sorted(n for n in os.listdir(folder) if n.endswith(".tar"))
    assert len(done) == 1
    # a shard without its sidecar (killed between the two writes) is redone, not trusted
    os.remove(os.path.join(folder, shards.sidecar_name(done[0])))
    m = depthgen.generate_depth(part, "train", progress=False)
    assert m["total"] == 25 and [s["count"] for s in m["shards"]] == [10, 10, 5]
    for s in m["shards"]:
        with open(os.path.join(full.shards.root, "depth", "train", s["name"]), "rb") as a, \
                open(os.path.join(folder, s["name"]), "rb") as b:
            assert a.read() == b.read(), s["name"]
    # complete: a rerun touches nothing; overwrite rewrites (to the same bytes)
    stamps = {n: os.stat(os.path.join(folder, n)).st_mtime_ns for n in os.listdir(folder) if n.endswith(".tar")}
    depthgen.generate_depth(part, "train", progress=False)
    assert stamps == {n: os.stat(os.path.join(folder, n)).st_mtime_ns for n in stamps}
    over = _cfg(part.shards.root, "data.num_train=5", "shards.overwrite=true")
    depthgen.generate_depth(over, "train", progress=False)
    assert all(os.stat(os.path.join(folder, n)).st_mtime_ns != t for n, t in stamps.items())


def _folder_dataset(root):
    from PIL import Image

    rng = np.random.default_rng(0)
    for sub in ("images", "depth"):
        os.makedirs(os.path.join(root, "val", sub))
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)).save(f"{root}/val/images/im{i}.png")
        np.save(f"{root}/val/depth/im{i}.npy", rng.random((16, 20), dtype=np.float32))
    with open(f"{root}/val/images/im2.png", "wb") as fh:
        fh.write(b"not a png at all")


def test_corrupt_images_are_skipped_or_fatal(tmp_path, ray_local):
    data = str(tmp_path / "data")
    _folder_dataset(data)
    over = ["data.dataset=folder", f"data.root={data}", "model.n_classes=3"]
    cfg = _cfg(str(tmp_path / "out"), *over)
    m = depthgen.generate_depth(cfg, "val", progress=False)
    assert m["total"] == 3 and [s["id"] for s in m["skipped"]] == ["im2"] and "im2.png" in m["skipped"][0]["error"]
    keys = [r["__key__"] for r in _read_all(shards.shard_urls(cfg.shards.root, "val", "depth"))]
    assert keys == ["im0", "im1", "im3"]
    strict = _cfg(str(tmp_path / "strict"), *over, "shards.strict=true")
    with pytest.raises(Exception, match="im2"):
        depthgen.generate_depth(strict, "val", progress=False)
    assert not io.exists(os.path.join(strict.shards.root, "depth", "val", "manifest.json"))
    only_bad = _cfg(str(tmp_path / "bad"), *over)
    for i in (0, 1, 3):
        with open(f"{data}/val/images/im{i}.png", "wb") as fh:
            fh.write(b"broken too")
    with pytest.raises(RuntimeError, match="every image of split val was unreadable"):
        depthgen.generate_depth(only_bad, "val", progress=False)


def test_generate_depth_main_end_to_end_on_s3(s3, ray_local):
    from launch import generate_depth

    root = f"{s3}/run"
    out = generate_depth.main(["--config", "none", "--quiet", *TINY, f"shards.root={root}"])
    assert out["depth/train"]["total"] == 20 and out["train"]["total"] == 20 and out["val"]["total"] == 3
    assert io.exists(f"{root}/generate_depth.yaml")
    urls = shards.shard_urls(root, "train", "train")
    assert urls[0].startswith("s3://")
    raws = _read_all(urls)
    assert len(raws) == 20 and len({r["__key__"] for r in raws}) == 20
    counts = [s["count"] for s in out["train"]["shards"]]  # positives in the shards' row files (layout grouped/3)
    rows = np.concatenate([shards.read_rows(shards.rows_name(u), 0, c, 3) for u, c in zip(urls, counts)])
    for g, (raw, row) in enumerate(zip(raws, rows)):
        dec = shards.decode_sample(raw)
        assert len(row["pos"]) == 3 and g not in row["pos"] and all(0 <= p < 20 for p in row["pos"])
        res = out["train"]["resolution"]
        assert dec["image"].shape == (res, res, 3)  # stored at the training resolution
    # the mining stage alone, rerun on complete shards, changes nothing and returns the same manifest
    from launch import mine_neighbors

    again = mine_neighbors.main(["--config", "none", "--quiet", "--splits", "val", *TINY, f"shards.root={root}"])
    assert again["val"]["shards"] == out["val"]["shards"]


@pytest.fixture(scope="module")
def tiny_dpt_folder(tmp_path_factory):
    """A randomly initialised, tiny DPT saved like a hub model (no network needed)."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.DPTConfig(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32,
                                 image_size=32, patch_size=8, backbone_out_indices=[0, 1, 2, 3],
                                 neck_hidden_sizes=[8, 8, 16, 16], fusion_hidden_size=8)
    folder = str(tmp_path_factory.mktemp("tiny_dpt"))
    transformers.DPTForDepthEstimation(cfg).eval().save_pretrained(folder)
    transformers.DPTImageProcessor(size={"height": 32, "width": 32}, keep_aspect_ratio=False).save_pretrained(folder)
    return folder


def test_transformers_depth_is_estimated_on_the_full_image_then_cropped(tmp_path, ray_local, tiny_dpt_folder):
    from depthg.depth import build_estimator

    cfg = _cfg(str(tmp_path), "data.num_train=2", "depthgen.source=transformers", f"depthgen.model={tiny_dpt_folder}",
               "depthgen.batch_size=1", "depthgen.device=cpu")
    m = depthgen.generate_depth(cfg, "train", progress=False)
    assert m["depth_source"] == f"transformers:{tiny_dpt_folder}" and m["total"] == 10
    src, est = build_source(cfg.data, "train"), build_estimator(cfg.depthgen)
    expected = {}
    for rec in (src.load(i) for i in src.ids()):
        rec.depth = est([rec.image])[0]
        expected.update({c.id: c.depth for c in five_crop(rec, 0.5)})
    for raw in _read_all(shards.shard_urls(cfg.shards.root, "train", "depth")):
        assert np.abs(shards.decode_sample(raw)["depth"] - expected[raw["__key__"]]).max() <= 1e-4


def test_raycluster_sizes_actors_to_the_cluster(ray_local, monkeypatch):
    from cluster import raycluster

    # ray_local declares 2 logical GPUs and has no autoscaler: one GPU per actor, never more actors than GPUs
    assert raycluster.autoscaler_node_types() is None
    assert raycluster.actor_resources(0) == (2, {"num_gpus": 1, "num_cpus": 1}, "cuda")
    assert raycluster.actor_resources(1)[0] == 1 and raycluster.actor_resources(5)[0] == 2
    assert raycluster.actor_resources(0, device="cpu") == (2, {"num_gpus": 0, "num_cpus": 1}, "cpu")
    assert raycluster.connect() is False  # already connected: attaches, starts nothing
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert raycluster.running_cluster_address() == "10.0.0.1:6379"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.delenv("DEPTHG_S3_ENDPOINT", raising=False)
    assert raycluster.storage_env()["AWS_ENDPOINT_URL"] == "http://127.0.0.1:1"
    group = raycluster.ActorGroup(depthgen.DepthWorker, ({"a": 1}, "job"))
    group.check(({"a": 1},))
    with pytest.raises(ValueError, match="another config"):
        group.check(({"a": 2},))


def test_missing_backbone_weights_fail_before_any_work(tmp_path, monkeypatch):
    from launch import generate_depth

    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no hub round trips: fail at once
    root = tmp_path / "out"
    with pytest.raises(SystemExit, match="model.weights"):
        generate_depth.main(["--config", "none", *TINY, "model.backbone=dino_vits8", f"shards.root={root}"])
    assert not root.exists()  # failed on the driver before Ray or any shard
