//! Gradients of the decoder: every op's forward and backward side by side, and a whole-model
//! tape that the trainer runs forward and backward over one sequence.
//!
//! Ops are generic over [`Real`] so tests can check each backward against finite differences
//! in f64; the trainer runs them in f32. Backward functions *add* into their gradient buffers,
//! so a tensor used twice (a residual stream, tied embeddings) simply receives both shares.
//!
//! The tape runs the model without rounding to the run dtype: it is the gradient of the model
//! evaluated at the (already rounded) weights. Exact logprobs for losses and importance ratios
//! come from the shared [`Model`](crate::Model) forward, not from here.
//!
//! Layout: [`Real`] and the shared helpers live here; `ops` holds every op's forward/backward
//! pair, `train_weights` the parameters, `grads` the gradients and `tape` the whole-model
//! forward and backward.

mod grads;
mod ops;
mod tape;
mod train_weights;

pub use grads::{GradOptions, Grads};
pub use ops::{
    attention_backward, attention_forward, causal_probs_len, embedding_backward, embedding_forward,
    linear_backward_bias, linear_backward_input, linear_backward_weight, linear_forward,
    residual_backward, residual_forward, rms_norm_backward, rms_norm_forward, rope_backward,
    rope_forward, silu_gate_backward, silu_gate_forward, token_logprob, token_logprob_backward,
    RopeTable,
};
pub use tape::{backward, forward_tape, Tape};
pub use train_weights::TrainWeights;

use crate::kernels::attention::axpy;
use crate::kernels::dot::dot;
use crate::kernels::gemm::{matmul, Output};
use crate::kernels::math;
use crate::kernels::{split_range, Kernels, SimdLevel};
use std::ops::{Add, AddAssign, Div, Mul, Neg, Sub};
use std::sync::Mutex;

/// Below this many multiply-adds an attention call runs on one thread.
const PARALLEL_MIN_WORK: usize = 1 << 14;

// ---------------------------------------------------------------------------------------------
// Scalars

/// A floating-point scalar the ops run in: f32 (training) or f64 (gradient checks).
pub trait Real:
    Copy
    + Default
    + PartialOrd
    + Send
    + Sync
    + std::fmt::Debug
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
{
    /// 0.
    const ZERO: Self;
    /// 1.
    const ONE: Self;
    /// −∞.
    const NEG_INFINITY: Self;
    /// Nearest value to `x`.
    fn from_f64(x: f64) -> Self;
    /// Widens to f64.
    fn to_f64(self) -> f64;
    /// Square root.
    fn sqrt(self) -> Self;
    /// e^x.
    fn exp(self) -> Self;
    /// Natural logarithm.
    fn ln(self) -> Self;
    /// The larger of two values.
    fn max(self, other: Self) -> Self;
    /// Σ a[i]·b[i].
    fn dot(level: SimdLevel, a: &[Self], b: &[Self]) -> Self;
    /// y += a·x.
    fn axpy(level: SimdLevel, a: Self, x: &[Self], y: &mut [Self]);
    /// out = x·wᵀ (+ bias) for x `[m, k]`, w `[n, k]`, out `[m, n]` (overwrites `out`).
    #[allow(clippy::too_many_arguments)]
    fn matmul_t(
        kern: &Kernels,
        x: &[Self],
        m: usize,
        k: usize,
        w: &[Self],
        n: usize,
        bias: Option<&[Self]>,
        out: &mut [Self],
    );
}

