"""Stage 1 on Ray: source images -> depth -> WebDataset depth shards ``{root}/depth/{split}``.

The driver lists the split's source once, streamed (``Source.scan``: nothing kept), into
``{root}/depth/{split}/listing.jsonl``, cut in source order into work units of ``shards.samples_per_shard``
source images, one JSON line per unit (``depthg.data.listing``); unit i becomes ``shard-{i:06d}.tar`` (all
five crops of an image land in the same shard). The driver keeps a ``ListingPlan`` (per unit a byte range
and a digest of its ids) and a ``DepthTally`` (per unit its sample count, the skipped images): O(units),
never the ids. A pool of ``DepthWorker`` actors (``cluster.raycluster.ActorGroup``: one GPU each when
``depthgen.device`` resolves to cuda, so a cluster's autoscaler starts GPU nodes for them; CPU
shares otherwise) gets a unit as ``(listing URL, byte range)``, reads that range (its unit's entries only:
no actor lists the source) and the images itself, estimates depth on the full images (batched across image
sizes, autocast per ``depthgen.precision``), crops (train split, ``data.five_crop``), PNG-encodes the crops
in a thread pool, writes the shard to a local temp file and uploads it atomically, then its sidecar, and
returns a summary (count, skipped, node) that the driver reduces as it arrives. Each actor takes two units at
a time: one unit's encoding and upload overlap the next unit's depth model (which one lock keeps to one unit
at a time). The manifest is written last, from the reduced counts.

Rerunning skips units whose shard and sidecar exist and whose sidecar matches the unit (same ids,
same depth settings): the folder is listed once and the sidecars that exist are read on ``IO_THREADS``
threads, reduced as they arrive. ``shards.overwrite=true`` redoes them. Unreadable images are skipped and
listed in the manifest, or fail the job naming the file with ``shards.strict=true``.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

import numpy as np

from cluster.raycluster import node_id
from depthg import io, shards
from depthg.config import Config, from_dict, to_dict
from depthg.data.listing import LISTING, ListingPlan, ids_digest, write_listing

log = logging.getLogger(__name__)


def _digest(data) -> str:
    return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def depth_digest(cfg: Config, split: str) -> str:
    """Fingerprint of everything that changes the depth shards' bytes (not batch size, actors...)."""
    data = {k: v for k, v in to_dict(cfg.data).items() if k not in ("resolution",)}
    gen = {k: getattr(cfg.depthgen, k) for k in ("source", "model", "flip_average", "precision")}
    return _digest({"data": data, "depthgen": gen, "split": split, "schema": shards.SCHEMA})


def sample_key(source_id: str) -> str:
    """A webdataset-safe key: no dots or slashes (webdataset splits keys at the first dot)."""
    return re.sub(r"[./\\\s]", "_", str(source_id))


