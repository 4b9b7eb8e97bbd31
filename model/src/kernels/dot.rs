//! The one dot product every reduction in the model uses.
//!
//! Definition (identical at every SIMD level): 16 f32 lanes, lane `l` accumulates the products
//! of elements `k ≡ l (mod 16)` in increasing `k` with a fused multiply-add, starting from +0;
//! then lanes are combined by the fixed tree `(l, l+8) → (l, l+4) → (l, l+2) → (0, 1)`.

use super::SimdLevel;
use crate::dtype::{Elem, ElemKind};

/// Lanes of the striped accumulator.
pub const LANES: usize = 16;

/// Combines 16 lane sums with the fixed tree.
#[inline]
pub fn reduce16(a: &[f32; LANES]) -> f32 {
    let mut b = [0f32; 8];
    for i in 0..8 {
        b[i] = a[i] + a[i + 8];
    }
    let c = [b[0] + b[4], b[1] + b[5], b[2] + b[6], b[3] + b[7]];
    let d = [c[0] + c[2], c[1] + c[3]];
    d[0] + d[1]
}

/// Σ x[k]·w[k] by the striped definition, plain Rust (the reference for the SIMD paths).
pub fn dot_portable<T: Elem>(x: &[f32], w: &[T]) -> f32 {
    debug_assert_eq!(x.len(), w.len());
    let mut acc = [0f32; LANES];
    for (k, (&xv, &wv)) in x.iter().zip(w).enumerate() {
        let l = k % LANES;
        acc[l] = xv.mul_add(wv.to_f32(), acc[l]);
    }
    reduce16(&acc)
}

/// Σ x[k]·w[k] at the given SIMD level (same bits at every level).
#[inline]
pub fn dot<T: Elem>(level: SimdLevel, x: &[f32], w: &[T]) -> f32 {
    assert_eq!(x.len(), w.len(), "dot of vectors with different lengths");
    match level {
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 => unsafe { x86::dot_avx512(x, w) },
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => unsafe { x86::dot_avx2(x, w) },
        _ => dot_portable(x, w),
    }
}

/// Copies the tail `k0..` of `x` and `w` into zero-padded 16-lane buffers.
///
/// fma(0, 0, acc) == acc for every accumulator value the definition can produce (it never holds
/// -0), so the padded lanes leave their sums unchanged.
#[inline]
pub(crate) fn pad_tail<T: Elem>(x: &[f32], w: &[T], k0: usize) -> ([f32; LANES], [f32; LANES]) {
    let mut xb = [0f32; LANES];
    let mut wb = [0f32; LANES];
    for (i, k) in (k0..x.len()).enumerate() {
        xb[i] = x[k];
        wb[i] = w[k].to_f32();
    }
    (xb, wb)
}

