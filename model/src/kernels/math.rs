//! Elementwise transcendental functions with a fixed definition.
//!
//! `exp` is the project's own polynomial built from plain IEEE multiplies and adds (no FMA, no
//! libm), so it gives the same bits on every CPU and in every SIMD path; see numerics.md.

const LOG2E: f32 = std::f32::consts::LOG2_E;
// ln 2 split so that n * LN2_HI is exact for |n| < 2^15 (cephes' constants).
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const P0: f32 = 1.987_569_1e-4;
const P1: f32 = 1.398_199_9e-3;
const P2: f32 = 8.333_452e-3;
const P3: f32 = 4.166_579_6e-2;
const P4: f32 = 1.666_666_5e-1;
const P5: f32 = 0.5;
/// Above this, e^x overflows f32.
pub(crate) const EXP_HI: f32 = 88.722_84;
/// Below this, e^x underflows to zero.
pub(crate) const EXP_LO: f32 = -103.972_08;

/// e^x, accurate to about 1 ulp, bitwise identical on every platform.
#[inline]
pub fn exp(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    if x > EXP_HI {
        return f32::INFINITY;
    }
    if x < EXP_LO {
        return 0.0;
    }
    let n = (x * LOG2E).round_ties_even();
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let r2 = r * r;
    let mut p = P0 * r + P1;
    p = p * r + P2;
    p = p * r + P3;
    p = p * r + P4;
    p = p * r + P5;
    let e = p * r2 + r + 1.0;
    scale_pow2(e, n as i32)
}

/// e * 2^n in two exact-then-rounded steps, so subnormal and near-overflow results are right.
#[inline]
fn scale_pow2(e: f32, n: i32) -> f32 {
    let n1 = n / 2;
    let n2 = n - n1;
    e * pow2(n1) * pow2(n2)
}

#[inline]
fn pow2(n: i32) -> f32 {
    f32::from_bits(((n + 127) as u32) << 23)
}

