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


def test_positives_for_cycles_and_rejects_empty():
    assert mining.positives_for(["a", "b", "c"], 2) == ["a", "b"]
    assert mining.positives_for(["a", "b"], 5) == ["a", "b", "a", "b", "a"]
    with pytest.raises(ValueError, match="at least 2"):
        mining.positives_for([], 1)


def test_mining_end_to_end(tmp_path, ray_local):
    root = str(tmp_path)
    shards.write_test_shards(root, 10, size=(16, 24), with_positives=False, samples_per_shard=4, split="val")
    cfg = _cfg(root)
    manifest = mining.mine_neighbors(cfg, "val", progress=False)
    assert manifest["kind"] == "train" and manifest["total"] == 10 and manifest["num_positives"] == 3
    assert [s["count"] for s in manifest["shards"]] == [4, 4, 2]

    # reference: features in-process, brute-force cosine ranking
    worker = mining.MiningWorker(to_dict(cfg))
    depth_urls = shards.shard_urls(root, "val", "depth")
    ids, feats = [], []
    for i, url in enumerate(depth_urls):
        out = os.path.join(str(tmp_path), f"ref-{i}.npz")
        assert worker.features(i, url, out)["count"] == len(shards.read_sidecar(os.path.dirname(url), f"shard-{i:06d}.tar")["ids"])
        part_ids, part = mining.read_features(out)
        ids += part_ids
        feats.append(part)
    expected = _brute_neighbours(ids, np.concatenate(feats).astype(np.float64), 5)
    raw_depth = {raw["__key__"]: raw for u in depth_urls for raw in shards.iter_shard(u)}

    seen, raws = [], []
    for url in shards.shard_urls(root, "val", "train"):
        for raw in shards.iter_shard(url):
            seen.append(raw["__key__"])
            raws.append(raw)
    assert sorted(seen) == sorted(ids) and seen != ids  # every sample exactly once, globally shuffled
    assert seen == [i for part in shards.shuffled_layout([ids[:4], ids[4:8], ids[8:]]) for i in part]
    enc = manifest["encoding"]
    assert manifest["schema"] == shards.TRAIN_SCHEMA and manifest["resolution"] == 32 and enc["rgb"] == "jpeg"
    for raw in raws:
        key = raw["__key__"]
        dec = shards.decode_sample(raw)
        assert dec["meta"]["neighbors"] == expected[key] and key not in dec["meta"]["neighbors"]
        # positives by reference: global indices (manifest order) of neighbour ranks 1..3, nothing embedded
        assert [seen[g] for g in dec["meta"]["positives"]] == expected[key][:3]
        assert set(raw) - {"__key__", "__url__", "__local_path__"} == {*enc["members"]}
        # the anchor at the training resolution through the one resize: depth and label exact, rgb JPEG-close
        ref = shards.decode_sample(raw_depth[key])
        assert np.array_equal(dec["label"], resize_center_crop(ref["label"], 32))
        assert np.abs(dec["depth"] - resize_center_crop(ref["depth"], 32)).max() <= 1e-7
        rgb_err = np.abs(dec["image"].astype(int) - resize_center_crop(ref["image"], 32).astype(int))
        assert dec["image"].shape == (32, 32, 3) and rgb_err.mean() < 4
    table = shards.read_index(shards.split_dir(root, "val", "train"))
    assert len(table) == 10 and table.names == [s["name"] for s in manifest["shards"]]


def test_mining_resume_is_byte_identical(tmp_path, ray_local):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    for root in (full, part):
        shards.write_test_shards(root, 9, size=(16, 16), with_positives=False, samples_per_shard=3, split="train")
    mining.mine_neighbors(_cfg(full), "train", progress=False)
    assert mining.mine_neighbors(_cfg(part), "train", max_units=1, progress=False) is None
    assert not io.exists(os.path.join(part, "train", "manifest.json"))
    written = sorted(n for n in os.listdir(os.path.join(part, "train")) if n.endswith(".tar"))
    assert len(written) == 1
    stamp = os.stat(os.path.join(part, "train", written[0])).st_mtime_ns
    m = mining.mine_neighbors(_cfg(part), "train", progress=False)
    assert m["total"] == 9
    assert os.stat(os.path.join(part, "train", written[0])).st_mtime_ns == stamp  # not redone
    for name in ("shard-000000.tar", "shard-000001.tar", "shard-000002.tar"):
        with open(os.path.join(full, "train", name), "rb") as a, open(os.path.join(part, "train", name), "rb") as b:
            assert a.read() == b.read(), name


