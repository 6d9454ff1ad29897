"""A split's source listing written once and handed out by byte ranges (stage 1).

Stage 1's driver streams ``Source.scan()`` (``(id, locator)`` per image, nothing kept) into a listing file,
cut into work units of ``unit_size`` images: line ``u`` of the file is unit ``u``'s entries as one JSON array
of ``[id, locator]`` pairs. The driver keeps only a ``ListingPlan`` (per unit its byte range in the file and
a digest of its ids: O(units)); a depth actor reads its unit's line with one ranged read (``unit_entries``)
and loads from ``Source.share(entries)``, so no actor lists the source.

    plan = write_listing(source.scan(), fh, unit_size)     # the driver, into a local file, then uploaded
    entries = unit_entries(url, plan.start(u), plan.stop(u))   # an actor, unit u only
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Sequence

import numpy as np

from depthg.data.base import SourceError

LISTING = "listing.jsonl"


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
