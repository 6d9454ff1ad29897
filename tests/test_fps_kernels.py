"""depthg.fps_kernels: the compiled CPU loop and the Triton kernel give the torch loop's indices exactly.

The Triton kernel is checked on the CPU with Triton's interpreter, in a subprocess because
``TRITON_INTERPRET=1`` must be set before the kernel is defined, and its code for an sm_90 target is checked
free of fused multiply-adds (compiled here, no GPU needed); on a CUDA device (``gpu`` marker) it is compared
on the real hardware.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from bench import fps as fps_bench
from depthg import fps_kernels
from depthg.sampling import farthest_point_sample, lift_points

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fps_cases(device="cpu"):
    """(name, points [B,N,3], n, start [B]): random, tie-heavy and duplicated inputs, odd B and N."""
    g = torch.Generator().manual_seed(11)
    flat = lift_points(torch.full((3, 7, 9), 0.5), reference=True)  # a flat wall: symmetric, many equal distances
    cases = [
        ("random", torch.rand(5, 37, 3, generator=g), 20, torch.tensor([0, 36, 5, 17, 2])),
        ("random_784", lift_points(torch.rand(3, 28, 28, generator=g), reference=True), 121, torch.tensor([0, 783, 400])),
        ("flat_depth", flat, 63, torch.tensor([0, 31, 62])),
        ("duplicates", torch.randint(0, 3, (4, 50, 3), generator=g).float(), 50, torch.tensor([0, 1, 49, 7])),
        ("all_equal", torch.ones(2, 13, 3), 13, torch.tensor([0, 12])),
        ("fewer_than_a_vector", torch.rand(1, 5, 3, generator=g), 5, torch.tensor([3])),
        ("float64", torch.rand(3, 101, 3, generator=g, dtype=torch.float64), 30, torch.tensor([0, 50, 100])),
        ("one_point", torch.rand(2, 9, 3, generator=g), 1, torch.tensor([4, 8])),
        ("empty_batch", torch.rand(0, 9, 3, generator=g), 4, torch.zeros(0, dtype=torch.long)),
    ]
    return [(name, p.to(device), n, s.to(device)) for name, p, n, s in cases]


@pytest.mark.parametrize("case", fps_cases(), ids=lambda c: c[0])
def test_compiled_loop_matches_the_torch_loop(case):
    _, points, n, start = case
    expected = farthest_point_sample(points, n, start, backend="torch")
    got = farthest_point_sample(points, n, start, backend="compiled")
    assert got.dtype == torch.long and got.shape == expected.shape
    assert torch.equal(got, expected)
    assert torch.equal(farthest_point_sample(points, n, start), expected)  # auto on the CPU
    assert torch.equal(farthest_point_sample(points, n, start, backend="numpy"), expected)


def test_compiled_loop_is_cached_in_the_kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DEPTHG_KERNEL_CACHE", str(tmp_path))
    fps_kernels.compiled_library.cache_clear()
    try:
        assert fps_kernels.compiled_library() is not None
        built = sorted(os.listdir(tmp_path))
        assert len(built) == 1 and built[0].startswith("fps-") and built[0].endswith(".so")
        first = os.stat(tmp_path / built[0])
        fps_kernels.compiled_library.cache_clear()  # a new process: loads the cached file, builds nothing
        assert fps_kernels.compiled_library() is not None and sorted(os.listdir(tmp_path)) == built
        again = os.stat(tmp_path / built[0])
        assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    finally:
        fps_kernels.compiled_library.cache_clear()


def test_compile_failure_falls_back_to_numpy_with_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("DEPTHG_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    fps_kernels.compiled_library.cache_clear()
    points = torch.rand(3, 40, 3, generator=torch.Generator().manual_seed(2))
    try:
        with caplog.at_level(logging.WARNING, logger="depthg.fps_kernels"):
            got = farthest_point_sample(points, 12, backend="compiled")
            again = farthest_point_sample(points, 12)  # auto: same fallback, warned only once
        assert fps_kernels.fps_compiled(points, 12, torch.zeros(3, dtype=torch.long)) is None
    finally:
        fps_kernels.compiled_library.cache_clear()
    expected = farthest_point_sample(points, 12, backend="numpy")
    assert torch.equal(got, expected) and torch.equal(again, expected)
    warnings = [r for r in caplog.records if "compiled FPS loop" in r.getMessage()]
    assert len(warnings) == 1 and "NumPy loop" in warnings[0].getMessage()


def test_backend_errors_name_the_backend():
    points = torch.rand(2, 10, 3)
    with pytest.raises(ValueError, match="start indices must lie in"):
        farthest_point_sample(points, 3, torch.tensor([0, 10]), backend="compiled")
    with pytest.raises(ValueError, match="one index per batch item"):
        farthest_point_sample(points, 3, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="compiled backend needs float32/float64 CPU"):
        farthest_point_sample(points.half(), 3, backend="compiled")
    half = farthest_point_sample(points.half(), 3)  # auto: other dtypes take the torch loop
    assert torch.equal(half, farthest_point_sample(points.half(), 3, backend="torch"))
    if not fps_kernels.triton_interpreting():
        with pytest.raises(ValueError, match="triton backend needs"):
            farthest_point_sample(points, 3, backend="triton")


@pytest.mark.parametrize("dtype, bits", [("fp32", 32), ("fp64", 64)])
def test_triton_kernel_lowers_for_cuda_without_fused_multiply_add(dtype, bits):
    # no GPU needed: Triton compiles for an sm_90 target with the ptxas it ships; the launch options must
    # keep every multiply and add separately rounded (an FMA would change the chosen points)
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {"points_ptr": f"*{dtype}", "start_ptr": "*i64", "out_ptr": "*i64", "num": "i32", "n_pick": "i32",
                 "BLOCK": "constexpr"}
    src = ASTSource(fps_kernels._fps_kernel, signature=signature, constexprs={"BLOCK": 1024})
    options = {"num_warps": fps_kernels.triton_num_warps(1024), **fps_kernels.TRITON_OPTIONS}
    ptx = fps_kernels.triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
    assert f"mul.rn.f{bits}" in ptx and f"add.rn.f{bits}" in ptx and f"sub.rn.f{bits}" in ptx
    assert "fma" not in ptx and ".ftz" not in ptx


_INTERPRETER_CHECK = """
import torch
from bench import fps as fps_bench
from depthg import fps_kernels
from depthg.sampling import farthest_point_sample
from tests.test_fps_kernels import fps_cases

