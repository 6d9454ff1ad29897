"""Reproduction sweep on this machine: ``launch/reproduce.py`` end to end, timed, its table kept; then a trial's
evaluation with its dense CRF on 1 CPU (in the trial's process) and on 2 (1-CPU Ray tasks in its placement group).

    python launch/benchmark.py reproduce [--configs demo] [--seeds 3] [--output runs/reproduce-demo] [key=value ...]
        [--eval-rounds 1]

Runs the sweep exactly as a user would (local Ray, CPU trials, ``--gpus-per-trial 0``; the demo's shards from
``python launch/pipeline.py`` or ``python launch/generate_depth.py``) into a new ``--output`` and writes its wall
time, the 1-minute load average at the start and every 15 s during the run, the trials' own train / eval seconds and
the table (``reproduce.json``, paths relative to the repository and to ``--output``) to ``bench/reproduce.json``.
Then ``trial_eval``: the first trial's ``segmenter.pt`` evaluated by ``cluster.reproduce.evaluate_trial`` (what
``run_trial`` calls) in a placement group made by ``cluster.reproduce.trial_bundles``, as Tune makes a trial's,
for ``{CPU: 1}`` (CRF in the process) and ``{CPU: 2}`` (CRF as Ray tasks on the second CPU), in the order 1, 2, 2,
1 per round (``--eval-rounds``) so that a drifting load affects both alike; the load is sampled around each run.
docs/REPRODUCE.md and cluster/README.md section 8 quote it.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import threading
import time


def add_arguments(parser) -> None:
    parser.add_argument("--configs", nargs="+", default=["demo"])
    parser.add_argument("--seeds", default="3")
    parser.add_argument("--output", default="runs/reproduce-demo", help="the sweep's folder (replaced)")
    parser.add_argument("--keep", action="store_true", help="resume the sweep in --output instead of replacing it")
    parser.add_argument("--ablation", action="store_true")
    parser.add_argument("--eval-rounds", type=int, default=1,
                        help="rounds of the trial-evaluation comparison (each: 1 CPU, 2, 2, 1); 0 = skip it")
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
    out = {"command": "python launch/reproduce.py " + " ".join(argv), "seconds": round(seconds, 1),
           "load_avg": load, "trial_seconds": per_trial, "table": table}
    if args.eval_rounds > 0:
        out["trial_eval"] = trial_eval(args.output, args.eval_rounds)
    return out


def _timed_evaluation(trial: dict, checkpoint: str, resources: dict) -> dict:
    """In a trial's placement group (head bundle): ``evaluate_trial`` timed, its report into the trial's folder."""
    from cluster import reproduce
    from launch import evaluate

    start = time.perf_counter()
    meta = reproduce.evaluate_trial(reproduce.Trial(**trial), checkpoint, resources, evaluate.main)["meta"]
    return {"seconds": time.perf_counter() - start, "crf runs on": meta.get("crf runs on")}


def trial_eval(output: str, rounds: int) -> dict:
    """The first trial's evaluation with its CRF on 1 and on 2 CPUs (see the module docstring)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from cluster import reproduce

    stored = reproduce.read_sweep(output)
    plan = reproduce.plan_sweep(reproduce.Request(**stored["request"]), output)
    first = plan.trials[0]
    checkpoint = os.path.join(first.folder, "segmenter.pt")
    rows = []
    with tempfile.TemporaryDirectory(prefix="reproduce-eval-") as tmp:
        for cpus in [1, 2, 2, 1] * rounds:
            resources = {"CPU": float(cpus)}
            bundles = reproduce.trial_bundles(resources)
            pg = placement_group(bundles, strategy="STRICT_PACK")
            ray.get(pg.ready())
            trial = dataclasses.asdict(dataclasses.replace(first, folder=os.path.join(tmp, f"run{len(rows)}")))
            fn = ray.remote(_timed_evaluation).options(
                num_cpus=bundles[0]["CPU"], scheduling_strategy=PlacementGroupSchedulingStrategy(
                    pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True))
            load_before = round(os.getloadavg()[0], 2)
            result = ray.get(fn.remote(trial, checkpoint, resources))
            remove_placement_group(pg)
            rows.append({"trial_cpus": cpus, "crf_cpus": reproduce.crf_cpus(resources), **result,
                         "seconds": round(result["seconds"], 1), "load_avg_1min_before": load_before,
                         "load_avg_1min_after": round(os.getloadavg()[0], 2)})
            print(f"  evaluation of {first.id} with {cpus} CPU(s), CRF on {result['crf runs on']}: "
                  f"{result['seconds']:.1f} s (1-min load {load_before} -> {rows[-1]['load_avg_1min_after']})")
    mean = {c: sum(r["seconds"] for r in rows if r["trial_cpus"] == c) / sum(r["trial_cpus"] == c for r in rows)
            for c in (1, 2)}
    speedup = mean[1] / mean[2]
    print(f"trial evaluation, CRF on 2 CPUs vs 1: {speedup:.2f}x ({mean[1]:.1f} s -> {mean[2]:.1f} s)")
    return {"trial": first.id, "checkpoint": reproduce.shown(checkpoint, reproduce.REPO), "rows": rows,
            "mean_seconds": {f"{c}_cpu": round(v, 1) for c, v in mean.items()}, "speedup_2_vs_1": round(speedup, 2),
            "note": "the whole evaluation (model load, forward passes, CRF, report) of one trial; with 2 CPUs it includes "
                    "starting the CRF tasks' Ray worker in the new placement group, as a trial does once; 2 cores "
                    "shared with other jobs"}
