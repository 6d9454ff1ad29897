"""Scale: time and peak RSS of every place that grows with the number of crops N, the growth fitted.

    python launch/benchmark.py scale [--sizes 10000,100000,1000000] [--plan-sizes 10000000,50000000]
                                     [--places NAME,...] [--no-extras]

Each *place* (``PLACES``) is one process's share of one stage at N crops, run through the project's own
functions on synthetic inputs: a ``setup(n)`` builds the inputs that process would receive (sidecars, per-shard
counts, ...), and the zero-argument function it returns is the measured work. Every (place, N) runs in a
fresh subprocess (``python -m bench.scale --child NAME N``), so one measurement never inherits another's
memory: the child resets its peak RSS after the setup (``/proc/self/clear_refs``, Linux) and reports the wall
time of the work, the RSS it started from and the peak during the work (``peak_rss_mb``; ``delta_mb`` = peak -
start, what the work itself added). Places marked ``plan`` need no data and also run at ``--plan-sizes``.

Per place the growth exponents of time and of the added memory are fitted (least squares of log y on log N
over the measured sizes of at least ``FIT_MIN_N``) and extrapolated to ``AT`` crops (50M: 10M images five-
cropped): marked as extrapolations. ``EXTRAS`` are measurements that span several processes (kNN over 1 vs 2
mining actors, storage bytes per simulated node): each returns its own dict. ``TARGETS`` are checked on the
result and printed met / not met; never asserted in tests.

A place's setup and work live next to the code they measure (``bench/scale_*.py``); this module only runs,
fits and reports.
"""
from __future__ import annotations

import dataclasses
import gc
import importlib
import json
import math
import os
import subprocess
import sys
import time

AT = 50_000_000  # crops: 10M images x 5 crops
FIT_MIN_N = 10_000
DEFAULT_SIZES = (10_000, 100_000, 1_000_000)
DEFAULT_PLAN_SIZES = (10_000_000, 50_000_000)


@dataclasses.dataclass(frozen=True)
class Place:
    """``target``: ``module:function``; ``function(n)`` does the setup and returns the zero-argument work, which
    may return a dict of extra figures (bytes, counts). ``plan``: needs no data (run at the plan sizes too).
    ``driver``: the process is a driver (the 300 MB target applies). ``quadratic_ok``: N^2 work by design (kNN
    compute), exempt from the linear-growth target. ``sizes``: the place's own sizes instead of ``--sizes`` (the kNN
    runs at whole production blocks only; beyond them its fit extrapolates). ``memory_model``: ``module:function``,
    ``function(n)`` -> MB the work adds at ``n`` by design; when set, the 50M memory comes from it, not from the fit
    (a fixed working block plus a linear term is not a power law over a few small sizes)."""

    name: str
    target: str
    what: str
    plan: bool = False
    driver: bool = False
    quadratic_ok: bool = False
    sizes: tuple = ()
    memory_model: str = ""


PLACES: dict[str, Place] = {p.name: p for p in [
    Place("offsets_table", "bench.scale_stage2:offsets_table",
          "depthg.shards.OffsetsTable.from_sidecars + to_bytes on the driver (one sidecar per 320 crops)",
          plan=True, driver=True),
    Place("depth_driver", "bench.scale_drivers:depth_driver",
          "stage-1 driver: source listed once into listing.jsonl, units planned, a summary per unit reduced, "
          "manifest (synthetic source)", plan=True, driver=True),
    Place("depth_rerun", "bench.scale_drivers:depth_rerun",
          "stage-1 driver on a complete split: folder listed once, every sidecar read on 16 threads and reduced",
          driver=True),
    Place("folder_listing", "bench.scale_drivers:folder_listing",
          "stage-1 driver listing a real folder source (N = images, one flat folder of empty .jpg files) into "
          "listing.jsonl: names sorted in bounded memory (sorted runs spilled, merged), ids checked", driver=True),
    Place("depth_actor_share", "bench.scale_drivers:depth_actor_share",
          "one depth actor of 16: its units' byte ranges of the listing read, each unit's source share built"),
    Place("eval_driver", "bench.scale_drivers:eval_driver",
          "evaluation driver (N = images): per-shard results (5 heads, 27 classes, 8 samples) and k-means codes "
          "reduced as they arrive", driver=True),
    Place("segment_rerun", "bench.scale_segment:segment_rerun",
          "cluster.segmentation.prepare on a rerun (N = images; every other unit of 32 recorded): records read on "
          "16 threads and reduced, listing streamed past the done-set, units left spooled", driver=True),
    Place("segment_plan", "bench.scale_segment:segment_plan",
          "cluster.segmentation.prepare on a first run (N = images, nothing recorded): the listing streamed into "
          "units of 32 and spooled", plan=True, driver=True),
    Place("segment_walk", "bench.scale_segment:segment_walk",
          "bucket segmentation driver listing a local folder (N = images, one flat folder of empty files): "
          "inference.iter_inputs, the sorted walk in bounded memory (the process holds torch: depthg.inference "
          "imports it, as launch/segment.py's driver loads the model; +MB is the walk's own)"),
    Place("driver_plan", "bench.scale_stage2:driver_plan",
          "cluster.mining's driver plan: units from the depth counts, unit calls, neighbours calls", plan=True, driver=True),
    Place("unit_reads", "bench.scale_stage2:unit_reads",
          "a mining actor's unit: deal + its 16 depth shards streamed once (no index of the split)"),
    Place("loader_rows", "bench.scale_stage2:loader_rows",
          "a loader worker: rows of 2,000 random 32-sample segments read from row files (no table of the split)"),
    Place("knn_actor", "bench.scale_stage2:knn_actor",
          "one of 16 mining actors' exact top-k: N/16 queries x N keys in the production blocks (4096 x 32768), "
          "C=384, fp32, 1 thread", quadratic_ok=True, sizes=(65_536, 131_072, 262_144),
          memory_model="bench.scale_stage2:knn_actor_memory_mb"),
]}

