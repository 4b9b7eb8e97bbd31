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
