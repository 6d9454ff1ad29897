"""Scale places of bucket segmentation's driver (``bench/scale.py`` runs, fits and reports them; N = images).

``segment_rerun(n)``: a rerun into an output whose unit records (``cluster.segmentation``'s own layout, units of
``UNIT`` images) hold every other unit of ``n`` listed images: the driver lists ``_units/``, reads and reduces every
record (``Tally``), streams the listing past the done-set and spools the units left (``segmentation.prepare``).
``segment_plan(n)``: a first run's plan of ``n`` listed images (nothing recorded; needs no data, so it also runs at
10M and 50M). The listing is synthetic, streamed as S3 pages would be (sorted names under ``s3://bucket/photos``);
the records are real files on local disk (``/tmp``), read by the job's reader threads.
``segment_walk(n)``: the driver's listing of a local folder (``inference.iter_inputs``: a sorted walk, each
folder's names through ``listing.sorted_stream``) of ``n`` empty image files in one flat folder, consumed.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

UNIT = 32  # images per unit (launch/segment.py's default --unit-size)
ROOT = "s3://bucket/photos/"


def segment_walk(n: int):
    """``inference.iter_inputs`` over a real flat folder of ``n`` images (the setup makes the files)."""
    from bench.scale_drivers import image_folder
    from depthg import inference

    folder = os.path.join(image_folder(n), "images")

    def work() -> dict:
        count = 0
        for _ in inference.iter_inputs(folder):
            count += 1
        return {"images": count}

    return work


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


def records_s3(args=None, count: int = 1000) -> dict:
    """A rerun's record reads from S3 (a moto server on loopback, real HTTP): ``count`` records of ``UNIT`` images
    read one GET after the other (as the previous driver did) and through the job's reduction (``tally``: 16
    reader threads). An extra of ``bench/scale.py`` (the server is another process)."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    import boto3
    import s3fs

    from bench.train import _moto
    from cluster import segmentation
    from cluster.world import patched_environ
    from depthg import io

    proc, endpoint = _moto()
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        with patched_environ(env):
            s3fs.S3FileSystem.clear_instance_cache()
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
            output = "s3://bench/labels"
            settings = _settings(output)
            key, images = segmentation.digest(settings), list(listing(count * UNIT))

            def put(unit: int) -> None:
                items = images[unit * UNIT:(unit + 1) * UNIT]
                record = {"schema": segmentation.SCHEMA, "unit": unit, "settings": key, "skipped": [],
                          "probs": None, "node": "node-0", "seconds": 1.0,
                          "images": [{"source": s, "name": n, "size": [480, 640],
                                      "files": {"label": f"{n}_label.png", "overlay": f"{n}_overlay.png"}}
                                     for s, n in items]}
                io.write_bytes(io.join(output, segmentation.UNITS, segmentation.unit_name(unit)),
                               json.dumps(record, indent=1).encode())

            with ThreadPoolExecutor(16) as pool:
                list(pool.map(put, range(count)))
            folder = io.join(output, segmentation.UNITS)
            t0 = time.perf_counter()
            serial = [segmentation._read_record(io.join(folder, n)) for n in io.listdir(folder)]
            serial_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            done = segmentation.tally(output, settings)
            threads_s = time.perf_counter() - t0
    finally:
        proc.terminate()
        s3fs.S3FileSystem.clear_instance_cache()
    assert len(serial) == len(done.units) == count
    return {"records": count, "images_per_record": UNIT, "serial_s": round(serial_s, 2),
            "threads": segmentation.READ_THREADS, "threads_s": round(threads_s, 2),
            "speedup": round(serial_s / threads_s, 2), "records_per_s_threads": round(count / threads_s, 1),
            "load_avg_1min": os.getloadavg()[0]}
