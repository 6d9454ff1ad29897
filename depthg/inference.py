"""Inference on your own images: image files in, label maps at each image's own size out.

``launch/segment.py`` (and its distributed form, ``cluster/segmentation.py``) is the command; this module holds
what they need from the library:

* ``iter_inputs`` (``list_inputs``): the image files of a folder (recursively), a glob pattern or
  an fsspec URL (``s3://bucket/images``) sorted by name and streamed (a sorted local walk; S3 one listing page at a
  time), each with its output name (``output_name``: its path below the input with the extension kept, so a name
  never depends on the other files); an input without images raises at its first item;
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
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from depthg import crf as crf_mod
from depthg import io
from depthg.data.listing import sorted_stream
from depthg.data.sources import read_image as _read_local_image
from depthg.data.transforms import resize_center_crop, to_tensor_image
from depthg.evaluation import compute_codes, probe_scores

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
__all__ = ["IMAGE_EXTENSIONS", "iter_inputs", "list_inputs", "output_name", "read_image", "score_images", "finish_label",
           "segment_images", "overlay", "png_bytes", "probabilities"]


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def _glob_root(pattern: str) -> str:
    """The folder part of a glob pattern before its first wildcard (names are relative to it)."""
    head = pattern[:min([pattern.index(c) for c in "*?[" if c in pattern] or [len(pattern)])]
    return head.rsplit("/", 1)[0] if "/" in head else ""


def output_name(source: str, root: str) -> str:
    """The output name of ``source``: its path below ``root`` with its extension kept (``a.jpg`` -> ``a.jpg``,
    ``sub/b.png`` -> ``sub/b.png``), so a name depends on that file's own path alone and never moves when other
    files come or go (``a.jpg`` beside ``a.png`` are two names). Outside ``root``: the base name."""
    if not io.is_remote(source):
        rel = os.path.relpath(source, root or ".") if root else source
        if rel.startswith(".."):
            rel = os.path.basename(source)
        return rel.replace(os.sep, "/").lstrip("/")
    if root and source.startswith(root.rstrip("/") + "/"):
        return source[len(root.rstrip("/")) + 1:]
    return source.rsplit("/", 1)[-1]


def _walk_sorted(folder: str, rel: str = "") -> Iterator[str]:
    """Image paths below ``folder`` relative to it, in the sorted order of the whole relative path, streamed (a
    folder's names sorted with ``/`` after each subfolder's name: exactly the order of sorting all the paths;
    symlinked folders are not entered, as ``os.walk``). Each folder's names go through ``sorted_stream`` (runs
    spilled to a temporary folder), so a flat folder of millions of images is never held."""
    def names() -> Iterator[str]:
        with os.scandir(folder) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    yield e.name + "/"
                elif _is_image(e.name) and e.is_file():
                    yield e.name

    for key in sorted_stream(names()):
        if key.endswith("/"):
            yield from _walk_sorted(os.path.join(folder, key[:-1]), rel + key)
        else:
            yield rel + key


def _glob_sorted(pattern: str, root: str) -> Iterator[tuple[str, str]]:
    """``(file, output name)`` of the local files ``pattern`` matches, by output name (then path), streamed through
    ``sorted_stream``: the image files, or every file when none is an image (a pattern naming files explicitly keeps
    them: the glob is then run a second time). Raises ``FileNotFoundError`` when it matches no file."""
    for images in (True, False):
        found = (os.path.abspath(f) for f in glob.iglob(pattern, recursive=True) if os.path.isfile(f))
        count = 0
        for name, f in sorted_stream((output_name(f, root), f) for f in found if not images or _is_image(f)):
            count += 1
            yield f, name
        if count:
            return
    raise FileNotFoundError(f"input {pattern} is neither a folder nor a glob matching any file")


def _or_found(keys: Iterator[str], url: str) -> Iterator[str]:
    """``keys``, or when there are none (``url`` names one object, not a folder) what ``io.find`` finds."""
    found = False
    for key in keys:
        found = True
        yield key
    if not found:
        yield from io.find(url)


def iter_inputs(pattern: str, exclude: str = "") -> Iterator[tuple[str, str]]:
    """``(file, output name)`` of every image of a folder (recursively), a glob pattern or an fsspec URL of either,
    sorted by name; a folder is streamed (local: a sorted walk; S3: one listing page at a time), never held whole.
    Local files are absolute paths. The name is ``output_name``: the path below the folder (or the glob's fixed
    part) with its extension. ``exclude``: a folder (local or URL) whose files are never listed: a job's output
    inside its input, whose label maps and overlays a rerun would otherwise segment as new images. Raises
    ``FileNotFoundError`` naming the input when it holds no image."""
    skip = ""
    if exclude:
        skip = (exclude if io.is_remote(exclude) else os.path.abspath(exclude)).rstrip("/") + "/"
    remote, count = io.is_remote(pattern), 0
    magic = any(c in pattern for c in "*?[")
    if not remote and os.path.isdir(pattern):
        root = os.path.abspath(pattern)
        stream = ((os.path.join(root, rel), rel) for rel in _walk_sorted(root))
        empty = f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {pattern}"
    elif not remote:
        root = os.path.abspath(_glob_root(pattern) or ".")
        stream = _glob_sorted(pattern, root)
        empty = ""
    else:
        root = _glob_root(pattern) if magic else pattern.rstrip("/")
        pages = None if magic else io.iter_s3_keys(pattern)
        keys = iter(io.find(pattern)) if pages is None else _or_found(pages, pattern)
        stream = ((f, output_name(f, root)) for f in keys if _is_image(f))
        if magic:  # ``io.find`` returns the glob's matches whole (fsspec's glob); their sort is bounded
            stream = ((f, name) for name, f in sorted_stream((name, f) for f, name in stream))
        empty = f"no images ({', '.join(IMAGE_EXTENSIONS)}) at {pattern}"
    for item in stream:
        if skip and item[0].startswith(skip):
            continue
        count += 1
        yield item
    if not count:
        raise FileNotFoundError(empty)


def list_inputs(pattern: str) -> list[tuple[str, str]]:
    """``iter_inputs`` as a list (small inputs; the bucket job streams ``iter_inputs``)."""
    return list(iter_inputs(pattern))


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
