"""The sample planner (depthg.planner), brute force over layouts: every sample once per epoch for any world
size, loader workers and shard count; a shard's bytes read once in total; slots in step; exact resume
positions; the stage-2 write order (depthg.shards.shuffled_layout)."""
from __future__ import annotations

import collections
import itertools

import numpy as np
import pytest

from depthg import planner, shards

LAYOUTS = {  # name -> samples per shard
    "one shard": [37],
    "fewer shards than slots": [5, 9, 3],
    "cityscapes-like 47 shards": [320] * 46 + [155],
    "uneven": [1, 64, 7, 0, 33, 12, 90, 2],
    "tiny": [2, 1],
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ranks", [1, 2, 3, 16, 64])
def test_every_sample_once_per_epoch_and_every_shard_byte_once(layout, ranks):
    counts = LAYOUTS[layout]
    total = sum(counts)
    for epoch in range(3):
        order, seen = planner.epoch_shard_order(len(counts), 7, epoch), collections.Counter()
        for rank in range(ranks):
            lo, hi = planner.slot_bounds(total, ranks, rank, epoch)
            segs = planner.segments(counts, order, lo, hi)
            assert sum(stop - start for _, start, stop in segs) == hi - lo
            for shard, start, stop in segs:
                assert 0 <= start < stop <= counts[shard]
                seen.update((shard, i) for i in range(start, stop))
        # every sample of every shard exactly once: no rank reads a byte another rank reads
        assert seen == collections.Counter((s, i) for s, c in enumerate(counts) for i in range(c))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ranks,workers,batch", [(1, 1, 4), (2, 2, 3), (3, 4, 2), (16, 2, 32), (64, 4, 32)])
def test_worker_chunks_read_each_sample_once_per_epoch(layout, ranks, workers, batch):
    """Each loader worker reads the chunks of its steps; over all ranks and workers every epoch's samples
    come once, and the first floor(N / (R B)) steps hold no sample twice."""
    counts = LAYOUTS[layout]
    total = sum(counts)
    steps = -(-3 * total // (ranks * batch))  # about three epochs
    per_epoch, window = collections.defaultdict(collections.Counter), collections.Counter()
    for rank, worker in itertools.product(range(ranks), range(workers)):
        for t in planner.worker_steps(0, steps, workers, worker):
            segs = planner.stream_segments(counts, 7, ranks, rank, t * batch, t * batch + batch)
            assert sum(b - a for _, _, a, b in segs) == batch
            for epoch, shard, a, b in segs:
                per_epoch[epoch].update((shard, i) for i in range(a, b))
                if t < total // (ranks * batch):
                    window.update((shard, i) for i in range(a, b))
    every = collections.Counter((s, i) for s, c in enumerate(counts) for i in range(c))
    complete = min(planner.locate(total, ranks, r, steps * batch)[0] for r in range(ranks))
    assert complete >= 2
    for epoch in range(complete):
        assert per_epoch[epoch] == every, epoch
    assert max(window.values(), default=1) == 1


@pytest.mark.parametrize("total,ranks,workers,batch", [(13, 2, 2, 2), (50, 3, 4, 4), (7, 4, 3, 5), (1000, 1, 2, 32)])
def test_worker_start_matches_an_uninterrupted_worker(total, ranks, workers, batch):
    """Brute force: the samples a worker's earlier batches took from the epoch of its first resumed chunk."""
    for rank, worker in itertools.product(range(ranks), range(workers)):
        for first in planner.worker_steps(0, 40, workers, worker):
            chunk, begin, skip = planner.worker_start(total, ranks, rank, batch, workers, worker, first)
            epoch = planner.locate(total, ranks, rank, first * batch)[0]
            assert begin == planner.slot_offset(total, ranks, rank, epoch)
            taken = [p for t in range(worker, first, workers) for p in range(t * batch, t * batch + batch)]
            assert skip == sum(p >= begin for p in taken)
            mine = [t for t in range(worker, first + 1, workers) if t * batch + batch > begin]
            assert chunk == mine[0]


@pytest.mark.parametrize("total,slots", [(13, 4), (15000, 32), (3, 256), (1000003, 256), (1, 1)])
def test_slots_advance_together_and_locate_inverts_the_offsets(total, slots):
    for slot, epoch in itertools.product(range(0, slots, max(1, slots // 7)), (0, 1, 5, 1000)):
        offset = planner.slot_offset(total, slots, slot, epoch)
        assert abs(offset - epoch * total / slots) < 1  # no slot drifts ahead of the others
        lo, hi = planner.slot_bounds(total, slots, slot, epoch)
        assert planner.slot_offset(total, slots, slot, epoch + 1) - offset == hi - lo
        for position in {offset, offset + (hi - lo) // 2, offset + hi - lo - 1}:
            if hi > lo:
                assert planner.locate(total, slots, slot, position) == (epoch, position - offset)


def test_epoch_orders_differ_and_are_the_same_on_every_rank():
    a, b = planner.epoch_shard_order(50, 3, 0), planner.epoch_shard_order(50, 3, 1)
    assert sorted(a) == list(range(50)) and a != b and a == planner.epoch_shard_order(50, 3, 0)


def test_eval_segments_cover_the_split_once_in_manifest_order():
    counts = [4, 4, 2]
    rows = [planner.eval_segments(counts, r, 3) for r in range(3)]
    flat = [(s, i) for row in rows for s, a, b in row for i in range(a, b)]
    assert flat == [(s, i) for s, c in enumerate(counts) for i in range(c)]
    assert [sum(b - a for _, a, b in row) for row in rows] == [3, 3, 4]


@pytest.mark.parametrize("start,end,workers", [(0, 10, 1), (3, 17, 2), (5, 12, 4), (7, 7, 3)])
def test_worker_steps_split_the_local_steps(start, end, workers):
    got = []
    for w in range(workers):
        steps = planner.worker_steps(start, end, workers, w)
        assert all(t % workers == w for t in steps)  # worker w makes the local steps t % W == w
        got += list(steps)
    assert sorted(got) == list(range(start, end))


def test_steps_per_epoch_formula():
    assert planner.steps_per_epoch(100, 8) == 12
    assert planner.steps_per_epoch(100, 8, grad_accum=5) == 10  # whole optimizer steps only
    with pytest.raises(ValueError, match="micro_batch_per_gpu"):
        planner.steps_per_epoch(3, 8)


def test_shuffled_layout_keeps_sizes_and_spreads_the_crops_of_an_image():
    per_shard = [[f"im{i}_c{k}" for i in range(s, s + 64) for k in range(5)] for s in range(0, 640, 64)]
    out = shards.shuffled_layout(per_shard, seed=0)
    assert [len(p) for p in out] == [len(p) for p in per_shard]
    assert sorted(i for p in out for i in p) == sorted(i for p in per_shard for i in p)
    assert out == shards.shuffled_layout(per_shard, seed=0) and out != shards.shuffled_layout(per_shard, seed=1)
    # neighbours in a shard are no longer crops of one image (chance: 4 / 3199)
    same = sum(a.split("_")[0] == b.split("_")[0] for p in out for a, b in zip(p, p[1:]))
    assert same / sum(len(p) - 1 for p in out) < 0.01
    assert np.mean([a.split("_")[0] == b.split("_")[0] for p in per_shard for a, b in zip(p, p[1:])]) > 0.7


def test_grouped_layout_from_counts_each_sample_once_crops_of_an_image_apart():
    """Layout grouped/3 (``plan_units`` + ``deal``) from the depth shards' counts alone: every depth sample in
    exactly one training shard, each unit reading its own depth shards (each depth shard in one unit), the five
    crops of an image (adjacent in a depth shard) in five different training shards, seeded and stable."""
    counts = [320] * 40 + [100, 0, 5]
    units = shards.plan_units(counts, seed=0)
    assert shards.unit_size(len(counts)) == 6 and len(units) == 8
    assert sorted(d for u in units for d in u.depth) == list(range(len(counts)))
    assert [u.first for u in units] == list(np.cumsum([0] + [len(u.counts) for u in units[:-1]]))
    placed = []
    for u in units:
        starts = np.cumsum([0] + [counts[d] for d in u.depth])
        source = [(d, i) for d in u.depth for i in range(counts[d])]  # positions of the unit's concatenation
        parts = shards.deal(u, seed=0)
        assert [len(p) for p in parts] == list(u.counts) and max(u.counts) - min(u.counts) <= 1
        for j, part in enumerate(parts):
            placed += [source[p] for p in part]
            image = {(source[p][0], source[p][1] // 5) for p in part}  # 5 crops per image, adjacent
            assert len(image) == len(part)  # no two crops of one image in a shard
        assert starts[-1] == sum(u.counts)
    assert sorted(placed) == sorted((d, i) for d, c in enumerate(counts) for i in range(c))
    again = shards.plan_units(counts, seed=0)
    assert again == units and shards.plan_units(counts, seed=1) != units
    assert [shards.unit_size(n) for n in (1, 3, 8, 24, 47, 775, 10**5)] == [1, 3, 5, 5, 6, 16, 16]
    assert all(np.array_equal(a, b) for a, b in zip(shards.deal(units[3]), shards.deal(again[3])))
