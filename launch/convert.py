"""Convert a published DepthG / STEGO model (a PyTorch Lightning ``.ckpt``) into this project's ``segmenter.pt``.

    python launch/convert.py cocostuff_vits.ckpt runs/depthg_coco_vits8/segmenter.pt
    python launch/convert.py s3://bucket/models/cityscapes_vitb.ckpt s3://bucket/models/cityscapes_vitb8.pt

The file is read safely (``weights_only=True`` with inert stand-ins for the omegaconf classes of its
hyper-parameters; docs/IMPORT.md). ``OUT`` holds the head, both probes (and the LHP projection), the config
(backbone and dims from the checkpoint's own config, evaluation as the reference's: 320 px, flip, CRF, DINO's
position-table interpolation) and the DINO backbone's weights the checkpoint carries, so ``launch/evaluate.py``
and ``launch/segment.py`` need no download. ``OUT`` is never overwritten unless ``--force``.
"""
from __future__ import annotations

import argparse
import sys

from depthg import io
from depthg.checkpoint import convert_checkpoint
from launch import run


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="the reference's Lightning checkpoint (.ckpt), local or s3://")
    p.add_argument("output", help="the segmenter.pt to write, local or s3://")
    p.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(sys.argv[1:] if argv is None else argv)
    if not io.exists(args.input):
        raise FileNotFoundError(f"checkpoint not found: {args.input}")
    if io.exists(args.output) and not args.force:
        raise io.StorageError(f"{args.output} exists; pass --force to overwrite it")
    info = convert_checkpoint(args.input, args.output)
    print(f"{info['reference']} model '{info.get('experiment_name')}' ({info.get('dataset_name')}, step "
          f"{info.get('global_step')}): {info['backbone']}, code dim {info['code_dim']}, {info['n_classes']} classes "
          f"+ {info['extra_clusters']} extra clusters{', LHP projection' if info['lhp'] else ''}; chosen by "
          f"{info['selection']}")
    print(f"wrote {args.output}")
    return info


if __name__ == "__main__":
    run(main)