class DepthWorker:
    """Turns one work unit into one complete depth shard. Plain class: Ray wraps it as an actor
    (threaded: two units at a time), the benchmark's in-process loop uses it directly.

    ``threads``: torch threads and PNG-encoding threads (the actor's CPU share)."""

    def __init__(self, cfg_dict: dict, threads: int = 0):
        from cluster.raycluster import check_node

        check_node()  # first: a node that failed its start-up check stops here, once, with its message
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.cfg = from_dict(Config, cfg_dict)
        self._sources: dict = {}
        self._estimator = None
        self._build = threading.Lock()  # lazy construction, shared by the actor's threads
        self._model = threading.Lock()  # one unit at a time on the depth model (the GPU)
        self._encoders = ThreadPoolExecutor(max(int(threads), 1), thread_name_prefix="png")

    def source(self, split: str, listed: bool = True):
        """The split's source, built once per actor: ``listed`` holds the whole listing (``run_unit``),
        unlisted holds none (``run_listed`` shares it out unit by unit)."""
        with self._build:
            if (split, listed) not in self._sources:
                from depthg.data import build_source

                self._sources[split, listed] = build_source(self.cfg.data, split, listed=listed,
                                                            n_classes=self.cfg.model.n_classes or None)
            return self._sources[split, listed]

    def estimator(self):
        with self._build:
            if self._estimator is None:
                from depthg.depth import build_estimator

                self._estimator = build_estimator(self.cfg.depthgen)
            return self._estimator

    def load(self, source, ids: list[str]):
        """Records of ``source`` that load, plus ``[{"id","error"}]`` for those that do not (or raise if strict)."""
        from depthg.data.base import SourceError

        records, skipped = [], []
        for id_ in ids:
            try:
                records.append(source.load(id_))
            except (SourceError, OSError, ValueError) as exc:
                if self.cfg.shards.strict:
                    raise SourceError(f"unreadable source image {id_!r} ({exc}); "
                                      "set shards.strict=false to skip it") from exc
                skipped.append({"id": str(id_), "error": f"{type(exc).__name__}: {exc}"})
        return records, skipped

    def add_depth(self, records: list) -> list:
        """Depth of the full images (before cropping); the estimator batches them across sizes.
        ``depthgen.source=none``: no depth at all (the shards hold images and labels only)."""
        if self.cfg.depthgen.source == "none":
            for rec in records:
                rec.depth = None
            return records
        est = self.estimator()
        items = records if getattr(est, "needs_records", False) else [r.image for r in records]
        with self._model:
            depths = est(items) if records else []
        for rec, depth in zip(records, depths):
            rec.depth = np.asarray(depth, np.float32)
        return records

    def samples(self, split: str, records: list) -> Iterable[dict]:
        """Encoded samples in shard order, PNG-encoded by the actor's encoding threads."""
        from depthg.data import five_crop

        crop = split == "train" and self.cfg.data.five_crop  # val is never cropped
        jobs = []
        for rec in records:
            crops = five_crop(rec, self.cfg.data.crop_ratio) if crop else [rec]
            for k, part in enumerate(crops):
                meta = {"source_id": str(rec.id), "crop": k if crop else -1, "split": split,
                        "dataset": self.cfg.data.dataset, "neighbors": []}
                key = sample_key(f"{rec.id}_c{k}" if crop else rec.id)
                jobs.append((key, part.image, part.depth, part.label, meta))
        return list(self._encoders.map(lambda job: shards.encode_sample(*job), jobs))

    def run_unit(self, split: str, index: int, ids: list[str], folder: str) -> dict:
        """Write unit ``index`` of ``split`` (``ids`` of the split's source, which this worker lists once: the
        in-process entry) as ``folder/shard-{index}.tar`` (+ sidecar); returns the sidecar plus ``seconds``,
        ``node`` (the Ray node id, None outside Ray) and ``pid`` (the worker process)."""
        return self._write(split, index, self.source(split), list(ids), folder)

    def run_listed(self, split: str, index: int, listing: str, start: int, stop: int, folder: str) -> dict:
        """The actors' call: unit ``index`` from bytes ``[start, stop)`` of the listing file ``listing`` (one
        ranged read: this unit's entries only; the actor never lists the source). Returns the unit's summary
        (``UNIT_SUMMARY``: what the driver reduces), not the sidecar."""
        from depthg.data.listing import unit_entries

        entries = unit_entries(listing, start, stop)
        info = self._write(split, index, self.source(split, listed=False).share(entries), [i for i, _ in entries],
                           folder)
        return {"index": int(index), **{k: info[k] for k in UNIT_SUMMARY}}

    def _write(self, split: str, index: int, source, ids: list[str], folder: str) -> dict:
        start = time.perf_counter()
        records, skipped = self.load(source, ids)
        records = self.add_depth(records)
        extra = {"source_ids": ids, "skipped": skipped, "digest": depth_digest(self.cfg, split)}
        info = shards.put_shard(folder, shards.shard_name(index), self.samples(split, records), extra)
        return {**info, "seconds": time.perf_counter() - start, "node": node_id(), "pid": os.getpid()}


