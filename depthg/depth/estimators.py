"""Depth estimators for the offline depth-generation stage (METHOD.md section 7).

Every estimator maps a list of images to a list of float32 [H,W] depth maps in [0,1] with
0 = near and larger = farther, min-max normalised over the *full* image (crops are cut later
and never renormalised).

- `DatasetDepth` passes through the depth shipped with the data (synthetic scenes, a folder's
  ``depth/``); it needs `Record`s, not bare images, and names the id of a record without depth.
- `TransformersDepth` runs a transformers depth model (`AutoModelForDepthEstimation` +
  `AutoImageProcessor`, by hub id or local folder), optionally averaged with the prediction on
  the horizontally flipped image, resized to the image size. Batches are formed across image
  sizes: each image is preprocessed on its own and images whose *model input* has the same shape
  (e.g. every 4:3 COCO image, whatever its pixel size) share a batch, so mixed-size datasets still
  fill ``batch_size``. ``precision`` runs the model under ``torch.autocast`` (``auto``: fp16 on a
  GPU, fp32 on the CPU; fp16 keeps 10 mantissa bits to bf16's 7: on a tiny random DPT with a
  non-degenerate output range, fp16 moved the normalised depth by at most 0.0015 and bf16 by 0.011,
  ``bench/depthgen.json``); post-processing is always fp32. A model whose ops fail under autocast,
  or whose output is not finite (fp16 overflow), is rerun in fp32 and stays fp32, with a warning.

Output conventions differ between model families, handled by the ``inverse`` flag:
ZoeDepth, GLPN, Depth Pro and Depth-Anything *metric* checkpoints predict metric depth
(larger = farther): normalised as min-max. DPT (MiDaS) and Depth-Anything *relative*
checkpoints predict relative inverse depth (disparity, larger = nearer): normalised as
``1 - minmax(prediction)``, which keeps the ordering (the inverse of an affine-invariant
disparity is not defined, so it is not inverted point-wise). The flag is detected from
``config.model_type`` and ``config.depth_estimation_type`` and can be forced by the caller.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import os
from typing import Sequence

import numpy as np

from depthg.data.base import Record, minmax
from depthg.errors import DepthgError

INVERSE_TYPES = {"dpt", "depth_anything"}  # relative disparity unless depth_estimation_type == "metric"
METRIC_TYPES = {"zoedepth", "glpn", "depth_pro", "prompt_depth_anything"}
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
log = logging.getLogger(__name__)


class DepthError(DepthgError, ValueError):
    """An estimator could not produce depth; the message names the image id or the model."""


def normalize_depth(depth, inverse: bool = False) -> np.ndarray:
    """Min-max over the full image to [0,1], 0 = near (``inverse``: the input is disparity)."""
    d = np.asarray(depth, dtype=np.float64)
    if not np.isfinite(d).all():
        d = np.nan_to_num(d, nan=np.nanmedian(d) if np.isfinite(d).any() else 0.0,
                          posinf=np.nanmax(d[np.isfinite(d)]) if np.isfinite(d).any() else 0.0, neginf=0.0)
    out = minmax(d)
    return (1.0 - out).astype(np.float32) if inverse and out.max() > 0 else out


def is_inverse_depth(config) -> bool:
    """True when a transformers depth config predicts disparity (larger = nearer)."""
    model_type = getattr(config, "model_type", "")
    if model_type in METRIC_TYPES:
        return False
    if model_type in INVERSE_TYPES:
        return getattr(config, "depth_estimation_type", "relative") != "metric"
    return False


def _images_of(items) -> list[np.ndarray]:
    return [it.image if isinstance(it, Record) else np.asarray(it) for it in items]


class DatasetDepth:
    """Use the depth that comes with the data."""

    name = "dataset"
    needs_records = True

    def __call__(self, records: Sequence[Record]) -> list[np.ndarray]:
        out = []
        for rec in records:
            if not isinstance(rec, Record):
                raise DepthError("depthgen.source=dataset passes the dataset's own depth through: "
                                 "call it with Records, not bare images")
            if rec.depth is None:
                raise DepthError(f"image {rec.id!r} has no depth in the dataset (depthgen.source=dataset); "
                                 "use depthgen.source=transformers to estimate it")
            d = np.asarray(rec.depth, np.float32)
            if d.shape != rec.image.shape[:2] or d.min() < 0 or d.max() > 1:
                raise DepthError(f"image {rec.id!r}: dataset depth must be [H,W] in [0,1] like the image "
                                 f"{rec.image.shape[:2]}, got shape {d.shape}, range {d.min():.3g}..{d.max():.3g}")
            out.append(d)
        return out


def autocast_dtype(precision: str, device):
    """The ``torch.autocast`` dtype for ``precision`` on ``device`` (a torch.device), None for fp32."""
    import torch

    if precision not in PRECISIONS:
        raise DepthError(f"depthgen.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class TransformersDepth:
    """A transformers depth model, flip-averaged, batched across image sizes, optionally autocast."""

    name = "transformers"
    needs_records = False

    def __init__(self, model: str, device: str = "auto", batch_size: int = 8, flip_average: bool = True,
                 inverse: bool | None = None, precision: str = "auto"):
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        local = os.path.isdir(model)
        try:
            self.processor = AutoImageProcessor.from_pretrained(model, local_files_only=local)
            self.model = AutoModelForDepthEstimation.from_pretrained(model, local_files_only=local)
        except (OSError, ValueError, KeyError) as exc:
            raise DepthError(f"cannot load depth model {model!r} ({'local folder' if local else 'hub id'}): {exc}. "
                             "Without network access, pass a local folder saved with save_pretrained.") from exc
        from depthg.device import resolve_device

        self.device = resolve_device(device)
        self.model.to(self.device).eval()
        self.model_id, self.batch_size, self.flip_average = model, max(int(batch_size), 1), flip_average
        self.inverse = is_inverse_depth(self.model.config) if inverse is None else bool(inverse)
        self.amp = autocast_dtype(precision, self.device)
        pp = getattr(self.processor, "post_process_depth_estimation", None)
        self._pp_params = set(inspect.signature(pp).parameters) if pp else set()

    def __call__(self, items) -> list[np.ndarray]:
        images = _images_of(items)
        for i, img in enumerate(images):
            if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
                what = items[i].id if isinstance(items[i], Record) else f"#{i}"
                raise DepthError(f"image {what}: expected uint8 [H,W,3], got {img.dtype} {img.shape}")
        pixels = [self.processor(images=[img], return_tensors="pt")["pixel_values"][0] for img in images]
        by_shape: dict[tuple, list[int]] = {}
        for i, p in enumerate(pixels):  # one model-input shape per group, whatever the image sizes
            by_shape.setdefault(tuple(p.shape), []).append(i)
        out: list[np.ndarray | None] = [None] * len(images)
        for idx in by_shape.values():
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start:start + self.batch_size]
                depths = self._predict([pixels[i] for i in chunk], [images[i].shape[:2] for i in chunk])
                for i, d in zip(chunk, depths):
                    out[i] = normalize_depth(d, self.inverse)
        return out

    def _predict(self, pixels: list, sizes: list[tuple]) -> list[np.ndarray]:
        import torch

        batch = torch.stack(pixels).to(self.device, dtype=next(self.model.parameters()).dtype)
        try:
            out, flipped = self._forward(batch)
            problem = None if all(o is None or torch.isfinite(o.predicted_depth).all() for o in (out, flipped)) \
                else "non-finite output"
        except RuntimeError as exc:  # an op without a reduced-precision kernel
            if self.amp is None:
                raise
            problem = str(exc)
        if problem is not None and self.amp is not None:
            log.warning("depth model %s under autocast %s: %s; running it in fp32 from now on",
                        self.model_id, self.amp, problem)
            self.amp = None
            out, flipped = self._forward(batch)
        return [d.float().cpu().numpy() for d in self._postprocess(out, flipped, sizes)]

    def _forward(self, batch):
        import torch

        amp = torch.autocast(self.device.type, dtype=self.amp) if self.amp is not None else contextlib.nullcontext()
        with torch.inference_mode(), amp:
            out = self.model(pixel_values=batch)
            flipped = self.model(pixel_values=torch.flip(batch, dims=[-1])) if self.flip_average else None
        for o in (out, flipped):  # post-processing (padding removal, resizing) in fp32
            if o is not None:
                o.predicted_depth = o.predicted_depth.float()
        return out, flipped

    def _postprocess(self, out, flipped, sizes):
        """Flip-average, remove processor padding (ZoeDepth) and resize to the image size."""
        import torch
        import torch.nn.functional as F

        if "outputs_flipped" in self._pp_params:  # ZoeDepth: averages flips and removes its padding
            res = self.processor.post_process_depth_estimation(out, source_sizes=sizes, target_sizes=sizes,
                                                               outputs_flipped=flipped)
            return [r["predicted_depth"].squeeze() for r in res]
        pred = out.predicted_depth
        if flipped is not None:
            pred = (pred + torch.flip(flipped.predicted_depth, dims=[-1])) / 2
        return [F.interpolate(p[None, None].float(), size=tuple(s), mode="bicubic", align_corners=False)[0, 0]
                for p, s in zip(pred, sizes)]


def build_estimator(depthgen_cfg):
    """``depthgen.source``: ``dataset`` -> `DatasetDepth`, ``transformers`` -> `TransformersDepth`."""
    if depthgen_cfg.source == "dataset":
        return DatasetDepth()
    if depthgen_cfg.source == "transformers":
        return TransformersDepth(depthgen_cfg.model, depthgen_cfg.device, depthgen_cfg.batch_size,
                                 depthgen_cfg.flip_average, precision=depthgen_cfg.precision)
    raise DepthError(f"unknown depthgen.source {depthgen_cfg.source!r}; expected dataset or transformers")
