"""The shard format: writer and reader side by side (schema ``depthg-shards/1``).

Layout under a root (local folder or ``s3://bucket/prefix``)::

    {root}/depth/{split}/shard-000000.tar, shard-000000.json, ..., manifest.json   # stage 1: depth
    {root}/{split}/shard-000000.tar, shard-000000.json, ..., manifest.json         # stage 2: train

One WebDataset sample per crop (five-cropped train) or image (val). ``__key__`` is the sample id
(no dots: webdataset splits the key at the first dot). Members of a sample:

=================  ==========================================================================
``rgb.png``        uint8 RGB image, H x W x 3, stored losslessly at its native crop size
``depth.png``      16-bit greyscale PNG of ``round(depth * 65535)``; depth float32 in [0, 1]; absent in
                   shards written with ``depthgen.source=none`` (manifest ``depth_source: none``)
``label.png``      uint8 PNG, class id, 255 = ignore (read back as -1); absent when unlabelled
``meta.json``      ``{"id", "source_id", "crop", "split", "dataset", "neighbors": [ids]}``
``pos{k}.rgb.png`` stage 2 only: the k-th positive's crop (k = 0..K-1, neighbour ranks 1..K)
``pos{k}.depth.png``  stage 2 only: the k-th positive's depth, encoded like ``depth.png``
=================  ==========================================================================

Tar members are written in sorted order with mtime 0 and PNGs with fixed settings, so the same
samples always give byte-identical shards (a resumed job equals an uninterrupted one).

Each shard ``shard-NNNNNN.tar`` gets a sidecar ``shard-NNNNNN.json`` written *after* the shard
(``{"name", "count", "ids", "offsets", "skipped", "digest"}``; ``offsets``: each sample's first byte,
then the end of the last, so a reader can fetch a range of samples alone): a shard counts as complete
only when both exist. ``manifest.json`` aggregates the sidecars and is written last::

    {"schema": "depthg-shards/1", "kind": "depth"|"train", "split", "shards": [{"name", "count"}],
     "total", "dataset", "n_classes", "depth_source", "config", "skipped": [{"id", "error"}], ...}

Readers: ``shard_urls(root, split, kind)`` (from the manifest; which ranges a rank reads is
``depthg.planner``'s job), ``iter_shard(url, start, stop, offsets)`` (raw sample dicts of a local or s3:// shard, the
same dicts ``wds.WebDataset`` yields; a range of samples alone with the sidecar's offsets) and
``decode_sample(raw)`` (numpy arrays). ``shuffled_layout`` is the stage-2 write order. ``register_gopen()`` lets
plain ``wds.WebDataset("s3://...")`` read through fsspec (custom endpoints included).
``write_test_shards`` writes tiny synthetic shards + manifest for other modules' tests.
"""
from __future__ import annotations

import io as _pyio
import json
import os
import re
import tempfile
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from depthg import io
from depthg.errors import DepthgError

SCHEMA = "depthg-shards/1"
KINDS = ("depth", "train")
MANIFEST = "manifest.json"
DEPTH_SCALE = 65535.0
IGNORE_ON_DISK = 255
LAYOUT_SALT = 0x1A7  # separates the stage-2 layout permutation from other streams of the same seed


class ShardError(DepthgError, ValueError):
    """A shard, sample or manifest that does not follow the format; the message names it."""


# ----------------------------------------------------------------------------- names
def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def sidecar_name(name: str) -> str:
    return re.sub(r"\.tar$", ".json", name)


def split_dir(root_url: str, split: str, kind: str) -> str:
    """``{root}/depth/{split}`` for kind ``depth``, ``{root}/{split}`` for kind ``train``."""
    if kind not in KINDS:
        raise ShardError(f"shard kind must be one of {KINDS}, got {kind!r}")
    return io.join(root_url, "depth", split) if kind == "depth" else io.join(root_url, split)


# ----------------------------------------------------------------------------- encoding
def _png(array: np.ndarray) -> bytes:
    buf = _pyio.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def encode_image(image: np.ndarray) -> bytes:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ShardError(f"image must be uint8 HxWx3, got {image.dtype} {image.shape}")
    return _png(np.ascontiguousarray(image))


def encode_depth(depth: np.ndarray) -> bytes:
    depth = np.asarray(depth, dtype=np.float32)
    if depth.ndim != 2:
        raise ShardError(f"depth must be HxW, got shape {depth.shape}")
    if not np.isfinite(depth).all() or depth.min() < 0.0 or depth.max() > 1.0:
        raise ShardError("depth must be finite and in [0, 1]")
    return _png(np.round(depth * DEPTH_SCALE).astype(np.uint16))


