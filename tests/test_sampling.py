"""depthg.sampling against brute force and an independent NumPy re-implementation of the reference algorithm."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from depthg import sampling
from depthg.sampling import farthest_point_sample, lift_points, pool_depth, sample_locations


def _depth(b=3, h=32, w=32, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 1, h, w, generator=g, dtype=dtype)


# ------------------------------------------------------------------ independent NumPy reference (test-only)
def numpy_reference_points(grid: np.ndarray) -> np.ndarray:
    """The public code's camera on one float32 grid [h,w] -> [h*w,3] (X, Y, Z), row-major."""
    h, w = grid.shape
    f = np.float32(2.0) * np.tan(np.float32(90.0) / np.float32(2.0))  # radians: 3.2396
    ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    x = (f * grid) * (jj - w / 2.0).astype(np.float32) / np.float32(w)
    y = (f * grid) * (ii - h / 2.0).astype(np.float32) / np.float32(h)
    z = -grid * np.float32(5.0)
    return np.stack([x, y, z], axis=-1).reshape(-1, 3).astype(np.float32)


def numpy_reference_fps(points: np.ndarray, n: int) -> np.ndarray:
    """Greedy FPS as the reference: start 0, candidates deleted once chosen, squared distance, np.argmax."""
    left = list(range(len(points)))
    chosen = [left.pop(0)]
    best = np.full(len(points), np.inf, dtype=np.float32)
    while len(chosen) < n:
        last = points[chosen[-1]]
        cand = np.array(left)
        d = ((points[cand] - last) ** 2).sum(-1)
        best[cand] = np.minimum(best[cand], d)
        k = int(np.argmax(best[cand]))
        chosen.append(left.pop(k))
    return np.array(chosen)


