"""FPS: every farthest point sampling backend vs the reference per-image NumPy loop (ms per batch).

For each batch size, random smooth depth maps are pooled to the 28x28 DINO grid (784 patches) and 121
patches are chosen per image, (a) by ``depthg.sampling.farthest_point_sample`` batched over the images with
each backend on its device (CPU: ``compiled``, ``numpy``, ``torch``; with CUDA also ``triton`` and ``torch``
on the GPU), timed from the pooled grid (reference camera lift + FPS + raster re-sort, as ``fps_reference``),
and (b) by a per-image NumPy loop of the reference algorithm (its camera, its delete-from-the-candidates
greedy loop, raster re-sort), timed the same way. Every backend's selection is checked identical to (b).
Triton's CPU interpreter (``TRITON_INTERPRET=1``) is for correctness tests only and is never timed.
After a warm-up call (which also builds or loads the compiled loop), the median and the best of several
repeats are reported, wall clock and process CPU time, with the 1-minute load average (the machine may be
shared: the best repeat is the least disturbed one).
"""
from __future__ import annotations

import os
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from depthg import fps_kernels, sampling


def add_arguments(parser) -> None:
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--grid", type=int, default=28, help="feature grid side (28 = 224 / 8)")
    parser.add_argument("--samples", type=int, default=11, help="S: S*S patches chosen per image")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--numpy-repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (NumPy loop: 1)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--seed", type=int, default=0)


# ----------------------------------------------------------------------------- the reference, per image
def _reference_points(grid: np.ndarray) -> np.ndarray:
    h, w = grid.shape
    factor = np.float32(2.0) * np.tan(np.float32(45.0))  # the reference's tan(90 / 2) in radians
    row, col = np.indices((h, w))
    x = factor * grid * (col - w / 2.0).astype(np.float32) / np.float32(w)
    y = factor * grid * (row - h / 2.0).astype(np.float32) / np.float32(h)
    return np.stack([x, y, -grid * np.float32(5.0)], -1).reshape(-1, 3)


def _reference_fps(points: np.ndarray, n: int) -> np.ndarray:
    left = np.arange(len(points))
    picked = np.zeros(n, dtype=np.int64)
    dists = np.full(len(points), np.inf, dtype=np.float32)
    left = np.delete(left, 0)
    for i in range(1, n):
        d = ((points[picked[i - 1]] - points[left]) ** 2).sum(-1)
        dists[left] = np.minimum(d, dists[left])
        k = np.argmax(dists[left])
        picked[i] = left[k]
        left = np.delete(left, k)
    return picked


def reference_numpy(grids: np.ndarray, samples: int) -> np.ndarray:
    """Per-image loop, as the reference code runs it on the CPU -> raster-sorted indices [B, S*S]."""
    return np.stack([np.sort(_reference_fps(_reference_points(g), samples * samples)) for g in grids])


# ----------------------------------------------------------------------------- timing
def _smooth_depth(b: int, grid: int, generator: torch.Generator) -> torch.Tensor:
    low = torch.rand(b, 1, 7, 7, generator=generator)
    depth = F.interpolate(low, size=(grid * 8, grid * 8), mode="bicubic", align_corners=False)
    depth = depth - depth.amin(dim=(2, 3), keepdim=True)
    return depth / depth.amax(dim=(2, 3), keepdim=True)


