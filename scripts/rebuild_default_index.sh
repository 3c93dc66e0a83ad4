#!/usr/bin/env bash
# Rebuild the shipped index (index/artefacts/default) with issue 11's procedure, then evaluate it on the
# out-of-distribution set and on the held-out split: plain / general / routed / oracle and the strong static
# configs (the general candidates, which include the ablation's best static combination), interleaved in
# one process, 128 new tokens, greedy. Writes JSON + PNG under out/ and prints the tables, the route
# distribution and issue 11's checks. Run it on a quiet machine from the repository root:
#
#     bash scripts/rebuild_default_index.sh            # or: SKIP_BUILD=1 ... to evaluate the current index
#
# Expected wall time on the 2-core reference machine (SmolLM2, fp32, quiet): build ~60 min, evaluation
# ~40 min on each set (about 7 distinct configs per prompt: methods that pick the same config for a
# prompt share its run), ~2.5 h in all; REPEATS=2 (fastest of two runs per prompt and config, for a
# machine with other load) adds ~80 min. Every heavy step takes the shared lock (/tmp/knnssd-heavy.lock)
# when flock exists, so runs of other people never overlap it.
#
# Environment: INDEX (default index/artefacts/default), OUT (out), SKIP_BUILD=1 (evaluate INDEX as it
# is), LIMIT=N (at most N prompts per kind: a smoke run), REPEATS, TOKENS (128), THREADS (2), BUDGET (16).
set -euo pipefail
cd "$(dirname "$0")/.."

INDEX=${INDEX:-index/artefacts/default}
OUT=${OUT:-out}
TOKENS=${TOKENS:-128}
REPEATS=${REPEATS:-1}
LIMIT=${LIMIT:-0}
THREADS=${THREADS:-2}
BUDGET=${BUDGET:-16}
LOCK=${LOCK:-/tmp/knnssd-heavy.lock}
KNNSSD=.venv/bin/knnssd
PY=.venv/bin/python
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1

heavy() {  # run under the shared lock when flock is there
  if command -v flock >/dev/null; then flock "$LOCK" "$@"; else "$@"; fi
}

# The general candidates as bench configs (same names as in engine.bench.ABLATION_CONFIGS).
STATIC="$OUT/static-configs.json"
$PY -c "
import json
from index.select import GENERAL_CANDIDATES
json.dump({n: c.model_dump(mode='json') for n, c in GENERAL_CANDIDATES.items()}, open('$STATIC', 'w'), indent=1)
"

if [ -z "${SKIP_BUILD:-}" ]; then
  echo "== build ($(date -u +%H:%M:%S))"
  start=$(date +%s)
  # Search: budget 16 screened candidates, 3 prompts x 3 rounds x 32 tokens measured per domain.
  # Choice: the general candidates on 6 prompts of every domain (36), then each domain's own config vs the
  # general one on 8 other prompts of that domain; 2 interleaved rounds, 96 tokens, 90% bootstrap intervals.
  heavy $KNNSSD index build --data index/data/default --out "$INDEX" \
    --budget "$BUDGET" --measure-prompts 3 --measure-rounds 3 --max-new-tokens 32 \
    --general-prompts 6 --confirm-prompts 8 --select-rounds 2 --select-tokens 96 \
    --threads "$THREADS" --no-progress 2>&1 | tee "$OUT/build.log"
  echo "build wall time: $(( $(date +%s) - start )) s" | tee -a "$OUT/build.log"
fi
$KNNSSD index show --out "$INDEX" --table | tee "$OUT/index.txt"

for set in ood heldout; do
  case $set in
    ood) prompts=index/data/ood/prompts.jsonl ;;
    heldout) prompts=index/data/heldout ;;
  esac
  echo "== evaluation on $set ($(date -u +%H:%M:%S))"
  start=$(date +%s)
  fastest=$([ "$REPEATS" -gt 1 ] && echo --fastest || echo --no-fastest)
  heavy $KNNSSD bench engine --prompts "$prompts" --routed --index "$INDEX" --no-hf --config "$STATIC" \
    --max-new-tokens "$TOKENS" --threads "$THREADS" --repeats "$REPEATS" $fastest --limit "$LIMIT" \
    --json "$OUT/eval-$set.json" --plot "$OUT/eval-$set.png" 2>&1 | tee "$OUT/eval-$set.log"
  echo "$set evaluation wall time: $(( $(date +%s) - start )) s"
done

$PY scripts/eval_summary.py "$OUT/eval-ood.json" "$OUT/eval-heldout.json" | tee "$OUT/eval-summary.txt"
