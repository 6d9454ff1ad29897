"""A split's source listing written once and handed out by byte ranges (stage 1).

Stage 1's driver streams ``Source.scan()`` (``(id, locator)`` per image, nothing kept) into a listing file,
cut into work units of ``unit_size`` images: line ``u`` of the file is unit ``u``'s entries as one JSON array
of ``[id, locator]`` pairs. The driver keeps only a ``ListingPlan`` (per unit its byte range in the file and
a digest of its ids: O(units)); a depth actor reads its unit's line with one ranged read (``unit_entries``)
and loads from ``Source.share(entries)``, so no actor lists the source.

    plan = write_listing(source.scan(), fh, unit_size)     # the driver, into a local file, then uploaded
    entries = unit_entries(url, plan.start(u), plan.stop(u))   # an actor, unit u only

A listing that must be sorted first (a folder's names, a glob's matches) goes through ``sorted_stream``, the
project's one bounded-memory sort: runs of at most ``SORT_CHUNK`` items sorted in memory and spilled to a
temporary folder, then merged (``heapq.merge``), so the order is exactly ``sorted()``'s and no process holds
the whole listing.
"""
from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Sequence

import numpy as np

from depthg.data.base import SourceError

LISTING = "listing.jsonl"
SORT_CHUNK = 100_000  # items one sorted run holds in memory (~20 MB of short string pairs)
_BATCH = 1024  # items per JSON line of a spilled run
_END = object()


def sorted_stream(items: Iterable[Any], key: Callable[[Any], Any] | None = None,
                  chunk: int | None = None) -> Iterator[Any]:
    """``sorted(items, key=key)``, streamed in bounded memory (the order is exactly ``sorted``'s: stable).

    Runs of at most ``chunk`` items (``SORT_CHUNK`` when None) are sorted in memory; when there is more than one,
    each is spilled (JSON lines: no unpickling) to a ``tempfile.TemporaryDirectory`` (``TMPDIR``) and the runs are merged with
    ``heapq.merge`` (ties keep the earlier run first: stable). The folder is removed when the stream ends, raises
    or is closed early. When everything fits in one run, no file is written. Items are strings, numbers or tuples of them (short tuples of
    strings here). All of ``items`` is consumed before the first item comes out."""
    chunk = SORT_CHUNK if chunk is None else int(chunk)
    if chunk < 1:
        raise ValueError(f"sorted_stream: chunk must be >= 1, got {chunk}")
    it = iter(items)
    run = list(itertools.islice(it, chunk))
    nxt = next(it, _END)
    if nxt is _END:  # one run: in memory, nothing spilled
        run.sort(key=key)
        yield from run
        return
    it = itertools.chain([nxt], it)
    with tempfile.TemporaryDirectory(prefix="depthg-sort-") as tmp:
        readers: list[Iterator[Any]] = []
        try:
            while run:
                run.sort(key=key)
                path = os.path.join(tmp, f"run{len(readers):06d}.jsonl")
                with open(path, "w", encoding="utf-8") as fh:
                    for i in range(0, len(run), _BATCH):
                        fh.write(json.dumps(run[i:i + _BATCH], ensure_ascii=False) + "\n")
                readers.append(_read_run(path))
                run.clear()  # never two runs in memory
                run.extend(itertools.islice(it, chunk))
            yield from heapq.merge(*readers, key=key)
        finally:
            for reader in readers:
                reader.close()  # its file closed before the folder goes


def _read_run(path: str) -> Iterator[Any]:
    with open(path, encoding="utf-8") as fh:
        for line in fh:  # JSON gives lists back: the tuples they were
            yield from (tuple(x) if isinstance(x, list) else x for x in json.loads(line))


def ids_digest(ids: Sequence[str]) -> str:
    """Fingerprint of a unit's source ids in order (a sidecar's ``source_ids`` gives the same)."""
    return hashlib.sha1(json.dumps([str(i) for i in ids], ensure_ascii=False).encode()).hexdigest()[:16]


@dataclass
class ListingPlan:
    """``bounds`` int64 ``[units + 1]`` (unit ``u`` is bytes ``[bounds[u], bounds[u+1])`` of the file),
    ``keys`` (``ids_digest`` of each unit's ids), ``images`` (how many were listed)."""

    bounds: np.ndarray
    keys: list[str]
    images: int

    def __len__(self) -> int:
        return len(self.keys)

    def start(self, unit: int) -> int:
        return int(self.bounds[unit])

    def stop(self, unit: int) -> int:
        return int(self.bounds[unit + 1])


def write_listing(entries: Iterable[tuple[str, str]], fh: BinaryIO, unit_size: int) -> ListingPlan:
    """Write ``entries`` to ``fh`` one unit of ``unit_size`` per line; returns the plan (O(units) kept)."""
    if unit_size < 1:
        raise ValueError(f"shards.samples_per_shard must be >= 1, got {unit_size}")
    bounds, keys, chunk, images = [0], [], [], 0

    def flush():
        line = (json.dumps(chunk, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        fh.write(line)
        bounds.append(bounds[-1] + len(line))
        keys.append(ids_digest([i for i, _ in chunk]))
        chunk.clear()

    for id_, loc in entries:
        chunk.append((str(id_), str(loc)))
        images += 1
        if len(chunk) == unit_size:
            flush()
    if chunk:
        flush()
    return ListingPlan(np.asarray(bounds, np.int64), keys, images)


def parse_unit(data: bytes, where: str = "?") -> list[tuple[str, str]]:
    """A unit's line of the listing file -> its ``(id, locator)`` entries."""
    try:
        return [(str(i), str(loc)) for i, loc in json.loads(data)]
    except (ValueError, TypeError) as exc:
        raise SourceError(f"{where}: not a unit of a stage-1 listing ({exc}); rerun python launch/generate_depth.py"
                          ) from exc


def unit_entries(url: str, start: int, stop: int) -> list[tuple[str, str]]:
    """The entries of the unit at bytes ``[start, stop)`` of the listing file ``url``: one ranged read."""
    from depthg import io

    return parse_unit(io.read_range(url, start, stop), f"{url} bytes {start}-{stop}")
