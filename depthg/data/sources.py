"""Dataset readers: folder, CamVid, COCO-Stuff-27, Cityscapes-27, Potsdam-3, and `build_source`.

Every reader returns `Record`s (``base.py``): uint8 RGB, float32 depth in [0,1] or None, int64 labels
with -1 = ignore (255 on disk), and raises `SourceError` naming the file for a missing root, an
empty dataset, an unreadable image, label ids out of range or a missing depth file.

Layouts (``root`` = ``data.root``):
- folder: ``{root}/images/*.{png,jpg,jpeg}`` (or ``{root}/{split}/images`` when that exists), optional
  ``{root}/depth/<stem>.png|.npy`` and ``{root}/labels/<stem>.png``; ``classes.txt`` (one name per
  line) fixes the classes, else ``n_classes`` from the config.
- camvid: ``{root}/{split}.txt`` with "image label" pairs; label 11 (void) -> ignore.
- cocostuff27: ``{root}/images/{split}2017/<id>.jpg``, ``{root}/annotations/{split}2017/<id>.png``
  (stuffthingmaps, fine ids 0..181, 255 unlabelled), image list
  ``{root}/curated/{split}2017/Coco164kFull_Stuff_Coarse_7.txt`` (all images when absent).
- cityscapes: ``{root}/leftImg8bit/{split}/{city}/*_leftImg8bit.png`` and
  ``{root}/gtFine/{split}/{city}/*_gtFine_labelIds.png``; labelId - 7 -> 27 classes, ids < 7 ignored.
- potsdam (STEGO's layout, as far as known): ``{root}/imgs/<id>.mat`` (key ``img``, HxWxC, first 3
  channels used) or ``<id>.png``; ``{root}/gt/<id>.mat`` (key ``gt``) or ``<id>.png``; split lists
  ``labelled_train.txt`` (train), ``labelled_test.txt`` (val), ``unlabelled_train.txt``, ``all.txt``;
  without the list every image in ``imgs/`` is used. Fine classes 0..5 -> 3 coarse; 255/-1 ignore.

Listing (``Source.scan``, ``base.py``): each reader's ``_scan`` yields ``(id, locator)`` in its order, the
locator being what ``read`` needs besides the id (folder: the file name; camvid: "image label"; cityscapes:
"city/file"; coco, potsdam, synthetic: ""). List files (camvid, COCO's curated list, Potsdam's) are streamed;
the folder source's names are sorted in bounded memory (``listing.sorted_stream``); COCO's folder without its list,
Cityscapes' glob and Potsdam's folder (published datasets of known size, at most ~164k files) are sorted in memory.
``listed=False`` builds a reader without its listing (stage 1's driver streams it into a listing file; a depth actor
loads from ``share(entries)``).
"""
from __future__ import annotations

import glob
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from depthg.data import palettes as P
from depthg.data.base import Record, Source, SourceError, check_label_range, clip_minmax
from depthg.data.listing import sorted_stream

IMAGE_EXTS = (".png", ".jpg", ".jpeg")


# ----------------------------------------------------------------------------- file readers
def _open(path: str) -> Image.Image:
    if not os.path.isfile(path):
        raise SourceError(f"file not found: {path}")
    try:
        img = Image.open(path)
        img.load()
        return img
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise SourceError(f"cannot read image {path}: {exc}") from exc


def read_image(path: str) -> np.ndarray:
    """Any PIL-readable image -> uint8 RGB [H,W,3]."""
    return np.asarray(_open(path).convert("RGB"), dtype=np.uint8).copy()


def read_label_png(path: str) -> np.ndarray:
    """A single-channel (L, P, I;16, I) label PNG -> int64 raw values."""
    img = _open(path)
    if img.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
        raise SourceError(f"label {path}: expected a single-channel PNG (mode L/P/I), got mode {img.mode}")
    return np.asarray(img).astype(np.int64)


