"""Stage 2 on Ray: depth shards -> training shards ``{root}/{split}`` (layout ``grouped/3``) with positives.

1. Units (``MiningWorker.unit``): ``depthg.shards.plan_units`` cuts the split's depth shards, from their
   counts alone, into units of up to 16 depth shards drawn at random (a seeded permutation). The actor of a
   unit streams its depth shards once (so stage 2 reads each stage-1 byte once across the cluster, however
   many nodes), and for every sample computes its global feature (``mining.device``: the frozen backbone at
   ``data.resolution`` after the training transform, mean-pooled, L2-normalised) and its training sample
   (``resize_center_crop`` at ``data.resolution``, encoded as ``mining.rgb_codec`` / ``rgb_quality`` /
   ``depth_codec``; labels stay PNG); it writes the unit's training shards in the order of
   ``depthg.shards.deal`` (the crops of an image in different shards) with their sidecars, and the unit's
   features in training order (``{root}/features/{split}/{settings digest}/unit-NNNNNN.npy``). Whatever is
   complete is skipped: a rerun with another ``mining.k`` or ``num_positives`` reads no stage-1 byte, another
   backbone reads them for the features alone.
2. Offsets table: each unit's result carries its shards' offsets (from its sidecars, read by the actor);
   the driver fills one preallocated table as results arrive (O(N) numpy, 28 B per crop in memory) and
   writes ``offsets.npz`` once (8 B per crop).
3. Neighbours (``MiningWorker.neighbours``): the split's query rows, cut into calls of whole training shards
   (``KNN_CALL_ROWS``), go to every actor of the pool. Each actor holds the keys once: one memory-mapped
   file per node (``cluster.nodecache``), built by the first actor of the node from the features, put on
   its GPU when it fits (``KNN_DEVICE_KEYS``); it computes the exact cosine top-k of its rows in
   fixed-size blocks (``depthg.knn.topk_blocks``; self excluded, ties to the lower index: the same neighbours
   as one process) and writes each of its shards' row file: positives = neighbour ranks 1..``num_positives``
   (cycled when fewer exist), with their byte ranges from the offsets table.
4. The manifest, last. The files of the split's previous layout (listed by its old manifest) are removed.

The driver holds O(shards): per-shard counts, the units, small results (and the offsets table while it is
filled); no id, feature or neighbour list passes through it. Reruns skip whole splits whose manifest records
the same depth shards, mining settings and layout; a split of an earlier layout (``shuffled/2``, or positives
embedded) is remined.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io as _pyio
import json
import logging
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

from cluster.depthgen import _digest
from cluster.nodecache import NodeCache, cache_dir
from cluster.raycluster import node_id
from depthg import io, shards
from depthg.config import Config, from_dict, to_dict

log = logging.getLogger(__name__)
LAYOUT_SEED = 0  # the layout's seed (a split's layout is a function of its depth shards' counts alone)
KNN_CALL_ROWS = 16384  # query rows per neighbours call at most (whole training shards; computed in fixed blocks)
KNN_CALLS_PER_ACTOR = 4  # ... and fewer rows (whole query blocks) when that gives each actor fewer calls
KNN_DEVICE_KEYS = 0.5  # keys go to the GPU once when they take at most this share of its free memory
FETCH_THREADS = 16  # parallel reads of feature files while an actor builds its node's key file


class MiningWorker:
    """Units (features + training shards) and neighbours (top-k + row files). Plain class; Ray makes it an actor."""

    def __init__(self, cfg_dict: dict, job: str = "local", threads: int = 0):
        from cluster.raycluster import check_node

        check_node()  # first: a node that failed its start-up check stops here, once, with its message
        import torch

        from depthg.device import resolve_device

        if threads:
            torch.set_num_threads(threads)
        self.cfg = from_dict(Config, cfg_dict)
        self.device = resolve_device(self.cfg.mining.device)
        self._backbone = None
        self._knn: tuple | None = None  # (setup digest, keys, offsets table)
        self.cache = NodeCache(cache_dir(self.cfg.mining.cache_dir, job, node_id() or "local"))

    def backbone(self):
        if self._backbone is None:
            from depthg.models import build_backbone

            self._backbone = build_backbone(self.cfg.model.backbone, self.cfg.model.weights).to(self.device)
        return self._backbone

    # ------------------------------------------------------------------------- 1. a unit
    def unit(self, unit: dict, depth_urls: list[str], folder: str, feature_url: str, train_key: dict) -> dict:
        """Unit ``unit`` (``shards.Unit`` fields): read its depth shards once, write what is missing of its
        training shards (digest of ``train_key`` + the unit) and its features; returns the shards' offsets."""
        u = shards.Unit(unit["index"], tuple(unit["depth"]), unit["first"], tuple(unit["counts"]))
        names = [shards.train_shard_name(u.first + j) for j in range(len(u.counts))]
        digest = _digest({**train_key, "unit": dataclasses.astuple(u)})
        infos = [shards.read_sidecar(folder, name) for name in names]
        need_shards = self.cfg.shards.overwrite or not all(i and i.get("digest") == digest for i in infos)
        need_feats = self.cfg.shards.overwrite or not io.exists(feature_url)
        read = [0]
        if need_shards or need_feats:
            encoded, feats = self._read_unit(u, depth_urls, need_shards, need_feats, read)
            parts = shards.deal(u, LAYOUT_SEED)
            if need_shards:
                infos = [shards.put_shard(folder, name, [encoded[p] for p in part], {"digest": digest, "skipped": []})
                         for name, part in zip(names, parts)]
            if need_feats:
                order = np.concatenate(parts) if parts else np.zeros(0, np.int64)
                buf = _pyio.BytesIO()
                np.save(buf, feats[order] if len(order) else np.zeros((0, 0), np.float32))
                io.write_bytes(feature_url, buf.getvalue())
        return {"index": u.index, "first": u.first, "counts": [i["count"] for i in infos], "node": node_id(),
                "offsets": [i["offsets"] for i in infos], "prefix": [i["prefix"] for i in infos],
                "depth_bytes_read": read[0]}

    def _read_unit(self, u: shards.Unit, depth_urls: list[str], encode: bool, features: bool, meter: list):
        """Stream the unit's depth shards once: encoded training samples and/or features, in unit order."""
        from depthg.codecs import mining_encoding
        from depthg.data import resize_center_crop

        res, encoding = self.cfg.data.resolution, mining_encoding(self.cfg.mining)
        encoded, images, counts = [], [], []
        for url in depth_urls:
            count = 0
            for raw in shards.iter_shard(url, meter=meter):
                count += 1
                image = resize_center_crop(shards.decode_image(raw["rgb.png"]), res)
                if features:
                    images.append(image)
                if encode:
                    depth = shards.decode_depth(raw["depth.png"]) if "depth.png" in raw else None
                    label = shards.decode_label(raw["label.png"]) if "label.png" in raw else None
                    meta = {k: v for k, v in json.loads(raw["meta.json"]).items() if k != "neighbors"}
                    encoded.append(shards.encode_sample(
                        raw["__key__"], image, None if depth is None else resize_center_crop(depth, res),
                        None if label is None else resize_center_crop(label, res), meta, encoding))
            counts.append(count)
        if sum(counts) != sum(u.counts):
            raise shards.ShardError(f"depth shards {', '.join(depth_urls)} hold {sum(counts)} samples, their "
                                    f"manifest {sum(u.counts)}: rerun python launch/generate_depth.py")
        return encoded, (self._features(images) if features else None)

    def _features(self, images: list) -> np.ndarray:
        """Mean-pooled, L2-normalised backbone features of images already at ``data.resolution``."""
        import torch

        from depthg.data import to_tensor_image
        from depthg.knn import normalize

        size = max(int(self.cfg.mining.batch_size), 1)
        out = [np.zeros((0, self.backbone().dim), np.float32)]
        with torch.no_grad():
            for start in range(0, len(images), size):
                x = torch.stack([to_tensor_image(im) for im in images[start:start + size]])
                f = self.backbone()(x.to(self.device)).float().mean(dim=(2, 3))
                out.append(normalize(f).cpu().numpy())
        return np.concatenate(out).astype(np.float32)

    # ------------------------------------------------------------------------- 3. neighbours
    def neighbours(self, setup: dict, shard_range: tuple[int, int], row_range: tuple[int, int]) -> dict:
        """Top-k of rows ``row_range`` (training shards ``shard_range``) over the whole split; their row files."""
        import time

        from depthg.knn import topk_blocks

        cpu = time.process_time()
        keys, table = self._keys(setup)
        g0, g1 = row_range
        kk = min(setup["k"], setup["num_positives"], len(table) - 1)
        _, idx = topk_blocks(keys[g0:g1], keys, kk, first=g0, device=self.device)
        positives = idx.numpy()[:, np.arange(setup["num_positives"]) % kk]
        for s in range(*shard_range):
            a, b = int(table.first[s]) - g0, int(table.first[s + 1]) - g0
            shards.write_rows(setup["folder"], table.names[s], shards.build_rows(table, s, positives[a:b]))
        return {"shards": list(shard_range), "rows": g1 - g0, "node": node_id(), "pid": os.getpid(),
                "cpu_s": time.process_time() - cpu}

    def _keys(self, setup: dict):
        """The split's keys (held once: this node's memory-mapped key file, on the GPU when it fits) and its
        offsets table, kept across calls."""
        import torch

        if self._knn is None or self._knn[0] != setup["digest"]:
            self._knn = None  # the previous split's keys go first
            path = self.cache.build(f"keys-{setup['digest']}.npy", lambda tmp: build_keys(setup, tmp))
            keys = torch.from_numpy(np.load(path, mmap_mode="c"))  # copy-on-write map: pages shared by the node
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                if keys.numel() * 4 <= KNN_DEVICE_KEYS * free:
                    keys = keys.to(self.device)
            import ray

            self._knn = (setup["digest"], keys, ray.get(setup["table"]))  # the driver's table, once per node's store
        return self._knn[1], self._knn[2]

    def close(self) -> None:
        """Remove this job's files on this node (``ActorGroup`` calls it before killing the actor)."""
        self._knn = None
        self.cache.close()


