#!/usr/bin/env bash
# The checks a GPU machine runs in under 8 minutes, writing JSON under ${OUT:-bench}:
#   1. bench/gpu_check.py: truncated forward (eager, compiled) and in-flight SAE codes on the GPU vs CPU, tiny models
#   2. bench/throughput.py --gpu-sized: Gemma-2-2B-sized model with random JumpReLU SAEs through the worker's pieces as
#      the Pile job configures them (16,384-token batches, context 1024): 16k latents eager and compiled, 131k
#      latents, three 16k SAEs on layers 6/12/18; its JSON is rewritten after each, so a timeout keeps what finished
# Usage: bash bench/gpu_acceptance.sh            (SCALE=toy: the same steps at toy size, on CPU in about a minute;
#                                                PYTHON: the interpreter, default python)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench}
SCALE=${SCALE:-full}
PY=${PYTHON:-python}
mkdir -p "$OUT"
start=$(date +%s)
if [ "$SCALE" = toy ]; then
  timeout 300 "$PY" bench/gpu_check.py --families llama,gemma3 --no-compile --json "$OUT/gpu_check.json"
  timeout 300 "$PY" bench/throughput.py --gpu-sized --scale toy --gpu-docs 24 --gpu-compile false --json "$OUT/throughput_gpu.json"
else
  timeout 150 "$PY" bench/gpu_check.py --json "$OUT/gpu_check.json" || echo "gpu_check: exit $?"
  timeout 300 "$PY" bench/throughput.py --gpu-sized --json "$OUT/throughput_gpu.json" || echo "gpu-sized: exit $?"
fi
echo "gpu_acceptance: $(( $(date +%s) - start ))s, JSON in $OUT"
