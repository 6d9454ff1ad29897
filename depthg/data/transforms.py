"""Crops and resizes shared by data preparation, training and evaluation (METHOD.md section 8-9).

- ``five_crop``: four corner crops + the centre crop at ``ratio`` of the height and width, of image,
  depth and label together; depth is *not* renormalised (it was normalised on the full image).
  Crop size ``int(H * ratio) x int(W * ratio)``; the centre crop's offset is
  ``round((H - h) / 2)``, ``round((W - w) / 2)`` (torchvision's convention).
- ``resize_short_center_crop``: shorter side -> ``size`` (longer side ``int(size * long / short)``),
  then a centre ``size x size`` crop. Images default to nearest neighbour as in the reference
  (``nearest=False`` gives bilinear); depth is bilinear; labels are always nearest.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from depthg.data.base import Record


def crop_boxes(height: int, width: int, ratio: float = 0.5) -> list[tuple[int, int, int, int]]:
    """(top, left, h, w) of the five crops, in order TL, TR, BL, BR, centre."""
    if not 0 < ratio <= 1:
        raise ValueError(f"crop ratio must be in (0, 1], got {ratio}")
    h, w = int(height * ratio), int(width * ratio)
    if h < 1 or w < 1:
        raise ValueError(f"crop ratio {ratio} of a {height}x{width} image leaves an empty crop")
    ct, cl = int(round((height - h) / 2)), int(round((width - w) / 2))
    return [(0, 0, h, w), (0, width - w, h, w), (height - h, 0, h, w), (height - h, width - w, h, w), (ct, cl, h, w)]


def _cut(arr, box):
    if arr is None:
        return None
    t, l, h, w = box
    return np.ascontiguousarray(arr[t:t + h, l:l + w])


def five_crop(record: Record, ratio: float = 0.5) -> list[Record]:
    """Five crops of ``record`` with ids ``"{id}_c{k}"``, k = 0..4 (TL, TR, BL, BR, centre)."""
    height, width = record.image.shape[:2]
    return [replace(record, id=f"{record.id}_c{k}", image=_cut(record.image, box),
                    depth=_cut(record.depth, box), label=_cut(record.label, box))
            for k, box in enumerate(crop_boxes(height, width, ratio))]


def _short_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    if height <= width:
        return size, max(int(size * width / height), size)
    return max(int(size * height / width), size), size


def _nearest(arr: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    # source index of output pixel i: floor((i + 0.5) * in / out), the pixel-centre rule
    rows = np.minimum(((np.arange(out_h) + 0.5) * arr.shape[0] / out_h).astype(np.int64), arr.shape[0] - 1)
    cols = np.minimum(((np.arange(out_w) + 0.5) * arr.shape[1] / out_w).astype(np.int64), arr.shape[1] - 1)
    return arr[rows[:, None], cols[None, :]]


def _bilinear(arr: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    if arr.dtype == np.uint8:
        mode = "RGB" if arr.ndim == 3 else "L"
        return np.asarray(Image.fromarray(arr, mode).resize((out_w, out_h), Image.BILINEAR))
    if arr.ndim != 2:
        raise ValueError(f"bilinear resize of float arrays expects [H,W], got {arr.shape}")
    img = Image.fromarray(arr.astype(np.float32), mode="F")
    return np.asarray(img.resize((out_w, out_h), Image.BILINEAR)).astype(arr.dtype)


def resize_short_center_crop(arr: np.ndarray, size: int, nearest: bool | None = None) -> np.ndarray:
    """Resize the shorter side to ``size`` and centre-crop ``size x size``.

    ``nearest=None`` picks by kind: uint8 images -> nearest (the reference), float depth -> bilinear,
    integer labels -> nearest. Labels refuse ``nearest=False``."""
    arr = np.asarray(arr)
    is_label = arr.ndim == 2 and np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.uint8
    if nearest is None:
        nearest = not np.issubdtype(arr.dtype, np.floating)
    if is_label and not nearest:
        raise ValueError("labels must be resized with nearest neighbour")
    out_h, out_w = _short_side_size(arr.shape[0], arr.shape[1], size)
    if (out_h, out_w) != arr.shape[:2]:
        arr = _nearest(arr, out_h, out_w) if nearest else _bilinear(arr, out_h, out_w)
    top, left = int(round((out_h - size) / 2)), int(round((out_w - size) / 2))
    return np.ascontiguousarray(arr[top:top + size, left:left + size])


resize_center_crop = resize_short_center_crop  # the name DESIGN.md uses


def transform_record(record: Record, size: int, nearest_image: bool = True) -> Record:
    """``resize_short_center_crop`` of image (nearest by default), depth (bilinear), label (nearest)."""
    return replace(record, image=resize_short_center_crop(record.image, size, nearest_image),
                   depth=None if record.depth is None else resize_short_center_crop(record.depth, size, False),
                   label=None if record.label is None else resize_short_center_crop(record.label, size, True))


def to_tensor_image(image: np.ndarray) -> torch.Tensor:
    """uint8 [H,W,3] -> float32 [3,H,W] in [0,1]."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 [H,W,3] image, got {image.dtype} {image.shape}")
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0)
