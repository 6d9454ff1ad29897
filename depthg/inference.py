"""Inference on your own images: image files in, label maps at each image's own size out.

``launch/segment.py`` is the command; this module holds what it needs from the library:

* ``list_images``: the image files of a folder or a glob pattern (clear error when there are none);
* ``read_image``: ``depthg.data.read_image`` (the one image reader of the project);
* ``segment_images``: the project's one resize (``resize_center_crop`` with ``crop=False``: shorter side to
  ``resolution``, nearest, the whole image kept, edge-padded to the backbone's stride), codes averaged with the flipped image's, the one
  evaluation path ``depthg.evaluation.probe_scores`` at the resized size, the scores bilinearly resized
  to the image and optionally CRF-refined there;
* ``overlay``: a colour map blended over the image.
"""
from __future__ import annotations

import glob
import os
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from depthg import crf as crf_mod
from depthg.data.sources import read_image
from depthg.data.transforms import resize_center_crop, to_tensor_image
from depthg.evaluation import compute_codes, probe_scores

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
__all__ = ["IMAGE_EXTENSIONS", "list_images", "read_image", "segment_images", "overlay"]


def list_images(pattern: str) -> list[str]:
    """Image files of a folder (sorted) or of a glob pattern; a clear error when there are none."""
    if os.path.isdir(pattern):
        files = [os.path.join(pattern, f) for f in sorted(os.listdir(pattern))
                 if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {pattern}")
        return files
    files = sorted(f for f in glob.glob(pattern) if os.path.isfile(f))
    if not files:
        raise FileNotFoundError(f"input {pattern} is neither a folder nor a glob matching any file")
    return files


@torch.no_grad()
def segment_images(backbone, segmenter, images: Sequence[np.ndarray], resolution: int, probe: str = "cluster",
                   flip: bool = True, crf: bool = False, device: torch.device | str = "cpu") -> list[np.ndarray]:
    """Label maps int64 ``[H,W]`` (at each image's own size) for uint8 RGB images of any sizes.

    ``probe``: ``cluster`` (raw cluster ids) or ``linear`` (class ids). Images whose resized shapes agree
    run as one batch.
    """
    resized = [resize_center_crop(im, resolution, crop=False) for im in images]
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(resized):
        groups.setdefault(r.shape[:2], []).append(i)
    out: list[np.ndarray | None] = [None] * len(images)
    for (h, w), members in groups.items():
        x = torch.stack([to_tensor_image(_pad_to_multiple(resized[i], backbone.stride)) for i in members]).to(device)
        codes = compute_codes(backbone, segmenter.head, x, flip)
        scores = probe_scores(segmenter, codes, tuple(x.shape[2:]), (probe,))[probe][:, :, :h, :w]
        for i, s in zip(members, scores.cpu()):
            s = F.interpolate(s[None], size=images[i].shape[:2], mode="bilinear", align_corners=False)[0]
            probs = torch.from_numpy(crf_mod.dense_crf(images[i], s)) if crf else s
            out[i] = probs.argmax(dim=0).numpy().astype(np.int64)
    return out


def _pad_to_multiple(image: np.ndarray, multiple: int) -> np.ndarray:
    """Edge-pad the bottom/right of ``image`` [H,W,3] to multiples of the backbone's stride; the padded
    part of the scores is cut off again, so every image pixel keeps its place."""
    h, w = image.shape[:2]
    pad_h, pad_w = -h % multiple, -w % multiple
    return np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge") if pad_h or pad_w else image


def overlay(image: np.ndarray, colours: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend an RGB image with a colour map of the same size (uint8)."""
    mixed = (1 - alpha) * image.astype(np.float32) + alpha * colours.astype(np.float32)
    return mixed.round().clip(0, 255).astype(np.uint8)
