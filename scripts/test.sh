#!/usr/bin/env bash
# The test suite, from a fresh clone: install, lint, then pytest (the SmolLM2 test included).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest "$@"
