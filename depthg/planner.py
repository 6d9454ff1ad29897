"""Which samples each (rank, loader worker) slot reads: a pure plan over the manifest's per-shard counts.

Training reads an endless sequence of epochs. Epoch ``e`` lays the split's samples out in one sequence:
the shards in a permutation seeded by ``(seed, e)`` (``epoch_shard_order``), each shard's samples in
stored order, positions ``0 .. N-1``. The ``S = ranks x loader workers`` slots cut that sequence into
contiguous ranges (``slot_bounds``): after ``e`` epochs slot ``s`` has read ``A_s(e) = floor((e N + s) / S)``
samples (``slot_offset``), within one sample of ``e N / S``, so all slots advance at the rate the trainer
consumes them (every slot yields one micro batch per ``W`` local steps), and in epoch ``e`` it reads the
``A_s(e+1) - A_s(e)`` positions that follow those of slots ``0 .. s-1``. Since the ``A_s`` sum to ``e N``
(Hermite's identity), the slots together read each sample exactly once per epoch, each slot reads only
the byte ranges of the shards its range covers (``segments``; a shard shared by several slots is read
once in total, in disjoint ranges), also with fewer samples than slots. A slot's stream is the concatenation of its ranges, epoch after epoch; its ``k``-th micro
batch is stream positions ``[k B, (k+1) B)``, which may straddle two epochs. Nothing is dropped and
nothing is read twice within an epoch, for any world size, worker count and shard count.

Worker ``w`` of a rank yields the rank's local steps ``t`` with ``t % W == w`` (its batch ``k = t // W``);
``worker_steps`` lists them and ``locate`` turns a batch index into (epoch, samples to skip), which makes
a resumed run exact to the sample. Validation uses the same ranges over the manifest order, read once
(``eval_segments``). ``steps_per_epoch`` is the whole optimizer steps one epoch of samples fills, for
logging and the check that a training split can fill one step.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

SHARD_ORDER_SALT = 0x5A  # separates the shard-order stream from the per-slot streams of the same seed + epoch


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


def slot_segments(counts: Sequence[int], seed: int, epoch: int, slot: int, slots: int) -> list[tuple[int, int, int]]:
    """The shard ranges ``slot`` reads in training epoch ``epoch``."""
    lo, hi = slot_bounds(sum(counts), slots, slot, epoch)
    return segments(counts, epoch_shard_order(len(counts), seed, epoch), lo, hi)


def eval_segments(counts: Sequence[int], slot: int, slots: int) -> list[tuple[int, int, int]]:
    """The shard ranges ``slot`` reads in a single pass over the split in manifest order (validation)."""
    lo, hi = slot_bounds(sum(counts), slots, slot, 0)
    return segments(counts, range(len(counts)), lo, hi)


def worker_steps(start_step: int, end_step: int, num_workers: int, worker: int) -> range:
    """Local steps ``t`` in ``[start_step, end_step)`` that loader worker ``worker`` yields (``t % W == w``);
    step ``t`` is that worker's batch ``t // W``."""
    first = start_step + (worker - start_step) % num_workers
    return range(first, end_step, num_workers)
