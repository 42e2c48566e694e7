#!/usr/bin/env bash
# The main job, from a fresh clone: install, memorize part of the Python standard library with
# SmolLM2-135M into an embedded Qdrant Edge store, tune T and lambda on validation files, then
# compare perplexity with and without the datastore on test files.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh

PACKAGE=${DEMO_PACKAGE:-multiprocessing}   # a stdlib package, split by file
OUT=build/demo-$PACKAGE
rm -rf "$OUT"
# Split by file (sorted by name): of every 7 files, one is test, one validation, five datastore.
.venv/bin/python - "$PACKAGE" "$OUT" <<'PY'
import shutil, sys, sysconfig
from pathlib import Path
package, out = sys.argv[1], Path(sys.argv[2])
files = sorted((Path(sysconfig.get_paths()["stdlib"]) / package).glob("*.py"))
for i, f in enumerate(files):
    split = {3: "test", 6: "validation"}.get(i % 7, "datastore")
    (out / split).mkdir(parents=True, exist_ok=True)
    shutil.copy(f, out / split / f.name)
print(f"{package}: {len(files)} files -> {out}/{{datastore,validation,test}}", file=sys.stderr)
PY

export KNNLM_DATA_DIR="$OUT/data" KNNLM_COLLECTION="stdlib-$PACKAGE"
export KNNLM_WINDOW=${KNNLM_WINDOW:-256} KNNLM_STRIDE=${KNNLM_STRIDE:-128}
.venv/bin/knnlm ingest "$OUT/datastore" --glob '*.py' --domain python-stdlib
.venv/bin/knnlm tune "$OUT/validation" --glob '*.py'
.venv/bin/knnlm eval "$OUT/test" --glob '*.py'
