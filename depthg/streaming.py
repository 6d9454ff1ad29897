"""The training data stream: WebDataset shards -> batches, as an explicit list of stages.

Which samples a rank and loader worker read is the pure plan of ``depthg.planner``: every epoch the ranks
read disjoint contiguous ranges of that epoch's shard sequence, together every sample once; a rank's
stream runs on from one epoch into the next (nothing dropped, nothing cycled), local step ``t`` trains
its chunk ``[t B, (t+1) B)``, and loader worker ``w`` reads the chunks of the steps ``t % W == w``.
One worker's stages, each a small generator function::

    plan (planner.stream_segments: the shard ranges of the worker's chunks)
    -> read each range's raw samples (``depthg.reader.ShardReader``: ONE exact ranged read per planned
       segment, after one exact read of its rows in the shard's row file (layout ``grouped/3``; splits
       written before: located by the split's offsets table); the next segments are read ahead on a pool)
    -> draw a positive: one ``rng.integers(K)`` per sample over its K positives (its row's, which carry
       their byte ranges, or the global indices of its ``meta.json`` ``positives`` in splits written
       before; the same draw, stream and seeds as when the K were embedded)
    -> shuffle buffer (on the raw, still-compressed bytes; per epoch: drained when the epoch changes)
    -> skip (resume: the samples of the current epoch already trained on, replayed raw)
    -> fetch each drawn positive's rgb + depth (``depthg.reader.PositiveReader``: one exact range per
       positive, the range its anchor's row carries; ``spec.prefetch`` samples ahead on the pool, so
       storage latency overlaps decoding)
    -> decode (anchor: rgb, depth, label, meta; positive: rgb, depth)
    -> to the training resolution (``depthg.data.transforms.resize_center_crop``; stage-2 samples are
       stored at it, so this is the identity there)
    -> batch: ``image, pos_image`` uint8 [B,3,R,R] (made float in [0, 1] on the training device by
       ``depthg.step.backbone_features``), ``depth, pos_depth`` float32 [B,1,R,R], ``label`` int64, the
       ``id`` and ``pos_id`` lists, ``step``, and since the previous batch: ``skipped`` damage events,
       storage ``bytes`` read (samples, rows and positives) and member bytes ``decoded``

The shuffle buffer sits before decoding so that a resumed run can skip the batches it already trained on
by replaying the raw stream without decoding: resume is exact to the sample (same world size and loader
workers). ``OrderedLoader`` restores the step order of the DataLoader's workers. Randomness comes from
generators seeded by ``(seed, epoch, rank, worker, stream)``; no global RNG is touched.

Validation reads each rank's slice of the split once, in manifest order, with a partial last batch
(``eval_batches``): every sample exactly once over the ranks, for any world size.
"""
from __future__ import annotations

import functools
import itertools
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from depthg import planner
from depthg import shards as shardfmt
from depthg.codecs import IGNORE_ON_DISK, decode_depth, decode_image, member
from depthg.data.transforms import resize_center_crop
from depthg.reader import (WITH_DEPTH, WITHOUT_DEPTH, PositiveReader, ShardReader, ahead,  # noqa: F401
                           log_damage, required_members, shard_samples)

log = logging.getLogger(__name__)

SHUFFLE_STREAM, POSITIVE_STREAM = 1, 3  # the ``stream`` of slot_rng: shuffle buffer, positive draws
SEGMENTS_AHEAD = 2  # planned anchor ranges read ahead of the one being consumed


