"""The shard contract: encode/decode round trips, plain-webdataset readability, S3, partitioning."""
from __future__ import annotations

import os

import numpy as np
import pytest

from depthg import io, shards
from depthg.codecs import depth_error_bound


def _sample(rng, h=6, w=5):
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    depth = rng.random((h, w), dtype=np.float32)
    label = rng.integers(-1, 27, (h, w)).astype(np.int64)
    return image, depth, label


def test_encode_decode_round_trip():
    rng = np.random.default_rng(0)
    image, depth, label = _sample(rng)
    raw = shards.encode_sample("a_c3", image, depth, label, {"source_id": "a", "crop": 3})
    assert sorted(k for k in raw if not k.startswith("_")) == ["depth.png", "label.png", "meta.json", "rgb.png"]
    out = shards.decode_sample(raw)
    assert out["id"] == "a_c3" and out["meta"]["crop"] == 3 and out["meta"]["source_id"] == "a"
    assert out["image"].dtype == np.uint8 and np.array_equal(out["image"], image)
    assert out["depth"].dtype == np.float32 and np.abs(out["depth"] - depth).max() <= 0.5 / 65535 + 1e-7
    assert out["label"].dtype == np.int64 and np.array_equal(out["label"], label)
    # stage 2's encodings: each member named by its encoding, decoded by the same decode_sample
    for enc in (shards.Encoding("jpeg", 95, "raw16z"), shards.Encoding("webp", 90, "raw16"),
                shards.Encoding("png", 95, "png8")):
        raw = shards.encode_sample("a", image, depth, label, {"positives": [4, 1]}, enc)
        assert set(raw) == {"__key__", "meta.json", "label.png", *enc.as_dict()["members"][:2]}
        out = shards.decode_sample(raw)
        assert out["image"].shape == image.shape and out["meta"]["positives"] == [4, 1]
        assert np.abs(out["depth"] - depth).max() <= depth_error_bound(enc.depth) + 1e-7
        assert np.array_equal(out["label"], label)  # labels stay lossless


def test_unlabelled_and_bad_inputs():
    rng = np.random.default_rng(1)
    image, depth, _ = _sample(rng)
    out = shards.decode_sample(shards.encode_sample("x", image, depth))
    assert out["label"] is None and "positives" not in out["meta"]
    with pytest.raises(shards.ShardError, match="must not contain"):
        shards.encode_sample("a.b", image, depth)
    with pytest.raises(shards.ShardError, match=r"\[0, 1\]"):
        shards.encode_sample("x", image, depth + 1.0)
    with pytest.raises(shards.ShardError, match="differ"):
        shards.encode_sample("x", image, depth[:, :-1])
    with pytest.raises(shards.ShardError, match="label ids"):
        shards.encode_sample("x", image, depth, np.full(depth.shape, 300))


def test_write_shard_is_deterministic(tmp_path):
    rng = np.random.default_rng(2)
    samples = [shards.encode_sample(f"s{i}", *_sample(rng)) for i in range(3)]
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    assert shards.write_shard(str(a), samples) == 3
    shards.write_shard(str(b), samples)
    assert a.read_bytes() == b.read_bytes()