def read_depth(path: str, depth_max: float = 0.0) -> np.ndarray:
    """Depth file -> float32 [H,W] in [0,1].

    16-bit PNG: value / 65535; 8-bit PNG: value / 255 (as floats: never cast to integers);
    ``.npy``: kept if already within [0,1] (e.g. pre-normalised), else taken as metric depth (larger =
    farther): clipped at ``depth_max`` metres (0 = no clip; 10 = ZoeDepth-NYU's range, the paper's
    estimator) and min-max normalised per image (``base.clip_minmax``)."""
    if depth_max < 0:
        raise SourceError(f"depth {path}: depth_max must be >= 0 metres (0 = no clip), got {depth_max}")
    if path.endswith(".npy"):
        try:
            d = np.load(path, allow_pickle=False).astype(np.float64)
        except (OSError, ValueError) as exc:
            raise SourceError(f"cannot read depth {path}: {exc}") from exc
        d = np.squeeze(d)
        if d.ndim != 2 or not np.isfinite(d).all():
            raise SourceError(f"depth {path}: expected a finite 2-D array, got shape {d.shape}")
        if d.min() < 0 or d.max() > 1:
            return clip_minmax(d, depth_max)
        return d.astype(np.float32)
    img = _open(path)
    arr = np.asarray(img)
    if arr.ndim == 3:
        arr = arr[..., 0]
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype in (np.uint16, np.int32, np.int16, ">u2", "<u2"):
        return np.clip(arr.astype(np.float32) / 65535.0, 0, 1)
    raise SourceError(f"depth {path}: unsupported PNG mode {img.mode} (expected 8- or 16-bit)")


def _list_lines(path: str):
    """``(id, "")`` per non-empty line of an id list, streamed."""
    with open(path) as fh:
        for line in fh:
            if line.strip():
                yield line.strip(), ""


def _any_file(folder: str, ext: str) -> bool:
    """Whether ``folder`` holds a file ending in ``ext`` (stops at the first: never lists the whole folder)."""
    with os.scandir(folder) as entries:
        return any(e.name.lower().endswith(ext) for e in entries)


def _second(pair):
    return pair[1]


