"""Procedural 3D street scenes with exact labels and metric depth: a fair test bed for depth guidance.

Each scene is ray cast (numpy, ``raycast.py``) from a pinhole camera standing on a street:
a road strip and raised sidewalks (ground-plane depth; the curb is only 0.1-0.2 m high, so
road/sidewalk boundaries carry almost no depth step), sky above the horizon, building boxes along
both sides and across the far end (facades with window grids; rows of different setback and a
taller row behind give same-class depth jumps), trees (trunk + crown of ellipsoids), poles (with
arms and signs), cars (body, glass cabin, wheels, lights) and persons (ellipsoid stacks).

Fairness: colours are drawn per scene from *overlapping pools* (``POOLS``): cars, buildings,
clothing, poles, sidewalks and road share greys; cars, clothing and buildings share reds, blues,
beige; autumn trees share orange/yellow with cars; windows reflect sky blue. So per-pixel colour
cannot identify a class; shape, texture (windows, lane marks, paving tiles, leaf noise, wheels,
heads) and context can, which a CNN can learn. Lighting (sun direction, ambient, white balance,
exposure, image-space gradient, haze) and procedural value-noise textures vary per scene.

Determinism: scene ``index`` of ``split`` with ``seed`` is drawn from
``np.random.default_rng([seed, split_code, index])``; train and val use different split codes, so
their scene streams are disjoint. ``render_scene`` returns metric planar depth (sky = ``SKY_DEPTH``);
``SyntheticSource.load`` turns it into depth like a monocular estimator's: clipped at ``depth_max``
(default 10 m, ZoeDepth-NYU's range; 0 = the full metric range) and min-max normalised per image to
[0,1] (0 = near) by ``base.clip_minmax``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from depthg.data.base import ZOEDEPTH_NYU_MAX, Record, Source, SourceError, clip_minmax
from depthg.data.palettes import SYNTHETIC_CLASSES, SYNTHETIC_PALETTE
from depthg.data.raycast import Camera, Canvas, ray_box, ray_ellipsoid

SKY, ROAD, SIDEWALK, BUILDING, VEGETATION, POLE, CAR, PERSON = range(8)
SKY_DEPTH = 150.0
SPLIT_CODES = {"train": 1, "val": 2}

COLOURS = {
    "black": (35, 35, 38), "charcoal": (72, 72, 75), "grey": (118, 118, 120),
    "silver": (165, 165, 168), "light": (205, 205, 198), "white": (238, 238, 234),
    "red": (165, 42, 36), "blue": (48, 72, 150), "navy": (32, 40, 82), "beige": (205, 185, 145),
    "brown": (120, 82, 52), "darkgreen": (46, 86, 50), "green": (82, 130, 56),
    "olive": (112, 120, 52), "yellow": (214, 184, 62), "orange": (205, 116, 46),
    "skyblue": (140, 176, 215),
}
POOLS = {
    "sky": ["skyblue", "light", "white", "silver"],
    "road": ["black", "charcoal", "grey"],
    "sidewalk": ["grey", "silver", "light", "beige", "red", "charcoal"],
    "building": ["grey", "silver", "light", "white", "beige", "brown", "red", "skyblue", "yellow",
                 "charcoal", "orange"],
    "vegetation": ["darkgreen", "green", "olive", "orange", "yellow", "brown"],
    "pole": ["charcoal", "grey", "silver", "black", "darkgreen"],
    "car": ["black", "charcoal", "grey", "silver", "white", "red", "blue", "darkgreen", "yellow",
            "skyblue", "navy", "beige", "orange"],
    "clothes": ["black", "grey", "white", "red", "blue", "navy", "darkgreen", "beige", "yellow",
                "orange", "brown", "charcoal", "green"],
    "glass": ["navy", "charcoal", "skyblue", "black"],
    "sign": ["red", "blue", "white", "yellow"],
}
SKIN = [(224, 190, 160), (190, 140, 105), (140, 95, 65), (95, 65, 45)]
# texture-noise amplitude per class; vegetation also gets a fine "leaf" octave
NOISE_AMP = np.array([0.03, 0.10, 0.07, 0.06, 0.30, 0.04, 0.03, 0.05])


@dataclass
class Scene:
    image: np.ndarray  # uint8 [H,W,3]
    label: np.ndarray  # int64 [H,W]
    depth: np.ndarray  # float32 [H,W] metric planar depth (m); sky = SKY_DEPTH
    info: dict = field(default_factory=dict)


class _Painter:
    """Per-scene random state: colour picks (jittered) from the pools."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def colour(self, pool: str, jitter: float = 14.0) -> np.ndarray:
        name = POOLS[pool][self.rng.integers(len(POOLS[pool]))]
        return np.clip(np.array(COLOURS[name], float) + self.rng.normal(0, jitter, 3), 0, 255)


