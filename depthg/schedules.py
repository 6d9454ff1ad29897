"""Training schedules as pure functions of the batch index (METHOD.md sections 4 and 5).

Every schedule here counts *batches* (optimizer steps of the head). The reference code counted Lightning
``global_step``s, which advanced three times per batch (three optimizers: head, linear probe, cluster
probe), so a reference "7000 steps" is ``reference_steps_to_batches(7000) == 2334`` batches and a decay
"every 300 steps" fires every 100 batches. Convert reference numbers with ``reference_steps_to_batches``.

Note on the reference's FPS sample decay: it also fired at step 0 (a bug the authors document), so its
published ViT-S/8 runs used S = int(11 * 0.9) = 9 from the first batch. ``fps_samples`` does not decay at
batch 0; to reproduce those runs set ``sampling.samples=9``.
"""
from __future__ import annotations

import math


def depth_schedule(batch: int, weight0, shift0: float | None = None, every: int | None = None,
                   gamma: float | None = None) -> tuple[float, float]:
    """Guidance scheduling: (lambda_depth, b_depth) = x0 * gamma ** (batch // every); ``every=0`` -> constant.

    Call either ``depth_schedule(batch, weight0, shift0, every, gamma)`` or, as in DESIGN.md,
    ``depth_schedule(batch, cfg.loss.depth)`` with a ``DepthLossConfig``.
    """
    if shift0 is None and every is None and gamma is None and hasattr(weight0, "weight"):
        cfg = weight0
        weight0, shift0, every, gamma = cfg.weight, cfg.shift, cfg.decay_every, cfg.gamma
    if shift0 is None or every is None or gamma is None:
        raise TypeError("depth_schedule(batch, weight0, shift0, every, gamma) or depth_schedule(batch, cfg)")
    _check_batch(batch)
    if every < 0:
        raise ValueError(f"loss.depth.decay_every: expected >= 0 batches, got {every}")
    if every == 0:
        return float(weight0), float(shift0)
    factor = gamma ** (batch // every)
    return float(weight0) * factor, float(shift0) * factor


def depth_schedule_from(depth_cfg, batch: int) -> tuple[float, float]:
    """``depth_schedule`` reading weight, shift, decay_every and gamma from ``cfg.loss.depth``."""
    return depth_schedule(batch, depth_cfg.weight, depth_cfg.shift, depth_cfg.decay_every, depth_cfg.gamma)


def fps_samples(batch: int, s0, s_min: int | None = None, every: int | None = None,
                decay: float | None = None) -> int:
    """FPS sample count S at ``batch``: S <- max(int(S * decay), s_min) applied ``batch // every`` times.

    ``every=0`` -> ``s0`` throughout. Also accepts ``fps_samples(batch, cfg.sampling)`` (DESIGN.md).
    """
    if s_min is None and every is None and decay is None and hasattr(s0, "samples"):
        cfg = s0
        s0, s_min, every, decay = cfg.samples, cfg.min_samples, cfg.decay_every, cfg.decay
    if s_min is None or every is None or decay is None:
        raise TypeError("fps_samples(batch, s0, s_min, every, decay) or fps_samples(batch, cfg)")
    _check_batch(batch)
    if every < 0:
        raise ValueError(f"sampling.decay_every: expected >= 0 batches, got {every}")
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"sampling.decay: expected a factor in (0, 1], got {decay}")
    samples = int(s0)
    if every == 0:
        return samples
    for _ in range(batch // every):
        new = max(int(samples * decay), int(s_min))
        if new == samples:  # a fixed point: nothing changes any more
            break
        samples = new
    return samples


def fps_samples_from(sampling_cfg, batch: int) -> int:
    """``fps_samples`` reading samples, min_samples, decay_every and decay from ``cfg.sampling``."""
    return fps_samples(batch, sampling_cfg.samples, sampling_cfg.min_samples, sampling_cfg.decay_every,
                       sampling_cfg.decay)


def reference_steps_to_batches(steps: int, optimizers: int = 3) -> int:
    """Reference Lightning steps -> batches: ``ceil(steps / optimizers)`` (7000 -> 2334, 300 -> 100)."""
    if steps < 0 or optimizers < 1:
        raise ValueError(f"reference_steps_to_batches: steps >= 0 and optimizers >= 1, got {steps}, {optimizers}")
    return math.ceil(steps / optimizers)


def _check_batch(batch: int) -> None:
    if batch < 0:
        raise ValueError(f"batch index must be >= 0, got {batch}")
