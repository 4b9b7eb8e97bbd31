#!/usr/bin/env bash
# Serving benchmark over HTTP: starts `halfstep serve` on the default model (FP16) and drives it
# with scripts/bench/load.py (streamed /v1/completions, 1..64 concurrent clients, seeded prompt
# and output lengths), printing output tokens/s, TTFT and inter-token latency percentiles, the
# TTFT of ~512-token prompts, and the machine's memory read bandwidth measured in the same run.
#
#   scripts/bench-serve.sh                  # CONCURRENCY=1,8,32,64 REQUESTS=2 by default
#   CONCURRENCY=1,8 REQUESTS=4 scripts/bench-serve.sh
#   HALFSTEP_KERNELS=fast scripts/bench-serve.sh   # the server with --kernels fast
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
PORT="${PORT:-8411}"
CONCURRENCY="${CONCURRENCY:-1,8,32,64}"
REQUESTS="${REQUESTS:-2}"
[[ -f "$MODEL" ]] || scripts/fetch-default-model.sh
cargo build --release -q -p halfstep-server
BIN=target/release/halfstep
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores"
$BIN bandwidth
LOG=$(mktemp)
$BIN serve "$MODEL" --port "$PORT" --dtype float16 --max-num-seqs 64 >"$LOG" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; rm -f "$LOG"' EXIT
for _ in $(seq 1 120); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  kill -0 $PID 2>/dev/null || { cat "$LOG"; exit 1; }
  sleep 0.5
done
python3 scripts/bench/load.py --url "http://127.0.0.1:$PORT" --label "halfstep (f16, ${HALFSTEP_KERNELS:-parity} kernels)" \
  --concurrency "$CONCURRENCY" --requests "$REQUESTS" --ttft-words 440 "$@"
$BIN bandwidth