def build_keys(setup: dict, path: str) -> None:
    """Write the split's normalised features (float32 [N, C], training order) to ``path`` (an .npy), reading
    the units' feature files on threads, one unit at a time in memory."""
    import torch

    from depthg.knn import normalize

    urls = [io.join(setup["features"], feature_name(i)) for i in range(setup["units"])]
    log.info("this node's kNN keys: %d crops from %d feature files -> %s", setup["n"], len(urls), path)
    keys = None
    row = 0
    with ThreadPoolExecutor(FETCH_THREADS) as pool:
        for part in pool.map(read_features, urls):
            if not len(part):
                continue
            if keys is None:
                keys = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(setup["n"], part.shape[1]))
            keys[row:row + len(part)] = normalize(torch.from_numpy(part)).numpy()
            row += len(part)
    if row != setup["n"]:
        raise RuntimeError(f"features under {setup['features']} hold {row} rows, the split {setup['n']}")
    keys.flush()
    log.info("this node's kNN keys written: %.1f GB", keys.nbytes / 1e9)
    del keys


def feature_name(unit: int) -> str:
    return f"unit-{unit:06d}.npy"


def read_features(url: str) -> np.ndarray:
    """``feats [n, C] float32`` of one kept unit feature file (training order)."""
    return np.load(_pyio.BytesIO(io.read_bytes(url)), allow_pickle=False)


