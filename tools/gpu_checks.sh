#!/usr/bin/env bash
# The GPU checks of this repository in one go, for a CUDA machine with mamba-ssm installed:
#   bash tools/gpu_checks.sh OUT [BENCHMARK ARGUMENTS...]   (default: --parts train runs)
# the GPU tests (test_gpu.py, the Triton scan compiled), then tools.benchmark; logs and JSON in OUT.
set -uo pipefail
out=$1
shift
[ $# -gt 0 ] || set -- --parts train runs
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python -m pytest -q tests/test_gpu.py tests/test_scan_triton.py 2>&1 | tee "$out/gpu_tests.log"
python -m tools.benchmark "$@" --out "$out" 2>&1 | tee "$out/benchmark.log"
