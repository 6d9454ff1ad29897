"""The streaming pipeline on real tiny shards: ranks read disjoint samples, every sample equally often over
epochs, shards shared by slots are read once, validation reads each sample once for any world size,
positives are drawn per use from the K referenced, and resume replays the stream exactly (the pure plan
is tested in test_planner.py)."""
from __future__ import annotations

import collections
import os

import numpy as np
import pytest
import torch

from depthg import shards as shardfmt
from depthg import streaming as st


def test_shuffle_stage_is_a_permutation_and_seeded():
    items = [{"i": i} for i in range(50)]
    a = [s["i"] for s in st.shuffle_stage(items, 8, np.random.default_rng(1))]
    b = [s["i"] for s in st.shuffle_stage(items, 8, np.random.default_rng(1))]
    assert sorted(a) == list(range(50)) and a == b and a != list(range(50))


def test_positive_stage_draws_uniformly_over_the_k_referenced_indices():
    raw = {"__key__": "x", "rgb.jpg": b"a", "meta.json": b'{"id": "x", "positives": [10, 11, 12]}'}
    out = list(st.positive_stage([dict(raw) for _ in range(3000)], np.random.default_rng(0)))
    picks = np.bincount([o["__positive__"] for o in out], minlength=3)
    assert all(o["__positive_index__"] == 10 + o["__positive__"] for o in out)
    assert abs(picks / 3000 - 1 / 3).max() < 0.04  # 3000 draws: sd ~0.009
    # one rng.integers(K) per sample, nothing else: the draws the loader made when the K were embedded
    ref = np.random.default_rng(0)
    assert [o["__positive__"] for o in out] == [int(ref.integers(3)) for _ in range(3000)]
    unmined = list(st.positive_stage([{"__key__": "y", "rgb.png": b"a"}], np.random.default_rng(0)))
    assert "__positive_index__" not in unmined[0]  # K = 0: the crop is its own positive


def _collect(spec, workers):
    return list(st.make_loader(spec, workers))


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shards"))
    shardfmt.write_test_shards(root, n_samples=24, size=(12, 16), num_positives=3, samples_per_shard=3)
    return root


def test_ranks_see_disjoint_samples_and_equal_steps(tiny_shards):
    world, seen = 2, []
    for rank in range(world):
        spec, manifest = st.open_split(tiny_shards, "train", rank=rank, world_size=world, micro_batch=2,
                                       resolution=8, shuffle_buffer=4, seed=3)
        batches = _collect(spec, workers=2)
        assert len(batches) == 24 // (2 * world) == spec.steps_per_epoch
        assert [b["step"] for b in batches] == list(range(len(batches)))
        b = batches[0]
        assert b["image"].shape == (2, 3, 8, 8) and b["pos_image"].shape == (2, 3, 8, 8)
        assert b["depth"].shape == (2, 1, 8, 8) and b["label"].dtype == torch.int64
        assert b["image"].dtype == b["pos_image"].dtype == torch.uint8 and b["depth"].dtype == torch.float32
        seen.append([i for b in batches for i in b["id"]])
    for ids in seen:
        assert len(ids) == len(set(ids))  # balanced shards: no repeat within a rank's epoch
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == 24


def test_every_sample_equally_often_over_epochs_with_uneven_shards(tmp_path):
    """13 samples in shards of 4, 4, 4, 1 over 2 ranks x 2 loader workers, micro batch 2: the 4 slots read
    13 / 4 samples per epoch each, so 26 local steps per rank (8 epochs) train every sample exactly 8
    times; the old planner's equal-steps rule cycled short slots and left samples out instead."""
    shardfmt.write_test_shards(str(tmp_path), n_samples=13, size=(8, 8), num_positives=1, samples_per_shard=4)
    ids = []
    for rank in range(2):
        spec, _ = st.open_split(str(tmp_path), "train", rank=rank, world_size=2, micro_batch=2, resolution=4,
                                shuffle_buffer=3, num_steps=26)
        batches = _collect(spec, workers=2)
        assert [b["step"] for b in batches] == list(range(26))
        ids += [i for b in batches for i in b["id"]]
    assert collections.Counter(ids) == {f"train-{i:05d}": 8 for i in range(13)}


