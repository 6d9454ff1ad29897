"""The shard format: writer and reader side by side (stage 1 ``depthg-shards/1``, stage 2 ``depthg-shards/2``).

Layout under a root (local folder or ``s3://bucket/prefix``)::

    {root}/depth/{split}/shard-000000.tar, shard-000000.json, ..., manifest.json             # stage 1: depth
    {root}/{split}/00-shard-000000.tar, .json, .idx, ..., offsets.npz, manifest.json         # stage 2: train

One WebDataset sample per crop (five-cropped train) or image (val). ``__key__`` is the sample id (no dots:
webdataset splits the key at the first dot). Member encodings are ``depthg.codecs``'s (the name says the
encoding). Members of a sample:

* stage 1 (``kind: depth``), lossless at the native crop size: ``rgb.png``, ``depth.png`` (16-bit,
  ``round(depth * 65535)``), ``label.png`` (255 = ignore, read back as -1) and ``meta.json``
  ``{"id", "source_id", "crop", "split", "dataset", "neighbors": []}``.
* stage 2 (``kind: train``): each sample ONCE, already at the training resolution (the project's one resize,
  ``resize_center_crop`` at the manifest's ``resolution``), encoded as the manifest's ``encoding`` says:
  ``rgb.{png,jpg,webp}``, ``depth.{png,npy,npy.gz}``, ``label.png`` (always PNG) and ``meta.json`` (stage 1's,
  without ``neighbors``). Its K positives (neighbour ranks 1..K, as **global sample indices** of the same split:
  manifest order, shard after shard, each in stored order) are in its shard's **row file**
  (``shard-NNNNNN.idx``, ``row_dtype(K)``: one fixed-size row per sample carrying its own byte range and each
  positive's index, shard and rgb + depth byte range). No positive is embedded: a loader reads a segment's
  rows (one exact range), then its samples (one), and per visit draws one positive and reads only its rgb +
  depth (one), so no process holds a table of the split. Splits of layout ``shuffled/2`` (before) kept the
  positives in ``meta.json`` and are read through the offsets table.
* stage-2 layout ``grouped/3`` (``plan_units``, ``deal``): units of up to 16 depth shards drawn at random, each
  written by one actor into as many training shards, the crops of an image in different shards; training
  shard names start with ``{index % 256:02x}-`` (``train_shard_name``: random positive reads spread over 256 key
  prefixes). ``shuffled_layout`` (one global permutation) was the layout before.

``depth.*`` is absent in shards written with ``depthgen.source=none`` (manifest ``depth_source: none``),
``label.png`` when unlabelled. A sample's members are stored rgb, depth, then the rest sorted (a positive's
rgb + depth are one contiguous prefix), with mtime 0 and fixed encoder settings: the same samples always give
byte-identical shards (a resumed job equals an uninterrupted one).

Each shard ``shard-NNNNNN.tar`` gets a sidecar ``shard-NNNNNN.json`` written *after* it (``{"name", "count",
"ids", "offsets", "prefix", "skipped", "digest"}``; ``offsets``: each sample's first byte, then the end of
the last; ``prefix``: where each sample's rgb + depth members end): a shard counts as complete only when both
exist. Stage 2 then writes the offsets table ``offsets.npz`` (``OffsetsTable``: per sample in manifest order
int32 ``shard`` and int64 ``start``, ``prefix``, ``stop``; the shard ``names``; filled in O(N) as sidecars
arrive, stored as 8 bytes per sample, the earlier int64 form still read), the row files, then
``manifest.json`` last::

    {"schema": "depthg-shards/1"|"depthg-shards/2", "kind": "depth"|"train", "split", "shards": [{"name", "count"}],
     "total", "dataset", "n_classes", "depth_source", "config", "skipped": [{"id", "error"}], ...,
     stage 2: "index": "offsets.npz", "rows": "idx", "layout": "grouped/3", "num_positives", "encoding": {"rgb",
     "rgb_quality", "depth", "label", "members"}, "resolution"}

A stage-2 manifest of schema ``depthg-shards/1`` (K positives embedded as ``pos{k}.*``, ~8x the storage) is
refused by ``read_manifest`` with one line saying how to regenerate it (``python launch/mine_neighbors.py``;
the depth shards are kept and reused).

Readers: ``shard_urls(root, split, kind)`` (from the manifest; which ranges a rank reads is
``depthg.planner``'s job), ``iter_shard(url, start, stop, offsets)`` (raw sample dicts of a local or s3://
shard, the same dicts ``wds.WebDataset`` yields; a range of samples alone is ONE exact ranged read,
``depthg.io.read_range``), ``parse_samples(data)`` (raw dicts of a byte range), ``decode_sample(raw)``
(numpy arrays), ``read_index(folder)`` (the offsets table), ``read_rows(url, a, b, K)`` (rows of a row file).
``register_gopen()`` lets plain ``wds.WebDataset("s3://...")`` read through fsspec (custom endpoints included).
``write_test_shards`` writes tiny synthetic shards + manifest (+ offsets table, row files) for other modules' tests.
"""
from __future__ import annotations

