#!/usr/bin/env bash
# The one prepared GPU check, run from the source tree with a given python: on a GPU machine its own
# python3 with its CUDA build of torch (nothing is installed over it; the project is not installed).
#
#   python3 scripts/gpu_wheels.py            # here, once: the packages the GPU image lacks -> gpu_wheels/
#   PYTHON=python3 bash scripts/gpu_check.sh # there, with gpu_wheels/ sent along (git-ignored: carry it)
#
# Steps, each run with a time cap from one overall budget and recorded in $OUT/status.tsv (step, exit
# code, seconds); a failing step never stops the ones after it, so one run returns everything:
#   wheels       install gpu_wheels/*.whl (if present) into a private --target dir first on PYTHONPATH
#   env          python, torch, CUDA, the GPU; every module the check imports
#   probe        row invariance on the device: F.linear(x[:1], W) vs F.linear(x, W)[:1] for M = 1..16,
#                and the fixed-shape linear / RMSNorm / per-row attention the engine runs (engine.gpu)
#   gpu-tests    pytest -m gpu tests/integration/test_engine_gpu.py: greedy speculation, batching and
#                seeded sampling token-identical on the device, rows bit-identical, logits vs CPU fp32
#   bench-engine HF generate vs plain vs speculative (scripts/gpu_check_configs.json: skip sets valid
#                for the model's 24 layers), verify cost by tokens
#   bench-serve  closed-loop clients by concurrency: serial vs batched plain vs batched speculative
# The model is a random-weight Qwen2.5-Coder-0.5B of the real shape built on the device
# (engine.random_model), so no model package is needed; KNNSSD_GPU_MODEL names another (a bundled name or
# a model directory). Output: $OUT/check.log (everything), status.tsv, probe.json, bench-engine.json/.png,
# bench-serve.json/.png: 7 files (the device tool returns at most 8). The CPU can stand in
# (KNNSSD_GPU_DEVICE=cpu with the -mini model and small GPU_CHECK_* sizes: tests/unit/test_gpu_check.py).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEVICE=${KNNSSD_GPU_DEVICE:-cuda}
MODEL=${KNNSSD_GPU_MODEL:-random:qwen2.5-coder-0.5b}
OUT=${OUT:-out/gpu}
WHEELS=${GPU_CHECK_WHEELS:-gpu_wheels}
BUDGET=${GPU_CHECK_BUDGET_S:-480}           # well inside 600 s per command, with a GPU machine's start
TOKENS=${GPU_CHECK_TOKENS:-64}              # new tokens per request in the benches
LIMIT=${GPU_CHECK_LIMIT:-2}                 # bench engine prompts per kind (the built-in set: 2 of each of 5 kinds)
CONCURRENCY=${GPU_CHECK_CONCURRENCY:-1,4,16}
REQUESTS=${GPU_CHECK_REQUESTS:-16}
SERVE_CONFIG=${GPU_CHECK_SERVE_CONFIG:-'{"prompt_lookup": 3, "skip_mlp": [20, 21], "max_draft": 6}'}
GPU_TESTS=${GPU_CHECK_TESTS:-tests/integration/test_engine_gpu.py}
THREADS=${GPU_CHECK_THREADS:-4}             # torch CPU threads of the benches
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG=$OUT/check.log
STATUS=$OUT/status.tsv
: >"$LOG"
printf 'step\trc\tseconds\n' >"$STATUS"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} KNNSSD_GPU_MODEL=$MODEL
export KNNSSD_GPU_DEVICE=$DEVICE PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$SECONDS

# step NAME CAP_S COMMAND...: run with at most CAP_S seconds (less if the budget is nearly spent), log it,
# record its exit code (124: timed out) and go on.
step() {
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET - (SECONDS - START)))
  ((cap > left)) && cap=$left
  local t0=$SECONDS rc
  echo "==== $name (cap ${cap}s): $*" | tee -a "$LOG"
  if ((cap < 5)); then
    echo "skipped: the check's budget of ${BUDGET}s is spent" | tee -a "$LOG"
    rc=125
  else
    if declare -F "$1" >/dev/null; then  # a shell function (timeout runs programs only)
      "$@" 2>&1 | tee -a "$LOG"
    else
      timeout -k 10 "$cap" "$@" 2>&1 | tee -a "$LOG"
    fi
    rc=${PIPESTATUS[0]}
  fi
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >>"$STATUS"
  echo "==== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$LOG"
}