def numpy_reference_coords(grid: np.ndarray, s: int):
    """Reference read-out, its mapping k / n * 2 - 1 -> (idx laid out like coords, coords)."""
    h, w = grid.shape
    idx = np.sort(numpy_reference_fps(numpy_reference_points(grid), s * s))  # raster order
    pairs = np.stack([idx // w / h, idx % w / w], axis=-1) * 2 - 1  # (row, col) as (x, y)
    coords = pairs.reshape(s, s, 2).transpose(1, 0, 2)  # the reference's coords.permute(0, 2, 1, 3)
    return idx.reshape(s, s).T.reshape(-1), coords


def naive_fps(points: torch.Tensor, n: int, start: int = 0) -> list[int]:
    """Per-image greedy FPS written from the definition (float64 Python loops over a distance table)."""
    p = points.double()
    d2 = ((p[:, None, :] - p[None, :, :]) ** 2).sum(-1)
    chosen = [start]
    for _ in range(n - 1):
        best, arg = -1.0, -1
        for j in range(len(p)):
            if j in chosen:
                continue
            m = min(d2[j, c].item() for c in chosen)
            if m > best:
                best, arg = m, j
        chosen.append(arg)
    return chosen


# ------------------------------------------------------------------ tests
def test_pool_depth_is_adaptive_average():
    depth = _depth(2, 8, 12)
    pooled = pool_depth(depth, (4, 3))
    assert pooled.shape == (2, 4, 3)
    manual = depth[:, 0].reshape(2, 4, 2, 3, 4).mean(dim=(2, 4))
    torch.testing.assert_close(pooled, manual)
    with pytest.raises(ValueError, match="B,1,H,W"):
        pool_depth(torch.rand(2, 3, 8, 8), (4, 4))


def test_lift_points_cameras():
    grid = torch.rand(2, 4, 6, dtype=torch.float64)
    pts = lift_points(grid, fov_deg=90.0).reshape(2, 4, 6, 3)
    i, j = 1, 4
    d = grid[:, i, j]
    # correct camera, fov in degrees: 2 tan(45 deg) = 2, pixel centres, focal from the width
    torch.testing.assert_close(pts[:, i, j, 0], d * 2.0 * (j + 0.5 - 3) / 6)
    torch.testing.assert_close(pts[:, i, j, 1], d * 2.0 * (i + 0.5 - 2) / 6)
    torch.testing.assert_close(pts[:, i, j, 2], d)
    ref = lift_points(grid, fov_deg=90.0, reference=True).reshape(2, 4, 6, 3)
    f = 2 * math.tan(45.0)  # radians, as the reference code evaluates it
    assert abs(f - 3.2396) < 1e-3
    torch.testing.assert_close(ref[:, i, j, 0], f * d * (j - 3) / 6)
    torch.testing.assert_close(ref[:, i, j, 1], f * d * (i - 2) / 4)
    torch.testing.assert_close(ref[:, i, j, 2], -5 * d)


def test_argmax_returns_first_maximum():
    x = torch.tensor([[0.0, 3.0, 1.0, 3.0, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    assert x.argmax(dim=1).tolist() == [1, 0]


@pytest.mark.parametrize("backend", ["torch", "numpy", "compiled"])
def test_batched_fps_equals_naive_per_image_fps(backend):
    g = torch.Generator().manual_seed(1)
    points = torch.rand(4, 40, 3, generator=g)
    start = torch.tensor([0, 5, 39, 17])
    idx = farthest_point_sample(points, 12, start, backend=backend)
    assert idx.shape == (4, 12) and idx.dtype == torch.long
    for b in range(4):
        assert idx[b].tolist() == naive_fps(points[b], 12, int(start[b]))
    assert farthest_point_sample(points, 12)[:, 0].tolist() == [0, 0, 0, 0]  # default start


def test_every_chosen_point_is_the_farthest_from_those_before_it():
    points = lift_points(pool_depth(_depth(3, 24, 24, seed=2), (12, 12)))
    idx = farthest_point_sample(points, 25)
    for b in range(3):
        p = points[b].double()
        table = ((p[:, None, :] - p[None, :, :]) ** 2).sum(-1)
        for k in range(1, 25):
            d_all = table[:, idx[b, :k]].amin(dim=1)
            d_all[idx[b, :k]] = -1.0
            assert d_all[idx[b, k]] == d_all.max()
        assert len(set(idx[b].tolist())) == 25


@pytest.mark.parametrize("backend", ["torch", "numpy", "compiled"])
def test_fps_tie_break_and_duplicates(backend):
    # a square and duplicated points: ties go to the lowest index, chosen points are never repeated
    pts = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.float32)
    idx = farthest_point_sample(pts[None], 6, backend=backend)[0].tolist()
    assert idx == naive_fps(pts, 6) == [0, 3, 1, 2, 4, 5]


def test_cpu_backends_agree_on_a_28x28_grid():
    points = lift_points(pool_depth(_depth(4, 56, 56, seed=9), (28, 28)), reference=True)
    start = torch.tensor([0, 100, 783, 5])
    a = farthest_point_sample(points, 121, start, backend="torch")
    b = farthest_point_sample(points, 121, start, backend="numpy")
    c = farthest_point_sample(points, 121, start, backend="compiled")
    assert torch.equal(a, b) and torch.equal(c, b) and torch.equal(farthest_point_sample(points, 121, start), b)
    with pytest.raises(ValueError, match="backend"):
        farthest_point_sample(points, 4, backend="cuda")


@pytest.mark.parametrize("side, s, batch", [(14, 5, 3), (28, 11, 2)])
def test_fps_reference_matches_independent_numpy_reference(side, s, batch):
    depth = _depth(batch, side * 4, side * 4, seed=3)
    loc = sample_locations("fps_reference", depth, (side, side), s)
    grid = pool_depth(depth, (side, side)).numpy()
    for b in range(batch):
        idx, coords = numpy_reference_coords(grid[b], s)
        assert loc.idx[b].tolist() == idx.tolist()
        np.testing.assert_allclose(loc.coords[b].numpy(), coords, atol=1e-6, rtol=0)
    assert loc.coords.shape == (batch, s, s, 2) and loc.depth.shape == (batch, s * s)


def _bilinear(img: torch.Tensor, row: float, col: float) -> float:
    """img [h,w] at a continuous (row, col) position, by hand."""
    r0, c0 = int(math.floor(row)), int(math.floor(col))
    r1, c1 = min(r0 + 1, img.shape[0] - 1), min(c0 + 1, img.shape[1] - 1)
    fr, fc = row - r0, col - c0
    top = img[r0, c0] * (1 - fc) + img[r0, c1] * fc
    bottom = img[r1, c0] * (1 - fc) + img[r1, c1] * fc
    return float(top * (1 - fr) + bottom * fr)


def test_fps_reference_reads_the_transposed_patches_where_the_reference_reads():
    """Chosen patch (r, c) is read at column r * (n-1)/n and row c * (n-1)/n: transposed, and k/n * 2 - 1 under
    align_corners lands k/n of a patch short of patch k (up to 0.875 patch at n = 8, 0.96 at n = 28)."""
    depth = _depth(2, 32, 32, seed=4)
    n = 8
    loc = sample_locations("fps_reference", depth, (n, n), 3)
    grid = pool_depth(depth, (n, n))
    rows, cols = loc.idx // n, loc.idx % n
    for b in range(2):
        for k in range(9):
            r, c = int(rows[b, k]), int(cols[b, k])
            expected = _bilinear(grid[b], c * (n - 1) / n, r * (n - 1) / n)
            assert loc.depth[b, k].item() == pytest.approx(expected, abs=1e-6)
    read = F.grid_sample(grid[:, None], loc.coords, align_corners=True, padding_mode="border")
    torch.testing.assert_close(read.flatten(1), loc.depth)
    assert (loc.coords[..., 0] == rows.reshape(2, 3, 3).float() / n * 2 - 1).all()


def test_fps_reads_the_chosen_patch_centres():
    depth = _depth(2, 32, 48, seed=5)
    h, w, s = 8, 12, 4
    loc = sample_locations("fps", depth, (h, w), s)
    grid = pool_depth(depth, (h, w))
    points = lift_points(grid)
    assert loc.idx.tolist() == farthest_point_sample(points, s * s).tolist()
    # a map whose value at (row, col) is row * 100 + col, read at the coords, gives back the chosen patches
    code = (torch.arange(h)[:, None] * 100 + torch.arange(w)[None, :]).float().expand(2, 1, h, w)
    read = F.grid_sample(code, loc.coords, align_corners=True, padding_mode="border").flatten(1)
    torch.testing.assert_close(read, ((loc.idx // w) * 100 + loc.idx % w).float(), atol=1e-3, rtol=0)
    torch.testing.assert_close(loc.depth, grid.reshape(2, -1).gather(1, loc.idx))
    torch.testing.assert_close(loc.points, points[torch.arange(2)[:, None], loc.idx])


def test_fps_random_start_is_reproducible_and_seed_dependent():
    depth = _depth(4, 32, 32, seed=6)

    def run(seed):
        return sample_locations("fps", depth, (8, 8), 3, start="random",
                                generator=torch.Generator().manual_seed(seed)).idx

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b)
    assert not torch.equal(a[:, 0], c[:, 0])
    starts = run(0)[:, 0]
    expected = torch.randint(0, 64, (4,), generator=torch.Generator().manual_seed(0))
    assert starts.tolist() == expected.tolist()


def test_random_mode_reads_depth_and_points_at_the_coords():
    depth = _depth(2, 16, 16, seed=7)
    loc = sample_locations("random", depth, (8, 8), 4, generator=torch.Generator().manual_seed(3))
    again = sample_locations("random", depth, (8, 8), 4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(loc.coords, again.coords) and loc.idx is None
    assert loc.coords.abs().max() <= 1.0
    grid = pool_depth(depth, (8, 8))
    read = F.grid_sample(grid[:, None], loc.coords, align_corners=True, padding_mode="border").flatten(1)
    torch.testing.assert_close(loc.depth, read)
    pts = lift_points(grid).transpose(1, 2).reshape(2, 3, 8, 8)
    read_pts = F.grid_sample(pts, loc.coords, align_corners=True, padding_mode="border").flatten(2)
    torch.testing.assert_close(loc.points, read_pts.transpose(1, 2))


def test_sample_locations_errors_name_the_key():
    depth = _depth(1, 8, 8)
    with pytest.raises(ValueError, match="sampling.mode"):
        sample_locations("grid", depth, (4, 4), 2)
    with pytest.raises(ValueError, match="sampling.samples"):
        sample_locations("fps", depth, (4, 4), 5)
    with pytest.raises(ValueError, match="sampling.start"):
        sample_locations("fps_reference", depth, (4, 4), 2, start="random")
    assert sampling.MODES == ("fps", "fps_reference", "random")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fps_on_gpu_matches_cpu():
    depth = _depth(8, 64, 64, seed=8)
    cpu = sample_locations("fps_reference", depth, (28, 28), 11)
    gpu = sample_locations("fps_reference", depth.cuda(), (28, 28), 11)
    assert torch.equal(cpu.idx, gpu.idx.cpu())