import io as _pyio
import json
import os
import posixpath
import re
import tempfile
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np

from depthg import io
from depthg.codecs import (DEPTH_SCALE, IGNORE_ON_DISK, LOSSLESS, TRAIN_DEFAULT, Encoding, ShardError,  # noqa: F401
                           decode_depth, decode_image, decode_label, encode_depth, encode_image, encode_label,
                           encode_meta, member)
from depthg.tarshard import member_order, parse_samples, sample_offsets, write_shard  # noqa: F401

SCHEMA = "depthg-shards/1"  # stage 1 (depth shards), unchanged
TRAIN_SCHEMA = "depthg-shards/2"  # stage 2: each sample once, at the training resolution, positives by reference
SCHEMAS = {"depth": SCHEMA, "train": TRAIN_SCHEMA}
KINDS = ("depth", "train")
MANIFEST = "manifest.json"
INDEX = "offsets.npz"
LAYOUT_SALT = 0x1A7  # separates the stage-2 layout permutation from other streams of the same seed
LAYOUT = "grouped/3"  # stage 2's layout (manifest "layout"): units of depth shards, positives in row files
ROWS = "idx"  # manifest "rows": each training shard's row file, ``rows_name`` (the loader's only index)
UNIT_SHARDS = 16  # depth shards per stage-2 unit at most (``unit_size``)
MIN_UNITS = 8  # ... and fewer when the split has fewer than 8 x 16 shards, so its units spread over actors,
MIN_UNIT_SHARDS = 5  # ... but 5 at least (the crops of a five-cropped image then land in 5 different shards)
SPREAD = 256  # training shards' names start with one of 256 two-hex-digit prefixes (object-store partitions)


# ----------------------------------------------------------------------------- names
def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def train_shard_name(index: int) -> str:
    """A stage-2 shard's name: ``{index % 256:02x}-shard-{index:06d}.tar``. Positives are read at random over
    the whole split, one ranged GET each; the leading two hex digits spread those GETs evenly over 256 key
    prefixes, so an object store that partitions by key prefix (S3: ~5,500 GET/s per partition) can serve
    them from as many partitions (cluster/README.md section 5: the arithmetic)."""
    return f"{index % SPREAD:02x}-{shard_name(index)}"


def rows_name(name: str) -> str:
    """The row file of training shard ``name`` (``...shard-NNNNNN.idx``)."""
    return re.sub(r"\.tar$", "." + ROWS, name)


def sidecar_name(name: str) -> str:
    return re.sub(r"\.tar$", ".json", name)


def split_dir(root_url: str, split: str, kind: str) -> str:
    """``{root}/depth/{split}`` for kind ``depth``, ``{root}/{split}`` for kind ``train``."""
    if kind not in KINDS:
        raise ShardError(f"shard kind must be one of {KINDS}, got {kind!r}")
    return io.join(root_url, "depth", split) if kind == "depth" else io.join(root_url, split)


