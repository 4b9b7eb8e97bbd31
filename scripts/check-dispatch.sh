#!/usr/bin/env bash
# Runs the model crate's kernel tests in the release profile (the code that ships) under QEMU's
# user-mode emulator posing as older CPUs: Haswell (AVX2, FMA, F16C; no AVX-512) and Nehalem (no
# AVX). An instruction from a higher level than runtime dispatch chose is then a SIGILL on any
# host, AVX-512 ones included, where natively it would run. The tests compare every level that
# CPU offers with the portable kernels and with references, as they do natively.
#
# Why: an AVX-512 helper called on the AVX2 path (0875409) crashed the server on every AVX2-only
# host (AMD Zen 3) from its first completion, while every test passed: natively because the hosts
# had AVX-512, and in the test profile because its code did not happen to touch a zmm register.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(uname -m)" != x86_64 ]; then
    echo "check-dispatch: not x86_64, nothing to emulate"
    exit 0
fi

QEMU="${QEMU:-qemu-x86_64-static}"
if ! command -v "$QEMU" >/dev/null; then
    # Installed as root, or through sudo where it asks for no password.
    SUDO=()
    if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        SUDO=(sudo -n)
    fi
    if { [ "$(id -u)" -ne 0 ] && [ "${#SUDO[@]}" -eq 0 ]; } || ! command -v apt-get >/dev/null; then
        echo "check-dispatch: needs $QEMU (Debian's qemu-user-static) and cannot install it here" >&2
        exit 1
    fi
    echo "check-dispatch: installing qemu-user-static from Debian ..."
    install=("${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q
        --no-install-recommends qemu-user-static)
    # The package lists may be missing or stale on a fresh machine.
    "${install[@]}" >/dev/null || { "${SUDO[@]}" apt-get update -q >/dev/null && "${install[@]}" >/dev/null; }
    QEMU=qemu-x86_64-static
fi

args=(--release -p halfstep-model --lib --test kernels --no-run)
cargo test "${args[@]}"
# The executables just built, as cargo names them (JSON lines on stdout; nothing is rebuilt).
mapfile -t bins < <(cargo test "${args[@]}" --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["executable"])')
if [ "${#bins[@]}" -ne 2 ]; then
    echo "check-dispatch: expected 2 test executables, got ${#bins[@]}: ${bins[*]}" >&2
    exit 1
fi

failed=()
for cpu in Haswell Nehalem; do
    for bin in "${bins[@]}"; do
        echo "check-dispatch: $(basename "$bin") on an emulated $cpu"
        # TCG warns, once per thread, about CPUID bits of the model that it does not emulate.
        if ! (cd model && "$QEMU" -cpu "$cpu" "$bin" -q) \
            2> >(grep -v "TCG doesn't support requested feature" >&2); then
            failed+=("$(basename "$bin") on $cpu")
        fi
    done
done
if [ "${#failed[@]}" -ne 0 ]; then
    echo "check-dispatch: FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "check-dispatch: ok"
