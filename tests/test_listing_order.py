"""Bounded-memory listings: ``listing.sorted_stream`` (sorted runs spilled, merged) gives exactly ``sorted``'s order,
and the folder source, the inference walk and local globs keep their old order while no longer holding the listing."""
from __future__ import annotations

import glob
import os
import random
import tempfile

import pytest

from depthg import inference
from depthg.data import FolderSource, SourceError
from depthg.data import listing

# names that sort differently by byte, by case and around '.', '-', '_' and '/'
TRICKY = ["a.jpg", "a-b.jpg", "a_c.png", "A.jpg", "B.png", "b.jpeg", "a.b.c.png", "a0.png", "a~.png", "Z_z.JPG",
          "é.png", "a b.png", "10.png", "9.png", "-x.png", "_y.png", ".hidden.png", "d.JPEG", "c.c.c.jpg"]


@pytest.fixture
def spill(tmp_path, monkeypatch):
    """Temporary files under ``tmp_path/spill``; a few items per run, so every sort here spills several runs."""
    folder = tmp_path / "spill"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    monkeypatch.setattr(listing, "SORT_CHUNK", 3)
    return folder


def _runs(folder) -> list[int]:
    """Items in each spilled run file now under ``folder``."""
    return [sum(1 for _ in listing._read_run(p)) for p in sorted(glob.glob(str(folder / "depthg-sort-*" / "*.jsonl")))]


# ----------------------------------------------------------------------------- the helper
@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 50, 1000])
def test_sorted_stream_is_sorted_and_stable(chunk):
    rng = random.Random(chunk)
    items = [(rng.choice(TRICKY), i) for i in range(200)]
    assert list(listing.sorted_stream(items, chunk=chunk)) == sorted(items)
    by_name = list(listing.sorted_stream(items, key=lambda t: t[0], chunk=chunk))
    assert by_name == sorted(items, key=lambda t: t[0])  # ties keep their input order, as sorted() does
    assert list(listing.sorted_stream([], chunk=chunk)) == []
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        list(listing.sorted_stream(items, chunk=0))


def test_sorted_stream_spills_runs_of_at_most_chunk_and_always_removes_them(spill):
    items = [f"n{i:03d}" for i in reversed(range(10))]
    out = listing.sorted_stream(items)
    assert next(out) == "n000"
    assert _runs(spill) == [3, 3, 3, 1]  # 10 items: four runs on disk, none held whole
    assert list(out) == sorted(items)[1:] and os.listdir(spill) == []
    early = listing.sorted_stream(items)
    next(early)
    early.close()  # a consumer that stops early
    assert os.listdir(spill) == []

    def failing():
        yield from items[:7]
        raise OSError("listing broke")

    with pytest.raises(OSError, match="listing broke"):
        list(listing.sorted_stream(failing()))
    assert os.listdir(spill) == []
    small = listing.sorted_stream(items[:3])  # one run: nothing written
    assert next(small) == "n007" and os.listdir(spill) == [] and list(small) == ["n008", "n009"]


# ----------------------------------------------------------------------------- the folder source
def _old_folder_scan(img_dir):
    """FolderSource._scan before bounded memory: the folder's names sorted in memory, a ``seen`` dict of ids."""
    seen = {}
    for name in sorted(os.listdir(img_dir)):
        stem, ext = os.path.splitext(name)
        if ext.lower() not in (".png", ".jpg", ".jpeg"):
            continue
        key = stem.replace(".", "_")
        if key in seen:
            raise SourceError(f"{img_dir}: two images map to the id {key!r}: {seen[key]} and {name}")
        seen[key] = name
        yield key, name


def _folder(root, names):
    img = root / "images"
    img.mkdir(parents=True)
    for name in names:
        (img / name).write_bytes(b"")
    return str(img)


