"""The scale benchmark's harness (bench/scale.py): fitted growth and the per-place child measurement."""
import json
import subprocess
import sys

from bench import scale


def test_fit_exponent_recovers_power_laws():
    ns = [10_000, 100_000, 1_000_000]
    assert abs(scale.fit_exponent(ns, [3e-6 * n ** 2 for n in ns]) - 2.0) < 1e-9
    assert abs(scale.fit_exponent(ns, [5e-7 * n for n in ns]) - 1.0) < 1e-9
    assert scale.fit_exponent([10_000], [1.0]) is None  # one point: no fit
    assert scale.extrapolate(1_000_000, 2.0, 1.0) == 100.0  # 50M / 1M x 2 s


def test_child_measures_a_place_in_a_fresh_process():
    proc = subprocess.run([sys.executable, "-m", "bench.scale", "--child", "offsets_table", "2000"],
                          capture_output=True, text=True, check=True)
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["n"] == 2000 and row["seconds"] >= 0 and row["peak_rss_mb"] >= row["start_rss_mb"] > 0
    assert row["table_bytes"] > 0


def test_stage2_places_run_at_a_small_n(monkeypatch):
    """Each stage-2 place's setup and work run (in this process, N = 3,000 crops) and report their figures."""
    import pytest

    from bench import scale_stage2
    from depthg import knn

    with pytest.raises(ValueError, match="whole blocks"):
        scale_stage2.knn_actor(3000, actors=3)  # the production blocks are 4096 x 32768
    monkeypatch.setattr(knn, "QUERY_ROWS", 1000)
    monkeypatch.setattr(knn, "KEY_ROWS", 1000)

    assert scale_stage2.driver_plan(3000)()["units"] == 2  # 10 shards: units of 5 (at least 5 shards, at most 16)
    assert scale_stage2.unit_reads(3000)()["unit_samples"] == 4 * scale_stage2.PER_SHARD  # 9 shards: units of 4 + 5
    assert scale_stage2.loader_rows(3000)()["positive_ranges"] == 2000 * 32 * 7
    assert scale_stage2.knn_actor(3000, actors=3)()["query_rows"] == 1000
