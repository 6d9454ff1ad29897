"""Mining I/O: bytes of depth shards read per node and per cluster by stage 2, and the exact top-k's scaling.

    python launch/benchmark.py mining-io [--nodes 3] [--gpus-per-node 2] [--samples 96]

Stage 2 (``cluster.mining``) runs on a simulated cluster of ``--nodes`` Ray nodes
(``ray.cluster_utils.Cluster`` via ``cluster.simcluster``) with ``--gpus-per-node`` logical GPUs
each, so one mining actor per GPU and several actors per node. The depth shards live behind a
``counted://`` fsspec filesystem (the local file system, wrapped) registered in every Ray worker
through ``worker_process_setup_hook``: each worker logs the bytes it reads, per file, under its
Ray node id. Goal (issue 26): the bytes read summed over all nodes <= 1.2 x the depth shards' size
(``cluster_ratio``): a unit's actor streams its own depth shards, each once in the cluster. Before, every
node read about 1.0x (one shard cache per node), i.e. the cluster read about nodes x the depth shards.

Then ``depthg.knn.topk_cosine`` (k=30, C=384, float32, fixed-size blocks) on this machine's CPU at
N = 4k, 8k, 16k: the measured scaling and a quadratic fit, whose extrapolation to COCO's 248k crops is
labelled as one.
"""
from __future__ import annotations

import glob
import os
import shutil
import tempfile
import time

import fsspec
from fsspec.implementations.local import LocalFileOpener, LocalFileSystem

COUNT_DIR_ENV = "DEPTHG_BENCH_COUNT_DIR"


def add_arguments(parser) -> None:
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--gpus-per-node", type=int, default=2, help="logical GPUs = mining actors per node")
    parser.add_argument("--samples", type=int, default=96, help="depth samples (crops) in the split")
    parser.add_argument("--per-shard", type=int, default=4)
    parser.add_argument("--positives", type=int, default=7)
    parser.add_argument("--knn-sizes", default="4096,8192,16384")
    parser.add_argument("--knn-dim", type=int, default=384)


# ----------------------------------------------------------------------------- the counting file system
class _CountingOpener(LocalFileOpener):
    def read(self, *args, **kwargs):
        data = super().read(*args, **kwargs)
        self.fs.log(self.path, len(data))
        return data


class CountingFileSystem(LocalFileSystem):
    """The local file system under ``counted://``, logging every byte read (per process, per node)."""

    protocol = "counted"

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("auto_mkdir", True)  # like object storage: a key needs no folder first
        super().__init__(*args, **kwargs)

    def _open(self, path, mode="rb", block_size=None, **kwargs):
        path = self._strip_protocol(path)
        if "r" in mode and "+" not in mode:
            return _CountingOpener(path, mode, fs=self, **kwargs)
        return super()._open(path, mode, block_size, **kwargs)

    @staticmethod
    def log(path: str, nbytes: int) -> None:
        folder = os.environ.get(COUNT_DIR_ENV)
        if not folder or not nbytes:
            return
        with open(os.path.join(folder, f"{_where()}.{os.getpid()}.log"), "a") as fh:
            fh.write(f"{nbytes}\t{path}\n")


def _where() -> str:
    try:
        import ray

        if ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
            return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001
        pass
    return "driver"


def register_counting() -> None:
    """Worker setup hook (and the driver's): make ``counted://`` URLs resolve to CountingFileSystem."""
    fsspec.register_implementation("counted", CountingFileSystem, clobber=True)


def _read_logs(folder: str) -> list[tuple[str, int, int, str]]:
    rows = []
    for path in glob.glob(os.path.join(folder, "*.log")):
        where, pid = os.path.basename(path).rsplit(".", 2)[:2]
        with open(path) as fh:
            for line in fh:
                nbytes, name = line.rstrip("\n").split("\t", 1)
                rows.append((where, int(pid), int(nbytes), name))
    return rows


