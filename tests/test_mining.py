"""Neighbour mining on a real local Ray: features, exact kNN, samples at the training resolution with positives
by reference (global indices + the offsets table), resume, and the remining of old embedded-positive splits."""
from __future__ import annotations

import os

import numpy as np
import pytest

from cluster import mining
from depthg import io, shards
from depthg.config import load_config, to_dict
from depthg.data import resize_center_crop


def _cfg(root, **extra):
    over = [f"shards.root={root}", "model.backbone=tiny_vit", "data.resolution=32", "mining.k=5",
            "mining.num_positives=3", "mining.batch_size=4", "mining.num_actors=2"]
    return load_config(None, over + [f"{k}={v}" for k, v in extra.items()])


def _brute_neighbours(ids, feats, k):
    sim = feats @ feats.T
    out = {}
    for i in range(len(ids)):
        order = sorted((j for j in range(len(ids)) if j != i), key=lambda j: (-sim[i, j], j))
        out[ids[i]] = [ids[j] for j in order[:k]]
    return out


def _train_samples(root, split):
    """(raws in manifest order, the K positives of each from the row files)."""
    manifest = shards.read_manifest(shards.split_dir(root, split, "train"))
    raws, positives = [], []
    for url, entry in zip(shards.shard_urls(root, split, "train"), manifest["shards"]):
        rows = shards.read_rows(shards.rows_name(url), 0, entry["count"], manifest["num_positives"])
        raws += list(shards.iter_shard(url))
        positives += [r["pos"].tolist() for r in rows]
    return manifest, raws, positives


def test_mining_end_to_end(tmp_path, ray_local):
    root = str(tmp_path)
    shards.write_test_shards(root, 10, size=(16, 24), with_positives=False, samples_per_shard=4, split="val")
    cfg = _cfg(root)
    manifest = mining.mine_neighbors(cfg, "val", progress=False)
    assert manifest["kind"] == "train" and manifest["total"] == 10 and manifest["num_positives"] == 3
    units = shards.plan_units([4, 4, 2], mining.LAYOUT_SEED)  # one unit of the 3 depth shards
    assert [s["count"] for s in manifest["shards"]] == [c for u in units for c in u.counts]
    assert [s["name"] for s in manifest["shards"]] == [f"{i:02x}-shard-{i:06d}.tar" for i in range(3)]
    assert manifest["layout"] == shards.LAYOUT and manifest["rows"] == "idx"

    # reference: features in-process from the depth samples, brute-force cosine ranking in the stored order
    worker = mining.MiningWorker(to_dict(cfg))
    depth = {raw["__key__"]: raw for u in shards.shard_urls(root, "val", "depth") for raw in shards.iter_shard(u)}
    manifest, raws, positives = _train_samples(root, "val")
    ids = [raw["__key__"] for raw in raws]
    assert sorted(ids) == sorted(depth) and len(set(ids)) == 10  # every sample exactly once
    feats = worker._features([resize_center_crop(shards.decode_image(depth[i]["rgb.png"]), 32) for i in ids])
    expected = _brute_neighbours(ids, feats.astype(np.float64), 3)
    enc = manifest["encoding"]
    assert manifest["schema"] == shards.TRAIN_SCHEMA and manifest["resolution"] == 32 and enc["rgb"] == "jpeg"
    table = shards.read_index(shards.split_dir(root, "val", "train"))
    for g, raw in enumerate(raws):
        key = raw["__key__"]
        dec = shards.decode_sample(raw)
        # positives by reference: global indices (manifest order) of neighbour ranks 1..3, in the row files
        assert [ids[p] for p in positives[g]] == expected[key] and "positives" not in dec["meta"]
        assert set(raw) - {"__key__", "__url__", "__local_path__"} == {*enc["members"]}
        # the anchor at the training resolution through the one resize: depth and label exact, rgb JPEG-close
        ref = shards.decode_sample(depth[key])
        assert np.array_equal(dec["label"], resize_center_crop(ref["label"], 32))
        assert np.abs(dec["depth"] - resize_center_crop(ref["depth"], 32)).max() <= 1e-7
        rgb_err = np.abs(dec["image"].astype(int) - resize_center_crop(ref["image"], 32).astype(int))
        assert dec["image"].shape == (32, 32, 3) and rgb_err.mean() < 4
    assert len(table) == 10 and table.names == [s["name"] for s in manifest["shards"]]
    # the loader reads it: each sample once per epoch, each positive one of the sample's three
    from depthg import streaming

    spec, _ = streaming.open_split(root, "val", micro_batch=5, resolution=32, num_steps=2, shuffle_buffer=0)
    batches = list(streaming.make_loader(spec, 0))
    assert sorted(i for b in batches for i in b["id"]) == sorted(ids)
    assert all(p in expected[a] for b in batches for a, p in zip(b["id"], b["pos_id"]))


def test_mining_resume_is_byte_identical(tmp_path, ray_local):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    for root in (full, part):  # 10 depth shards: 2 units of 5
        shards.write_test_shards(root, 10, size=(16, 16), with_positives=False, samples_per_shard=1, split="train")
    mining.mine_neighbors(_cfg(full), "train", progress=False)
    assert mining.mine_neighbors(_cfg(part), "train", max_units=1, progress=False) is None
    assert not io.exists(os.path.join(part, "train", "manifest.json"))
    written = sorted(n for n in os.listdir(os.path.join(part, "train")) if n.endswith(".tar"))
    assert len(written) == 5
    stamps = {n: os.stat(os.path.join(part, "train", n)).st_mtime_ns for n in written}
    m = mining.mine_neighbors(_cfg(part), "train", progress=False)
    assert m["total"] == 10
    assert {n: os.stat(os.path.join(part, "train", n)).st_mtime_ns for n in written} == stamps  # not redone
    names = sorted(os.listdir(os.path.join(full, "train")))
    assert names == sorted(os.listdir(os.path.join(part, "train")))
    for name in names:
        if name.endswith((".tar", ".idx", ".npz")):
            with open(os.path.join(full, "train", name), "rb") as a, open(os.path.join(part, "train", name), "rb") as b:
                assert a.read() == b.read(), name


def test_mining_without_depth_manifest_says_what_to_run(tmp_path, ray_local):
    with pytest.raises(FileNotFoundError, match="run generate_depth first"):
        mining.mine_neighbors(_cfg(str(tmp_path)), "val", progress=False)


def test_another_k_reads_no_stage1_byte_and_keeps_shards_and_features(tmp_path, ray_local):
    """A rerun with other positives rewrites only the row files: the training shards and the kept features
    stay (no depth-shard byte is read); another resolution is another feature set."""
    root = str(tmp_path)
    shards.write_test_shards(root, 8, size=(16, 16), with_positives=False, samples_per_shard=3, split="train")
    results = []
    first = mining.mine_neighbors(_cfg(root), "train", progress=False, on_unit=results.append)
    assert sum(r["depth_bytes_read"] for r in results) == sum(
        os.path.getsize(u) for u in shards.shard_urls(root, "train", "depth"))  # each depth shard read once
    dm = shards.read_manifest(shards.split_dir(root, "train", "depth"))
    folder, train = mining.features_folder(_cfg(root), "train", dm), os.path.join(root, "train")
    stamps = lambda path, ext: {n: os.stat(os.path.join(path, n)).st_mtime_ns for n in os.listdir(path) if n.endswith(ext)}  # noqa: E731
    kept, tars = stamps(folder, ".npy"), stamps(train, ".tar")
    assert sorted(kept) == ["unit-000000.npy"]  # 3 depth shards: one unit
    results.clear()
    second = mining.mine_neighbors(_cfg(root, **{"mining.num_positives": 2}), "train", progress=False,
                                   on_unit=results.append)
    assert second["num_positives"] == 2 and first["num_positives"] == 3
    assert stamps(folder, ".npy") == kept and stamps(train, ".tar") == tars
    assert [r["depth_bytes_read"] for r in results] == [0]
    assert [len(p) for p in _train_samples(root, "train")[2]] == [2] * 8
    assert mining.features_folder(_cfg(root, **{"data.resolution": 16}), "train", dm) != folder


def test_knn_calls_cover_whole_shards():
    first = np.array([0, 5, 9, 20, 21, 30])
    assert mining.knn_calls(first, rows=10) == [((0, 2), (0, 9)), ((2, 3), (9, 20)), ((3, 5), (20, 30))]
    assert mining.knn_calls(first, rows=1) == [((i, i + 1), (int(first[i]), int(first[i + 1]))) for i in range(5)]


