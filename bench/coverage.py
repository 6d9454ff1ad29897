"""Sample coverage per epoch: the project's planner (``depthg.planner`` + ``depthg.streaming``) vs the one
before issue 15, over a grid of world sizes, loader workers and shard counts: table + JSON ``rows``.

    python launch/benchmark.py coverage [--out bench/coverage.json] [--batch 32 --buffer 256]

No image is decoded: the real stream stages (plan, positive, shuffle buffer, resume-exact slot streams)
run on placeholder samples whose ids say which source image they crop (5 crops per image, 64 images per
shard, as ``launch/generate_depth.py`` writes them). Each rank's micro batch at local step ``t`` is the
``t // W``-th batch of loader worker ``t % W``, as in training.

* ``seen_fraction`` / ``repeated_fraction`` / ``extra_fraction``: of the N samples, those trained at least
  once / more than once in one epoch, and the trainings beyond the first (the issue's "repeated"). An epoch is what the planner draws from one epoch of samples: for the current planner the
  samples tagged with epoch 0 (a slot's stream runs on into epoch 1, so a batch may straddle two epochs),
  for the old planner its ``steps_per_epoch`` steps. ``window_*``: the same counted over the first
  ``floor(N / global batch)`` steps, for both (no planner can show N samples in fewer steps than that).
* ``same_image_fraction``: anchors whose rank micro batch holds another crop of their own image (they
  become each other's negatives); ``chance`` is the value for a batch drawn at random.
* ``reads_per_trained_sample``: samples read from storage per sample trained in the epoch (1 = each byte
  read once; the old planner read every shard in every slot when there were fewer shards than slots).
* How random the order is (issue 26), per rank micro batch over the window: ``images_per_batch``, the distinct
  source images in a batch (a batch of B from a full shuffle holds ~B), and ``depth_shards_per_batch``, the
  distinct stage-1 shards (64 consecutive listed images each) its samples come from (a full shuffle: ~B).

``layout``: ``source`` (stage-2 shards in depth-shard order, the five crops of an image adjacent, before
issue 15), ``shuffled`` (``depthg.shards.shuffled_layout``: one global permutation, what ``cluster/mining.py``
wrote before issue 26; the full-shuffle reference) or ``grouped`` (layout ``grouped/3``,
``depthg.shards.plan_units`` + ``deal``: units of up to 16 random depth shards, each read once in the cluster,
what ``cluster/mining.py`` writes now).
The ``current`` planner is ``depthg.streaming.worker_stream`` itself (placeholder reads). The ``old`` planner
is modelled below from the code before issue 15 (shards split round-robin over the
slots, or every shard read by every slot with a sample stride when there were fewer shards than slots;
equal steps per rank; a short slot cycling its own shards), kept here as the baseline.
"""
from __future__ import annotations

import collections
import itertools
import time

import numpy as np

from depthg import planner, shards, streaming

CROPS, IMAGES_PER_SHARD = 5, 64
CASES = [  # (case, source images, ranks, workers); "issue": the three cases measured in issue 15
    ("COCO crops 16x2 (issue)", 49_600, 16, 2),
    ("COCO crops", 49_600, 64, 4),
    ("COCO crops", 49_600, 4, 2),
    ("Cityscapes 47 shards / 32 slots (issue)", 2_975, 16, 2),
    ("Cityscapes", 2_975, 1, 1),
    ("Cityscapes", 2_975, 8, 2),
    ("Cityscapes, fewer shards than slots", 2_975, 64, 4),
    ("24 shards over 32 slots (issue: fewer shards than slots)", 1_536, 16, 2),
    ("8 shards over 16 slots", 512, 4, 4),
]


def add_arguments(parser) -> None:
    parser.add_argument("--batch", type=int, default=32, help="micro batch per rank")
    parser.add_argument("--buffer", type=int, default=256, help="shuffle buffer per loader worker")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="only the issue's three cases")