def test_fewer_shards_than_slots_read_each_shard_once(tmp_path):
    """2 shards over 2 ranks x 2 workers: each slot reads its half of one shard as one exact range, so one
    epoch reads the shards' sample bytes once in total (the old planner read every shard in every slot), plus
    one positive's rgb + depth per trained sample (the bytes the offsets table gives it) and each sample's row
    (which carries those ranges)."""
    shardfmt.write_test_shards(str(tmp_path), n_samples=16, size=(8, 8), num_positives=1, samples_per_shard=8)
    urls = shardfmt.shard_urls(str(tmp_path), "train")
    sidecars = [shardfmt.read_sidecar(str(tmp_path / "train"), os.path.basename(u)) for u in urls]
    size = sum(info["offsets"][-1] for info in sidecars)  # the samples' bytes (the end-of-archive padding aside)
    assert all(0 < os.path.getsize(u) - info["offsets"][-1] <= 10240 for u, info in zip(urls, sidecars))
    table = shardfmt.read_index(str(tmp_path / "train"))
    read, ids, positives = 0, [], 0
    for rank in range(2):
        spec, _ = st.open_split(str(tmp_path), "train", rank=rank, world_size=2, micro_batch=2, resolution=4,
                                shuffle_buffer=0, num_steps=4)
        batches = _collect(spec, workers=2)
        read += sum(b["bytes"] for b in batches)
        ids += [i for b in batches for i in b["id"]]
        for b in batches:
            for pid in b["pos_id"]:
                g = int(pid.split("-")[1])
                positives += int(table.prefix[g] - table.start[g])
    assert sorted(ids) == [f"train-{i:05d}" for i in range(16)]  # one epoch, each sample once
    assert read == size + positives + 16 * shardfmt.row_dtype(1).itemsize


def test_eval_batches_count_every_sample_once_for_any_world_size(tmp_path):
    """Validation: 10 samples, micro batch 4, 3 ranks: slices of 3, 3, 4, partial batches, each sample once."""
    shardfmt.write_test_shards(str(tmp_path), n_samples=10, size=(8, 8), num_positives=1, samples_per_shard=4,
                               split="val")
    for world in (1, 2, 3, 4, 11):
        ids, sizes = [], []
        for rank in range(world):
            spec, _ = st.open_split(str(tmp_path), "val", rank=rank, world_size=world, micro_batch=4, resolution=4)
            for batch in st.eval_batches(spec):
                ids += batch["id"]
                sizes.append(len(batch["id"]))
                assert batch["image"].shape[0] == len(batch["id"]) <= 4
        assert sorted(ids) == [f"val-{i:05d}" for i in range(10)], world
    assert sizes.count(0) == 0


def test_resume_replays_the_same_batches(tiny_shards):
    kw = dict(rank=1, world_size=2, micro_batch=2, resolution=8, shuffle_buffer=4, seed=5)
    spec, _ = st.open_split(tiny_shards, "train", num_steps=12, **kw)  # crosses an epoch (6 steps each)
    full = _collect(spec, workers=2)
    spec2, _ = st.open_split(tiny_shards, "train", num_steps=5, start_step=7, **kw)
    tail = _collect(spec2, workers=2)
    assert [b["step"] for b in tail] == list(range(7, 12))
    for a, b in zip(full[7:], tail):
        assert a["id"] == b["id"]
        assert torch.equal(a["pos_image"], b["pos_image"]) and torch.equal(a["image"], b["image"])
    # a new epoch reshuffles: epoch 0 and epoch 1 orders differ
    assert [b["id"] for b in full[:6]] != [b["id"] for b in full[6:12]]


def test_missing_split_names_generate_depth(tmp_path):
    with pytest.raises(FileNotFoundError, match="generate_depth"):
        st.open_split(str(tmp_path), "train")