def test_test_shards_read_by_plain_webdataset(tmp_path):
    import webdataset as wds

    m = shards.write_test_shards(str(tmp_path), 10, size=(12, 16), num_positives=2, samples_per_shard=4)
    assert m["schema"] == shards.TRAIN_SCHEMA and m["total"] == 10 and [s["count"] for s in m["shards"]] == [4, 4, 2]
    assert m["index"] == "offsets.npz" and m["rows"] == "idx" and m["encoding"]["rgb"] == "jpeg" and m["resolution"] is None
    urls = shards.shard_urls(str(tmp_path), "train", "train")
    assert all(os.path.exists(u) for u in urls)
    keys, seen = [], []
    for raw in wds.WebDataset(urls, shardshuffle=False):
        keys.append(raw["__key__"])
        seen.append(shards.decode_sample(raw))
        assert not any(k.startswith("pos") for k in raw)  # no embedded positive
    assert keys == [f"train-{i:05d}" for i in range(10)]
    # positives are the next samples cyclically, by global index (manifest order), in the shards' row files,
    # which carry each sample's own byte range and its positives' rgb + depth ranges (nothing in meta.json)
    table = shards.read_index(str(tmp_path / "train"))
    rows = np.concatenate([shards.read_rows(shards.rows_name(u), 0, c, 2) for u, c in zip(urls, [4, 4, 2])])
    assert rows.dtype.itemsize == shards.row_dtype(2).itemsize == 16 + 2 * 28
    assert rows["pos"].tolist() == [[(g + 1) % 10, (g + 2) % 10] for g in range(10)]
    assert np.array_equal(rows["start"], table.start) and np.array_equal(rows["stop"], table.stop)
    assert np.array_equal(rows["pos_start"], table.start[rows["pos"]]) and np.array_equal(rows["pos_end"], table.prefix[rows["pos"]])
    assert np.array_equal(rows["pos_shard"], table.shard[rows["pos"]])
    for d in seen:
        assert "positives" not in d["meta"] and "neighbors" not in d["meta"]
        assert d["image"].shape == (12, 16, 3) and d["depth"].shape == (12, 16)
    assert min(d["label"].min() for d in seen) == -1
    # iter_shard yields the same raw dicts as webdataset
    ours = [raw["__key__"] for u in urls for raw in shards.iter_shard(u)]
    assert ours == keys
    # the offsets table: sample g's bytes parse to sample g alone; its prefix holds exactly rgb + depth
    assert len(table) == 10 and table.names == [os.path.basename(u) for u in urls]
    for g in (0, 5, 9):
        name, start, prefix = table.sample(g)
        whole = list(shards.parse_samples(io.read_range(str(tmp_path / "train" / name), start, int(table.stop[g]))))
        part = list(shards.parse_samples(io.read_range(str(tmp_path / "train" / name), start, prefix)))
        assert [r["__key__"] for r in whole] == [r["__key__"] for r in part] == [keys[g]]
        assert sorted(k for k in part[0] if not k.startswith("_")) == ["depth.npy.gz", "rgb.jpg"]
        assert set(whole[0]) - set(part[0]) == {"label.png", "meta.json"}


def test_depth_kind_layout_and_missing_manifest(tmp_path):
    m = shards.write_test_shards(str(tmp_path), 5, with_positives=False, split="val", labelled=False)
    assert m["kind"] == "depth" and os.path.exists(tmp_path / "depth" / "val" / "manifest.json")
    for url in shards.shard_urls(str(tmp_path), "val", "depth"):
        for raw in shards.iter_shard(url):
            assert "label.png" not in raw and set(raw) >= {"rgb.png", "depth.png", "meta.json"}
    with pytest.raises(FileNotFoundError, match="run generate_depth first"):
        shards.shard_urls(str(tmp_path), "train", "train")
    # put_shard leaves only the shard and its sidecar (no temp files under the final folder)
    assert sorted(os.listdir(tmp_path / "depth" / "val")) == [
        "manifest.json", "shard-000000.json", "shard-000000.tar", "shard-000001.json", "shard-000001.tar"]


def test_s3_read_with_iter_shard_and_registered_gopen(s3):
    import webdataset as wds

    root = f"{s3}/pre"
    shards.write_test_shards(root, 6, size=(8, 8), num_positives=1, samples_per_shard=4)
    urls = shards.shard_urls(root, "train")
    assert urls == [f"{root}/train/shard-000000.tar", f"{root}/train/shard-000001.tar"]
    assert io.exists(f"{root}/train/shard-000001.json")
    keys = [raw["__key__"] for u in urls for raw in shards.iter_shard(u)]
    assert keys == [f"train-{i:05d}" for i in range(6)]
    shards.register_gopen()
    wkeys = [raw["__key__"] for raw in wds.WebDataset(urls, shardshuffle=False)]
    assert wkeys == keys




