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

use crate::config::ModelConfig;
use crate::kernels::attention::{axpy, AttentionShape};
use crate::kernels::dot::{dot, LANES};
use crate::kernels::gemm::{matmul, Output};
use crate::kernels::math;
use crate::kernels::rope::Rope;
use crate::kernels::{split_range, Kernels, SimdLevel};
use crate::weights::{expected_tensors, WeightError};
use std::collections::HashMap;
use std::ops::{Add, AddAssign, Div, Mul, Neg, Sub};
use std::sync::{Mutex, OnceLock};

/// Below this many multiply-adds an attention call runs on one thread.
const PARALLEL_MIN_WORK: usize = 1 << 14;
/// Elements of the scratch block a weight gradient is computed in before it is added.
const GRAD_BLOCK: usize = 1 << 16;

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

// ---------------------------------------------------------------------------------------------
// Embedding

/// Embedding lookup: out[r] = table[tokens[r]] (rows of width `dim`).
pub fn embedding_forward<R: Real>(table: &[R], dim: usize, tokens: &[u32], out: &mut [R]) {
    assert_eq!(out.len(), tokens.len() * dim, "embedding: bad output shape");
    for (row, &t) in out.chunks_exact_mut(dim).zip(tokens) {
        row.copy_from_slice(&table[t as usize * dim..(t as usize + 1) * dim]);
    }
}

