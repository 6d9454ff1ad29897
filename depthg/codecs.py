"""How shards store pixels: the member encodings of RGB, depth and labels, their encoders and decoders.

A member's name says its encoding, so a reader needs nothing else to decode it:

=====================  =======================================================================================
``rgb.png``            uint8 RGB, lossless (stage 1 always; stage 2 with ``mining.rgb_codec=png``)
``rgb.jpg``            JPEG at ``mining.rgb_quality``, 4:4:4 chroma (no subsampling); decoded by
                       ``torchvision.io.decode_jpeg`` (libjpeg-turbo, straight into a CHW tensor)
``rgb.webp``           lossy WebP at ``mining.rgb_quality``
``depth.png``          ``round(depth * 65535)`` as a 16-bit greyscale PNG (``png16``, stage 1 always), or
                       ``round(depth * 255)`` as an 8-bit one (``png8``); the PNG's mode says which
``depth.npy``          ``round(depth * 65535)`` as a little-endian uint16 ``.npy`` (``raw16``: no compression)
``depth.npy.gz``       the same ``.npy`` gzip-compressed at level 1 (``raw16z``; webdataset's ``.gz``
                       handling reads it)
``label.png``          uint8 PNG of the class id, 255 = ignore (read back as -1); always lossless
=====================  =======================================================================================

Fidelity (``depth_error_bound``; tests bound the measured errors): 16-bit depth is within 0.5 / 65535 of the
float it came from (and stage 1 -> stage 2 copies the same 16-bit levels: no further error), ``png8`` within
0.5 / 255; lossy RGB is measured (mean / max absolute error in ``bench/datapath.json``). All encoders are
deterministic (fixed settings, gzip ``mtime=0``), so the same samples give the same bytes.
"""
from __future__ import annotations

import gzip
import io as _pyio
import json
import re
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from depthg.config import DepthCodec, MiningConfig, RgbCodec, choices
from depthg.errors import DepthgError

RGB_CODECS, DEPTH_CODECS = choices(RgbCodec), choices(DepthCodec)
RGB_MEMBER = {"png": "rgb.png", "jpeg": "rgb.jpg", "webp": "rgb.webp"}
DEPTH_MEMBER = {"png16": "depth.png", "png8": "depth.png", "raw16": "depth.npy", "raw16z": "depth.npy.gz"}
DEPTH_SCALE = 65535.0
IGNORE_ON_DISK = 255
_NPY_U16 = np.dtype("<u2")


class ShardError(DepthgError, ValueError):
    """A shard, sample, member or manifest that does not follow the format; the message names it
    (``depthg.shards.ShardError`` is this class)."""


@dataclass(frozen=True)
class Encoding:
    """The encoding of a split's samples (recorded in its manifest as ``as_dict()``)."""

    rgb: str = "png"
    quality: int = 95  # JPEG / WebP quality (unused for png)
    depth: str = "png16"

    def __post_init__(self):
        if self.rgb not in RGB_CODECS:
            raise ShardError(f"rgb codec {self.rgb!r}: expected one of {', '.join(RGB_CODECS)}")
        if self.depth not in DEPTH_CODECS:
            raise ShardError(f"depth codec {self.depth!r}: expected one of {', '.join(DEPTH_CODECS)}")
        if not 1 <= int(self.quality) <= 100:
            raise ShardError(f"rgb quality {self.quality}: expected 1..100")

    def as_dict(self) -> dict:
        return {"rgb": self.rgb, "rgb_quality": int(self.quality) if self.rgb != "png" else None,
                "depth": self.depth, "label": "png", "members": [RGB_MEMBER[self.rgb], DEPTH_MEMBER[self.depth],
                                                                 "label.png", "meta.json"]}

    @property
    def name(self) -> str:
        rgb = self.rgb if self.rgb == "png" else f"{self.rgb}{int(self.quality)}"
        return f"{rgb}+{self.depth}"


