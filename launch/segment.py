"""Segment your own images with a trained checkpoint: a label PNG and a colour overlay per image.

    python launch/segment.py --checkpoint runs/demo/segmenter.pt --input photos/ --output out/
    python launch/segment.py --checkpoint s3://bucket/run/segmenter.pt --input "photos/*.jpg" --output out/ \\
        --crf --assignment runs/demo/eval.json

Needs neither depth nor labels. ``--probe cluster`` (default) writes raw cluster ids unless
``--assignment eval.json`` (written by launch/evaluate.py) maps them to classes; ``--probe linear``
writes class ids. Writes ``{name}_label.png`` (ids; uint8, or uint16 above 255) and
``{name}_overlay.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from PIL import Image
from tqdm import tqdm

from depthg import inference, io, report
from depthg.config import load_config, split_cli, to_dict
from depthg.device import resolve_device
from launch import run


def parse(argv):
    overrides, rest = split_cli(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--input", required=True, help="a folder of images or a glob pattern")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--batch-size", type=int, default=0, help="default: eval.batch_size")
    p.add_argument("--crf", action=argparse.BooleanOptionalAction, default=None, help="default: eval.crf")
    p.add_argument("--probe", choices=("cluster", "linear"), default="cluster")
    p.add_argument("--assignment", default="", help="eval.json whose cluster assignment maps clusters to classes")
    p.add_argument("--device", default="auto")
    return p.parse_args(rest), overrides


def load_model(url: str):
    if not io.exists(url):
        raise FileNotFoundError(f"checkpoint not found: {url}")
    from depthg.checkpoint import load_segmenter
    from depthg.models import build_backbone

    cfg, segmenter, _ = load_segmenter(url)
    return to_dict(cfg), build_backbone(cfg.model.backbone, cfg.model.weights), segmenter


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


def output_names(files: list[str]) -> list[str]:
    stems = [os.path.splitext(os.path.basename(f))[0] for f in files]
    if len(set(stems)) != len(stems):  # e.g. a.png and a.jpg, or a glob over several folders
        return [f"{i:05d}_{s}" for i, s in enumerate(stems)]
    return stems


def main(argv=None) -> list[str]:
    args, overrides = parse(sys.argv[1:] if argv is None else argv)
    files = inference.list_images(args.input)  # fail before loading the model
    ckpt_cfg, backbone, segmenter = load_model(args.checkpoint)
    cfg = load_config(None, overrides, base=ckpt_cfg)
    device = resolve_device(args.device)
    backbone, segmenter = backbone.to(device).eval(), segmenter.to(device).eval()
    crf = cfg.eval.crf if args.crf is None else args.crf
    batch = args.batch_size or cfg.eval.batch_size
    n_clusters = segmenter.cluster_probe.n_clusters
    mapping = read_assignment(args.assignment, n_clusters) if args.assignment else None
    mapped = args.probe == "linear" or mapping is not None
    palette = (report.dataset_style(cfg.data.dataset, cfg.model.n_classes)[1] if mapped
               else report.dataset_style("", n_clusters)[1])
    os.makedirs(args.output, exist_ok=True)
    written = []
    names = output_names(files)
    with tqdm(total=len(files), desc="segment", unit="img") as bar:
        for start in range(0, len(files), batch):
            chunk = files[start: start + batch]
            images = [inference.read_image(f) for f in chunk]
            labels = inference.segment_images(backbone, segmenter, images, cfg.eval.resolution, args.probe,
                                               cfg.eval.flip, crf, device)
            for name, image, label in zip(names[start: start + batch], images, labels):
                if args.probe == "cluster" and mapping is not None:
                    label = mapping[label]
                written += write_outputs(args.output, name, image, label, palette)
            bar.update(len(chunk))
    print(f"wrote {len(written)} files to {args.output}")
    return written


def write_outputs(folder: str, name: str, image: np.ndarray, label: np.ndarray, palette: np.ndarray) -> list[str]:
    label_path = os.path.join(folder, f"{name}_label.png")
    overlay_path = os.path.join(folder, f"{name}_overlay.png")
    dtype = np.uint8 if label.max(initial=0) < 256 else np.uint16
    Image.fromarray(label.astype(dtype)).save(label_path)
    Image.fromarray(inference.overlay(image, report.colorize(label, palette))).save(overlay_path)
    return [label_path, overlay_path]


if __name__ == "__main__":
    run(main)
