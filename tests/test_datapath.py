"""The stage-2 data path (issue 22): samples stored once at the training resolution, positives by reference
read by exact ranges, what they cost in bytes (counted at the storage layer) and in fidelity, and the
refusals of shards a loader must not read (old schema, another resolution)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from depthg import codecs, io, shards
from depthg import streaming as st
from depthg.data import SyntheticSource, five_crop, resize_center_crop
from depthg.reader import offsets_table


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("datapath"))
    shards.write_test_shards(root, n_samples=20, size=(16, 16), num_positives=3, samples_per_shard=6)
    return root


def _images(root: str) -> dict:
    """Every sample's decoded image and depth, by id (to check what the loader delivered)."""
    return {raw["__key__"]: shards.decode_sample(raw) for u in shards.shard_urls(root, "train")
            for raw in shards.iter_shard(u)}


def _positives(root: str) -> dict:
    """Every sample's K positives (global indices) from the shards' row files, by id."""
    out = {}
    for url, entry in zip(shards.shard_urls(root, "train"), shards.read_manifest(f"{root}/train")["shards"]):
        rows = shards.read_rows(shards.rows_name(url), 0, entry["count"], 3)
        out.update({raw["__key__"]: row["pos"].tolist() for raw, row in zip(shards.iter_shard(url), rows)})
    return out