UNIT_SUMMARY = ("name", "count", "skipped", "seconds", "node", "pid")  # a unit's result on the driver (+ "index")
IO_THREADS = 16  # the driver's parallel sidecar reads


class DepthTally:
    """What the manifest needs, reduced unit by unit as results arrive: the sample count of each unit
    (int64, -1 = not complete) and the skipped images of the units that had any. O(units), never the ids."""

    def __init__(self, units: int):
        self.counts = np.full(units, -1, np.int64)
        self.skipped: dict[int, list] = {}

    def add(self, index: int, count: int, skipped: list) -> None:
        self.counts[index] = int(count)
        if skipped:
            self.skipped[int(index)] = list(skipped)
        else:
            self.skipped.pop(int(index), None)

    def pending(self) -> np.ndarray:
        return np.flatnonzero(self.counts < 0)

    def skipped_list(self) -> list[dict]:
        """Skipped images in unit order (the manifest's ``skipped``)."""
        return [s for index in sorted(self.skipped) for s in self.skipped[index]]


def _unit_state(folder: str, index: int, key: str, digest: str) -> tuple | None:
    """``(count, skipped)`` of a complete unit from its sidecar (same ids, same depth settings), else None."""
    try:
        info = shards.read_json(io.join(folder, shards.sidecar_name(shards.shard_name(index))))
    except FileNotFoundError:
        return None
    if info.get("digest") == digest and ids_digest(info.get("source_ids") or []) == key:
        return int(info["count"]), list(info.get("skipped") or [])
    return None


def check_units(folder: str, plan: ListingPlan, digest: str, overwrite: bool = False, threads: int = IO_THREADS,
                progress: bool = False) -> DepthTally:
    """The units already complete (a rerun skips them): the folder listed once (a shard counts with both its
    tar and its sidecar), then the sidecars that exist read on ``threads`` threads and reduced as they arrive."""
    tally = DepthTally(len(plan))
    if overwrite:
        return tally
    present = set(io.listdir(folder))
    found = [u for u in range(len(plan)) if shards.shard_name(u) in present
             and shards.sidecar_name(shards.shard_name(u)) in present]
    del present
    if not found:
        return tally
    from tqdm import tqdm

    from depthg.reader import ahead

    calls = (functools.partial(_unit_state, folder, u, plan.keys[u], digest) for u in found)
    with ThreadPoolExecutor(threads, thread_name_prefix="sidecar") as pool:
        states = ahead(calls, pool, 2 * threads)
        for u, state in tqdm(zip(found, states), total=len(found), desc="depth sidecars", unit="shard",
                             disable=not progress):
            if state is not None:
                tally.add(u, *state)
    return tally


def list_units(source, path: str, unit_size: int, progress: bool = False) -> ListingPlan:
    """Stream ``source``'s listing into the local file ``path``, one unit per line (``depthg.data.listing``)."""
    from tqdm import tqdm

    with open(path, "wb") as fh:
        return write_listing(tqdm(source.scan(), desc="listing", unit="image", disable=not progress), fh, unit_size)


UNITS_IN_FLIGHT = 2  # units per depth actor at once: encoding + upload of one overlap the next's model


def depth_group(cfg: Config, max_actors: int | None = None, threads: int | None = None,
                in_flight: int = UNITS_IN_FLIGHT):
    """The pool of depth actors (reusable across splits); a context manager."""
    from cluster.raycluster import ActorGroup

    return ActorGroup(DepthWorker, (to_dict(cfg),), cfg.depthgen.num_actors, max_actors, threads,
                      device=cfg.depthgen.device, cpus_per_actor=cfg.depthgen.cpus_per_actor, in_flight=in_flight)


