"""FPS: batched torch farthest point sampling vs the reference per-image NumPy loop (ms per batch).

For each batch size, random smooth depth maps are pooled to the 28x28 DINO grid (784 patches) and 121
patches are chosen per image, (a) by ``depthg.sampling.farthest_point_sample`` batched over the images on
the device (CPU here, CUDA when available; on the CPU both its ``torch`` and its ``numpy`` backend), timed
from the pooled grid (reference camera lift + FPS + raster re-sort, as ``fps_reference``), and (b) by
a per-image NumPy loop of the reference algorithm (its camera, its delete-from-the-candidates greedy loop,
raster re-sort), timed the same way. Both select identical patches (checked). Medians of several repeats
after a warm-up; wall clock and process CPU time are both reported (the machine may be shared).
"""
from __future__ import annotations

import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from depthg import sampling


def add_arguments(parser) -> None:
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--grid", type=int, default=28, help="feature grid side (28 = 224 / 8)")
    parser.add_argument("--samples", type=int, default=11, help="S: S*S patches chosen per image")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--numpy-repeats", type=int, default=3)
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


def _time(fn, repeats: int, sync) -> tuple[float, float]:
    """Median wall and CPU milliseconds of ``fn`` over ``repeats`` calls, after one warm-up call."""
    fn()
    sync()
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync()
        wall.append((time.perf_counter() - w0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    return statistics.median(wall), statistics.median(cpu)


def _batched_fps(grid: torch.Tensor, samples: int, backend: str) -> torch.Tensor:
    """The library path from the pooled grid: reference camera, batched FPS, raster re-sort."""
    points = sampling.lift_points(grid, 90.0, reference=True)
    return sampling.farthest_point_sample(points, samples * samples, backend=backend).sort(dim=1).values


def run(args) -> dict:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(args.seed)
    backends = ["torch"] + (["numpy"] if device == "cpu" else [])
    rows = []
    for b in args.batch_sizes:
        depth = _smooth_depth(b, args.grid, gen)
        grid = sampling.pool_depth(depth, (args.grid, args.grid))
        grids = grid.numpy()
        ref = reference_numpy(grids, args.samples)
        n_wall, n_cpu = _time(lambda: reference_numpy(grids, args.samples), args.numpy_repeats, lambda: None)
        grid_dev = grid.to(device)
        for backend in backends:
            with torch.inference_mode():
                ours = _batched_fps(grid_dev, args.samples, backend).cpu().numpy()
                t_wall, t_cpu = _time(lambda: _batched_fps(grid_dev, args.samples, backend), args.repeats, sync)
            rows.append({"batch": b, "points": args.grid ** 2, "samples": args.samples ** 2, "device": device,
                         "backend": backend, "batched_ms": round(t_wall, 3), "batched_cpu_ms": round(t_cpu, 3),
                         "numpy_loop_ms": round(n_wall, 3), "numpy_loop_cpu_ms": round(n_cpu, 3),
                         "numpy_loop_ms_per_image": round(n_wall / b, 3),
                         "speedup": round(n_wall / t_wall, 1),
                         "speedup_cpu_time": round(n_cpu / max(t_cpu, 1e-9), 1),
                         "identical_selection": bool(np.array_equal(ours, ref))})
    _print_table(rows)
    return {"threads": args.threads, "repeats": args.repeats, "rows": rows}


def _print_table(rows) -> None:
    print(f"{'B':>4} {'N':>5} {'S*S':>4} {'device':>6} {'backend':>7} {'batched ms':>10} {'loop ms':>9} "
          f"{'speed-up':>9} {'(cpu time)':>10} {'same':>5}")
    for r in rows:
        print(f"{r['batch']:>4} {r['points']:>5} {r['samples']:>4} {r['device']:>6} {r['backend']:>7} "
              f"{r['batched_ms']:>10.2f} {r['numpy_loop_ms']:>9.2f} {r['speedup']:>8.1f}x "
              f"{r['speedup_cpu_time']:>9.1f}x {str(r['identical_selection']):>5}")