def encode_label(label: np.ndarray) -> bytes:
    label = np.asarray(label)
    if label.ndim != 2:
        raise ShardError(f"label must be HxW, got shape {label.shape}")
    if label.min(initial=0) < -1 or label.max(initial=0) >= IGNORE_ON_DISK:
        raise ShardError(f"label ids must be in [-1, {IGNORE_ON_DISK - 1}]")
    return _png(np.where(label < 0, IGNORE_ON_DISK, label).astype(np.uint8))


def encode_sample(sample_id: str, image: np.ndarray, depth: np.ndarray | None, label: np.ndarray | None = None,
                  meta: dict | None = None, positives: Sequence[tuple[np.ndarray, np.ndarray | None]] = ()) -> dict:
    """One sample as a dict of bytes for ``wds.TarWriter(..., encoder=False)``; ``depth`` None (and None
    positive depths) writes a sample without depth (``depthgen.source=none``)."""
    if "." in sample_id or "/" in sample_id:
        raise ShardError(f"sample id {sample_id!r} must not contain '.' or '/'")
    if depth is not None and image.shape[:2] != depth.shape:
        raise ShardError(f"sample {sample_id}: image {image.shape[:2]} and depth {depth.shape} differ in size")
    meta = {"id": sample_id, **(meta or {})}
    out = {"__key__": sample_id, "rgb.png": encode_image(image), "meta.json": encode_meta(meta)}
    if depth is not None:
        out["depth.png"] = encode_depth(depth)
    if label is not None:
        out["label.png"] = encode_label(label)
    for k, (pos_image, pos_depth) in enumerate(positives):
        out[f"pos{k}.rgb.png"] = encode_image(pos_image)
        if pos_depth is not None:
            out[f"pos{k}.depth.png"] = encode_depth(pos_depth)
    return out


def encode_meta(meta: dict) -> bytes:
    return json.dumps(meta, sort_keys=True).encode()


# ----------------------------------------------------------------------------- decoding
def _unpng(data: bytes) -> np.ndarray:
    with Image.open(_pyio.BytesIO(data)) as img:
        return np.array(img)


def decode_image(data: bytes) -> np.ndarray:
    return _unpng(data).astype(np.uint8)


def decode_depth(data: bytes) -> np.ndarray:
    return (_unpng(data).astype(np.float32) / DEPTH_SCALE).astype(np.float32)


def decode_label(data: bytes) -> np.ndarray:
    raw = _unpng(data).astype(np.int64)
    raw[raw == IGNORE_ON_DISK] = -1
    return raw


def num_positives(raw: dict) -> int:
    k = 0
    while f"pos{k}.rgb.png" in raw:
        k += 1
    return k


def _optional_depth(raw: dict, member: str) -> np.ndarray | None:
    return decode_depth(raw[member]) if member in raw else None


def decode_sample(raw: dict) -> dict:
    """Raw member bytes -> ``{"id", "image", "depth" (or None), "label" (or None), "meta", "positives"}``."""
    key = raw.get("__key__", "?")
    if "rgb.png" not in raw:
        raise ShardError(f"sample {key} in {raw.get('__url__', '?')} has no rgb.png")
    meta = json.loads(raw["meta.json"]) if "meta.json" in raw else {"id": key}
    positives = [(decode_image(raw[f"pos{k}.rgb.png"]), _optional_depth(raw, f"pos{k}.depth.png"))
                 for k in range(num_positives(raw))]
    return {"id": meta.get("id", key), "image": decode_image(raw["rgb.png"]),
            "depth": _optional_depth(raw, "depth.png"),
            "label": decode_label(raw["label.png"]) if "label.png" in raw else None,
            "meta": meta, "positives": positives}


# ----------------------------------------------------------------------------- writing / reading shards
def write_shard(local_path: str, samples: Iterable[dict]) -> int:
    """Write encoded samples to a local tar file (deterministic bytes); returns the count."""
    import webdataset as wds

    count = 0
    with open(local_path, "wb") as fh, wds.TarWriter(fh, encoder=False, mtime=0.0) as sink:
        for sample in samples:
            sink.write(sample)
            count += 1
    return count


