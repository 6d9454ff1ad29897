"""Scale places of stage 2 (``bench/scale.py`` runs, fits and reports them): each ``place(n)`` builds the inputs
one process receives at ``n`` crops and returns the zero-argument work that is measured.

* ``offsets_table``: the driver's offsets table from every sidecar (``OffsetsTable.from_sidecars`` + ``to_bytes``).
* ``driver_plan``: the stage-2 driver's plan (``plan_units``, the unit calls, the neighbours calls): no data.
* ``unit_reads``: one mining actor's unit: ``deal`` and streaming its 16 depth shards (tiny samples), the
  members it holds; the same at any N (no index of the split).
* ``loader_rows``: a loader worker's lookups: 2,000 random segments' rows read from row files (what carries the
  positives' ranges), the worker's memory for the split's tables.
* ``knn_actor``: one of 16 mining actors' exact top-k (N/16 query rows x N keys, C = 384, float32, 1 thread);
  N^2/P by design; measured up to 100k crops (1M would take ~25 min per run here). Its memory is the fixed
  block's (4096 x 32768), the same at any N from 32k keys on: the fitted memory growth does not extrapolate.

Extras (several processes, each run in its own subprocess so Ray starts clean): ``knn_actors`` (the neighbours
phase of ``cluster.mining`` on 1 vs 2 CPU actors of one torch thread each, the same N: seconds, speedup,
identical row files; the speedup from the actors' own CPU seconds too, which other jobs on a shared machine
do not change; and the recall@k of float16 key storage against float32) and ``stage1_bytes_per_cluster``
(``bench.mining_io``'s simulated 2-node mining run: depth-shard bytes read summed over the nodes / their size).
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from cluster.mining import MiningWorker

PER_SHARD = 320  # crops per shard (64 images x 5 crops, as stage 1 writes COCO)
DIM = 384  # ViT-S/8 features


def synthetic_sidecars(n: int, per_shard: int = PER_SHARD, seed: int = 0) -> list[dict]:
    """Sidecars of ``n`` crops in shards of ``per_shard``: offsets of samples of ~30 kB, as JSON would load them."""
    rng = np.random.default_rng(seed)
    infos = []
    for index, start in enumerate(range(0, n, per_shard)):
        count = min(per_shard, n - start)
        sizes = rng.integers(20_000, 40_000, count)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        infos.append({"name": f"shard-{index:06d}.tar", "count": count, "offsets": offsets.tolist(),
                      "prefix": (offsets[:-1] + sizes // 2).tolist()})
    return infos


def _tmp() -> str:
    path = tempfile.mkdtemp(prefix="depthg-scale-")
    atexit.register(shutil.rmtree, path, True)
    return path


def offsets_table(n: int):
    """The driver builds the split's offsets table from every sidecar and serialises it (``write_index``)."""
    from depthg.shards import OffsetsTable

    infos = synthetic_sidecars(n)

    def work() -> dict:
        data = OffsetsTable.from_sidecars(infos).to_bytes()
        return {"table_bytes": len(data)}

    return work