# ----------------------------------------------------------------------------- driver
def features_folder(cfg: Config, split: str, dm: dict) -> str:
    """Where the split's global features are kept, keyed by everything they depend on (their row order is
    the layout's)."""
    key = {"depth": dm.get("digest"), "total": dm["total"], "shards": dm["shards"], "backbone": cfg.model.backbone,
           "weights": io.mask_secrets(cfg.model.weights), "resolution": cfg.data.resolution, "layout": shards.LAYOUT}
    return io.join(cfg.shards.root, "features", split, _digest(key))


def mining_group(cfg: Config, max_actors: int | None = None):
    """The pool of mining actors (reusable across splits, one file cache per node); a context manager."""
    from cluster.raycluster import ActorGroup

    return ActorGroup(MiningWorker, (to_dict(cfg), uuid.uuid4().hex[:12]), cfg.mining.num_actors, max_actors,
                      device=cfg.mining.device)


def mine_neighbors(cfg: Config, split: str, max_units: int | None = None, progress: bool = True,
                   group=None, on_unit: Callable[[dict], None] | None = None) -> dict | None:
    """Run stage 2 for one split; returns the training manifest (None when stopped by ``max_units``).

    ``group``: a ``mining_group`` to reuse (otherwise one is started for this call). ``on_unit``:
    called on the driver with each unit's result (its shards' offsets + ``node``) once it is written.
    """
    depth_folder = shards.split_dir(cfg.shards.root, split, "depth")
    dm = shards.read_manifest(depth_folder)
    done = _finished_manifest(cfg, split, dm)
    if done is not None:
        return done
    if int(dm["total"]) < 2:
        raise shards.ShardError(f"{io.join(depth_folder, shards.MANIFEST)}: split {split} has {dm['total']} "
                                "sample(s); mining neighbours needs at least 2 (python launch/generate_depth.py)")
    units = shards.plan_units([int(s["count"]) for s in dm["shards"]], LAYOUT_SEED)
    if group is None:
        with mining_group(cfg, max_actors=len(units)) as own:
            return mine_neighbors(cfg, split, max_units, progress, own, on_unit)
    group.check((to_dict(cfg),))
    folder = shards.split_dir(cfg.shards.root, split, "train")
    previous = _previous_manifest(folder)
    io.remove(io.join(folder, shards.MANIFEST))
    table = write_units(cfg, split, group, units, dm, folder, max_units, progress, on_unit)
    if table is None:
        return None
    if len(table) - 1 < int(cfg.mining.num_positives):
        log.warning("split %s has %d samples: positives cycle through %d neighbours", split, len(table), len(table) - 1)
    write_neighbours(cfg, group, folder, features_folder(cfg, split, dm), len(units), table, progress, split)
    manifest = write_train_manifest(cfg, split, folder, table, dm)
    _remove_previous(folder, previous, manifest)
    return manifest


