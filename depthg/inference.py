"""Inference on your own images: image files in, label maps at each image's own size out.

``launch/segment.py`` (and its distributed form, ``cluster/segmentation.py``) is the command; this module holds
what they need from the library:

* ``list_images`` / ``list_inputs``: the image files of a folder (recursively), a glob pattern or an fsspec URL
  (``s3://bucket/images``), with the output name of each (its path below the input, without the extension);
* ``read_image``: ``depthg.data.read_image`` (the one image reader of the project), for local files and any URL;
* ``score_images`` -> ``finish_label``: the project's one resize (``resize_center_crop`` with ``crop=False``:
  shorter side to ``resolution``, nearest, the whole image kept, edge-padded to the backbone's stride), codes
  averaged with the flipped image's, the one evaluation path ``depthg.evaluation.probe_scores`` at the resized
  size; then per image the scores bilinearly resized to the image, optionally CRF-refined there, argmax.
  ``segment_images`` is the two in one; the distributed job runs ``finish_label`` with CRF as 1-CPU Ray tasks;
* ``overlay``, ``png_bytes``, ``probabilities``: what the outputs are made of.
"""
from __future__ import annotations

import glob
import io as _pyio
import os
import tempfile
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from depthg import crf as crf_mod
from depthg import io
from depthg.data.sources import read_image as _read_local_image
from depthg.data.transforms import resize_center_crop, to_tensor_image
from depthg.evaluation import compute_codes, probe_scores

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
__all__ = ["IMAGE_EXTENSIONS", "list_images", "list_inputs", "read_image", "score_images", "finish_label",
           "segment_images", "overlay", "png_bytes", "probabilities"]


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def _glob_root(pattern: str) -> str:
    """The folder part of a glob pattern before its first wildcard (names are relative to it)."""
    head = pattern[:min([pattern.index(c) for c in "*?[" if c in pattern] or [len(pattern)])]
    return head.rsplit("/", 1)[0] if "/" in head else ""


def list_inputs(pattern: str) -> list[tuple[str, str]]:
    """``(file, output name)`` of every image of a folder (recursively, sorted), a glob pattern or an fsspec URL of
    either; the name is the path below the folder (or the glob's fixed part) without the extension. Names that
    would collide (``a.png`` and ``a.jpg``) are prefixed with their index. A clear error when there is none."""
    remote = io.is_remote(pattern)
    if not remote and os.path.isdir(pattern):
        root = pattern
        files = sorted(os.path.join(d, f) for d, _, names in os.walk(pattern) for f in names if _is_image(f))
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {pattern}")
    elif not remote:
        root = _glob_root(pattern)
        files = sorted(f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
        if not files:
            raise FileNotFoundError(f"input {pattern} is neither a folder nor a glob matching any file")
        files = [f for f in files if _is_image(f)] or files  # a pattern naming files explicitly keeps them
    else:
        magic = any(c in pattern for c in "*?[")
        root = _glob_root(pattern) if magic else pattern.rstrip("/")
        files = [f for f in io.find(pattern) if _is_image(f)]
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) at {pattern}")
    return list(zip(files, _names(files, root)))


def _names(files: list[str], root: str) -> list[str]:
    def rel(f: str) -> str:
        r = os.path.relpath(f, root) if root and not io.is_remote(f) else (f[len(root):] if root and f.startswith(root) else os.path.basename(f))
        return os.path.splitext(r.lstrip("/"))[0].replace(os.sep, "/")

    names = [rel(f) for f in files]
    if len(set(names)) != len(names):  # e.g. a.png and a.jpg
        return [f"{os.path.dirname(n) + '/' if '/' in n else ''}{i:05d}_{os.path.basename(n)}" for i, n in enumerate(names)]
    return names


def list_images(pattern: str) -> list[str]:
    """The image files of a folder (recursively, sorted), a glob pattern or an fsspec URL (see ``list_inputs``)."""
    return [f for f, _ in list_inputs(pattern)]


def read_image(path: str) -> np.ndarray:
    """uint8 RGB ``[H,W,3]`` of a local image file or any fsspec URL, through the project's one image reader."""
    if not io.is_remote(path):
        return _read_local_image(path)
    data = io.read_bytes(path)
    with tempfile.NamedTemporaryFile(suffix=os.path.splitext(path)[1]) as tmp:
        tmp.write(data)
        tmp.flush()
        try:
            return _read_local_image(tmp.name)
        except ValueError as exc:  # the reader names the temporary copy: name the URL instead
            raise type(exc)(str(exc).replace(tmp.name, path)) from exc


@torch.no_grad()
def score_images(backbone, segmenter, images: Sequence[np.ndarray], resolution: int, probe: str = "cluster",
                 flip: bool = True, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """Per image, the probe's scores ``[C,h,w]`` (float32, CPU) at its resized size (shorter side ``resolution``).

    ``probe``: ``cluster`` (log-probabilities over clusters) or ``linear`` (class logits). Images whose resized
    shapes agree run as one batch.
    """
    resized = [resize_center_crop(im, resolution, crop=False) for im in images]
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(resized):
        groups.setdefault(r.shape[:2], []).append(i)
    out: list[torch.Tensor | None] = [None] * len(images)
    for (h, w), members in groups.items():
        x = torch.stack([to_tensor_image(_pad_to_multiple(resized[i], backbone.stride)) for i in members]).to(device)
        codes = compute_codes(backbone, segmenter.head, x, flip)
        scores = probe_scores(segmenter, codes, tuple(x.shape[2:]), (probe,))[probe][:, :, :h, :w]
        for i, s in zip(members, scores.cpu()):
            out[i] = s.contiguous()
    return out


def finish_label(image: np.ndarray, scores: torch.Tensor, crf: bool = False,
                 params: crf_mod.CRFParams = crf_mod.CRFParams()) -> np.ndarray:
    """int64 label map ``[H,W]`` of one image from its scores ``[C,h,w]``: bilinear to the image's size, optionally
    dense-CRF refined there (``depthg.crf``), argmax."""
    s = F.interpolate(scores[None].float(), size=image.shape[:2], mode="bilinear", align_corners=False)[0]
    if crf and not image.flags.writeable:  # e.g. read from Ray's object store; pydensecrf wants a writable buffer
        image = image.copy()
    probs = torch.from_numpy(crf_mod.dense_crf(image, s, params)) if crf else s
    return probs.argmax(dim=0).numpy().astype(np.int64)


@torch.no_grad()
def segment_images(backbone, segmenter, images: Sequence[np.ndarray], resolution: int, probe: str = "cluster",
                   flip: bool = True, crf: bool = False, device: torch.device | str = "cpu") -> list[np.ndarray]:
    """Label maps int64 ``[H,W]`` (at each image's own size) for uint8 RGB images of any sizes.

    ``probe``: ``cluster`` (raw cluster ids) or ``linear`` (class ids).
    """
    scores = score_images(backbone, segmenter, images, resolution, probe, flip, device)
    return [finish_label(im, s, crf) for im, s in zip(images, scores)]


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


def png_bytes(array: np.ndarray) -> bytes:
    """PNG of a label map (uint8, or uint16 when an id exceeds 255) or of an RGB image (uint8 ``[H,W,3]``)."""
    from PIL import Image

    if array.ndim == 2:
        array = array.astype(np.uint8 if array.max(initial=0) < 256 else np.uint16)
    buf = _pyio.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def probabilities(scores: torch.Tensor) -> np.ndarray:
    """float16 ``[C,h,w]`` probabilities of a probe's scores (softmax over the cluster log-probs / class logits)."""
    return torch.softmax(scores.float(), dim=0).numpy().astype(np.float16)
