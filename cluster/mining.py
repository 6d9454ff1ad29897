"""Stage 2 on Ray: depth shards -> neighbour mining -> training shards ``{root}/{split}``.

1. Features: ``MiningWorker`` actors (``cluster.raycluster.ActorGroup``, one GPU each when
   ``mining.device`` resolves to cuda) bring each crop of a depth shard to ``data.resolution`` with
   the training transform (shorter side, centre crop), run the frozen backbone, mean-pool and
   L2-normalise: one global feature per sample. They are kept in storage,
   ``{root}/features/{split}/{settings digest}/shard-NNNNNN.npz``, so a rerun (another ``mining.k``
   or ``num_positives``, or after a failure while writing) skips extraction.
2. Neighbours: exact cosine top-k (``mining.k``, ``depthg.knn``) over the whole split, excluding the
   sample itself, as one call on one actor of the same pool (its GPU), in query blocks sized so
   the blocks stay within ``KNN_BLOCK_BYTES`` (``depthg.knn.block_rows``); positives are ranks
   1..``mining.num_positives`` (cycled when the split is smaller).
3. Writing: training shard i holds as many samples as depth shard i, in one seeded global shuffle of
   the split (``depthg.shards.shuffled_layout``: a loader's range never holds the crops of one image
   together). Each sample is stored ONCE, already through the training resize (``resize_center_crop`` at
   ``data.resolution``), encoded as ``mining.rgb_codec`` / ``rgb_quality`` / ``depth_codec`` say (labels
   stay PNG), with its K positives as global sample indices of the split in its ``meta.json``: no positive
   is copied (~1x the storage of stage 1 instead of ~8x). The split's offsets table (``offsets.npz``) is
   written from the sidecars before the manifest, so a loader reads a positive's rgb + depth by one exact
   range. Depth shards are read through one cache per node (``cluster.nodecache``): each shard is fetched
   at most once per node, however many actors the node runs.

Reruns skip training shards whose sidecar digest (ids + positives + encoding) matches, and the whole split
when its manifest records the same depth shards, mining settings and format; a split written with embedded
positives (schema ``depthg-shards/1``) is remined. The manifest is written last.
"""
from __future__ import annotations

import io as _pyio
import json
import logging
import uuid
from typing import Callable

import numpy as np

from cluster.depthgen import _digest
from cluster.nodecache import NodeShardCache, cache_dir
from cluster.raycluster import node_id
from depthg import io, shards
from depthg.config import Config, from_dict, to_dict

log = logging.getLogger(__name__)
KNN_BLOCK_BYTES = 2 << 30  # device memory for the top-k query blocks (features come on top: N x C x 4 bytes)


class MiningWorker:
    """Features, neighbours and training-shard writing. Plain class; Ray makes it an actor."""

    def __init__(self, cfg_dict: dict, job: str = "local", threads: int = 0):
        import torch

        from depthg.device import resolve_device

        if threads:
            torch.set_num_threads(threads)
        self.cfg = from_dict(Config, cfg_dict)
        self.device = resolve_device(self.cfg.mining.device)
        self._backbone = None
        self.cache = NodeShardCache(cache_dir(self.cfg.mining.cache_dir, job, node_id() or "local"))

    def backbone(self):
        if self._backbone is None:
            from depthg.models import build_backbone

            self._backbone = build_backbone(self.cfg.model.backbone, self.cfg.model.weights).to(self.device)
        return self._backbone

    def features(self, index: int, url: str, out_url: str) -> dict:
        """Global features of depth shard ``url`` (in shard order) written to ``out_url`` (npz: ids, feats)."""
        import torch

        from depthg.data import resize_center_crop, to_tensor_image

        ids, images = [], []
        for raw in shards.iter_shard(self.cache.local(url)):
            ids.append(raw["__key__"])
            images.append(shards.decode_image(raw["rgb.png"]))
        res, size = self.cfg.data.resolution, max(int(self.cfg.mining.batch_size), 1)
        out = [np.zeros((0, self.backbone().dim), np.float32)]
        with torch.no_grad():
            for start in range(0, len(images), size):
                # the one resize of training (depthg.data.transforms.resize_center_crop): features match training
                x = torch.stack([to_tensor_image(resize_center_crop(im, res)) for im in images[start:start + size]])
                f = self.backbone()(x.to(self.device)).float().mean(dim=(2, 3))
                out.append(torch.nn.functional.normalize(f, dim=1).cpu().numpy())
        buf = _pyio.BytesIO()
        np.savez(buf, ids=np.array(ids, dtype=str), feats=np.concatenate(out).astype(np.float32))
        io.write_bytes(out_url, buf.getvalue())
        return {"index": index, "count": len(ids), "node": node_id()}

    def neighbours(self, feature_urls: list[str], k: int) -> tuple[list[list[str]], np.ndarray]:
        """``(ids per shard, indices [N, k] int32)``: exact cosine top-k over all the split's features."""
        import torch

        from depthg.knn import block_rows, topk_cosine

        parts = [read_features(url) for url in feature_urls]
        per_shard = [ids for ids, _ in parts]
        x = torch.from_numpy(np.concatenate([feats for _, feats in parts]))
        _, idx = topk_cosine(x, k, chunk=block_rows(len(x), KNN_BLOCK_BYTES), device=self.device)
        return per_shard, idx.numpy().astype(np.int32)

    def write_unit(self, index: int, entries: list, where: dict, folder: str, digest: str) -> dict:
        """Training shard ``index``: ``entries`` = [(id, neighbours, positives as global indices)] in shard
        order; ``where`` maps every anchor id to the depth shard URL holding it. Each anchor is brought to
        ``data.resolution`` by the one resize and encoded with ``mining.*_codec`` (labels: lossless PNG)."""
        from depthg.codecs import mining_encoding
        from depthg.data import resize_center_crop

        res, encoding = self.cfg.data.resolution, mining_encoding(self.cfg.mining)

        def sample(key, neighbors, positives):
            src, names = where[key], self.cache.members(where[key])[1]

            def read(name, decode):
                return decode(self.cache.read(src, f"{key}.{name}")) if f"{key}.{name}" in names else None

            meta = json.loads(self.cache.read(src, f"{key}.meta.json"))
            image, depth = read("rgb.png", shards.decode_image), read("depth.png", shards.decode_depth)
            label = read("label.png", shards.decode_label)
            return shards.encode_sample(
                key, resize_center_crop(image, res), None if depth is None else resize_center_crop(depth, res),
                None if label is None else resize_center_crop(label, res),
                {**meta, "neighbors": neighbors, "positives": positives}, encoding)

        samples = [sample(*entry) for entry in entries]
        info = shards.put_shard(folder, shards.shard_name(index), samples, {"digest": digest, "skipped": []})
        return {**info, "node": node_id()}

    def close(self) -> None:
        """Remove this job's shard cache on this node (``ActorGroup`` calls it before killing the actor)."""
        self.cache.close()