def write_units(cfg: Config, split: str, group, units: list, dm: dict, folder: str, max_units, progress,
                on_unit=None) -> shards.OffsetsTable | None:
    """Phase 1 over the pool; the offsets table filled as the units' results arrive (then written)."""
    depth_folder = shards.split_dir(cfg.shards.root, split, "depth")
    urls = [io.join(depth_folder, s["name"]) for s in dm["shards"]]
    feats = features_folder(cfg, split, dm)
    key = _train_key(cfg, dm)
    calls = [(dataclasses.asdict(u), [urls[d] for d in u.depth], folder, io.join(feats, feature_name(u.index)), key)
             for u in units[:max_units]]
    names = [shards.train_shard_name(u.first + j) for u in units for j in range(len(u.counts))]
    table = shards.OffsetsTable.empty(names, [c for u in units for c in u.counts])
    for result in group.map("unit", calls, desc=f"stage 2 units {split}", progress=progress):
        if result["counts"] != list(units[result["index"]].counts):
            raise RuntimeError(f"{folder}: unit {result['index']} wrote {result['counts']} samples, planned "
                               f"{list(units[result['index']].counts)}")
        for j, (offsets, prefix) in enumerate(zip(result["offsets"], result["prefix"])):
            table.fill(result["first"] + j, offsets, prefix)
        if on_unit is not None:
            on_unit(result)
    if max_units is not None and len(calls) < len(units):
        return None
    shards.write_index(folder, table)
    return table


def knn_calls(first: np.ndarray, rows: int = KNN_CALL_ROWS) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """``[((shard a, shard b), (row a, row b))]``: consecutive whole training shards, about ``rows`` rows each
    (``first``: each shard's first global row, then the total)."""
    out, a = [], 0
    n_shards = len(first) - 1
    while a < n_shards:
        b = int(np.searchsorted(first, first[a] + rows, side="right")) - 1
        b = min(max(b, a + 1), n_shards)
        out.append(((a, b), (int(first[a]), int(first[b]))))
        a = b
    return out