def _frac(x):
    return x - np.floor(x)


def _hash(i, j):
    return ((i.astype(np.int64) * 73856093) ^ (j.astype(np.int64) * 19349663)) % 101 / 101.0


# ----------------------------------------------------------------------------- ground and sky
def _sky(canvas: Canvas, cam: Camera, rng, paint: _Painter):
    zenith, horizon = paint.colour("sky", 10), paint.colour("sky", 10)
    if rng.random() < 0.6:  # clear blue sky above a paler horizon
        zenith = np.array(COLOURS["skyblue"], float) * rng.uniform(0.75, 1.0)
    rows = np.clip((cam.cy - np.arange(cam.height)) / max(cam.cy, 1.0), 0, 1)[:, None, None]
    canvas.rgb[:] = horizon * (1 - rows) + zenith * rows
    canvas.label[:] = SKY


def _ground(canvas: Canvas, cam: Camera, street: dict, paint: _Painter):
    """Road plane Y=0 for |X-xc| < rw, sidewalk plane Y=ch outside, curb faces in between."""
    xc, rw, ch = street["xc"], street["rw"], street["ch"]
    vs = np.nonzero(cam.b < -1e-6)[0]
    if len(vs) == 0:
        return
    a, b = np.meshgrid(cam.a, cam.b[vs])
    t_road = cam.cam_h / -b
    t_walk = (cam.cam_h - ch) / -b
    x_road, x_walk = t_road * a, t_walk * a
    is_road = np.abs(x_road - xc) < rw
    is_walk = np.abs(x_walk - xc) >= rw
    side = np.sign(x_road - xc)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_curb = (xc + side * rw) / a
    t = np.where(is_road, t_road, np.where(is_walk, t_walk, t_curb))
    label = np.where(is_road, ROAD, SIDEWALK)
    x, z = t * a, t
    rgb = np.where(is_road[..., None], _road_texture(x, z, street), _walk_texture(x, z, street))
    curb = ~is_road & ~is_walk
    rgb[curb] = street["curb_col"]
    normal = np.zeros(t.shape + (3,))
    normal[..., 1] = 1.0
    normal[curb, 0] = -side[curb]
    normal[curb, 1] = 0.0
    t = np.minimum(t, SKY_DEPTH)
    canvas.depth[vs], canvas.label[vs], canvas.rgb[vs], canvas.normal[vs] = t, label, rgb, normal


def _road_texture(x, z, street):
    rel = x - street["xc"]
    col = np.broadcast_to(street["road_col"], x.shape + (3,)).copy()
    dash = (np.abs(rel - street["lane_x"]) < 0.08) & (_frac(z / 9.0) < 0.45)
    edge = np.abs(np.abs(rel) - (street["rw"] - 0.3)) < 0.07
    col[dash | edge] = street["mark_col"]
    patches = _hash(np.floor(x / 2.5), np.floor(z / 4.0))[..., None]
    return col * (0.9 + 0.2 * patches)


def _walk_texture(x, z, street):
    ts = street["tile"]
    col = np.broadcast_to(street["walk_col"], x.shape + (3,)).copy()
    grout = (_frac(x / ts) < 0.07) | (_frac(z / ts) < 0.07)
    col[grout] *= 0.72
    return col


