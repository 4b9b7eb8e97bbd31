#!/usr/bin/env bash
# Create (idempotently) the Python venv used by scripts/golden/make_golden.py
# at <repo>/.venv-golden, and install pinned versions from PyPI.
#
# Note on torch: the PyPI torch wheel for linux x86_64 is a CUDA build; with
# `--no-deps` `import torch` fails (it dlopens libcudart/libcublasLt from the
# nvidia-* wheels even on CPU), and no CPU-only build is on PyPI. So torch is
# installed with its deps (~5.5 GB venv, ~35 s on a fast link). It is only
# ever run on CPU here.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"
VENV="$REPO_ROOT/.venv-golden"
PYTHON="${PYTHON:-python3}"

PINNED=(
  "torch==2.15.0"
  "transformers==5.24.0"
  "tokenizers==0.23.3"
  "huggingface_hub==2.4.0"
  "safetensors==0.8.0"
  "accelerate==1.15.0"   # required by transformers to load GGUF
  "gguf==0.19.0"
  "numpy==2.4.6"
)

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "creating venv at $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install --disable-pip-version-check -q --upgrade pip >&2
# pip skips anything already installed at the pinned version.
"$PY" -m pip install --disable-pip-version-check -q "${PINNED[@]}" >&2

"$PY" - <<'PYEOF'
import importlib.metadata as md
import torch
x = torch.ones(2, 2) @ torch.ones(2, 2)
assert float(x.sum()) == 8.0
vers = {p: md.version(p) for p in ("torch", "transformers", "tokenizers", "gguf", "numpy")}
print("ok:", ", ".join(f"{k} {v}" for k, v in vers.items()))
PYEOF
echo "$VENV"
