"""Dense CRF refinement of per-pixel class scores (METHOD.md section 9), via ``pydensecrf``.

Parameters of the protocol: 10 mean-field iterations; a Gaussian (smoothness) kernel with sxy=1,
compat=3; a bilateral (appearance) kernel with sxy=67, srgb=3, compat=4; the unary is the negative
log-softmax of the logits bilinearly upsampled to the image size (clipped at probability 1e-5, as
pydensecrf's ``unary_from_softmax`` does in the reference code).

The CRF runs on the CPU, one image at a time, single-threaded: parallelism comes from running
several evaluation workers, not from inside this function.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class CRFParams:
    iterations: int = 10
    gauss_sxy: float = 1.0
    gauss_compat: float = 3.0
    bilateral_sxy: float = 67.0
    bilateral_srgb: float = 3.0
    bilateral_compat: float = 4.0
    min_prob: float = 1e-5  # unary = -log(max(p, min_prob))


def _densecrf():
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ImportError(
            "dense CRF needs pydensecrf (pip install 'depthg[crf]', which installs pydensecrf2); "
            "or switch it off with eval.crf=false"
        ) from exc
    return dcrf


def unary(logits: torch.Tensor, size: tuple[int, int], min_prob: float = 1e-5) -> np.ndarray:
    """float32 ``[C, H*W]`` unary energies from logits ``[C, h, w]`` upsampled to ``size``."""
    logits = logits.detach().float().cpu()
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
    energy = -torch.log_softmax(logits, dim=0).clamp(min=float(np.log(min_prob)))
    return np.ascontiguousarray(energy.reshape(logits.shape[0], -1).numpy(), dtype=np.float32)


def dense_crf(image: np.ndarray, logits, params: CRFParams = CRFParams()) -> np.ndarray:
    """Refine ``logits`` ``[C,h,w]`` against ``image`` uint8 ``[H,W,3]``; returns probs float32 ``[C,H,W]``."""
    dcrf = _densecrf()
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"dense_crf: image must be uint8 [H,W,3], got {image.dtype} {image.shape}")
    logits = torch.as_tensor(logits)
    if logits.ndim != 3:
        raise ValueError(f"dense_crf: logits must be [C,h,w], got shape {tuple(logits.shape)}")
    height, width = image.shape[:2]
    n_labels = int(logits.shape[0])
    crf = dcrf.DenseCRF2D(width, height, n_labels)
    crf.setUnaryEnergy(unary(logits, (height, width), params.min_prob))
    crf.addPairwiseGaussian(sxy=params.gauss_sxy, compat=params.gauss_compat)
    crf.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb,
                             rgbim=np.ascontiguousarray(image), compat=params.bilateral_compat)
    q = crf.inference(params.iterations)
    return np.asarray(q, dtype=np.float32).reshape(n_labels, height, width)


def crf_batch(images: torch.Tensor, logits: torch.Tensor, params: CRFParams = CRFParams()) -> torch.Tensor:
    """Batched wrapper: images ``[B,3,H,W]`` in [0,1] (or uint8), logits ``[B,C,h,w]`` -> probs ``[B,C,H,W]``."""
    if images.dtype == torch.uint8:
        rgb = images
    else:
        rgb = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    rgb = rgb.permute(0, 2, 3, 1).cpu().numpy()
    out = [torch.from_numpy(dense_crf(rgb[i], logits[i], params)) for i in range(rgb.shape[0])]
    return torch.stack(out)
