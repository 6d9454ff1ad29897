"""Scale places of the stage-1 driver, a depth actor's share and the evaluation driver (``bench/scale.py`` runs,
fits and reports them): each ``place(n)`` builds the inputs one process receives at ``n`` crops (images for the
evaluation driver: the validation split is not cropped) and returns the zero-argument work that is measured.

* ``depth_driver`` (plan-only: a synthetic source, no image is rendered): ``cluster.depthgen``'s driver lists the
  source (``Source.scan`` -> ``list_units``: ``listing.jsonl``), checks the (empty) folder for complete units,
  builds the units' calls, reduces one summary per unit as the actors would return them (``DepthTally``) and
  writes the manifest.
* ``depth_rerun``: the same driver on a folder whose shards are all complete: one listing of the folder, every
  sidecar (as stage 1 writes them, ~54 kB at 320 crops) read on ``IO_THREADS`` threads and reduced, the manifest.
* ``folder_listing`` (N = images): the stage-1 driver lists a real folder source (``N`` empty ``.jpg`` files in one
  flat ``images/`` folder, made in the setup) into ``listing.jsonl`` (``FolderSource.scan`` -> ``list_units``): the
  names sorted in bounded memory (``listing.sorted_stream``: runs spilled to ``TMPDIR``) and checked for two images
  of one id.
* ``depth_actor_share``: one depth actor of 16 reads its units' ranges of the listing file and builds each
  unit's share of the (unlisted) source: what an actor holds no longer grows with the split.
* ``eval_driver``: ``cluster.evaluator``'s driver reduces per-shard results as they arrive (``EvalTotals``:
  5 heads' int64 confusions at 27 classes, each shard's 8 report samples, here 64 px: at 320 px a kept sample is
  ~0.8 MB and only the 8 shown are kept) and the shards' k-means codes (64 per image, 70 dims, into
  ``metrics.CodeSample`` of ``KMEANS_CODES``); the inputs are made fresh per shard, as deserialising them
  would (their making is in the time). The k-means fit itself (at most ``KMEANS_CODES`` vectors: constant) runs
  on an actor, and the checkpoint is read in a child process: the driver imports ``launch.evaluate`` and no torch.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import numpy as np

IMAGES_PER_SHARD = 64  # stage 1: shards.samples_per_shard source images, five-cropped = 320 crops
CROPS = 5
ACTORS = 16  # depth actors sharing the units (one per GPU)


def _scratch() -> str:
    """A temporary folder removed when the measuring process exits."""
    root = tempfile.mkdtemp(prefix="depthg-scale-")
    atexit.register(shutil.rmtree, root, True)
    return root


def _config(root: str, images: int):
    from depthg.config import load_config

    return load_config(None, ["data.dataset=synthetic", f"data.num_train={images}", f"shards.root={root}",
                              f"shards.samples_per_shard={IMAGES_PER_SHARD}"])


def _driver(n: int, complete: bool):
    """Setup of the stage-1 driver at ``n`` crops; with ``complete`` every unit's shard + sidecar exists."""
    from cluster import depthgen
    from depthg import shards
    from depthg.data import build_source

    root = _scratch()
    cfg = _config(root, max(n // CROPS, 1))
    folder = shards.split_dir(root, "train", "depth")
    os.makedirs(folder)
    digest = depthgen.depth_digest(cfg, "train")
    if complete:
        _complete_sidecars(cfg, folder, digest)

    def work() -> dict:
        source = build_source(cfg.data, "train", listed=False)
        local = os.path.join(root, "listing.jsonl")
        plan = depthgen.list_units(source, local, IMAGES_PER_SHARD)
        tally = depthgen.check_units(folder, plan, digest)
        calls = depthgen.unit_calls("train", tally.pending(), os.path.join(folder, "listing.jsonl"), plan, folder)
        for _, u, *_ in calls:  # the actors' summaries, as they arrive
            images = plan.images - u * IMAGES_PER_SHARD
            tally.add(u, min(images, IMAGES_PER_SHARD) * CROPS, [])
        manifest = depthgen.write_depth_manifest(cfg, "train", folder, tally, digest, source)
        return {"units": len(plan), "calls": len(calls), "listing_bytes": os.path.getsize(local),
                "total": manifest["total"]}

    return work


def _complete_sidecars(cfg, folder: str, digest: str) -> None:
    """Shards (empty files) and sidecars of every unit, as stage 1 writes them (ids, offsets, prefix, source_ids)."""
    import json

    from depthg import shards
    from depthg.data import build_source

    rng = np.random.default_rng(0)
    ids = [i for i, _ in build_source(cfg.data, "train", listed=False).scan()]
    for u, start in enumerate(range(0, len(ids), IMAGES_PER_SHARD)):
        source_ids = ids[start:start + IMAGES_PER_SHARD]
        keys = [f"{i}_c{k}" for i in source_ids for k in range(CROPS)]
        offsets = np.concatenate([[0], np.cumsum(rng.integers(60_000, 120_000, len(keys)))])
        info = {"name": shards.shard_name(u), "count": len(keys), "ids": keys, "offsets": offsets.tolist(),
                "prefix": (offsets[:-1] + 50_000).tolist(), "source_ids": source_ids, "skipped": [], "digest": digest}
        open(os.path.join(folder, shards.shard_name(u)), "wb").close()
        with open(os.path.join(folder, shards.sidecar_name(shards.shard_name(u))), "w") as fh:
            json.dump(info, fh, indent=1, sort_keys=True)


def depth_driver(n: int):
    return _driver(n, complete=False)


def depth_rerun(n: int):
    return _driver(n, complete=True)


def image_folder(n: int) -> str:
    """A scratch folder with ``images/`` holding ``n`` empty image files (``IMG_00000000.jpg`` ...): what a listing
    reads (names and types, never the bytes)."""
    root = _scratch()
    folder = os.path.join(root, "images")
    os.makedirs(folder)
    for i in range(n):
        os.close(os.open(os.path.join(folder, f"IMG_{i:08d}.jpg"), os.O_CREAT | os.O_WRONLY, 0o644))
    return root


def folder_listing(n: int):
    """The stage-1 driver's listing of a real folder of ``n`` images (N = images, not crops)."""
    from cluster import depthgen
    from depthg.data import FolderSource

    root = image_folder(n)

    def work() -> dict:
        source = FolderSource(root, "train", n_classes=27, listed=False)
        local = os.path.join(root, "listing.jsonl")
        plan = depthgen.list_units(source, local, IMAGES_PER_SHARD)
        return {"images": plan.images, "units": len(plan), "listing_bytes": os.path.getsize(local)}

    return work


def depth_actor_share(n: int):
    """One actor of ``ACTORS``: its units' entries read from the listing file, each unit's share built."""
    from cluster import depthgen
    from depthg.data import build_source
    from depthg.data.listing import unit_entries

    root = _scratch()
    cfg = _config(root, max(n // CROPS, 1))
    listing = os.path.join(root, "listing.jsonl")
    plan = depthgen.list_units(build_source(cfg.data, "train", listed=False), listing, IMAGES_PER_SHARD)
    mine = list(range(0, len(plan), ACTORS))
    bounds = [(plan.start(u), plan.stop(u)) for u in mine]  # what its calls carry
    del plan

    def work() -> dict:
        source = build_source(cfg.data, "train", listed=False)
        images = 0
        for start, stop in bounds:
            share = source.share(unit_entries(listing, start, stop))
            images += len(share)
        return {"actor_units": len(bounds), "actor_images": images}

    return work


def eval_driver(n: int):
    """The evaluation driver at ``n`` validation images: per-shard results and k-means codes reduced."""
    import sys

    from cluster import evaluator
    from depthg import metrics
    from launch import evaluate  # noqa: F401 - the driver's own imports (no torch: its start RSS is the real one)

    shards_n = -(-n // IMAGES_PER_SHARD)
    classes, dim, tile, shown = 27, 70, 64, 8
    base_codes = np.random.default_rng(0).random((IMAGES_PER_SHARD * evaluator.KMEANS_PER_IMAGE, dim), np.float32)

    def result(s: int) -> dict:
        conf = {h: np.full((classes, classes), s, np.int64) for h in
                ("cluster", "cluster_crf", "linear", "linear_crf", "kmeans")}
        samples = [{"id": f"val-{s:06d}-{i:02d}", "image": np.full((tile, tile, 3), i, np.uint8),
                    "depth": np.full((tile, tile), i, np.uint8), "label": np.full((tile, tile), i % classes, np.int16),
                    "pred": np.full((tile, tile), i % classes, np.int16)} for i in range(shown)]
        return {"confusion": conf, "images": min(IMAGES_PER_SHARD, n - s * IMAGES_PER_SHARD), "seconds": 1.0,
                "cpu_seconds": 1.0, "node": "node", "samples": samples}

    def work() -> dict:
        codes = metrics.CodeSample(evaluator.KMEANS_CODES, seed=0)
        for s in range(shards_n):
            codes.add(s, base_codes + np.float32(s))
        totals = evaluator.EvalTotals(shown)
        for s in reversed(range(shards_n)):  # arrival order does not matter
            totals.add(result(s))
        out = totals.result()
        return {"shards": shards_n, "images": out["images"], "kmeans_codes": len(codes),
                "samples_kept": len(out["samples"]), "driver_imports_torch": "torch" in sys.modules}

    return work
