"""The training data stream: WebDataset shards -> batches, as an explicit list of stages.

Stages, in order, each a small generator function (``STAGES`` lists them)::

    shard list (manifest, order shuffled by seed + epoch)
    -> split by rank / loader worker (``plan_split``: pure, disjoint, complete)
    -> read raw samples (``depthg.shards.iter_shard``, local or s3://)
    -> shuffle buffer (on the raw, still-compressed bytes: cheap to hold, and exact to replay)
    -> cycle (a slot that runs short starts another pass over its own shards)
    -> pick a positive uniformly from the K embedded ones (a draw per use, per sample)
    -> decode (only the anchor and the chosen positive)
    -> resize shorter side + centre-crop to ``data.resolution`` (``depthg.data.transforms.resize_center_crop``)
    -> batch (``image, depth, label, pos_image, pos_depth`` tensors + ``id`` list)

The shuffle buffer sits before decoding (not after, as in the textbook order) so that a resumed run
can skip the batches it already trained on by replaying the raw stream without decoding: resume is
exact to the sample, not just to the shard.

Equal steps per rank: an epoch is ``steps_per_epoch(total, global_micro_batch, grad_accum)`` micro
batches for every rank; within a rank, DataLoader worker ``w`` yields ``worker_steps(steps, W)[w]``
batches, cycling over its own shards if they run short, so no rank ever waits for another at the
end of an epoch. Randomness comes from generators seeded by ``(seed, epoch, rank, worker)`` (a
``numpy.random.SeedSequence`` of the tuple, so e.g. epoch 1 / rank 0 and epoch 0 / rank 1 differ);
no global RNG is touched.
"""
from __future__ import annotations

