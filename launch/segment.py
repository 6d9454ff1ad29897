"""Segment your own images with a checkpoint: a label PNG (and a colour overlay) per image, on one machine or a cluster.

    python launch/segment.py --checkpoint runs/demo/segmenter.pt --input photos/ --output out/
    python launch/segment.py --checkpoint s3://bucket/run/segmenter.pt --input "photos/*.jpg" --output out/ \\
        --crf --assignment runs/demo/eval.json
    python launch/segment.py --checkpoint cocostuff_vits.ckpt --input s3://bucket/images --output s3://bucket/labels \\
        --workers 4 --probs            # Ray actors (one per GPU; CPU fallback), CRF as 1-CPU Ray tasks

``--checkpoint``: a segmenter.pt or a published DepthG / STEGO Lightning ``.ckpt`` (docs/IMPORT.md). ``--input``: a
folder (recursively), a glob pattern or any fsspec URL of either. Needs neither depth nor labels. ``--probe cluster``
(default) writes raw cluster ids unless ``--assignment eval.json`` (written by launch/evaluate.py) maps them to
classes; ``--probe linear`` writes class ids. ``{name}`` is the image's path below ``--input`` with its extension
(``sub/a.jpg`` -> ``sub/a.jpg_label.png``). Writes ``{name}_label.png`` (ids; uint8, or uint16 above 255),
``{name}_overlay.png`` (``--no-overlays``: none), with ``--probs`` the probabilities as WebDataset shards
``probs/shard-NNNNNN.tar``, a record per unit of images under ``_units/`` and ``manifest.json`` last. A rerun into
the same ``--output`` skips the images complete units hold (cluster/segmentation.py) and refuses an output made with
other settings, by an earlier version, or holding a name for another source; ``--workers 0`` (default) runs in this
process, ``N`` on N Ray actors, ``auto`` one per GPU. Each worker reads and writes ``--prefetch`` units while it
scores another.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys

import numpy as np

from depthg import inference, io, report
from depthg.config import load_config, split_cli, to_dict
from launch import run


def parse(argv):
    overrides, rest = split_cli(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--input", required=True, help="a folder of images, a glob pattern, or an fsspec URL of either")
    p.add_argument("--output", required=True, help="output folder (local or s3://)")
    p.add_argument("--batch-size", type=int, default=0, help="default: eval.batch_size")
    p.add_argument("--crf", action=argparse.BooleanOptionalAction, default=None, help="default: eval.crf")
    p.add_argument("--probe", choices=("cluster", "linear"), default="cluster")
    p.add_argument("--assignment", default="", help="eval.json whose cluster assignment maps clusters to classes")
    p.add_argument("--overlays", action=argparse.BooleanOptionalAction, default=True, help="write colour overlays")
    p.add_argument("--probs", action="store_true", help="also write probabilities as WebDataset shards")
    p.add_argument("--workers", default="0", help="0 = this process; N = N Ray actors; auto = one per GPU")
    p.add_argument("--unit-size", type=int, default=32, help="images per unit of work (and per probability shard)")
    p.add_argument("--prefetch", type=int, default=1,
                   help="units each worker reads and writes while it scores another (0: one unit at a time)")
    p.add_argument("--io-threads", type=int, default=8, help="image reads and output writes at once per unit")
    p.add_argument("--overwrite", action="store_true",
                   help="redo every image: removes the output's unit records, probability shards and manifest first")
    p.add_argument("--device", default="auto")
    args = p.parse_args(rest)
    if args.workers != "auto" and not args.workers.isdigit():
        p.error(f"--workers: expected a count or 'auto', got {args.workers!r}")
    for flag, value, least in (("--unit-size", args.unit_size, 1), ("--prefetch", args.prefetch, 0),
                               ("--io-threads", args.io_threads, 1)):
        if value < least:
            p.error(f"{flag}: expected an integer >= {least}, got {value}")
    return args, overrides


def load_model(url: str):
    """``(config dict, backbone, segmenter)`` of a checkpoint (``depthg.checkpoint.load_model``)."""
    if not io.exists(url):
        raise FileNotFoundError(f"checkpoint not found: {url}")
    from depthg.checkpoint import load_model as load

    cfg, backbone, segmenter, _ = load(url)
    return to_dict(cfg), backbone, segmenter


def read_assignment(path: str, n_clusters: int) -> np.ndarray:
    try:
        data = json.loads(io.read_bytes(path))
        head = "cluster_crf" if "cluster_crf" in data["scores"] else "cluster"
        mapping = np.asarray(data["scores"][head]["assignment"], np.int64)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        raise ValueError(f"--assignment {path}: expected an eval.json with scores.cluster.assignment ({exc})") from exc
    if mapping.shape != (n_clusters,):
        raise ValueError(f"--assignment {path}: {mapping.size} clusters, the checkpoint has {n_clusters}")
    return mapping


def settings_for(args, cfg, n_clusters: int) -> dict:
    """The job's settings (plain data for the workers), checked before any image is read."""
    mapping = read_assignment(args.assignment, n_clusters) if args.assignment else None
    mapped = args.probe == "linear" or mapping is not None
    palette = (report.dataset_style(cfg.data.dataset, cfg.model.n_classes)[1] if mapped
               else report.dataset_style("", n_clusters)[1])
    return {"checkpoint": args.checkpoint, "input": args.input, "output": args.output, "probe": args.probe,
            "crf": bool(cfg.eval.crf if args.crf is None else args.crf), "resolution": int(cfg.eval.resolution),
            "flip": bool(cfg.eval.flip), "mapping": None if mapping is None else mapping.tolist(),
            "assignment": args.assignment, "palette": palette.tolist(), "overlays": bool(args.overlays),
            "probs": bool(args.probs), "unit_size": int(args.unit_size),
            "batch_size": int(args.batch_size or cfg.eval.batch_size), "prefetch": int(args.prefetch),
            "io_threads": int(args.io_threads)}


def main(argv=None, on_unit=None) -> dict:
    """Run the job; returns its manifest (``cluster.segmentation``)."""
    from cluster import segmentation
    from cluster.evaluator import CheckpointModel

    args, overrides = parse(sys.argv[1:] if argv is None else argv)
    inputs = inference.iter_inputs(args.input, exclude=args.output)  # an output inside the input is not an input
    first = next(inputs)  # an input without images fails here, before the model loads; the listing streams on
    ckpt_cfg, backbone, segmenter = load_model(args.checkpoint)
    cfg = load_config(None, overrides, base=ckpt_cfg)
    settings = settings_for(args, cfg, segmenter.cluster_probe.n_clusters)
    preloaded = {"model": (backbone, segmenter)}

    def model_fn():  # in this process: the model already loaded; Ray actors load their own copy
        return preloaded.pop("model", None) or CheckpointModel(args.checkpoint)()

    model = model_fn if args.workers in ("0",) else CheckpointModel(args.checkpoint)
    manifest = segmentation.segment(settings, model, itertools.chain([first], inputs), args.workers,
                                    on_unit=on_unit, overwrite=args.overwrite, device=args.device)
    for s in manifest["skipped"]:
        print(f"skipped {s['source']}: {s['error']}", file=sys.stderr)
    print(f"{manifest['images']} of {manifest['inputs']} images segmented into {args.output} "
          f"({len(manifest['units'])} units, manifest {io.join(args.output, segmentation.MANIFEST)})")
    return manifest


if __name__ == "__main__":
    run(main)