def test_folder_listing_keeps_its_order_in_bounded_runs(tmp_path, spill):
    img = _folder(tmp_path / "data", TRICKY + ["notes.txt", "x.PNG.txt"])
    os.mkdir(os.path.join(img, "sub.png"))  # listed as before (a name, not a file check)
    src = FolderSource(str(tmp_path / "data"), n_classes=2, listed=False)
    scan = src.scan()
    first = next(scan)
    assert _runs(spill) and max(_runs(spill)) <= 3  # both sorts spilled: the listing is never held whole
    assert [first, *scan] == list(_old_folder_scan(img))
    assert os.listdir(spill) == []
    assert FolderSource(str(tmp_path / "data"), n_classes=2).ids() == [i for i, _ in _old_folder_scan(img)]


@pytest.mark.parametrize("limit", range(0, 9))
def test_two_images_of_one_id_are_refused_as_before(tmp_path, spill, limit):
    # two clashes: 'a0' (a0.jpg, a0.png) is the smaller id, 'a_z' (a.z.jpg, a.z.png) is met first in name order
    # ('.' < '0'), fourth; the one met first is named, as the seen dict did, and a limit that stops the listing
    # before it lists no clash
    names = ["a0.png", "b.png", "a.z.png", "1.png", "q.png", "a0.jpg", "0.png", "c.png", "a.z.jpg", "m.png"]
    img = _folder(tmp_path / "data", names)
    src = FolderSource(str(tmp_path / "data"), n_classes=2, listed=False)
    src.limit = limit

    def old():
        out, count = [], 0
        for entry in _old_folder_scan(img):  # Source.scan's loop over the old _scan
            if 0 < limit <= count:
                break
            count += 1
            out.append(entry)
        return out

    try:
        expected = old()
    except SourceError as exc:
        with pytest.raises(SourceError) as got:
            list(src.scan())
        assert str(got.value) == str(exc) and "'a_z': a.z.jpg and a.z.png" in str(exc)
    else:
        assert list(src.scan()) == expected and 0 < limit <= 2
    assert os.listdir(spill) == []


# ----------------------------------------------------------------------------- inference inputs
def _old_walk_sorted(folder, rel=""):
    """inference._walk_sorted before bounded memory (each folder's entries sorted in memory)."""
    with os.scandir(folder) as it:
        entries = sorted((e.name + "/" if e.is_dir(follow_symlinks=False) else e.name, e) for e in it)
    for key, entry in entries:
        if key.endswith("/"):
            yield from _old_walk_sorted(entry.path, rel + key)
        elif inference._is_image(entry.name) and entry.is_file():
            yield rel + entry.name


def _tree(root):
    for sub in ["", "a", "a/b", "a-b", "a_b", "A", "a.b", "a b", "z/z/z"]:
        os.makedirs(root / sub, exist_ok=True)
        for name in TRICKY[:9] + ["notes.txt", "a.tif", "a.webp"]:
            (root / sub / name).write_bytes(b"")
    os.symlink(root / "a", root / "link")  # a symlinked folder is not entered
    return str(root)


def test_folder_walk_and_local_glob_keep_their_order(tmp_path, spill):
    root = _tree(tmp_path / "in")
    old = list(_old_walk_sorted(root))
    assert len(old) == 9 * 11 and old == sorted(old)  # the whole relative path's order
    walk = inference._walk_sorted(root)
    first = next(walk)
    assert _runs(spill)  # a folder's names spilled in runs of 3
    assert [first, *walk] == old and os.listdir(spill) == []
    assert inference.list_inputs(root) == [(os.path.join(root, r), r) for r in old]

    globbed = inference.iter_inputs(f"{root}/**/*")
    first = next(globbed)
    assert _runs(spill) and max(_runs(spill)) <= 3  # a glob's matches are never held whole either
    globbed.close()
    assert os.listdir(spill) == []
    for pattern in [f"{root}/**/*", f"{root}/a*/*.jpg", f"{root}/**/*.txt"]:
        files = sorted(os.path.abspath(f) for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
        files = [f for f in files if inference._is_image(f)] or files  # the old local glob, held and sorted
        base = os.path.abspath(inference._glob_root(pattern) or ".")
        expected = sorted(((f, inference.output_name(f, base)) for f in files), key=lambda item: item[1])
        assert inference.list_inputs(pattern) == expected and expected
    assert os.listdir(spill) == []
    with pytest.raises(FileNotFoundError, match="neither a folder nor a glob"):
        inference.list_inputs(f"{root}/*.nothing")
