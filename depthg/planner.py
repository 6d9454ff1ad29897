"""Which samples each rank and loader worker reads: a pure plan over the manifest's per-shard counts.

Training reads an endless sequence of epochs. Epoch ``e`` lays the split's ``N`` samples out in one
sequence: the shards in a permutation seeded by ``(seed, e)`` (``epoch_shard_order``), each shard's
samples in stored order. The ``R`` ranks cut that sequence into contiguous ranges (``slot_bounds``):
after ``e`` epochs rank ``r`` has read ``A_r(e) = floor((e N + r) / R)`` samples (``slot_offset``), within
one sample of ``e N / R``, and in epoch ``e`` it reads the ``A_r(e+1) - A_r(e)`` positions that follow
those of ranks ``0 .. r-1``. The ``A_r`` sum to ``e N`` (Hermite's identity), so the ranks together read
each sample exactly once per epoch, for any world size and shard count (also fewer samples than ranks),
and a shard shared by ranks is read once in total, in disjoint byte ranges.

A rank's stream is the concatenation of its ranges, epoch after epoch, and local step ``t`` trains stream
positions ``[t B, (t+1) B)`` (a chunk, which may straddle two epochs): ranks advance exactly with the
steps, so the first ``floor(N / (R B))`` steps hold no sample twice. Loader worker ``w`` reads the chunks
of the steps ``t % W == w`` (``worker_steps``) and only their byte ranges (``stream_segments``);
``worker_start`` says where a worker's replay starts, which makes a resumed run exact to the sample.
Validation reads each rank's range of the manifest order once (``eval_segments``). ``steps_per_epoch``
is the whole optimizer steps one epoch of samples fills (logging, and the check that a training split
can fill one step).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

SHARD_ORDER_SALT = 0x5A  # separates the shard-order stream from the per-worker streams of the same seed + epoch


def steps_per_epoch(total: int, global_micro_batch: int, grad_accum: int = 1) -> int:
    """Micro batches per rank in one epoch of samples: whole optimizer steps that ``total`` samples fill."""
    steps = (total // (global_micro_batch * grad_accum)) * grad_accum
    if steps < 1:
        raise ValueError(f"{total} samples cannot fill one optimizer step of "
                         f"{global_micro_batch} x {grad_accum} samples: write more shards or lower "
                         "train.micro_batch_per_gpu / train.grad_accum")
    return steps


def epoch_shard_order(n_shards: int, seed: int, epoch: int) -> list[int]:
    """The shard order of an epoch: the same permutation on every rank (seed + epoch)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, SHARD_ORDER_SALT]))
    return [int(i) for i in rng.permutation(n_shards)]


def _check(total: int, slots: int, slot: int) -> None:
    if total < 1:
        raise ValueError("the split has no samples: write shards first (python launch/generate_depth.py)")
    if not 0 <= slot < slots:
        raise ValueError(f"slot {slot} outside [0, {slots})")


def _before(slot: int, slots: int, samples: int) -> int:
    """Samples the slots ``0 .. slot-1`` read together in the first ``samples`` of the stream (Hermite)."""
    return slot * (samples // slots) + max(0, slot - slots + samples % slots)


def slot_offset(total: int, slots: int, slot: int, epoch: int) -> int:
    """Samples ``slot`` reads in epochs ``0 .. epoch-1`` together: ``floor((epoch N + slot) / S)``."""
    _check(total, slots, slot)
    return (epoch * total + slot) // slots


def slot_bounds(total: int, slots: int, slot: int, epoch: int) -> tuple[int, int]:
    """Positions ``[lo, hi)`` of epoch ``epoch``'s sample sequence that ``slot`` reads."""
    _check(total, slots, slot)

    def bound(s: int) -> int:
        return _before(s, slots, (epoch + 1) * total) - _before(s, slots, epoch * total)

    return bound(slot), bound(slot + 1)


def locate(total: int, slots: int, slot: int, position: int) -> tuple[int, int]:
    """``(epoch, skip)``: stream position ``position`` of ``slot`` is sample ``skip`` of its epoch range."""
    _check(total, slots, slot)
    if position < 0:
        raise ValueError(f"stream position must be >= 0, got {position}")
    epoch = -(-((position + 1) * slots - slot) // total) - 1  # the last epoch starting at or before it
    return epoch, position - slot_offset(total, slots, slot, epoch)


def segments(counts: Sequence[int], order: Sequence[int], lo: int, hi: int) -> list[tuple[int, int, int]]:
    """``[(shard, start, stop), ...]``: the shard sample ranges covering positions ``[lo, hi)`` of the
    sequence that lists the shards in ``order`` (each shard's samples in stored order)."""
    out, position = [], 0
    for shard in order:
        count = int(counts[shard])
        start, stop = max(lo, position), min(hi, position + count)
        if start < stop:
            out.append((int(shard), start - position, stop - position))
        position += count
        if position >= hi:
            break
    return out


def stream_segments(counts: Sequence[int], seed: int, slots: int, slot: int, lo: int,
                    hi: int) -> list[tuple[int, int, int, int]]:
    """``[(epoch, shard, start, stop), ...]``: the shard ranges holding positions ``[lo, hi)`` of ``slot``'s
    stream (its epoch ranges one after another), in stream order."""
    total, out = sum(counts), []
    epoch, _ = locate(total, slots, slot, lo)
    while lo < hi:
        begin = slot_offset(total, slots, slot, epoch)
        a, b = slot_bounds(total, slots, slot, epoch)
        take = min(hi - begin, b - a)
        if lo - begin < take:
            order = epoch_shard_order(len(counts), seed, epoch)
            out += [(epoch, *seg) for seg in segments(counts, order, a + lo - begin, a + take)]
            lo = begin + take
        epoch += 1
    return out


def worker_steps(start_step: int, end_step: int, num_workers: int, worker: int) -> range:
    """Local steps ``t`` in ``[start_step, end_step)`` that loader worker ``worker`` yields (``t % W == w``)."""
    first = start_step + (worker - start_step) % num_workers
    return range(first, end_step, num_workers)


def worker_start(total: int, slots: int, slot: int, batch: int, num_workers: int, worker: int,
                 first_step: int) -> tuple[int, int, int]:
    """Where loader ``worker`` of ``slot`` (a rank) starts so that its batch of step ``first_step`` comes out
    exactly as in an uninterrupted run: ``(first chunk, first stream position, samples to skip)``.

    A worker shuffles the samples of each epoch that its chunks hold (``t % W == w``); it replays, raw,
    the chunks of the epoch containing step ``first_step`` from that epoch's start, and drops the ``skip``
    samples its earlier batches took from that epoch.
    """
    epoch, _ = locate(total, slots, slot, first_step * batch)
    begin = slot_offset(total, slots, slot, epoch)
    chunk = begin // batch + (worker - begin // batch) % num_workers
    skip = sum(t * batch + batch - max(t * batch, begin) for t in range(chunk, first_step, num_workers))
    return chunk, begin, skip


def eval_segments(counts: Sequence[int], slot: int, slots: int) -> list[tuple[int, int, int]]:
    """The shard ranges ``slot`` reads in a single pass over the split in manifest order (validation)."""
    lo, hi = slot_bounds(sum(counts), slots, slot, 0)
    return segments(counts, range(len(counts)), lo, hi)
