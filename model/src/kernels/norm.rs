//! RMSNorm.

use super::dot::dot;
use super::round::round_in_place;
use super::SimdLevel;
use crate::dtype::Elem;

/// y = round(round(x / rms(x)) · w) per row of width `w.len()`, as Hugging Face's LlamaRMSNorm
/// rounds: the normalised value to the run dtype, then its product with the weight.
///
/// The mean square is the striped [`dot`] of the row with itself, so it has a fixed order.
pub fn rms_norm<T: Elem>(level: SimdLevel, x: &[f32], w: &[T], eps: f32, out: &mut [f32]) {
    let d = w.len();
    assert!(
        d > 0 && x.len().is_multiple_of(d) && out.len() == x.len(),
        "rms_norm: bad shapes"
    );
    for (xr, yr) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let inv = rms_inv(level, xr, eps);
        for (y, &xv) in yr.iter_mut().zip(xr) {
            *y = xv * inv;
        }
        round_in_place::<T>(level, yr);
        for (y, &wv) in yr.iter_mut().zip(w) {
            *y *= wv.to_f32();
        }
        round_in_place::<T>(level, yr);
    }
}

/// 1 / sqrt(mean(x²) + eps), with IEEE sqrt and division (correctly rounded everywhere).
#[inline]
pub fn rms_inv(level: SimdLevel, x: &[f32], eps: f32) -> f32 {
    let ss = dot::<f32>(level, x, x);
    1.0 / (ss / x.len() as f32 + eps).sqrt()
}