install_wheels() {
  local site=${TMPDIR:-/tmp}/knnssd-gpu-site
  shopt -s nullglob
  local whl=("$WHEELS"/*.whl)
  if ((${#whl[@]} == 0)); then
    echo "no wheels in $WHEELS: using the machine's packages as they are"
    return 0
  fi
  for w in "${whl[@]}"; do
    case $(basename "$w") in torch-*) echo "refusing $w: the machine keeps its own torch"; return 1 ;; esac
  done
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${whl[@]}" || return 1
  echo "installed ${#whl[@]} wheels into $site"
}

if [[ -d $WHEELS ]]; then
  step wheels 120 install_wheels
  export PYTHONPATH="${TMPDIR:-/tmp}/knnssd-gpu-site:$PYTHONPATH"
else
  printf 'wheels\t0\t0\n' >>"$STATUS"
  echo "==== wheels: no $WHEELS folder, using the machine's packages" | tee -a "$LOG"
fi

step env 60 "$PY" - <<'PY'
import importlib, os, sys
import torch
dev = os.environ["KNNSSD_GPU_DEVICE"]
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuda available", torch.cuda.is_available(), "| device", dev)
if torch.cuda.is_available():
    print("GPU:", torch.cuda.get_device_name(0))
missing = []
for mod in ("pydantic", "transformers", "safetensors", "typer", "rich", "yaml", "pytest", "matplotlib", "numpy",
            "engine.generate", "engine.gpu", "engine.random_model", "engine.bench", "engine.loadtest", "deploy.cli"):
    try:
        m = importlib.import_module(mod)
        print(f"  {mod:<22} {getattr(m, '__version__', '')}")
    except Exception as exc:  # report every missing piece at once
        missing.append(f"{mod}: {exc!r}")
for line in missing:
    print("  MISSING", line)
if dev.startswith("cuda") and not torch.cuda.is_available():
    missing.append("no CUDA device visible")
sys.exit(1 if missing else 0)
PY

DTYPE=$([[ $DEVICE == cpu ]] && echo float32 || echo bfloat16)
step probe 120 "$PY" -m engine.gpu probe --device "$DEVICE" --dtype "$DTYPE" --json "$OUT/probe.json"
step gpu-tests 240 "$PY" -m pytest -v -m gpu -p no:cacheprovider -W default "$GPU_TESTS"
step bench-engine 180 "$PY" -m deploy bench engine --model "$MODEL" --device "$DEVICE" --threads "$THREADS" \
  --max-new-tokens "$TOKENS" --limit "$LIMIT" --repeats 1 --config scripts/gpu_check_configs.json \
  --json "$OUT/bench-engine.json" --plot "$OUT/bench-engine.png"
step bench-serve 180 "$PY" -m deploy bench serve --model "$MODEL" --device "$DEVICE" --threads "$THREADS" \
  --concurrency "$CONCURRENCY" --requests "$REQUESTS" --max-new-tokens "$TOKENS" --max-running 16 \
  --config "$SERVE_CONFIG" --json "$OUT/bench-serve.json" --plot "$OUT/bench-serve.png"

echo "==== summary ($((SECONDS - START))s; exit codes: 0 ok, 124 timed out, 125 skipped)" | tee -a "$LOG"
column -t "$STATUS" 2>/dev/null | tee -a "$LOG" || tee -a "$LOG" <"$STATUS"
echo "wrote $OUT"
# the check's own exit code: 0 when every step passed
! awk -F'\t' 'NR > 1 && $2 != 0 { bad = 1 } END { exit !bad }' "$STATUS"