def read_features(url: str) -> tuple[list[str], np.ndarray]:
    """``(ids, feats [n, C] float32)`` of one kept feature file."""
    with np.load(_pyio.BytesIO(io.read_bytes(url)), allow_pickle=False) as data:
        return [str(i) for i in data["ids"]], data["feats"]


# ----------------------------------------------------------------------------- driver
def positives_for(neighbors: list[str], count: int) -> list[str]:
    """Ranks 1..count of the neighbour list, cycled when fewer neighbours exist."""
    if not neighbors:
        raise ValueError("a sample has no neighbours: the split needs at least 2 samples")
    return [neighbors[j % len(neighbors)] for j in range(count)]


def features_folder(cfg: Config, split: str, dm: dict) -> str:
    """Where the split's global features are kept, keyed by everything they depend on."""
    key = {"depth": dm.get("digest"), "total": dm["total"], "shards": dm["shards"], "backbone": cfg.model.backbone,
           "weights": io.mask_secrets(cfg.model.weights), "resolution": cfg.data.resolution}
    return io.join(cfg.shards.root, "features", split, _digest(key))


def compute_features(cfg: Config, group, dm: dict, urls: list[str], progress: bool) -> list[str]:
    """Feature file URLs of every depth shard, extracting only those not kept from an earlier run."""
    folder = features_folder(cfg, dm["split"], dm)
    names = [shards.shard_name(i).replace(".tar", ".npz") for i in range(len(urls))]
    kept = set(io.listdir(folder))
    calls = [(i, url, io.join(folder, name)) for i, (url, name) in enumerate(zip(urls, names)) if name not in kept]
    log.info("features %s: %d shards to extract, %d kept from an earlier run", dm["split"], len(calls),
             len(urls) - len(calls))
    for _ in group.map("features", calls, desc=f"features {dm['split']}", progress=progress):
        pass
    return [io.join(folder, name) for name in names]


def mining_group(cfg: Config, max_actors: int | None = None):
    """The pool of mining actors (reusable across splits, one shard cache per node); a context manager."""
    from cluster.raycluster import ActorGroup

    return ActorGroup(MiningWorker, (to_dict(cfg), uuid.uuid4().hex[:12]), cfg.mining.num_actors, max_actors,
                      device=cfg.mining.device)


