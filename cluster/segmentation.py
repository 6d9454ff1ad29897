"""Segment a whole bucket of images: units of images over Ray actors, each image's outputs written exactly once.

``segment(settings, model_fn, items, output, workers)`` is the job behind ``launch/segment.py``:

* Names. Each image's outputs are named from its own path alone (``depthg.inference.output_name``: the path below
  ``--input`` with its extension, ``a.jpg`` -> ``a.jpg_label.png``), so a name never moves when files come or go.
  A rerun that plans a name a record already holds for another source (another ``--input`` into the same output)
  is refused before any work, naming the name, the source and the record.
* Units. The listing (``depthg.inference.iter_inputs``, sorted by name, streamed) is cut into units of
  ``settings["unit_size"]`` images. A unit is complete when its record ``{output}/_units/unit-NNNNNN.json`` exists;
  that record (the unit's images, their outputs, the images it could not read, the settings digest, the node) is
  written after every output of the unit, and every output is written atomically (``depthg.io``: a local rename,
  a single S3 upload), so an image is either fully written or not at all.
* The driver holds O(units) plus a compact done-set. A rerun lists ``_units/`` once and reads the records on
  ``READ_THREADS`` threads, each reduced as it arrives (``Tally``): per recorded image two 64-bit hashes (name,
  source) and its unit (20 bytes), per unit its id; records of other settings or of the earlier layout
  (``depthg-segment/1``) stop it with an error naming the output folder. ``plan`` then streams the listing past
  the done-set (in pages, ``numpy.searchsorted``), and writes the units still to do to a local spool file (one
  JSON line per unit), numbered after the highest recorded unit; the actors get them from the spool as they free
  up (``ActorGroup.map`` over an iterator). Images a unit could not read are tried again.
* Probability shards (``probs``): a unit's shard ``probs/shard-NNNNNN.tar`` is uploaded before its record, so a
  crash can leave a shard no record references; before a rerun hands out any unit, every such shard is removed
  (``remove_orphans``), so any reader of ``probs/*.tar`` sees each image once.
* ``SegmentWorker`` runs one unit per call: reads its images on ``io_threads`` threads
  (``depthg.inference.read_image``), scores them with the one inference path (``depthg.inference.score_images``:
  the same resize, codes and ``probe_scores`` as evaluation and the single-machine segment) under a lock, finishes
  each at the image's own size (``finish_label``; with CRF as 1-CPU Ray tasks through
  ``cluster.evaluator.submit_cpu_task``, as in evaluation), writes ``{name}_label.png`` (+ ``{name}_overlay.png``)
  on the threads and, with ``probs``, the unit's WebDataset shard (``{key}.probs.npy`` float16 ``[C,h,w]`` softmax
  at the model's resolution before CRF, ``{key}.json``); then its record. ``prefetch`` units run beside the one
  being scored (a threaded actor, ``ActorGroup(in_flight=1 + prefetch)``; in this process a thread pool), so the
  next unit's reads and the last unit's writes overlap the scoring: only the scoring holds the lock.
* ``workers=0`` runs the worker in this process (no Ray); otherwise ``cluster.raycluster.ActorGroup`` (one actor per
  GPU, CPU fallback; Ray restarts an actor that died or lost its node and resubmits its unit, which rewrites the
  same names with the same bytes before its record). The driver shows one tqdm bar in images and writes
  ``{output}/manifest.json`` (counts, settings, checkpoint, the unit records by name) last.
"""
from __future__ import annotations

import functools
import hashlib
import io as _pyio
import json
import os
import tempfile
import threading
import time
from array import array
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from cluster.raycluster import node_id
from depthg import io
from depthg.errors import DepthgError
from depthg.reader import ahead

# the driver's part imports neither torch nor the models (its process stays small: bench/scale_segment.py); the
# worker imports them in its constructor

