#!/usr/bin/env bash
# The GPU checks of issue 15 as one prepared script, for a machine with a CUDA device (not run by this work:
# no GPU was lent to it). From the repository root, with the project installed (`pip install -e ".[all]"`):
#
#     bash bench/gpu_checks.sh [OUT]          # OUT defaults to bench/gpu; commit OUT afterwards
#
# 1. the gpu-marked tests (Triton FPS kernel on CUDA, CUDA collectives, ...);
# 2. one bf16 training step of dino_vits8 (random init, 224 px) at batch 32 with its time breakdown;
# 3. the FPS kernels' timing on CUDA (Triton, torch) against the per-image reference loop.
# Each step writes its output under OUT; a failing step does not stop the others; the exit status says
# whether all passed. About 5 minutes on one H200 after the install.
set -uo pipefail
out=${1:-bench/gpu}
mkdir -p "$out"
status=0
run() { echo "== $*"; "$@" || { echo "!! failed: $*"; status=1; }; }

run bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > '$out/nvidia_smi.csv'"
run python -c "import torch, json; print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda,
  'device': torch.cuda.get_device_name(0)}))"
run bash -c "python -m pytest -q -m gpu -rA 2>&1 | tee '$out/gpu_tests.txt'; exit \${PIPESTATUS[0]}"
run python launch/benchmark.py train --backbone dino_vits8 --weights random --resolution 224 --batch 32 \
    --samples 11 --steps 5 --workers 4 --device cuda --precision bf16 --skip-streaming \
    --out "$out/train_vits8_bf16_b32.json"
run python launch/benchmark.py fps --device cuda --out "$out/fps_cuda.json"
exit $status