# ----------------------------------------------------------------------------- samples
def encode_sample(sample_id: str, image: np.ndarray, depth: np.ndarray | None, label: np.ndarray | None = None,
                  meta: dict | None = None, encoding: Encoding = LOSSLESS) -> dict:
    """One sample as a dict of member bytes (``write_shard`` / ``wds.TarWriter(..., encoder=False)``); ``depth``
    None writes a sample without depth (``depthgen.source=none``). ``encoding``: stage 1 is ``LOSSLESS``."""
    if "." in sample_id or "/" in sample_id:
        raise ShardError(f"sample id {sample_id!r} must not contain '.' or '/'")
    if depth is not None and image.shape[:2] != depth.shape:
        raise ShardError(f"sample {sample_id}: image {image.shape[:2]} and depth {depth.shape} differ in size")
    rgb_member, depth_member = encoding.as_dict()["members"][:2]
    out = {"__key__": sample_id, rgb_member: encode_image(image, encoding.rgb, encoding.quality),
           "meta.json": encode_meta({"id": sample_id, **(meta or {})})}
    if depth is not None:
        out[depth_member] = encode_depth(depth, encoding.depth)
    if label is not None:
        out["label.png"] = encode_label(label)
    return out


def decode_sample(raw: dict, label_levels: bool = False) -> dict:
    """Raw member bytes -> ``{"id", "image", "depth" (or None), "label" (or None), "meta"}``; ``label_levels``:
    the label as stored (uint8, 255 = ignore) instead of int64 with -1."""
    key = raw.get("__key__", "?")
    rgb, depth = member(raw, "rgb"), member(raw, "depth")
    if rgb is None:
        raise ShardError(f"sample {key} in {raw.get('__url__', '?')} has no rgb member")
    meta = json.loads(raw["meta.json"]) if "meta.json" in raw else {"id": key}
    return {"id": meta.get("id", key), "image": decode_image(raw[rgb], rgb),
            "depth": decode_depth(raw[depth], depth) if depth else None,
            "label": decode_label(raw["label.png"], label_levels) if "label.png" in raw else None, "meta": meta}


# ----------------------------------------------------------------------------- writing / reading shards
def iter_shard(url: str, start: int = 0, stop: int | None = None, offsets: Sequence[int] | None = None,
               meter: list | None = None) -> Iterator[dict]:
    """Raw sample dicts (``__key__``, ``__url__``, member bytes) of samples ``[start, stop)`` of one shard.
    With the sidecar's ``offsets`` the range is ONE exact ranged read (``depthg.io.read_range``: storage serves
    exactly those bytes); without them the shard is streamed and the samples before ``start`` are dropped.
    ``meter[0]`` grows by the bytes read. A range shorter than the offsets say (a truncated shard) raises
    ``ShardError`` after the samples it held."""
    if offsets is not None and len(offsets) > (stop if stop is not None else 0):
        begin, end = int(offsets[start]), int(offsets[stop] if stop is not None else offsets[-1])
        data = io.read_range(url, begin, end)
        if meter is not None:
            meter[0] += len(data)
        yield from parse_samples(data, url, truncated=len(data) < end - begin)
        if len(data) < end - begin:
            raise ShardError(f"{url}: {len(data)} bytes at {begin} where its offsets say {end - begin} (truncated?)")
        return
    from webdataset import tariterators

    with io.open_url(url, "rb") as stream:
        files = tariterators.tar_file_expander([{"url": url, "stream": _Metered(stream, meter)}])
        for index, raw in enumerate(tariterators.group_by_keys(files)):
            if stop is not None and index >= stop:
                return
            if index >= start:
                yield raw


class _Metered:
    """A read-only stream that counts the bytes read."""

    def __init__(self, stream, meter: list | None):
        self.stream, self.meter = stream, meter

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        if self.meter is not None:
            self.meter[0] += len(data)
        return data


def _gopen_fsspec(url, mode="rb", bufsize=8192, **kw):
    return io.open_url(url, mode)


def register_gopen(schemes: Sequence[str] = ("s3", "s3a", "gcs", "gs")) -> None:
    """Make ``wds.WebDataset`` open these URL schemes through fsspec (``depthg.io.open_url``)."""
    import importlib

    gopen_module = importlib.import_module("webdataset.gopen")  # the package re-exports a function of that name
    for scheme in schemes:
        gopen_module.gopen_schemes[scheme] = _gopen_fsspec


