"""Where the correlation losses look: depth-guided farthest point sampling (FPS) and STEGO's random sampling.

Three modes (``sampling.mode``), all batched on the device of ``depth`` (no per-image Python loop and no
host synchronisation; the S*S greedy FPS iterations run in one kernel call, see "FPS backends" below):

- ``fps``: the method as the paper states it. The depth map is average-pooled to the feature grid, every
  patch is lifted to a 3D point with a correct pinhole camera (field of view in *degrees*), greedy FPS picks
  S*S patches (start at patch 0 or at a random patch drawn from ``generator``), and the coordinates read the
  chosen patch *centres* (x = column, y = row).
- ``fps_reference``: identical selections and reads to the public DepthG code (docs/METHOD.md section 4):
  camera factor ``2*tan(45)`` evaluated in radians (3.2396), ``X = f*d*(j - W/2)/W``, ``Y = f*d*(i - H/2)/H``,
  ``Z = -5*d``, squared distance, start at patch 0, first-max tie-break, chosen patches re-sorted to raster
  order, and each (row, col) pair handed to ``grid_sample`` as (x, y), so the locations actually read are the
  transposed ones. The reference also transposes the S x S grid of coordinates before sampling
  (``coords.permute(0, 2, 1, 3)``); the coordinates returned here already include that transpose, so
  ``F.grid_sample(x, coords)`` reads exactly what the reference's ``sample(x, coords)`` reads.
  Index normalisation as the reference: an index k on an axis of n patches maps to ``k / n * 2 - 1``, which
  with ``align_corners=True`` reads at position ``k * (n-1)/n``, not at patch k (up to 0.96 patch off at
  n = 28), so the features are bilinear blends of neighbouring patches, exactly as the reference reads them.
  ``fps`` uses ``k / (n - 1) * 2 - 1`` instead, the mapping consistent with ``align_corners=True``.
- ``random``: STEGO's uniform continuous coordinates in [-1, 1] drawn from ``generator``.

FPS backends (``farthest_point_sample(backend=...)``, all with identical indices): ``triton``, one fused
kernel launch for the whole batch on CUDA (``depthg.fps_kernels``); ``compiled``, a C++ loop for CPU tensors
built at first use (falls back to ``numpy`` with a warning when no compiler works); ``torch`` and ``numpy``,
the same greedy loop batched with eager operations (one Python step per chosen point). ``auto`` picks triton
on CUDA and compiled on the CPU; ``bench/fps.py`` measures every backend against the reference's per-image
loop.

Every mode returns ``Locations`` whose ``depth`` (and ``points``) are the values at the locations the
features are actually read from, in the same S x S order as ``coords`` (flattened row-major), so the depth
loss can pair them with the sampled codes. Coordinates are for
``F.grid_sample(align_corners=True, padding_mode="border")`` (see ``losses.sample_features``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from depthg.config import SamplingMode, SamplingStart, choices

MODES = choices(SamplingMode)
STARTS = choices(SamplingStart)
REFERENCE_FAR = 5.0  # the reference code's Z = -far * d


@dataclass
class Locations:
    """Sampled locations for one batch of images.

    coords: [B,S,S,2] (x, y) in [-1, 1] for ``grid_sample(align_corners=True, padding_mode="border")``.
    points: [B,S*S,3] 3D points at the read locations (None only if a caller drops them).
    depth:  [B,S*S] pooled depth at the read locations.
    idx:    [B,S*S] patch indices chosen by FPS, laid out like ``coords`` (None for ``random``). For
            ``fps_reference`` the locations read are the transposes of these patches.
    """

    coords: torch.Tensor
    points: torch.Tensor | None
    depth: torch.Tensor
    idx: torch.Tensor | None = None


def pool_depth(depth: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """Adaptive average pool of ``depth`` [B,1,H,W] (or [B,H,W]) to the feature grid -> [B,h,w]."""
    if depth.dim() == 3:
        depth = depth.unsqueeze(1)
    if depth.dim() != 4 or depth.shape[1] != 1:
        raise ValueError(f"pool_depth: expected depth [B,1,H,W], got {tuple(depth.shape)}")
    return F.adaptive_avg_pool2d(depth, tuple(grid_hw))[:, 0]


def lift_points(depth_grid: torch.Tensor, fov_deg: float = 90.0, reference: bool = False) -> torch.Tensor:
    """Lift every patch of ``depth_grid`` [B,h,w] to a 3D point -> [B,h*w,3] in raster (row-major) order.

    ``reference=False``: a pinhole camera with horizontal field of view ``fov_deg`` in degrees, square pixels
    and the principal point at the image centre; patch (i, j) is read at its centre (i + 0.5, j + 0.5):
    ``Z = d, X = Z * 2 tan(fov/2) * (j + 0.5 - w/2) / w, Y = Z * 2 tan(fov/2) * (i + 0.5 - h/2) / w``.
    Depth is relative (min-max normalised), so the global scale is arbitrary; FPS does not depend on it.

    ``reference=True``: the public DepthG camera, arithmetic in the same order and dtype as that code:
    ``f = 2 * tan(fov/2)`` with ``fov/2`` taken in *radians* (for fov 90: 2*tan(45 rad) = 3.2396),
    ``X = f*d*(j - w/2)/w, Y = f*d*(i - h/2)/h, Z = -5*d``.
    """
    if depth_grid.dim() != 3:
        raise ValueError(f"lift_points: expected depth_grid [B,h,w], got {tuple(depth_grid.shape)}")
    b, h, w = depth_grid.shape
    dtype, device = depth_grid.dtype, depth_grid.device
    rows = torch.arange(h, device=device).to(dtype).view(1, h, 1)
    cols = torch.arange(w, device=device).to(dtype).view(1, 1, w)
    if reference:
        factor = 2.0 * torch.tan(torch.tensor([fov_deg], dtype=dtype, device=device) / 2.0)
        fd = factor * depth_grid
        x = fd * (cols - w / 2.0) / w
        y = fd * (rows - h / 2.0) / h
        z = -depth_grid * REFERENCE_FAR
    else:
        factor = 2.0 * math.tan(math.radians(fov_deg) / 2.0)
        z = depth_grid
        x = z * factor * (cols + 0.5 - w / 2.0) / w
        y = z * factor * (rows + 0.5 - h / 2.0) / w
    return torch.stack([x, y, z], dim=-1).reshape(b, h * w, 3)


BACKENDS = ("auto", "triton", "compiled", "torch", "numpy")


def farthest_point_sample(points: torch.Tensor, n: int, start: torch.Tensor | None = None,
                          backend: str = "auto") -> torch.Tensor:
    """Greedy farthest point sampling of ``n`` of the N points of each batch item -> idx [B,n] (long).

    Iteration k picks the point whose squared distance to the nearest already-chosen point is largest;
    ties go to the lowest index (``argmax`` returns the first maximum) and chosen points are never picked
    again (their distance is set to -inf), exactly like the reference's delete-from-the-candidates loop.
    ``start`` [B] gives each item's first point (default: index 0). The squared distance is evaluated as
    ``(dx**2 + dy**2) + dz**2`` with a rounding after every operation, as NumPy's ``sum((p - c)**2, -1)``.
    Points are expected finite (the backends may differ on NaN).

    ``backend`` (all give identical indices on the same device and dtype):
    ``triton``: one fused Triton kernel launch for the whole batch (CUDA, float32/float64, N up to
    ``fps_kernels.TRITON_MAX_POINTS``; on a CPU only under ``TRITON_INTERPRET=1``, for tests);
    ``compiled``: a C++ loop for CPU float32/float64 points, built at first use and cached (see
    ``depthg.fps_kernels``), falling back to ``numpy`` with a logged warning if it cannot be built;
    ``torch``: the batched loop in eager torch on any device; ``numpy``: the same loop in NumPy on CPU memory;
    ``auto``: ``triton`` where it applies on CUDA, ``compiled`` for CPU float32/float64, else ``torch``.
    """
    if points.dim() != 3 or points.shape[-1] != 3:
        raise ValueError(f"farthest_point_sample: expected points [B,N,3], got {tuple(points.shape)}")
    b, num, _ = points.shape
    if not 1 <= n <= num:
        raise ValueError(f"farthest_point_sample: cannot choose {n} of {num} points")
    if backend not in BACKENDS:
        raise ValueError(f"farthest_point_sample: backend {backend!r} is not one of {', '.join(BACKENDS)}")
    from depthg import fps_kernels  # imports Triton: only when FPS runs

    device = points.device
    far = _start_index(start, b, num, device)
    cpu_float = device.type == "cpu" and points.dtype in fps_kernels.DTYPES
    if backend == "auto":
        backend = ("compiled" if cpu_float else
                   "triton" if device.type == "cuda" and fps_kernels.triton_supports(points) else "torch")
    if backend == "triton":
        return fps_kernels.fps_triton(points, n, far)
    if backend in ("compiled", "numpy") and not cpu_float:
        raise ValueError(f"farthest_point_sample: the {backend} backend needs float32/float64 CPU points, got "
                         f"{points.dtype} on {device.type}")
    if backend == "compiled":
        idx = fps_kernels.fps_compiled(points, n, far)
        if idx is not None:
            return idx
        backend = "numpy"  # the compiler failed (warned once by fps_kernels)
    if backend == "numpy":
        return torch.from_numpy(_fps_numpy(points.detach().numpy(), n, far.numpy()))
    with torch.inference_mode():
        idx = _fps_torch(points.detach(), n, far)
    return idx.clone()  # a normal tensor (inference tensors cannot be saved for backward)


def _start_index(start: torch.Tensor | None, b: int, num: int, device) -> torch.Tensor:
    """``start`` [B] (default zeros) as long on ``device``; a CPU ``start`` is range-checked (no device sync)."""
    if start is None:
        return torch.zeros(b, dtype=torch.long, device=device)
    if start.numel() != b:
        raise ValueError(f"farthest_point_sample: start needs one index per batch item ({b}), got "
                         f"{tuple(start.shape)}")
    far = start.detach().reshape(b).to(dtype=torch.long)
    if far.device.type == "cpu" and b and not bool(((far >= 0) & (far < num)).all()):
        raise ValueError(f"farthest_point_sample: start indices must lie in [0, {num}), got {far.tolist()}")
    return far.to(device)


def _fps_torch(points: torch.Tensor, n: int, far: torch.Tensor) -> torch.Tensor:
    b, num, _ = points.shape
    planes = points.permute(2, 0, 1).contiguous()  # [3,B,N]: elementwise ops on contiguous rows
    flat = planes.view(3, b * num)
    offsets = torch.arange(b, device=points.device) * num
    min_d = torch.full((b, num), float("inf"), dtype=points.dtype, device=points.device)
    diff = torch.empty_like(planes)
    dist = torch.empty_like(min_d)
    chosen = [far]
    flat_idx = far + offsets
    for _ in range(n - 1):
        centre = flat.index_select(1, flat_idx).unsqueeze(-1)  # [3,B,1]
        torch.sub(planes, centre, out=diff).square_()
        torch.add(diff[0], diff[1], out=dist).add_(diff[2])
        torch.minimum(min_d, dist, out=min_d)
        min_d.view(-1).index_fill_(0, flat_idx, float("-inf"))  # never pick a chosen point again
        far = min_d.argmax(dim=1)
        chosen.append(far)
        flat_idx = far + offsets
    return torch.stack(chosen, dim=1)


def _fps_numpy(points: np.ndarray, n: int, far: np.ndarray) -> np.ndarray:
    """The same loop as ``_fps_torch`` in NumPy (argmax also returns the first maximum)."""
    b, num, _ = points.shape
    planes = np.ascontiguousarray(points.transpose(2, 0, 1))
    flat = planes.reshape(3, b * num)
    offsets = np.arange(b, dtype=np.int64) * num
    min_d = np.full((b, num), np.inf, dtype=points.dtype)
    min_flat = min_d.reshape(-1)
    diff = np.empty_like(planes)
    dist = np.empty_like(min_d)
    chosen = np.empty((b, n), dtype=np.int64)
    chosen[:, 0] = far
    flat_idx = far + offsets
    for k in range(1, n):
        centre = np.take(flat, flat_idx, axis=1)[:, :, None]
        np.subtract(planes, centre, out=diff)
        np.square(diff, out=diff)
        np.add(diff[0], diff[1], out=dist)
        dist += diff[2]
        np.minimum(min_d, dist, out=min_d)
        min_flat[flat_idx] = -np.inf
        far = min_d.argmax(axis=1)
        chosen[:, k] = far
        flat_idx = far + offsets
    return chosen


def _axis_coord(index: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """Patch index k on an axis of n patches -> its centre in [-1, 1] under ``align_corners=True``."""
    return index.to(dtype) / max(n - 1, 1) * 2.0 - 1.0


def _reference_axis_coord(index: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """The reference's mapping of patch index k on an axis of n patches: k / n * 2 - 1 (not a patch centre)."""
    return index.to(dtype) / n * 2.0 - 1.0