# ----------------------------------------------------------------------------- buildings
def _facade(hit, base, glass, prm):
    """Window grid on vertical faces (texture coords from the 3D hit point: perspective-correct)."""
    p, n = hit.p, hit.n
    along = np.where(np.abs(n[:, 0]) > 0.5, p[:, 2], p[:, 0])
    y = p[:, 1]
    fy, fs = y / prm["floor"], along / prm["spacing"]
    vertical = np.abs(n[:, 1]) < 0.5
    win = (vertical & (np.abs(_frac(fs) - 0.5) < prm["win_w"] / 2) & (_frac(fy) > 0.3)
           & (_frac(fy) < 0.82) & (y > prm["floor"] * 1.1) & (y < prm["top"] - 0.6))
    lit = _hash(np.floor(fs), np.floor(fy))
    col = np.broadcast_to(base, (len(p), 3)).copy()
    col[vertical & (_frac(fy) < 0.06)] *= 0.8  # floor bands
    col[win] = glass * (0.7 + 0.6 * lit[win, None])
    return col


def _building(canvas, cam, rng, paint, lo, hi):
    hit = ray_box(cam, lo, hi)
    if hit is None:
        return
    prm = {"floor": rng.uniform(2.8, 3.8), "spacing": rng.uniform(2.0, 4.0),
           "win_w": rng.uniform(0.3, 0.6), "top": hi[1]}
    canvas.draw(hit, BUILDING, _facade(hit, paint.colour("building"), paint.colour("glass"), prm))


def _buildings(canvas, cam, rng, paint, street):
    edge = street["rw"] + street["sw"]
    zfar = street["zfar"]
    for side in (-1, 1):
        z = rng.uniform(-6, 6)
        while z < zfar:
            length = rng.uniform(7, 25)
            if rng.random() > 0.2:
                x0 = street["xc"] + side * (edge + rng.uniform(0, 3.5))
                xs = sorted([x0, x0 + side * 15])
                _building(canvas, cam, rng, paint, (xs[0], 0, z), (xs[1], rng.uniform(5, 26), z + length))
            z += length
        if rng.random() < 0.6:  # a taller row further out, seen above the first
            x0 = street["xc"] + side * (edge + rng.uniform(18, 30))
            xs = sorted([x0, x0 + side * 20])
            z0 = rng.uniform(0, 25)
            _building(canvas, cam, rng, paint, (xs[0], 0, z0), (xs[1], rng.uniform(28, 50), z0 + rng.uniform(20, 50)))
    x = -90.0
    while x < 90:  # across the far end of the street, in two staggered rows
        w = rng.uniform(8, 25)
        if rng.random() > 0.1:
            z0 = zfar + rng.uniform(0, 25)
            _building(canvas, cam, rng, paint, (x, 0, z0), (x + w, rng.uniform(8, 45), z0 + 15))
        x += w


# ----------------------------------------------------------------------------- street furniture
def _tree(canvas, cam, rng, paint, x, z):
    trunk_h, tw = rng.uniform(1.8, 3.2), rng.uniform(0.12, 0.2)
    trunk_col = paint.colour("vegetation") * 0.5 + np.array(COLOURS["brown"]) * 0.5
    canvas.draw(ray_box(cam, (x - tw, 0, z - tw), (x + tw, trunk_h + 0.5, z + tw)), VEGETATION, trunk_col)
    crown = rng.uniform(1.3, 2.5)
    leaf = paint.colour("vegetation")
    for _ in range(rng.integers(3, 6)):
        c = (x + rng.uniform(-0.5, 0.5) * crown, trunk_h + crown * rng.uniform(0.5, 1.2),
             z + rng.uniform(-0.5, 0.5) * crown)
        r = crown * rng.uniform(0.55, 0.9) * np.array([1.0, rng.uniform(0.8, 1.2), 1.0])
        canvas.draw(ray_ellipsoid(cam, c, r), VEGETATION, leaf * rng.uniform(0.85, 1.15))


