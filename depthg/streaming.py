"""The training data stream: WebDataset shards -> batches, as an explicit list of stages.

Which samples a rank and loader worker read is the pure plan of ``depthg.planner``: every epoch the ranks
read disjoint contiguous ranges of that epoch's shard sequence, together every sample once; a rank's
stream runs on from one epoch into the next (nothing dropped, nothing cycled), local step ``t`` trains
its chunk ``[t B, (t+1) B)``, and loader worker ``w`` reads the chunks of the steps ``t % W == w``.
One worker's stages, each a small generator function::

    plan (planner.stream_segments: the shard ranges of the worker's chunks)
    -> read raw samples of each range (``shard_samples``: only those bytes, through the sidecar offsets)
    -> pick a positive uniformly from the K embedded ones (a draw per sample; the others are dropped,
       which keeps the shuffle buffer 4x smaller)
    -> shuffle buffer (on the raw, still-compressed bytes; per epoch: drained when the epoch changes)
    -> skip (resume: the samples of the current epoch already trained on, replayed raw)
    -> decode (only the anchor and the chosen positive)
    -> resize shorter side + centre-crop to ``data.resolution`` (``depthg.data.transforms.resize_center_crop``)
    -> batch (``image, depth, label, pos_image, pos_depth`` tensors + ``id`` list, ``step``, and the
       ``skipped`` damage events and storage ``bytes`` read since the previous batch)

The shuffle buffer sits before decoding so that a resumed run can skip the batches it already trained on
by replaying the raw stream without decoding: resume is exact to the sample (same world size and loader
workers). ``OrderedLoader`` restores the step order of the DataLoader's workers. Randomness comes from
generators seeded by ``(seed, epoch, rank, worker, stream)``; no global RNG is touched.

Validation reads each rank's slice of the split once, in manifest order, with a partial last batch
(``eval_batches``): every sample exactly once over the ranks, for any world size.
"""
from __future__ import annotations

import itertools
import logging
import tarfile
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from depthg import planner
from depthg import shards as shardfmt
from depthg.data.transforms import resize_center_crop, to_tensor_image

log = logging.getLogger(__name__)

SHUFFLE_STREAM, POSITIVE_STREAM = 1, 3  # the ``stream`` of slot_rng: shuffle buffer, positive draws


def slot_rng(seed: int, epoch: int, rank: int, worker: int, stream: int) -> np.random.Generator:
    """Generator for one (seed, epoch, rank, worker); ``stream`` separates shuffle from positives."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, rank, worker, stream]))


# ----------------------------------------------------------------------------- reading
WITH_DEPTH, WITHOUT_DEPTH = ("rgb.png", "depth.png"), ("rgb.png",)  # members every sample must have


def required_members(manifest: dict) -> tuple[str, ...]:
    """What each sample of a split holds: no ``depth.png`` in shards written with ``depthgen.source=none``."""
    return WITHOUT_DEPTH if manifest.get("depth_source") == "none" else WITH_DEPTH


def shard_samples(url: str, start: int = 0, stop: int | None = None, offsets: Sequence[int] | None = None,
                  skipped: list | None = None, meter: list | None = None,
                  required: Sequence[str] = WITH_DEPTH) -> Iterator[dict]:
    """Raw samples ``[start, stop)`` of one shard. A damaged shard (truncated, not a tar, missing) ends where
    it breaks and a sample lacking a ``required`` member is dropped: each is logged naming the shard and
    appended to ``skipped``; training goes on. Storage that cannot be reached is still an error."""
    from depthg.io import StorageError

    try:
        for raw in shardfmt.iter_shard(url, start, stop, offsets, meter):
            missing = [m for m in required if m not in raw]
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


class ShardReader:
    """Reads planned shard ranges of one split; fetches a shard's sidecar offsets (once per process) when
    a range starts or stops inside the shard, so that only the range's bytes are read."""

    def __init__(self, urls: Sequence[str], counts: Sequence[int], required: Sequence[str] = WITH_DEPTH):
        self.urls, self.counts, self.offsets, self.required = list(urls), list(counts), {}, tuple(required)

    def _offsets(self, shard: int):
        if shard not in self.offsets:
            url = self.urls[shard]
            folder, name = url.rsplit("/", 1)
            try:
                info = shardfmt.read_sidecar(folder, name)
            except (OSError, ValueError):
                info = None
            offsets = (info or {}).get("offsets")
            self.offsets[shard] = offsets if offsets and len(offsets) == self.counts[shard] + 1 else None
        return self.offsets[shard]

    def __call__(self, segs: Sequence[tuple[int, int, int]], skipped: list | None = None,
                 meter: list | None = None) -> Iterator[dict]:
        for shard, start, stop in segs:
            whole = start == 0 and stop == self.counts[shard]
            offsets = None if whole else self._offsets(shard)
            yield from shard_samples(self.urls[shard], start, stop, offsets, skipped, meter, self.required)


