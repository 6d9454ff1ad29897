"""Reproduction sweep on this machine: ``launch/reproduce.py`` end to end, timed, its table kept.

    python launch/benchmark.py reproduce [--configs demo] [--seeds 3] [--output runs/reproduce-demo] [key=value ...]

Runs the sweep exactly as a user would (local Ray, CPU trials, ``--gpus-per-trial 0``; the demo's shards from
``python launch/pipeline.py`` or ``python launch/generate_depth.py``) into a new ``--output`` and writes its wall
time, the load average at the start and the end, the trials' own train / eval seconds and the table
(``reproduce.json``) to ``bench/reproduce.json``. docs/REPRODUCE.md quotes it.
"""
from __future__ import annotations

import json
import os
import shutil
import time


def add_arguments(parser) -> None:
    parser.add_argument("--configs", nargs="+", default=["demo"])
    parser.add_argument("--seeds", default="3")
    parser.add_argument("--output", default="runs/reproduce-demo", help="the sweep's folder (replaced)")
    parser.add_argument("--keep", action="store_true", help="resume the sweep in --output instead of replacing it")
    parser.add_argument("--ablation", action="store_true")
    parser.add_argument("overrides", nargs="*", default=[], help="key=value overrides for every trial")


def run(args) -> dict:
    from launch import reproduce

    if os.path.isdir(args.output) and not args.keep:
        shutil.rmtree(args.output)
    argv = ["--configs", *args.configs, "--seeds", str(args.seeds), "--gpus-per-trial", "0", "--output", args.output,
            *(["--ablation"] if args.ablation else []), *(["--resume"] if args.keep else []), *args.overrides]
    load_start = [round(x, 2) for x in os.getloadavg()]
    start = time.perf_counter()
    table = reproduce.main(argv)
    seconds = time.perf_counter() - start
    trials = [t for r in table["rows"] for t in r["trials"]]
    per_trial = {k: [t["seconds"][k] for t in trials if k in t.get("seconds", {})] for k in ("train_s", "eval_s")}
    print(f"{len(trials)} trials in {seconds:.0f} s (load {load_start} at the start)")
    for r in table["rows"]:
        crf = r["heads"].get("cluster_crf", {})
        print(f"  {r['label']:30s} cluster + CRF mIoU {crf.get('miou', {}).get('mean', float('nan')):.1f} "
              f"+- {crf.get('miou', {}).get('std') or 0:.1f} over {r['done']} seeds")
    return {"command": "python launch/reproduce.py " + " ".join(argv), "seconds": round(seconds, 1),
            "load_avg_start": load_start, "trial_seconds": per_trial, "table": json.loads(json.dumps(table))}
