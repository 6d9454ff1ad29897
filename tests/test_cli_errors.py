"""Scripts print the project's own errors as ONE `error: ...` line (no traceback) and exit 2; --debug shows it."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO}
    env.pop("DEPTHG_DEBUG", None)
    return subprocess.run([sys.executable, os.path.join(REPO, "launch", script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("script,args,message", [
    ("generate_depth.py", ["--config", "none", "data.bogus=1"], "error: unknown config key 'data.bogus'"),
    ("train.py", ["--config", "none", "train.micro_batch_per_gpu=abc"], "error: config key 'train.micro_batch_per_gpu'"),
    ("evaluate.py", ["--checkpoint", "/nonexistent/segmenter.pt"], "error: "),
    ("train.py", ["--config", "/nonexistent/config.yaml"], "error: config file not found: /nonexistent/config.yaml"),
])
def test_script_prints_one_error_line(script, args, message):
    proc = _run(script, *args)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(message), proc.stderr
    assert "Traceback" not in proc.stderr


def test_debug_flag_shows_the_traceback():
    proc = _run("generate_depth.py", "--config", "none", "data.bogus=1", "--debug")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr
