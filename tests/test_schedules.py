"""depthg.schedules: values at chosen batches against the closed forms of METHOD.md sections 4-5."""
from __future__ import annotations

import pytest

from depthg.config import DepthLossConfig, SamplingConfig
from depthg.schedules import (depth_schedule, depth_schedule_from, fps_samples, fps_samples_from,
                              reference_steps_to_batches)


@pytest.mark.parametrize("batch, k", [(0, 0), (99, 0), (100, 1), (300, 3)])
def test_depth_schedule_piecewise_exponential(batch, k):
    weight, shift = depth_schedule(batch, 0.19, 0.03, 100, 0.6)
    assert weight == pytest.approx(0.19 * 0.6 ** k, rel=1e-12)
    assert shift == pytest.approx(0.03 * 0.6 ** k, rel=1e-12)


def test_depth_schedule_constant_and_config_forms():
    assert depth_schedule(12345, 0.19, 0.03, 0, 0.6) == (0.19, 0.03)
    cfg = DepthLossConfig(weight=0.16, shift=0.036, decay_every=84, gamma=0.64)
    for batch in (0, 83, 84, 3 * 84):
        expected = (0.16 * 0.64 ** (batch // 84), 0.036 * 0.64 ** (batch // 84))
        assert depth_schedule_from(cfg, batch) == pytest.approx(expected)
        assert depth_schedule(batch, cfg) == depth_schedule_from(cfg, batch)  # DESIGN.md form
    with pytest.raises(ValueError, match="decay_every"):
        depth_schedule(0, 0.1, 0.1, -1, 0.5)


def test_fps_samples_decay_values():
    # S <- max(int(0.9 S), 5): 11 -> 9 -> 8 -> 7 -> 6 -> 5 -> 5
    expected = [11, 9, 8, 7, 6, 5, 5, 5]
    for k, s in enumerate(expected):
        assert fps_samples(k * 10, 11, 5, 10, 0.9) == s
        assert fps_samples(k * 10 + 9, 11, 5, 10, 0.9) == s  # unchanged until the next multiple
    assert fps_samples(10 ** 9, 11, 9, 1, 0.9) == 9  # long runs stop at the floor (and do not loop 1e9 times)
    assert fps_samples(500, 11, 9, 0, 0.9) == 11  # every=0: no decay


def test_fps_samples_from_config():
    cfg = SamplingConfig(samples=12, min_samples=9, decay_every=50, decay=0.9)
    assert [fps_samples_from(cfg, b) for b in (0, 49, 50, 150)] == [12, 12, 10, 9]
    assert fps_samples(150, cfg) == 9
    with pytest.raises(ValueError, match="sampling.decay"):
        fps_samples(0, 11, 9, 10, 1.5)


def test_reference_steps_to_batches():
    assert reference_steps_to_batches(7000) == 2334
    assert reference_steps_to_batches(300) == 100
    assert reference_steps_to_batches(250) == 84
    assert reference_steps_to_batches(10, optimizers=2) == 5
    with pytest.raises(ValueError):
        reference_steps_to_batches(-1)
