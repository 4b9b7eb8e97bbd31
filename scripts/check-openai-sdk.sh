#!/usr/bin/env bash
# Check halfstep against the official OpenAI Python SDK.
#
# Creates (idempotently) a venv at <repo>/.venv-sdk with a pinned `openai`
# package from PyPI, writes the seeded tiny test model to a temp dir, serves it
# on a free loopback port (with an API key), and runs scripts/check_openai_sdk.py
# against it. The server is always stopped on exit.
#
# Env:
#   HALFSTEP_BIN  server binary (default: target/release/halfstep; built with
#                 `cargo build --release -p halfstep-server` if missing)
#   PYTHON        interpreter used to create the venv (default: python3)
set -euo pipefail

OPENAI_VERSION="3.57.0"
API_KEY="sdk-test-key"
MODEL_NAME="tiny"
HEALTH_TIMEOUT_S=60

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
cd "$REPO_ROOT"

VENV="$REPO_ROOT/.venv-sdk"
PYTHON="${PYTHON:-python3}"
HALFSTEP_BIN="${HALFSTEP_BIN:-target/release/halfstep}"

# --- venv with the pinned SDK ------------------------------------------------
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "creating venv at $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
if [[ "$("$PY" -c 'import importlib.metadata as m; print(m.version("openai"))' 2>/dev/null || true)" != "$OPENAI_VERSION" ]]; then
  echo "installing openai==$OPENAI_VERSION into $VENV" >&2
  "$PY" -m pip install --disable-pip-version-check --no-input -q "openai==$OPENAI_VERSION" </dev/null >&2
fi
echo "openai $("$PY" -c 'import openai; print(openai.__version__)')"

# --- server binary -----------------------------------------------------------
if [[ ! -x "$HALFSTEP_BIN" ]]; then
  echo "$HALFSTEP_BIN not found; building it" >&2
  cargo build --release -p halfstep-server </dev/null >&2
fi
if [[ ! -x "$HALFSTEP_BIN" ]]; then
  echo "error: $HALFSTEP_BIN still missing after the build" >&2
  exit 1
fi

# --- tiny model, free port, server -------------------------------------------
WORK="$(mktemp -d "${TMPDIR:-/tmp}/halfstep-sdk.XXXXXX")"
SERVER_PID=""
CHECK_PID=""
cleanup() {
  local rc=$?
  if [[ -n "$CHECK_PID" ]]; then
    kill "$CHECK_PID" 2>/dev/null || true
    wait "$CHECK_PID" 2>/dev/null || true
  fi
  if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 50); do
      kill -0 "$SERVER_PID" 2>/dev/null || break
      sleep 0.1
    done
    kill -9 "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

MODEL_DIR="$WORK/tiny"
LOG="$WORK/server.log"
if ! "$HALFSTEP_BIN" tiny-model "$MODEL_DIR" </dev/null >/dev/null; then
  echo "error: '$HALFSTEP_BIN tiny-model $MODEL_DIR' failed" >&2
  exit 1
fi

PORT="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')"

"$HALFSTEP_BIN" serve "$MODEL_DIR" --host 127.0.0.1 --port "$PORT" \
  --served-model-name "$MODEL_NAME" --api-key "$API_KEY" </dev/null >"$LOG" 2>&1 &
SERVER_PID=$!

echo "waiting for halfstep on 127.0.0.1:$PORT (pid $SERVER_PID)" >&2
# A bash loop (not one long child process) so INT/TERM run the trap at once.
health_ok() {
  "$PY" -c 'import sys, urllib.request
try:
    sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=1).status == 200 else 1)
except Exception:
    sys.exit(1)' "http://127.0.0.1:$PORT/health"
}
fail_start() {
  echo "error: $1" >&2
  echo "---- server log ----" >&2
  cat "$LOG" >&2 || true
  echo "---- end of server log ----" >&2
  exit 1
}
START=$SECONDS
until health_ok; do
  kill -0 "$SERVER_PID" 2>/dev/null || fail_start "the server exited before /health returned 200"
  (( SECONDS - START < HEALTH_TIMEOUT_S )) || fail_start "/health did not return 200 within ${HEALTH_TIMEOUT_S} s"
  sleep 0.2
done

# --- the SDK checks ----------------------------------------------------------
# In the background + wait, so that INT/TERM reach the trap without delay.
"$PY" "$SCRIPT_DIR/check_openai_sdk.py" --base-url "http://127.0.0.1:$PORT/v1" \
  --api-key "$API_KEY" --model "$MODEL_NAME" </dev/null &
CHECK_PID=$!
rc=0
wait "$CHECK_PID" || rc=$?
CHECK_PID=""
if [[ $rc -ne 0 ]]; then
  echo "---- server log (last 50 lines) ----" >&2
  tail -n 50 "$LOG" >&2 || true
  echo "---- end of server log ----" >&2
fi
exit "$rc"