LOSSLESS = Encoding()  # stage 1 (and stage 2 with mining.rgb_codec=png, mining.depth_codec=png16)
# stage 2's default: the defaults of mining.rgb_codec / rgb_quality / depth_codec (chosen by
# bench/datapath.json, cluster/README.md section 9)
TRAIN_DEFAULT = Encoding(MiningConfig.rgb_codec, MiningConfig.rgb_quality, MiningConfig.depth_codec)


def mining_encoding(mining_cfg) -> Encoding:
    """The encoding of ``cfg.mining``."""
    return Encoding(mining_cfg.rgb_codec, mining_cfg.rgb_quality, mining_cfg.depth_codec)


def depth_error_bound(codec: str) -> float:
    """The largest absolute depth error a depth codec can add to a float depth in [0, 1]."""
    return 0.5 / 255.0 if codec == "png8" else 0.5 / DEPTH_SCALE


# ----------------------------------------------------------------------------- encoding
def _png(array: np.ndarray) -> bytes:
    buf = _pyio.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def encode_image(image: np.ndarray, codec: str = "png", quality: int = 95) -> bytes:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ShardError(f"image must be uint8 HxWx3, got {image.dtype} {image.shape}")
    image = np.ascontiguousarray(image)
    if codec == "png":
        return _png(image)
    buf = _pyio.BytesIO()
    if codec == "jpeg":
        Image.fromarray(image).save(buf, format="JPEG", quality=int(quality), subsampling=0, optimize=False)
    elif codec == "webp":
        Image.fromarray(image).save(buf, format="WEBP", quality=int(quality), method=4)
    else:
        raise ShardError(f"rgb codec {codec!r}: expected one of {', '.join(RGB_CODECS)}")
    return buf.getvalue()


def _levels(depth: np.ndarray, scale: float, dtype) -> np.ndarray:
    depth = np.asarray(depth, dtype=np.float32)
    if depth.ndim != 2:
        raise ShardError(f"depth must be HxW, got shape {depth.shape}")
    if not np.isfinite(depth).all() or depth.min() < 0.0 or depth.max() > 1.0:
        raise ShardError("depth must be finite and in [0, 1]")
    return np.round(depth * scale).astype(dtype)


def encode_depth(depth: np.ndarray, codec: str = "png16") -> bytes:
    if codec == "png8":
        return _png(_levels(depth, 255.0, np.uint8))
    levels = _levels(depth, DEPTH_SCALE, np.uint16)
    if codec == "png16":
        return _png(levels)
    buf = _pyio.BytesIO()
    np.save(buf, levels.astype(_NPY_U16), allow_pickle=False)
    if codec == "raw16":
        return buf.getvalue()
    if codec == "raw16z":
        return gzip.compress(buf.getvalue(), compresslevel=1, mtime=0)
    raise ShardError(f"depth codec {codec!r}: expected one of {', '.join(DEPTH_CODECS)}")


def encode_label(label: np.ndarray) -> bytes:
    label = np.asarray(label)
    if label.ndim != 2:
        raise ShardError(f"label must be HxW, got shape {label.shape}")
    if label.min(initial=0) < -1 or label.max(initial=0) >= IGNORE_ON_DISK:
        raise ShardError(f"label ids must be in [-1, {IGNORE_ON_DISK - 1}]")
    return _png(np.where(label < 0, IGNORE_ON_DISK, label).astype(np.uint8))


def encode_meta(meta: dict) -> bytes:
    return json.dumps(meta, sort_keys=True).encode()


# ----------------------------------------------------------------------------- decoding
def member(raw: dict, kind: str) -> str | None:
    """The member of ``raw`` holding ``kind`` (``rgb`` or ``depth``), whatever its encoding; None if absent."""
    for name in (RGB_MEMBER.values() if kind == "rgb" else ("depth.png", "depth.npy.gz", "depth.npy")):
        if name in raw:
            return name
    return None


_KERNELS: dict = {}  # torchvision's decoders of this process, found once: {"jpeg": fn or None, "png": ...}