def _pole(canvas, cam, rng, paint, x, z, toward):
    h, w = rng.uniform(4, 8), rng.uniform(0.07, 0.11)
    col = paint.colour("pole")
    canvas.draw(ray_box(cam, (x - w, 0, z - w), (x + w, h, z + w)), POLE, col)
    if rng.random() < 0.6:  # lamp arm reaching over the road
        reach = rng.uniform(1.2, 2.5) * toward
        xs = sorted([x, x + reach])
        canvas.draw(ray_box(cam, (xs[0], h - 0.12, z - 0.06), (xs[1], h, z + 0.06)), POLE, col)
        canvas.draw(ray_box(cam, (x + reach - 0.25, h - 0.25, z - 0.12), (x + reach + 0.25, h - 0.1, z + 0.12)),
                    POLE, col * 1.2)
    elif rng.random() < 0.5:  # a sign plate facing the camera
        y0 = rng.uniform(2.0, h - 0.7)
        canvas.draw(ray_box(cam, (x - 0.3, y0, z - 0.13), (x + 0.3, y0 + 0.6, z - w)), POLE, paint.colour("sign"))


def _car(canvas, cam, rng, paint, x, z):
    length, width = rng.uniform(3.9, 4.8), rng.uniform(1.65, 1.9)
    y0, body_h, cab_h = 0.3, rng.uniform(0.5, 0.75), rng.uniform(0.45, 0.6)
    col, glass = paint.colour("car"), paint.colour("glass")
    lo, hi = np.array([x - width / 2, y0, z]), np.array([x + width / 2, y0 + body_h, z + length])
    hit = ray_box(cam, lo, hi)
    if hit is not None:
        rgb = np.broadcast_to(col, (len(hit.t), 3)).copy()
        rel_y = hit.p[:, 1] - y0
        rgb[rel_y < 0.15] *= 0.6  # bumper
        ends = np.abs(hit.n[:, 2]) > 0.5
        lamp = ends & (rel_y > body_h - 0.25) & (np.abs(np.abs(hit.p[:, 0] - x) - width / 2 + 0.25) < 0.15)
        rgb[lamp] = (230, 60, 40)
        canvas.draw(hit, CAR, rgb)
    front, back = rng.uniform(0.7, 1.3), rng.uniform(0.4, 0.9)
    cab = ray_box(cam, (lo[0] + 0.08, hi[1], z + back), (hi[0] - 0.08, hi[1] + cab_h, z + length - front))
    if cab is not None:
        rgb = np.broadcast_to(glass, (len(cab.t), 3)).copy()
        rgb[np.abs(cab.n[:, 1]) > 0.5] = col  # roof
        canvas.draw(cab, CAR, rgb)
    for wx in (lo[0] - 0.03, hi[0] - 0.22):
        for wz in (z + 0.55, z + length - 1.15):
            canvas.draw(ray_box(cam, (wx, 0, wz), (wx + 0.25, 0.62, wz + 0.6)), CAR, COLOURS["black"])


def _person(canvas, cam, rng, paint, x, z):
    s = rng.uniform(1.55, 1.9) / 1.75
    top, bottom = paint.colour("clothes"), paint.colour("clothes")
    skin = np.array(SKIN[rng.integers(len(SKIN))], float)
    parts = [((x - 0.1 * s, 0.42 * s, z), (0.08, 0.43, 0.09), bottom),
             ((x + 0.1 * s, 0.42 * s, z), (0.08, 0.43, 0.09), bottom),
             ((x, 1.13 * s, z), (0.21, 0.33, 0.13), top),
             ((x - 0.25 * s, 1.08 * s, z), (0.06, 0.3, 0.07), top),
             ((x + 0.25 * s, 1.08 * s, z), (0.06, 0.3, 0.07), top),
             ((x, 1.62 * s, z), (0.1, 0.12, 0.11), skin)]
    for centre, radii, col in parts:
        canvas.draw(ray_ellipsoid(cam, centre, np.array(radii) * s), PERSON, col)


