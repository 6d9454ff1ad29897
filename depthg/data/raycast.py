"""A tiny numpy ray caster with a z-buffer, used by the synthetic street scenes.

Camera: pinhole at (0, cam_h, 0) looking along +Z, X to the right, Y up, no roll or pitch, so the
horizon is the row ``cy``. The ray through pixel (v, u) is d = (a[u], b[v], 1) with
a = (u + 0.5 - cx) / f and b = -(v + 0.5 - cy) / f; because d_z = 1 the ray parameter t of a hit
*is* its planar depth Z. Primitives (axis-aligned boxes, axis-aligned ellipsoids) are intersected
only inside the image box their bounds project to, and composed with a z-buffer.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NEAR = 0.3  # metres: hits closer than this are ignored


@dataclass
class Camera:
    height: int
    width: int
    f: float
    cx: float
    cy: float
    cam_h: float

    @property
    def a(self) -> np.ndarray:  # [W]
        return (np.arange(self.width) + 0.5 - self.cx) / self.f

    @property
    def b(self) -> np.ndarray:  # [H]
        return -(np.arange(self.height) + 0.5 - self.cy) / self.f

    def bbox(self, lo, hi):
        """Pixel window (v0, v1, u0, u1) covering the axis-aligned box lo..hi, or None if unseen."""
        xs, ys, zs = np.meshgrid([lo[0], hi[0]], [lo[1], hi[1]], [lo[2], hi[2]], indexing="ij")
        xs, ys, zs = xs.ravel(), ys.ravel(), zs.ravel()
        if zs.max() <= NEAR:
            return None
        if zs.min() <= NEAR:  # straddles the camera plane: be conservative
            return 0, self.height, 0, self.width
        u = self.cx + self.f * xs / zs
        v = self.cy - self.f * (ys - self.cam_h) / zs
        u0, u1 = int(max(np.floor(u.min()) - 1, 0)), int(min(np.ceil(u.max()) + 1, self.width))
        v0, v1 = int(max(np.floor(v.min()) - 1, 0)), int(min(np.ceil(v.max()) + 1, self.height))
        if u0 >= u1 or v0 >= v1:
            return None
        return v0, v1, u0, u1


@dataclass
class Hit:
    """Hits of one primitive inside window (v0, v1, u0, u1): ``mask`` [h,w], and for the hit pixels
    only (flattened in mask order): ``t`` (= depth Z), points ``p`` [n,3] and unit normals ``n`` [n,3]."""

    window: tuple
    mask: np.ndarray
    t: np.ndarray
    p: np.ndarray
    n: np.ndarray


def _rays(cam: Camera, win):
    v0, v1, u0, u1 = win
    a = cam.a[u0:u1][None, :]
    b = cam.b[v0:v1][:, None]
    return np.broadcast_to(a, (v1 - v0, u1 - u0)), np.broadcast_to(b, (v1 - v0, u1 - u0))


def _finish(cam, win, mask, t, a, b, normal_fn) -> Hit | None:
    if not mask.any():
        return None
    t = t[mask]
    p = np.stack([t * a[mask], cam.cam_h + t * b[mask], t], axis=1)
    return Hit(win, mask, t, p, normal_fn(mask, p))


def ray_box(cam: Camera, lo, hi) -> Hit | None:
    """Slab test against the box lo..hi (3-vectors)."""
    win = cam.bbox(lo, hi)
    if win is None:
        return None
    a, b = _rays(cam, win)
    origin = (0.0, cam.cam_h, 0.0)
    dirs = (a, b, np.ones_like(a))
    nears, fars = [], []
    with np.errstate(divide="ignore", invalid="ignore"):
        for k in range(3):
            t0 = (lo[k] - origin[k]) / dirs[k]
            t1 = (hi[k] - origin[k]) / dirs[k]
            nears.append(np.minimum(t0, t1))
            fars.append(np.maximum(t0, t1))
    near = np.stack(nears)  # [3,h,w]
    t_in = near.max(0)
    mask = (t_in <= np.minimum.reduce(fars)) & (t_in > NEAR)
    axis = near.argmax(0)

    def normals(m, p):
        ax = axis[m]
        n = np.zeros((len(ax), 3))
        d = np.stack([a[m], b[m], np.ones(len(ax))], 1)
        n[np.arange(len(ax)), ax] = -np.sign(d[np.arange(len(ax)), ax])
        return n

    return _finish(cam, win, mask, t_in, a, b, normals)


def ray_ellipsoid(cam: Camera, centre, radii) -> Hit | None:
    """Front intersection with the axis-aligned ellipsoid ((p - c) / r)^2 = 1."""
    c, r = np.asarray(centre, float), np.asarray(radii, float)
    win = cam.bbox(c - r, c + r)
    if win is None:
        return None
    a, b = _rays(cam, win)
    ox, oy, oz = (0 - c[0]) / r[0], (cam.cam_h - c[1]) / r[1], (0 - c[2]) / r[2]
    dx, dy, dz = a / r[0], b / r[1], 1.0 / r[2]
    qa = dx * dx + dy * dy + dz * dz
    qb = 2 * (ox * dx + oy * dy + oz * dz)
    qc = ox * ox + oy * oy + oz * oz - 1
    disc = qb * qb - 4 * qa * qc
    t = (-qb - np.sqrt(np.maximum(disc, 0))) / (2 * qa)
    mask = (disc >= 0) & (t > NEAR)

    def normals(m, p):
        n = (p - c) / (r * r)
        return n / np.linalg.norm(n, axis=1, keepdims=True)

    return _finish(cam, win, mask, t, a, b, normals)


class Canvas:
    """Z-buffered label / depth / colour images."""

    def __init__(self, height: int, width: int, far: float):
        self.depth = np.full((height, width), far, np.float64)
        self.label = np.zeros((height, width), np.int64)
        self.rgb = np.zeros((height, width, 3), np.float64)
        self.normal = np.zeros((height, width, 3), np.float64)
        self.normal[..., 1] = 1.0

    def draw(self, hit: Hit | None, label: int, rgb: np.ndarray) -> np.ndarray | None:
        """Write the hit pixels nearer than the z-buffer; ``rgb`` is [n,3] (or [3]) for the hits.
        Returns the boolean mask (over the hits) of the pixels that were written."""
        if hit is None:
            return None
        v0, v1, u0, u1 = hit.window
        zwin = self.depth[v0:v1, u0:u1]
        closer = hit.t < zwin[hit.mask]
        sel = np.zeros_like(hit.mask)
        sel[hit.mask] = closer
        zwin[sel] = hit.t[closer]
        self.label[v0:v1, u0:u1][sel] = label
        rgb = np.broadcast_to(np.asarray(rgb, float), (len(hit.t), 3))
        self.rgb[v0:v1, u0:u1][sel] = rgb[closer]
        self.normal[v0:v1, u0:u1][sel] = hit.n[closer]
        return closer