EXTRAS: dict[str, str] = {  # name -> "module:function"; function(args) -> dict
    "segment_records_s3": "bench.scale_segment:records_s3",
    "knn_actors": "bench.scale_stage2:knn_actors",
    "stage1_bytes_per_cluster": "bench.scale_stage2:stage1_bytes_per_cluster",
}

TARGETS = {
    "driver_peak_rss_mb_at_1M": 300,
    "offsets_table_seconds_at_10M": 5.0,
    "knn_speedup_2_vs_1_actors": 1.7,
    "max_time_exponent": 1.15,  # "no place superlinear in N per process" (kNN compute excepted), with noise
}


def add_arguments(parser) -> None:
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="N (crops) for every place")
    parser.add_argument("--plan-sizes", default=",".join(map(str, DEFAULT_PLAN_SIZES)),
                        help="further N for the places that need no data (plan-only)")
    parser.add_argument("--places", default="", help="comma-separated subset of: " + ", ".join(PLACES))
    parser.add_argument("--no-extras", action="store_true", help="skip the multi-process measurements")
    parser.add_argument("--update", action="store_true",
                        help="with --places: replace only those places in the existing --out file (the other places "
                             "and the extras keep their rows; the targets are checked again on the whole)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per (place, N) before it is abandoned")


def _load(target: str):
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


