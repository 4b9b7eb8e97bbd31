#!/usr/bin/env bash
# Runs every test on a fresh clone: fetches the default model (PyPI), runs the Rust tests
# (unit, golden, engine, black-box HTTP), the kernel tests on emulated older CPUs, fuzzes the
# API from its OpenAPI spec with schemathesis, then drives the server with the official OpenAI
# Python SDK. `.ci/run` calls this script; so should you.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/fetch-default-model.sh
# A fresh CI clone builds once: incremental caches would only add time and ~1 GB of disk.
if [ "${CI:-}" = true ]; then
    export CARGO_INCREMENTAL=0
fi
cargo test --workspace --all-targets
# The release build's kernels on emulated AVX2-only and pre-AVX CPUs (SIMD dispatch).
scripts/check-dispatch.sh
# The test build above left the debug binary; both checks run it on the tiny model.
HALFSTEP_BIN=target/debug/halfstep scripts/check-schemathesis.sh
# The short soak profile (the full one: SOAK_SECONDS=600 scripts/soak.sh).
SOAK_SECONDS="${SOAK_SECONDS:-30}" HALFSTEP_BIN=target/debug/halfstep scripts/soak.sh
HALFSTEP_BIN=target/debug/halfstep scripts/check-openai-sdk.sh
