#!/usr/bin/env bash
# Soak test: the server on the tiny model under mixed load and weight updates for a bounded
# time (SOAK_SECONDS, default 600 = the full profile; .ci/run uses a short one).
# Prints the RSS curve and a summary; fails on any 5xx, lost answer, leaked K/V block,
# growing memory or changed probe output. Stdlib Python only.
#
# Env: HALFSTEP_BIN (default target/release/halfstep), SOAK_SECONDS.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
HALFSTEP_BIN="${HALFSTEP_BIN:-target/release/halfstep}"
source scripts/lib/tiny-server.sh
# A small K/V cache (24 blocks of 16 = 384 positions) so concurrent long prompts force preemption.
start_tiny_server --admin-key soak-admin --num-kv-blocks 24 --max-model-len 512
if ! python3 scripts/soak/soak.py 127.0.0.1 "$PORT" soak-admin "$WORK/tiny/model.safetensors" "$SERVER_PID" </dev/null; then
  echo "server log tail:"; tail -n 30 "$WORK/server.log"; exit 1
fi
kill -0 "$SERVER_PID" || { echo "the server died"; exit 1; }