/// dtable[tokens[r]] += dout[r]: a token that occurs twice receives both rows.
pub fn embedding_backward<R: Real>(dtable: &mut [R], dim: usize, tokens: &[u32], dout: &[R]) {
    assert_eq!(
        dout.len(),
        tokens.len() * dim,
        "embedding: bad gradient shape"
    );
    for (row, &t) in dout.chunks_exact(dim).zip(tokens) {
        add_into(&mut dtable[t as usize * dim..(t as usize + 1) * dim], row);
    }
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

/// RMSNorm per row of width `w.len()`: n = x·r with r = 1/sqrt(mean(x²) + eps), y = n ⊙ w.
/// Writes r of each row to `inv_rms`. The weight multiplies the normalised value, as in
/// [`rms_norm`](crate::kernels::norm::rms_norm).
pub fn rms_norm_forward<R: Real>(
    level: SimdLevel,
    x: &[R],
    w: &[R],
    eps: R,
    out: &mut [R],
    inv_rms: &mut [R],
) {
    let d = w.len();
    assert!(
        d > 0 && out.len() == x.len() && inv_rms.len() * d == x.len(),
        "rms_norm: bad shapes"
    );
    let dr = R::from_f64(d as f64);
    for ((xr, yr), r) in x
        .chunks_exact(d)
        .zip(out.chunks_exact_mut(d))
        .zip(inv_rms.iter_mut())
    {
        // Same expression as the kernel's `rms_inv`, so f32 gives the same bits.
        let inv = R::ONE / (R::dot(level, xr, xr) / dr + eps).sqrt();
        *r = inv;
        for ((y, &xv), &wv) in yr.iter_mut().zip(xr).zip(w) {
            *y = (xv * inv) * wv;
        }
    }
}

/// With dn = dy ⊙ w: dw += Σ_rows dy ⊙ n and dx += r·(dn − n·mean(dn ⊙ n)), since
/// ∂r/∂x_i = −r³·x_i/d.
pub fn rms_norm_backward<R: Real>(
    level: SimdLevel,
    x: &[R],
    w: &[R],
    inv_rms: &[R],
    dy: &[R],
    dx: &mut [R],
    mut dw: Option<&mut [R]>,
) {
    let d = w.len();
    assert!(
        d > 0 && dy.len() == x.len() && dx.len() == x.len() && inv_rms.len() * d == x.len(),
        "rms_norm_backward: bad shapes"
    );
    let dr = R::from_f64(d as f64);
    let mut n = vec![R::ZERO; d];
    let mut dn = vec![R::ZERO; d];
    for (((xr, dyr), dxr), &r) in x
        .chunks_exact(d)
        .zip(dy.chunks_exact(d))
        .zip(dx.chunks_exact_mut(d))
        .zip(inv_rms)
    {
        for i in 0..d {
            n[i] = xr[i] * r;
            dn[i] = dyr[i] * w[i];
        }
        if let Some(dw) = dw.as_deref_mut() {
            for i in 0..d {
                dw[i] += dyr[i] * n[i];
            }
        }
        let mean = R::dot(level, &dn, &n) / dr;
        for i in 0..d {
            dxr[i] += r * (dn[i] - n[i] * mean);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Linear

/// y = x·Wᵀ (+ b) for x `[m, k]`, W `[n, k]` (Linear layout), y `[m, n]`.
#[allow(clippy::too_many_arguments)]
pub fn linear_forward<R: Real>(
    kern: &Kernels,
    x: &[R],
    m: usize,
    k: usize,
    w: &[R],
    n: usize,
    bias: Option<&[R]>,
    out: &mut [R],
) {
    R::matmul_t(kern, x, m, k, w, n, bias, out);
}

/// dx += dy·W for dy `[m, n]`; takes W transposed (`w_t`, `[k, n]`) so the product reduces over
/// contiguous memory.
pub fn linear_backward_input<R: Real>(
    kern: &Kernels,
    dy: &[R],
    m: usize,
    n: usize,
    w_t: &[R],
    k: usize,
    dx: &mut [R],
) {
    assert_eq!(dx.len(), m * k, "linear_backward_input: bad dx shape");
    let mut tmp = vec![R::ZERO; m * k];
    R::matmul_t(kern, dy, m, n, w_t, k, None, &mut tmp);
    add_into(dx, &tmp);
}

/// dW += dyᵀ·x for x `[m, k]`, dy `[m, n]`, dW `[n, k]`.
pub fn linear_backward_weight<R: Real>(
    kern: &Kernels,
    x: &[R],
    m: usize,
    k: usize,
    dy: &[R],
    n: usize,
    dw: &mut [R],
) {
    assert!(
        x.len() == m * k && dy.len() == m * n && dw.len() == n * k,
        "linear_backward_weight: bad shapes"
    );
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    // The reduction runs over rows (tokens); padding it to whole SIMD stripes with zeros keeps
    // the matmul off its scalar tail path when there are only a few rows.
    let stride = m.next_multiple_of(LANES);
    let dy_t = transpose_padded(dy, m, n, stride);
    let x_t = transpose_padded(x, m, k, stride);
    // Output rows in blocks, so the scratch stays small even for the LM head.
    let block = (GRAD_BLOCK / k).clamp(1, n);
    let mut tmp = vec![R::ZERO; block * k];
    for j0 in (0..n).step_by(block) {
        let rows = block.min(n - j0);
        let tmp = &mut tmp[..rows * k];
        let dy_rows = &dy_t[j0 * stride..(j0 + rows) * stride];
        R::matmul_t(kern, dy_rows, rows, stride, &x_t, k, None, tmp);
        add_into(&mut dw[j0 * k..(j0 + rows) * k], tmp);
    }
}

/// db += Σ_rows dy for dy `[m, n]`.
pub fn linear_backward_bias<R: Real>(dy: &[R], n: usize, db: &mut [R]) {
    assert_eq!(db.len(), n, "linear_backward_bias: bad shape");
    for row in dy.chunks_exact(n) {
        add_into(db, row);
    }
}

// ---------------------------------------------------------------------------------------------
// RoPE

/// cos/sin of every rotary frequency at positions `0..positions`, as the kernel's [`Rope`] has
/// them.
#[derive(Debug, Clone)]
pub struct RopeTable<R: Real> {
    head_dim: usize,
    positions: usize,
    // [position][head_dim / 2]
    cos: Vec<R>,
    sin: Vec<R>,
}

impl<R: Real> RopeTable<R> {
    /// The tables of `rope` (heads of width `head_dim`) for positions `0..positions`.
    pub fn new(rope: &Rope, head_dim: usize, positions: usize) -> RopeTable<R> {
        assert!(
            positions <= rope.max_positions(),
            "{positions} positions exceed the RoPE table ({})",
            rope.max_positions()
        );
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        // Read through the kernel itself, so the two can never disagree on the convention:
        // rotating (1…1, 0…0) yields exactly (cos…, sin…).
        let mut probe = vec![0f32; head_dim];
        for p in 0..positions {
            probe[..half].fill(1.0);
            probe[half..].fill(0.0);
            rope.apply::<f32>(&mut probe, p);
            cos.extend(probe[..half].iter().map(|&c| R::from_f64(c as f64)));
            sin.extend(probe[half..].iter().map(|&s| R::from_f64(s as f64)));
        }
        RopeTable {
            head_dim,
            positions,
            cos,
            sin,
        }
    }

    /// Positions covered.
    pub fn positions(&self) -> usize {
        self.positions
    }

    fn rows_of(&self, x: &[R], width: usize) -> usize {
        assert!(
            width > 0 && width.is_multiple_of(self.head_dim) && x.len().is_multiple_of(width),
            "rope: width {width} is not a whole number of heads"
        );
        let rows = x.len() / width;
        assert!(rows <= self.positions, "rope: {rows} rows beyond the table");
        rows
    }
}

/// Rotates each head of row `r` (at position `r`) in place, Hugging Face's "rotate half":
/// (a, b) → (a·cos − b·sin, b·cos + a·sin) for a = first half, b = second half of the head.
pub fn rope_forward<R: Real>(table: &RopeTable<R>, x: &mut [R], width: usize) {
    let rows = table.rows_of(x, width);
    let half = table.head_dim / 2;
    for (p, row) in x[..rows * width].chunks_exact_mut(width).enumerate() {
        let c = &table.cos[p * half..(p + 1) * half];
        let s = &table.sin[p * half..(p + 1) * half];
        for head in row.chunks_exact_mut(table.head_dim) {
            let (a, b) = head.split_at_mut(half);
            for i in 0..half {
                let (x0, x1) = (a[i], b[i]);
                a[i] = x0 * c[i] - x1 * s[i];
                b[i] = x1 * c[i] + x0 * s[i];
            }
        }
    }
}

/// The gradient of [`rope_forward`] in place: the transpose of a rotation is the inverse
/// rotation, (da, db) → (da·cos + db·sin, db·cos − da·sin).
pub fn rope_backward<R: Real>(table: &RopeTable<R>, dx: &mut [R], width: usize) {
    let rows = table.rows_of(dx, width);
    let half = table.head_dim / 2;
    for (p, row) in dx[..rows * width].chunks_exact_mut(width).enumerate() {
        let c = &table.cos[p * half..(p + 1) * half];
        let s = &table.sin[p * half..(p + 1) * half];
        for head in row.chunks_exact_mut(table.head_dim) {
            let (a, b) = head.split_at_mut(half);
            for i in 0..half {
                let (d0, d1) = (a[i], b[i]);
                a[i] = d0 * c[i] + d1 * s[i];
                b[i] = d1 * c[i] - d0 * s[i];
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Causal attention with grouped K/V heads

/// Saved probabilities of [`attention_forward`] over `t` tokens: per head, the lower triangle
/// row by row (row i holds positions 0..=i).
pub fn causal_probs_len(shape: AttentionShape, t: usize) -> usize {
    shape.n_heads * t * (t + 1) / 2
}

fn attention_threads(kern: &Kernels, shape: AttentionShape, t: usize) -> usize {
    if causal_probs_len(shape, t) * shape.head_dim < PARALLEL_MIN_WORK {
        1
    } else {
        kern.pool.threads()
    }
}

fn check_attention_shapes<R: Real>(shape: AttentionShape, t: usize, q: &[R], k: &[R], v: &[R]) {
    let AttentionShape {
        n_heads,
        n_kv_heads,
        head_dim,
    } = shape;
    assert!(
        n_kv_heads > 0 && n_heads.is_multiple_of(n_kv_heads),
        "attention: {n_heads} heads cannot share {n_kv_heads} K/V heads"
    );
    assert_eq!(q.len(), t * n_heads * head_dim, "attention: bad q shape");
    assert_eq!(k.len(), t * n_kv_heads * head_dim, "attention: bad k shape");
    assert_eq!(v.len(), t * n_kv_heads * head_dim, "attention: bad v shape");
}

/// Causal self-attention of one sequence at positions `0..t`: for query head h (K/V head
/// h / (n_heads / n_kv_heads)), p_ij = softmax_j≤i(q_i·k_j / sqrt(head_dim)), out_i = Σ_j p_ij v_j.
/// q and out are `[t, n_heads·head_dim]`, k and v `[t, n_kv_heads·head_dim]`; p is saved in
/// `probs` (see [`causal_probs_len`]).
#[allow(clippy::too_many_arguments)]
pub fn attention_forward<R: Real>(
    kern: &Kernels,
    shape: AttentionShape,
    t: usize,
    q: &[R],
    k: &[R],
    v: &[R],
    out: &mut [R],
    probs: &mut [R],
) {
    check_attention_shapes(shape, t, q, k, v);
    let hd = shape.head_dim;
    let (qd, kvd) = (shape.n_heads * hd, shape.n_kv_heads * hd);
    let group = shape.n_heads / shape.n_kv_heads;
    assert_eq!(out.len(), q.len(), "attention: bad out shape");
    assert_eq!(
        probs.len(),
        causal_probs_len(shape, t),
        "attention: bad probs"
    );
    if t == 0 {
        return;
    }
    let tri = t * (t + 1) / 2;
    let scale = R::ONE / R::from_f64(hd as f64).sqrt();
    let level = kern.level;
    // Each head owns its slice of `probs`; heads are split over threads, so no lock contends.
    let head_probs: Vec<Mutex<&mut [R]>> = probs.chunks_mut(tri).map(Mutex::new).collect();
    let outputs: Mutex<Vec<(usize, Vec<R>)>> = Mutex::new(Vec::new());
    let threads = attention_threads(kern, shape, t);
    let ranges = split_range(shape.n_heads, threads, 1);
    let job = |th: usize| {
        for h in ranges[th].clone() {
            let kvh = h / group;
            let mut p = lock(&head_probs[h]);
            let mut o = vec![R::ZERO; t * hd];
            for i in 0..t {
                let qi = &q[i * qd + h * hd..i * qd + (h + 1) * hd];
                let row = &mut p[i * (i + 1) / 2..(i + 1) * (i + 2) / 2];
                for (j, s) in row.iter_mut().enumerate() {
                    *s =
                        R::dot(level, qi, &k[j * kvd + kvh * hd..j * kvd + (kvh + 1) * hd]) * scale;
                }
                // The kernel's softmax: max, exponentials and their sum in position order.
                let m = row.iter().fold(R::NEG_INFINITY, |a, &b| a.max(b));
                let mut sum = R::ZERO;
                for s in row.iter_mut() {
                    *s = (*s - m).exp();
                    sum += *s;
                }
                for s in row.iter_mut() {
                    *s = *s / sum;
                }
                let oi = &mut o[i * hd..(i + 1) * hd];
                for (j, &pj) in row.iter().enumerate() {
                    R::axpy(
                        level,
                        pj,
                        &v[j * kvd + kvh * hd..j * kvd + (kvh + 1) * hd],
                        oi,
                    );
                }
            }
            lock(&outputs).push((h, o));
        }
    };
    if threads == 1 {
        job(0);
    } else {
        kern.pool.run(&job);
    }
    for (h, o) in outputs.into_inner().unwrap_or_else(|e| e.into_inner()) {
        for (i, oi) in o.chunks_exact(hd).enumerate() {
            out[i * qd + h * hd..i * qd + (h + 1) * hd].copy_from_slice(oi);
        }
    }
}

/// Gradients of [`attention_forward`] from its saved `probs`, added into dq, dk, dv:
/// dv_j += Σ_i p_ij do_i; dp_ij = do_i·v_j; ds_ij = p_ij (dp_ij − Σ_j' p_ij' dp_ij');
/// dq_i += scale Σ_j ds_ij k_j; dk_j += scale Σ_i ds_ij q_i (summed over a K/V head's group).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<R: Real>(
    kern: &Kernels,
    shape: AttentionShape,
    t: usize,
    q: &[R],
    k: &[R],
    v: &[R],
    probs: &[R],
    dout: &[R],
    dq: &mut [R],
    dk: &mut [R],
    dv: &mut [R],
) {
    check_attention_shapes(shape, t, q, k, v);
    let hd = shape.head_dim;
    let (qd, kvd) = (shape.n_heads * hd, shape.n_kv_heads * hd);
    let group = shape.n_heads / shape.n_kv_heads;
    assert_eq!(
        probs.len(),
        causal_probs_len(shape, t),
        "attention: bad probs"
    );
    assert!(
        dout.len() == q.len() && dq.len() == q.len() && dk.len() == k.len() && dv.len() == v.len(),
        "attention_backward: bad gradient shapes"
    );
    if t == 0 {
        return;
    }
    let tri = t * (t + 1) / 2;
    let scale = R::ONE / R::from_f64(hd as f64).sqrt();
    let level = kern.level;
    // Per query head: (head, dq_h, dk_h, dv_h), each [t, head_dim]; K/V heads shared by a group
    // are summed afterwards in head order, so the result does not depend on the thread count.
    type HeadGrads<R> = (usize, Vec<R>, Vec<R>, Vec<R>);
    let results: Mutex<Vec<HeadGrads<R>>> = Mutex::new(Vec::new());
    let threads = attention_threads(kern, shape, t);
    let ranges = split_range(shape.n_heads, threads, 1);
    let job = |th: usize| {
        let mut dp = vec![R::ZERO; t];
        for h in ranges[th].clone() {
            let kvh = h / group;
            let p = &probs[h * tri..(h + 1) * tri];
            let (mut dqh, mut dkh, mut dvh) = (
                vec![R::ZERO; t * hd],
                vec![R::ZERO; t * hd],
                vec![R::ZERO; t * hd],
            );
            let kv_row = |j: usize| j * kvd + kvh * hd..j * kvd + (kvh + 1) * hd;
            for i in 0..t {
                let qi = &q[i * qd + h * hd..i * qd + (h + 1) * hd];
                let doi = &dout[i * qd + h * hd..i * qd + (h + 1) * hd];
                let pi = &p[i * (i + 1) / 2..(i + 1) * (i + 2) / 2];
                let mut pdp = R::ZERO;
                for (j, &pij) in pi.iter().enumerate() {
                    R::axpy(level, pij, doi, &mut dvh[j * hd..(j + 1) * hd]);
                    dp[j] = R::dot(level, doi, &v[kv_row(j)]);
                    pdp += pij * dp[j];
                }
                let dqi = &mut dqh[i * hd..(i + 1) * hd];
                for (j, &pij) in pi.iter().enumerate() {
                    let ds = pij * (dp[j] - pdp) * scale;
                    R::axpy(level, ds, &k[kv_row(j)], dqi);
                    R::axpy(level, ds, qi, &mut dkh[j * hd..(j + 1) * hd]);
                }
            }
            lock(&results).push((h, dqh, dkh, dvh));
        }
    };
    if threads == 1 {
        job(0);
    } else {
        kern.pool.run(&job);
    }
    let mut results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    results.sort_by_key(|r| r.0);
    for (h, dqh, dkh, dvh) in results {
        let kvh = h / group;
        for i in 0..t {
            let src = i * hd..(i + 1) * hd;
            add_into(
                &mut dq[i * qd + h * hd..i * qd + (h + 1) * hd],
                &dqh[src.clone()],
            );
            let kv = i * kvd + kvh * hd..i * kvd + (kvh + 1) * hd;
            add_into(&mut dk[kv.clone()], &dkh[src.clone()]);
            add_into(&mut dv[kv], &dvh[src]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SiLU-gated MLP product

/// out = silu(g) ⊙ u with silu(x) = x / (1 + e^−x).
pub fn silu_gate_forward<R: Real>(g: &[R], u: &[R], out: &mut [R]) {
    assert!(
        g.len() == u.len() && out.len() == g.len(),
        "silu_gate: bad shapes"
    );
    for ((o, &gv), &uv) in out.iter_mut().zip(g).zip(u) {
        *o = gv / (R::ONE + (-gv).exp()) * uv;
    }
}

/// With σ = sigmoid(g): dg += dout·u·σ·(1 + g·(1 − σ)) and du += dout·silu(g).
pub fn silu_gate_backward<R: Real>(g: &[R], u: &[R], dout: &[R], dg: &mut [R], du: &mut [R]) {
    let n = g.len();
    assert!(
        u.len() == n && dout.len() == n && dg.len() == n && du.len() == n,
        "silu_gate_backward: bad shapes"
    );
    for i in 0..n {
        let sig = R::ONE / (R::ONE + (-g[i]).exp());
        dg[i] += dout[i] * u[i] * sig * (R::ONE + g[i] * (R::ONE - sig));
        du[i] += dout[i] * g[i] * sig;
    }
}

// ---------------------------------------------------------------------------------------------
// Residual add

/// The residual stream: h ← h + x.
pub fn residual_forward<R: Real>(h: &mut [R], x: &[R]) {
    add_into(h, x);
}

/// dx += dh; the stream's own gradient dh passes through unchanged.
pub fn residual_backward<R: Real>(dh: &[R], dx: &mut [R]) {
    add_into(dx, dh);
}

// ---------------------------------------------------------------------------------------------
// Log-softmax of a target token

/// log softmax(logits)[target] = logits[target] − max − ln Σ_j e^(logits_j − max).
pub fn token_logprob<R: Real>(logits: &[R], target: usize) -> R {
    assert!(target < logits.len(), "target {target} outside the row");
    let m = logits.iter().fold(R::NEG_INFINITY, |a, &b| a.max(b));
    let mut sum = R::ZERO;
    for &x in logits {
        sum += (x - m).exp();
    }
    (logits[target] - m) - sum.ln()
}

/// Gradient of `coeff · token_logprob(logits, target)`: dlogits += coeff·(onehot(target) − p).
pub fn token_logprob_backward<R: Real>(logits: &[R], target: usize, coeff: R, dlogits: &mut [R]) {
    assert!(target < logits.len(), "target {target} outside the row");
    assert_eq!(
        dlogits.len(),
        logits.len(),
        "token_logprob_backward: bad shape"
    );
    let m = logits.iter().fold(R::NEG_INFINITY, |a, &b| a.max(b));
    let mut sum = R::ZERO;
    for &x in logits {
        sum += (x - m).exp();
    }
    for (d, &x) in dlogits.iter_mut().zip(logits) {
        *d += -(coeff * ((x - m).exp() / sum));
    }
    dlogits[target] += coeff;
}

// ---------------------------------------------------------------------------------------------
// Whole model

/// Parameter indices of one decoder layer.
#[derive(Debug, Clone)]
struct LayerIds {
    attn_norm: usize,
    q: usize,
    k: usize,
    v: usize,
    qkv_bias: Option<[usize; 3]>,
    o: usize,
    mlp_norm: usize,
    gate: usize,
    up: usize,
    down: usize,
}

/// What a parameter belongs to, which decides whether it is trainable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Embedding,
    Layer(usize),
    FinalNorm,
    LmHead,
}

/// Every parameter of a model in precision `R` (values already rounded to the run dtype), plus
/// transposed matrices for backward, built on first use. Build one per optimizer step.
pub struct TrainWeights<R: Real = f32> {
    config: ModelConfig,
    names: Vec<String>,
    shapes: Vec<Vec<usize>>,
    roles: Vec<Role>,
    values: Vec<Vec<R>>,
    transposed: Vec<OnceLock<Vec<R>>>,
    layers: Vec<LayerIds>,
    embed: usize,
    norm: usize,
    lm_head: usize,
    rope: Rope,
}

impl<R: Real> std::fmt::Debug for TrainWeights<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrainWeights")
            .field("config", &self.config)
            .field("params", &self.names.len())
            .finish()
    }
}

impl TrainWeights<f32> {
    /// f32 weights from HF-named tensors (every parameter of `config`, each exactly once).
    pub fn new(
        config: &ModelConfig,
        params: Vec<(String, Vec<usize>, Vec<f32>)>,
    ) -> Result<TrainWeights<f32>, WeightError> {
        Self::from_params(config, params)
    }
}

impl<R: Real> TrainWeights<R> {
    /// Weights in precision `R` from HF-named tensors (every parameter of `config`, each
    /// exactly once).
    pub fn from_params(
        config: &ModelConfig,
        params: Vec<(String, Vec<usize>, Vec<R>)>,
    ) -> Result<TrainWeights<R>, WeightError> {
        config.check()?;
        let mut given: HashMap<String, (Vec<usize>, Vec<R>)> = HashMap::new();
        for (name, shape, data) in params {
            if given.contains_key(&name) {
                return Err(WeightError::Unexpected(format!("{name} (given twice)")));
            }
            given.insert(name, (shape, data));
        }
        let specs = expected_tensors(config);
        let mut names = Vec::with_capacity(specs.len());
        let mut shapes = Vec::with_capacity(specs.len());
        let mut values = Vec::with_capacity(specs.len());
        for spec in specs {
            let (shape, data) = given
                .remove(&spec.name)
                .ok_or_else(|| WeightError::Missing(spec.name.clone()))?;
            if shape != spec.shape {
                return Err(WeightError::Shape {
                    name: spec.name,
                    expected: spec.shape,
                    got: shape,
                });
            }
            if data.len() != shape.iter().product::<usize>() {
                return Err(WeightError::Shape {
                    name: spec.name,
                    expected: spec.shape,
                    got: vec![data.len()],
                });
            }
            names.push(spec.name);
            shapes.push(shape);
            values.push(data);
        }
        if let Some(extra) = given.keys().min() {
            return Err(WeightError::Unexpected(extra.clone()));
        }
        let index: HashMap<&str, usize> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i))
            .collect();
        let at = |n: &str| index[n];
        let mut roles = vec![Role::Embedding; names.len()];
        let layers: Vec<LayerIds> = (0..config.num_hidden_layers)
            .map(|l| {
                let p = format!("model.layers.{l}");
                let id = |s: &str| at(&format!("{p}.{s}"));
                let ids = LayerIds {
                    attn_norm: id("input_layernorm.weight"),
                    q: id("self_attn.q_proj.weight"),
                    k: id("self_attn.k_proj.weight"),
                    v: id("self_attn.v_proj.weight"),
                    qkv_bias: config
                        .attention_bias
                        .then(|| ["q", "k", "v"].map(|x| id(&format!("self_attn.{x}_proj.bias")))),
                    o: id("self_attn.o_proj.weight"),
                    mlp_norm: id("post_attention_layernorm.weight"),
                    gate: id("mlp.gate_proj.weight"),
                    up: id("mlp.up_proj.weight"),
                    down: id("mlp.down_proj.weight"),
                };
                for (i, n) in names.iter().enumerate() {
                    if n.starts_with(&format!("{p}.")) {
                        roles[i] = Role::Layer(l);
                    }
                }
                ids
            })
            .collect();
        let embed = at("model.embed_tokens.weight");
        let norm = at("model.norm.weight");
        roles[norm] = Role::FinalNorm;
        // Tied: the LM head is the embedding tensor itself (see forward.rs).
        let lm_head = if config.tie_word_embeddings {
            embed
        } else {
            let id = at("lm_head.weight");
            roles[id] = Role::LmHead;
            id
        };
        let rope = Rope::new(
            config.head_dim,
            config.rope_theta,
            config.max_position_embeddings,
            config.rope_scaling.as_ref(),
        );
        Ok(TrainWeights {
            config: config.clone(),
            transposed: (0..names.len()).map(|_| OnceLock::new()).collect(),
            names,
            shapes,
            roles,
            values,
            layers,
            embed,
            norm,
            lm_head,
            rope,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Parameter names in canonical order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// A parameter's values by HF name.
    pub fn param(&self, name: &str) -> Option<&[R]> {
        let i = self.names.iter().position(|n| n == name)?;
        Some(&self.values[i])
    }

    fn value(&self, id: usize) -> &[R] {
        &self.values[id]
    }

    /// Matrix `id` transposed to `[in, out]`, built on first use.
    fn transposed(&self, kern: &Kernels, id: usize) -> &[R] {
        self.transposed[id].get_or_init(|| {
            let s = &self.shapes[id];
            transpose_on(kern, &self.values[id], s[0], s[1])
        })
    }

    /// Whether `opts` trains parameter `id`.
    fn trainable(&self, id: usize, opts: &GradOptions) -> bool {
        let reaches_embedding = opts.first_trainable_layer == 0;
        match self.roles[id] {
            Role::Embedding if self.config.tie_word_embeddings => {
                opts.train_lm_head || (opts.train_embeddings && reaches_embedding)
            }
            Role::Embedding => opts.train_embeddings && reaches_embedding,
            Role::Layer(l) => l >= opts.first_trainable_layer,
            Role::FinalNorm => opts.train_final_norm,
            Role::LmHead => opts.train_lm_head,
        }
    }
}

/// Which parameters get gradients.
///
/// Layers below `first_trainable_layer` are frozen and backward does not run through them, so
/// the token embedding can only learn when it is 0. A tied embedding/LM-head tensor is trainable
/// when either its head or (with `first_trainable_layer == 0`) its embedding use is, and then
/// receives every share backward reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GradOptions {
    /// Lowest decoder layer that is trained.
    pub first_trainable_layer: usize,
    /// Train the token embedding.
    pub train_embeddings: bool,
    /// Train the final RMSNorm's weight.
    pub train_final_norm: bool,
    /// Train the LM head.
    pub train_lm_head: bool,
}

impl Default for GradOptions {
    /// Everything trainable.
    fn default() -> Self {
        GradOptions {
            first_trainable_layer: 0,
            train_embeddings: true,
            train_final_norm: true,
            train_lm_head: true,
        }
    }
}

/// Accumulated gradients of the trainable parameters, by HF name.
#[derive(Debug, Clone)]
pub struct Grads<R: Real = f32> {
    options: GradOptions,
    names: Vec<String>,
    shapes: Vec<Vec<usize>>,
    // Indexed like the weights' parameters; None for frozen ones.
    values: Vec<Option<Vec<R>>>,
}

impl<R: Real> Grads<R> {
    /// Zero gradients for the parameters of `w` that `opts` trains.
    pub fn new(w: &TrainWeights<R>, opts: &GradOptions) -> Grads<R> {
        let values = (0..w.names.len())
            .map(|i| {
                w.trainable(i, opts)
                    .then(|| touched_zeros(w.values[i].len()))
            })
            .collect();
        Grads {
            options: *opts,
            names: w.names.clone(),
            shapes: w.shapes.clone(),
            values,
        }
    }

    /// The options these gradients were built for.
    pub fn options(&self) -> &GradOptions {
        &self.options
    }

    /// Names of the trainable parameters, in canonical order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.iter().map(|(n, _)| n)
    }

    /// Number of trainable parameters (tensors).
    pub fn len(&self) -> usize {
        self.values.iter().filter(|v| v.is_some()).count()
    }

    /// Whether nothing is trainable.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn id(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    /// The gradient of a parameter, if it is trainable.
    pub fn get(&self, name: &str) -> Option<&[R]> {
        self.values[self.id(name)?].as_deref()
    }

    /// The gradient of a parameter, mutable (for unscaling and clipping).
    pub fn get_mut(&mut self, name: &str) -> Option<&mut [R]> {
        let id = self.id(name)?;
        self.values[id].as_deref_mut()
    }

    /// The shape of a parameter, if it is trainable.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        let id = self.id(name)?;
        self.values[id].as_ref().map(|_| self.shapes[id].as_slice())
    }

    /// (name, gradient) of every trainable parameter, in canonical order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[R])> {
        self.names
            .iter()
            .zip(&self.values)
            .filter_map(|(n, v)| v.as_deref().map(|v| (n.as_str(), v)))
    }

    /// (name, gradient) of every trainable parameter, mutable.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&str, &mut [R])> {
        self.names
            .iter()
            .zip(&mut self.values)
            .filter_map(|(n, v)| v.as_deref_mut().map(|v| (n.as_str(), v)))
    }

    /// Sets every gradient to zero.
    pub fn zero(&mut self) {
        for v in self.values.iter_mut().flatten() {
            v.fill(R::ZERO);
        }
    }

    fn slot(&mut self, id: usize) -> Option<&mut [R]> {
        self.values[id].as_deref_mut()
    }
}

/// Activations one decoder layer saves for backward.
#[derive(Debug, Clone)]
struct LayerTape<R: Real> {
    /// Residual stream entering the layer, `[t, hidden]`.
    h_in: Vec<R>,
    inv_rms_attn: Vec<R>,
    /// After RoPE.
    q: Vec<R>,
    k: Vec<R>,
    v: Vec<R>,
    probs: Vec<R>,
    att: Vec<R>,
    /// Residual stream between attention and MLP.
    h_mid: Vec<R>,
    inv_rms_mlp: Vec<R>,
    gate: Vec<R>,
    up: Vec<R>,
}

/// The forward of one sequence with what backward needs.
#[derive(Debug, Clone)]
pub struct Tape<R: Real = f32> {
    /// Logits of the requested rows, `rows × vocab_size`, in request order.
    pub logits: Vec<R>,
    tokens: Vec<u32>,
    logit_rows: Vec<usize>,
    rope: RopeTable<R>,
    layers: Vec<LayerTape<R>>,
    /// Final residual stream at the logit rows, its inverse RMS and the normed rows.
    h_final: Vec<R>,
    inv_rms_final: Vec<R>,
    normed_final: Vec<R>,
}

impl<R: Real> Tape<R> {
    /// The sequence's tokens.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// The positions whose logits the tape holds.
    pub fn logit_rows(&self) -> &[usize] {
        &self.logit_rows
    }
}

/// Runs the model over `tokens` at positions `0..tokens.len()` without rounding, keeping the
/// activations backward needs; logits only for `logit_rows` (the LM head is the costliest
/// product per row).
///
/// # Panics
/// If a token is outside the vocabulary, the sequence is longer than the model's context or a
/// logit row is not a position of the sequence (the trainer's tokens have passed the shared
/// forward, which reports these as errors).
pub fn forward_tape<R: Real>(
    w: &TrainWeights<R>,
    kern: &Kernels,
    tokens: &[u32],
    logit_rows: &[usize],
) -> Tape<R> {
    let c = &w.config;
    let t = tokens.len();
    let (hid, qd, kvd, inter, vocab) = (
        c.hidden_size,
        c.q_dim(),
        c.kv_dim(),
        c.intermediate_size,
        c.vocab_size,
    );
    if let Some(&bad) = tokens.iter().find(|&&x| x as usize >= vocab) {
        panic!("token {bad} is outside the vocabulary ({vocab})");
    }
    assert!(
        t <= w.rope.max_positions(),
        "{t} tokens exceed the model's context ({})",
        w.rope.max_positions()
    );
    if let Some(&bad) = logit_rows.iter().find(|&&r| r >= t) {
        panic!("logit row {bad} is beyond the {t} tokens");
    }
    let level = kern.level;
    let eps = R::from_f64(c.rms_norm_eps as f32 as f64);
    let shape = AttentionShape {
        n_heads: c.num_attention_heads,
        n_kv_heads: c.num_key_value_heads,
        head_dim: c.head_dim,
    };
    let rope = RopeTable::new(&w.rope, c.head_dim, t);
    let mut h = vec![R::ZERO; t * hid];
    embedding_forward(w.value(w.embed), hid, tokens, &mut h);
    let mut xn = vec![R::ZERO; t * hid];
    let mut branch = vec![R::ZERO; t * hid];
    let mut layers = Vec::with_capacity(w.layers.len());
    for ids in &w.layers {
        let h_in = h.clone();
        let mut inv_rms_attn = vec![R::ZERO; t];
        rms_norm_forward(
            level,
            &h,
            w.value(ids.attn_norm),
            eps,
            &mut xn,
            &mut inv_rms_attn,
        );
        let bias = |j: usize| ids.qkv_bias.map(|b| w.value(b[j]));
        let mut q = vec![R::ZERO; t * qd];
        let mut k = vec![R::ZERO; t * kvd];
        let mut v = vec![R::ZERO; t * kvd];
        linear_forward(kern, &xn, t, hid, w.value(ids.q), qd, bias(0), &mut q);
        linear_forward(kern, &xn, t, hid, w.value(ids.k), kvd, bias(1), &mut k);
        linear_forward(kern, &xn, t, hid, w.value(ids.v), kvd, bias(2), &mut v);
        rope_forward(&rope, &mut q, qd);
        rope_forward(&rope, &mut k, kvd);
        let mut probs = vec![R::ZERO; causal_probs_len(shape, t)];
        let mut att = vec![R::ZERO; t * qd];
        attention_forward(kern, shape, t, &q, &k, &v, &mut att, &mut probs);
        linear_forward(kern, &att, t, qd, w.value(ids.o), hid, None, &mut branch);
        residual_forward(&mut h, &branch);
        let h_mid = h.clone();
        let mut inv_rms_mlp = vec![R::ZERO; t];
        rms_norm_forward(
            level,
            &h,
            w.value(ids.mlp_norm),
            eps,
            &mut xn,
            &mut inv_rms_mlp,
        );
        let mut gate = vec![R::ZERO; t * inter];
        let mut up = vec![R::ZERO; t * inter];
        linear_forward(kern, &xn, t, hid, w.value(ids.gate), inter, None, &mut gate);
        linear_forward(kern, &xn, t, hid, w.value(ids.up), inter, None, &mut up);
        let mut act = vec![R::ZERO; t * inter];
        silu_gate_forward(&gate, &up, &mut act);
        linear_forward(
            kern,
            &act,
            t,
            inter,
            w.value(ids.down),
            hid,
            None,
            &mut branch,
        );
        residual_forward(&mut h, &branch);
        layers.push(LayerTape {
            h_in,
            inv_rms_attn,
            q,
            k,
            v,
            probs,
            att,
            h_mid,
            inv_rms_mlp,
            gate,
            up,
        });
    }
    let n = logit_rows.len();
    let mut h_final = vec![R::ZERO; n * hid];
    for (dst, &r) in h_final.chunks_exact_mut(hid).zip(logit_rows) {
        dst.copy_from_slice(&h[r * hid..(r + 1) * hid]);
    }
    let mut inv_rms_final = vec![R::ZERO; n];
    let mut normed_final = vec![R::ZERO; n * hid];
    rms_norm_forward(
        level,
        &h_final,
        w.value(w.norm),
        eps,
        &mut normed_final,
        &mut inv_rms_final,
    );
    let mut logits = vec![R::ZERO; n * vocab];
    linear_forward(
        kern,
        &normed_final,
        n,
        hid,
        w.value(w.lm_head),
        vocab,
        None,
        &mut logits,
    );
    Tape {
        logits,
        tokens: tokens.to_vec(),
        logit_rows: logit_rows.to_vec(),
        rope,
        layers,
        h_final,
        inv_rms_final,
        normed_final,
    }
}

/// Adds the gradients of the loss whose gradient with respect to `tape.logits` is `dlogits`
/// (same rows) to `grads`, for the parameters `opts` trains.
///
/// # Panics
/// If `grads` was built for other options or weights, the tape for another model, or `dlogits`
/// has the wrong length.
pub fn backward<R: Real>(
    w: &TrainWeights<R>,
    kern: &Kernels,
    tape: &Tape<R>,
    dlogits: &[R],
    opts: &GradOptions,
    grads: &mut Grads<R>,
) {
    let c = &w.config;
    assert_eq!(
        grads.options, *opts,
        "gradients were built for other options"
    );
    assert_eq!(
        grads.names, w.names,
        "gradients were built for another model"
    );
    assert_eq!(
        tape.layers.len(),
        w.layers.len(),
        "the tape is from another model"
    );
    let (hid, vocab) = (c.hidden_size, c.vocab_size);
    let n = tape.logit_rows.len();
    assert_eq!(dlogits.len(), n * vocab, "dlogits must be rows × vocab");
    let level = kern.level;
    let n_layers = w.layers.len();
    let first = opts.first_trainable_layer.min(n_layers);
    let layers_trainable = first < n_layers;

    if let Some(g) = grads.slot(w.lm_head) {
        linear_backward_weight(kern, &tape.normed_final, n, hid, dlogits, vocab, g);
    }
    if !layers_trainable && grads.slot(w.norm).is_none() {
        return;
    }
    let mut dnormed = vec![R::ZERO; n * hid];
    linear_backward_input(
        kern,
        dlogits,
        n,
        vocab,
        w.transposed(kern, w.lm_head),
        hid,
        &mut dnormed,
    );
    let mut dsel = vec![R::ZERO; n * hid];
    rms_norm_backward(
        level,
        &tape.h_final,
        w.value(w.norm),
        &tape.inv_rms_final,
        &dnormed,
        &mut dsel,
        grads.slot(w.norm),
    );
    if !layers_trainable {
        return;
    }
    let t = tape.tokens.len();
    // Gradient of the residual stream, flowing down through the layers.
    let mut dh = vec![R::ZERO; t * hid];
    for (src, &r) in dsel.chunks_exact(hid).zip(&tape.logit_rows) {
        add_into(&mut dh[r * hid..(r + 1) * hid], src);
    }
    for l in (first..n_layers).rev() {
        layer_backward(w, kern, tape, l, &mut dh, grads);
    }
    if first == 0 {
        if let Some(g) = grads.slot(w.embed) {
            embedding_backward(g, hid, &tape.tokens, &dh);
        }
    }
}

/// Backward through decoder layer `l`: `dh` enters as the gradient of the layer's output stream
/// and leaves as that of its input.
fn layer_backward<R: Real>(
    w: &TrainWeights<R>,
    kern: &Kernels,
    tape: &Tape<R>,
    l: usize,
    dh: &mut [R],
    grads: &mut Grads<R>,
) {
    let c = &w.config;
    let (hid, qd, kvd, inter) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
    let level = kern.level;
    let eps = R::from_f64(c.rms_norm_eps as f32 as f64);
    let shape = AttentionShape {
        n_heads: c.num_attention_heads,
        n_kv_heads: c.num_key_value_heads,
        head_dim: c.head_dim,
    };
    let t = tape.tokens.len();
    let ids = &w.layers[l];
    let lt = &tape.layers[l];
    let mut scratch_inv = vec![R::ZERO; t];

    // MLP: h_out = h_mid + down(silu(gate) ⊙ up), gate/up = Linear(RMSNorm(h_mid)). The
    // residual passes dh through unchanged and hands the branch the same dh.
    let mut xn = vec![R::ZERO; t * hid];
    let w_mlp_norm = w.value(ids.mlp_norm);
    rms_norm_forward(level, &lt.h_mid, w_mlp_norm, eps, &mut xn, &mut scratch_inv);
    let mut act = vec![R::ZERO; t * inter];
    silu_gate_forward(&lt.gate, &lt.up, &mut act);
    if let Some(g) = grads.slot(ids.down) {
        linear_backward_weight(kern, &act, t, inter, dh, hid, g);
    }
    let mut dact = vec![R::ZERO; t * inter];
    linear_backward_input(
        kern,
        dh,
        t,
        hid,
        w.transposed(kern, ids.down),
        inter,
        &mut dact,
    );
    drop(act);
    let mut dgate = vec![R::ZERO; t * inter];
    let mut dup = vec![R::ZERO; t * inter];
    silu_gate_backward(&lt.gate, &lt.up, &dact, &mut dgate, &mut dup);
    drop(dact);
    if let Some(g) = grads.slot(ids.gate) {
        linear_backward_weight(kern, &xn, t, hid, &dgate, inter, g);
    }
    if let Some(g) = grads.slot(ids.up) {
        linear_backward_weight(kern, &xn, t, hid, &dup, inter, g);
    }
    let mut dxn = vec![R::ZERO; t * hid];
    linear_backward_input(
        kern,
        &dgate,
        t,
        inter,
        w.transposed(kern, ids.gate),
        hid,
        &mut dxn,
    );
    linear_backward_input(
        kern,
        &dup,
        t,
        inter,
        w.transposed(kern, ids.up),
        hid,
        &mut dxn,
    );
    drop((dgate, dup));
    rms_norm_backward(
        level,
        &lt.h_mid,
        w_mlp_norm,
        &lt.inv_rms_mlp,
        &dxn,
        dh,
        grads.slot(ids.mlp_norm),
    );

    // Attention: h_mid = h_in + o(attention(rope(q), rope(k), v)), q/k/v = Linear(RMSNorm(h_in)).
    if let Some(g) = grads.slot(ids.o) {
        linear_backward_weight(kern, &lt.att, t, qd, dh, hid, g);
    }
    let mut datt = vec![R::ZERO; t * qd];
    linear_backward_input(kern, dh, t, hid, w.transposed(kern, ids.o), qd, &mut datt);
    let mut dq = vec![R::ZERO; t * qd];
    let mut dk = vec![R::ZERO; t * kvd];
    let mut dv = vec![R::ZERO; t * kvd];
    attention_backward(
        kern, shape, t, &lt.q, &lt.k, &lt.v, &lt.probs, &datt, &mut dq, &mut dk, &mut dv,
    );
    drop(datt);
    rope_backward(&tape.rope, &mut dq, qd);
    rope_backward(&tape.rope, &mut dk, kvd);
    let w_attn_norm = w.value(ids.attn_norm);
    rms_norm_forward(level, &lt.h_in, w_attn_norm, eps, &mut xn, &mut scratch_inv);
    dxn.fill(R::ZERO);
    let projections = [(ids.q, &dq, qd), (ids.k, &dk, kvd), (ids.v, &dv, kvd)];
    for (j, &(id, dy, width)) in projections.iter().enumerate() {
        if let Some(g) = grads.slot(id) {
            linear_backward_weight(kern, &xn, t, hid, dy, width, g);
        }
        if let Some(g) = ids.qkv_bias.and_then(|b| grads.slot(b[j])) {
            linear_backward_bias(dy, width, g);
        }
        linear_backward_input(kern, dy, t, width, w.transposed(kern, id), hid, &mut dxn);
    }
    rms_norm_backward(
        level,
        &lt.h_in,
        w_attn_norm,
        &lt.inv_rms_attn,
        &dxn,
        dh,
        grads.slot(ids.attn_norm),
    );
}
