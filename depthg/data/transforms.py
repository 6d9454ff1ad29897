"""Crops and resizes shared by data preparation, training and evaluation (METHOD.md section 8-9).

- ``five_crop``: four corner crops + the centre crop at ``ratio`` of the height and width, of image,
  depth and label together; depth is *not* renormalised (it was normalised on the full image, the
  reference code's behaviour) unless ``renormalise_depth``: then each crop's depth is min-max
  normalised again to [0,1] (the paper's text: d in [0,1] of the cropped image).
  Crop size ``int(H * ratio) x int(W * ratio)``; the centre crop's offset is
  ``round((H - h) / 2)``, ``round((W - w) / 2)`` (torchvision's convention).
- ``resize_center_crop``: the one resize used everywhere (streaming, evaluation, mining, inference):
  shorter side -> ``size`` (longer side ``int(size * long / short)``) with nearest neighbour, then a
  centre ``size x size`` crop, exactly the reference's transform.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from depthg.data.base import Record, minmax


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


def five_crop(record: Record, ratio: float = 0.5, renormalise_depth: bool = False) -> list[Record]:
    """Five crops of ``record`` with ids ``"{id}_c{k}"``, k = 0..4 (TL, TR, BL, BR, centre).

    ``renormalise_depth``: each crop's depth is min-max normalised to [0,1] again (a constant crop -> 0).
    """
    height, width = record.image.shape[:2]
    crops = []
    for k, box in enumerate(crop_boxes(height, width, ratio)):
        depth = _cut(record.depth, box)
        if renormalise_depth and depth is not None:
            depth = minmax(depth)
        crops.append(replace(record, id=f"{record.id}_c{k}", image=_cut(record.image, box), depth=depth,
                             label=_cut(record.label, box)))
    return crops


def _short_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """torchvision's ``Resize(size)`` rule: shorter side -> ``size``, longer side ``int(size * long / short)``."""
    if height <= width:
        return size, max(int(size * width / height), size)
    return max(int(size * height / width), size), size


def _nearest_index(src: int, dst: int) -> np.ndarray:
    """Source index of each of ``dst`` output pixels: ``floor((i + 0.5) * src / dst)``, PIL's NEAREST rule."""
    return np.minimum(((np.arange(dst) + 0.5) * src / dst).astype(np.int64), src - 1)


def resize_center_crop(arr: np.ndarray, size: int, crop: bool = True) -> np.ndarray:
    """THE resize of the project: nearest-neighbour shorter side -> ``size``, then a centre ``size x size`` crop.

    ``arr`` is ``[H,W]`` or ``[H,W,C]`` of any dtype (image, depth or label alike), so training
    (``depthg.streaming``), evaluation, neighbour mining and inference see the same pixels. It is the
    reference's ``T.Resize(size, NEAREST)`` + ``T.CenterCrop(size)`` on a PIL image: longer side
    ``int(size * long / short)``, PIL's pixel-centre nearest rule, crop offset ``round((H' - size) / 2)``.
    ``crop=False`` stops after the resize (inference on whole images of any aspect ratio).
    Nearest for every kind keeps labels exact and depth unblended at object edges. An array that is already
    ``size x size`` comes back as it is (no copy): stage-2 samples are stored at the training resolution.
    """
    arr = np.asarray(arr)
    if arr.ndim not in (2, 3):
        raise ValueError(f"resize_center_crop: expected [H,W] or [H,W,C], got shape {arr.shape}")
    if crop and arr.shape[0] == size and arr.shape[1] == size:
        return arr  # already size x size: the resize and the crop are the identity (stage-2 samples)
    out_h, out_w = _short_side_size(arr.shape[0], arr.shape[1], size)
    rows, cols = _nearest_index(arr.shape[0], out_h), _nearest_index(arr.shape[1], out_w)
    if crop:
        top, left = int(round((out_h - size) / 2)), int(round((out_w - size) / 2))
        rows, cols = rows[top:top + size], cols[left:left + size]
    return np.ascontiguousarray(arr[rows[:, None], cols[None, :]])


def transform_record(record: Record, size: int) -> Record:
    """``resize_center_crop`` of a record's image, depth and label."""
    return replace(record, image=resize_center_crop(record.image, size),
                   depth=None if record.depth is None else resize_center_crop(record.depth, size),
                   label=None if record.label is None else resize_center_crop(record.label, size))


def to_tensor_image(image: np.ndarray) -> "torch.Tensor":
    """uint8 [H,W,3] -> float32 [3,H,W] in [0,1]."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 [H,W,3] image, got {image.dtype} {image.shape}")
    import torch  # here: listing a source (stage 1's driver) needs no torch

    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0)
