"""Segment a whole bucket of images: units of images over Ray actors, each image's outputs written exactly once.

``segment(settings, model_fn, items, output, workers)`` is the job behind ``launch/segment.py``:

* The image list (``depthg.inference.list_inputs``: a folder, a glob or any fsspec URL) is cut into units of
  ``settings["unit_size"]`` images. A unit is complete when its record ``{output}/_units/unit-NNNNNN.json`` exists;
  that record (the unit's images, their outputs, the images it could not read, the settings digest, the node) is
  written after every output of the unit, and every output is written atomically (``depthg.io``: a local rename,
  a single S3 upload), so an image is either fully written or not at all.
* A rerun (after a crash, a Ctrl-C, a lost driver) reads the records and only hands out the images no complete
  unit holds; a record made with other settings (checkpoint, probe, CRF, resolution, assignment, outputs) stops it
  with an error naming the output folder (``overwrite=True`` starts again).
* ``SegmentWorker`` runs one unit per call: reads each image (``depthg.inference.read_image``), scores it with the
  one inference path (``depthg.inference.score_images``: the same resize, codes and ``probe_scores`` as
  evaluation and the single-machine segment), finishes it at the image's own size (``finish_label``; with CRF as
  1-CPU Ray tasks through ``cluster.evaluator.submit_cpu_task``, as in evaluation), writes
  ``{name}_label.png`` (+ ``{name}_overlay.png``) and, with ``probs``, the unit's WebDataset shard
  ``probs/shard-NNNNNN.tar`` (``{key}.probs.npy`` float16 ``[C,h,w]`` softmax at the model's resolution before CRF,
  ``{key}.json``); then its record.
* ``workers=0`` runs the worker in this process (no Ray); otherwise ``cluster.raycluster.ActorGroup`` (one actor per
  GPU, CPU fallback; Ray restarts an actor that died or lost its node and resubmits its unit, which rewrites the
  same names with the same bytes before its record). The driver shows one tqdm bar in images and writes
  ``{output}/manifest.json`` (counts, settings, checkpoint, every unit record) last.
"""
from __future__ import annotations

import hashlib
import io as _pyio
import json
import os
import tempfile
import time
from typing import Callable, Sequence

import numpy as np
import torch

from cluster.evaluator import gpu_actor_options, resolve, submit_cpu_task
from cluster.raycluster import node_id
from depthg import inference, io, report
from depthg.device import resolve_device
from depthg.errors import DepthgError

UNITS = "_units"
MANIFEST = "manifest.json"
SCHEMA = "depthg-segment/1"
# settings that change the outputs: a rerun with other values must not mix its outputs with the old ones
OUTPUT_SETTINGS = ("checkpoint", "probe", "crf", "resolution", "flip", "mapping", "overlays", "probs")
ModelFn = Callable[[], tuple]


class SegmentError(DepthgError, ValueError):
    """The output folder holds work made with other settings; the message names the folder and the settings."""