def slot_rng(seed: int, epoch: int, rank: int, worker: int, stream: int) -> np.random.Generator:
    """Generator for one (seed, epoch, rank, worker); ``stream`` separates shuffle from positives."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, rank, worker, stream]))


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


def _meta(raw: dict) -> dict:
    if "__meta__" not in raw:
        raw["__meta__"] = json.loads(raw["meta.json"]) if "meta.json" in raw else {}
    return raw["__meta__"]


def positive_stage(samples: Iterable[dict], rng: np.random.Generator) -> Iterator[dict]:
    """Draw one positive per sample uniformly from its K positives: those of its row (``__row__``, layout
    ``grouped/3``: ``__positive_range__`` = the drawn one's carried byte range) or the K global indices of its
    ``meta.json`` ``positives`` (splits written before); ``__positive__`` = the draw j,
    ``__positive_index__`` = the index. K=0 (unmined split): none drawn, the crop is its own positive. One
    ``rng.integers(K)`` per sample with K > 0, as when K were embedded."""
    for raw in samples:
        row = raw.get("__row__")
        positives = row["pos"] if row is not None else (_meta(raw).get("positives") or [])
        if len(positives):
            j = int(rng.integers(len(positives)))
            raw["__positive__"], raw["__positive_index__"] = j, int(positives[j])
            if row is not None:
                raw["__positive_range__"] = (int(row["pos_shard"][j]), int(row["pos_start"][j]), int(row["pos_end"][j]))
        yield raw


def skip_stage(samples: Iterable[dict], count: int) -> Iterator[dict]:
    """Drop the first ``count`` samples (resume inside an epoch) before any decoding."""
    return itertools.islice(samples, count, None)


def _fetch_one(fetch: Callable | None, raw: dict):
    index = raw.get("__positive_index__")
    if fetch is None or index is None:
        return raw, (None, 0, None)
    return raw, fetch(index, raw.get("__positive_range__"))


def fetch_stage(samples: Iterable[dict], fetch: Callable | None, pool=None, depth: int = 0,
                skipped: list | None = None, meter: list | None = None) -> Iterator[dict]:
    """Attach each sample's drawn positive (``__pos__``: its raw rgb + depth members), read by ``fetch``
    (``depthg.reader.PositiveReader``) up to ``depth`` samples ahead on ``pool``. A damaged positive is
    logged and counted in ``skipped``; its anchor then stands in as the positive."""
    for raw, (pos, nbytes, error) in ahead((functools.partial(_fetch_one, fetch, r) for r in samples), pool, depth):
        if meter is not None:
            meter[0] += nbytes
        if error:
            log_damage(skipped, error.split(": ", 1)[0], f"positive {raw['__positive_index__']} of sample "
                 f"{raw.get('__key__')} (the anchor stands in): {error}")
        raw["__pos__"] = pos
        yield raw


def _decode(raw: dict) -> dict:
    sample = shardfmt.decode_sample(raw, label_levels=True)  # uint8 labels: widened once per batch
    if sample["label"] is None:  # unlabelled: all ignore, in the same stored form as the labelled
        sample["label"] = np.full(sample["image"].shape[:2], IGNORE_ON_DISK, np.uint8)
    decoded = sum(len(raw[m]) for m in (member(raw, "rgb"), member(raw, "depth"), "label.png", "meta.json")
                  if m in raw)
    pos = raw.get("__pos__")
    if pos is None:  # unmined split (val), K=0, or a damaged positive: the crop is its own positive
        sample.update(pos_image=sample["image"], pos_depth=sample["depth"], pos_id=sample["id"])
    else:
        rgb, dep = member(pos, "rgb"), member(pos, "depth")
        sample.update(pos_image=decode_image(pos[rgb], rgb), pos_depth=decode_depth(pos[dep], dep) if dep else None,
                      pos_id=pos["__key__"])
        decoded += len(pos[rgb]) + (len(pos[dep]) if dep else 0)
    sample["__decoded__"] = decoded
    return sample


def decode_stage(samples: Iterable[dict], skipped: list | None = None) -> Iterator[dict]:
    """Decode the anchor (rgb, depth, label, meta) and its positive (rgb, depth); ``__decoded__``: their bytes."""
    for raw in samples:
        try:
            yield _decode(raw)
        except (shardfmt.ShardError, OSError, ValueError, SyntaxError, RuntimeError) as exc:  # a corrupt member
            log_damage(skipped, raw.get("__url__", "?"), f"sample {raw.get('__key__')}: {type(exc).__name__}: {exc}")


def _image(array: np.ndarray, resolution: int) -> torch.Tensor:
    return torch.from_numpy(resize_center_crop(array, resolution)).permute(2, 0, 1)


def to_tensors(sample: dict, resolution: int) -> dict:
    """numpy sample -> tensors at ``resolution`` through the project's one resize
    (``depthg.data.transforms.resize_center_crop``, the identity on samples stored at it): image/pos_image
    uint8 [3,R,R] (views of HWC memory), depth/pos_depth float32 [1,R,R] (absent for samples without depth),
    label [R,R] of the sample's dtype (int64 with -1 = ignore, or the stored uint8 with 255; none: all -1)."""
    label = sample["label"]
    if label is None:
        label = np.full(sample["image"].shape[:2], -1, np.int64)
    out = {"id": sample["id"], "image": _image(sample["image"], resolution),
           "pos_image": _image(sample["pos_image"], resolution),
           "label": torch.from_numpy(resize_center_crop(label, resolution))}
    for key in ("depth", "pos_depth"):
        if sample[key] is not None:
            out[key] = torch.from_numpy(resize_center_crop(sample[key], resolution))[None]
    for key in ("pos_id", "__decoded__"):
        if key in sample:
            out[key] = sample[key]
    return out


def resize_stage(samples: Iterable[dict], resolution: int) -> Iterator[dict]:
    for sample in samples:
        yield to_tensors(sample, resolution)


def collate(tensors: list) -> torch.Tensor:
    """Stack one key's tensors. Images ([3,R,R] views of HWC memory) stack as one copy into [B,R,R,3] memory,
    returned as its [B,3,R,R] view (channels-last strides: no transposing copy on the CPU; the device makes
    them contiguous floats, ``depthg.step.backbone_features``); stored uint8 labels widen to int64, 255 -> -1."""
    first = tensors[0]
    if first.dtype == torch.uint8 and first.dim() == 3 and first.permute(1, 2, 0).is_contiguous():
        return torch.stack([t.permute(1, 2, 0) for t in tensors]).permute(0, 3, 1, 2)
    if first.dtype == torch.uint8 and first.dim() == 2:  # labels as stored
        out = torch.stack(tensors).to(torch.int64)
        return out.masked_fill_(out == IGNORE_ON_DISK, -1)
    return torch.stack(tensors)


def batch_stage(samples: Iterable[dict], batch_size: int, num_batches: int | None,
                skipped: list | None = None, meter: list | None = None) -> Iterator[dict]:
    """Stack ``batch_size`` samples per batch: exactly ``num_batches`` batches, or (``None``) until the
    samples end, the last batch possibly smaller. ``batch["skipped"]``: damage events (``shard_samples``)
    since the previous batch; ``batch["bytes"]``: storage bytes read since the previous batch;
    ``batch["decoded"]``: the bytes of the members its samples decoded."""
    samples, skipped, meter = iter(samples), [] if skipped is None else skipped, [0] if meter is None else meter
    for _ in itertools.count() if num_batches is None else range(num_batches):
        chunk = list(itertools.islice(samples, batch_size))
        if not chunk and num_batches is None:
            return
        if len(chunk) < batch_size and num_batches is not None:
            raise RuntimeError("the sample stream ended early (it runs over epochs, so this is a bug)")
        batch = {key: collate([s[key] for s in chunk]) for key, v in chunk[0].items() if torch.is_tensor(v)}
        batch["id"], batch["pos_id"] = [s["id"] for s in chunk], [s.get("pos_id", s["id"]) for s in chunk]
        batch["skipped"], batch["bytes"] = len(skipped), meter[0]
        batch["decoded"] = sum(s.get("__decoded__", 0) for s in chunk)
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
    required: Sequence[str] = WITH_DEPTH  # what every sample holds (``required_members(manifest)``)
    index_url: str | None = None  # the split's offsets table (stage 2): exact ranges, positives by reference
    rows_k: int | None = None  # layout grouped/3: positives per row of the shards' row files (no table read)
    with_positives: bool = True  # False: no positive is read (each crop is its own; e.g. the probe finishing)
    fetch_threads: int = 8  # reader threads per loader worker (ranges and positives ahead); 0: none
    prefetch: int = 0  # positives read ahead of decoding; 0 = 2 x micro_batch
    reader: Callable | None = field(default=None, repr=False)  # None: ShardReader(urls, counts, required, index_url)

    @property
    def total(self) -> int:
        return int(sum(self.counts))

    @property
    def steps_per_epoch(self) -> int:
        """Micro batches per rank that one epoch of samples fills (whole optimizer steps)."""
        return planner.steps_per_epoch(self.total, self.micro_batch * self.world_size, self.grad_accum)

    def read(self, segs, skipped=None, meter=None) -> Iterator[dict]:
        if self.reader is None:
            self.reader = ShardReader(self.urls, self.counts, self.required, self.index_url, self.rows_k)
        return self.reader(segs, skipped, meter)

    def positives(self) -> PositiveReader | None:
        """What reads a drawn positive (None: each crop is its own positive)."""
        if not self.with_positives or not (self.index_url or self.rows_k):
            return None
        return PositiveReader(self.index_url, self.required, self.urls if self.rows_k is not None else None)

    def pool(self) -> ThreadPoolExecutor | None:
        return ThreadPoolExecutor(self.fetch_threads, thread_name_prefix="depthg-read") if self.fetch_threads else None


def _read_segment(spec: StreamSpec, epoch: int, seg: tuple, skipped: list | None):
    local = [0]
    return epoch, list(spec.read([seg], skipped, local)), local[0]


def worker_stream(spec: StreamSpec, worker: int, first_step: int, skipped: list | None = None,
                  meter: list | None = None, pool=None) -> Iterator[dict]:
    """The raw samples of loader ``worker`` of ``spec.rank`` from its batch of local step ``first_step`` on,
    endless, each tagged with ``__epoch__``: the chunks of its steps, read range by range (the next
    ``SEGMENTS_AHEAD`` on ``pool``), with a positive drawn per sample and shuffled per epoch
    (``planner.worker_start`` says where the replay starts)."""
    ranks, batch, workers = spec.world_size, spec.micro_batch, spec.num_workers
    chunk, begin, skip = planner.worker_start(spec.total, ranks, spec.rank, batch, workers, worker, first_step)

    def reads() -> Iterator[Callable]:
        for t in itertools.count(chunk, workers):
            segs = planner.stream_segments(spec.counts, spec.seed, ranks, spec.rank, max(t * batch, begin),
                                           t * batch + batch)
            for epoch, shard, start, stop in segs:
                yield functools.partial(_read_segment, spec, epoch, (shard, start, stop), skipped)

    def samples() -> Iterator[tuple[int, dict]]:
        for epoch, raws, nbytes in ahead(reads(), pool, SEGMENTS_AHEAD):
            if meter is not None:
                meter[0] += nbytes
            yield from ((epoch, raw) for raw in raws)

    for epoch, group in itertools.groupby(samples(), key=lambda pair: pair[0]):
        raws = positive_stage((raw for _, raw in group), slot_rng(spec.seed, epoch, spec.rank, worker, POSITIVE_STREAM))
        raws = shuffle_stage(raws, spec.shuffle_buffer, slot_rng(spec.seed, epoch, spec.rank, worker, SHUFFLE_STREAM))
        for raw in skip_stage(raws, skip):
            raw["__epoch__"] = epoch
            yield raw
        skip = 0


def _tensors(spec: StreamSpec, raws: Iterable[dict], pool, skipped: list, meter: list) -> Iterator[dict]:
    """fetch positives -> decode -> tensors at the resolution (the stages after the raw stream)."""
    raws = fetch_stage(raws, spec.positives(), pool, spec.prefetch or 2 * spec.micro_batch, skipped, meter)
    return resize_stage(decode_stage(raws, skipped), spec.resolution)


def worker_batches(spec: StreamSpec, worker: int) -> Iterator[dict]:
    """The micro batches loader worker ``worker`` yields, each with its local ``step``."""
    end = spec.start_step + (spec.num_steps or spec.steps_per_epoch)
    steps = planner.worker_steps(spec.start_step, end, spec.num_workers, worker)
    if not steps:
        return
    skipped: list = []
    meter = [0]
    pool = spec.pool()
    try:
        # only the samples of its steps go on to the positive reads (no positive is read ahead past the end)
        raws = itertools.islice(worker_stream(spec, worker, steps[0], skipped, meter, pool), len(steps) * spec.micro_batch)
        samples = _tensors(spec, raws, pool, skipped, meter)
        for step, batch in zip(steps, batch_stage(samples, spec.micro_batch, len(steps), skipped, meter)):
            batch["step"] = step
            yield batch
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


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
    meter = [0]
    pool = spec.pool()
    try:
        raws = positive_stage(spec.read(segs, skipped, meter), slot_rng(spec.seed, 0, spec.rank, 0, POSITIVE_STREAM))
        yield from batch_stage(_tensors(spec, raws, pool, skipped, meter), spec.micro_batch, None, skipped, meter)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def open_split(root: str, split: str, **spec_kwargs) -> tuple[StreamSpec, dict]:
    """``(StreamSpec, manifest)`` for the mined ``{root}/{split}`` shards (clear error when missing or of the
    old embedded-positives schema); a stage-2 split brings its offsets table (``index_url``)."""
    from depthg import io

    folder = shardfmt.split_dir(root, split, "train")
    manifest = shardfmt.read_manifest(folder)
    urls = [io.join(folder, s["name"]) for s in manifest["shards"]]
    counts = [int(s["count"]) for s in manifest["shards"]]
    index = io.join(folder, manifest["index"]) if manifest.get("index") else None
    rows_k = int(manifest.get("num_positives") or 0) if manifest.get("rows") == shardfmt.ROWS else None
    return StreamSpec(urls=urls, counts=counts, required=required_members(manifest), index_url=index,
                      rows_k=rows_k, **spec_kwargs), manifest