/// SiLU (x · sigmoid(x)) with the project's own `exp`.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// dst[i] = exp(src[i] − shift), bitwise [`exp`], 16 or 8 lanes at a time where the CPU has
/// AVX-512 or AVX2.
pub fn exp_shifted(src: &[f32], shift: f32, dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "exp_shifted: lengths differ");
    #[cfg(target_arch = "x86_64")]
    match super::SimdLevel::cached() {
        // SAFETY: AVX-512 is available.
        super::SimdLevel::Avx512 => return unsafe { x86::exp_shifted_avx512(src, shift, dst) },
        // SAFETY: AVX2 is available.
        super::SimdLevel::Avx2 => return unsafe { x86::exp_shifted_avx2(src, shift, dst) },
        super::SimdLevel::Portable => {}
    }
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = exp(x - shift);
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// [`exp`] of 16 lanes: the same operations in the same order, so the same bits.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(crate) unsafe fn exp512(x: __m512) -> __m512 {
        let m = |a, b| _mm512_mul_ps(a, b);
        let a = |a, b| _mm512_add_ps(a, b);
        let s = |a, b| _mm512_sub_ps(a, b);
        let c = _mm512_set1_ps;
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(m(
            x,
            c(LOG2E),
        ));
        let r = s(s(x, m(n, c(LN2_HI))), m(n, c(LN2_LO)));
        let r2 = m(r, r);
        let mut p = a(m(c(P0), r), c(P1));
        p = a(m(p, r), c(P2));
        p = a(m(p, r), c(P3));
        p = a(m(p, r), c(P4));
        p = a(m(p, r), c(P5));
        let e = a(a(m(p, r2), r), c(1.0));
        // scale_pow2: n1 = n / 2 truncated toward zero, n2 = n - n1.
        let ni = _mm512_cvtps_epi32(n);
        let n1 = _mm512_srai_epi32::<1>(_mm512_add_epi32(ni, _mm512_srli_epi32::<31>(ni)));
        let n2 = _mm512_sub_epi32(ni, n1);
        let pow2 = |k: __m512i| {
            _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(
                k,
                _mm512_set1_epi32(127),
            )))
        };
        let mut y = m(m(e, pow2(n1)), pow2(n2));
        let hi = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, c(EXP_HI));
        let lo = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, c(EXP_LO));
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
        y = _mm512_mask_blend_ps(hi, y, c(f32::INFINITY));
        y = _mm512_mask_blend_ps(lo, y, _mm512_setzero_ps());
        _mm512_mask_blend_ps(nan, y, x)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(super) unsafe fn exp_shifted_avx512(src: &[f32], shift: f32, dst: &mut [f32]) {
        let n = src.len();
        let s = _mm512_set1_ps(shift);
        let mut i = 0;
        while i < n {
            let mask = super::super::dot::x86::lanes(n - i);
            let v = _mm512_maskz_loadu_ps(mask, src.as_ptr().add(i));
            let e = exp512(_mm512_sub_ps(v, s));
            _mm512_mask_storeu_ps(dst.as_mut_ptr().add(i), mask, e);
            i += 16;
        }
    }

    /// [`exp`] of 8 lanes (AVX2): the same operations in the same order, so the same bits.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn exp256(x: __m256) -> __m256 {
        let m = |a, b| _mm256_mul_ps(a, b);
        let a = |a, b| _mm256_add_ps(a, b);
        let s = |a, b| _mm256_sub_ps(a, b);
        let c = _mm256_set1_ps;
        let n =
            _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(m(x, c(LOG2E)));
        let r = s(s(x, m(n, c(LN2_HI))), m(n, c(LN2_LO)));
        let r2 = m(r, r);
        let mut p = a(m(c(P0), r), c(P1));
        p = a(m(p, r), c(P2));
        p = a(m(p, r), c(P3));
        p = a(m(p, r), c(P4));
        p = a(m(p, r), c(P5));
        let e = a(a(m(p, r2), r), c(1.0));
        // scale_pow2: n1 = n / 2 truncated toward zero, n2 = n - n1. Lanes outside
        // [EXP_LO, EXP_HI] or NaN give garbage here and are replaced below.
        let ni = _mm256_cvtps_epi32(n);
        let n1 = _mm256_srai_epi32::<1>(_mm256_add_epi32(ni, _mm256_srli_epi32::<31>(ni)));
        let n2 = _mm256_sub_epi32(ni, n1);
        let pow2 = |k: __m256i| {
            _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
                k,
                _mm256_set1_epi32(127),
            )))
        };
        let mut y = m(m(e, pow2(n1)), pow2(n2));
        let hi = _mm256_cmp_ps::<_CMP_GT_OQ>(x, c(EXP_HI));
        let lo = _mm256_cmp_ps::<_CMP_LT_OQ>(x, c(EXP_LO));
        let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x);
        y = _mm256_blendv_ps(y, c(f32::INFINITY), hi);
        y = _mm256_blendv_ps(y, _mm256_setzero_ps(), lo);
        _mm256_blendv_ps(y, x, nan)
    }

    /// [`exp_shifted`] 8 lanes at a time, the tail with the scalar [`exp`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn exp_shifted_avx2(src: &[f32], shift: f32, dst: &mut [f32]) {
        let n = src.len();
        let full = n - n % 8;
        let s = _mm256_set1_ps(shift);
        let mut i = 0;
        while i < full {
            let v = _mm256_loadu_ps(src.as_ptr().add(i));
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), exp256(_mm256_sub_ps(v, s)));
            i += 8;
        }
        for (d, &x) in dst[full..].iter_mut().zip(&src[full..]) {
            *d = exp(x - shift);
        }
    }

    /// [`silu`] of 8 lanes (AVX2), bitwise.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn silu256(x: __m256) -> __m256 {
        let neg = _mm256_xor_ps(x, _mm256_set1_ps(-0.0));
        _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0), exp256(neg)))
    }

    /// [`silu`] of 16 lanes, bitwise.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(crate) unsafe fn silu512(x: __m512) -> __m512 {
        let neg = _mm512_castsi512_ps(_mm512_xor_si512(
            _mm512_castps_si512(x),
            _mm512_set1_epi32(i32::MIN),
        ));
        _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0), exp512(neg)))
    }
}

