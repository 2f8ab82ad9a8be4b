#!/usr/bin/env bash
# GPU checks of the Triton kernels, in one go (on a GPU machine with torch + triton):
# correctness against the torch references (pytest, CUDA tests), then the kernel benchmark.
#   bash benchmarks/gpu_check.sh [OUT_DIR]     (BENCH_ARGS="--gpu-sizes 16M --gemv-only" for a shorter run)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-gpu_out}}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_kernels_blockq.py \
    tests/test_kernels_lowbit_gemm.py tests/test_philox.py 2>&1 | tail -25 | tee "$OUT/pytest_gpu.txt"
timeout "${BENCH_TIMEOUT:-330}" python3 -m benchmarks.bench_kernels --no-cpu --gpu ${BENCH_ARGS:-} --out "$OUT/bench_kernels_gpu.md" 2>"$OUT/bench_progress.txt"
cat "$OUT/bench_kernels_gpu.md" 2>/dev/null || tail -40 "$OUT/bench_progress.txt"
grep -h "GEMV config\|MISMATCH\|Error" "$OUT/bench_progress.txt" | head -40
