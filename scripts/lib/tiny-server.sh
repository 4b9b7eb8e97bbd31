# Sourced by the check scripts: serves the seeded tiny model on a free loopback port.
#
# start_tiny_server ARGS...  writes the tiny model into $WORK/tiny, starts
#   "$HALFSTEP_BIN serve" with ARGS, waits for /health, and sets PORT and SERVER_PID.
#   A trap stops the server and removes $WORK on exit. Needs HALFSTEP_BIN.

WORK="$(mktemp -d "${TMPDIR:-/tmp}/halfstep-check.XXXXXX")"
SERVER_PID=""
stop_tiny_server() {
  [[ -n "$SERVER_PID" ]] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
  rm -rf "$WORK"
}
trap stop_tiny_server EXIT

start_tiny_server() {
  [[ -x "$HALFSTEP_BIN" ]] || cargo build --release -p halfstep-server </dev/null
  "$HALFSTEP_BIN" tiny-model "$WORK/tiny" 2>/dev/null
  PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  "$HALFSTEP_BIN" serve "$WORK/tiny" --host 127.0.0.1 --port "$PORT" "$@" >"$WORK/server.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 1 600); do
    python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$PORT/health', timeout=1)" 2>/dev/null && return 0
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/server.log"; return 1; }
    sleep 0.1
  done
  echo "the server did not become healthy"; cat "$WORK/server.log"; return 1
}
