#!/usr/bin/env bash
# Idempotently create <repo>/.venv-quant and regenerate
# model/tests/fixtures/gguf_dequant.json with gguf-py's (de)quantisers.
set -euo pipefail
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"
VENV="$REPO_ROOT/.venv-quant"
PINS=("gguf==0.19.0" "numpy==2.4.6")
if [[ ! -x "$VENV/bin/python" ]]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -m pip freeze 2>/dev/null | grep -qx "gguf==0.19.0"; then
  "$VENV/bin/python" -m pip install -q "${PINS[@]}"
fi
exec "$VENV/bin/python" "$SCRIPT_DIR/make_quant_fixtures.py" "$@"