def driver_plan(n: int):
    """What ``cluster.mining.mine_neighbors`` builds on the driver before and between its phases: the units from
    the depth manifest's counts, the unit calls (URLs, unit fields, settings), the neighbours calls."""
    import dataclasses

    from cluster.mining import feature_name, knn_calls
    from depthg import shards

    counts = [PER_SHARD] * (n // PER_SHARD) + ([n % PER_SHARD] if n % PER_SHARD else [])
    urls = [f"s3://bucket/coco/depth/train/{shards.shard_name(i)}" for i in range(len(counts))]

    def work() -> dict:
        units = shards.plan_units(counts)
        calls = [(dataclasses.asdict(u), [urls[d] for d in u.depth], "s3://bucket/coco/train",
                  f"s3://bucket/coco/features/x/{feature_name(u.index)}", {"layout": shards.LAYOUT}) for u in units]
        first = np.concatenate([[0], np.cumsum([c for u in units for c in u.counts])])
        knn = knn_calls(first)
        return {"shards": len(counts), "units": len(units), "unit_calls": len(calls), "knn_calls": len(knn)}

    return work


def unit_reads(n: int):
    """One unit of a split of ``n`` crops on its actor: ``deal`` and every member of its depth shards read once
    (16 shards of 320 tiny samples, local files; the actor's memory for the unit, not the samples' decoding)."""
    from depthg import shards

    root = _tmp()
    counts = [PER_SHARD] * max(n // PER_SHARD, 1)
    unit = shards.plan_units(counts)[0]
    rng = np.random.default_rng(0)
    image, depth = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), np.zeros((8, 8), np.float32)
    sample = shards.encode_sample("s", image, depth)
    urls = []
    for j in range(len(unit.depth)):
        infos = shards.put_shard(root, shards.shard_name(j), [{**sample, "__key__": f"d{j}-{i}"} for i in range(PER_SHARD)])
        urls.append(os.path.join(root, infos["name"]))
    for _ in shards.iter_shard(urls[0]):  # imports and first-use costs before the measurement
        pass

    def work() -> dict:
        parts = shards.deal(unit)
        held = [(raw["__key__"], raw["rgb.png"], raw["depth.png"]) for url in urls for raw in shards.iter_shard(url)]
        return {"unit_shards": len(unit.depth), "unit_samples": len(held), "dealt": int(sum(len(p) for p in parts))}

    return work


def loader_rows(n: int):
    """A loader worker at ``n`` crops: the rows of 2,000 random segments of 32 samples read from the shards' row
    files (one exact range each) and their positives' ranges gathered: all a worker keeps of the split."""
    from depthg import shards

    root = _tmp()
    infos = synthetic_sidecars(n)
    table = shards.OffsetsTable.from_sidecars(infos)
    rng = np.random.default_rng(1)
    positives = rng.integers(0, n, (n, 7))
    for s, info in enumerate(infos):
        shards.write_rows(root, info["name"], shards.build_rows(table, s, positives[table.first[s]:table.first[s + 1]]))
    urls = [os.path.join(root, shards.rows_name(info["name"])) for info in infos]
    counts = [info["count"] for info in infos]
    del table, positives, infos
    segs = [(int(s), int(rng.integers(0, max(counts[s] - 32, 1)))) for s in rng.integers(0, len(urls), 2000)]
    shards.read_rows(urls[0], 0, 1, 7)  # first-use costs before the measurement

    def work() -> dict:
        ranges = 0
        for s, a in segs:
            rows = shards.read_rows(urls[s], a, min(a + 32, counts[s]), 7)
            ranges += int((rows["pos_end"] > rows["pos_start"]).sum())
        return {"segments": len(segs), "positive_ranges": ranges}

    return work


def knn_actor(n: int, actors: int = 16):
    """One of ``actors`` mining actors: its ``n / actors`` query rows against all ``n`` keys (1 torch thread), in
    the production block shape (``QUERY_ROWS`` x ``KEY_ROWS``), so the sizes are whole blocks: ``n / actors`` a
    multiple of ``QUERY_ROWS`` and ``n`` of ``KEY_ROWS`` (other shapes would pad or shrink the blocks and time
    another kernel)."""
    import torch

    from depthg.knn import KEY_ROWS, QUERY_ROWS, normalize, topk_blocks

    rows = n // actors
    if n % KEY_ROWS or rows % QUERY_ROWS:
        raise ValueError(f"knn_actor runs at whole blocks: N a multiple of {KEY_ROWS} and N/{actors} of {QUERY_ROWS}, "
                         f"got {n}")
    if n > 300_000:
        raise ValueError(f"knn_actor is measured up to 262k crops (N^2/P compute on one CPU thread: {n} would take "
                         f"~{(n / 262_144) ** 2 * 1.5:.0f} min here); the fit extrapolates")
    torch.set_num_threads(1)
    keys = normalize(torch.randn(n, DIM, generator=torch.Generator().manual_seed(0)))
    topk_blocks(keys[:8], keys[:64], 7, first=0)  # first-use costs before the measurement

    def work() -> dict:
        _, idx = topk_blocks(keys[:rows], keys, 7, first=0)
        return {"query_rows": rows, "query_block": QUERY_ROWS, "key_block": KEY_ROWS, "actors": actors, "threads": 1,
                "k": 7, "dim": DIM, "checksum": int(idx.sum())}

    return work


def knn_actor_memory_mb(n: int, actors: int = 16) -> float:
    """the work's block (depthg.knn.BLOCK_BYTES) + top-k state of its rows; the keys (N x 384 x 4 B) are held before it
    (shared by a node's actors; 73 GiB at 50M crops, float32), so they are not in delta_mb."""
    from depthg.knn import BLOCK_BYTES

    return (BLOCK_BYTES + (n // actors) * 7 * 12) / 2**20


# ----------------------------------------------------------------------------- extras (subprocesses)
def _child(name: str, args: dict, timeout: float = 3600) -> dict:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "bench.scale_stage2", name, json.dumps(args)], capture_output=True,
                          text=True, timeout=timeout, env=env)
    if proc.returncode:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def knn_actors(args=None) -> dict:
    """The neighbours phase on 1 vs 2 CPU actors (1 torch thread each) on the same N."""
    return _child("knn-actors", {"n": int(getattr(args, "knn_n", 0) or 49_152)})


def stage1_bytes_per_cluster(args=None) -> dict:
    """Depth-shard bytes read by a simulated 2-node mining run, summed over the nodes, / the depth shards' size."""
    return _child("stage1-bytes", {})


class SessionWorker(MiningWorker):
    """A ``MiningWorker`` in its own scheduling session. Linux shares the CPU between sessions when
    ``kernel.sched_autogroup_enabled`` is 1 (this machine: 2 cores shared by several users' sessions), not
    between threads: two actors of one session then share that session's slice and cannot show their
    parallelism. An actor per session is what separate machines or GPUs give each actor."""

    def __init__(self, *args, **kwargs):
        try:
            os.setsid()
        except OSError:  # already a session leader
            pass
        super().__init__(*args, **kwargs)


def _knn_actors_child(n: int) -> dict:
    import torch

    import ray
    from cluster import mining
    from cluster.raycluster import ActorGroup
    from depthg import io, shards
    from depthg.config import load_config, to_dict
    from depthg.knn import normalize, topk_blocks

    root = _tmp()
    folder, feats = os.path.join(root, "train"), os.path.join(root, "features")
    os.makedirs(feats)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((64, DIM)).astype(np.float32)  # clustered, like backbone features
    x = (centres[rng.integers(0, 64, n)] + 0.7 * rng.standard_normal((n, DIM))).astype(np.float32)
    units = -(-n // 5120)
    for u in range(units):
        np.save(os.path.join(feats, mining.feature_name(u)), x[u * 5120:(u + 1) * 5120])
    table = shards.OffsetsTable.from_sidecars(synthetic_sidecars(n))
    shards.write_index(folder, table)
    cfg = load_config(None, ["mining.device=cpu", f"mining.cache_dir={root}/cache", "model.backbone=tiny_vit"])
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}})
    out = {"n": n, "dim": DIM, "k": 7, "threads_per_actor": 1, "session_per_actor": True,
           "load_avg_1min_before": os.getloadavg()[0]}
    rows, wall, cpus = {}, {1: [], 2: []}, {1: [], 2: []}
    for run, actors in enumerate((1, 2, 1, 2)):  # each twice, alternating: the faster of two runs counts
        with ActorGroup(SessionWorker, (to_dict(cfg), f"knn{run}"), actors, threads=1, device="cpu",
                        cpus_per_actor=1) as group:
            ray.get([a.__ray_ready__.remote() for a in group.start()])
            start = time.perf_counter()
            cpu = mining.write_neighbours(cfg, group, folder, feats, units, table, False, "bench")
            wall[actors].append(round(time.perf_counter() - start, 2))
            cpus[actors].append(sorted(round(c, 2) for c in cpu.values()))
        rows[actors] = [open(os.path.join(folder, shards.rows_name(name)), "rb").read() for name in table.names]
        for name in table.names:
            io.remove(os.path.join(folder, shards.rows_name(name)))
    best = {a: int(np.argmin(wall[a])) for a in (1, 2)}
    for a, name in ((1, "1_actor"), (2, "2_actors")):
        out[f"seconds_{name}"], out[f"runs_seconds_{name}"] = wall[a][best[a]], wall[a]
        out[f"cpu_seconds_per_actor_{name}"] = cpus[a][best[a]]
    ray.shutdown()
    out["speedup"] = round(out["seconds_1_actor"] / out["seconds_2_actors"], 3)
    # the same from the actors' own CPU time (what 2 free cores would give; independent of other jobs' load)
    out["cpu_speedup"] = round(min(sum(c) for c in cpus[1]) / min(max(c) for c in cpus[2]), 3)
    out["neighbours_identical"] = rows[1] == rows[2]
    out["load_avg_1min_after"] = os.getloadavg()[0]
    # float16 key storage (float32 products) against float32 on the same features: recall@k of 2048 queries
    torch.set_num_threads(1)
    keys = normalize(torch.from_numpy(x))
    q = slice(0, 2048)
    _, exact = topk_blocks(keys[q], keys, 30, first=0)
    _, half = topk_blocks(keys[q].half(), keys.half(), 30, first=0)
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(exact, half))
    out["fp16_recall_at_30"] = round(hits / exact.numel(), 5)
    out["fp16_identical_rows"] = round(float((exact == half).all(dim=1).float().mean()), 5)
    return out


def _stage1_bytes_child() -> dict:
    import argparse

    from bench.mining_io import mining_run

    tmp = _tmp()
    r = mining_run(argparse.Namespace(nodes=2, gpus_per_node=2, samples=64, per_shard=2, positives=3), tmp)
    return {"nodes": r["nodes"], "actors": r["actors"], "depth_shards": r["depth_shards"],
            "depth_shard_bytes": r["depth_shard_bytes"], "bytes_read_summed_over_nodes": sum(r["bytes_read_per_node"].values()),
            "ratio": round(r["cluster_ratio"], 4), "max_node_ratio": round(r["max_node_ratio"], 4), "goal": 1.2}


if __name__ == "__main__":
    kind, params = sys.argv[1], json.loads(sys.argv[2])
    result = _knn_actors_child(params["n"]) if kind == "knn-actors" else _stage1_bytes_child()
    print(json.dumps(result))
