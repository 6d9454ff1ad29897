"""Scale places of bucket segmentation's driver (``bench/scale.py`` runs, fits and reports them; N = images).

``segment_rerun(n)``: a rerun into an output whose unit records (``cluster.segmentation``'s own layout, units of
``UNIT`` images) hold every other unit of ``n`` listed images: the driver lists ``_units/``, reads and reduces every
record (``Tally``), streams the listing past the done-set and spools the units left (``segmentation.prepare``).
``segment_plan(n)``: a first run's plan of ``n`` listed images (nothing recorded; needs no data, so it also runs at
10M and 50M). The listing is synthetic, streamed as S3 pages would be (sorted names under ``s3://bucket/photos``);
the records are real files on local disk (``/tmp``), read by the job's reader threads.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

UNIT = 32  # images per unit (launch/segment.py's default --unit-size)
ROOT = "s3://bucket/photos/"


def listing(n: int):
    """``(source, name)`` of ``n`` images in name order, generated as they are handed out (like S3 pages)."""
    for i in range(n):
        name = f"d{i // 1000:05d}/img{i:08d}.jpg"
        yield ROOT + name, name


def _settings(output: str) -> dict:
    return {"checkpoint": "s3://bucket/models/cocostuff_vits.ckpt", "input": ROOT, "output": output,
            "probe": "cluster", "crf": True, "resolution": 320, "flip": True, "mapping": None, "overlays": True,
            "probs": True, "unit_size": UNIT}


def _write_records(output: str, n: int, settings: dict) -> int:
    """Records of every other unit of the listing (the state a stopped job leaves); returns how many."""
    from cluster import segmentation

    folder = os.path.join(output, segmentation.UNITS)
    os.makedirs(folder)
    written, unit, items = 0, 0, []
    key = segmentation.digest(settings)

    def flush():
        nonlocal written
        if unit % 2 == 0:
            record = {"schema": segmentation.SCHEMA, "unit": unit, "settings": key, "skipped": [],
                      "probs": segmentation.shard_name(unit), "node": "node-0", "seconds": 1.0,
                      "images": [{"source": s, "name": nm, "size": [480, 640],
                                  "files": {"label": f"{nm}_label.png", "overlay": f"{nm}_overlay.png"}}
                                 for s, nm in items]}
            with open(os.path.join(folder, segmentation.unit_name(unit)), "w") as fh:
                json.dump(record, fh, indent=1)
            written += 1

    for item in listing(n):
        items.append(item)
        if len(items) == UNIT:
            flush()
            unit, items = unit + 1, []
    if items:
        flush()
    return written


def _place(n: int, records: bool):
    from cluster import segmentation

    root = tempfile.mkdtemp(prefix="depthg-scale-segment-")
    output = os.path.join(root, "out")
    settings = _settings(output)
    count = _write_records(output, n, settings) if records else 0
    os.sync()  # the records on disk before the measured reads (not competing with their own write-back)

    def work() -> dict:
        try:
            done, job = segmentation.prepare(settings, listing(n), os.path.join(root, "units.jsonl"))
            return {"records": count, "listed": job.listed, "done": job.done, "units_todo": job.units,
                    "spool_mb": round(os.path.getsize(job.spool) / 2**20, 1)}
        finally:
            shutil.rmtree(root, ignore_errors=True)

    return work


def segment_rerun(n: int):
    """A rerun's driver: every other unit recorded; records read and reduced, listing planned, units spooled."""
    return _place(n, records=True)


def segment_plan(n: int):
    """A first run's driver: the listing planned into units and spooled (no records; no data needed)."""
    return _place(n, records=False)