/// Natural logarithm used for log-softmax normalisers (one call per row).
///
/// Computed in f64 and rounded once, so it is correctly rounded in practice on every libm.
#[inline]
pub fn ln(x: f32) -> f32 {
    (x as f64).ln() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_f64_within_two_ulp() {
        let mut x = -103.0f32;
        let mut worst = 0.0f64;
        while x < 88.7 {
            let got = exp(x) as f64;
            let want = (x as f64).exp();
            if want > f32::MIN_POSITIVE as f64 {
                let ulp = (want as f32).abs() as f64 * f32::EPSILON as f64;
                worst = worst.max((got - want).abs() / ulp);
            }
            x += 0.0137;
        }
        assert!(worst < 2.0, "worst error {worst} ulp");
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_exp_and_silu_match_the_scalar_bits() {
        let level = super::super::SimdLevel::detect();
        if level < super::super::SimdLevel::Avx2 {
            return;
        }
        let mut xs: Vec<f32> = (0..200_000)
            .map(|i| (i as f32 - 100_000.0) * 0.00117)
            .collect();
        xs.extend([
            0.0,
            -0.0,
            EXP_HI,
            EXP_LO,
            88.8,
            -104.0,
            -87.5,
            -100.3,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            1e-30,
            -1e-30,
            f32::MAX,
            f32::MIN,
        ]);
        while !xs.len().is_multiple_of(16) {
            xs.push(0.5);
        }
        for chunk in xs.chunks_exact(16) {
            let (mut e, mut s) = ([0f32; 16], [0f32; 16]);
            // SAFETY: AVX2 was detected above, AVX-512 where it is used.
            unsafe {
                use std::arch::x86_64::*;
                for h in 0..2 {
                    let v = _mm256_loadu_ps(chunk.as_ptr().add(8 * h));
                    _mm256_storeu_ps(e.as_mut_ptr().add(8 * h), x86::exp256(v));
                    _mm256_storeu_ps(s.as_mut_ptr().add(8 * h), x86::silu256(v));
                }
                for i in 0..16 {
                    let x = chunk[i];
                    assert_eq!(e[i].to_bits(), exp(x).to_bits(), "exp256({x})");
                    assert_eq!(s[i].to_bits(), silu(x).to_bits(), "silu256({x})");
                }
                if level < super::super::SimdLevel::Avx512 {
                    continue;
                }
                let v = _mm512_loadu_ps(chunk.as_ptr());
                _mm512_storeu_ps(e.as_mut_ptr(), x86::exp512(v));
                _mm512_storeu_ps(s.as_mut_ptr(), x86::silu512(v));
            }
            for i in 0..16 {
                let x = chunk[i];
                assert_eq!(e[i].to_bits(), exp(x).to_bits(), "exp({x})");
                assert_eq!(s[i].to_bits(), silu(x).to_bits(), "silu({x})");
            }
        }
    }

    /// Attention's AVX-512 softmax takes the row maximum in another order than the portable
    /// fold, which may pick +0 or -0 when both are the maximum; s − max then differs only in
    /// the sign of a zero, and both must give the same bits.
    #[test]
    fn exp_of_either_zero_is_exactly_one() {
        assert_eq!(exp(0.0).to_bits(), 1f32.to_bits());
        assert_eq!(exp(-0.0).to_bits(), 1f32.to_bits());
        // 33 values: the 16-wide path and the scalar tail.
        let zeros: Vec<f32> = (0..33)
            .map(|i| if i % 2 == 0 { 0.0 } else { -0.0 })
            .collect();
        let mut out = vec![0f32; zeros.len()];
        for shift in [0.0, -0.0] {
            exp_shifted(&zeros, shift, &mut out);
            assert!(out.iter().all(|v| v.to_bits() == 1f32.to_bits()));
        }
    }

    #[test]
    fn exp_edges() {
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert_eq!(exp(-200.0), 0.0);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        // Subnormal range still approximates e^x.
        let sub = exp(-100.0) as f64;
        assert!((sub - (-100.0f64).exp()).abs() < 1e-44);
    }

    #[test]
    fn silu_matches_reference() {
        for i in -400..400 {
            let x = i as f32 * 0.05;
            let want = x as f64 / (1.0 + (-(x as f64)).exp());
            assert!(
                (silu(x) as f64 - want).abs() <= 2e-7 * want.abs().max(1e-3),
                "x={x}"
            );
        }
        assert_eq!(silu(-1000.0), -0.0);
    }
}