def read_grid(values: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinearly read ``values`` [B,C,h,w] at ``coords`` [B,S,S,2] -> [B,S*S,C] (same read as the features)."""
    out = F.grid_sample(values, coords.to(values.dtype), mode="bilinear", padding_mode="border",
                        align_corners=True)
    return out.flatten(2).transpose(1, 2)


def _gather(values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """values [B,N,C], idx [B,K] -> [B,K,C]."""
    return values.gather(1, idx.unsqueeze(-1).expand(-1, -1, values.shape[-1]))


def _start_indices(start: str, b: int, num: int, device, generator) -> torch.Tensor | None:
    if start == "first":
        return None
    gen_device = generator.device if generator is not None else device
    return torch.randint(0, num, (b,), generator=generator, device=gen_device).to(device)


def _fps_locations(grid, samples, fov_deg, start, generator) -> Locations:
    b, h, w = grid.shape
    points = lift_points(grid, fov_deg)
    idx = farthest_point_sample(points, samples * samples, _start_indices(start, b, h * w, grid.device, generator))
    x = _axis_coord(idx % w, w, grid.dtype)
    y = _axis_coord(idx // w, h, grid.dtype)
    coords = torch.stack([x, y], dim=-1).reshape(b, samples, samples, 2)
    depth = grid.reshape(b, h * w).gather(1, idx)
    return Locations(coords=coords, points=_gather(points, idx), depth=depth, idx=idx)


def _fps_reference_locations(grid, samples, fov_deg) -> Locations:
    b, h, w = grid.shape
    points = lift_points(grid, fov_deg, reference=True)
    idx = farthest_point_sample(points, samples * samples).sort(dim=1).values  # raster order
    rows, cols = idx // w, idx % w
    # (row, col) passed as (x, y): the reference reads the transposed location.
    coords = torch.stack([_reference_axis_coord(rows, h, grid.dtype), _reference_axis_coord(cols, w, grid.dtype)],
                         dim=-1)
    # ... and transposes the S x S arrangement before grid_sample (coords.permute(0, 2, 1, 3)).
    coords = coords.reshape(b, samples, samples, 2).transpose(1, 2).contiguous()
    idx = idx.reshape(b, samples, samples).transpose(1, 2).reshape(b, samples * samples)
    return Locations(coords=coords, points=read_grid(_as_image(points, h, w), coords),
                     depth=read_grid(grid.unsqueeze(1), coords)[..., 0], idx=idx)


def _as_image(points: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B,h*w,3] -> [B,3,h,w]."""
    return points.transpose(1, 2).reshape(points.shape[0], 3, h, w)


def _random_coords(b: int, samples: int, generator, device, dtype) -> torch.Tensor:
    """STEGO's uniform coordinates in [-1, 1] -> [B,S,S,2] on ``device``, drawn from ``generator``."""
    gen_device = generator.device if generator is not None else device
    coords = torch.rand((b, samples, samples, 2), generator=generator, device=gen_device, dtype=dtype)
    return (coords * 2.0 - 1.0).to(device)


def _random_locations(grid, samples, fov_deg, generator) -> Locations:
    b, h, w = grid.shape
    coords = _random_coords(b, samples, generator, grid.device, grid.dtype)
    points = lift_points(grid, fov_deg)
    return Locations(coords=coords, points=read_grid(_as_image(points, h, w), coords),
                     depth=read_grid(grid.unsqueeze(1), coords)[..., 0], idx=None)


def sample_locations(mode: str, depth: torch.Tensor | None, grid_hw: tuple[int, int], samples: int,
                     fov_deg: float = 90.0, start: str = "first",
                     generator: torch.Generator | None = None, like: torch.Tensor | None = None) -> Locations:
    """Choose S*S = ``samples**2`` feature locations per image of ``depth`` [B,1,H,W] on a ``grid_hw`` grid.

    ``mode``: fps | fps_reference | random (module docstring). ``start`` (fps only): first | random.
    ``generator`` drives the random start and the random coordinates (it may live on the CPU while
    ``depth`` is on the GPU). No gradient flows through the locations. ``depth`` None (data without depth
    maps): ``random`` only, one set per item of ``like`` (the features: batch size and device), with
    ``points`` and ``depth`` None.
    """
    if mode not in MODES:
        raise ValueError(f"sampling.mode: {mode!r} is not one of {', '.join(MODES)}")
    if start not in STARTS:
        raise ValueError(f"sampling.start: {start!r} is not one of {', '.join(STARTS)}")
    if mode == "fps_reference" and start != "first":
        raise ValueError("sampling.start: fps_reference always starts at patch 0 (as the reference code); "
                         "use sampling.mode=fps for a random start")
    h, w = int(grid_hw[0]), int(grid_hw[1])
    if samples < 1 or samples * samples > h * w:
        raise ValueError(f"sampling.samples: {samples}^2 locations do not fit a {h}x{w} feature grid")
    if depth is None:
        if mode != "random" or like is None:
            raise ValueError(f"sampling.mode={mode} reads depth maps and these images have none: use sampling.mode=random")
        return Locations(coords=_random_coords(like.shape[0], samples, generator, like.device, torch.float32),
                         points=None, depth=None, idx=None)
    with torch.no_grad():
        grid = pool_depth(depth, (h, w))
        if mode == "fps":
            return _fps_locations(grid, samples, fov_deg, start, generator)
        if mode == "fps_reference":
            return _fps_reference_locations(grid, samples, fov_deg)
        return _random_locations(grid, samples, fov_deg, generator)