def _furniture(canvas, cam, rng, paint, street):
    """Trees, poles, cars and persons; at least one of each placed near enough to be seen."""
    xc, rw, sw = street["xc"], street["rw"], street["sw"]
    for side in (-1, 1):
        z = rng.uniform(4, 12)
        while rng.random() < 0.75 and z < 60:
            _tree(canvas, cam, rng, paint, xc + side * (rw + rng.uniform(0.6, sw - 0.4)), z)
            z += rng.uniform(7, 16)
        for _ in range(rng.integers(1, 4)):
            _pole(canvas, cam, rng, paint, xc + side * (rw + 0.35), rng.uniform(4, 45), -side)
    _tree(canvas, cam, rng, paint, xc + rng.choice([-1, 1]) * (rw + sw * 0.5), rng.uniform(7, 22))
    _pole(canvas, cam, rng, paint, xc - (rw + 0.35), rng.uniform(5, 20), 1)
    lanes = [-rw / 2, rw / 2, -(rw - 1.2), rw - 1.2]
    taken: list[tuple[float, float]] = []
    for k in range(rng.integers(2, 7)):
        lx = xc + lanes[rng.integers(len(lanes))]
        cz = rng.uniform(5, 22) if k == 0 else rng.uniform(5, 70)
        if all(abs(lx - tx) > 2.2 or abs(cz - tz) > 6.0 for tx, tz in taken):
            taken.append((lx, cz))
            _car(canvas, cam, rng, paint, lx, cz)
    for k in range(rng.integers(3, 8)):
        side = rng.choice([-1, 1])
        px = xc + side * (rw + rng.uniform(0.4, sw - 0.3)) if rng.random() < 0.85 else xc + rng.uniform(-rw, rw) * 0.8
        _person(canvas, cam, rng, paint, px, rng.uniform(4, 14) if k < 2 else rng.uniform(4, 40))


# ----------------------------------------------------------------------------- image formation
def value_noise(rng, height: int, width: int, cells, weights) -> np.ndarray:
    """Multi-octave value noise in about [-1,1]: random grids of ``cell``-pixel spacing, bilinear."""
    out = np.zeros((height, width), np.float32)
    for cell, w in zip(cells, weights):
        gh, gw = height // cell + 2, width // cell + 2
        grid = rng.uniform(-1, 1, (gh, gw)).astype(np.float32)
        up = Image.fromarray(grid, mode="F").resize((gw * cell, gh * cell), Image.BILINEAR)
        out += w * np.asarray(up)[:height, :width]
    return out / max(sum(weights), 1e-6)


def _sample_street(rng, paint):
    rw = rng.uniform(3.5, 7.0)
    return {
        "xc": rng.uniform(-0.45, 0.45) * rw, "rw": rw, "sw": rng.uniform(2.2, 4.5),
        "ch": rng.uniform(0.1, 0.2), "zfar": rng.uniform(45, 90), "lane_x": rng.choice([0.0, -rw / 2, rw / 2]),
        "road_col": paint.colour("road", 8), "walk_col": paint.colour("sidewalk"),
        "curb_col": paint.colour("sidewalk") * 1.1, "tile": rng.uniform(0.4, 0.9),
        "mark_col": np.array(COLOURS["white"] if rng.random() < 0.8 else COLOURS["yellow"], float),
    }