def _kernel(kind: str):
    """torchvision's libjpeg-turbo / libpng kernel for ``kind`` (``decode_jpeg`` / ``decode_png`` without their
    per-call deprecation warning: torchvision 0.29 deprecates its image codecs for torchcodec), else the public
    function, else None (PIL decodes). ``bytes -> uint8/uint16 [C,H,W] tensor``; the same pixels as PIL."""
    if kind not in _KERNELS:
        try:
            import torch
            from torchvision import io as tvio

            mode = (tvio.ImageReadMode.RGB if kind == "jpeg" else tvio.ImageReadMode.UNCHANGED).value
            try:
                op = getattr(torch.ops.image, f"decode_{kind}")
                _KERNELS[kind] = lambda data, op=op: op(torch_bytes(data), mode, False)
            except (AttributeError, RuntimeError):
                public = getattr(tvio, f"decode_{kind}")
                _KERNELS[kind] = lambda data: public(torch_bytes(data), mode=tvio.ImageReadMode(mode))
        except ImportError:
            _KERNELS[kind] = None
    return _KERNELS[kind]


def _hwc(chw) -> np.ndarray:
    return chw[0].numpy() if chw.shape[0] == 1 else chw.permute(1, 2, 0).numpy()


def _unpng(data: bytes) -> np.ndarray:
    kernel = _kernel("png")
    if kernel is not None:
        return _hwc(kernel(data))
    with Image.open(_pyio.BytesIO(data)) as img:
        return np.array(img)


def decode_image(data: bytes, name: str = "rgb.png") -> np.ndarray:
    """uint8 HxWx3 of an ``rgb.*`` member (JPEG and PNG: a view of torchvision's decoded tensor)."""
    kernel = _kernel("jpeg") if name.endswith(".jpg") else _kernel("png") if name.endswith(".png") else None
    if kernel is not None:
        out = _hwc(kernel(data))
        if out.ndim == 3 and out.shape[2] == 3 and out.dtype == np.uint8:
            return out
    with Image.open(_pyio.BytesIO(data)) as img:
        return np.array(img.convert("RGB") if img.mode != "RGB" else img, dtype=np.uint8)


def torch_bytes(data: bytes):
    import torch

    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_depth(data: bytes, name: str = "depth.png") -> np.ndarray:
    """float32 HxW in [0, 1] of a ``depth.*`` member."""
    if name.endswith(".png"):
        levels = _unpng(data)
        scale = 255.0 if levels.dtype == np.uint8 else DEPTH_SCALE
        return levels.astype(np.float32) / np.float32(scale)
    if name.endswith(".gz"):
        data = zlib.decompress(data, wbits=31)
    levels = _npy_u16(data)
    if levels.dtype != _NPY_U16 or levels.ndim != 2:
        raise ShardError(f"{name}: expected a uint16 HxW array, got {levels.dtype} {levels.shape}")
    return levels.astype(np.float32) / np.float32(DEPTH_SCALE)


_NPY_HEADER = re.compile(rb"\{'descr': '<u2', 'fortran_order': False, 'shape': \((\d+), (\d+)\), \} *\n")


def _npy_u16(data: bytes) -> np.ndarray:
    """The array of a ``.npy`` file; np.save's own header for a uint16 HxW array is read without ``np.load``'s
    ``ast`` parse (a tenth of a millisecond per depth map, on the loader's hot path)."""
    if data[:8] == b"\x93NUMPY\x01\x00":
        end = 10 + int.from_bytes(data[8:10], "little")
        match = _NPY_HEADER.fullmatch(data[10:end])
        if match and len(data) == end + 2 * int(match[1]) * int(match[2]):
            return np.frombuffer(data, _NPY_U16, offset=end).reshape(int(match[1]), int(match[2]))
    return np.load(_pyio.BytesIO(data), allow_pickle=False)


def decode_label(data: bytes, levels: bool = False) -> np.ndarray:
    """int64 HxW class ids, -1 = ignore; ``levels``: the stored uint8 as it is (255 = ignore), for the loader,
    which widens whole batches at once (``depthg.streaming.batch_stage``)."""
    raw = _unpng(data)
    if levels:
        return raw.astype(np.uint8, copy=False)
    raw = raw.astype(np.int64)
    raw[raw == IGNORE_ON_DISK] = -1
    return raw
