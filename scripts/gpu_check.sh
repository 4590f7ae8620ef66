#!/usr/bin/env bash
# The GPU check, one command for a machine with a CUDA device: the Triton kernel's tests compiled for the device
# (not the interpreter) on CUDA tensors, then `rotary bench gpu` (correctness pass, GB/s against the peak, the
# anchors that import) written as JSON, then the static kernel report (registers, spills, 128-bit accesses beside
# Liger-Kernel's, compiled ahead of time for sm_80/sm_90: scripts/kernel_report.py, which needs no GPU) written as
# markdown. Usage: scripts/gpu_check.sh [OUT.json] [REPORT.md]   (default gpu-bench.json, kernel-report.md)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
unset TRITON_INTERPRET  # compiled kernels: the interpreter is for machines without a GPU
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # a bare checkout works without `pip install -e .`
"$PY" -c "import torch, triton; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)"
"$PY" -m pytest -q -p no:cacheprovider tests/test_triton.py tests/test_triton_aot.py
"$PY" -m rotary bench gpu --json "${1:-gpu-bench.json}"
"$PY" scripts/kernel_report.py --out "${2:-kernel-report.md}"