assert fps_kernels.triton_interpreting()
for name, points, n, start in fps_cases():
    expected = farthest_point_sample(points, n, start, backend="torch")
    got = farthest_point_sample(points, n, start, backend="triton")
    assert got.dtype == torch.long and torch.equal(got, expected), (name, got, expected)
    print("same", name)
"""


def test_triton_kernel_matches_the_torch_loop_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", _INTERPRETER_CHECK], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split() == [w for name, *_ in fps_cases() for w in ("same", name)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_kernel_on_cuda_matches_the_loops():
    assert fps_kernels.triton is not None
    for name, points, n, start in fps_cases("cuda"):
        got = farthest_point_sample(points, n, start, backend="triton")
        assert torch.equal(got, farthest_point_sample(points, n, start)), name  # auto on CUDA: triton
        assert torch.equal(got, farthest_point_sample(points, n, start, backend="torch")), name
        assert torch.equal(got.cpu(), farthest_point_sample(points.cpu(), n, start.cpu(), backend="compiled")), name
    big = lift_points(torch.rand(64, 28, 28, device="cuda"), reference=True)
    assert torch.equal(farthest_point_sample(big, 121, backend="triton").cpu(),
                       farthest_point_sample(big.cpu(), 121, backend="numpy"))


def test_fps_benchmark_times_every_cpu_backend_against_the_reference_loop():
    parser = argparse.ArgumentParser()
    fps_bench.add_arguments(parser)
    args = parser.parse_args(["--batch-sizes", "3", "--grid", "8", "--samples", "3", "--repeats", "1",
                              "--numpy-repeats", "1", "--device", "cpu"])
    result = fps_bench.run(args)
    json.dumps(result)
    assert [(r["device"], r["backend"]) for r in result["rows"]] == [("cpu", "compiled"), ("cpu", "numpy"),
                                                                    ("cpu", "torch")]
    assert all(r["identical_selection"] and r["batched_best_ms"] <= r["batched_ms"] for r in result["rows"])
    assert "triton" in result["not_timed"] and result["compiled_loop_built"]
