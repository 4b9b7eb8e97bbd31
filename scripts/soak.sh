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
[[ -x "$HALFSTEP_BIN" ]] || cargo build --release -p halfstep-server </dev/null

WORK="$(mktemp -d "${TMPDIR:-/tmp}/halfstep-soak.XXXXXX")"
SERVER_PID=""
cleanup() {
  [[ -n "$SERVER_PID" ]] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT
"$HALFSTEP_BIN" tiny-model "$WORK/tiny" 2>/dev/null
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
# A small K/V cache (24 blocks of 16 = 384 positions) so concurrent long prompts force preemption.
"$HALFSTEP_BIN" serve "$WORK/tiny" --host 127.0.0.1 --port "$PORT" --admin-key soak-admin \
  --num-kv-blocks 24 --max-model-len 512 >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 600); do
  python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$PORT/health', timeout=1)" 2>/dev/null && break
  kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server.log"; exit 1; }
  sleep 0.1
done
if ! python3 scripts/soak/soak.py 127.0.0.1 "$PORT" soak-admin "$WORK/tiny/model.safetensors" "$SERVER_PID" </dev/null; then
  echo "server log tail:"; tail -n 30 "$WORK/server.log"; exit 1
fi
kill -0 "$SERVER_PID" || { echo "the server died"; exit 1; }
