"""Reading a split from storage: planned anchor ranges and drawn positives, each ONE exact ranged read.

``ShardReader`` reads the planned ranges of shards (``depthg.planner.stream_segments``): a range of a shard
is one ``depthg.io.read_range`` of exactly its samples' bytes. In a split of layout ``grouped/3`` (manifest
``rows``) the range's rows come first, one exact read of the shard's row file (``depthg.shards.row_dtype``):
they give the range's bytes and, for each sample, its positives' byte ranges, attached to the sample
(``__row__``); the process holds no table of the split (O(1) memory in N). Splits written before (positives
in ``meta.json``) are located through the split's offsets table (``offsets.npz``, read once per process,
``offsets_table``) or, for stage-1 splits, the shard's sidecar. ``PositiveReader`` reads one drawn positive:
the rgb + depth prefix of that sample (carried by its anchor's row, or ``depthg.shards.OffsetsTable.sample``),
nothing else.
``ahead`` runs such reads on a small thread pool ahead of the consumer, so object-storage latency overlaps
decoding. Storage serves exactly the bytes asked for, so the bytes a loader counts are the bytes read.

Damage (a truncated shard, a file that is not a tar, a sample lacking a required member) never stops
training: it is logged naming the shard, appended to ``skipped`` and the stream goes on (a damaged
positive falls back to the anchor itself). Storage that cannot be reached is still an error.
"""
from __future__ import annotations

import collections
import logging
import tarfile
from typing import Callable, Iterable, Iterator, Sequence

from depthg import io
from depthg import shards as shardfmt
from depthg.codecs import member

log = logging.getLogger(__name__)

WITH_DEPTH, WITHOUT_DEPTH = ("rgb", "depth"), ("rgb",)  # what every sample must hold (any encoding)
DAMAGE = (tarfile.TarError, OSError, EOFError, ValueError)  # what a damaged shard raises while parsed
_TABLES: dict[str, shardfmt.OffsetsTable] = {}  # offsets tables read by this process, by URL


def required_members(manifest: dict) -> tuple[str, ...]:
    """What each sample of a split holds: no depth in shards written with ``depthgen.source=none``."""
    return WITHOUT_DEPTH if manifest.get("depth_source") == "none" else WITH_DEPTH


def offsets_table(url: str) -> shardfmt.OffsetsTable:
    """The offsets table at ``url``, read once per process (each loader worker reads it once)."""
    if url not in _TABLES:
        folder, name = url.rsplit("/", 1)
        _TABLES[url] = shardfmt.read_index(folder, name)
    return _TABLES[url]


def log_damage(skipped: list | None, url: str, error: str) -> None:
    log.warning("damaged shard %s skipped from here on: %s", url, error)
    if skipped is not None:
        skipped.append({"url": str(url), "error": error})


def shard_samples(url: str, start: int = 0, stop: int | None = None, offsets: Sequence[int] | None = None,
                  skipped: list | None = None, meter: list | None = None,
                  required: Sequence[str] = WITH_DEPTH, rows=None) -> Iterator[dict]:
    """Raw samples ``[start, stop)`` of one shard (``rows``: theirs, attached in order as ``__row__``). A damaged
    shard (truncated, not a tar, missing) ends where it breaks and a sample lacking a ``required`` member is
    dropped: each is logged naming the shard and appended to ``skipped``; training goes on. Storage that
    cannot be reached is still an error."""
    try:
        for i, raw in enumerate(shardfmt.iter_shard(url, start, stop, offsets, meter)):
            if rows is not None:
                raw["__row__"] = rows[i]
            missing = [m for m in required if member(raw, m) is None]
            if missing:
                log_damage(skipped, url, f"sample {raw.get('__key__')} lacks {', '.join(missing)}")
                continue
            yield raw
    except io.StorageError:
        raise
    except DAMAGE as exc:
        log_damage(skipped, url, f"{type(exc).__name__}: {exc.args[0] if exc.args else exc}")