/// Whether `T`'s bit layout is `kind` (a compile-time constant after monomorphisation).
#[inline(always)]
pub(crate) fn is<T: Elem>(kind: ElemKind) -> bool {
    T::KIND == kind
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// Loads 16 elements of `T` at `p` as f32 (AVX-512).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(crate) unsafe fn load16_512<T: Elem>(p: *const T) -> __m512 {
        if is::<T>(ElemKind::F16) {
            _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
        } else if is::<T>(ElemKind::Bf16) {
            let w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(w))
        } else {
            _mm512_loadu_ps(p as *const f32)
        }
    }

    /// Loads 8 elements of `T` at `p` as f32 (AVX2).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn load8_256<T: Elem>(p: *const T) -> __m256 {
        if is::<T>(ElemKind::F16) {
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
        } else if is::<T>(ElemKind::Bf16) {
            let w = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w))
        } else {
            _mm256_loadu_ps(p as *const f32)
        }
    }

    /// Mask of the first `min(n, 16)` lanes (the masked tail of a 16-wide loop).
    #[inline]
    pub(crate) fn lanes(n: usize) -> __mmask16 {
        if n >= 16 {
            0xffff
        } else {
            (1u16 << n) - 1
        }
    }

    /// Rounds 16 lanes to f16 and back (round to nearest even, as `f16::from_f32`).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(crate) unsafe fn round_f16_512(v: __m512) -> __m512 {
        _mm512_cvtph_ps(_mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT }>(v))
    }

    /// The fixed reduction tree over a 16-lane register.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(crate) unsafe fn hsum512(v: __m512) -> f32 {
        let lo = _mm512_castps512_ps256(v);
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
        hsum256_pair(lo, hi)
    }

    /// The fixed reduction tree over lanes 0..8 in `lo` and 8..16 in `hi`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn hsum256_pair(lo: __m256, hi: __m256) -> f32 {
        let s8 = _mm256_add_ps(lo, hi);
        let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps::<1>(s8));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        let s1 = _mm_add_ss(s2, _mm_shuffle_ps::<0b01>(s2, s2));
        _mm_cvtss_f32(s1)
    }

    /// Reduces 16 striped accumulators at once: lane `4L + s` of the result is the fixed-tree
    /// sum `(l, l+8) → (l, l+4) → (l, l+2) → (0, 1)` of `v[4s + L]`.
    #[inline]
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(crate) unsafe fn reduce16x16(v: &[__m512; 16]) -> __m512 {
        // (l, l+8): lanes 0..8 of t[p] hold v[2p]'s eight sums, lanes 8..16 v[2p+1]'s.
        let mut t = [_mm512_setzero_ps(); 8];
        for p in 0..8 {
            let (a, b) = (v[2 * p], v[2 * p + 1]);
            t[p] = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x44>(a, b),
                _mm512_shuffle_f32x4::<0xEE>(a, b),
            );
        }
        // (l, l+4): 128-bit lane L of u[q] holds v[4q + L]'s four sums.
        let mut u = [_mm512_setzero_ps(); 4];
        for q in 0..4 {
            let (a, b) = (t[2 * q], t[2 * q + 1]);
            u[q] = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x88>(a, b),
                _mm512_shuffle_f32x4::<0xDD>(a, b),
            );
        }
        // (l, l+2): 128-bit lane L of w[r] holds two sums of v[8r + L], then two of v[8r+4+L].
        let mut w = [_mm512_setzero_ps(); 2];
        for r in 0..2 {
            let (a, b) = (u[2 * r], u[2 * r + 1]);
            w[r] = _mm512_add_ps(
                _mm512_shuffle_ps::<0x44>(a, b),
                _mm512_shuffle_ps::<0xEE>(a, b),
            );
        }
        // (0, 1): 128-bit lane L holds v[L], v[4+L], v[8+L], v[12+L].
        _mm512_add_ps(
            _mm512_shuffle_ps::<0x88>(w[0], w[1]),
            _mm512_shuffle_ps::<0xDD>(w[0], w[1]),
        )
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(crate) unsafe fn dot_avx512<T: Elem>(x: &[f32], w: &[T]) -> f32 {
        let k = x.len();
        let full = k - k % LANES;
        let mut acc = _mm512_setzero_ps();
        let mut c = 0;
        while c < full {
            acc = _mm512_fmadd_ps(
                _mm512_loadu_ps(x.as_ptr().add(c)),
                load16_512(w.as_ptr().add(c)),
                acc,
            );
            c += LANES;
        }
        if full < k {
            let (xb, wb) = pad_tail(x, w, full);
            acc = _mm512_fmadd_ps(
                _mm512_loadu_ps(xb.as_ptr()),
                _mm512_loadu_ps(wb.as_ptr()),
                acc,
            );
        }
        hsum512(acc)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn dot_avx2<T: Elem>(x: &[f32], w: &[T]) -> f32 {
        let k = x.len();
        let full = k - k % LANES;
        let mut lo = _mm256_setzero_ps();
        let mut hi = _mm256_setzero_ps();
        let mut c = 0;
        while c < full {
            let xp = x.as_ptr().add(c);
            let wp = w.as_ptr().add(c);
            lo = _mm256_fmadd_ps(_mm256_loadu_ps(xp), load8_256(wp), lo);
            hi = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(8)), load8_256(wp.add(8)), hi);
            c += LANES;
        }
        if full < k {
            let (xb, wb) = pad_tail(x, w, full);
            lo = _mm256_fmadd_ps(
                _mm256_loadu_ps(xb.as_ptr()),
                _mm256_loadu_ps(wb.as_ptr()),
                lo,
            );
            hi = _mm256_fmadd_ps(
                _mm256_loadu_ps(xb.as_ptr().add(8)),
                _mm256_loadu_ps(wb.as_ptr().add(8)),
                hi,
            );
        }
        hsum256_pair(lo, hi)
    }
}