def test_old_splits_refused_or_read_then_remined(tmp_path, ray_local):
    """Positives embedded (schema depthg-shards/1): refused by name with the command that regenerates it. Layout
    shuffled/2 (positives in meta.json, the offsets table): still read by the loader, and remined by
    mine_neighbors (its layout differs), keeping the depth shards; the old layout's files are removed."""
    from depthg import streaming

    root = str(tmp_path)
    shards.write_test_shards(root, 6, size=(16, 16), with_positives=False, samples_per_shard=3, split="train")
    folder = shards.split_dir(root, "train", "train")
    os.makedirs(folder)
    shards.write_json(os.path.join(folder, "manifest.json"), {
        "schema": "depthg-shards/1", "kind": "train", "split": "train", "total": 6, "num_positives": 3,
        "shards": [{"name": "shard-000000.tar", "count": 6}]})
    with pytest.raises(shards.ShardError, match=r"embedded positives .*python launch/mine_neighbors.py "
                                                r".*depth shards under .*depth are kept and reused"):
        streaming.open_split(root, "train")
    # a shuffled/2 split, as mining wrote it before: each sample's positives in its meta.json
    depth = [raw for u in shards.shard_urls(root, "train", "depth") for raw in shards.iter_shard(u)]
    samples = [shards.encode_sample(r["__key__"], shards.decode_image(r["rgb.png"]), shards.decode_depth(r["depth.png"]),
                                    None, {"positives": [(g + 1) % 6]}, shards.TRAIN_DEFAULT) for g, r in enumerate(depth)]
    info = shards.put_shard(folder, "shard-000000.tar", samples)
    shards.write_index(folder, [info])
    shards.write_manifest(folder, {"kind": "train", "split": "train", "index": shards.INDEX, "layout": "shuffled/2",
                                   "num_positives": 1, "shards": [{"name": info["name"], "count": 6}]})
    spec, _ = streaming.open_split(root, "train", micro_batch=3, resolution=16, num_steps=2, shuffle_buffer=0)
    batches = list(streaming.make_loader(spec, 0))
    ids = [r["__key__"] for r in depth]
    assert [p for b in batches for p in b["pos_id"]] == [ids[(ids.index(a) + 1) % 6] for b in batches for a in b["id"]]
    depth_stamp = os.stat(os.path.join(root, "depth", "train", "shard-000000.tar")).st_mtime_ns
    manifest = mining.mine_neighbors(_cfg(root), "train", progress=False)
    assert manifest["schema"] == shards.TRAIN_SCHEMA and manifest["total"] == 6 and manifest["layout"] == shards.LAYOUT
    assert os.stat(os.path.join(root, "depth", "train", "shard-000000.tar")).st_mtime_ns == depth_stamp
    assert not os.path.exists(os.path.join(folder, "shard-000000.tar"))  # the old layout's files are gone
    assert not os.path.exists(os.path.join(folder, "shard-000000.json"))
    streaming.open_split(root, "train")  # readable now


def test_node_cache_builds_each_file_once_per_node(tmp_path):
    """Two actors of one node racing for the same file: it is built once, both get it; another node builds its own;
    ``close`` removes the job's folder."""
    import threading

    from cluster.nodecache import NodeCache, cache_dir

    node_a = cache_dir(str(tmp_path), "job", "node-a")
    actors, made, paths = [NodeCache(node_a), NodeCache(node_a)], [], []
    barrier = threading.Barrier(2)

    def make(tmp):
        made.append(tmp)
        with open(tmp, "wb") as fh:
            fh.write(b"keys")

    def use(cache):
        barrier.wait()
        paths.append(cache.build("keys-x.npy", make))

    threads = [threading.Thread(target=use, args=(c,)) for c in actors]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1 and sum(c.built for c in actors) == 1 and len(set(paths)) == 1
    assert open(paths[0], "rb").read() == b"keys" and not [n for n in os.listdir(node_a) if n.endswith(".tmp")]
    other = NodeCache(cache_dir(str(tmp_path), "job", "node-b"))
    other.build("keys-x.npy", make)
    assert len(made) == 2
    for cache in (*actors, other):
        cache.close()
    assert not os.path.exists(os.path.join(str(tmp_path), "depthg-cache-job"))


def test_unit_calls_carry_counts_not_samples(tmp_path):
    """The driver hands each actor a unit (depth shard indices, counts), URLs and the settings: the calls are
    the same size whether a shard holds 10 or 10,000 samples (no id or neighbour list passes through them)."""
    class Recorder:  # stands in for the actor pool: records the calls, returns no result
        def map(self, method, calls, desc="", progress=True):
            self.calls = calls
            return iter(())

    import pickle

    sizes = []
    for per_shard in (10, 10_000):
        dm = {"split": "train", "total": 40 * per_shard, "digest": "d",
              "shards": [{"name": shards.shard_name(i), "count": per_shard} for i in range(40)]}
        units = shards.plan_units([per_shard] * 40)
        group = Recorder()
        assert mining.write_units(_cfg(str(tmp_path)), "train", group, units, dm, str(tmp_path), len(units) - 1,
                                  False) is None
        assert len(group.calls) == len(units) - 1
        sizes.append(len(pickle.dumps(group.calls)))
    assert abs(sizes[1] - sizes[0]) < 200, sizes


def test_a_split_of_one_sample_is_refused_by_name_before_any_work(tmp_path):
    shards.write_test_shards(str(tmp_path), 1, size=(8, 8), with_positives=False, split="val")
    with pytest.raises(shards.ShardError, match=r"depth/val/manifest.json: split val has 1 sample.*at least 2"):
        mining.mine_neighbors(_cfg(str(tmp_path)), "val", progress=False, group=object())