def iter_shard(url: str, start: int = 0, stop: int | None = None, offsets: Sequence[int] | None = None,
               meter: list | None = None) -> Iterator[dict]:
    """Raw sample dicts (``__key__``, ``__url__``, member bytes) of samples ``[start, stop)`` of one shard,
    streamed. With the sidecar's ``offsets`` only those bytes are read (a seek, then a bounded read);
    without them the samples before ``start`` are read and dropped. ``meter[0]`` grows by the bytes read."""
    from webdataset import tariterators

    with io.open_url(url, "rb") as stream:
        limit = None
        if offsets is not None and len(offsets) > (stop if stop is not None else 0):
            stream.seek(offsets[start])
            limit = (offsets[stop] if stop is not None else offsets[-1]) - offsets[start]
            stop, start = (None if stop is None else stop - start), 0
        source = _Metered(stream, limit, meter)
        files = tariterators.tar_file_expander([{"url": url, "stream": source}])
        for index, raw in enumerate(tariterators.group_by_keys(files)):
            if stop is not None and index >= stop:
                return
            if index >= start:
                yield raw


class _Metered:
    """A read-only stream that counts the bytes read and ends after ``limit`` bytes (None: at EOF)."""

    def __init__(self, stream, limit: int | None, meter: list | None):
        self.stream, self.left, self.meter = stream, limit, meter

    def read(self, size: int = -1) -> bytes:
        if self.left is not None:
            size = self.left if size is None or size < 0 else min(size, self.left)
        data = self.stream.read(size)
        self.left = None if self.left is None else self.left - len(data)
        if self.meter is not None:
            self.meter[0] += len(data)
        return data


def sample_offsets(local_path: str) -> list[int]:
    """Each sample's first tar header offset in a local shard, then the end of the last (count + 1)."""
    import tarfile

    offsets, last = [], None
    with tarfile.open(local_path, "r:") as tar:
        for member in tar.getmembers():
            key = member.name.split(".", 1)[0]
            if key != last:
                offsets.append(member.offset)
                last = key
        offsets.append(tar.offset)  # after the last member's data: where the end-of-archive blocks start
    return offsets


def _gopen_fsspec(url, mode="rb", bufsize=8192, **kw):
    return io.open_url(url, mode)


def register_gopen(schemes: Sequence[str] = ("s3", "s3a", "gcs", "gs")) -> None:
    """Make ``wds.WebDataset`` open these URL schemes through fsspec (``depthg.io.open_url``)."""
    import importlib

    gopen_module = importlib.import_module("webdataset.gopen")  # the package re-exports a function of that name
    for scheme in schemes:
        gopen_module.gopen_schemes[scheme] = _gopen_fsspec


# ----------------------------------------------------------------------------- sidecars and manifests
def write_json(url: str, data: dict) -> None:
    io.write_bytes(url, json.dumps(data, indent=1, sort_keys=True).encode())


def read_json(url: str) -> dict:
    return json.loads(io.read_bytes(url))


def _manifest_url(url: str) -> str:
    return url if str(url).endswith(".json") else io.join(url, MANIFEST)


def write_manifest(url: str, manifest: dict) -> None:
    """Write ``manifest`` (to ``url`` or ``url/manifest.json``); checks schema and counts first."""
    for key in ("kind", "split", "shards"):
        if key not in manifest:
            raise ShardError(f"manifest for {url} lacks '{key}'")
    manifest = {**manifest, "schema": SCHEMA, "total": sum(int(s["count"]) for s in manifest["shards"])}
    write_json(_manifest_url(url), manifest)


def read_manifest(url: str) -> dict:
    """Read ``url`` (a manifest.json or the folder holding one); clear error when missing."""
    murl = _manifest_url(url)
    try:
        manifest = read_json(murl)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"no shard manifest at {murl}: run generate_depth first "
                                "(python launch/generate_depth.py)") from exc
    if manifest.get("schema") != SCHEMA:
        raise ShardError(f"{murl}: schema {manifest.get('schema')!r}, expected {SCHEMA!r}")
    return manifest


def shard_urls(root_url: str, split: str, kind: str = "train") -> list[str]:
    """Full URLs of the shards listed in ``{split dir}/manifest.json``."""
    folder = split_dir(root_url, split, kind)
    return [io.join(folder, s["name"]) for s in read_manifest(folder)["shards"]]


