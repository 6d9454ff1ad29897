"""Reproduction sweep on this machine: ``launch/reproduce.py`` end to end, timed, its table kept.

    python launch/benchmark.py reproduce [--configs demo] [--seeds 3] [--output runs/reproduce-demo] [key=value ...]

Runs the sweep exactly as a user would (local Ray, CPU trials, ``--gpus-per-trial 0``; the demo's shards from
``python launch/pipeline.py`` or ``python launch/generate_depth.py``) into a new ``--output`` and writes its wall
time, the 1-minute load average at the start and every 15 s during the run, the trials' own train / eval seconds and the table
(``reproduce.json``) to ``bench/reproduce.json``. docs/REPRODUCE.md quotes it.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
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
    samples, stop = [], threading.Event()

    def sample():  # the 1-minute load average every 15 s while the sweep runs (other jobs share the machine)
        while not stop.wait(15):
            samples.append(round(os.getloadavg()[0], 2))

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    start = time.perf_counter()
    try:
        table = reproduce.main(argv)
    finally:
        stop.set()
    seconds = time.perf_counter() - start
    trials = [t for r in table["rows"] for t in r["trials"]]
    per_trial = {k: [t["seconds"][k] for t in trials if k in t.get("seconds", {})] for k in ("train_s", "eval_s")}
    load = {"start": load_start, "mean": round(sum(samples) / len(samples), 2) if samples else None,
            "max": max(samples, default=None), "samples_every_15s": samples}
    print(f"{len(trials)} trials in {seconds:.0f} s (1-min load: {load_start[0]} at the start, mean {load['mean']}, "
          f"max {load['max']})")
    for r in table["rows"]:
        crf = r["heads"].get("cluster_crf", {})
        print(f"  {r['label']:30s} cluster + CRF mIoU {crf.get('miou', {}).get('mean', float('nan')):.1f} "
              f"+- {crf.get('miou', {}).get('std') or 0:.1f} over {r['done']} seeds")
    return {"command": "python launch/reproduce.py " + " ".join(argv), "seconds": round(seconds, 1),
            "load_avg": load, "trial_seconds": per_trial, "table": json.loads(json.dumps(table))}