# ----------------------------------------------------------------------------- the offsets table (stage 2)
class OffsetsTable:
    """Every sample's byte range in a split (``offsets.npz``): per global index (manifest order) its ``shard``
    and int64 ``start`` (first header), ``prefix`` (end of rgb + depth: a positive's read) and ``stop``."""

    def __init__(self, names: Sequence[str], shard, start, prefix, stop):
        self.names = [str(n) for n in names]
        self.shard, self.start = np.asarray(shard, np.int32), np.asarray(start, np.int64)
        self.prefix, self.stop = np.asarray(prefix, np.int64), np.asarray(stop, np.int64)
        counts = np.bincount(self.shard, minlength=len(self.names))
        self.first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.by_name = {n: i for i, n in enumerate(self.names)}
        self.filled = np.ones(len(self.names), bool)

    @classmethod
    def empty(cls, names: Sequence[str], counts: Sequence[int]) -> "OffsetsTable":
        """A table of shards ``names`` holding ``counts`` samples, to be filled shard by shard (``fill``) as
        their sidecars arrive: O(N) memory and work in all (numpy, no per-sample Python object)."""
        counts = np.asarray(counts, np.int64)
        n = int(counts.sum())
        table = cls(names, np.repeat(np.arange(len(counts), dtype=np.int32), counts), np.zeros(n, np.int64),
                    np.zeros(n, np.int64), np.zeros(n, np.int64))
        table.filled[:] = False
        return table

    def fill(self, shard: int, offsets: Sequence[int], prefix: Sequence[int] | None = None) -> None:
        """Shard ``shard``'s part from its sidecar's ``offsets`` (count + 1) and ``prefix`` (count)."""
        a, b = int(self.first[shard]), int(self.first[shard + 1])
        off = np.asarray(offsets, np.int64)
        pre = off[1:] if prefix is None or len(prefix) == 0 else np.asarray(prefix, np.int64)
        if len(off) != b - a + 1 or len(pre) != b - a:
            raise ShardError(f"sidecar of {self.names[shard]}: {len(off)} offsets for {b - a} samples")
        self.start[a:b], self.stop[a:b], self.prefix[a:b] = off[:-1], off[1:], pre
        self.filled[shard] = True

    @classmethod
    def from_sidecars(cls, infos: Sequence[dict]) -> "OffsetsTable":
        table = cls.empty([info["name"] for info in infos], [int(info["count"]) for info in infos])
        for i, info in enumerate(infos):
            table.fill(i, info["offsets"], info.get("prefix"))
        return table

    def to_bytes(self) -> bytes:
        """8 bytes per sample, uncompressed (written in well under a second at 10M samples): per sample int32
        ``size`` (stop - start) and ``head`` (prefix - start), per shard ``counts`` and ``base`` (its first
        sample's start); starts follow, a shard's samples being contiguous (``start[g+1] = stop[g]``)."""
        counts = np.diff(self.first)
        nonempty = counts > 0
        base = np.zeros(len(self.names), np.int64)
        base[nonempty] = self.start[self.first[:-1][nonempty]]
        buf = _pyio.BytesIO()
        np.savez(buf, names=np.array(self.names, dtype=str), counts=counts, base=base,
                 size=(self.stop - self.start).astype(np.int32), head=(self.prefix - self.start).astype(np.int32))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "?") -> "OffsetsTable":
        """Either form: sizes (``to_bytes``) or, as written before, the int64 ``start``/``prefix``/``stop``."""
        try:
            with np.load(_pyio.BytesIO(data), allow_pickle=False) as z:
                if "size" not in z:
                    return cls(list(z["names"]), z["shard"], z["start"], z["prefix"], z["stop"])
                counts, size = z["counts"].astype(np.int64), z["size"].astype(np.int64)
                shard = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
                first = np.concatenate([[0], np.cumsum(counts)])
                ends = np.cumsum(size)  # running sum over the split; each shard restarts at its base
                before = np.concatenate([[0], ends])[first[:-1]]
                stop = ends - np.repeat(before, counts) + np.repeat(z["base"], counts)
                start = stop - size
                return cls(list(z["names"]), shard, start, start + z["head"], stop)
        except (KeyError, ValueError, OSError) as exc:
            raise ShardError(f"{where}: not an offsets table ({exc}); rerun python launch/mine_neighbors.py") from exc

    def __len__(self) -> int:
        return len(self.shard)

    def segment(self, shard: int, a: int, b: int) -> tuple[int, int]:
        """Byte range ``[start, end)`` of samples ``[a, b)`` of shard ``shard``."""
        g = int(self.first[shard])
        return int(self.start[g + a]), int(self.stop[g + b - 1])

    def sample(self, index: int) -> tuple[str, int, int]:
        """``(shard name, start, prefix end)``: the bytes a positive reads (its rgb + depth members)."""
        return self.names[int(self.shard[index])], int(self.start[index]), int(self.prefix[index])