def call_rows(n: int, actors: int) -> int:
    """Query rows per neighbours call: whole query blocks, ``KNN_CALL_ROWS`` at most, fewer when the split
    would give an actor fewer than ``KNN_CALLS_PER_ACTOR`` calls (the calls balance the actors; the split of
    the rows into calls changes no neighbour, ``depthg.knn``)."""
    from depthg.knn import QUERY_ROWS

    blocks = n // (QUERY_ROWS * KNN_CALLS_PER_ACTOR * max(actors, 1))
    return QUERY_ROWS * max(1, min(KNN_CALL_ROWS // QUERY_ROWS, blocks))


def write_neighbours(cfg: Config, group, folder: str, feats: str, n_units: int, table: shards.OffsetsTable,
                     progress: bool, split: str) -> dict:
    """Phase 3 over every actor of the pool: row files of every training shard; returns the CPU seconds
    each actor (node, pid) spent on it."""
    import ray

    setup = {"features": feats, "units": n_units, "n": len(table), "k": int(cfg.mining.k),
             "num_positives": int(cfg.mining.num_positives), "folder": folder,
             "digest": hashlib.sha1(f"{feats}|{len(table)}".encode()).hexdigest()[:16],
             "table": ray.put(table)}  # the offsets table the driver holds: fetched by an actor once, not re-read
    ref = ray.put(setup)  # one copy in the object store; each call passes the reference
    calls = [(ref, shard_range, row_range) for shard_range, row_range in
             knn_calls(table.first, call_rows(len(table), len(group.start())))]
    cpu: dict = {}
    for result in group.map("neighbours", calls, desc=f"neighbours {split}", progress=progress):
        cpu[(result["node"], result["pid"])] = cpu.get((result["node"], result["pid"]), 0.0) + result["cpu_s"]
    return cpu


def _train_key(cfg: Config, dm: dict) -> dict:
    """What a unit's training shards depend on, besides its depth shards."""
    return {k: v for k, v in _signature(cfg, dm).items() if k in ("depth_manifest", "resolution", "layout", "encoding")}


def _signature(cfg: Config, dm: dict) -> dict:
    """What the training shards of a split depend on, besides the anchors' bytes."""
    from depthg.codecs import mining_encoding

    return {"depth_manifest": {"digest": dm.get("digest"), "total": dm["total"]}, "k": int(cfg.mining.k),
            "num_positives": int(cfg.mining.num_positives), "backbone": cfg.model.backbone,
            "weights": io.mask_secrets(cfg.model.weights), "resolution": cfg.data.resolution,
            "layout": shards.LAYOUT, "encoding": mining_encoding(cfg.mining).as_dict()}


def _previous_manifest(folder: str) -> dict | None:
    try:
        return shards.read_json(io.join(folder, shards.MANIFEST))
    except (FileNotFoundError, ValueError):
        return None


def _finished_manifest(cfg: Config, split: str, dm: dict) -> dict | None:
    """The split's training manifest when it is complete for these settings (rerun: nothing to do)."""
    if cfg.shards.overwrite:
        return None
    try:
        tm = shards.read_manifest(shards.split_dir(cfg.shards.root, split, "train"))
    except (FileNotFoundError, shards.ShardError):
        return None
    same = all(tm.get(key) == value for key, value in _signature(cfg, dm).items())
    return tm if same else None


def write_train_manifest(cfg: Config, split: str, folder: str, table: shards.OffsetsTable, dm: dict) -> dict:
    """The manifest, last (the offsets table and every row file are written)."""
    manifest = {key: dm.get(key) for key in ("dataset", "n_classes", "class_names", "depth_source", "five_crop",
                                             "skipped")}
    counts = np.diff(table.first).tolist()
    manifest.update({"kind": "train", "split": split, "index": shards.INDEX, "rows": shards.ROWS,
                     "shards": [{"name": n, "count": int(c)} for n, c in zip(table.names, counts)],
                     **_signature(cfg, dm), "config": io.mask_secrets(to_dict(cfg))})
    shards.write_manifest(folder, manifest)
    return shards.read_manifest(folder)


def _remove_previous(folder: str, previous: dict | None, manifest: dict) -> None:
    """Remove the shards (sidecars, row files) an earlier manifest of this folder listed and this one does not."""
    keep = {s["name"] for s in manifest["shards"]}
    for entry in (previous or {}).get("shards", []):
        name = str(entry.get("name", ""))
        if name and name not in keep and "/" not in name:
            for path in (name, shards.sidecar_name(name), shards.rows_name(name)):
                io.remove(io.join(folder, path))