def _require_dir(path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise SourceError(f"{what} folder not found: {path}")
    return path


def _refuse(raw: np.ndarray, bad: np.ndarray, path: str, expected: str) -> None:
    """Raise naming the label file and (up to 20 of) the raw ids marked ``bad``."""
    if bad.any():
        raise SourceError(f"{path}: label ids {sorted(int(v) for v in np.unique(raw[bad]))[:20]} "
                          f"out of range (expected {expected})")


def _lut_map(raw: np.ndarray, lut: dict, path: str, ignore=(255,)) -> np.ndarray:
    """Map raw label values through ``lut`` (value -> class); ignore values -> -1; others are errors."""
    out = np.full(raw.shape, -1, np.int64)
    known = np.zeros(raw.shape, bool)
    for v in ignore:
        known |= raw == v
    for src, dst in lut.items():
        m = raw == src
        out[m], known = dst, known | m
    _refuse(raw, ~known, path, f"{sorted(lut)} or {list(ignore)}")
    return out


# ----------------------------------------------------------------------------- folder
class FolderSource(Source):
    """The user's own images; labels and depth optional. Ids are file stems (dots -> '_').

    ``depth_max``: metric ``.npy`` depth is clipped at this many metres before its min-max (``read_depth``).
    """

    name = "folder"

    def __init__(self, root: str, split: str = "train", n_classes: int | None = None, limit: int = 0,
                 depth_max: float = 0.0, listed: bool = True):
        _require_dir(root, "dataset root")
        if depth_max < 0:
            raise SourceError(f"folder source: depth_max must be >= 0 metres (0 = no clip), got {depth_max}")
        self.depth_max = float(depth_max)
        base = os.path.join(root, split) if os.path.isdir(os.path.join(root, split, "images")) else root
        self.img_dir = _require_dir(os.path.join(base, "images"), "images")
        self.where, self.limit = f"{self.img_dir} (*.png, *.jpg, *.jpeg)", limit
        self.depth_dir, self.label_dir = os.path.join(base, "depth"), os.path.join(base, "labels")
        self.has_depth = os.path.isdir(self.depth_dir)
        self.has_labels = os.path.isdir(self.label_dir) and _any_file(self.label_dir, ".png")
        self._set_classes(root, base, n_classes)
        self.listed(listed)

    def _scan(self):
        """(id, file name) in file-name order, in bounded memory: the folder is read once (``os.scandir``) into two
        external sorts (``listing.sorted_stream``: runs spilled to a temporary folder), one by (id, name) that finds
        ids two images map to, one by name that is the order. Two images mapping to one id raise when the listing
        reaches the second one in name order (the first such pair, the message naming both), as a held ``seen``
        set did; that is before the first listing line when nothing is skipped (``limit`` 0)."""
        clash = None  # (second name, id, first name) of the clash met first in name order

        def images():
            with os.scandir(self.img_dir) as entries:
                for entry in entries:
                    stem, ext = os.path.splitext(entry.name)
                    if ext.lower() in IMAGE_EXTS:
                        yield stem.replace(".", "_"), entry.name

        def checked(by_id):
            nonlocal clash
            prev, first = None, None
            for key, name in by_id:
                if key != prev:
                    prev, first = key, name
                elif first is not None:  # the id's second name (in name order): a clash
                    if clash is None or name < clash[0]:
                        clash = (name, key, first)
                    first = None
                yield key, name

        for key, name in sorted_stream(checked(sorted_stream(images())), key=_second):
            if clash is not None and name == clash[0]:
                raise SourceError(f"{self.img_dir}: two images map to the id {key!r}: {clash[2]} and {name}")
            yield key, name

    def _set_classes(self, root: str, base: str, n_classes: int | None):
        for folder in (base, root):
            path = os.path.join(folder, "classes.txt")
            if os.path.isfile(path):
                with open(path) as fh:
                    names = [ln.strip() for ln in fh if ln.strip()]
                if not names:
                    raise SourceError(f"{path} is empty: expected one class name per line")
                self.class_names = names
                break
        else:
            if n_classes is None:
                from depthg.config import ModelConfig
                n_classes = ModelConfig().n_classes
            self.class_names = [f"class_{i}" for i in range(n_classes)]
        self.n_classes = len(self.class_names)
        self.palette = P.default_palette(self.n_classes)

    def read(self, id: str) -> tuple[Record, str]:
        path = os.path.join(self.img_dir, self.locator(id))
        stem = os.path.splitext(os.path.basename(path))[0]
        image = read_image(path)
        label = depth = None
        label_path = os.path.join(self.label_dir, stem + ".png")
        if self.has_labels and os.path.isfile(label_path):
            raw = read_label_png(label_path)
            label = check_label_range(np.where(raw == 255, -1, raw), self.n_classes, label_path)
        if self.has_depth:
            cands = [os.path.join(self.depth_dir, stem + e) for e in (".png", ".npy")]
            found = [c for c in cands if os.path.isfile(c)]
            if not found:
                raise SourceError(f"missing depth for image {path}: expected {cands[0]} or {cands[1]}")
            depth = read_depth(found[0], self.depth_max)
        return Record(id, image, depth, label), path


# ----------------------------------------------------------------------------- CamVid
class CamVidSource(Source, classes=P.CAMVID_CLASSES, palette=P.CAMVID_PALETTE):
    """SegNet's 11-class CamVid: ``{split}.txt`` lists "image label" paths relative to the root."""

    name = "camvid"
    has_labels = True

    def __init__(self, root: str, split: str = "train", limit: int = 0, listed: bool = True):
        self.root = _require_dir(root, "CamVid root")
        self.list_file = os.path.join(root, f"{split}.txt")
        if not os.path.isfile(self.list_file):
            raise SourceError(f"CamVid split list not found: {self.list_file} (expected 'image label' lines)")
        self.where, self.limit = self.list_file, limit
        self.lut = {i: i for i in range(self.n_classes)}
        self.listed(listed)

    def _scan(self):
        """(id, "image label") per line of the split list, streamed; an id twice is an error naming both lines."""
        first: dict[str, int] = {}  # CamVid's lists hold a few hundred lines
        with open(self.list_file) as fh:
            for lineno, line in enumerate(fh, 1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) != 2:
                    raise SourceError(f"{self.list_file}:{lineno}: expected 'image label', got {line.strip()!r}")
                key = os.path.splitext(os.path.basename(parts[0]))[0].replace(".", "_")
                if key in first:
                    raise SourceError(f"{self.list_file}:{lineno}: image id {key!r} again (first on line {first[key]})")
                first[key] = lineno
                yield key, " ".join(parts)

    def read(self, id: str) -> tuple[Record, str]:
        img_path, lbl_path = (os.path.join(self.root, p) for p in self.locator(id).split(" "))
        image = read_image(img_path)
        label = _lut_map(read_label_png(lbl_path), self.lut, lbl_path, ignore=(P.CAMVID_VOID, 255))
        return Record(id, image, None, label), img_path


# ----------------------------------------------------------------------------- COCO-Stuff-27
class CocoStuff27Source(Source, classes=P.COCO27_CLASSES, palette=P.COCO27_PALETTE):
    """COCO-Stuff 164k with fine ids -> 27 coarse classes (``palettes.COCO_FINE_TO_COARSE``)."""

    name = "cocostuff27"
    has_labels = True
    CURATED = "Coco164kFull_Stuff_Coarse_7.txt"

    def __init__(self, root: str, split: str = "train", limit: int = 0, listed: bool = True):
        _require_dir(root, "COCO-Stuff root")
        sub = {"train": "train2017", "val": "val2017"}.get(split, split)
        self.img_dir = _require_dir(os.path.join(root, "images", sub), "COCO images")
        self.ann_dir = os.path.join(root, "annotations", sub)
        self.list_file = os.path.join(root, "curated", sub, self.CURATED)
        self.where = self.list_file if os.path.isfile(self.list_file) else self.img_dir
        self.limit, self.has_labels = limit, os.path.isdir(self.ann_dir)
        self.listed(listed)

    def _scan(self):
        """The curated list's ids, streamed; without it every image's stem, sorted."""
        if self.where == self.list_file:
            yield from _list_lines(self.list_file)
            return
        yield from ((i, "") for i in sorted(os.path.splitext(n)[0] for n in os.listdir(self.img_dir)
                                             if n.lower().endswith((".jpg", ".jpeg", ".png"))))

    def _image_path(self, id: str) -> str:
        for ext in (".jpg", ".png", ".jpeg"):
            path = os.path.join(self.img_dir, id + ext)
            if os.path.isfile(path):
                return path
        raise SourceError(f"COCO image for id {id!r} not found: expected {os.path.join(self.img_dir, id)}.jpg")

    def read(self, id: str) -> tuple[Record, str]:
        img_path = self._image_path(id)
        image = read_image(img_path)
        label = None
        if self.has_labels:
            lbl_path = os.path.join(self.ann_dir, id + ".png")
            raw = read_label_png(lbl_path)
            _refuse(raw, (raw < 0) | (raw > 255) | ((raw > 181) & (raw != 255)), lbl_path, "fine ids 0..181 or 255")
            label = P.COCO_FINE_TO_COARSE[raw]
        return Record(id, image, None, label), img_path


# ----------------------------------------------------------------------------- Cityscapes-27
class CityscapesSource(Source, classes=P.CITYSCAPES_CLASSES, palette=P.CITYSCAPES_PALETTE):
    """Cityscapes fine annotations, labelId - 7 -> 27 classes; ids are ``{city}_{seq}_{frame}``."""

    name = "cityscapes"
    SUFFIX = "_leftImg8bit.png"

    def __init__(self, root: str, split: str = "train", limit: int = 0, listed: bool = True):
        _require_dir(root, "Cityscapes root")
        self.img_root = _require_dir(os.path.join(root, "leftImg8bit", split), "Cityscapes leftImg8bit")
        self.where, self.limit = f"{self.img_root}/*/*{self.SUFFIX}", limit
        self.gt_root = os.path.join(root, "gtFine", split)
        self.has_labels = os.path.isdir(self.gt_root)
        self.listed(listed)

    def _scan(self):
        """(id, "city/file") in path order."""
        for path in sorted(glob.glob(os.path.join(self.img_root, "*", "*" + self.SUFFIX))):
            yield os.path.basename(path)[: -len(self.SUFFIX)], os.path.relpath(path, self.img_root)

    def read(self, id: str) -> tuple[Record, str]:
        img_path = os.path.join(self.img_root, self.locator(id))
        image = read_image(img_path)
        label = None
        if self.has_labels:
            city = os.path.basename(os.path.dirname(img_path))
            lbl_path = os.path.join(self.gt_root, city, id + "_gtFine_labelIds.png")
            raw = read_label_png(lbl_path)
            _refuse(raw, (raw > 33) & (raw != 255) | (raw < 0), lbl_path, "Cityscapes labelIds 0..33 or 255")
            label = np.where((raw < P.CITYSCAPES_FIRST_ID) | (raw == 255), -1, raw - P.CITYSCAPES_FIRST_ID)
        return Record(id, image, None, label), img_path


# ----------------------------------------------------------------------------- Potsdam-3
def _read_mat(path: str, key: str) -> np.ndarray:
    from scipy.io import loadmat

    try:
        data = loadmat(path)
    except Exception as exc:  # noqa: BLE001 - MatReadError, v7.3 files, truncation: all rewrapped with the path
        raise SourceError(f"cannot read MATLAB file {path}: {exc}") from exc
    if key not in data:
        raise SourceError(f"{path}: expected key {key!r}, found {[k for k in data if not k.startswith('__')]}")
    return np.asarray(data[key])


def _to_uint8_rgb(arr: np.ndarray, path: str) -> np.ndarray:
    if arr.ndim != 3 or arr.shape[2] < 3:
        raise SourceError(f"{path}: expected an HxWxC image with C >= 3, got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return arr.copy()
    arr = arr.astype(np.float64)
    if arr.max() <= 1.0:  # float images in [0,1]
        arr = arr * 255.0
    return np.clip(arr.round(), 0, 255).astype(np.uint8)


class PotsdamSource(Source, classes=P.POTSDAM_CLASSES, palette=P.POTSDAM_PALETTE):
    """ISPRS Potsdam in STEGO's preparation: 6 fine classes -> 3 coarse."""

    name = "potsdam"
    SPLIT_FILES = {"train": "labelled_train.txt", "val": "labelled_test.txt",
                   "unlabelled_train": "unlabelled_train.txt", "all": "all.txt"}

    def __init__(self, root: str, split: str = "train", limit: int = 0, listed: bool = True):
        _require_dir(root, "Potsdam root")
        self.img_dir = _require_dir(os.path.join(root, "imgs"), "Potsdam imgs")
        self.gt_dir = os.path.join(root, "gt")
        self.list_file = os.path.join(root, self.SPLIT_FILES.get(split, f"{split}.txt"))
        self.where = self.list_file if os.path.isfile(self.list_file) else self.img_dir
        self.limit, self.has_labels = limit, os.path.isdir(self.gt_dir)
        self.listed(listed)

    def _scan(self):
        """The split list's ids, streamed; without it every image's stem, sorted."""
        if self.where == self.list_file:
            yield from _list_lines(self.list_file)
            return
        yield from ((i, "") for i in sorted({os.path.splitext(n)[0] for n in os.listdir(self.img_dir)
                                              if n.lower().endswith((".mat", ".png"))}))

    @staticmethod
    def _find(folder: str, id: str) -> str | None:
        for ext in (".mat", ".png"):
            if os.path.isfile(os.path.join(folder, id + ext)):
                return os.path.join(folder, id + ext)
        return None

    def read(self, id: str) -> tuple[Record, str]:
        img_path = self._find(self.img_dir, id)
        if img_path is None:
            raise SourceError(f"Potsdam image for id {id!r} not found: expected {self.img_dir}/{id}.mat or .png")
        if img_path.endswith(".mat"):
            image = _to_uint8_rgb(_read_mat(img_path, "img"), img_path)
        else:
            image = read_image(img_path)
        label = None
        gt_path = self._find(self.gt_dir, id) if self.has_labels else None
        if gt_path is not None:
            raw = _read_mat(gt_path, "gt") if gt_path.endswith(".mat") else read_label_png(gt_path)
            raw = np.squeeze(raw).astype(np.int64)
            label = _lut_map(raw, P.POTSDAM_FINE_TO_COARSE, gt_path, ignore=(255, -1))
        return Record(id, image, None, label), img_path


# ----------------------------------------------------------------------------- factory
def build_source(data_cfg, split: str, n_classes: int | None = None, listed: bool = True) -> Source:
    """The `Source` for ``data_cfg.dataset`` and ``split`` ("train" | "val"); ``data.limit`` caps it.
    ``n_classes`` (usually ``model.n_classes``) is used by the folder source without ``classes.txt``.
    ``listed=False``: class facts and folders only, no listing held (``Source.scan`` streams it, ``share``)."""
    ds, limit = data_cfg.dataset, data_cfg.limit
    if ds == "synthetic":
        from depthg.data.synthetic import SyntheticSource

        num = data_cfg.num_train if split == "train" else data_cfg.num_val
        num = min(num, limit) if limit and limit > 0 else num
        return SyntheticSource(num, data_cfg.height, data_cfg.width, data_cfg.seed, split, listed=listed)
    readers = {"folder": FolderSource, "camvid": CamVidSource, "cocostuff27": CocoStuff27Source,
               "cityscapes": CityscapesSource, "potsdam": PotsdamSource}
    if ds not in readers:
        raise SourceError(f"unknown data.dataset {ds!r}; expected synthetic or one of {', '.join(readers)}")
    if not data_cfg.root:
        raise SourceError(f"data.root is empty: set data.root=<folder> for dataset {ds}")
    if ds == "folder":
        return FolderSource(data_cfg.root, split, n_classes, limit, listed=listed)
    return readers[ds](data_cfg.root, split, limit, listed=listed)