import itertools
import logging
import tarfile
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from depthg import shards as shardfmt
from depthg.data.transforms import resize_center_crop, to_tensor_image

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- pure planning
def steps_per_epoch(total: int, global_micro_batch: int, grad_accum: int = 1) -> int:
    """Micro batches per rank per epoch: whole optimizer steps that fit in ``total`` samples."""
    steps = (total // (global_micro_batch * grad_accum)) * grad_accum
    if steps < 1:
        raise ValueError(f"{total} samples cannot fill one optimizer step of "
                         f"{global_micro_batch} x {grad_accum} samples: write more shards or lower "
                         "train.micro_batch_per_gpu / train.grad_accum")
    return steps


def worker_steps(steps: int, num_workers: int) -> list[int]:
    """Batches each DataLoader worker yields so that the rank yields exactly ``steps``."""
    return [steps // num_workers + (w < steps % num_workers) for w in range(num_workers)]


def plan_split(names: Sequence[str], rank: int, world: int, worker: int, num_workers: int):
    """``(shard names, stride, offset)`` read by one (rank, worker) slot; pure.

    With at least as many shards as slots, whole shards are split (``depthg.shards.split_shards``)
    and every sample of them is kept (stride 1). With fewer shards than slots (tiny tests, a small
    val split) every slot reads all shards and keeps sample ``i`` when ``i % slots == slot``.
    Either way the slots are disjoint and together complete.
    """
    slots = world * num_workers
    if len(names) >= slots:
        return shardfmt.split_shards(names, rank, world, worker, num_workers), 1, 0
    return list(names), slots, rank * num_workers + worker


def epoch_shard_order(names: Sequence[str], seed: int, epoch: int) -> list[str]:
    """The global shard order of an epoch: the same permutation on every rank (seed + epoch)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, 0x5A]))
    return [names[i] for i in rng.permutation(len(names))]


def slot_rng(seed: int, epoch: int, rank: int, worker: int, stream: int) -> np.random.Generator:
    """Generator for one (seed, epoch, rank, worker); ``stream`` separates shuffle from positives."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, rank, worker, stream]))


# ----------------------------------------------------------------------------- stages
def shard_samples(url: str, skipped: list | None = None) -> Iterator[dict]:
    """Raw samples of one shard. A damaged shard (truncated, not a tar, missing) ends where it breaks
    and a sample lacking ``rgb.png`` / ``depth.png`` is dropped: each is logged naming the shard and
    appended to ``skipped``; training goes on. Storage that cannot be reached is still an error."""
    from depthg.io import StorageError

    try:
        for raw in shardfmt.iter_shard(url):
            missing = [m for m in ("rgb.png", "depth.png") if m not in raw]
            if missing:
                _skip(skipped, url, f"sample {raw.get('__key__')} lacks {', '.join(missing)}")
                continue
            yield raw
    except StorageError:
        raise
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        _skip(skipped, url, f"{type(exc).__name__}: {exc.args[0] if exc.args else exc}")


def _skip(skipped: list | None, url: str, error: str) -> None:
    log.warning("damaged shard %s skipped from here on: %s", url, error)
    if skipped is not None:
        skipped.append({"url": str(url), "error": error})


def read_stage(urls: Sequence[str], stride: int, offset: int, skipped: list | None = None) -> Iterator[dict]:
    """One pass over the slot's raw samples; with stride > 1 keep sample ``i`` if ``i % stride == offset``."""
    index = 0
    for url in urls:
        for raw in shard_samples(url, skipped):
            if index % stride == offset:
                yield raw
            index += 1


def cycle_stage(urls: Sequence[str], stride: int, offset: int, buffer: int,
                rng: np.random.Generator, skipped: list | None = None) -> Iterator[dict]:
    """Endless passes of read -> shuffle buffer, so a slot that runs short repeats its OWN samples.

    The buffer drains at the end of each pass, so the first pass holds each sample exactly once.
    Later passes visit the slot's shards in a new order (stride 1; with stride > 1 every slot must
    keep the same order for the slots to stay disjoint).
    """
    if not urls:
        raise ValueError("a data-loader slot got no shards: write more shards or use fewer workers")
    for pass_ in itertools.count():
        order = list(urls) if (pass_ == 0 or stride > 1) else [urls[i] for i in rng.permutation(len(urls))]
        kept = 0
        for raw in shuffle_stage(read_stage(order, stride, offset, skipped), buffer, rng):
            kept += 1
            yield raw
        if kept == 0:
            raise ValueError(f"slot {offset} of {stride} got no samples from {len(urls)} shard(s)")


def shuffle_stage(samples: Iterable[dict], size: int, rng: np.random.Generator) -> Iterator[dict]:
    """Classic reservoir-style shuffle buffer: fill to ``size``, then emit a random slot per input."""
    if size <= 1:
        yield from samples
        return
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        j = int(rng.integers(len(buffer)))
        buffer[j], sample = sample, buffer[j]
        yield sample
    while buffer:
        yield buffer.pop(int(rng.integers(len(buffer))))


def positive_stage(samples: Iterable[dict], rng: np.random.Generator) -> Iterator[dict]:
    """Keep one positive, drawn uniformly from the K embedded, renamed to ``pos0.*`` (K=0: itself)."""
    for raw in samples:
        k = shardfmt.num_positives(raw)
        out = {key: value for key, value in raw.items() if not key.startswith("pos")}
        if k > 0:
            j = int(rng.integers(k))
            out["pos0.rgb.png"], out["pos0.depth.png"] = raw[f"pos{j}.rgb.png"], raw[f"pos{j}.depth.png"]
            out["__positive__"] = j
        yield out


def skip_stage(samples: Iterable[dict], count: int) -> Iterator[dict]:
    """Drop the first ``count`` samples (resume inside an epoch) before any decoding."""
    return itertools.islice(samples, count, None)


def decode_stage(samples: Iterable[dict], skipped: list | None = None) -> Iterator[dict]:
    for raw in samples:
        try:
            sample = shardfmt.decode_sample(raw)
        except (shardfmt.ShardError, OSError, ValueError, SyntaxError) as exc:  # a corrupt PNG / JSON member
            _skip(skipped, raw.get("__url__", "?"), f"sample {raw.get('__key__')}: {type(exc).__name__}: {exc}")
            continue
        if sample["positives"]:
            sample["pos_image"], sample["pos_depth"] = sample["positives"][0]
        else:  # unmined split (val): the crop is its own positive
            sample["pos_image"], sample["pos_depth"] = sample["image"], sample["depth"]
        yield sample


def to_tensors(sample: dict, resolution: int) -> dict:
    """numpy sample -> tensors at ``resolution`` through the project's one resize
    (``depthg.data.transforms.resize_center_crop``): image/pos_image [3,R,R] in [0,1], depth [1,R,R], label [R,R]."""
    def img(a):
        return to_tensor_image(resize_center_crop(a, resolution))

    def dep(a):
        return torch.from_numpy(resize_center_crop(a, resolution))[None]

    label = sample["label"]
    if label is None:
        label = np.full(sample["depth"].shape, -1, np.int64)
    return {"id": sample["id"], "image": img(sample["image"]), "depth": dep(sample["depth"]),
            "label": torch.from_numpy(resize_center_crop(label, resolution)),
            "pos_image": img(sample["pos_image"]), "pos_depth": dep(sample["pos_depth"])}


def resize_stage(samples: Iterable[dict], resolution: int) -> Iterator[dict]:
    for sample in samples:
        yield to_tensors(sample, resolution)


def batch_stage(samples: Iterable[dict], batch_size: int, num_batches: int,
                skipped: list | None = None) -> Iterator[dict]:
    """Stack ``batch_size`` samples per batch; stop after exactly ``num_batches`` batches.
    ``batch["skipped"]``: damage events (see ``shard_samples``) since the previous batch."""
    samples = iter(samples)
    skipped = [] if skipped is None else skipped
    for _ in range(num_batches):
        chunk = list(itertools.islice(samples, batch_size))
        if len(chunk) < batch_size:
            raise RuntimeError("the sample stream ended early (the read stage cycles, so this is a bug)")
        batch = {key: torch.stack([s[key] for s in chunk]) for key in chunk[0] if key != "id"}
        batch["id"] = [s["id"] for s in chunk]
        batch["skipped"] = len(skipped)
        skipped.clear()
        yield batch


STAGES = (epoch_shard_order, plan_split, read_stage, shuffle_stage, cycle_stage, positive_stage, skip_stage,
          decode_stage, resize_stage, batch_stage)


# ----------------------------------------------------------------------------- the dataset
@dataclass
class StreamSpec:
    """Everything one rank's stream depends on (picklable: it travels to DataLoader workers)."""

    urls: Sequence[str]  # shard URLs of the split, manifest order
    total: int  # samples in the split (manifest)
    rank: int = 0
    world_size: int = 1
    micro_batch: int = 8
    grad_accum: int = 1
    resolution: int = 224
    shuffle_buffer: int = 256
    seed: int = 0
    start_step: int = 0  # global micro-batch index to start from (resume)
    num_steps: int = 0  # micro batches to yield in total (0 = one epoch)
    num_workers: int = 1  # DataLoader workers of this rank (>= 1; 0 loader workers counts as 1)

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.total, self.micro_batch * self.world_size, self.grad_accum)


def worker_epoch(spec: StreamSpec, epoch: int, worker: int, skip: int, count: int) -> Iterator[dict]:
    """The batches one worker yields in ``epoch``: ``count`` of them after skipping ``skip``."""
    names = epoch_shard_order(list(spec.urls), spec.seed, epoch)
    urls, stride, offset = plan_split(names, spec.rank, spec.world_size, worker, spec.num_workers)
    skipped: list = []  # damaged shards met by this worker, reported with the next batch
    samples = cycle_stage(urls, stride, offset, spec.shuffle_buffer, slot_rng(spec.seed, epoch, spec.rank, worker, 1),
                          skipped)
    samples = positive_stage(samples, slot_rng(spec.seed, epoch, spec.rank, worker, 3))
    samples = skip_stage(samples, skip * spec.micro_batch)
    samples = resize_stage(decode_stage(samples, skipped), spec.resolution)
    return batch_stage(samples, spec.micro_batch, count, skipped)


def worker_plan(spec: StreamSpec, worker: int) -> list[tuple[int, int, list[int]]]:
    """``[(epoch, skip, [global batch indices]), ...]``: what one DataLoader worker yields.

    Global micro batch ``g`` belongs to epoch ``g // E`` and to worker ``g % W``; within the epoch it
    is that worker's ``#{g' in [eE, g): g' % W == w}``-th batch. ``skip`` counts the batches of the
    worker before ``start_step`` in that epoch (replayed raw, not decoded, on resume).
    """
    per_epoch, workers = spec.steps_per_epoch, spec.num_workers
    end = spec.start_step + (spec.num_steps or per_epoch)
    plan = []
    for epoch in range(spec.start_step // per_epoch, (end - 1) // per_epoch + 1):
        first, stop = epoch * per_epoch, (epoch + 1) * per_epoch
        lo, hi = max(spec.start_step, first), min(end, stop)
        mine = [g for g in range(lo, hi) if g % workers == worker]
        skip = sum(1 for g in range(first, lo) if g % workers == worker)
        if mine:
            plan.append((epoch, skip, mine))
    return plan


class ShardStream(torch.utils.data.IterableDataset):
    """One rank's micro batches; decoding runs in the DataLoader workers (``batch_size=None``).

    Each batch carries ``step`` (its global micro-batch index); ``OrderedLoader`` restores the
    global order, which the DataLoader's round-robin may rotate when a run resumes mid-epoch.
    """

    def __init__(self, spec: StreamSpec):
        super().__init__()
        self.spec = spec

    def __len__(self) -> int:
        return self.spec.num_steps or self.spec.steps_per_epoch

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        if num_workers != self.spec.num_workers:
            raise ValueError(f"StreamSpec.num_workers={self.spec.num_workers} but the DataLoader has "
                             f"{num_workers} workers")
        for epoch, skip, steps in worker_plan(self.spec, worker):
            for step, batch in zip(steps, worker_epoch(self.spec, epoch, worker, skip, len(steps))):
                batch["step"] = step
                yield batch


class OrderedLoader:
    """Iterate a DataLoader over ``ShardStream`` in ascending ``step`` (buffers at most W batches)."""

    def __init__(self, loader: torch.utils.data.DataLoader, start_step: int):
        self.loader, self.start_step = loader, start_step

    def __len__(self) -> int:
        return len(self.loader.dataset)

    def __iter__(self) -> Iterator[dict]:
        pending, want = {}, self.start_step
        for batch in self.loader:
            pending[batch["step"]] = batch
            while want in pending:
                yield pending.pop(want)
                want += 1
        if pending:
            raise RuntimeError(f"data stream gap: batches {sorted(pending)} never reached in order at {want}")


def make_loader(spec: StreamSpec, num_workers: int) -> OrderedLoader:
    """Batches of ``spec`` in global order; ``num_workers=0`` decodes in the main process."""
    spec.num_workers = max(1, num_workers)
    loader = torch.utils.data.DataLoader(ShardStream(spec), batch_size=None, num_workers=num_workers,
                                         prefetch_factor=2 if num_workers else None)
    return OrderedLoader(loader, spec.start_step)


def open_split(root: str, split: str, **spec_kwargs) -> tuple[StreamSpec, dict]:
    """``(StreamSpec, manifest)`` for the mined ``{root}/{split}`` shards (clear error when missing)."""
    from depthg import io

    folder = shardfmt.split_dir(root, split, "train")
    manifest = shardfmt.read_manifest(folder)
    urls = [io.join(folder, s["name"]) for s in manifest["shards"]]
    return StreamSpec(urls=urls, total=int(manifest["total"]), **spec_kwargs), manifest
