"""The in-memory record and the `Source` interface every dataset reader implements.

A `Record` is one full image: ``image`` uint8 [H,W,3], ``depth`` float32 [H,W] in [0,1] (0 = near)
or None, ``label`` int64 [H,W] with -1 = ignore, or None (unlabelled data is first-class).
Readers raise `SourceError` naming the file and what was expected; the depth-generation pipeline
decides whether an unreadable image is skipped or fatal.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import numpy as np

from depthg.errors import DepthgError


class SourceError(DepthgError, ValueError):
    """A dataset file or folder that cannot be used; the message names it and what was expected."""


@dataclass
class Record:
    id: str
    image: np.ndarray  # uint8 [H,W,3]
    depth: Optional[np.ndarray] = None  # float32 [H,W] in [0,1], 0 = near
    label: Optional[np.ndarray] = None  # int64 [H,W], -1 = ignore


class Source:
    """A list of image ids and a way to load each one.

    Subclasses set ``name, has_depth, has_labels``, their classes in the class statement
    (``class X(Source, classes=NAMES, palette=RGB)``: ``n_classes`` is ``len(NAMES)``) or in ``__init__``,
    ``where`` (what the listing reads, named when it finds nothing) and ``limit``, implement ``_scan()``
    (every image of the split in order as ``(id, locator)``: the locator is what ``read`` needs besides the
    id, e.g. the file name, "" when the id says it all) and ``read(id) -> (Record, path)`` (through
    ``locator(id)``), and end ``__init__`` with ``self.listed(listed)``.

    Listed (the default) the source holds every id (``ids()``, ``len``). Built with ``listed=False`` it holds
    none: ``scan()`` streams the listing without keeping it (stage 1's driver writes it to a file) and
    ``share(entries)`` is a copy that knows only those entries (what a depth actor loads its unit from).
    ``load(id)`` rejects unknown ids and checks that depth and label match the image's size.
    """

    name: str = "source"
    n_classes: int = 0
    class_names: list = []
    palette: np.ndarray = np.zeros((0, 3), np.uint8)
    has_depth: bool = False
    has_labels: bool = False
    where: str = "?"
    limit: int = 0
    _ids: list[str] = []
    _loc: dict[str, str] = {}

    def __init_subclass__(cls, classes=None, palette=None, **kwargs):
        super().__init_subclass__(**kwargs)
        if classes is not None:
            cls.class_names, cls.n_classes = list(classes), len(classes)
        if palette is not None:
            cls.palette = palette

    def _scan(self) -> Iterator[tuple[str, str]]:
        """``(id, locator)`` of every image of the split, in order (``limit`` not applied)."""
        raise NotImplementedError

    def scan(self) -> Iterator[tuple[str, str]]:
        """``(id, locator)`` of the first ``limit`` images (``data.limit``, 0 = all), streamed: nothing is kept.
        None at all raises ``SourceError`` naming ``where`` (after the scan: stream into a temporary file)."""
        count = 0
        for entry in self._scan():
            if 0 < self.limit <= count:
                break
            count += 1
            yield entry
        if not count:
            raise SourceError(f"no images found in {self.where}")

    def listed(self, listed: bool = True) -> None:
        """Hold the whole listing (``listed``), or none of it (``share`` gives a part)."""
        self.use_entries(self.scan() if listed else ())

    def use_entries(self, entries: Iterable[tuple[str, str]]) -> None:
        self._loc = dict(entries)
        self._ids = list(self._loc)

    def share(self, entries: Iterable[tuple[str, str]]) -> "Source":
        """A copy of this source that knows only ``entries`` (``(id, locator)`` pairs of ``scan``)."""
        part = copy.copy(self)
        part.use_entries(entries)
        return part

    def locator(self, id: str) -> str:
        return self._loc[id]

    def ids(self) -> list[str]:
        return list(self._ids)

    def read(self, id: str) -> tuple[Record, str]:
        """The record of a known id and the path to name in errors."""
        raise NotImplementedError

    def load(self, id: str) -> Record:
        if id not in self._loc:
            raise SourceError(f"unknown image id {id!r} in the {self.name} source")
        record, where = self.read(id)
        h, w = record.image.shape[:2]
        for name, arr in (("label", record.label), ("depth", record.depth)):
            if arr is not None and arr.shape != (h, w):
                raise SourceError(f"{where}: {name} shape {arr.shape} does not match image {h}x{w}")
        return record

    def __len__(self) -> int:
        return len(self._ids)

    def __iter__(self):
        for id_ in self.ids():
            yield self.load(id_)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(n={len(self)}, n_classes={self.n_classes}, "
                f"depth={self.has_depth}, labels={self.has_labels})")


def check_label_range(label: np.ndarray, n_classes: int, where: str) -> np.ndarray:
    """Raise if a mapped label holds ids outside ``-1..n_classes-1``; names the file and the ids."""
    bad = (label < -1) | (label >= n_classes)
    if bad.any():
        ids = sorted(int(v) for v in np.unique(label[bad]))
        raise SourceError(f"{where}: label ids {ids[:20]} out of range for {n_classes} classes "
                          f"(expected 0..{n_classes - 1}, or 255/-1 for ignore)")
    return label


ZOEDEPTH_NYU_MAX = 10.0  # metres: the range ZoeDepth's NYU head predicts (the paper's estimator for every dataset)


def clip_minmax(depth: np.ndarray, max_depth: float = 0.0) -> np.ndarray:
    """Metric depth -> [0,1] the way a bounded monocular estimator's output looks: clip at ``max_depth``
    (metres; 0 = no clip), then per-image ``minmax``.

    ZoeDepth-NYU never predicts beyond about 10 m, so on a street scene the sky and everything far is 1 and
    the near half of the scene spreads over [0, 1); unclipped metric depth with a 150 m sky squeezes every
    non-sky pixel near 0 (the paper's target D = d_i d_j is then nearly constant).
    """
    if max_depth < 0:
        raise ValueError(f"depth range: max_depth must be >= 0 metres (0 = no clip), got {max_depth}")
    d = np.asarray(depth, dtype=np.float64)
    return minmax(np.minimum(d, max_depth) if max_depth > 0 else d)


def minmax(depth: np.ndarray) -> np.ndarray:
    """Per-image min-max normalisation to [0,1] (a constant map becomes all zeros)."""
    d = np.asarray(depth, dtype=np.float64)
    lo, hi = float(d.min()), float(d.max())
    if hi - lo <= 1e-12:
        return np.zeros(d.shape, np.float32)
    return ((d - lo) / (hi - lo)).astype(np.float32)
