//! Rounding f32 buffers to the run dtype in place, vectorised where the CPU converts to f16 in
//! hardware. IEEE conversions round to nearest-even everywhere, so every path gives the bits
//! of [`Elem::round`].

use super::SimdLevel;
use crate::dtype::{Elem, ElemKind};

/// Rounds every value of `xs` to `T` and back.
#[inline]
pub fn round_in_place<T: Elem>(level: SimdLevel, xs: &mut [f32]) {
    match T::KIND {
        ElemKind::F32 => {}
        #[cfg(target_arch = "x86_64")]
        ElemKind::F16 if level >= SimdLevel::Avx2 => unsafe { round_f16_f16c(xs) },
        _ => {
            for x in xs {
                *x = T::round(*x);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn round_f16_f16c(xs: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = xs.len();
    let full = n - n % 8;
    let p = xs.as_mut_ptr();
    let mut i = 0;
    while i < full {
        let v = _mm256_loadu_ps(p.add(i));
        let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
        _mm256_storeu_ps(p.add(i), _mm256_cvtph_ps(h));
        i += 8;
    }
    for x in &mut xs[full..] {
        *x = half::f16::from_f32(*x).to_f32();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_rounding_matches_scalar_bits_including_edges() {
        let mut xs: Vec<f32> = (0..10_000)
            .map(|i| ((i as f32) * 0.731).sin() * 10f32.powi(i % 12 - 8))
            .collect();
        xs.extend([
            0.0,
            -0.0,
            65504.0,
            65520.0,
            1e9,
            -1e9,
            6e-8,
            2.9e-8,
            f32::INFINITY,
        ]);
        for level in SimdLevel::available() {
            let mut a = xs.clone();
            round_in_place::<half::f16>(level, &mut a);
            for (x, y) in xs.iter().zip(&a) {
                assert_eq!(
                    y.to_bits(),
                    half::f16::from_f32(*x).to_f32().to_bits(),
                    "{x} at {level:?}"
                );
            }
        }
    }
}