# ----------------------------------------------------------------------------- stages
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
            out["pos0.rgb.png"] = raw[f"pos{j}.rgb.png"]
            if f"pos{j}.depth.png" in raw:  # absent without depth (depthgen.source=none)
                out["pos0.depth.png"] = raw[f"pos{j}.depth.png"]
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
    (``depthg.data.transforms.resize_center_crop``): image/pos_image [3,R,R] in [0,1], depth/pos_depth
    [1,R,R] (absent for samples without depth), label [R,R]."""
    def img(a):
        return to_tensor_image(resize_center_crop(a, resolution))

    label = sample["label"]
    if label is None:
        label = np.full(sample["image"].shape[:2], -1, np.int64)
    out = {"id": sample["id"], "image": img(sample["image"]), "pos_image": img(sample["pos_image"]),
           "label": torch.from_numpy(resize_center_crop(label, resolution))}
    for key in ("depth", "pos_depth"):
        if sample[key] is not None:
            out[key] = torch.from_numpy(resize_center_crop(sample[key], resolution))[None]
    return out


def resize_stage(samples: Iterable[dict], resolution: int) -> Iterator[dict]:
    for sample in samples:
        yield to_tensors(sample, resolution)


def batch_stage(samples: Iterable[dict], batch_size: int, num_batches: int | None,
                skipped: list | None = None, meter: list | None = None) -> Iterator[dict]:
    """Stack ``batch_size`` samples per batch: exactly ``num_batches`` batches, or (``None``) until the
    samples end, the last batch possibly smaller. ``batch["skipped"]``: damage events (``shard_samples``)
    since the previous batch; ``batch["bytes"]``: storage bytes read since the previous batch."""
    samples, skipped, meter = iter(samples), [] if skipped is None else skipped, [0] if meter is None else meter
    for _ in itertools.count() if num_batches is None else range(num_batches):
        chunk = list(itertools.islice(samples, batch_size))
        if not chunk and num_batches is None:
            return
        if len(chunk) < batch_size and num_batches is not None:
            raise RuntimeError("the sample stream ended early (it runs over epochs, so this is a bug)")
        batch = {key: torch.stack([s[key] for s in chunk]) for key in chunk[0] if key != "id"}
        batch["id"] = [s["id"] for s in chunk]
        batch["skipped"], batch["bytes"] = len(skipped), meter[0]
        skipped.clear()
        meter[0] = 0
        yield batch


# ----------------------------------------------------------------------------- one slot, one rank
@dataclass
class StreamSpec:
    """Everything one rank's stream depends on (picklable: it travels to DataLoader workers)."""

    urls: Sequence[str]  # shard URLs of the split, manifest order
    counts: Sequence[int]  # samples per shard (manifest)
    rank: int = 0
    world_size: int = 1
    micro_batch: int = 8
    grad_accum: int = 1
    resolution: int = 224
    shuffle_buffer: int = 256
    seed: int = 0
    start_step: int = 0  # local micro-batch index to start from (resume)
    num_steps: int = 0  # micro batches to yield in total (0 = one epoch's whole steps)
    num_workers: int = 1  # DataLoader workers of this rank (>= 1; 0 loader workers counts as 1)
    required: Sequence[str] = WITH_DEPTH  # members every sample has (``required_members(manifest)``)
    reader: Callable | None = field(default=None, repr=False)  # None: ShardReader(urls, counts, required)

    @property
    def total(self) -> int:
        return int(sum(self.counts))

    @property
    def steps_per_epoch(self) -> int:
        """Micro batches per rank that one epoch of samples fills (whole optimizer steps)."""
        return planner.steps_per_epoch(self.total, self.micro_batch * self.world_size, self.grad_accum)

    def read(self, segs, skipped=None, meter=None) -> Iterator[dict]:
        if self.reader is None:
            self.reader = ShardReader(self.urls, self.counts, self.required)
        return self.reader(segs, skipped, meter)


