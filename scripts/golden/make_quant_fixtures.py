#!/usr/bin/env python3
"""Generate golden GGUF dequantisation fixtures for the Rust dequantiser.

Independent reference: raw block bytes are produced (where possible) with
gguf-py's own quantiser and dequantised with `gguf.quants.dequantize`.
An additional scalar decoder written here from the ggml block layouts is
checked bit-for-bit against gguf-py, which pins down both the byte layout
and the exact f32 arithmetic order.

Output: model/tests/fixtures/gguf_dequant.json
Run via scripts/golden/make-quant-fixtures.sh (uses <repo>/.venv-quant).
"""
from __future__ import annotations

import importlib.metadata
import json
import struct
from pathlib import Path

import numpy as np
import gguf
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

SEED = 0x5EED_1234
REPO_ROOT = Path(__file__).resolve().parents[2]
OUT = REPO_ROOT / "model" / "tests" / "fixtures" / "gguf_dequant.json"

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "BF16", "F16"]

# Expected block layouts (field name, byte size), in storage order.
LAYOUTS: dict[str, list[tuple[str, int]]] = {
    "Q4_0": [("d", 2), ("qs", 16)],
    "Q4_1": [("d", 2), ("m", 2), ("qs", 16)],
    "Q5_0": [("d", 2), ("qh", 4), ("qs", 16)],
    "Q5_1": [("d", 2), ("m", 2), ("qh", 4), ("qs", 16)],
    "Q8_0": [("d", 2), ("qs", 32)],
    "Q4_K": [("d", 2), ("dmin", 2), ("scales", 12), ("qs", 128)],
    "Q5_K": [("d", 2), ("dmin", 2), ("scales", 12), ("qh", 32), ("qs", 128)],
    "Q6_K": [("ql", 128), ("qh", 64), ("scales", 16), ("d", 2)],
    "BF16": [("v", 2)],
    "F16": [("v", 2)],
}
BLOCK_VALUES = {"BF16": 1, "F16": 1, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256}
N_BLOCKS = {"BF16": 64, "F16": 64}  # 64 values; everything else: 2 blocks
# f16 scale fields to overwrite when bytes are random (field names in LAYOUTS).
F16_SCALE_FIELDS = {"Q4_K": ["d", "dmin"], "Q5_K": ["d", "dmin"], "Q6_K": ["d"]}

f32 = np.float32


def field_offsets(name: str) -> dict[str, tuple[int, int]]:
    off, out = 0, {}
    for fname, size in LAYOUTS[name]:
        out[fname] = (off, off + size)
        off += size
    return out


def h2f(b: bytes) -> np.float32:
    return np.frombuffer(b, dtype="<f2")[0].astype(f32)