def mine_neighbors(cfg: Config, split: str, max_units: int | None = None, progress: bool = True,
                   group=None, on_unit: Callable[[dict], None] | None = None) -> dict | None:
    """Run stage 2 for one split; returns the training manifest (None when stopped by ``max_units``).

    ``group``: a ``mining_group`` to reuse (otherwise one is started for this call). ``on_unit``:
    called on the driver with each training shard's result (sidecar + ``node``) once it is written.
    """
    depth_folder = shards.split_dir(cfg.shards.root, split, "depth")
    dm = shards.read_manifest(depth_folder)
    urls = [io.join(depth_folder, s["name"]) for s in dm["shards"]]
    done = _finished_manifest(cfg, split, dm)
    if done is not None:
        return done
    if group is None:
        with mining_group(cfg, max_actors=len(urls)) as own:
            return mine_neighbors(cfg, split, max_units, progress, own, on_unit)
    group.check((to_dict(cfg),))
    feature_urls = compute_features(cfg, group, dm, urls, progress)
    per_shard, idx = group.call("neighbours", feature_urls, int(cfg.mining.k))
    units = plan_train_units(cfg, dm, per_shard, idx)
    where = {i: url for url, part in zip(urls, per_shard) for i in part}
    return write_train_shards(cfg, split, group, units, dm, where, max_units, progress, on_unit)


def _signature(cfg: Config, dm: dict) -> dict:
    """What the training shards of a split depend on, besides the anchors' bytes."""
    from depthg.codecs import mining_encoding

    return {"depth_manifest": {"digest": dm.get("digest"), "total": dm["total"]}, "k": int(cfg.mining.k),
            "num_positives": int(cfg.mining.num_positives), "backbone": cfg.model.backbone,
            "weights": io.mask_secrets(cfg.model.weights), "resolution": cfg.data.resolution,
            "layout": "shuffled/2", "encoding": mining_encoding(cfg.mining).as_dict()}


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


def plan_train_units(cfg: Config, dm: dict, per_shard: list[list[str]], idx: np.ndarray):
    """``[(index, entries, digest)]``, entries ``[(id, neighbours, positives)]`` in writing order."""
    split = dm["split"]
    ids = [i for part in per_shard for i in part]
    if len(ids) != dm["total"] or len(set(ids)) != len(ids):
        raise RuntimeError(f"depth shards of split {split}: manifest lists {dm['total']} samples, "
                           f"features hold {len(ids)} ({len(set(ids))} distinct)")
    table = {ids[i]: [ids[j] for j in row] for i, row in enumerate(idx.tolist())}
    npos = int(cfg.mining.num_positives)
    if len(ids) - 1 < npos:
        log.warning("split %s has %d samples: positives cycle through %d neighbours", split, len(ids), len(ids) - 1)
    # ORDER (the one place that decides which samples each training shard holds, and in what order):
    # training shard i holds as many samples as depth shard i, in one seeded global shuffle of the split.
    groups = shards.shuffled_layout(per_shard)
    position = {i: g for g, i in enumerate(i for part in groups for i in part)}  # global index, manifest order
    digest_key = {"depth": dm.get("digest"), "backbone": [cfg.model.backbone, cfg.model.weights],
                  **{k: v for k, v in _signature(cfg, dm).items() if k in ("resolution", "layout", "encoding")}}
    units = []
    for index, part in enumerate(groups):
        entries = [(i, table[i], [position[p] for p in positives_for(table[i], npos)]) for i in part]
        units.append((index, entries, _digest({**digest_key, "entries": entries})))
    return units


def write_train_shards(cfg: Config, split: str, group, units, dm: dict, where: dict, max_units, progress,
                       on_unit=None):
    folder = shards.split_dir(cfg.shards.root, split, "train")
    pending = [u for u in units if cfg.shards.overwrite or not _complete(folder, u[0], u[2])]
    if pending:
        io.remove(io.join(folder, shards.MANIFEST))
    calls = []
    for index, entries, digest in pending[:max_units]:
        calls.append((index, entries, {i: where[i] for i, _, _ in entries}, folder, digest))
    for result in group.map("write_unit", calls, desc=f"train shards {split}", progress=progress):
        if on_unit is not None:
            on_unit(result)
    if max_units is not None and len(calls) < len(pending):
        return None
    return write_train_manifest(cfg, split, folder, units, dm)


def _complete(folder: str, index: int, digest: str) -> bool:
    info = shards.read_sidecar(folder, shards.shard_name(index))
    return bool(info and info.get("digest") == digest)


def write_train_manifest(cfg: Config, split: str, folder: str, units, dm: dict) -> dict:
    """The offsets table (from the sidecars), then the manifest, last."""
    infos = []
    for index, entries, digest in units:
        info = shards.read_sidecar(folder, shards.shard_name(index))
        if not info or info.get("digest") != digest or info["count"] != len(entries):
            raise RuntimeError(f"{folder}/{shards.shard_name(index)} is missing or stale after mining")
        infos.append(info)
    shards.write_index(folder, infos)
    manifest = {key: dm.get(key) for key in ("dataset", "n_classes", "class_names", "depth_source", "five_crop",
                                             "skipped")}
    manifest.update({"kind": "train", "split": split, "index": shards.INDEX,
                     "shards": [{"name": i["name"], "count": i["count"]} for i in infos], **_signature(cfg, dm),
                     "config": io.mask_secrets(to_dict(cfg))})
    shards.write_manifest(folder, manifest)
    return shards.read_manifest(folder)
