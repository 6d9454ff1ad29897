"""Stage 2 on Ray: depth shards -> neighbour mining -> training shards ``{root}/{split}``.

1. Features: ``MiningWorker`` actors read depth shards, bring each crop to ``data.resolution``
   with the training transform (shorter side, centre crop), run the frozen backbone, mean-pool and L2-normalise:
   one global feature per sample.
2. Driver: exact cosine top-k (``mining.k``) over the whole split (``depthg.knn``), excluding the
   sample itself; positives are ranks 1..``mining.num_positives`` (cycled when the split is smaller).
3. Writing: training shard i holds as many samples as depth shard i, in one seeded global shuffle of
   the split (``depthg.shards.shuffled_layout``: a loader's range never holds the crops of one image
   together), each with its anchor members copied byte for byte plus ``pos{k}.rgb.png`` /
   ``pos{k}.depth.png`` of its positives, so a streaming reader never needs random access. Workers fetch each depth shard once into a local
   cache and read members by tar offset.

Reruns skip training shards whose sidecar digest (ids + positives) matches, and the whole split
(features included) when its manifest records the same depth shards and mining settings; the
manifest is written last.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tarfile
import tempfile

import numpy as np

from cluster.depthgen import _digest
from depthg import io, shards
from depthg.config import Config, from_dict, mask_secrets, to_dict

log = logging.getLogger(__name__)


class ShardCache:
    """Depth shards fetched once to local disk (local roots are used in place), read by offset."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="depthg-mining-")
        self.index: dict[str, tuple[str, dict]] = {}

    def members(self, url: str) -> tuple[str, dict]:
        if url not in self.index:
            path = url
            if io.is_remote(url):
                os.makedirs(self.dir, exist_ok=True)
                path = os.path.join(self.dir, f"{len(self.index):06d}.tar")
                with io.open_url(url, "rb") as src, open(path, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            with tarfile.open(path, "r:") as tar:
                offsets = {m.name: (m.offset_data, m.size) for m in tar.getmembers() if m.isreg()}
            self.index[url] = (path, offsets)
        return self.index[url]

    def read(self, url: str, member: str) -> bytes:
        path, offsets = self.members(url)
        if member not in offsets:
            raise KeyError(f"{url} has no member {member}")
        offset, size = offsets[member]
        with open(path, "rb") as fh:
            fh.seek(offset)
            return fh.read(size)

    def close(self):
        shutil.rmtree(self.dir, ignore_errors=True)
        self.index.clear()


class MiningWorker:
    """Features for depth shards, and training-shard writing. Plain class; Ray makes it an actor."""

    def __init__(self, cfg_dict: dict, threads: int = 0):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.cfg = from_dict(Config, cfg_dict)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self._backbone = None
        self.cache = ShardCache()

    def backbone(self):
        if self._backbone is None:
            from depthg.models import build_backbone

            self._backbone = build_backbone(self.cfg.model.backbone, self.cfg.model.weights).to(self.device)
        return self._backbone

    def features(self, index: int, url: str) -> tuple[int, list[str], np.ndarray]:
        """``(index, ids, feats [n, C] float32)`` of depth shard ``url``, in shard order."""
        import torch

        from depthg.data import resize_center_crop, to_tensor_image

        ids, images = [], []
        for raw in shards.iter_shard(url):
            ids.append(raw["__key__"])
            images.append(shards.decode_image(raw["rgb.png"]))
        res, size = self.cfg.data.resolution, max(int(self.cfg.mining.batch_size), 1)
        out = []
        with torch.no_grad():
            for start in range(0, len(images), size):
                # the one resize of training (depthg.data.transforms.resize_center_crop): features match training
                x = torch.stack([to_tensor_image(resize_center_crop(im, res)) for im in images[start:start + size]])
                f = self.backbone()(x.to(self.device)).float().mean(dim=(2, 3))
                out.append(torch.nn.functional.normalize(f, dim=1).cpu().numpy())
        dim = self.backbone().dim
        return index, ids, (np.concatenate(out) if out else np.zeros((0, dim), np.float32)).astype(np.float32)

    def write_unit(self, index: int, depth_url: str, entries: list, where: dict, folder: str, digest: str) -> dict:
        """Training shard ``index``: ``entries`` = [(id, neighbours, positives)] in write order;
        ``where`` maps every anchor and positive id to the depth shard URL holding it."""
        def sample(key, neighbors, positives):
            src = where[key]  # the anchor's depth shard (shards.shuffled_layout mixes them)
            meta = json.loads(self.cache.read(src, f"{key}.meta.json"))
            out = {"__key__": key, "meta.json": shards.encode_meta({**meta, "neighbors": neighbors})}
            for member in ("rgb.png", "depth.png", "label.png"):
                if f"{key}.{member}" in self.cache.members(src)[1]:
                    out[member] = self.cache.read(src, f"{key}.{member}")
            for k, pid in enumerate(positives):
                out[f"pos{k}.rgb.png"] = self.cache.read(where[pid], f"{pid}.rgb.png")
                out[f"pos{k}.depth.png"] = self.cache.read(where[pid], f"{pid}.depth.png")
            return out

        samples = [sample(*entry) for entry in entries]
        return shards.put_shard(folder, shards.shard_name(index), samples, {"digest": digest, "skipped": []})

    def close(self) -> None:
        """Remove the local shard cache (called by ``ActorGroup`` before the actor is killed)."""
        if isinstance(getattr(self, "cache", None), ShardCache):
            self.cache.close()

    def __del__(self):
        self.close()


# ----------------------------------------------------------------------------- driver
def positives_for(neighbors: list[str], count: int) -> list[str]:
    """Ranks 1..count of the neighbour list, cycled when fewer neighbours exist."""
    if not neighbors:
        raise ValueError("a sample has no neighbours: the split needs at least 2 samples")
    return [neighbors[j % len(neighbors)] for j in range(count)]


def compute_features(group, urls: list[str], progress: bool):
    calls = [(i, url) for i, url in enumerate(urls)]
    parts: dict[int, tuple] = {}
    for i, ids, feats in group.map("features", calls, desc="features", progress=progress):
        parts[i] = (ids, feats)
    per_shard = [parts[i][0] for i in range(len(urls))]
    feats = np.concatenate([parts[i][1] for i in range(len(urls))])
    return per_shard, feats


def neighbour_table(ids: list[str], feats: np.ndarray, k: int) -> dict[str, list[str]]:
    import torch

    from depthg.knn import topk_cosine

    device = "cuda" if torch.cuda.is_available() else None  # the driver's GPU, when it has one
    _, idx = topk_cosine(torch.from_numpy(feats), k, device=device)
    return {ids[i]: [ids[j] for j in row] for i, row in enumerate(idx.tolist())}


def mining_group(cfg: Config, max_actors: int | None = None):
    """The pool of mining actors (reusable across splits); a context manager."""
    from cluster.raycluster import ActorGroup

    return ActorGroup(MiningWorker, (to_dict(cfg),), cfg.mining.num_actors, max_actors)


def mine_neighbors(cfg: Config, split: str, max_units: int | None = None, progress: bool = True,
                   group=None) -> dict | None:
    """Run stage 2 for one split; returns the training manifest (None when stopped by ``max_units``).

    ``group``: a ``mining_group`` to reuse (otherwise one is started for this call).
    """
    depth_folder = shards.split_dir(cfg.shards.root, split, "depth")
    dm = shards.read_manifest(depth_folder)
    urls = [io.join(depth_folder, s["name"]) for s in dm["shards"]]
    done = _finished_manifest(cfg, split, dm)
    if done is not None:
        return done
    if group is None:
        with mining_group(cfg, max_actors=len(urls)) as own:
            return mine_neighbors(cfg, split, max_units, progress, own)
    per_shard, feats = compute_features(group.check((to_dict(cfg),)), urls, progress)
    units = plan_train_units(cfg, dm, urls, per_shard, feats)
    return write_train_shards(cfg, split, group, units, dm, urls, per_shard, max_units, progress)


def _signature(cfg: Config, dm: dict) -> dict:
    """What the training shards of a split depend on, besides the anchors' bytes."""
    return {"depth_manifest": {"digest": dm.get("digest"), "total": dm["total"]}, "k": int(cfg.mining.k),
            "num_positives": int(cfg.mining.num_positives), "backbone": cfg.model.backbone,
            "weights": mask_secrets(cfg.model.weights), "resolution": cfg.data.resolution,
            "layout": "shuffled/1"}


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


def plan_train_units(cfg: Config, dm: dict, urls: list[str], per_shard: list[list[str]], feats: np.ndarray):
    """``[(index, depth_url, entries, digest)]``: training shard i holds as many samples as depth shard i, taken
    in the globally shuffled order of ``shards.shuffled_layout``, each with its positives."""
    split = dm["split"]
    ids = [i for part in per_shard for i in part]
    if len(ids) != dm["total"]:
        raise RuntimeError(f"depth shards of split {split}: manifest lists {dm['total']} samples, shards hold {len(ids)}")
    table = neighbour_table(ids, feats, cfg.mining.k)
    npos = int(cfg.mining.num_positives)
    if len(ids) - 1 < npos:
        log.warning("split %s has %d samples: positives cycle through %d neighbours", split, len(ids), len(ids) - 1)
    units = []
    for index, (url, part) in enumerate(zip(urls, shards.shuffled_layout(per_shard))):
        entries = [(i, table[i], positives_for(table[i], npos)) for i in part]
        units.append((index, url, entries, _digest({"depth": dm.get("digest"), "entries": entries,
                                                    "backbone": [cfg.model.backbone, cfg.model.weights]})))
    return units


def write_train_shards(cfg: Config, split: str, group, units, dm: dict, urls, per_shard, max_units, progress):
    folder = shards.split_dir(cfg.shards.root, split, "train")
    where = {i: url for url, part in zip(urls, per_shard) for i in part}
    pending = [u for u in units if cfg.shards.overwrite or not _complete(folder, u[0], u[3])]
    if pending:
        io.remove(io.join(folder, shards.MANIFEST))
    calls = []
    for index, url, entries, digest in pending[:max_units]:
        needed = {p for key, _, pos in entries for p in (key, *pos)}
        calls.append((index, url, entries, {p: where[p] for p in needed}, folder, digest))
    for _ in group.map("write_unit", calls, desc=f"train shards {split}", progress=progress):
        pass
    if max_units is not None and len(calls) < len(pending):
        return None
    return write_train_manifest(cfg, split, folder, units, dm)


def _complete(folder: str, index: int, digest: str) -> bool:
    info = shards.read_sidecar(folder, shards.shard_name(index))
    return bool(info and info.get("digest") == digest)


def write_train_manifest(cfg: Config, split: str, folder: str, units, dm: dict) -> dict:
    counts = []
    for index, _, entries, digest in units:
        info = shards.read_sidecar(folder, shards.shard_name(index))
        if not info or info.get("digest") != digest or info["count"] != len(entries):
            raise RuntimeError(f"{folder}/{shards.shard_name(index)} is missing or stale after mining")
        counts.append({"name": info["name"], "count": info["count"]})
    manifest = {key: dm.get(key) for key in ("dataset", "n_classes", "class_names", "depth_source", "five_crop",
                                             "skipped")}
    manifest.update({"kind": "train", "split": split, "shards": counts, **_signature(cfg, dm),
                     "config": mask_secrets(to_dict(cfg))})
    shards.write_manifest(folder, manifest)
    return shards.read_manifest(folder)
