#!/usr/bin/env bash
# The main job, from a fresh clone: install, memorize part of the Python standard library with
# SmolLM2-135M into an embedded Qdrant Edge store, then compare perplexity on held-out files.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh

PACKAGE=${DEMO_PACKAGE:-multiprocessing}   # a stdlib package, split by file
OUT=build/demo-$PACKAGE
rm -rf "$OUT"
# Every 7th file (sorted by name) is held out; the rest is the datastore.
.venv/bin/python - "$PACKAGE" "$OUT" <<'PY'
import shutil, sys, sysconfig
from pathlib import Path
package, out = sys.argv[1], Path(sys.argv[2])
files = sorted((Path(sysconfig.get_paths()["stdlib"]) / package).glob("*.py"))
for i, f in enumerate(files):
    split = "held-out" if i % 7 == 3 else "datastore"
    (out / split).mkdir(parents=True, exist_ok=True)
    shutil.copy(f, out / split / f.name)
print(f"{package}: {len(files)} files -> {out}/datastore, {out}/held-out", file=sys.stderr)
PY

export KNNLM_DATA_DIR="$OUT/data" KNNLM_COLLECTION="stdlib-$PACKAGE"
export KNNLM_WINDOW=${KNNLM_WINDOW:-256} KNNLM_STRIDE=${KNNLM_STRIDE:-128}
.venv/bin/knnlm ingest "$OUT/datastore" --glob '*.py' --domain python-stdlib
.venv/bin/knnlm eval "$OUT/held-out" --glob '*.py'
