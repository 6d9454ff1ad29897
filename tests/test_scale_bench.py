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
