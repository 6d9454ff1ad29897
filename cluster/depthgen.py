"""Stage 1 on Ray: source images -> depth -> WebDataset depth shards ``{root}/depth/{split}``.

The split's source ids are cut, in order, into work units of ``shards.samples_per_shard`` source
images; unit i becomes ``shard-{i:06d}.tar`` (all five crops of an image land in the same shard).
A pool of ``DepthWorker`` actors (``cluster.raycluster.ActorGroup``: one GPU each when
``depthgen.device`` resolves to cuda, so a cluster's autoscaler starts GPU nodes for them; CPU
shares otherwise) reads its unit's images itself (only the config and ids travel through the object
store), estimates depth on the full images (batched across image sizes, autocast per
``depthgen.precision``), crops (train split, ``data.five_crop``), PNG-encodes the crops in a thread
pool, writes the shard to a local temp file and uploads it atomically, then its sidecar. Each actor
takes two units at a time: one unit's encoding and upload overlap the next unit's depth model
(which one lock keeps to one unit at a time). The manifest is written last.

Rerunning skips units whose shard and sidecar exist and whose sidecar matches the unit (same ids,
same depth settings); ``shards.overwrite=true`` redoes them. Unreadable images are skipped and
listed in the manifest, or fail the job naming the file with ``shards.strict=true``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

import numpy as np

from cluster.raycluster import node_id
from depthg import io, shards
from depthg.config import Config, from_dict, to_dict

log = logging.getLogger(__name__)


def _digest(data) -> str:
    return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def depth_digest(cfg: Config, split: str) -> str:
    """Fingerprint of everything that changes the depth shards' bytes (not batch size, actors...)."""
    data = {k: v for k, v in to_dict(cfg.data).items() if k not in ("resolution",)}
    gen = {k: getattr(cfg.depthgen, k) for k in ("source", "model", "flip_average", "precision")}
    return _digest({"data": data, "depthgen": gen, "split": split, "schema": shards.SCHEMA})


def plan_units(ids: list[str], samples_per_shard: int) -> list[list[str]]:
    """Deterministic assignment of source ids to shard-sized work units (in source order)."""
    return [list(ids[i:i + samples_per_shard]) for i in range(0, len(ids), samples_per_shard)]


def sample_key(source_id: str) -> str:
    """A webdataset-safe key: no dots or slashes (webdataset splits keys at the first dot)."""
    return re.sub(r"[./\\\s]", "_", str(source_id))


class DepthWorker:
    """Turns one work unit into one complete depth shard. Plain class: Ray wraps it as an actor
    (threaded: two units at a time), the benchmark's in-process loop uses it directly.

    ``threads``: torch threads and PNG-encoding threads (the actor's CPU share)."""

    def __init__(self, cfg_dict: dict, threads: int = 0):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.cfg = from_dict(Config, cfg_dict)
        self._sources: dict = {}
        self._estimator = None
        self._build = threading.Lock()  # lazy construction, shared by the actor's threads
        self._model = threading.Lock()  # one unit at a time on the depth model (the GPU)
        self._encoders = ThreadPoolExecutor(max(int(threads), 1), thread_name_prefix="png")

    def source(self, split: str):
        with self._build:
            if split not in self._sources:
                from depthg.data import build_source

                self._sources[split] = build_source(self.cfg.data, split, n_classes=self.cfg.model.n_classes or None)
            return self._sources[split]

    def estimator(self):
        with self._build:
            if self._estimator is None:
                from depthg.depth import build_estimator

                self._estimator = build_estimator(self.cfg.depthgen)
            return self._estimator

    def load(self, split: str, ids: list[str]):
        """Records that load, plus ``[{"id","error"}]`` for those that do not (or raise if strict)."""
        from depthg.data.base import SourceError

        records, skipped = [], []
        for id_ in ids:
            try:
                records.append(self.source(split).load(id_))
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
        """Write unit ``index`` of ``split`` as ``folder/shard-{index}.tar`` (+ sidecar); returns the sidecar
        plus ``seconds``, ``node`` (the Ray node id, None outside Ray) and ``pid`` (the worker process)."""
        start = time.perf_counter()
        records, skipped = self.load(split, ids)
        records = self.add_depth(records)
        extra = {"source_ids": list(ids), "skipped": skipped, "digest": depth_digest(self.cfg, split)}
        info = shards.put_shard(folder, shards.shard_name(index), self.samples(split, records), extra)
        return {**info, "seconds": time.perf_counter() - start, "node": node_id(), "pid": os.getpid()}