UNITS = "_units"
PROBS = "probs"
MANIFEST = "manifest.json"
SCHEMA = "depthg-segment/2"
OLD_SCHEMAS = {"depthg-segment/1": "output names without the extension, index-prefixed on a name collision"}
# settings that change the outputs: a rerun with other values must not mix its outputs with the old ones
OUTPUT_SETTINGS = ("checkpoint", "probe", "crf", "resolution", "flip", "mapping", "overlays", "probs")
READ_THREADS = 16  # records read at once by a rerun's driver
PAGE = 4096  # listed images checked against the done-set at once
IO_THREADS = 8  # image reads / output writes at once per unit
ModelFn = Callable[[], tuple]


class SegmentError(DepthgError, ValueError):
    """The output folder holds work made with other settings, another layout or for other sources; the message
    names the folder and what to do."""


def digest(settings: dict) -> str:
    """Digest of the settings that shape the outputs (``OUTPUT_SETTINGS``)."""
    key = json.dumps({k: settings.get(k) for k in OUTPUT_SETTINGS}, sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def unit_name(unit: int) -> str:
    return f"unit-{unit:06d}.json"


def shard_name(unit: int) -> str:
    return f"{PROBS}/shard-{unit:06d}.tar"


def shard_key(name: str) -> str:
    """The WebDataset key of an output name: ``%`` and ``.`` percent-encoded (WebDataset splits a member's name at
    its first dot), so distinct names keep distinct keys (``a.b.png`` -> ``a%2Eb%2Epng``, ``a_b.png`` ->
    ``a_b%2Epng``)."""
    return name.replace("%", "%25").replace(".", "%2E")


# ----------------------------------------------------------------------------- the worker
class SegmentWorker:
    """Segments units of images with one model copy; in-process or as a Ray actor (one unit per call; calls may
    overlap: only the scoring is serialised)."""

    def __init__(self, settings: dict, model_fn: ModelFn, threads: int | None = None, device: str = "auto",
                 crf_tasks: bool = False, io_threads: int = IO_THREADS):
        from cluster.raycluster import check_node

        check_node()  # first: a node that failed its start-up check stops here, once, with its message
        import torch

        from depthg.device import resolve_device

        if threads:
            torch.set_num_threads(threads)
        self.s = dict(settings)
        self.device = resolve_device(device)
        self.crf_tasks = bool(crf_tasks)
        backbone, segmenter = model_fn()
        self.backbone, self.segmenter = backbone.to(self.device).eval(), segmenter.to(self.device).eval()
        self.mapping = None if self.s.get("mapping") is None else np.asarray(self.s["mapping"], np.int64)
        self.palette = np.asarray(self.s["palette"], np.uint8)
        self._scoring = threading.Lock()
        self._pool = ThreadPoolExecutor(int(io_threads), thread_name_prefix="segment-io") if io_threads > 1 else None

    def _each(self, fn, items: Sequence) -> list:
        return list(self._pool.map(fn, items)) if self._pool is not None else [fn(x) for x in items]

    @staticmethod
    def _read(item: Sequence[str]):
        from depthg import inference

        try:
            return inference.read_image(item[0]), None
        except (DepthgError, ValueError, OSError) as exc:  # one unreadable file does not stop the bucket
            return None, f"{type(exc).__name__}: {exc}"

    def run(self, unit: dict) -> dict:
        """``unit`` = ``{"id", "items": [[source, name], ...]}`` -> the unit's record (also written last)."""
        from cluster.evaluator import resolve, submit_cpu_task
        from depthg import inference

        start, s = time.perf_counter(), self.s
        kept, images, skipped = [], [], []
        for (source, name), (image, error) in zip(unit["items"], self._each(self._read, unit["items"])):
            if image is None:
                skipped.append({"source": source, "error": error})
            else:
                kept.append((source, name))
                images.append(image)
        read_s = time.perf_counter() - start
        batch, scores = max(int(s["batch_size"]), 1), []
        with self._scoring:  # the device does one unit at a time; the other calls read or write meanwhile
            score_start = time.perf_counter()
            for i in range(0, len(images), batch):
                scores += inference.score_images(self.backbone, self.segmenter, images[i:i + batch],
                                                 int(s["resolution"]), s["probe"], bool(s["flip"]), self.device)
            score_s = time.perf_counter() - score_start
        tasks = self.crf_tasks and bool(s["crf"])
        labels = []
        for image, score in zip(images, scores):
            args = (image, score, bool(s["crf"]))
            labels.append(submit_cpu_task(inference.finish_label, args, labels) if tasks
                          else inference.finish_label(*args))
        probs = [inference.probabilities(score) for score in scores] if s["probs"] else []
        if tasks:
            labels = resolve(labels)
        entries = self._each(lambda a: self._write(*a), list(zip(kept, images, labels)))
        shard = self._write_probs(unit["id"], kept, images, probs) if s["probs"] and kept else None
        record = {"schema": SCHEMA, "unit": unit["id"], "settings": digest(s), "images": entries, "skipped": skipped,
                  "probs": shard, "node": node_id(), "seconds": round(time.perf_counter() - start, 3),
                  "read_s": round(read_s, 3), "score_s": round(score_s, 3)}
        io.write_bytes(io.join(s["output"], UNITS, unit_name(unit["id"])), json.dumps(record, indent=1).encode())
        return record

    def _write(self, item: Sequence[str], image: np.ndarray, label: np.ndarray) -> dict:
        from depthg import inference, report

        source, name = item
        if self.mapping is not None:
            label = self.mapping[label]
        out = self.s["output"]
        files = {"label": f"{name}_label.png"}
        io.write_bytes(io.join(out, files["label"]), inference.png_bytes(label))
        if self.s["overlays"]:
            files["overlay"] = f"{name}_overlay.png"
            colours = report.colorize(label, self.palette)
            io.write_bytes(io.join(out, files["overlay"]), inference.png_bytes(inference.overlay(image, colours)))
        return {"source": source, "name": name, "size": list(image.shape[:2]), "files": files}

    def _write_probs(self, unit: int, kept: Sequence, images: Sequence, probs: Sequence) -> str:
        """The unit's probabilities as one WebDataset shard (written locally, then one atomic upload)."""
        import webdataset as wds

        rel = shard_name(unit)
        with tempfile.TemporaryDirectory(prefix="depthg-probs-") as tmp:
            local = os.path.join(tmp, "shard.tar")
            with wds.TarWriter(local, encoder=False) as sink:
                for (source, name), image, p in zip(kept, images, probs):
                    buf = _pyio.BytesIO()
                    np.save(buf, p, allow_pickle=False)
                    meta = {"source": source, "name": name, "image_size": list(image.shape[:2]),
                            "score_size": list(p.shape[1:]), "probe": self.s["probe"]}
                    sink.write({"__key__": shard_key(name), "probs.npy": buf.getvalue(),
                                "json": json.dumps(meta).encode()})
            io.put_file(local, io.join(self.s["output"], rel))
        return rel

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


# ----------------------------------------------------------------------------- what the driver keeps of the records
def _hash(text: str) -> int:
    """A 64-bit hash of ``text`` for this process's done-set (Python's string hash: the driver alone compares)."""
    return hash(text)


@dataclass
class Tally:
    """The driver's reduction of the unit records: O(units) (``units``, ``shards``, ``nodes``) plus 20 bytes per
    recorded image (hashes of its name and source, its unit) for the done-set; skipped images by source (few)."""

    units: set = field(default_factory=set)
    shards: set = field(default_factory=set)
    nodes: set = field(default_factory=set)
    images: int = 0
    other_settings: int = 0
    old: dict = field(default_factory=dict)  # old schema -> records
    _names: array = field(default_factory=lambda: array("q"))
    _sources: array = field(default_factory=lambda: array("q"))
    _owners: array = field(default_factory=lambda: array("i"))
    _sorted: tuple | None = None

    def add(self, record: dict, settings_digest: str | None = None, done_set: bool = True) -> None:
        """Reduce one record (``done_set=False``: its unit only, for records of this run, which no plan reads)."""
        schema = record.get("schema", "depthg-segment/1")
        if schema != SCHEMA:
            self.old[schema] = self.old.get(schema, 0) + 1
            return
        if settings_digest is not None and record.get("settings") != settings_digest:
            self.other_settings += 1
        unit = int(record["unit"])
        self.units.add(unit)
        if record.get("probs"):
            self.shards.add(record["probs"])
        if record.get("node"):
            self.nodes.add(record["node"])
        for e in record["images"] if done_set else ():
            self._names.append(_hash(e["name"]))
            self._sources.append(_hash(e["source"]))
            self._owners.append(unit)
        self.images += len(record["images"])
        self._sorted = None

    def check(self, output: str) -> None:
        """Raise ``SegmentError`` for records of an earlier layout or of other settings (before any work)."""
        if self.old:
            what = "; ".join(f"{n} unit record(s) of {k} ({OLD_SCHEMAS.get(k, 'an unknown layout')})"
                             for k, n in sorted(self.old.items()))
            raise SegmentError(f"output {output} holds {what}, written by an earlier version of segment; segment into "
                               "a new --output, or add --overwrite to redo every image there")
        if self.other_settings:
            raise SegmentError(f"output {output} holds {self.other_settings} unit(s) made with other settings "
                               f"({', '.join(OUTPUT_SETTINGS)} must match to resume); use another --output or "
                               "--overwrite to start again")

    def lookup(self, names: Sequence[str], sources: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(done, owner)`` for listed images: ``done`` True where a record holds that name for that source;
        ``owner`` the unit holding the name for *another* source (else -1)."""
        if self._sorted is None:
            order = np.argsort(np.frombuffer(self._names, np.int64), kind="stable")
            self._sorted = tuple(np.frombuffer(a, dt)[order] for a, dt in
                                 ((self._names, np.int64), (self._sources, np.int64), (self._owners, np.int32)))
        keys, srcs, owners = self._sorted
        if not len(keys):  # nothing recorded: a first run hashes nothing
            return np.zeros(len(names), bool), np.full(len(names), -1, np.int64)
        n = np.fromiter((_hash(x) for x in names), np.int64, len(names))
        s = np.fromiter((_hash(x) for x in sources), np.int64, len(sources))
        at = np.minimum(np.searchsorted(keys, n), len(keys) - 1)
        held = keys[at] == n
        done = held & (srcs[at] == s)
        return done, np.where(held & ~done, owners[at], -1)


def _read_record(url: str) -> dict:
    try:
        return json.loads(io.read_bytes(url))
    except ValueError as exc:
        raise SegmentError(f"{url}: not a unit record ({exc}); remove it to redo its images") from exc


def iter_records(output: str, threads: int = READ_THREADS) -> Iterator[dict]:
    """The records of the complete units under ``output`` (none for a new folder): ``_units/`` listed once, the
    records read on ``threads`` threads, in name order."""
    folder = io.join(output, UNITS)
    names = [n for n in io.listdir(folder) if n.startswith("unit-") and n.endswith(".json")]
    with ThreadPoolExecutor(max(int(threads), 1), thread_name_prefix="segment-records") as pool:
        yield from ahead((functools.partial(_read_record, io.join(folder, n)) for n in names), pool, 2 * threads)


def read_records(output: str) -> list[dict]:
    """Every record under ``output`` as a list (tests and small outputs; the job reduces them with ``Tally``)."""
    return list(iter_records(output))


def tally(output: str, settings: dict | None = None) -> Tally:
    """The records under ``output`` reduced as they arrive (``Tally``)."""
    result, want = Tally(), None if settings is None else digest(settings)
    for record in iter_records(output):
        result.add(record, want)
    return result


def remove_orphans(output: str, referenced: set) -> list[str]:
    """Remove the probability shards under ``output`` that no record references (left by a unit that crashed between
    its shard and its record); returns what was removed."""
    folder = io.join(output, PROBS)
    orphans = [f"{PROBS}/{n}" for n in io.listdir(folder)
               if n.startswith("shard-") and n.endswith(".tar") and f"{PROBS}/{n}" not in referenced]
    for rel in orphans:
        io.remove(io.join(output, rel))
    return orphans


# ----------------------------------------------------------------------------- the plan
@dataclass
class Plan:
    """The outcome of ``plan``: counts and the spool of units to do (O(1) in memory)."""

    listed: int = 0
    done: int = 0
    units: int = 0
    first: int = 0
    spool: str = ""

    @property
    def todo(self) -> int:
        return self.listed - self.done


def _pages(items: Iterable, size: int = PAGE) -> Iterator[list]:
    page = []
    for item in items:
        page.append(item)
        if len(page) == size:
            yield page
            page = []
    if page:
        yield page


def plan(items: Iterable[tuple[str, str]], done: Tally, unit_size: int, spool: str, output: str = "") -> Plan:
    """Stream ``items`` (``(source, name)``, in listing order) past the done-set into units of ``unit_size`` images
    no record holds, numbered after the highest recorded unit, one JSON line each in the local file ``spool``.
    A name a record holds for another source raises ``SegmentError`` (before any unit runs)."""
    size = max(int(unit_size), 1)
    out = Plan(first=max(done.units, default=-1) + 1, spool=spool)
    chunk: list = []
    with open(spool, "w") as fh:
        def flush():
            s0, n0 = chunk[0]
            root = s0[:len(s0) - len(n0)] if s0.endswith(n0) else ""
            fh.write(json.dumps({"id": out.first + out.units, "root": root,
                                 "items": [n if s == root + n else [s, n] for s, n in chunk]},
                                separators=(",", ":")) + "\n")
            out.units += 1
            chunk.clear()

        for page in _pages(items):
            names, sources = [n for _, n in page], [s for s, _ in page]
            is_done, owner = done.lookup(names, sources)
            if (owner >= 0).any():
                k = int(np.flatnonzero(owner >= 0)[0])
                raise SegmentError(
                    f"output {output}: the name {names[k]!r} of {sources[k]} is held by "
                    f"{UNITS}/{unit_name(int(owner[k]))} for another source (names are the path below --input); "
                    "segment this input into another --output")
            out.listed += len(page)
            out.done += int(is_done.sum())
            for item, hit in zip(page, is_done):
                if not hit:
                    chunk.append(item)
                    if len(chunk) == size:
                        flush()
        if chunk:
            flush()
    return out


def spooled_units(spool: str) -> Iterator[dict]:
    """The units ``plan`` wrote to ``spool``, one at a time (``{"id", "items": [[source, name], ...]}``)."""
    with open(spool) as fh:
        for line in fh:
            unit = json.loads(line)
            root = unit.pop("root")
            unit["items"] = [[root + it, it] if isinstance(it, str) else it for it in unit["items"]]
            yield unit


# ----------------------------------------------------------------------------- the job
def prepare(settings: dict, items: Iterable[tuple[str, str]], spool: str, overwrite: bool = False) -> tuple[Tally, Plan]:
    """The driver's part before any unit runs: records reduced (or, with ``overwrite``, the job's records, shards and
    manifest removed), checked, the listing planned into ``spool``, orphan shards removed."""
    output = settings["output"]
    if overwrite:
        for rel in (UNITS, PROBS, MANIFEST):
            io.remove(io.join(output, rel))
    done = Tally() if overwrite else tally(output, settings)
    done.check(output)
    job = plan(items, done, settings["unit_size"], spool, output)
    remove_orphans(output, done.shards)
    return done, job


def segment(settings: dict, model_fn: ModelFn, items: Iterable[tuple[str, str]], workers: int | str = 0,
            progress: bool = True, on_unit: Callable[[dict], None] | None = None, overwrite: bool = False,
            device: str = "auto") -> dict:
    """Segment ``items`` (``(source, name)``, e.g. ``inference.iter_inputs(url)``) into ``settings["output"]``;
    returns the manifest (written last).

    ``workers``: 0 = in this process; N = N Ray actors; ``"auto"`` = one per GPU (2 on a CPU-only cluster).
    ``settings["prefetch"]`` (default 1): units each worker runs beside the one it scores; ``settings["io_threads"]``
    (default ``IO_THREADS``): reads and writes at once per unit. ``on_unit(record)`` runs on the driver after each
    complete unit (tests pause or kill nodes there).
    """
    from tqdm import tqdm

    output, start = settings["output"], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="depthg-segment-") as tmp:
        done, job = prepare(settings, items, os.path.join(tmp, "units.jsonl"), overwrite)
        stats, skipped, written = {"workers": 0}, {}, 0
        records = _run_units(settings, model_fn, spooled_units(job.spool), job.units, workers, device, stats)
        with tqdm(total=job.listed, initial=job.done, desc="segment", unit="img", disable=not progress) as bar:
            try:
                for record in records:
                    done.add(record, done_set=False)
                    written += len(record["images"])
                    skipped.update((e["source"], e) for e in record["skipped"])
                    bar.update(len(record["images"]) + len(record["skipped"]))
                    if on_unit is not None:
                        on_unit(record)
            finally:
                records.close()  # a stopped job: the units in flight finish here
    manifest = _manifest(settings, job, done, written, list(skipped.values()), time.perf_counter() - start,
                         stats["workers"])
    io.write_bytes(io.join(output, MANIFEST), json.dumps(manifest, indent=1).encode())
    return manifest


def _run_units(settings: dict, model_fn: ModelFn, units: Iterator[dict], count: int, workers, device: str,
               stats: dict):
    """Records of ``units`` (``count`` of them) as they complete: in this process, or over an ``ActorGroup``
    (``stats["workers"]``: the actors used); ``1 + prefetch`` units in flight per worker."""
    if not count:
        return
    in_flight = 1 + max(int(settings.get("prefetch", 1)), 0)
    io_threads = int(settings.get("io_threads", IO_THREADS))
    if workers in (0, "0"):
        worker = SegmentWorker(settings, model_fn, device=device, io_threads=io_threads)
        try:
            yield from _pipeline(worker.run, units, in_flight)
        finally:
            worker.close()
        return
    from cluster.evaluator import gpu_actor_options
    from cluster.raycluster import ActorGroup, connect

    connect()
    n = 0 if workers == "auto" else int(workers)
    with ActorGroup(SegmentWorker, (settings, model_fn), n, max_actors=count, threads=1, device=device,
                    in_flight=in_flight, options_fn=gpu_actor_options,
                    init_kwargs={"crf_tasks": bool(settings["crf"]), "io_threads": io_threads}) as group:
        yield from group.map("run", ((u,) for u in units), "segment", progress=False, total=count)
        stats["workers"] = len(group.actors)


def _pipeline(run: Callable[[dict], dict], units: Iterator[dict], in_flight: int) -> Iterator[dict]:
    """``run(unit)`` for each unit on ``in_flight`` threads, results as they complete (1: one after the other)."""
    if in_flight <= 1:
        for unit in units:
            yield run(unit)
        return
    with ThreadPoolExecutor(in_flight, thread_name_prefix="segment-unit") as pool:
        running = set()  # never more than the pool's threads: every submitted unit is running, none queued
        for unit in units:
            running.add(pool.submit(run, unit))
            if len(running) >= in_flight:
                finished, running = wait(running, return_when=FIRST_COMPLETED)
                for f in finished:
                    yield f.result()
        while running:
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for f in finished:
                yield f.result()


def _manifest(settings: dict, job: Plan, done: Tally, written: int, skipped: list, seconds: float,
              workers: int) -> dict:
    shown = {k: settings.get(k) for k in OUTPUT_SETTINGS if k != "mapping"}
    return {"schema": SCHEMA, "checkpoint": settings["checkpoint"], "input": settings.get("input"),
            "output": settings["output"], "settings": {**shown, "assignment": settings.get("assignment") or None,
                                                       "unit_size": settings["unit_size"]},
            "digest": digest(settings), "inputs": job.listed, "images": job.done + written,
            "skipped": skipped, "units": [unit_name(u) for u in sorted(done.units)],
            "probs_shards": sorted(done.shards), "workers": workers, "nodes": sorted(done.nodes),
            "seconds": round(seconds, 2)}