# ----------------------------------------------------------------------------- write order
def shuffled_layout(per_shard: Sequence[Sequence[str]], seed: int = 0) -> list[list[str]]:
    """The ids of ``per_shard`` (one id list per shard) in one seeded global permutation, cut into shards
    of the same sizes. Stage-2 shards are written in this order: the five crops of an image (adjacent in
    depth shards) then never share a loader's range, so they do not become each other's negatives."""
    ids = [i for part in per_shard for i in part]
    rng = np.random.default_rng(np.random.SeedSequence([seed, LAYOUT_SALT]))
    order = [ids[j] for j in rng.permutation(len(ids))]
    out, start = [], 0
    for part in per_shard:
        out.append(order[start:start + len(part)])
        start += len(part)
    return out


# ----------------------------------------------------------------------------- tiny test shards
def _synthetic_sample(rng: np.random.Generator, size: tuple[int, int], n_classes: int):
    h, w = size
    label = np.zeros((h, w), np.int64)
    cut = int(rng.integers(1, max(2, h)))
    label[cut:] = int(rng.integers(1, n_classes))
    label[: max(1, h // 8), : max(1, w // 8)] = -1
    palette = rng.integers(0, 256, (n_classes, 3))
    image = (palette[np.clip(label, 0, None)] + rng.integers(0, 16, (h, w, 3))).clip(0, 255).astype(np.uint8)
    depth = np.tile(np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None], (1, w))
    depth = np.clip(depth + 0.05 * (label == 0), 0.0, 1.0).astype(np.float32)
    return image, depth, label


def write_test_shards(root_url: str, n_samples: int, size: tuple[int, int] = (32, 32), with_positives: bool = True,
                      num_positives: int = 2, samples_per_shard: int = 4, split: str = "train",
                      n_classes: int = 3, labelled: bool = True, seed: int = 0) -> dict:
    """Write tiny synthetic shards + manifest under ``root_url`` (local or s3://); returns the manifest.

    ``with_positives=True`` writes stage-2 (``kind="train"``, ``{root}/{split}``) shards whose
    positives are the next samples (cyclically); otherwise stage-1 ``{root}/depth/{split}`` shards.
    """
    rng = np.random.default_rng(seed)
    data = [_synthetic_sample(rng, size, n_classes) for _ in range(n_samples)]
    ids = [f"{split}-{i:05d}" for i in range(n_samples)]
    kind = "train" if with_positives else "depth"
    folder = split_dir(root_url, split, kind)
    shards = []
    for start in range(0, n_samples, samples_per_shard):
        samples = []
        for i in range(start, min(start + samples_per_shard, n_samples)):
            nbrs = [(i + 1 + j) % n_samples for j in range(num_positives)] if with_positives else []
            meta = {"source_id": ids[i], "crop": -1, "split": split, "dataset": "test",
                    "neighbors": [ids[j] for j in nbrs]}
            samples.append(encode_sample(ids[i], data[i][0], data[i][1], data[i][2] if labelled else None,
                                         meta, [(data[j][0], data[j][1]) for j in nbrs]))
        name = shard_name(len(shards))
        put_shard(folder, name, samples)
        shards.append({"name": name, "count": len(samples)})
    manifest = {"kind": kind, "split": split, "shards": shards, "dataset": "test", "n_classes": n_classes,
                "depth_source": "synthetic-test", "config": {}, "skipped": [],
                "num_positives": num_positives if with_positives else 0}
    write_manifest(folder, manifest)
    return read_manifest(folder)


def put_shard(folder_url: str, name: str, samples: Iterable[dict], sidecar: dict | None = None) -> dict:
    """Write ``samples`` to a local temp file, upload atomically as ``folder/name``, then its sidecar."""
    io.makedirs(folder_url)
    fd, tmp = tempfile.mkstemp(suffix=".tar", prefix="depthg-")
    os.close(fd)
    try:
        samples = list(samples)
        count = write_shard(tmp, samples)
        offsets = sample_offsets(tmp)
        io.put_file(tmp, io.join(folder_url, name))
    finally:
        os.remove(tmp)
    info = {"name": name, "count": count, "ids": [s["__key__"] for s in samples], "offsets": offsets,
            **(sidecar or {})}
    write_json(io.join(folder_url, sidecar_name(name)), info)
    return info


def read_sidecar(folder_url: str, name: str) -> dict | None:
    """The sidecar of shard ``name`` when both the shard and its sidecar exist, else None."""
    try:
        info = read_json(io.join(folder_url, sidecar_name(name)))
    except FileNotFoundError:
        return None
    return info if io.exists(io.join(folder_url, name)) else None