# ----------------------------------------------------------------------------- the mining run
def mining_run(args, tmp: str) -> dict:
    from cluster.mining import mine_neighbors
    from cluster.simcluster import private_cluster
    from depthg import shards
    from depthg.config import load_config

    counts = os.path.join(tmp, "counts")
    os.makedirs(counts)
    local_root = os.path.join(tmp, "shards")
    root = "counted://" + local_root
    register_counting()
    shards.write_test_shards(root, args.samples, size=(48, 64), with_positives=False,
                             samples_per_shard=args.per_shard, split="train")
    depth_dir = os.path.join(local_root, "depth", "train")
    tar_bytes = {os.path.join(depth_dir, n): os.path.getsize(os.path.join(depth_dir, n))
                 for n in os.listdir(depth_dir) if n.endswith(".tar")}
    os.environ[COUNT_DIR_ENV] = counts
    cfg = load_config(None, [f"shards.root={root}", "model.backbone=tiny_vit", "data.resolution=32",
                             f"mining.num_positives={args.positives}", "mining.k=30", "mining.device=auto",
                             f"mining.cache_dir={os.path.join(tmp, 'cache')}", "mining.batch_size=32"])
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    nodes = [{"num_cpus": 2, "num_gpus": args.gpus_per_node} for _ in range(args.nodes)]
    start = time.perf_counter()
    try:
        with private_cluster(nodes, pythonpath=repo,
                             runtime_env={"worker_process_setup_hook": "bench.mining_io.register_counting",
                                          "env_vars": {COUNT_DIR_ENV: counts}}):
            manifest = mine_neighbors(cfg, "train", progress=False)
    finally:
        os.environ.pop(COUNT_DIR_ENV, None)
    seconds = time.perf_counter() - start
    per_node, per_actor, driver = {}, {}, 0
    for where, pid, nbytes, name in _read_logs(counts):
        if name not in tar_bytes:
            continue  # sidecars, manifests, feature files: not depth-shard bytes
        if where == "driver":
            driver += nbytes
            continue
        per_node[where] = per_node.get(where, 0) + nbytes
        per_actor[f"{where[:8]}:{pid}"] = per_actor.get(f"{where[:8]}:{pid}", 0) + nbytes
    total = sum(tar_bytes.values())
    return {"depth_shard_bytes": total, "depth_shards": len(tar_bytes), "samples": manifest["total"],
            "bytes_read_per_node": per_node, "bytes_read_per_actor": per_actor, "driver_shard_bytes": driver,
            "max_node_ratio": max(per_node.values()) / total if per_node else 0.0,
            "cluster_ratio": sum(per_node.values()) / total, "goal_ratio": 1.2,
            "actors": args.nodes * args.gpus_per_node, "nodes": args.nodes, "seconds": seconds}


# ----------------------------------------------------------------------------- the top-k scaling
def knn_scaling(args) -> dict:
    import numpy as np
    import torch

    from depthg.knn import topk_cosine

    rows = []
    for n in [int(x) for x in str(args.knn_sizes).split(",")]:
        feats = torch.randn(n, args.knn_dim, generator=torch.Generator().manual_seed(n))
        start = time.perf_counter()
        topk_cosine(feats, 30)
        rows.append({"n": n, "seconds": time.perf_counter() - start})
    # t = a * N^2 (exact top-k is quadratic), least squares through the origin
    n2 = np.array([r["n"] ** 2 for r in rows], dtype=np.float64)
    a = float((n2 * [r["seconds"] for r in rows]).sum() / (n2 * n2).sum())
    coco = 248_000
    return {"rows": rows, "dim": args.knn_dim, "k": 30, "threads": torch.get_num_threads(),
            "fit_seconds_per_n2": a, "extrapolated_coco_248k_seconds": a * coco**2,
            "extrapolation_note": "an extrapolation (quadratic fit of the measured sizes), not a measurement"}


def run(args) -> dict:
    tmp = tempfile.mkdtemp(prefix="depthg-bench-mining-")
    try:
        knn = knn_scaling(args)
        io_result = mining_run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total = io_result["depth_shard_bytes"]
    print(f"mining over {io_result['nodes']} simulated nodes, {io_result['actors']} actors, "
          f"{io_result['depth_shards']} depth shards ({total} bytes), {io_result['samples']} samples, "
          f"{io_result['seconds']:.1f} s")
    print(f"{'node':<12}{'bytes read':>14}{'x shards':>10}")
    for node, nbytes in sorted(io_result["bytes_read_per_node"].items()):
        print(f"{node[:10]:<12}{nbytes:>14}{nbytes / total:>9.2f}x")
    print(f"summed over the nodes {io_result['cluster_ratio']:.2f}x (goal <= 1.2x), max per node "
          f"{io_result['max_node_ratio']:.2f}x; per actor: "
          + ", ".join(f"{v / total:.2f}x" for v in io_result["bytes_read_per_actor"].values()))
    print(f"\n{'N':>8}{'top-k s (CPU)':>16}")
    for r in knn["rows"]:
        print(f"{r['n']:>8}{r['seconds']:>16.2f}")
    print(f"extrapolated (quadratic fit, NOT measured) to 248k crops: {knn['extrapolated_coco_248k_seconds'] / 60:.0f} min "
          f"on this CPU ({knn['threads']} threads)")
    return {**io_result, "knn": knn, "load_avg_1min": os.getloadavg()[0]}