def write_index(folder_url: str, infos: Sequence[dict] | OffsetsTable) -> str:
    """Write the offsets table (or build it from the sidecars ``infos``, manifest order); returns its URL."""
    table = infos if isinstance(infos, OffsetsTable) else OffsetsTable.from_sidecars(infos)
    if not table.filled.all():
        raise ShardError(f"offsets table of {folder_url}: no sidecar for {table.names[int(np.argmin(table.filled))]}")
    url = io.join(folder_url, INDEX)
    io.write_bytes(url, table.to_bytes())
    return url


def read_index(folder_url: str, name: str = INDEX) -> OffsetsTable:
    url = io.join(folder_url, name)
    try:
        return OffsetsTable.from_bytes(io.read_bytes(url), url)
    except FileNotFoundError as exc:
        raise ShardError(f"{url} is missing: rerun python launch/mine_neighbors.py") from exc


# ----------------------------------------------------------------------------- sidecars and manifests
def write_json(url: str, data: dict) -> None:
    io.write_bytes(url, json.dumps(data, indent=1, sort_keys=True).encode())


def read_json(url: str) -> dict:
    return json.loads(io.read_bytes(url))


def _manifest_url(url: str) -> str:
    return url if str(url).endswith(".json") else io.join(url, MANIFEST)


def write_manifest(url: str, manifest: dict) -> None:
    """Write ``manifest`` (to ``url`` or ``url/manifest.json``) with its kind's schema; checks keys and counts."""
    for key in ("kind", "split", "shards"):
        if key not in manifest:
            raise ShardError(f"manifest for {url} lacks '{key}'")
    if manifest["kind"] not in KINDS:
        raise ShardError(f"manifest for {url}: kind {manifest['kind']!r}, expected one of {KINDS}")
    total = sum(int(s["count"]) for s in manifest["shards"])
    write_json(_manifest_url(url), {**manifest, "schema": SCHEMAS[manifest["kind"]], "total": total})


def read_manifest(url: str) -> dict:
    """Read ``url`` (a manifest.json or the folder holding one); clear error when missing or of an old schema."""
    murl = _manifest_url(url)
    try:
        manifest = read_json(murl)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"no shard manifest at {murl}: run generate_depth first "
                                "(python launch/generate_depth.py)") from exc
    schema, kind = manifest.get("schema"), manifest.get("kind")
    if kind == "train" and schema == SCHEMA:
        root = posixpath.dirname(posixpath.dirname(str(murl).rstrip("/")))
        raise ShardError(f"{murl}: stage-2 shards written with embedded positives (schema {SCHEMA}); this version "
                         f"reads {TRAIN_SCHEMA} (each sample once at the training resolution, positives by reference): "
                         f"regenerate them with python launch/mine_neighbors.py shards.root={root} (your --config "
                         f"and data.resolution; the depth shards under {io.join(root, 'depth')} are kept and reused)")
    if kind not in SCHEMAS or schema != SCHEMAS[kind]:
        raise ShardError(f"{murl}: schema {schema!r} of kind {kind!r}, expected "
                         + " or ".join(f"{s!r} (kind {k})" for k, s in SCHEMAS.items()))
    return manifest


def shard_urls(root_url: str, split: str, kind: str = "train") -> list[str]:
    """Full URLs of the shards listed in ``{split dir}/manifest.json``."""
    folder = split_dir(root_url, split, kind)
    return [io.join(folder, s["name"]) for s in read_manifest(folder)["shards"]]


# ----------------------------------------------------------------------------- write order
def shuffled_layout(per_shard: Sequence[Sequence[str]], seed: int = 0) -> list[list[str]]:
    """The ids of ``per_shard`` (one id list per shard) in one seeded global permutation, cut into shards
    of the same sizes: the stage-2 write order of layout ``shuffled/2`` (every training shard drew from every
    depth shard, so every node needed all of stage 1), kept as the full-shuffle reference (bench/coverage.py)."""
    ids = [i for part in per_shard for i in part]
    rng = np.random.default_rng(np.random.SeedSequence([seed, LAYOUT_SALT]))
    order = [ids[j] for j in rng.permutation(len(ids))]
    out, start = [], 0
    for part in per_shard:
        out.append(order[start:start + len(part)])
        start += len(part)
    return out