def _time(fn, repeats: int, sync) -> dict:
    """Median and best wall / CPU milliseconds of ``fn`` over ``repeats`` calls, after one warm-up call."""
    fn()
    sync()
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync()
        wall.append((time.perf_counter() - w0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    return {"ms": statistics.median(wall), "best_ms": min(wall), "cpu_ms": statistics.median(cpu)}


def _batched_fps(grid: torch.Tensor, samples: int, backend: str) -> torch.Tensor:
    """The library path from the pooled grid: reference camera, batched FPS, raster re-sort."""
    points = sampling.lift_points(grid, 90.0, reference=True)
    return sampling.farthest_point_sample(points, samples * samples, backend=backend).sort(dim=1).values


def _backends(device: str) -> list[tuple[str, str]]:
    """(device, backend) pairs to time: the CPU backends always, the CUDA ones when there is a GPU."""
    cpu = [("cpu", "compiled"), ("cpu", "numpy"), ("cpu", "torch")]
    return ([("cuda", "triton"), ("cuda", "torch")] if device == "cuda" else []) + cpu


def _sync(device: str):
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def run(args) -> dict:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, device)
    finally:
        torch.set_num_threads(threads)


def _run(args, device: str) -> dict:
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    library = fps_kernels.compiled_library()  # built at first use, else loaded from the cache
    build_s = time.perf_counter() - t0
    load_before = os.getloadavg()[0]
    rows = []
    for b in args.batch_sizes:
        depth = _smooth_depth(b, args.grid, gen)
        grid = sampling.pool_depth(depth, (args.grid, args.grid))
        grids = grid.numpy()
        ref = reference_numpy(grids, args.samples)
        loop = _time(lambda: reference_numpy(grids, args.samples), args.numpy_repeats, lambda: None)
        for dev, backend in _backends(device):
            grid_dev = grid.to(dev)
            with torch.inference_mode():
                ours = _batched_fps(grid_dev, args.samples, backend).cpu().numpy()
                t = _time(lambda: _batched_fps(grid_dev, args.samples, backend), args.repeats, _sync(dev))
            rows.append({"batch": b, "points": args.grid ** 2, "samples": args.samples ** 2, "device": dev,
                         "backend": backend, "batched_ms": round(t["ms"], 3), "batched_best_ms": round(t["best_ms"], 3),
                         "batched_cpu_ms": round(t["cpu_ms"], 3),
                         "numpy_loop_ms": round(loop["ms"], 3), "numpy_loop_best_ms": round(loop["best_ms"], 3),
                         "numpy_loop_cpu_ms": round(loop["cpu_ms"], 3),
                         "numpy_loop_ms_per_image": round(loop["ms"] / b, 3),
                         "speedup": round(loop["ms"] / t["ms"], 1),
                         "speedup_best": round(loop["best_ms"] / t["best_ms"], 1),
                         "speedup_cpu_time": round(loop["cpu_ms"] / max(t["cpu_ms"], 1e-9), 1),
                         "identical_selection": bool(np.array_equal(ours, ref))})
    _print_table(rows)
    load = {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)}
    print(f"1-minute load average: {load['before']} before, {load['after']} after; compiled loop "
          f"{'ready' if library else 'NOT built (numpy fallback)'} in {build_s:.2f} s "
          f"(cache {fps_kernels.kernel_cache_dir()})")
    return {"threads": args.threads, "repeats": args.repeats, "numpy_repeats": args.numpy_repeats,
            "load_avg_1min": load, "compiled_loop_built": library is not None,
            "compiled_build_or_load_s": round(build_s, 3),
            "not_timed": {"triton_interpreter": "TRITON_INTERPRET=1 is for correctness tests only"}
            | ({} if device == "cuda" else {"triton": "no CUDA device"}),
            "rows": rows}


def _print_table(rows) -> None:
    print(f"{'B':>4} {'N':>5} {'S*S':>4} {'device':>6} {'backend':>8} {'ms':>8} {'best ms':>8} {'loop ms':>8} "
          f"{'best':>8} {'speed-up':>9} {'(best)':>7} {'(cpu)':>7} {'same':>5}")
    for r in rows:
        print(f"{r['batch']:>4} {r['points']:>5} {r['samples']:>4} {r['device']:>6} {r['backend']:>8} "
              f"{r['batched_ms']:>8.2f} {r['batched_best_ms']:>8.2f} {r['numpy_loop_ms']:>8.1f} "
              f"{r['numpy_loop_best_ms']:>8.1f} {r['speedup']:>8.1f}x {r['speedup_best']:>6.1f}x "
              f"{r['speedup_cpu_time']:>6.1f}x {str(r['identical_selection']):>5}")
