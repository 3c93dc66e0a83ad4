#!/usr/bin/env bash
# Runs the whole test suite with the project's venv; starts a throwaway redis-server if none answers.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
exec "$VENV/bin/python" -m pytest -q "$@"