// In f32 every op is the kernel the shared forward uses (same exp, dot, axpy and matmul), so the
// tape's logits equal `Model<f32>`'s.
impl Real for f32 {
    const ZERO: f32 = 0.0;
    const ONE: f32 = 1.0;
    const NEG_INFINITY: f32 = f32::NEG_INFINITY;
    fn from_f64(x: f64) -> f32 {
        x as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn sqrt(self) -> f32 {
        f32::sqrt(self)
    }
    fn exp(self) -> f32 {
        math::exp(self)
    }
    fn ln(self) -> f32 {
        math::ln(self)
    }
    fn max(self, other: f32) -> f32 {
        f32::max(self, other)
    }
    fn dot(level: SimdLevel, a: &[f32], b: &[f32]) -> f32 {
        dot::<f32>(level, a, b)
    }
    fn axpy(level: SimdLevel, a: f32, x: &[f32], y: &mut [f32]) {
        axpy::<f32>(level, a, x, y)
    }
    fn matmul_t(
        kern: &Kernels,
        x: &[f32],
        m: usize,
        k: usize,
        w: &[f32],
        n: usize,
        bias: Option<&[f32]>,
        out: &mut [f32],
    ) {
        matmul::<f32>(kern, x, m, k, w, n, bias, Output::F32, out)
    }
}

impl Real for f64 {
    const ZERO: f64 = 0.0;
    const ONE: f64 = 1.0;
    const NEG_INFINITY: f64 = f64::NEG_INFINITY;
    fn from_f64(x: f64) -> f64 {
        x
    }
    fn to_f64(self) -> f64 {
        self
    }
    fn sqrt(self) -> f64 {
        f64::sqrt(self)
    }
    fn exp(self) -> f64 {
        f64::exp(self)
    }
    fn ln(self) -> f64 {
        f64::ln(self)
    }
    fn max(self, other: f64) -> f64 {
        f64::max(self, other)
    }
    fn dot(_: SimdLevel, a: &[f64], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len(), "dot of vectors with different lengths");
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }
    fn axpy(_: SimdLevel, a: f64, x: &[f64], y: &mut [f64]) {
        assert_eq!(x.len(), y.len(), "axpy of vectors with different lengths");
        for (yv, &xv) in y.iter_mut().zip(x) {
            *yv += a * xv;
        }
    }
    fn matmul_t(
        _: &Kernels,
        x: &[f64],
        m: usize,
        k: usize,
        w: &[f64],
        n: usize,
        bias: Option<&[f64]>,
        out: &mut [f64],
    ) {
        assert!(x.len() == m * k && w.len() == n * k && out.len() == m * n);
        for (xr, orow) in x.chunks_exact(k.max(1)).zip(out.chunks_exact_mut(n.max(1))) {
            for (j, o) in orow.iter_mut().enumerate() {
                let acc: f64 = xr
                    .iter()
                    .zip(&w[j * k..(j + 1) * k])
                    .map(|(a, b)| a * b)
                    .sum();
                *o = acc + bias.map_or(0.0, |b| b[j]);
            }
        }
    }
}

/// `x` (`rows × cols`) transposed to `cols × rows`.
pub fn transpose<R: Real>(x: &[R], rows: usize, cols: usize) -> Vec<R> {
    transpose_padded(x, rows, cols, rows)
}

/// `x` (`rows × cols`) transposed to `cols × stride`, columns `rows..stride` zero.
fn transpose_padded<R: Real>(x: &[R], rows: usize, cols: usize, stride: usize) -> Vec<R> {
    assert_eq!(x.len(), rows * cols, "transpose: bad shape");
    let mut out = vec![R::ZERO; cols * stride];
    transpose_cols(x, rows, cols, 0..cols, stride, &mut out);
    out
}

/// [`transpose`] split over the pool's threads (weights are transposed once per step, and the
/// LM head alone has tens of millions of entries).
fn transpose_on<R: Real>(kern: &Kernels, x: &[R], rows: usize, cols: usize) -> Vec<R> {
    assert_eq!(x.len(), rows * cols, "transpose: bad shape");
    let threads = if rows * cols < PARALLEL_MIN_WORK {
        1
    } else {
        kern.pool.threads()
    };
    let mut out = vec![R::ZERO; rows * cols];
    let ranges = split_range(cols, threads, 8);
    // Thread t owns the output rows of input columns ranges[t].
    let mut parts = Vec::with_capacity(ranges.len());
    let mut rest = out.as_mut_slice();
    for r in &ranges {
        let (part, tail) = rest.split_at_mut(r.len() * rows);
        parts.push(Mutex::new(part));
        rest = tail;
    }
    let job = |t: usize| {
        let mut part = lock(&parts[t]);
        transpose_cols(x, rows, cols, ranges[t].clone(), rows, &mut part);
    };
    if threads == 1 {
        job(0);
    } else {
        kern.pool.run(&job);
    }
    drop(parts);
    out
}

/// Writes columns `cs` of `x` (`rows × cols`) as rows of `out` (`cs.len() × stride`).
fn transpose_cols<R: Real>(
    x: &[R],
    rows: usize,
    cols: usize,
    cs: std::ops::Range<usize>,
    stride: usize,
    out: &mut [R],
) {
    // Square tiles keep both the reads and the writes within a few cache lines.
    const TILE: usize = 32;
    for r0 in (0..rows).step_by(TILE) {
        for c0 in cs.clone().step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                for c in c0..(c0 + TILE).min(cs.end) {
                    out[(c - cs.start) * stride + r] = x[r * cols + c];
                }
            }
        }
    }
}

fn add_into<R: Real>(dst: &mut [R], src: &[R]) {
    assert_eq!(dst.len(), src.len());
    for (d, &s) in dst.iter_mut().zip(src) {
        *d += s;
    }
}

/// Zeros written now: lazily mapped zero pages would fault later, inside backward's
/// multi-threaded products, where that costs several times more.
fn touched_zeros<R: Real>(n: usize) -> Vec<R> {
    let mut v = Vec::with_capacity(n);
    v.resize(n, R::ZERO);
    v
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock means a worker panicked; the pool re-raises that, the data is still ours.
    m.lock().unwrap_or_else(|e| e.into_inner())
}
