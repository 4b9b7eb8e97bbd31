//! RMSNorm.

use super::dot::dot;
use super::round::round_in_place;
use super::{part_range, Kernels, SharedOut, SimdLevel};
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
        // The weight is widened a slice at a time on the stack: no allocation per call.
        let mut wf = [0f32; 64];
        for (ys, ws) in yr.chunks_mut(64).zip(w.chunks(64)) {
            T::to_f32_slice(ws, &mut wf[..ws.len()]);
            for (y, &wv) in ys.iter_mut().zip(&wf) {
                *y *= wv;
            }
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

/// Per row of `h`: h = round(h + add) when `add` is given (the residual connection), then
/// out = [`rms_norm`] of it; rows are shared among the pool's threads.
pub fn residual_norm<T: Elem>(
    kern: &Kernels,
    h: &mut [f32],
    add: Option<&[f32]>,
    w: &[T],
    eps: f32,
    out: &mut [f32],
) {
    let d = w.len();
    let rows = h.len() / d.max(1);
    let level = kern.level;
    let one = |h: &mut [f32], add: Option<&[f32]>, out: &mut [f32]| {
        if let Some(a) = add {
            for (x, &y) in h.iter_mut().zip(a) {
                *x += y;
            }
            round_in_place::<T>(level, h);
        }
        rms_norm(level, h, w, eps, out);
    };
    let threads = kern.pool.threads();
    // A row costs well under a microsecond: below this, handing rows out costs more than it saves.
    if threads == 1 || rows < 8 * threads {
        one(h, add, out);
        return;
    }
    let (hp, op) = (SharedOut::new(h), SharedOut::new(out));
    kern.pool.run(&|t| {
        let r = part_range(rows, threads, 1, t);
        let span = r.start * d..r.end * d;
        // SAFETY: thread `t` owns rows `r` of `h` and `out`.
        let (hs, os) = unsafe {
            (
                std::slice::from_raw_parts_mut(hp.get().add(span.start), span.len()),
                std::slice::from_raw_parts_mut(op.get().add(span.start), span.len()),
            )
        };
        one(hs, add.map(|a| &a[span]), os);
    });
}