def _light(canvas: Canvas, cam: Camera, rng) -> np.ndarray:
    """Lambert shading, per-class texture noise, haze, image gradient, white balance, sensor noise."""
    elev, azim = np.radians(rng.uniform(20, 70)), rng.uniform(0, 2 * np.pi)
    sun = np.array([np.cos(elev) * np.sin(azim), np.sin(elev), -np.cos(elev) * np.cos(azim)])
    ambient = rng.uniform(0.35, 0.6)
    shade = ambient + (1 - ambient) * np.clip(canvas.normal @ sun, 0, None)
    sky = canvas.label == SKY
    shade[sky] = 1.0
    h, w = cam.height, cam.width
    coarse = value_noise(rng, h, w, (max(h // 6, 2), max(h // 24, 2), 3), (1.0, 0.6, 0.4))
    fine = value_noise(rng, h, w, (2, 4), (1.0, 0.7))
    amp = NOISE_AMP[canvas.label]
    tex = 1 + amp * np.where(canvas.label == VEGETATION, 0.4 * coarse + 0.9 * fine, coarse)
    rgb = canvas.rgb * (shade * tex)[..., None]
    haze_col = canvas.rgb[sky].mean(0) if sky.any() else np.full(3, 200.0)
    haze = (1 - np.exp(-canvas.depth / rng.uniform(120, 400)))[..., None]
    rgb = np.where(sky[..., None], rgb, rgb * (1 - haze) + haze_col * haze)
    gy, gx = rng.uniform(-0.25, 0.25, 2)
    grad = 1 + gx * (np.arange(w) / w - 0.5)[None, :] + gy * (np.arange(h) / h - 0.5)[:, None]
    rgb = rgb * grad[..., None] * rng.uniform(0.8, 1.15) * (1 + rng.normal(0, 0.06, 3))
    rgb = rgb + rng.normal(0, 2.5, rgb.shape)
    return np.clip(rgb, 0, 255).round().astype(np.uint8)


def render_scene(seed: int, index: int, height: int = 240, width: int = 320, split: str = "train") -> Scene:
    """Render scene ``index`` of ``split``; a pure function of its arguments."""
    if split not in SPLIT_CODES:
        raise SourceError(f"synthetic split must be one of {list(SPLIT_CODES)}, got {split!r}")
    rng = np.random.default_rng([int(seed), SPLIT_CODES[split], int(index)])
    paint = _Painter(rng)
    f = (width / 2) / np.tan(np.radians(rng.uniform(62, 80)) / 2)
    cam = Camera(height, width, f, width * (0.5 + rng.uniform(-0.03, 0.03)),
                 height * rng.uniform(0.36, 0.5), rng.uniform(1.3, 1.9))
    canvas = Canvas(height, width, SKY_DEPTH)
    street = _sample_street(rng, paint)
    _sky(canvas, cam, rng, paint)
    _ground(canvas, cam, street, paint)
    _buildings(canvas, cam, rng, paint, street)
    _furniture(canvas, cam, rng, paint, street)
    image = _light(canvas, cam, rng)
    info = {"camera": cam, "street": {k: v for k, v in street.items() if np.isscalar(v)}}
    return Scene(image, canvas.label.copy(), canvas.depth.astype(np.float32), info)


class SyntheticSource(Source, classes=SYNTHETIC_CLASSES, palette=SYNTHETIC_PALETTE):
    """``num`` rendered street scenes of one split; ids ``"syn-{split}-{index:06d}"``.

    ``depth_max``: metric depth is clipped here (metres) before the per-image min-max, like the bounded
    output of ZoeDepth-NYU (the default, 10 m); 0 keeps the full range (sky at ``SKY_DEPTH``).
    """

    name = "synthetic"
    has_depth = True
    has_labels = True

    def __init__(self, num: int, height: int = 240, width: int = 320, seed: int = 0, split: str = "train",
                 depth_max: float = ZOEDEPTH_NYU_MAX, listed: bool = True):
        if split not in SPLIT_CODES:
            raise SourceError(f"synthetic split must be one of {list(SPLIT_CODES)}, got {split!r}")
        if num < 1 or height < 16 or width < 16:
            raise SourceError(f"synthetic source needs num >= 1 and a size >= 16x16, got {num} x {height}x{width}")
        if depth_max < 0:
            raise SourceError(f"synthetic source: depth_max must be >= 0 metres (0 = no clip), got {depth_max}")
        self.num, self.height, self.width, self.seed, self.split = num, height, width, seed, split
        self.depth_max = float(depth_max)
        self.where = f"the synthetic {split} split"
        self.listed(listed)

    def _scan(self):
        return ((f"syn-{self.split}-{i:06d}", "") for i in range(self.num))

    def read(self, id: str) -> tuple[Record, str]:
        scene = render_scene(self.seed, int(id.rsplit("-", 1)[1]), self.height, self.width, self.split)
        return Record(id, scene.image, clip_minmax(scene.depth, self.depth_max), scene.label), id
