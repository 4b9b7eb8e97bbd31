#!/usr/bin/env bash
# The serving workload of scripts/bench-serve.sh run, on this machine and in one run, against
# halfstep and the peers a user would pick instead, all on the default model's weights in FP16:
#   - llama.cpp's llama-server, built from the llama-cpp-python sdist's vendor/llama.cpp with
#     cmake from PyPI (cached), on an F16 GGUF made from the default model with llama-quantize;
#   - Hugging Face transformers (`transformers serve --continuous-batching`, PyTorch on CPU), on
#     the same weights exported to an HF directory in float16.
# Peers are installed into a scratch folder (PEERS_DIR, default target/peers), never vendored.
# Prints each server's table, then halfstep's output tokens/s and TTFT as ratios to each peer.
# On CPUs with AMX (Intel Sapphire Rapids and later) halfstep also runs with `--kernels fast`
# (FAST=0 skips it), so both of its modes are compared in the same run.
#
#   scripts/bench-peers.sh        # CONCURRENCY=1,8,32,64 REQUESTS=2; PEERS=llama.cpp,transformers
#   # RL rollouts (short prompts, long samples), against llama.cpp only:
#   LOAD_FLAGS="--prompt-words 16,32 --max-tokens 256,256" PEERS=llama.cpp scripts/bench-peers.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MODEL="${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
PEERS_DIR="${PEERS_DIR:-$ROOT/target/peers}"
PEERS="${PEERS:-llama.cpp,transformers}"
CONCURRENCY="${CONCURRENCY:-1,8,32,64}"
REQUESTS="${REQUESTS:-2}"
LOAD_FLAGS="${LOAD_FLAGS:-}"
FAST="${FAST:-auto}"
if [[ "$FAST" == auto ]]; then
  grep -qw amx_bf16 /proc/cpuinfo && grep -qw amx_tile /proc/cpuinfo && FAST=1 || FAST=0
fi
THREADS="${THREADS:-$(nproc)}"
LLAMA_VERSION=0.3.36
LLAMA_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
mkdir -p "$PEERS_DIR"
[[ -f "$MODEL" ]] || scripts/fetch-default-model.sh

# --- peers: install once ---------------------------------------------------------------
LLAMA_BIN="$PEERS_DIR/llama-build/bin"
if [[ ",$PEERS," == *",llama.cpp,"* && ! -x "$LLAMA_BIN/llama-server" ]]; then
  echo "building llama.cpp's llama-server (about 8 minutes on 2 cores)" >&2
  python3 -m venv "$PEERS_DIR/venv-build"
  "$PEERS_DIR/venv-build/bin/pip" install -q cmake==4.4.4 ninja==1.13.2
  tarball="$PEERS_DIR/llama_cpp_python-$LLAMA_VERSION.tar.gz"
  if [[ ! -f "$tarball" ]]; then
    url=$(curl -sf https://pypi.org/simple/llama-cpp-python/ |
      grep -o "https://files.pythonhosted.org/[^\"#]*llama_cpp_python-$LLAMA_VERSION.tar.gz" | head -1)
    curl -sfL -o "$tarball" "$url"
  fi
  echo "$LLAMA_SHA256  $tarball" | sha256sum -c - >&2
  tar xzf "$tarball" -C "$PEERS_DIR"
  PATH="$PEERS_DIR/venv-build/bin:$PATH" cmake -S "$PEERS_DIR/llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp" \
    -B "$PEERS_DIR/llama-build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON >/dev/null
  PATH="$PEERS_DIR/venv-build/bin:$PATH" cmake --build "$PEERS_DIR/llama-build" \
    --target llama-server llama-quantize -j"$THREADS" >/dev/null
fi
F16_GGUF="$PEERS_DIR/SmolLM2-135M-Instruct.F16.gguf"
if [[ ",$PEERS," == *",llama.cpp,"* && ! -f "$F16_GGUF" ]]; then
  "$LLAMA_BIN/llama-quantize" --allow-requantize "$MODEL" "$F16_GGUF" F16 >/dev/null 2>&1
