"""The streaming pipeline: split plans are disjoint + complete, every rank runs the same number of
steps, positives are drawn per use from the embedded K, and resume replays the stream exactly."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from depthg import shards as shardfmt
from depthg import streaming as st


@pytest.mark.parametrize("n_shards,world,workers", [(8, 2, 2), (3, 2, 2), (1, 2, 1), (5, 4, 1), (7, 1, 3)])
def test_plan_split_disjoint_and_complete(n_shards, world, workers):
    names = [f"s{i}" for i in range(n_shards)]
    sizes = {n: 5 for n in names}
    owner = {}
    for rank, worker in itertools.product(range(world), range(workers)):
        urls, stride, offset = st.plan_split(names, rank, world, worker, workers)
        index = 0
        for name in urls:  # brute force over the global sample index the read stage uses
            for j in range(sizes[name]):
                if index % stride == offset:
                    assert (name, j) not in owner, "a sample read by two slots"
                    owner[(name, j)] = (rank, worker)
                index += 1
    assert len(owner) == n_shards * 5


def test_steps_per_epoch_formula_and_worker_steps():
    assert st.steps_per_epoch(100, 8) == 12
    assert st.steps_per_epoch(100, 8, grad_accum=5) == 10  # whole optimizer steps only
    with pytest.raises(ValueError, match="micro_batch_per_gpu"):
        st.steps_per_epoch(3, 8)
    for steps, workers in [(7, 2), (12, 3), (1, 4)]:
        counts = st.worker_steps(steps, workers)
        assert sum(counts) == steps and max(counts) - min(counts) <= 1


@pytest.mark.parametrize("start,num,workers", [(0, 0, 2), (3, 9, 2), (5, 7, 3), (0, 14, 1)])
def test_worker_plan_covers_each_step_once(start, num, workers):
    spec = st.StreamSpec(urls=["a"], total=40, micro_batch=4, start_step=start, num_steps=num, num_workers=workers)
    per_epoch = spec.steps_per_epoch  # 10
    got = []
    for w in range(workers):
        for epoch, skip, steps in st.worker_plan(spec, w):
            assert all(g // per_epoch == epoch and g % workers == w for g in steps)
            # skip = this worker's batches earlier in the epoch
            assert skip == sum(1 for g in range(epoch * per_epoch, steps[0]) if g % workers == w)
            got += steps
    assert sorted(got) == list(range(start, start + (num or per_epoch)))


def test_shuffle_stage_is_a_permutation_and_seeded():
    items = [{"i": i} for i in range(50)]
    a = [s["i"] for s in st.shuffle_stage(items, 8, np.random.default_rng(1))]
    b = [s["i"] for s in st.shuffle_stage(items, 8, np.random.default_rng(1))]
    assert sorted(a) == list(range(50)) and a == b and a != list(range(50))


def test_positive_stage_uniform_over_k():
    raw = {"__key__": "x", "rgb.png": b"a", "depth.png": b"d"}
    for k in range(3):
        raw[f"pos{k}.rgb.png"], raw[f"pos{k}.depth.png"] = f"r{k}".encode(), f"d{k}".encode()
    out = list(st.positive_stage([raw] * 3000, np.random.default_rng(0)))
    picks = np.bincount([o["__positive__"] for o in out], minlength=3)
    assert all(set(o) == {"__key__", "rgb.png", "depth.png", "pos0.rgb.png", "pos0.depth.png", "__positive__"}
               for o in out[:5])
    assert all(o["pos0.rgb.png"] == f"r{o['__positive__']}".encode() for o in out)
    assert abs(picks / 3000 - 1 / 3).max() < 0.04  # 3000 draws: sd ~0.009


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
        assert 0.0 <= float(b["image"].min()) and float(b["image"].max()) <= 1.0
        seen.append([i for b in batches for i in b["id"]])
    for ids in seen:
        assert len(ids) == len(set(ids))  # balanced shards: no repeat within a rank's epoch
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == 24


def test_short_worker_cycles_its_own_shards(tmp_path):
    """Unequal shards: a rank that runs short repeats its own samples, never another rank's."""
    shardfmt.write_test_shards(str(tmp_path), n_samples=13, size=(8, 8), num_positives=1, samples_per_shard=4)
    ids = []
    for rank in range(2):
        spec, _ = st.open_split(str(tmp_path), "train", rank=rank, world_size=2, micro_batch=3, resolution=4,
                                shuffle_buffer=2)
        batches = _collect(spec, workers=0)
        assert len(batches) == 2  # 13 // 6: same count on both ranks although they hold 8 and 5 samples
        ids.append([i for b in batches for i in b["id"]])
    assert not set(ids[0]) & set(ids[1])
    assert sorted(len(set(i)) for i in ids) == [5, 6]  # the short rank repeated one of its own


def test_resume_replays_the_same_batches(tiny_shards):
    kw = dict(rank=1, world_size=2, micro_batch=2, resolution=8, shuffle_buffer=4, seed=5)
    spec, _ = st.open_split(tiny_shards, "train", num_steps=12, **kw)  # crosses an epoch (E=6)
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