def generate_depth(cfg: Config, split: str, max_units: int | None = None, progress: bool = True,
                   group=None, on_unit: Callable[[dict], None] | None = None) -> dict | None:
    """Run stage 1 for one split; returns the manifest (None when stopped early by ``max_units``).

    Ray must be connected (``cluster.raycluster.connect``). ``group``: a ``depth_group`` to reuse
    (otherwise one is started for this call when there is work). ``on_unit(result)`` is called on
    the driver after each unit is complete (its sidecar written; ``result``: ``index`` and ``UNIT_SUMMARY``),
    while the next units run: tests use it to interrupt the job or lose a node at a known point.
    """
    from depthg.data import build_source

    folder = shards.split_dir(cfg.shards.root, split, "depth")
    source = build_source(cfg.data, split, n_classes=cfg.model.n_classes or None, listed=False)
    digest = depth_digest(cfg, split)
    with tempfile.TemporaryDirectory(prefix="depthg-listing-") as tmp:
        local = os.path.join(tmp, LISTING)
        plan = list_units(source, local, cfg.shards.samples_per_shard, progress)  # an empty source raises here
        tally = check_units(folder, plan, digest, cfg.shards.overwrite, progress=progress)
        pending = tally.pending()
        if len(pending):  # a manifest must never describe a half-rewritten split
            io.remove(io.join(folder, shards.MANIFEST))
        todo = pending[:max_units]
        listing = io.join(folder, LISTING)
        if len(todo):
            io.put_file(local, listing)  # written once; each unit is a byte range of it
    calls = unit_calls(split, todo, listing, plan, folder)
    if calls:
        if group is None:
            with depth_group(cfg, len(calls)) as own:
                _run(own, calls, split, progress, tally, on_unit)
        else:
            _run(group.check((to_dict(cfg),)), calls, split, progress, tally, on_unit)
        skipped = tally.skipped_list()
        if skipped:
            log.warning("depth %s: skipped %d unreadable images (listed in the manifest), e.g. %s",
                        split, len(skipped), skipped[0]["error"])
    if len(todo) < len(pending):
        return None
    return write_depth_manifest(cfg, split, folder, tally, digest, source)


def unit_calls(split: str, units, listing: str, plan: ListingPlan, folder: str) -> list[tuple]:
    """The ``run_listed`` calls of ``units``: each carries its byte range of the listing, never its ids."""
    return [(split, int(u), listing, plan.start(u), plan.stop(u), folder) for u in units]


def _run(group, calls, split: str, progress: bool, tally: DepthTally, on_unit) -> None:
    for result in group.map("run_listed", calls, f"depth {split}", progress):
        tally.add(result["index"], result["count"], result["skipped"])
        if on_unit is not None:
            on_unit(result)


def write_depth_manifest(cfg: Config, split: str, folder: str, tally: DepthTally, digest: str, source) -> dict:
    """The manifest, last, from the reduced counts (no sidecar read again)."""
    missing = tally.pending()
    if len(missing):
        raise RuntimeError(f"{folder}/{shards.shard_name(int(missing[0]))} is missing or stale after the depth job")
    skipped = tally.skipped_list()
    if skipped and not tally.counts.any():
        raise RuntimeError(f"every image of split {split} was unreadable ({len(skipped)}), e.g. {skipped[0]['error']}")
    manifest = {
        "kind": "depth", "split": split, "dataset": cfg.data.dataset,
        "shards": [{"name": shards.shard_name(i), "count": int(c)} for i, c in enumerate(tally.counts.tolist())],
        "n_classes": int(source.n_classes), "class_names": list(getattr(source, "class_names", []) or []),
        "depth_source": (cfg.depthgen.source if cfg.depthgen.source != "transformers"
                         else f"transformers:{cfg.depthgen.model}"),
        "five_crop": bool(split == "train" and cfg.data.five_crop), "digest": digest,
        "config": io.mask_secrets(to_dict(cfg)), "skipped": skipped,
    }
    shards.write_manifest(folder, manifest)
    return shards.read_manifest(folder)