class ShardReader:
    """Reads planned shard ranges of one split, each range one exact read: offsets from the split's table
    (``index_url``) or, without one, from a shard's sidecar when a range starts or stops inside it."""

    def __init__(self, urls: Sequence[str], counts: Sequence[int], required: Sequence[str] = WITH_DEPTH,
                 index_url: str | None = None, rows_k: int | None = None):
        self.urls, self.counts, self.offsets, self.required = list(urls), list(counts), {}, tuple(required)
        self.index_url, self.rows_k = index_url, rows_k

    def _offsets(self, shard: int):
        if shard not in self.offsets:
            url = self.urls[shard]
            folder, name = url.rsplit("/", 1)
            offsets = None
            if self.index_url:
                table = offsets_table(self.index_url)
                if name in table.by_name:
                    g, n = int(table.first[table.by_name[name]]), self.counts[shard]
                    offsets = [int(x) for x in table.start[g:g + n]] + [int(table.stop[g + n - 1])] if n else None
            else:
                try:
                    offsets = (shardfmt.read_sidecar(folder, name) or {}).get("offsets")
                except (OSError, ValueError):
                    offsets = None
            self.offsets[shard] = offsets if offsets and len(offsets) == self.counts[shard] + 1 else None
        return self.offsets[shard]

    def __call__(self, segs: Sequence[tuple[int, int, int]], skipped: list | None = None,
                 meter: list | None = None) -> Iterator[dict]:
        for shard, start, stop in segs:
            if self.rows_k is not None:
                yield from self._with_rows(shard, start, stop, skipped, meter)
                continue
            whole = start == 0 and stop == self.counts[shard]
            offsets = None if whole and not self.index_url else self._offsets(shard)
            yield from shard_samples(self.urls[shard], start, stop, offsets, skipped, meter, self.required)


    def _with_rows(self, shard: int, start: int, stop: int, skipped, meter) -> Iterator[dict]:
        """Samples ``[start, stop)`` of a ``grouped/3`` shard: its rows (one exact read), then its bytes."""
        url = self.urls[shard]
        try:
            rows = shardfmt.read_rows(shardfmt.rows_name(url), start, stop, self.rows_k, meter)
        except io.StorageError:
            raise
        except DAMAGE as exc:
            log_damage(skipped, shardfmt.rows_name(url), f"{type(exc).__name__}: {exc.args[0] if exc.args else exc}")
            return
        offsets = [*rows["start"].tolist(), int(rows["stop"][-1])]
        yield from shard_samples(url, 0, stop - start, offsets, skipped, meter, self.required, rows)


class PositiveReader:
    """``(raw, bytes read, error)`` of sample ``index`` of a stage-2 split: its rgb + depth members only, one
    exact range (``raw`` None and ``error`` set when that range is damaged). ``where``: the range carried by
    the anchor's row, ``(shard, start, end)`` with ``urls`` the split's shards; without it the split's offsets
    table locates ``index`` (splits written before row files). Picklable; safe in threads."""

    def __init__(self, index_url: str | None, required: Sequence[str] = WITH_DEPTH, urls: Sequence[str] | None = None):
        self.index_url, self.required, self.urls = index_url, tuple(required), urls
        self.folder = index_url.rsplit("/", 1)[0] if index_url else None

    def __call__(self, index: int, where: tuple[int, int, int] | None = None) -> tuple[dict | None, int, str | None]:
        if where is not None:
            url, start, end = self.urls[where[0]], where[1], where[2]
        else:
            name, start, end = offsets_table(self.index_url).sample(int(index))
            url = io.join(self.folder, name)
        data = b""
        try:
            data = io.read_range(url, start, end)
            raws = list(shardfmt.parse_samples(data, url))
            if len(raws) != 1 or any(member(raws[0], m) is None for m in self.required):
                raise ValueError(f"positive {index}: bytes {start}-{end} hold {len(raws)} samples without "
                                 f"{'/'.join(self.required)} ({len(data)} bytes read)")
            return raws[0], len(data), None
        except io.StorageError:
            raise
        except DAMAGE as exc:
            return None, len(data), f"{url}: {type(exc).__name__}: {exc.args[0] if exc.args else exc}"


def ahead(calls: Iterable[Callable], pool, depth: int) -> Iterator:
    """The results of ``calls`` (zero-argument callables) in order, up to ``depth`` of them running ahead on
    ``pool`` (a ``concurrent.futures`` executor; None or ``depth < 1``: one after the other, here)."""
    if pool is None or depth < 1:
        for call in calls:
            yield call()
        return
    pending: collections.deque = collections.deque()
    for call in calls:
        pending.append(pool.submit(call))
        if len(pending) > depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