# --------------------------------------------------------------------------
# Independent scalar reference (ggml-quants.c layouts), f32 math, no FMA.
# --------------------------------------------------------------------------
def ref_block(name: str, blk: bytes) -> list[np.float32]:
    fo = field_offsets(name)
    g = lambda f: blk[fo[f][0]:fo[f][1]]  # noqa: E731
    y: list[np.float32] = []
    if name == "F16":
        return [h2f(blk)]
    if name == "BF16":
        return [np.frombuffer(struct.pack("<I", int.from_bytes(blk, "little") << 16), "<f4")[0]]
    if name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        d = h2f(g("d"))
        m = h2f(g("m")) if "m" in fo else None
        qh = int.from_bytes(g("qh"), "little") if "qh" in fo else 0
        qs = g("qs")
        for j in range(32):
            q = (qs[j] & 0xF) if j < 16 else (qs[j - 16] >> 4)
            if "qh" in fo:
                q |= ((qh >> j) & 1) << 4
            if name == "Q4_0":
                y.append(d * f32(q - 8))
            elif name == "Q5_0":
                y.append(d * f32(q - 16))
            else:  # Q4_1 / Q5_1
                y.append((d * f32(q)) + m)
        return y
    if name == "Q8_0":
        d = h2f(g("d"))
        return [f32(v) * d for v in np.frombuffer(g("qs"), np.int8)]
    if name in ("Q4_K", "Q5_K"):
        d, dmin, sc = h2f(g("d")), h2f(g("dmin")), g("scales")
        qs = g("qs")
        qh = g("qh") if name == "Q5_K" else None

        def scale_min(j: int) -> tuple[int, int]:  # get_scale_min_k4
            if j < 4:
                return sc[j] & 63, sc[j + 4] & 63
            return ((sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4),
                    (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4))

        for j in range(8):  # 8 sub-blocks of 32
            s, mn = scale_min(j)
            d1 = d * f32(s)
            m1 = dmin * f32(mn)
            for l in range(32):
                b = qs[32 * (j // 2) + l]
                q = (b & 0xF) if j % 2 == 0 else (b >> 4)
                if qh is not None:
                    q |= ((qh[l] >> j) & 1) << 4
                y.append(d1 * f32(q) - m1)
        return y
    if name == "Q6_K":
        d = h2f(g("d"))
        ql, qh = g("ql"), g("qh")
        sc = np.frombuffer(g("scales"), np.int8)
        out = [f32(0)] * 256
        for c in range(2):  # two halves of 128
            for l in range(32):
                L, H = ql[64 * c:], qh[32 * c:]
                q = [((L[l] & 0xF) | (((H[l] >> 0) & 3) << 4)) - 32,
                     ((L[l + 32] & 0xF) | (((H[l] >> 2) & 3) << 4)) - 32,
                     ((L[l] >> 4) | (((H[l] >> 4) & 3) << 4)) - 32,
                     ((L[l + 32] >> 4) | (((H[l] >> 6) & 3) << 4)) - 32]
                for k in range(4):
                    idx = 128 * c + 32 * k + l
                    out[idx] = (d * f32(sc[idx // 16])) * f32(q[k])
        return out
    raise ValueError(name)


# --------------------------------------------------------------------------
def make_raw(name: str, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    qt = T[name]
    bs, ts = GGML_QUANT_SIZES[qt]
    n_blocks = N_BLOCKS.get(name, 2)
    n = bs * n_blocks
    data = rng.standard_normal(n).astype(f32) * f32(0.05)
    if name == "F16":
        data[:4] = [-0.0, 3.0e-6, 6.1e-5, 65504.0]  # -0, subnormal, ~min normal, max
    elif name == "BF16":
        data[:4] = [-0.0, 1.0e-39, 3.0e38, -1.5]  # -0, subnormal, large, exact
    try:
        q = gguf.quants.quantize(data.reshape(1, n), qt)
        raw = np.ascontiguousarray(q).view(np.uint8).reshape(-1)
        src = "quantize"
    except NotImplementedError:
        raw = rng.integers(0, 256, size=n_blocks * ts, dtype=np.uint8)
        fo = field_offsets(name)
        for b in range(n_blocks):
            for f in F16_SCALE_FIELDS[name]:
                lo, hi = fo[f]
                v = np.array([rng.uniform(-0.05, 0.05)], dtype="<f2")
                raw[b * ts + lo: b * ts + hi] = v.view(np.uint8)
        src = "random_bytes"
    assert raw.size == n_blocks * ts, (name, raw.size)
    return raw, src


def main() -> None:
    rng = np.random.default_rng(SEED)
    version = importlib.metadata.version("gguf")
    cases = []
    for name in TYPES:
        qt = T[name]
        bs, ts = GGML_QUANT_SIZES[qt]
        assert bs == BLOCK_VALUES.get(name, 32), (name, bs)
        assert sum(s for _, s in LAYOUTS[name]) == ts, (name, ts)
        raw, src = make_raw(name, rng)
        vals = np.asarray(gguf.quants.dequantize(raw, qt), dtype=f32).reshape(-1)
        n_blocks = raw.size // ts
        assert vals.size == n_blocks * bs
        assert np.all(np.isfinite(vals)), name
        # bit-exact cross-check against the independent scalar decoder
        ref = np.array([v for b in range(n_blocks)
                        for v in ref_block(name, raw[b * ts:(b + 1) * ts].tobytes())], dtype=f32)
        mism = np.nonzero(ref.view(np.uint32) != vals.view(np.uint32))[0]
        assert mism.size == 0, (name, mism[:8], ref[mism[:8]], vals[mism[:8]])
        cases.append({
            "type": name,
            "ggml_type_id": int(qt),
            "block_size": bs,
            "type_size": ts,
            "n_blocks": n_blocks,
            "n_values": int(vals.size),
            "source": src,
            "bytes_hex": raw.tobytes().hex(),
            "values": [float(v) for v in vals],  # exact: f32 -> f64 repr
        })
        print(f"{name:5s} id={int(qt):2d} block={bs:3d} vals/{ts:3d} B  "
              f"n_values={vals.size:4d} src={src}  max|v|={np.abs(vals).max():.4g}")
    doc = {"gguf_version": version, "numpy_version": np.__version__,
           "seed": SEED, "cases": cases}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
