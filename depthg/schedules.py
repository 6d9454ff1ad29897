"""Training schedules as pure functions of the batch index (docs/METHOD.md section 5).

Every schedule here counts *batches*, numbered from 0 (one optimizer step of the head per batch). A
schedule multiplies its value by a factor every ``every`` batches, the first time at ``first``:

    decays_in_effect(batch, every, first) = 0 if batch < first else (batch - first) // every + 1

``first = 0`` means ``first = every`` (so the count is ``batch // every``, the plain convention).

Converting the reference code (its loop tests ``global_step % E == 0`` once per batch, after the loss, when
``global_step = 3k`` at batch k: three optimizers step per batch):

- a decay fires at the batches k with ``3k`` divisible by E, i.e. every ``p = E / gcd(E, 3)`` batches
  (``reference_decay_period``), and is in effect from the *next* batch;
- the depth weight/shift test also requires ``global_step > 0``: decays in effect from batches p+1, 2p+1,
  ... -> ``every=p, first=p+1``;
- the FPS sample-count test has no such guard, so it also fires at batch 0: in effect from batches 1,
  p+1, 2p+1, ... -> ``every=p, first=1`` (COCO ViT-S/8: S = 11 at batch 0, 9 from batch 1, 8 from 1001, 7
  from 2001);
- ``max_steps`` = 7000 reference steps is ``reference_steps_to_batches(7000) = 2334`` batches.

``values_at(cfg, batch)`` gives what the training step uses (``depthg.step``); ``table(cfg, batches)`` is
what ``python launch/train.py --config FILE --print-schedule`` prints.
"""
from __future__ import annotations

import math

# The batches --print-schedule reports unless told otherwise: the edges of the reference's decays
# (249/250/251 for a 250-batch period, 999-1001 and 2000/2001 for the FPS decay) and the last batch.
DEFAULT_BATCHES = (0, 1, 249, 250, 251, 999, 1000, 1001, 2000, 2001, 2333)


def decays_in_effect(batch: int, every: int, first: int = 0) -> int:
    """How many decays a value has undergone when ``batch`` uses it (module docstring); ``every=0`` -> 0."""
    if batch < 0:
        raise ValueError(f"batch index must be >= 0, got {batch}")
    if every < 0 or first < 0:
        raise ValueError(f"decay_every and first_decay must be >= 0 batches, got {every} and {first}")
    if every == 0:
        return 0
    first = first or every
    return 0 if batch < first else (batch - first) // every + 1


def depth_schedule(batch: int, weight0: float, shift0: float, every: int, gamma: float,
                   first: int = 0) -> tuple[float, float]:
    """Guidance scheduling: (lambda_depth, b_depth) = (weight0, shift0) * gamma ** decays_in_effect(...)."""
    factor = gamma ** decays_in_effect(batch, every, first)
    return float(weight0) * factor, float(shift0) * factor


def fps_samples(batch: int, s0: int, s_min: int, every: int, decay: float, first: int = 0) -> int:
    """FPS sample count S: S <- max(int(S * decay), s_min), applied ``decays_in_effect(...)`` times."""
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"sampling.decay: expected a factor in (0, 1], got {decay}")
    samples = int(s0)
    for _ in range(decays_in_effect(batch, every, first)):
        new = max(int(samples * decay), int(s_min))
        if new == samples:  # a fixed point: nothing changes any more (and long runs do not loop)
            break
        samples = new
    return samples


def reference_decay_period(every_steps: int, optimizers: int = 3) -> int:
    """Batches between two decays of a reference test ``global_step % E == 0``: E / gcd(E, optimizers).

    250 -> 250, 300 -> 100, 400 -> 400, 200 -> 200, 1000 -> 1000 (not E / 3).
    """
    if every_steps < 1 or optimizers < 1:
        raise ValueError(f"reference_decay_period: E >= 1 and optimizers >= 1, got {every_steps}, {optimizers}")
    return every_steps // math.gcd(every_steps, optimizers)


def reference_steps_to_batches(steps: int, optimizers: int = 3) -> int:
    """Reference ``max_steps`` -> batches trained: the k with ``optimizers * k < steps`` (7000 -> 2334)."""
    if steps < 0 or optimizers < 1:
        raise ValueError(f"reference_steps_to_batches: steps >= 0 and optimizers >= 1, got {steps}, {optimizers}")
    return math.ceil(steps / optimizers)


def values_at(cfg, batch: int) -> tuple[float, float, int]:
    """(lambda_depth, b_depth, S) that the training step uses at ``batch`` for config ``cfg``.

    ``loss.depth.mode=none`` gives lambda 0 (the term is skipped); b_depth is still reported.
    """
    d, s = cfg.loss.depth, cfg.sampling
    lam, shift = depth_schedule(batch, d.weight, d.shift, d.decay_every, d.gamma, d.first_decay)
    samples = fps_samples(batch, s.samples, s.min_samples, s.decay_every, s.decay, s.first_decay)
    return (0.0 if d.mode == "none" else lam), shift, samples


def table(cfg, batches=DEFAULT_BATCHES) -> dict:
    """``{"batches": [...], "lambda": [...], "b_depth": [...], "samples": [...]}`` at ``batches``."""
    rows = [values_at(cfg, int(b)) for b in batches]
    return {"batches": [int(b) for b in batches], "lambda": [r[0] for r in rows],
            "b_depth": [r[1] for r in rows], "samples": [r[2] for r in rows]}