def test_parse_samples_of_a_range_matches_webdataset_and_handles_damage(tmp_path):
    """The loader's own ustar parser yields webdataset's dicts; member types it does not parse (a pax header
    for a long name) go through webdataset's reader; a short range drops its possibly incomplete last sample;
    bytes that are not a tar raise ShardError."""
    from webdataset import tariterators

    rng = np.random.default_rng(3)
    long_id = "x" * 120  # > 100 characters: tarfile writes a pax header
    for ids in (["a", "b_c1", "c"], ["a", long_id]):
        path = str(tmp_path / f"{len(ids)}.tar")
        shards.write_shard(path, [shards.encode_sample(i, *_sample(rng), encoding=shards.TRAIN_DEFAULT) for i in ids])
        data = open(path, "rb").read()
        ref = list(tariterators.group_by_keys(tariterators.tar_file_expander([{"url": "u", "stream": open(path, "rb")}])))
        ours = list(shards.parse_samples(data, "u"))
        assert [{k: v for k, v in r.items() if not k.startswith("__")} for r in ours] == \
               [{k: v for k, v in r.items() if not k.startswith("__")} for r in ref]
        assert [r["__key__"] for r in ours] == ids
    offsets, _ = shards.sample_offsets(str(tmp_path / "3.tar"))
    data = open(str(tmp_path / "3.tar"), "rb").read()
    assert [r["__key__"] for r in shards.parse_samples(data[:offsets[2]], "u", truncated=True)] == ["a"]
    cut = shards.parse_samples(data[:offsets[1] + 600], "u")  # inside sample b's first member
    assert next(cut)["__key__"] == "a"
    with pytest.raises(shards.ShardError, match="cut after"):
        next(cut)
    with pytest.raises(shards.ShardError, match="no tar header at byte 0"):
        list(shards.parse_samples(b"\x01garbage" * 100, "u"))


def test_offsets_table_in_linear_time_and_both_file_forms(tmp_path):
    """``OffsetsTable.empty`` + ``fill`` (numpy, as sidecars arrive, in any order) equals ``from_sidecars``; the
    8-bytes-per-sample file reads back exactly, and a table written in the earlier form (int64 start / prefix /
    stop, compressed) stays readable."""
    infos = [{"name": "a", "count": 3, "offsets": [0, 10, 25, 31], "prefix": [4, 20, 30]},
             {"name": "b", "count": 0, "offsets": [0], "prefix": []},
             {"name": "c", "count": 2, "offsets": [512, 600, 700], "prefix": [550, 650]}]
    ref = shards.OffsetsTable.from_sidecars(infos)
    table = shards.OffsetsTable.empty(["a", "b", "c"], [3, 0, 2])
    for i in (2, 0):
        table.fill(i, infos[i]["offsets"], infos[i]["prefix"])
    with pytest.raises(shards.ShardError, match="no sidecar for b"):
        shards.write_index(str(tmp_path), table)
    table.fill(1, [0], [])
    for t in (table, shards.OffsetsTable.from_bytes(ref.to_bytes())):
        for key in ("shard", "start", "prefix", "stop", "first"):
            assert np.array_equal(getattr(t, key), getattr(ref, key)), key
    assert ref.start.tolist() == [0, 10, 25, 512, 600] and ref.stop.tolist() == [10, 25, 31, 600, 700]
    assert ref.sample(4) == ("c", 600, 650) and ref.segment(0, 1, 3) == (10, 31)
    with pytest.raises(shards.ShardError, match="4 offsets for 2 samples"):
        table.fill(2, [0, 1, 2, 3], [1, 2])
    import io as pyio

    old = pyio.BytesIO()
    np.savez_compressed(old, names=np.array(ref.names), shard=ref.shard, start=ref.start, prefix=ref.prefix, stop=ref.stop)
    back = shards.OffsetsTable.from_bytes(old.getvalue())
    assert back.names == ["a", "b", "c"] and np.array_equal(back.prefix, ref.prefix)
    assert len(ref.to_bytes()) < len(old.getvalue()) + 400
