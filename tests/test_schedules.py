"""Schedules as functions of the batch index (docs/METHOD.md section 5).

The comparison of every paper config with the reference's own counting is in test_golden_reference.py.
"""
import pytest

from depthg.config import load_config
from depthg.schedules import (decays_in_effect, depth_schedule, fps_samples, reference_decay_period,
                              reference_steps_to_batches, table, values_at)


def _brute_decays(batch, every, first):
    """Count the decay batches first, first + every, ... that are <= batch."""
    if every == 0:
        return 0
    first = first or every
    return sum(1 for k in range(first, batch + 1, every))


@pytest.mark.parametrize("every,first", [(0, 0), (1, 0), (7, 0), (250, 251), (1000, 1), (3, 5)])
def test_decays_in_effect_counts_the_decay_batches(every, first):
    for batch in range(0, 1200, 1):
        assert decays_in_effect(batch, every, first) == _brute_decays(batch, every, first)


def test_depth_schedule_piecewise_exponential():
    assert depth_schedule(0, 0.19, 0.03, 100, 0.6) == (0.19, 0.03)
    assert depth_schedule(99, 0.19, 0.03, 100, 0.6) == (0.19, 0.03)
    assert depth_schedule(100, 0.19, 0.03, 100, 0.6) == pytest.approx((0.19 * 0.6, 0.03 * 0.6))
    # the reference's timing: decayed after batch 250, in effect from batch 251
    assert depth_schedule(250, 0.19, 0.03, 250, 0.6, first=251) == (0.19, 0.03)
    assert depth_schedule(251, 0.19, 0.03, 250, 0.6, first=251) == pytest.approx((0.114, 0.018))
    assert depth_schedule(12345, 0.19, 0.03, 0, 0.6) == (0.19, 0.03)
    with pytest.raises(ValueError, match="decay_every"):
        depth_schedule(0, 0.1, 0.1, -1, 0.5)
    with pytest.raises(ValueError, match="batch index"):
        depth_schedule(-1, 0.1, 0.1, 10, 0.5)


def test_fps_samples_decay_values_and_floor():
    assert [fps_samples(b, 11, 1, 1000, 0.9, first=1) for b in (0, 1, 1000, 1001, 2000, 2001)] == [11, 9, 9, 8, 8, 7]
    assert [fps_samples(k * 10, 11, 5, 10, 0.9) for k in range(6)] == [11, 9, 8, 7, 6, 5]
    assert fps_samples(10 ** 9, 11, 9, 1, 0.9) == 9  # long runs stop at the floor (and do not loop 1e9 times)
    assert fps_samples(500, 11, 9, 0, 0.9) == 11  # every=0: no decay
    assert fps_samples(5000, 12, 1, 1000, 1.0, first=1) == 12  # COCO ViT-B/8: factor 1
    with pytest.raises(ValueError, match="sampling.decay"):
        fps_samples(0, 11, 9, 10, 1.5)


def test_reference_conversions():
    assert [reference_decay_period(e) for e in (250, 300, 400, 200, 1000)] == [250, 100, 400, 200, 1000]
    assert reference_steps_to_batches(7000) == 2334
    assert reference_steps_to_batches(10, optimizers=2) == 5
    with pytest.raises(ValueError):
        reference_steps_to_batches(-1)
    with pytest.raises(ValueError):
        reference_decay_period(0)


def test_values_at_reads_the_config_and_mode_none_zeroes_lambda():
    cfg = load_config(None, ["loss.depth.decay_every=10", "loss.depth.first_decay=11", "sampling.decay_every=5",
                             "sampling.first_decay=1", "sampling.min_samples=8"])
    assert values_at(cfg, 0) == (0.19, 0.03, 11)
    assert values_at(cfg, 11) == pytest.approx((0.19 * 0.6, 0.03 * 0.6, 8))
    cfg = load_config(None, ["loss.depth.mode=none"])
    assert values_at(cfg, 0)[0] == 0.0
    t = table(cfg, [0, 3])
    assert t == {"batches": [0, 3], "lambda": [0.0, 0.0], "b_depth": [0.03, 0.03], "samples": [11, 11]}