@dataclass(frozen=True)
class Unit:
    """One stage-2 work unit: depth shards ``depth`` (in this order) -> training shards ``first ..
    first + len(counts) - 1`` holding ``counts`` samples."""

    index: int
    depth: tuple[int, ...]
    first: int
    counts: tuple[int, ...]


def unit_size(n_shards: int) -> int:
    """Depth shards per unit: ``UNIT_SHARDS``, fewer for small splits (at least ``MIN_UNITS`` units), never fewer
    than ``MIN_UNIT_SHARDS`` (all of them in a split of fewer)."""
    return max(1, min(int(n_shards), max(MIN_UNIT_SHARDS, min(UNIT_SHARDS, -(-int(n_shards) // MIN_UNITS)))))


def plan_units(depth_counts: Sequence[int], seed: int = 0) -> list[Unit]:
    """The stage-2 layout ``grouped/3`` from the depth shards' counts alone (O(shards), no sample id): the depth
    shards in one seeded permutation, cut into ceil(S / ``unit_size``) units of equal size within one (random
    members, not neighbours in the listing); a unit of G shards holding M samples writes ``min(G, M)`` training shards of equal size
    (within one), numbered unit after unit. ``deal`` says which samples go where."""
    g = unit_size(len(depth_counts))
    order = np.random.default_rng(np.random.SeedSequence([seed, LAYOUT_SALT, 3])).permutation(len(depth_counts))
    n_units = -(-len(order) // g)
    bounds = [len(order) * u // n_units for u in range(n_units + 1)]  # equal sizes within one (>= 5 shards)
    units, first = [], 0
    for index in range(n_units):
        members = tuple(int(x) for x in order[bounds[index]:bounds[index + 1]])
        total = sum(int(depth_counts[m]) for m in members)
        out = min(len(members), total)
        counts = tuple(total // out + (j < total % out) for j in range(out)) if out else ()
        units.append(Unit(index, members, first, counts))
        first += out
    return units


def deal(unit: Unit, seed: int = 0) -> list[np.ndarray]:
    """For each training shard of ``unit``, its samples in stored order as positions in the concatenation of
    the unit's depth shards (in ``unit.depth`` order): position p goes to the unit's shard ``p mod G'``
    (G' = its shard count), then each shard is permuted (seeded by the unit). The crops of an image, adjacent
    in a depth shard, land in G' different training shards (all five apart once G' >= 5, i.e. in any split of
    5 depth shards or more): a loader's range never holds two crops of one image, so they never become each
    other's negatives."""
    n_out = len(unit.counts)
    rng = np.random.default_rng(np.random.SeedSequence([seed, LAYOUT_SALT, 3, unit.index]))
    positions = np.arange(sum(unit.counts))
    return [rng.permutation(positions[j::n_out]) for j in range(n_out)]


# ----------------------------------------------------------------------------- row files (layout grouped/3)
def row_dtype(k: int) -> np.dtype:
    """One row per sample of a training shard, in stored order (little-endian, no header, ``row_dtype(K)
    .itemsize`` bytes each: 212 at K = 7): the sample's own byte range (``start``, ``stop``) and, for each of
    its K positives, the global index ``pos``, its shard's manifest index ``pos_shard`` and the byte range of
    its rgb + depth (``pos_start``, ``pos_end``). A loader reads a segment's rows by one exact range and then
    everything it needs is carried there: no table of the split in any process."""
    k = int(k)
    return np.dtype([("start", "<i8"), ("stop", "<i8"), ("pos", "<i8", (k,)), ("pos_shard", "<i4", (k,)),
                     ("pos_start", "<i8", (k,)), ("pos_end", "<i8", (k,))])


def build_rows(table: OffsetsTable, shard: int, positives: np.ndarray) -> np.ndarray:
    """The rows of training shard ``shard``: ``positives`` [count, K] global indices of its samples' positives."""
    a, b = int(table.first[shard]), int(table.first[shard + 1])
    positives = np.asarray(positives, np.int64).reshape(b - a, -1)
    rows = np.zeros(b - a, row_dtype(positives.shape[1]))
    rows["start"], rows["stop"], rows["pos"] = table.start[a:b], table.stop[a:b], positives
    rows["pos_shard"], rows["pos_start"], rows["pos_end"] = (table.shard[positives], table.start[positives],
                                                             table.prefix[positives])
    return rows


def write_rows(folder_url: str, name: str, rows: np.ndarray) -> None:
    """Write the rows of training shard ``name`` (atomic, as every write of ``depthg.io``)."""
    io.write_bytes(io.join(folder_url, rows_name(name)), np.ascontiguousarray(rows).tobytes())


def read_rows(url: str, a: int, b: int, k: int, meter: list | None = None) -> np.ndarray:
    """Rows ``[a, b)`` of the row file ``url``: one exact ranged read (``ShardError`` when it comes back short)."""
    width = row_dtype(k).itemsize
    data = io.read_range(url, a * width, b * width)
    if meter is not None:
        meter[0] += len(data)
    if len(data) != (b - a) * width:
        raise ShardError(f"{url}: {len(data)} bytes for rows {a}-{b} of {width} bytes (truncated?)")
    return np.frombuffer(data, row_dtype(k))


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
                      n_classes: int = 3, labelled: bool = True, seed: int = 0,
                      encoding: Encoding | None = None) -> dict:
    """Write tiny synthetic shards + manifest under ``root_url`` (local or s3://); returns the manifest.

    ``with_positives=True`` writes stage-2 (``kind="train"``, ``{root}/{split}``, ``encoding`` default
    ``codecs.TRAIN_DEFAULT``, + offsets table and row files) shards whose positives are the next samples
    (cyclically, by global index; resolution recorded when ``size`` is square); otherwise stage-1
    ``{root}/depth/{split}`` shards.
    """
    rng = np.random.default_rng(seed)
    data = [_synthetic_sample(rng, size, n_classes) for _ in range(n_samples)]
    ids = [f"{split}-{i:05d}" for i in range(n_samples)]
    kind = "train" if with_positives else "depth"
    enc = (encoding or TRAIN_DEFAULT) if with_positives else LOSSLESS
    folder = split_dir(root_url, split, kind)
    infos = []
    for start in range(0, n_samples, samples_per_shard):
        samples = []
        for i in range(start, min(start + samples_per_shard, n_samples)):
            meta = {"source_id": ids[i], "crop": -1, "split": split, "dataset": "test",
                    **({} if with_positives else {"neighbors": []})}
            samples.append(encode_sample(ids[i], data[i][0], data[i][1], data[i][2] if labelled else None, meta, enc))
        infos.append(put_shard(folder, shard_name(len(infos)), samples))
    manifest = {"kind": kind, "split": split, "shards": [{"name": s["name"], "count": s["count"]} for s in infos],
                "dataset": "test", "n_classes": n_classes, "depth_source": "synthetic-test", "config": {},
                "skipped": [], "num_positives": num_positives if with_positives else 0}
    if with_positives:
        table = OffsetsTable.from_sidecars(infos)
        write_index(folder, table)
        nxt = (np.arange(n_samples)[:, None] + 1 + np.arange(num_positives)[None]) % n_samples
        for i, info in enumerate(infos):
            write_rows(folder, info["name"], build_rows(table, i, nxt[table.first[i]:table.first[i + 1]]))
        manifest.update({"index": INDEX, "rows": ROWS, "encoding": enc.as_dict(),
                         "resolution": size[0] if size[0] == size[1] else None})
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
        offsets, prefix = sample_offsets(tmp)
        io.put_file(tmp, io.join(folder_url, name))
    finally:
        os.remove(tmp)
    info = {"name": name, "count": count, "ids": [s["__key__"] for s in samples], "offsets": offsets,
            "prefix": prefix, **(sidecar or {})}
    write_json(io.join(folder_url, sidecar_name(name)), info)
    return info


def read_sidecar(folder_url: str, name: str) -> dict | None:
    """The sidecar of shard ``name`` when both the shard and its sidecar exist, else None."""
    try:
        info = read_json(io.join(folder_url, sidecar_name(name)))
    except FileNotFoundError:
        return None
    return info if io.exists(io.join(folder_url, name)) else None