# ----------------------------------------------------------------------------- the child: one place at one N
def _status(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process in MB (Linux)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def measure(name: str, n: int) -> dict:
    """Run place ``name`` at ``n`` in this process: setup, then the timed work with its peak RSS."""
    work = _load(PLACES[name].target)(n)
    gc.collect()
    start_rss = _status("VmRSS")
    reset = _reset_peak()
    t0 = time.perf_counter()
    extra = work() or {}
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM")
    return {"n": n, "seconds": round(seconds, 4), "start_rss_mb": round(start_rss, 1), "peak_rss_mb": round(peak, 1),
            "delta_mb": round(max(peak - start_rss, 0.0), 1), "peak_reset": reset, **extra}


def run_child(name: str, n: int, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "bench.scale", "--child", name, str(n)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"n": n, "error": f"over {timeout:g} s"}
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return {"n": n, "error": f"exit {proc.returncode}: {tail[0][:300]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- fitting
def fit_exponent(ns: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log y on log n (None with fewer than two usable points)."""
    pts = [(math.log(n), math.log(y)) for n, y in zip(ns, ys) if n >= FIT_MIN_N and y and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx else None


def extrapolate(n: float, y: float, exponent: float | None, to: float = AT) -> float | None:
    return None if exponent is None or not y else y * (to / n) ** exponent


def summarise(place: Place, rows: list[dict]) -> dict:
    ok = [r for r in rows if "error" not in r]
    out: dict = {"what": place.what, "plan": place.plan, "driver": place.driver, "rows": rows}
    if not ok:
        return out
    ns = [r["n"] for r in ok]
    t_exp = fit_exponent(ns, [r["seconds"] for r in ok])
    m_exp = fit_exponent(ns, [r["delta_mb"] for r in ok])
    last = ok[-1]
    out["fit"] = {"time_exponent": None if t_exp is None else round(t_exp, 3),
                  "memory_exponent": None if m_exp is None else round(m_exp, 3)}
    if last["n"] >= AT:
        out["at_50M"] = {"seconds": last["seconds"], "delta_mb": last["delta_mb"], "measured": True}
    else:
        s, m = extrapolate(last["n"], last["seconds"], t_exp), extrapolate(last["n"], last["delta_mb"], m_exp)
        out["at_50M"] = {"seconds": None if s is None else round(s, 1), "delta_mb": None if m is None else round(m, 1),
                         "measured": False, "from_n": last["n"]}
        if place.memory_model:
            model = _load(place.memory_model)
            out["at_50M"].update(delta_mb=round(model(AT), 1), delta_mb_from="memory_model",
                                 memory_model=(model.__doc__ or "").strip().splitlines()[0])
            out["memory_model_at_measured"] = {str(r["n"]): round(model(r["n"]), 1) for r in ok}
    return out


def check_targets(result: dict) -> dict:
    places, extras, checks = result["places"], result.get("extras", {}), {}
    for name, p in places.items():
        if p.get("driver"):
            at1m = [r for r in p["rows"] if r.get("n") == 1_000_000 and "error" not in r]
            if at1m:
                checks[f"{name}: driver peak RSS at 1M <= {TARGETS['driver_peak_rss_mb_at_1M']} MB"] = \
                    at1m[0]["peak_rss_mb"] <= TARGETS["driver_peak_rss_mb_at_1M"]
        t_exp = (p.get("fit") or {}).get("time_exponent")
        if t_exp is not None and not PLACES[name].quadratic_ok:
            checks[f"{name}: time exponent <= {TARGETS['max_time_exponent']}"] = t_exp <= TARGETS["max_time_exponent"]
    table = [r for r in (places.get("offsets_table") or {}).get("rows", []) if r.get("n") == 10_000_000 and "error" not in r]
    if table:
        checks["offsets table at 10M <= 5 s"] = table[0]["seconds"] <= TARGETS["offsets_table_seconds_at_10M"]
    speedup = (extras.get("knn_actors") or {}).get("speedup")
    if speedup is not None:
        checks["kNN 2 actors / 1 >= 1.7x"] = speedup >= TARGETS["knn_speedup_2_vs_1_actors"]
    return checks


def _fmt(x, unit="") -> str:
    if x is None:
        return "-"
    return f"{x:.3g}{unit}" if isinstance(x, float) else f"{x}{unit}"


def run(args) -> dict:
    sizes = [int(s) for s in args.sizes.split(",") if s]
    plan_sizes = [int(s) for s in args.plan_sizes.split(",") if s]
    chosen = [p for p in args.places.split(",") if p] or list(PLACES)
    unknown = [p for p in chosen if p not in PLACES]
    if unknown:
        raise SystemExit(f"error: --places: unknown {', '.join(unknown)}; expected some of {', '.join(PLACES)}")
    previous = None
    if args.update:
        if not args.places:
            raise SystemExit("error: --update needs --places NAME,...: the places to measure again")
        try:
            with open(args.out) as fh:
                previous = json.load(fh)
        except FileNotFoundError:
            raise SystemExit(f"error: --update: {args.out} does not exist; run without --update first") from None
    result: dict = {"at": AT, "sizes": sizes, "plan_sizes": plan_sizes, "places": {}, "extras": {}}
    for name in chosen:
        place = PLACES[name]
        rows, load_before = [], round(os.getloadavg()[0], 2)  # what else ran on the machine, per place
        for n in list(place.sizes) or sizes + (plan_sizes if place.plan else []):
            row = run_child(name, n, args.timeout)
            rows.append(row)
            print(f"  {name} N={n}: " + (row["error"] if "error" in row else
                  f"{row['seconds']:.3f} s, peak {row['peak_rss_mb']:.0f} MB (+{row['delta_mb']:.0f})"), flush=True)
        result["places"][name] = summarise(place, rows)
        result["places"][name]["load_avg_1min_before"] = load_before
    if not args.no_extras and not args.places:
        for name, target in EXTRAS.items():
            print(f"  extra {name} ...", flush=True)
            result["extras"][name] = _load(target)(args)
    if previous is not None:
        updated = sorted({*previous.get("updated_places", []), *chosen})
        result = {**previous, "places": {**previous["places"], **result["places"]}, "updated_places": updated}
    result["targets"] = check_targets(result)

    print(f"\n{'place':<28} {'N':>10} {'s':>9} {'peak MB':>9} {'+MB':>8}   fit t / mem   ~at 50M crops")
    for name, p in result["places"].items():
        fit, at = p.get("fit") or {}, p.get("at_50M") or {}
        for i, r in enumerate(p["rows"]):
            tail = ""
            if i == len(p["rows"]) - 1:
                tail = (f"   N^{_fmt(fit.get('time_exponent'))} / N^{_fmt(fit.get('memory_exponent'))}   "
                        f"{'' if at.get('measured') else '~'}{_fmt(at.get('seconds'), ' s')}, "
                        f"{'' if at.get('measured') else '~'}{_fmt(at.get('delta_mb'), ' MB')}")
            if "error" in r:
                print(f"{name if i == 0 else '':<28} {r['n']:>10} {r['error']}")
                continue
            print(f"{name if i == 0 else '':<28} {r['n']:>10} {r['seconds']:>9.3f} {r['peak_rss_mb']:>9.0f} "
                  f"{r['delta_mb']:>8.0f}{tail}")
    for name, extra in result["extras"].items():
        print(f"{name}: {json.dumps(extra)[:400]}")
    for check, met in result["targets"].items():
        print(f"  {'met    ' if met else 'NOT MET'}  {check}")
    return result


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(measure(sys.argv[2], int(sys.argv[3]))))
    else:
        raise SystemExit("usage: python launch/benchmark.py scale ... (python -m bench.scale --child NAME N runs one)")
