"""The training-step benchmark that the GPU checks run (bench/gpu_checks.sh): its options reach the step."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from bench import train as train_bench


def _args(*extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    train_bench.add_arguments(parser)
    return parser.parse_args(["--steps", "1", "--batch", "2", "--shard-samples", "8", "--samples", "3",
                              "--resolution", "64", "--skip-streaming", *extra])


def test_bf16_step_breakdown_times_every_stage_in_bf16():
    result = train_bench.run(_args("--precision", "bf16", "--device", "cpu"))
    json.dumps(result)
    step = result["step"]
    assert set(step["ms_per_step"]) == set(train_bench.STAGES)
    assert all(ms > 0 for ms in step["ms_per_step"].values())
    assert (step["device"], step["precision"], step["gpu_peak_mem_mb"]) == ("cpu", "bf16", None)
    assert "streaming" not in result and result["config"]["precision"] == "bf16"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_device_cuda_without_a_gpu_is_one_error_line():
    with pytest.raises(SystemExit, match="^error: --device cuda"):
        train_bench.run(_args("--device", "cuda"))