def unit_complete(folder: str, index: int, ids: list[str], digest: str) -> dict | None:
    info = shards.read_sidecar(folder, shards.shard_name(index))
    if info and info.get("source_ids") == list(ids) and info.get("digest") == digest:
        return info
    return None


def source_info(cfg: Config, split: str) -> dict:
    """Ids and class facts of the split's source (read on the driver; cheap: no images loaded)."""
    from depthg.data import build_source

    source = build_source(cfg.data, split, n_classes=cfg.model.n_classes or None)  # data.limit applied there
    return {"ids": source.ids(), "n_classes": int(source.n_classes),
            "class_names": list(getattr(source, "class_names", []) or [])}


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
    the driver after each unit is complete (its sidecar written), while the next units run: tests
    use it to interrupt the job or lose a node at a known point.
    """
    folder = shards.split_dir(cfg.shards.root, split, "depth")
    info = source_info(cfg, split)
    if not info["ids"]:
        raise ValueError(f"data.dataset={cfg.data.dataset} split '{split}' has no images")
    units = plan_units(info["ids"], cfg.shards.samples_per_shard)
    digest = depth_digest(cfg, split)
    pending = [i for i, ids in enumerate(units)
               if cfg.shards.overwrite or unit_complete(folder, i, ids, digest) is None]
    if pending:  # a manifest must never describe a half-rewritten split
        io.remove(io.join(folder, shards.MANIFEST))
    calls = [(split, i, units[i], folder) for i in pending[:max_units]]
    if calls:
        if group is None:
            with depth_group(cfg, len(calls)) as own:
                skipped = _run(own, calls, split, progress, on_unit)
        else:
            skipped = _run(group.check((to_dict(cfg),)), calls, split, progress, on_unit)
        if skipped:
            log.warning("depth %s: skipped %d unreadable images (listed in the manifest), e.g. %s",
                        split, len(skipped), skipped[0]["error"])
    if max_units is not None and len(calls) < len(pending):
        return None
    return write_depth_manifest(cfg, split, folder, units, digest, info)


def _run(group, calls, split: str, progress: bool, on_unit) -> list[dict]:
    skipped = []
    for info in group.map("run_unit", calls, f"depth {split}", progress):
        skipped += info["skipped"]
        if on_unit is not None:
            on_unit(info)
    return skipped


def write_depth_manifest(cfg: Config, split: str, folder: str, units, digest: str, info: dict) -> dict:
    sidecars = []
    for i, ids in enumerate(units):
        side = unit_complete(folder, i, ids, digest)
        if side is None:
            raise RuntimeError(f"{folder}/{shards.shard_name(i)} is missing or stale after the depth job")
        sidecars.append(side)
    skipped = [s for side in sidecars for s in side["skipped"]]
    if skipped and not any(s["count"] for s in sidecars):
        raise RuntimeError(f"every image of split {split} was unreadable ({len(skipped)}), e.g. {skipped[0]['error']}")
    manifest = {
        "kind": "depth", "split": split, "dataset": cfg.data.dataset,
        "shards": [{"name": s["name"], "count": s["count"]} for s in sidecars],
        "n_classes": info["n_classes"], "class_names": info["class_names"],
        "depth_source": (cfg.depthgen.source if cfg.depthgen.source != "transformers"
                         else f"transformers:{cfg.depthgen.model}"),
        "five_crop": bool(split == "train" and cfg.data.five_crop), "digest": digest,
        "config": io.mask_secrets(to_dict(cfg)), "skipped": skipped,
    }
    shards.write_manifest(folder, manifest)
    return shards.read_manifest(folder)