def worker_stream(spec: StreamSpec, worker: int, first_step: int, skipped: list | None = None,
                  meter: list | None = None) -> Iterator[dict]:
    """The raw samples of loader ``worker`` of ``spec.rank`` from its batch of local step ``first_step`` on,
    endless, each tagged with ``__epoch__``: the chunks of its steps, read range by range, with a positive
    drawn per sample and shuffled per epoch (``planner.worker_start`` says where the replay starts)."""
    ranks, batch, workers = spec.world_size, spec.micro_batch, spec.num_workers
    chunk, begin, skip = planner.worker_start(spec.total, ranks, spec.rank, batch, workers, worker, first_step)

    def chunks() -> Iterator[tuple[int, dict]]:
        for t in itertools.count(chunk, workers):
            segs = planner.stream_segments(spec.counts, spec.seed, ranks, spec.rank, max(t * batch, begin),
                                           t * batch + batch)
            for epoch, shard, start, stop in segs:
                yield from ((epoch, raw) for raw in spec.read([(shard, start, stop)], skipped, meter))

    for epoch, group in itertools.groupby(chunks(), key=lambda pair: pair[0]):
        raws = positive_stage((raw for _, raw in group), slot_rng(spec.seed, epoch, spec.rank, worker, POSITIVE_STREAM))
        raws = shuffle_stage(raws, spec.shuffle_buffer, slot_rng(spec.seed, epoch, spec.rank, worker, SHUFFLE_STREAM))
        for raw in skip_stage(raws, skip):
            raw["__epoch__"] = epoch
            yield raw
        skip = 0


def worker_batches(spec: StreamSpec, worker: int) -> Iterator[dict]:
    """The micro batches loader worker ``worker`` yields, each with its local ``step``."""
    end = spec.start_step + (spec.num_steps or spec.steps_per_epoch)
    steps = planner.worker_steps(spec.start_step, end, spec.num_workers, worker)
    if not steps:
        return
    skipped: list = []
    meter = [0]
    samples = resize_stage(decode_stage(worker_stream(spec, worker, steps[0], skipped, meter), skipped),
                           spec.resolution)
    for step, batch in zip(steps, batch_stage(samples, spec.micro_batch, len(steps), skipped, meter)):
        batch["step"] = step
        yield batch


class ShardStream(torch.utils.data.IterableDataset):
    """One rank's micro batches; decoding runs in the DataLoader workers (``batch_size=None``)."""

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
        yield from worker_batches(self.spec, worker)


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


def make_loader(spec: StreamSpec, num_workers: int, pin_memory: bool = False) -> OrderedLoader:
    """Batches of ``spec`` in local step order; ``num_workers=0`` decodes in the main process. ``pin_memory``
    (batches bound for a GPU): page-locked host memory, so the trainer's ``non_blocking`` copies overlap."""
    spec.num_workers = max(1, num_workers)
    loader = torch.utils.data.DataLoader(ShardStream(spec), batch_size=None, num_workers=num_workers,
                                         prefetch_factor=2 if num_workers else None, pin_memory=pin_memory)
    return OrderedLoader(loader, spec.start_step)


def eval_batches(spec: StreamSpec) -> Iterator[dict]:
    """This rank's slice of the split, read once in manifest order, in batches of ``spec.micro_batch`` with
    a partial last one (no shuffling; positives drawn from a fixed seed). In-process."""
    segs = planner.eval_segments(spec.counts, spec.rank, spec.world_size)
    skipped: list = []
    raws = positive_stage(spec.read(segs, skipped), slot_rng(spec.seed, 0, spec.rank, 0, POSITIVE_STREAM))
    samples = resize_stage(decode_stage(raws, skipped), spec.resolution)
    return batch_stage(samples, spec.micro_batch, None, skipped)


def open_split(root: str, split: str, **spec_kwargs) -> tuple[StreamSpec, dict]:
    """``(StreamSpec, manifest)`` for the mined ``{root}/{split}`` shards (clear error when missing)."""
    from depthg import io

    folder = shardfmt.split_dir(root, split, "train")
    manifest = shardfmt.read_manifest(folder)
    urls = [io.join(folder, s["name"]) for s in manifest["shards"]]
    counts = [int(s["count"]) for s in manifest["shards"]]
    return StreamSpec(urls=urls, counts=counts, required=required_members(manifest), **spec_kwargs), manifest
