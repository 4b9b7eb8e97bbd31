//! Softmax and log-softmax over f32 rows, in a fixed order.

use super::math::{exp_shifted, ln};

/// Largest value of a row (NaN-free input assumed; NaN compares as smaller).
#[inline]
pub fn max(row: &[f32]) -> f32 {
    row.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// log p_i = x_i − max − ln Σ_j exp(x_j − max), summed in index order.
pub fn log_softmax(row: &[f32], out: &mut [f32]) {
    assert_eq!(row.len(), out.len());
    let m = max(row);
    // `out` holds the exponentials until the normaliser is known.
    exp_shifted(row, m, out);
    let mut sum = 0f32;
    for &e in out.iter() {
        sum += e;
    }
    let ln_sum = ln(sum);
    for (o, &x) in out.iter_mut().zip(row) {
        *o = (x - m) - ln_sum;
    }
}

/// Softmax in place: p_i = exp(x_i − max) / Σ_j exp(x_j − max), summed in index order.
pub fn softmax_in_place(row: &mut [f32]) {
    let m = max(row);
    let src = row.to_vec();
    exp_shifted(&src, m, row);
    let mut sum = 0f32;
    for &x in row.iter() {
        sum += x;
    }
    for x in row.iter_mut() {
        *x /= sum;
    }
}
