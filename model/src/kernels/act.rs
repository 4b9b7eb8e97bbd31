//! The SiLU-gated activation of the MLP.

use super::math::silu;
use super::round::round_in_place;
use super::{part_range, Kernels, SimdLevel};
use crate::dtype::{Elem, ElemKind};

/// Below this many elements the activation runs on the calling thread.
const PARALLEL_MIN: usize = 1 << 15;

/// g = round(round(silu(g)) · u), as PyTorch computes `act(gate) * up` in the run dtype.
pub fn silu_gate<T: Elem>(kern: &Kernels, g: &mut [f32], u: &[f32]) {
    assert_eq!(g.len(), u.len(), "silu_gate: gate and up differ in length");
    let n = g.len();
    let level = kern.level;
    if n < PARALLEL_MIN || kern.pool.threads() == 1 {
        silu_gate_range::<T>(level, g, u);
        return;
    }
    let threads = kern.pool.threads();
    let gp = super::SharedOut::new(g);
    kern.pool.run(&|t| {
        let r = part_range(n, threads, 16, t);
        // SAFETY: thread `t` owns elements `r` of `g`.
        let gs = unsafe { std::slice::from_raw_parts_mut(gp.get().add(r.start), r.len()) };
        silu_gate_range::<T>(level, gs, &u[r]);
    });
}

/// [`silu_gate`] of one slice, on the calling thread.
pub(crate) fn silu_gate_range<T: Elem>(level: SimdLevel, g: &mut [f32], u: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx512 && T::KIND != ElemKind::Bf16 {
        // SAFETY: AVX-512 is available at this level.
        unsafe { x86::silu_gate_avx512::<T>(g, u) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx2 && T::KIND != ElemKind::Bf16 {
        // SAFETY: AVX2 and F16C are available at this level.
        unsafe { x86::silu_gate_avx2::<T>(g, u) };
        return;
    }
    for gv in g.iter_mut() {
        *gv = silu(*gv);
    }
    round_in_place::<T>(level, g);
    for (gv, &uv) in g.iter_mut().zip(u) {
        *gv *= uv;
    }
    round_in_place::<T>(level, g);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::dot::x86::{lanes, round_f16_512};
    use super::super::math::x86::{silu256, silu512};
    use super::*;
    use std::arch::x86_64::*;

    /// Rounds 16 lanes to `T` (f16 or f32) and back.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn round512<T: Elem>(v: __m512) -> __m512 {
        if T::KIND == ElemKind::F16 {
            round_f16_512(v)
        } else {
            v
        }
    }

    /// Rounds 8 lanes to `T` (f16 or f32) and back.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn round256<T: Elem>(v: __m256) -> __m256 {
        if T::KIND == ElemKind::F16 {
            _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v))
        } else {
            v
        }
    }

    /// [`silu_gate_range`] 8 lanes at a time, the tail in scalar code (same bits).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn silu_gate_avx2<T: Elem>(g: &mut [f32], u: &[f32]) {
        let n = g.len();
        let full = n - n % 8;
        let mut i = 0;
        while i < full {
            let gv = _mm256_loadu_ps(g.as_ptr().add(i));
            let uv = _mm256_loadu_ps(u.as_ptr().add(i));
            let a = round256::<T>(silu256(gv));
            let y = round256::<T>(_mm256_mul_ps(a, uv));
            _mm256_storeu_ps(g.as_mut_ptr().add(i), y);
            i += 8;
        }
        for (gv, &uv) in g[full..].iter_mut().zip(&u[full..]) {
            *gv = T::round(T::round(silu(*gv)) * uv);
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(super) unsafe fn silu_gate_avx512<T: Elem>(g: &mut [f32], u: &[f32]) {
        let n = g.len();
        let mut i = 0;
        while i < n {
            // The tail runs masked: inactive lanes are computed on zeros and never stored.
            let mask = lanes(n - i);
            let gv = _mm512_maskz_loadu_ps(mask, g.as_ptr().add(i));
            let uv = _mm512_maskz_loadu_ps(mask, u.as_ptr().add(i));
            let a = round512::<T>(silu512(gv));
            let y = round512::<T>(_mm512_mul_ps(a, uv));
            _mm512_mask_storeu_ps(g.as_mut_ptr().add(i), mask, y);
            i += 16;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    #[test]
    fn every_level_and_thread_count_gives_the_scalar_bits() {
        let n = 70_001;
        let g0: Vec<f32> = (0..n)
            .map(|i| f16::from_f32(((i as f32) * 0.37).sin() * 9.0).to_f32())
            .collect();
        let u: Vec<f32> = (0..n)
            .map(|i| f16::from_f32(((i as f32) * 0.11).cos() * 3.0).to_f32())
            .collect();
        let want: Vec<f32> = g0
            .iter()
            .zip(&u)
            .map(|(&g, &u)| f16::from_f32(f16::from_f32(silu(g)).to_f32() * u).to_f32())
            .collect();
        for level in SimdLevel::available() {
            for threads in [1, 2, 3] {
                let kern = Kernels::with_threads(level, threads);
                let mut g = g0.clone();
                silu_gate::<f16>(&kern, &mut g, &u);
                for i in 0..n {
                    assert_eq!(
                        g[i].to_bits(),
                        want[i].to_bits(),
                        "{level:?} {threads} at {i}"
                    );
                }
                let mut g = g0.clone();
                silu_gate::<f32>(&kern, &mut g, &u);
                assert!(g
                    .iter()
                    .zip(&g0)
                    .zip(&u)
                    .all(|((&y, &x), &v)| y.to_bits() == (silu(x) * v).to_bits()));
            }
        }
    }
}