def digest(settings: dict) -> str:
    """Digest of the settings that shape the outputs (``OUTPUT_SETTINGS``)."""
    key = json.dumps({k: settings.get(k) for k in OUTPUT_SETTINGS}, sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def unit_name(unit: int) -> str:
    return f"unit-{unit:06d}.json"


def shard_key(name: str) -> str:
    """A WebDataset key for an output name (no dots: WebDataset splits a member's name at its first dot)."""
    return name.replace(".", "_")


# ----------------------------------------------------------------------------- the worker
class SegmentWorker:
    """Segments units of images with one model copy; in-process or as a Ray actor (one unit per call)."""

    def __init__(self, settings: dict, model_fn: ModelFn, threads: int | None = None, device: str = "auto",
                 crf_tasks: bool = False):
        if threads:
            torch.set_num_threads(threads)
        self.s = dict(settings)
        self.device = resolve_device(device)
        self.crf_tasks = bool(crf_tasks)
        backbone, segmenter = model_fn()
        self.backbone, self.segmenter = backbone.to(self.device).eval(), segmenter.to(self.device).eval()
        self.mapping = None if self.s.get("mapping") is None else np.asarray(self.s["mapping"], np.int64)
        self.palette = np.asarray(self.s["palette"], np.uint8)

    def run(self, unit: dict) -> dict:
        """``unit`` = ``{"id", "items": [[source, name], ...]}`` -> the unit's record (also written last)."""
        start, s = time.perf_counter(), self.s
        images, kept, skipped = [], [], []
        for source, name in unit["items"]:
            try:
                images.append(inference.read_image(source))
                kept.append((source, name))
            except (DepthgError, ValueError, OSError) as exc:  # one unreadable file does not stop the bucket
                skipped.append({"source": source, "error": f"{type(exc).__name__}: {exc}"})
        labels, probs = [], []
        batch = max(int(s["batch_size"]), 1)
        for i in range(0, len(images), batch):
            chunk = images[i:i + batch]
            scores = inference.score_images(self.backbone, self.segmenter, chunk, int(s["resolution"]), s["probe"],
                                            bool(s["flip"]), self.device)
            for image, score in zip(chunk, scores):
                args = (image, score, bool(s["crf"]))
                labels.append(submit_cpu_task(inference.finish_label, args, labels) if self.crf_tasks and s["crf"]
                              else inference.finish_label(*args))
                if s["probs"]:
                    probs.append(inference.probabilities(score))
        entries = [self._write(src, name, image, label)
                   for (src, name), image, label in zip(kept, images, resolve(labels))]
        shard = self._write_probs(unit["id"], kept, images, probs) if s["probs"] and kept else None
        record = {"schema": SCHEMA, "unit": unit["id"], "settings": digest(s), "images": entries, "skipped": skipped,
                  "probs": shard, "node": node_id(), "seconds": round(time.perf_counter() - start, 3)}
        io.write_bytes(io.join(s["output"], UNITS, unit_name(unit["id"])), json.dumps(record, indent=1).encode())
        return record

    def _write(self, source: str, name: str, image: np.ndarray, label: np.ndarray) -> dict:
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

        rel = f"probs/shard-{unit:06d}.tar"
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


# ----------------------------------------------------------------------------- the driver
def read_records(output: str) -> list[dict]:
    """The records of the complete units under ``output`` (empty for a new folder)."""
    folder = io.join(output, UNITS)
    return [json.loads(io.read_bytes(io.join(folder, n))) for n in io.listdir(folder)
            if n.startswith("unit-") and n.endswith(".json")]


def plan_units(items: Sequence[tuple[str, str]], records: list[dict], unit_size: int) -> list[dict]:
    """Units for the items no record holds (images a unit could not read are tried again), numbered after the
    recorded units (pure)."""
    done = {e["source"] for r in records for e in r["images"]}
    todo = [list(it) for it in items if it[0] not in done]
    first = max((int(r["unit"]) for r in records), default=-1) + 1
    size = max(int(unit_size), 1)
    return [{"id": first + k, "items": todo[i:i + size]} for k, i in enumerate(range(0, len(todo), size))]


def _check_settings(records: list[dict], settings: dict, output: str) -> None:
    other = sorted({r["settings"] for r in records} - {digest(settings)})
    if other:
        raise SegmentError(f"output {output} holds {sum(r['settings'] in other for r in records)} unit(s) made with other "
                           f"settings ({', '.join(OUTPUT_SETTINGS)} must match to resume); use another --output or "
                           "--overwrite to start again")


def segment(settings: dict, model_fn: ModelFn, items: Sequence[tuple[str, str]], workers: int | str = 0,
            progress: bool = True, on_unit: Callable[[dict], None] | None = None, overwrite: bool = False,
            device: str = "auto") -> dict:
    """Segment ``items`` (``(source, name)``) into ``settings["output"]``; returns the manifest (written last).

    ``workers``: 0 = in this process; N = N Ray actors; ``"auto"`` = one per GPU (2 on a CPU-only cluster).
    ``on_unit(record)`` runs on the driver after each complete unit (tests pause or kill nodes there).
    """
    from tqdm import tqdm

    output, start = settings["output"], time.perf_counter()
    records = [] if overwrite else read_records(output)
    _check_settings(records, settings, output)
    units = plan_units(items, records, settings["unit_size"])
    stats = {"workers": 0}
    with tqdm(total=len(items), initial=len(items) - sum(len(u["items"]) for u in units), desc="segment",
              unit="img", disable=not progress) as bar:
        for record in _run_units(settings, model_fn, units, workers, device, stats):
            records.append(record)
            bar.update(len(record["images"]) + len(record["skipped"]))
            if on_unit is not None:
                on_unit(record)
    manifest = _manifest(settings, items, records, time.perf_counter() - start, stats["workers"])
    io.write_bytes(io.join(output, MANIFEST), json.dumps(manifest, indent=1).encode())
    return manifest


def _run_units(settings: dict, model_fn: ModelFn, units: list[dict], workers, device: str, stats: dict):
    """Records of ``units`` as they complete: in this process, or over an ``ActorGroup`` (``stats["workers"]``:
    the actors used)."""
    if not units:
        return
    if workers in (0, "0"):
        worker = SegmentWorker(settings, model_fn, device=device)
        for unit in units:
            yield worker.run(unit)
        return
    from cluster.raycluster import ActorGroup, connect

    connect()
    count = 0 if workers == "auto" else int(workers)
    with ActorGroup(SegmentWorker, (settings, model_fn), count, max_actors=len(units), threads=1, device=device,
                    options_fn=gpu_actor_options, init_kwargs={"crf_tasks": bool(settings["crf"])}) as group:
        yield from group.map("run", [(u,) for u in units], "segment", progress=False)
        stats["workers"] = len(group.actors)


def _manifest(settings: dict, items, records: list[dict], seconds: float, workers: int) -> dict:
    records = sorted(records, key=lambda r: r["unit"])
    written = {e["source"] for r in records for e in r["images"]}
    skipped = {e["source"]: e for r in records for e in r["skipped"] if e["source"] not in written}
    shown = {k: settings.get(k) for k in OUTPUT_SETTINGS if k != "mapping"}
    return {"schema": SCHEMA, "checkpoint": settings["checkpoint"], "input": settings.get("input"),
            "output": settings["output"], "settings": {**shown, "assignment": settings.get("assignment") or None,
                                                       "unit_size": settings["unit_size"]},
            "digest": digest(settings), "inputs": len(items), "images": len(written),
            "skipped": list(skipped.values()), "units": [unit_name(r["unit"]) for r in records],
            "probs_shards": [r["probs"] for r in records if r.get("probs")], "workers": workers,
            "nodes": sorted({r["node"] for r in records if r.get("node")}), "seconds": round(seconds, 2)}