def layout(images: int, kind: str) -> list[list[int]]:
    """Sample ids per stage-2 shard; sample ``i`` is crop ``i % 5`` of image ``i // 5``."""
    ids = list(range(images * CROPS))
    per_shard = [ids[i:i + IMAGES_PER_SHARD * CROPS] for i in range(0, len(ids), IMAGES_PER_SHARD * CROPS)]
    if kind == "grouped":
        out = []
        for unit in shards.plan_units([len(p) for p in per_shard]):
            source = [i for d in unit.depth for i in per_shard[d]]
            out += [[source[p] for p in part] for part in shards.deal(unit)]
        return out
    return shards.shuffled_layout(per_shard) if kind == "shuffled" else per_shard


class PlaceholderReader:
    """``ShardReader`` stand-in: yields ``{"__key__": id}`` for the planned ranges."""

    def __init__(self, parts: list[list[int]]):
        self.parts = parts

    def __call__(self, segs, skipped=None, meter=None):
        for shard, start, stop in segs:
            yield from ({"__key__": i} for i in self.parts[shard][start:stop])


def current_batches(parts, ranks: int, workers: int, batch: int, buffer: int, seed: int):
    """``(steps[rank][t] = [(id, epoch)], samples read for epoch 0)`` from ``depthg.streaming``, over enough
    steps for every rank to finish epoch 0. The reads are the ranges the workers request for epoch 0."""
    counts = [len(p) for p in parts]
    total = sum(counts)
    n_steps = -(-(max(planner.slot_offset(total, ranks, r, 1) for r in range(ranks)) + 1) // batch)
    steps, reads = [], 0
    for rank in range(ranks):
        spec = streaming.StreamSpec(urls=[""] * len(parts), counts=counts, rank=rank, world_size=ranks,
                                    micro_batch=batch, shuffle_buffer=buffer, seed=seed, num_workers=workers,
                                    reader=PlaceholderReader(parts))
        chunks = []
        for w in range(workers):
            stream = ((raw["__key__"], raw["__epoch__"]) for raw in streaming.worker_stream(spec, w, w))
            chunks.append([list(itertools.islice(stream, batch)) for _ in planner.worker_steps(0, n_steps, workers, w)])
        steps.append([chunks[t % workers][t // workers] for t in range(n_steps)])
        reads += sum(b - a for t in range(n_steps)
                     for e, _, a, b in planner.stream_segments(counts, seed, ranks, rank, t * batch, t * batch + batch)
                     if e == 0)
    return steps, reads


def old_batches(parts, ranks: int, workers: int, batch: int, buffer: int, seed: int):
    """The same for the planner before issue 15 (one epoch: its ``steps_per_epoch`` steps; every sample of
    a slot's shards is read, also those a sample stride drops)."""
    counts, slots = [len(p) for p in parts], ranks * workers
    order = planner.epoch_shard_order(len(parts), seed, 0)
    per_rank = planner.steps_per_epoch(sum(counts), batch * ranks)
    reads, steps = [0], []

    def read(names, stride: int, offset: int):
        for n, i in enumerate(x for s in names for x in parts[s]):
            reads[0] += 1
            if n % stride == offset:
                yield {"__key__": i}

    def slot_samples(slot: int, rng):
        mine, stride, offset = ((order[slot::slots], 1, 0) if len(parts) >= slots else (order, slots, slot))
        for pass_ in itertools.count():  # a short slot cycles its own shards
            names = mine if pass_ == 0 or stride > 1 else [mine[i] for i in rng.permutation(len(mine))]
            for raw in streaming.shuffle_stage(read(names, stride, offset), buffer, rng):
                yield raw["__key__"], 0

    for rank in range(ranks):
        chunks = []
        for w in range(workers):
            stream = slot_samples(rank * workers + w, streaming.slot_rng(seed, 0, rank, w, 1))
            n = per_rank // workers + (w < per_rank % workers)
            chunks.append([list(itertools.islice(stream, batch)) for _ in range(n)])
        steps.append([chunks[t % workers][t // workers] for t in range(per_rank)])
    return steps, reads[0]


def measure(steps, reads: int, total: int, batch: int) -> dict:
    """Coverage of epoch 0 and of the first ``floor(N / global batch)`` steps, same-image batches, reads."""
    window = total // (batch * len(steps))
    epoch0 = collections.Counter(i for rank in steps for b in rank for i, e in b if e == 0)
    in_window = collections.Counter(i for rank in steps for b in rank[:window] for i, _ in b)
    same = anchors = 0
    per_batch, per_shards = [], []
    for rank in steps:
        for b in rank[:window]:
            images = collections.Counter(i // CROPS for i, _ in b)
            same += sum(images[i // CROPS] > 1 for i, _ in b)
            anchors += len(b)
            per_batch.append(len(images))
            per_shards.append(len({i // (CROPS * IMAGES_PER_SHARD) for i, _ in b}))
    return {"seen_fraction": len(epoch0) / total, "repeated_fraction": sum(c > 1 for c in epoch0.values()) / total,
            "extra_fraction": sum(c - 1 for c in epoch0.values()) / total,
            "window_seen_fraction": len(in_window) / total,
            "window_repeated_fraction": sum(c > 1 for c in in_window.values()) / total,
            "same_image_fraction": same / max(1, anchors), "chance": (batch - 1) * (CROPS - 1) / (total - 1),
            "reads_per_trained_sample": reads / max(1, sum(epoch0.values())), "window_steps": window,
            "images_per_batch": float(np.mean(per_batch)), "depth_shards_per_batch": float(np.mean(per_shards))}


def _table(rows: list[dict]) -> str:
    head = (f"{'case':<58}{'planner':<9}{'layout':<9}{'ranks':>6}{'wkrs':>5}{'shards':>7}{'seen':>8}{'twice':>8}"
            f"{'same img':>9}{'chance':>8}{'win seen':>9}{'reads':>7}{'img/b':>7}{'shd/b':>7}")
    lines = [head]
    for r in rows:
        lines.append(f"{r['case']:<58}{r['planner']:<9}{r['layout']:<9}{r['world_size']:>6}{r['workers']:>5}"
                     f"{r['shards']:>7}{r['seen_fraction']:>8.2%}{r['repeated_fraction']:>8.2%}"
                     f"{r['same_image_fraction']:>9.2%}{r['chance']:>8.2%}{r['window_seen_fraction']:>9.2%}"
                     f"{r['reads_per_trained_sample']:>7.2f}{r['images_per_batch']:>7.1f}"
                     f"{r['depth_shards_per_batch']:>7.1f}")
    return "\n".join(lines)


def run(args) -> dict:
    rows, t0 = [], time.perf_counter()
    cases = [c for c in CASES if "issue" in c[0]] if args.quick else CASES
    for case, images, ranks, workers in cases:
        variants = [("old", "source"), ("current", "shuffled"), ("current", "grouped")]
        if "issue" in case:
            variants.insert(1, ("current", "source"))  # the planner alone, before the shuffled layout
        for name, kind in variants:
            parts = layout(images, kind)
            build = old_batches if name == "old" else current_batches
            steps, reads = build(parts, ranks, workers, args.batch, args.buffer, args.seed)
            row = {"case": case, "planner": name, "layout": kind, "world_size": ranks, "workers": workers,
                   "shards": len(parts), "samples": images * CROPS, "batch": args.batch, "buffer": args.buffer}
            row.update(measure(steps, reads, images * CROPS, args.batch))
            rows.append(row)
    print(_table(rows))
    return {"rows": rows, "seconds": time.perf_counter() - t0,
            "notes": "seen/twice: per planner epoch; win seen: over floor(N / global batch) steps; "
                     "reads: samples read from storage per sample trained"}
