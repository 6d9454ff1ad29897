"""The main job, end to end, on one command: depth shards -> neighbours -> training -> evaluation.

    python launch/pipeline.py                                   # embedded demo: synthetic scenes, CPU
    python launch/pipeline.py --config configs/demo.yaml train.num_batches=200
    python launch/pipeline.py shards.root=s3://bucket/demo train.output=s3://bucket/runs/demo

Stages (each is also its own script):
  1. launch/generate_depth.py  synthetic scenes (or data.dataset) -> depth shards -> train shards with
                               kNN positives by reference under shards.root (local Ray actors)
  2. launch/train.py           2 DeepSpeed workers (gloo on CPU) stream the shards -> train.output/segmenter.pt
  3. launch/evaluate.py        Ray evaluation actors -> Hungarian-matched metrics + report under
                               train.output/report/ (eval.md, eval.json, confusion.png, samples.png)
The same ``--config`` and ``key=value`` overrides go to every stage. Reruns reuse complete shards; the
training stage refuses a ``train.output`` that already holds a run unless ``--resume auto`` continues it
(or ``train.output=...`` names a new folder).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from cluster import preflight
from depthg import io
from depthg.config import split_cli
from launch import evaluate, generate_depth, run, train


def parse_args(argv):
    overrides, rest = split_cli(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML config for every stage (default configs/demo.yaml)")
    parser.add_argument("--workers", type=int, default=2, help="training processes (default 2)")
    parser.add_argument("--eval-workers", type=int, default=None, help="Ray evaluation actors (default eval.num_workers)")
    parser.add_argument("--skip-data", action="store_true", help="reuse existing shards (skip stage 1)")
    parser.add_argument("--resume", default=None,
                        help="auto: continue the run already in train.output (a rerun of the same pipeline); without "
                             "it train.output must be empty")
    parser.add_argument("--quiet", action="store_true", help="no progress bars in stage 1")
    args = parser.parse_args(rest)
    args.overrides = overrides
    return args


def _stage(title: str):
    print(f"\n=== {title}", flush=True)
    return time.time()


def main(argv=None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    common = (["--config", args.config] if args.config else []) + list(args.overrides)
    resume = ["--resume", args.resume] if args.resume else []
    train_args = train.parse_args(common + resume)
    cfg = train.resolve_config(train_args)
    # a used train.output, or a local one for workers on a Ray cluster, is refused now, not after stage 1's minutes
    preflight.check_output(cfg, shared=train.output_shared(train_args))
    timings = {}

    if not args.skip_data:
        t = _stage(f"1/3 depth shards + neighbour mining -> {cfg.shards.root}")
        generate_depth.main(common + (["--quiet"] if args.quiet else []))
        timings["data_s"] = round(time.time() - t, 1)

    t = _stage(f"2/3 training with {args.workers} workers -> {cfg.train.output}")
    train.main(common + ["--gpus-per-node", str(args.workers)] + resume)
    timings["train_s"] = round(time.time() - t, 1)

    t = _stage("3/3 evaluation")
    checkpoint = io.join(cfg.train.output, "segmenter.pt")
    eval_argv = ["--checkpoint", checkpoint, "--output", io.join(cfg.train.output, "report")] + common
    if args.eval_workers is not None:
        eval_argv += ["--workers", str(args.eval_workers)]
    result = evaluate.main(eval_argv)
    timings["eval_s"] = round(time.time() - t, 1)

    print(f"\npipeline done in {sum(timings.values()):.0f} s ({timings}); report: {result['paths']['eval.md']}")
    return {**result, "timings": timings}


if __name__ == "__main__":
    run(main)