def test_positive_draws_are_the_embedded_layouts_and_the_bytes_are_the_referenced_samples(split):
    """With the shuffle buffer off the stream order is the plan's; the positive of its n-th sample of epoch e
    is ``positives[j]`` (its row's) with j the n-th ``integers(K)`` of ``slot_rng(seed, e, rank, worker,
    POSITIVE_STREAM)``: the draw, stream and seed the loader used when the K positives were embedded. The
    positive's pixels are that sample's own (read by one exact range, carried by the anchor's row)."""
    spec, _ = st.open_split(split, "train", micro_batch=4, resolution=16, shuffle_buffer=0, seed=7, num_steps=8)
    batches = list(st.make_loader(spec, 0))  # 32 samples: one epoch of 20 and 12 of the next
    decoded, positives = _images(split), _positives(split)
    ids = [i for b in batches for i in b["id"]]
    pos_ids = [i for b in batches for i in b["pos_id"]]
    rngs = {e: st.slot_rng(7, e, 0, 0, st.POSITIVE_STREAM) for e in (0, 1)}
    for n, (anchor, positive) in enumerate(zip(ids, pos_ids)):
        j = int(rngs[n // 20].integers(3))
        assert positive == [*decoded][positives[anchor][j]]
    images = torch.cat([b["pos_image"] for b in batches])
    depths = torch.cat([b["pos_depth"] for b in batches])
    for k, positive in enumerate(pos_ids):
        assert torch.equal(images[k], torch.from_numpy(decoded[positive]["image"]).permute(2, 0, 1))
        assert torch.equal(depths[k, 0], torch.from_numpy(decoded[positive]["depth"]))


def test_read_ahead_threads_change_no_batch_and_resume_stays_exact(split):
    kw = dict(rank=1, world_size=2, micro_batch=2, resolution=16, shuffle_buffer=5, seed=3)
    full = list(st.make_loader(st.open_split(split, "train", num_steps=9, fetch_threads=0, **kw)[0], 2))
    threaded = list(st.make_loader(st.open_split(split, "train", num_steps=9, fetch_threads=8, **kw)[0], 2))
    tail = list(st.make_loader(st.open_split(split, "train", num_steps=3, start_step=6, **kw)[0], 2))
    for a, b in zip(full, threaded):
        assert a["id"] == b["id"] and a["pos_id"] == b["pos_id"] and torch.equal(a["pos_image"], b["pos_image"])
    for a, b in zip(full[6:], tail):
        assert (a["step"], a["id"], a["pos_id"]) == (b["step"], b["id"], b["pos_id"])
        assert torch.equal(a["pos_depth"], b["pos_depth"]) and torch.equal(a["image"], b["image"])
    ids = [i for b in full[:5] for i in b["id"]]  # rank 1's first epoch: 10 of the 20 samples, each once
    assert len(ids) == len(set(ids)) == 10


def _counted_run(root: str, counts, monkeypatch, **kw):
    """(storage bytes of the shards and row files read, batches) of one loader pass, counted by the file system."""
    from bench.mining_io import COUNT_DIR_ENV, _read_logs

    for log in counts.iterdir():
        log.unlink()
    spec, _ = st.open_split(root, "train", micro_batch=4, resolution=224, **kw)
    monkeypatch.setenv(COUNT_DIR_ENV, str(counts))
    batches = list(st.make_loader(spec, 0))
    monkeypatch.delenv(COUNT_DIR_ENV)
    return sum(n for _, _, n, name in _read_logs(str(counts)) if name.endswith((".tar", ".idx"))), batches


def test_bytes_read_per_trained_sample_within_1_2x_of_the_bytes_decoded(tmp_path, monkeypatch):
    """Counted at the storage layer (``bench.mining_io``'s counting file system over the local disk): without
    read-ahead the loader reads exactly the bytes its batches report, and at 224 px those are within 1.2x
    of the member bytes it decodes (anchor rgb, depth, label, meta + the positive's rgb, depth; the rest is
    tar headers and the rows). No offsets table is read (the rows carry every range). With the shuffle buffer and read-ahead threads on, storage also serves what was read
    ahead past the last batch: at most the buffer plus two planned segments."""
    from bench.mining_io import _read_logs, register_counting

    register_counting()
    counts = tmp_path / "counts"
    counts.mkdir()
    root = "counted://" + str(tmp_path / "shards")
    shards.write_test_shards(root, n_samples=16, size=(224, 224), num_positives=7, samples_per_shard=8)
    storage, batches = _counted_run(root, counts, monkeypatch, shuffle_buffer=0, fetch_threads=0, num_steps=8)
    reported, decoded = sum(b["bytes"] for b in batches), sum(b["decoded"] for b in batches)
    assert storage == reported > 0 and sum(len(b["id"]) for b in batches) == 32
    assert not any(name.endswith(".npz") for _, _, _, name in _read_logs(str(counts)))
    assert decoded <= storage <= 1.2 * decoded, (storage, decoded)
    storage, batches = _counted_run(root, counts, monkeypatch, shuffle_buffer=4, fetch_threads=4, num_steps=8)
    reported, decoded = sum(b["bytes"] for b in batches), sum(b["decoded"] for b in batches)
    per_sample = max(int(t.stop[g] - t.start[g]) for t in [offsets_table(f"{root}/train/offsets.npz")]
                     for g in range(16))
    assert reported <= storage <= reported + (4 + 2 * 4) * per_sample
    assert decoded <= reported <= 1.2 * decoded, (reported, decoded)


@pytest.mark.parametrize("codec", codecs.DEPTH_CODECS)
def test_depth_fidelity_within_the_codec_bound(codec):
    rng = np.random.default_rng(0)
    depth = np.clip(rng.random((224, 224), dtype=np.float32), 0, 1)
    depth[0, :3] = (0.0, 1.0, 0.5 / 65535)
    out = codecs.decode_depth(codecs.encode_depth(depth, codec), codecs.DEPTH_MEMBER[codec])
    assert out.dtype == np.float32 and out.shape == depth.shape
    assert np.abs(out - depth).max() <= codecs.depth_error_bound(codec) + 1e-7
    assert codecs.depth_error_bound(codec) == (0.5 / 255 if codec == "png8" else 0.5 / 65535)
    # stage 1 (16-bit PNG) -> stage 2: the same 16-bit levels, so no error beyond stage 1's own
    levels = codecs.decode_depth(codecs.encode_depth(depth, "png16"))
    if codec != "png8":
        assert np.array_equal(codecs.decode_depth(codecs.encode_depth(levels, codec), codecs.DEPTH_MEMBER[codec]), levels)


@pytest.mark.parametrize("codec,quality,mean_max,max_max", [("png", 95, 0.0, 0), ("jpeg", 95, 2.0, 30),
                                                            ("jpeg", 90, 2.6, 60), ("webp", 90, 3.0, 100)])
def test_rgb_fidelity_on_rendered_crops_at_224(codec, quality, mean_max, max_max):
    """Mean / max absolute error (0..255) of each RGB encoding on five-cropped synthetic scenes at 224 px
    (measured here: JPEG q95 1.8 / 22, q90 2.3 / 46, WebP q90 2.7 / 82; bench/datapath.json measures the same on
    CamVid frames); labels are never lossy."""
    src = SyntheticSource(2, 240, 320, 0, "train")
    crops = [resize_center_crop(c.image, 224) for i in src.ids() for c in five_crop(src.load(i), 0.5)]
    errors = []
    for image in crops:
        data = codecs.encode_image(image, codec, quality)
        name = codecs.RGB_MEMBER[codec]
        errors.append(np.abs(codecs.decode_image(data, name).astype(int) - image.astype(int)))
    assert float(np.mean([e.mean() for e in errors])) <= mean_max
    assert max(int(e.max()) for e in errors) <= max_max


def test_uint8_batches_give_the_features_of_float_images():
    from depthg.models import build_backbone
    from depthg.step import backbone_features

    torch.manual_seed(0)
    backbone = build_backbone("tiny_vit").eval()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(backbone_features(backbone, images), backbone_features(backbone, images.float() / 255))
    channels_last = images.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # the loader's collate
    assert st.collate(list(channels_last)).stride() == channels_last.stride()
    torch.testing.assert_close(backbone_features(backbone, channels_last), backbone_features(backbone, images))


def test_unlabelled_stage_2_samples_batch_as_all_ignore(tmp_path):
    shards.write_test_shards(str(tmp_path), 6, size=(16, 16), labelled=False, samples_per_shard=3)
    spec, _ = st.open_split(str(tmp_path), "train", micro_batch=3, resolution=16, num_steps=2)
    for batch in st.make_loader(spec, 0):
        assert batch["label"].dtype == torch.int64 and bool((batch["label"] == -1).all())


def test_make_loader_pins_memory_when_asked(split):
    spec, _ = st.open_split(split, "train", micro_batch=2, resolution=16, num_steps=1)
    assert st.make_loader(spec, 0).loader.pin_memory is False
    assert st.make_loader(spec, 0, pin_memory=True).loader.pin_memory is True


def test_old_schema_train_split_is_refused_by_name(tmp_path):
    from cluster import preflight
    from depthg.config import load_config

    shards.write_test_shards(str(tmp_path), 4, with_positives=False)  # stage 1 stays readable as it is
    folder = shards.split_dir(str(tmp_path), "train", "train")
    os.makedirs(folder)
    shards.write_json(os.path.join(folder, "manifest.json"), {"schema": shards.SCHEMA, "kind": "train", "split": "train",
                                                              "shards": [], "total": 0})
    with pytest.raises(shards.ShardError, match=rf"{folder}/manifest.json: stage-2 shards written with embedded "
                                                r"positives .*python launch/mine_neighbors.py shards.root="):
        shards.read_manifest(folder)
    with pytest.raises(shards.ShardError, match="embedded positives"):
        preflight.check_shards(load_config(None, [f"shards.root={tmp_path}"]), 1)
    assert shards.read_manifest(shards.split_dir(str(tmp_path), "train", "depth"))["schema"] == shards.SCHEMA


def test_preflight_refuses_another_resolution_than_the_shards(tmp_path):
    from cluster import preflight
    from depthg.config import ConfigError, load_config

    shards.write_test_shards(str(tmp_path), 12, size=(32, 32), samples_per_shard=6)
    over = [f"shards.root={tmp_path}", "train.micro_batch_per_gpu=2", "train.val_every=0"]
    assert preflight.check_shards(load_config(None, [*over, "data.resolution=32"]), 1)["resolution"] == 32
    with pytest.raises(ConfigError, match=r"data.resolution=64, but .*manifest.json was written at resolution 32 "
                                          r".*set data.resolution=32, or remine at 64 .*mine_neighbors.py"):
        preflight.check_shards(load_config(None, [*over, "data.resolution=64"]), 1)


def test_evaluation_reads_the_lossless_stage_1_split(tmp_path):
    from cluster import evaluator

    shards.write_test_shards(str(tmp_path), 4, size=(40, 48), with_positives=False, split="val")
    shards.write_test_shards(str(tmp_path), 4, size=(32, 32), split="val")  # the mined val split (training)
    urls, manifest = evaluator.find_split(str(tmp_path), "val")
    assert manifest["kind"] == "depth" and all("/depth/val/" in u for u in urls)
    urls, manifest = evaluator.find_split(shards.split_dir(str(tmp_path), "val", "train"), "val")
    assert manifest["kind"] == "train"  # a split folder named explicitly is read as it is
    assert io.exists(urls[0])


def test_s3_split_streams_by_exact_ranges_in_forked_workers(s3, tmp_path):
    """The same batches from S3 (moto) as from a local copy: anchors and positives are exact ranged reads,
    the parent reads first (a file system cached before the DataLoader forks) and 2 workers read after."""
    root = f"{s3}/dp"
    shards.write_test_shards(root, 12, size=(16, 16), num_positives=2, samples_per_shard=4)
    shards.write_test_shards(str(tmp_path), 12, size=(16, 16), num_positives=2, samples_per_shard=4)
    kw = dict(micro_batch=2, resolution=16, shuffle_buffer=3, num_steps=6)
    local = list(st.make_loader(st.open_split(str(tmp_path), "train", **kw)[0], 2))
    list(st.eval_batches(st.open_split(root, "train", **kw)[0]))  # the parent touches S3 before the fork
    remote = list(st.make_loader(st.open_split(root, "train", **kw)[0], 2))
    assert [b["id"] for b in remote] == [b["id"] for b in local] and [b["pos_id"] for b in remote] == [b["pos_id"] for b in local]
    assert all(torch.equal(a["pos_image"], b["pos_image"]) for a, b in zip(local, remote))
    assert [b["bytes"] for b in remote] == [b["bytes"] for b in local]  # what was asked for, not a 5 MB block