fi
HF_VENV="$PEERS_DIR/venv-hf"
HF_DIR="$PEERS_DIR/SmolLM2-135M-Instruct-f16"
if [[ ",$PEERS," == *",transformers,"* && ! -x "$HF_VENV/bin/transformers" ]]; then
  echo "installing torch and transformers into $HF_VENV (several GB from PyPI)" >&2
  python3 -m venv "$HF_VENV"
  "$HF_VENV/bin/pip" install -q "torch==2.15.0" "transformers[serving]==5.24.0" "gguf==0.19.0" "accelerate==1.15.0"
fi
if [[ ",$PEERS," == *",transformers,"* && ! -f "$HF_DIR/config.json" ]]; then
  "$HF_VENV/bin/python" scripts/bench/hf_export.py "$MODEL" "$HF_DIR" >/dev/null 2>&1
fi
cargo build --release -q -p halfstep-server

# --- run -------------------------------------------------------------------------------
RESULTS="$PEERS_DIR/results-$(date +%s).jsonl"
PID=
stop() { [[ -n "$PID" ]] && { kill "$PID" 2>/dev/null; wait "$PID" 2>/dev/null || true; }; PID=; }
trap stop EXIT
serve_and_load() { # label port model-name-for-requests extra-load-flags command...
  local label=$1 port=$2 name=$3 flags=$4; shift 4
  local log="$PEERS_DIR/${label//[^A-Za-z0-9.]/_}.log"
  "$@" >"$log" 2>&1 &
  PID=$!
  for _ in $(seq 1 600); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
    kill -0 "$PID" 2>/dev/null || { tail -20 "$log"; return 1; }
    sleep 0.5
  done
  python3 scripts/bench/load.py --url "http://127.0.0.1:$port" --label "$label" ${name:+--model "$name"} \
    --concurrency "$CONCURRENCY" --requests "$REQUESTS" --ttft-words 440 --json "$RESULTS" $flags $LOAD_FLAGS
  stop
}
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores"
target/release/halfstep bandwidth
serve_and_load halfstep 8421 "" "" target/release/halfstep serve "$MODEL" --port 8421 --dtype float16 --max-num-seqs 64
if [[ "$FAST" == 1 ]]; then
  serve_and_load "halfstep --kernels fast" 8424 "" "" target/release/halfstep serve "$MODEL" --port 8424 \
    --dtype float16 --max-num-seqs 64 --kernels fast
fi
if [[ ",$PEERS," == *",llama.cpp,"* ]]; then
  serve_and_load llama.cpp 8422 "" "" "$LLAMA_BIN/llama-server" -m "$F16_GGUF" --port 8422 --host 127.0.0.1 \
    -t "$THREADS" -np 64 -c $((64 * 1024)) --cont-batching
fi
if [[ ",$PEERS," == *",transformers,"* ]]; then
  # `transformers serve` refuses unknown fields such as ignore_eos: its outputs may end early.
  serve_and_load transformers 8423 "$HF_DIR" --no-ignore-eos "$HF_VENV/bin/transformers" serve "$HF_DIR" --port 8423 \
    --host 127.0.0.1 --continuous-batching --dtype float16 --device cpu
fi
target/release/halfstep bandwidth
python3 - "$RESULTS" <<'PY'
import json, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
ours = [r for r in runs if r["label"].startswith("halfstep")]
for base in ours:
    for peer in runs:
        if peer in ours:
            continue
        print(f"\n{base['label']} / {peer['label']}:")
        for a, b in zip(base["levels"], peer["levels"]):
            ratio = a["output_tok_s"] / b["output_tok_s"] if b["output_tok_s"] else float("inf")
            print(f"  {a['concurrency']:>3} clients: output tok/s {a['output_tok_s']:.1f} vs {b['output_tok_s']:.1f} = {ratio:.2f}x")
        if base.get("ttft_long_s") and peer.get("ttft_long_s"):
            print(f"  TTFT ~512 tokens: {1e3*base['ttft_long_s']:.0f} ms vs {1e3*peer['ttft_long_s']:.0f} ms = "
                  f"{base['ttft_long_s']/peer['ttft_long_s']:.2f}x")
PY
