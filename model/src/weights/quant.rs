//! GGML tensor types and their dequantisation to f32.
//!
//! Arithmetic follows gguf-py's reference (`gguf.quants`): scales widened from f16 first, then
//! one IEEE f32 rounding per multiply or add, never a fused multiply-add, so the values equal
//! what Hugging Face transformers loads from the same file.

use half::{bf16, f16};

/// A GGML storage type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types, missing_docs)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4_K,
    Q5_K,
    Q6_K,
}

impl GgmlType {
    /// The type with GGML id `id`, if supported.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4_K,
            13 => GgmlType::Q5_K,
            14 => GgmlType::Q6_K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// (values per block, bytes per block).
    pub fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q5_0 => (32, 22),
            GgmlType::Q5_1 => (32, 24),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q4_K => (256, 144),
            GgmlType::Q5_K => (256, 176),
            GgmlType::Q6_K => (256, 210),
        }
    }

    /// Bytes that `n` values occupy, or `None` if `n` is not a whole number of blocks or the
    /// size overflows.
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        let (bs, ts) = self.block();
        if !n.is_multiple_of(bs) {
            return None;
        }
        (n / bs).checked_mul(ts)
    }
}

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Dequantises `data` (whole blocks of type `t`) to f32. `data.len()` must equal
/// `t.bytes_for(n)` for the `n` values it holds.
pub fn dequantize(t: GgmlType, data: &[u8]) -> Vec<f32> {
    let (bs, ts) = t.block();
    let mut out = Vec::with_capacity(data.len() / ts * bs);
    for b in data.chunks_exact(ts) {
        match t {
            GgmlType::F32 => out.push(f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            GgmlType::F16 => out.push(f16_at(b, 0)),
            GgmlType::BF16 => out.push(bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()),
            GgmlType::Q4_0 => {
                let d = f16_at(b, 0);
                let qs = &b[2..18];
                out.extend(qs.iter().map(|&q| d * ((q & 0xF) as f32 - 8.0)));
                out.extend(qs.iter().map(|&q| d * ((q >> 4) as f32 - 8.0)));
            }
            GgmlType::Q4_1 => {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                let qs = &b[4..20];
                out.extend(qs.iter().map(|&q| d * (q & 0xF) as f32 + m));
                out.extend(qs.iter().map(|&q| d * (q >> 4) as f32 + m));
            }
            GgmlType::Q5_0 | GgmlType::Q5_1 => {
                let d = f16_at(b, 0);
                let (m, o) = if t == GgmlType::Q5_1 {
                    (f16_at(b, 2), 4)
                } else {
                    (0.0, 2)
                };
                let qh = u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
                let qs = &b[o + 4..o + 20];
                let val = |q: u32| {
                    if t == GgmlType::Q5_1 {
                        d * q as f32 + m
                    } else {
                        d * (q as f32 - 16.0)
                    }
                };
                for (j, &q) in qs.iter().enumerate() {
                    out.push(val((q & 0xF) as u32 | ((qh >> j) & 1) << 4));
                }
                for (j, &q) in qs.iter().enumerate() {
                    out.push(val((q >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4));
                }
            }
            GgmlType::Q8_0 => {
                let d = f16_at(b, 0);
                out.extend(b[2..34].iter().map(|&q| (q as i8) as f32 * d));
            }
            GgmlType::Q4_K | GgmlType::Q5_K => {
                let d = f16_at(b, 0);
                let dmin = f16_at(b, 2);
                let scales = &b[4..16];
                let (qh, qs) = if t == GgmlType::Q5_K {
                    (Some(&b[16..48]), &b[48..176])
                } else {
                    (None, &b[16..144])
                };
                for j in 0..8 {
                    let (sc, m) = scale_min_k4(j, scales);
                    let d1 = d * sc as f32;
                    let m1 = dmin * m as f32;
                    let q = &qs[32 * (j / 2)..32 * (j / 2) + 32];
                    for l in 0..32 {
                        let mut v = if j % 2 == 0 { q[l] & 0xF } else { q[l] >> 4 } as u32;
                        if let Some(qh) = qh {
                            v |= ((qh[l] as u32 >> j) & 1) << 4;
                        }
                        out.push(d1 * v as f32 - m1);
                    }
                }
            }
            GgmlType::Q6_K => {
                let ql = &b[0..128];
                let qh = &b[128..192];
                let sc = &b[192..208];
                let d = f16_at(b, 208);
                let mut y = [0f32; 256];
                for c in 0..2 {
                    let (l_, h_) = (&ql[64 * c..], &qh[32 * c..]);
                    for l in 0..32 {
                        let q = [
                            (l_[l] & 0xF) | (h_[l] & 3) << 4,
                            (l_[l + 32] & 0xF) | ((h_[l] >> 2) & 3) << 4,
                            (l_[l] >> 4) | ((h_[l] >> 4) & 3) << 4,
                            (l_[l + 32] >> 4) | (h_[l] >> 6) << 4,
                        ];
                        for (k, &qv) in q.iter().enumerate() {
                            let i = 128 * c + 32 * k + l;
                            let s = sc[i / 16] as i8 as f32;
                            y[i] = (d * s) * (qv as i32 - 32) as f32;
                        }
                    }
                }
                out.extend_from_slice(&y);
            }
        }
    }
    out
}

/// ggml's packing of 6-bit scale and min for sub-block `j` of a K-quant super-block.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}
