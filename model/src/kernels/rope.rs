//! Rotary position embeddings (Hugging Face's "rotate half" layout).

use crate::config::RopeScaling;
use crate::dtype::Elem;

/// Precomputed cos/sin tables for every position up to a maximum.
#[derive(Debug, Clone)]
pub struct Rope {
    head_dim: usize,
    max_positions: usize,
    // [position][head_dim / 2]
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    /// Tables for `head_dim`, base `theta`, positions `0..max_positions`, with optional scaling.
    ///
    /// Computed in f64 and rounded once to f32, so the tables are the same on every machine.
    pub fn new(
        head_dim: usize,
        theta: f64,
        max_positions: usize,
        scaling: Option<&RopeScaling>,
    ) -> Rope {
        let half = head_dim / 2;
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| {
                let f = 1.0 / theta.powf((2 * i) as f64 / head_dim as f64);
                match scaling {
                    Some(s) => s.scale_inv_freq(f),
                    None => f,
                }
            })
            .collect();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for &f in &inv_freq {
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Rope {
            head_dim,
            max_positions,
            cos,
            sin,
        }
    }

    /// Positions the tables cover.
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// [`apply`](Self::apply) at a SIMD level (the same bits at every level).
    pub fn apply_at<T: Elem>(&self, level: super::SimdLevel, v: &mut [f32], pos: usize) {
        #[cfg(target_arch = "x86_64")]
        if level >= super::SimdLevel::Avx512
            && T::KIND == crate::dtype::ElemKind::F16
            && (self.head_dim / 2).is_multiple_of(16)
        {
            assert!(pos < self.max_positions, "rope position {pos} beyond table");
            let half = self.head_dim / 2;
            let c = &self.cos[pos * half..(pos + 1) * half];
            let s = &self.sin[pos * half..(pos + 1) * half];
            // SAFETY: AVX-512 is available at this level.
            unsafe { rotate_f16_avx512(v, self.head_dim, c, s) };
            return;
        }
        let _ = level;
        self.apply::<T>(v, pos);
    }

    /// Rotates every head of `v` (heads × head_dim, already in the run dtype) for position `pos`
    /// and rounds to `T`.
    pub fn apply<T: Elem>(&self, v: &mut [f32], pos: usize) {
        let half = self.head_dim / 2;
        assert!(pos < self.max_positions, "rope position {pos} beyond table");
        let c = &self.cos[pos * half..(pos + 1) * half];
        let s = &self.sin[pos * half..(pos + 1) * half];
        for head in v.chunks_exact_mut(self.head_dim) {
            let (a, b) = head.split_at_mut(half);
            for i in 0..half {
                let (x0, x1) = (a[i], b[i]);
                a[i] = T::round(x0 * c[i] - x1 * s[i]);
                b[i] = T::round(x1 * c[i] + x0 * s[i]);
            }
        }
    }
}

/// [`Rope::apply`] for f16 with 16 lanes: the same multiplies, subtraction/addition and
/// rounding per element.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn rotate_f16_avx512(v: &mut [f32], head_dim: usize, c: &[f32], s: &[f32]) {
    use std::arch::x86_64::*;
    let half = head_dim / 2;
    use super::dot::x86::round_f16_512 as round;
    for head in v.chunks_exact_mut(head_dim) {
        let p = head.as_mut_ptr();
        for i in (0..half).step_by(16) {
            let x0 = _mm512_loadu_ps(p.add(i));
            let x1 = _mm512_loadu_ps(p.add(half + i));
            let cv = _mm512_loadu_ps(c.as_ptr().add(i));
            let sv = _mm512_loadu_ps(s.as_ptr().add(i));
            let a = _mm512_sub_ps(_mm512_mul_ps(x0, cv), _mm512_mul_ps(x1, sv));
            let b = _mm512_add_ps(_mm512_mul_ps(x1, cv), _mm512_mul_ps(x0, sv));
            _mm512_storeu_ps(p.add(i), round(a));
            _mm512_storeu_ps(p.add(half + i), round(b));
        }
    }
}