def test_mining_without_depth_manifest_says_what_to_run(tmp_path, ray_local):
    with pytest.raises(FileNotFoundError, match="run generate_depth first"):
        mining.mine_neighbors(_cfg(str(tmp_path)), "val", progress=False)


def test_features_are_kept_and_a_rerun_skips_extraction(tmp_path, ray_local):
    root = str(tmp_path)
    shards.write_test_shards(root, 8, size=(16, 16), with_positives=False, samples_per_shard=3, split="train")
    first = mining.mine_neighbors(_cfg(root), "train", progress=False)
    dm = shards.read_manifest(shards.split_dir(root, "train", "depth"))
    folder = mining.features_folder(_cfg(root), "train", dm)
    kept = {n: os.stat(os.path.join(folder, n)).st_mtime_ns for n in os.listdir(folder)}
    assert sorted(kept) == [f"shard-{i:06d}.npz" for i in range(3)]
    # other positives: the training shards are redone, the features are read back, not recomputed
    second = mining.mine_neighbors(_cfg(root, **{"mining.num_positives": 2}), "train", progress=False)
    assert second["num_positives"] == 2 and first["num_positives"] == 3
    assert {n: os.stat(os.path.join(folder, n)).st_mtime_ns for n in os.listdir(folder)} == kept
    raw = next(shards.iter_shard(shards.shard_urls(root, "train", "train")[0]))
    assert len(shards.decode_sample(raw)["meta"]["positives"]) == 2
    # another backbone resolution is another feature set
    assert mining.features_folder(_cfg(root, **{"data.resolution": 16}), "train", dm) != folder


def test_a_split_with_embedded_positives_is_refused_then_remined(tmp_path, ray_local):
    """A stage-2 split of the old schema: readers refuse it with one line saying how to regenerate it, and
    mining (its rerun signature changed) remines it, keeping the depth shards."""
    from depthg import streaming

    root = str(tmp_path)
    shards.write_test_shards(root, 6, size=(16, 16), with_positives=False, samples_per_shard=3, split="train")
    folder = shards.split_dir(root, "train", "train")
    old = {"schema": "depthg-shards/1", "kind": "train", "split": "train", "total": 6, "num_positives": 3,
           "shards": [{"name": "shard-000000.tar", "count": 6}]}
    os.makedirs(folder)
    shards.write_json(os.path.join(folder, "manifest.json"), old)
    with pytest.raises(shards.ShardError, match=r"embedded positives .*python launch/mine_neighbors.py "
                                                r".*depth shards under .*depth are kept and reused"):
        streaming.open_split(root, "train")
    depth_stamp = os.stat(os.path.join(root, "depth", "train", "shard-000000.tar")).st_mtime_ns
    manifest = mining.mine_neighbors(_cfg(root), "train", progress=False)
    assert manifest["schema"] == shards.TRAIN_SCHEMA and manifest["total"] == 6
    assert os.stat(os.path.join(root, "depth", "train", "shard-000000.tar")).st_mtime_ns == depth_stamp
    streaming.open_split(root, "train")  # readable now


def test_node_cache_fetches_each_s3_shard_once_per_node(s3, tmp_path):
    import threading

    from cluster.nodecache import NodeShardCache, cache_dir

    root = f"{s3}/cache"
    shards.write_test_shards(root, 5, size=(8, 12), with_positives=False, samples_per_shard=3, split="val")
    urls = shards.shard_urls(root, "val", "depth")
    sizes = sum(len(io.read_bytes(u)) for u in urls)
    node_a = cache_dir(str(tmp_path), "job", "node-a")
    # two actors of one node read every member, racing on the same shards: one download per shard
    actors = [NodeShardCache(node_a), NodeShardCache(node_a)]

    errors = []

    def read_all(cache):
        for url in urls:
            for raw in shards.iter_shard(url):
                for member in ("rgb.png", "depth.png", "label.png", "meta.json"):
                    if cache.read(url, f"{raw['__key__']}.{member}") != raw[member]:
                        errors.append((url, raw["__key__"], member))

    threads = [threading.Thread(target=read_all, args=(c,)) for c in actors]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sum(c.fetched_bytes for c in actors) == sizes
    assert len([n for n in os.listdir(node_a) if n.endswith(".tar")]) == 2
    other = NodeShardCache(cache_dir(str(tmp_path), "job", "node-b"))  # another node fetches its own copy
    read_all(other)
    assert other.fetched_bytes == sizes
    with pytest.raises(KeyError, match="no member"):
        actors[0].read(urls[0], "nope.rgb.png")
    for cache in (*actors, other):
        cache.close()
    assert not os.path.exists(os.path.join(str(tmp_path), "depthg-cache-job"))
