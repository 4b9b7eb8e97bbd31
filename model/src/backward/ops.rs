//! Every op of the decoder as a forward/backward pair, side by side, generic over [`Real`].
//! Backward functions *add* into their gradient buffers.

use super::{add_into, lock, transpose_padded, Real, PARALLEL_MIN_WORK};
use crate::kernels::attention::AttentionShape;
use crate::kernels::dot::LANES;
use crate::kernels::rope::Rope;
use crate::kernels::{split_range, Kernels, SimdLevel};
use std::sync::Mutex;

/// Elements of the scratch block a weight gradient is computed in before it is added.
const GRAD_BLOCK: usize = 1 << 16;

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
    rotate(table, x, width, false);
}

/// The gradient of [`rope_forward`] in place: the transpose of a rotation is the inverse
/// rotation, (da, db) → (da·cos + db·sin, db·cos − da·sin).
pub fn rope_backward<R: Real>(table: &RopeTable<R>, dx: &mut [R], width: usize) {
    rotate(table, dx, width, true);
}

/// Rotates every head by its position's angle, or by minus that angle when `inverse`.
fn rotate<R: Real>(table: &RopeTable<R>, x: &mut [R], width: usize, inverse: bool) {
    let rows = table.rows_of(x, width);
    let half = table.head_dim / 2;
    for (p, row) in x[..rows * width].chunks_exact_mut(width).enumerate() {
        let c = &table.cos[p * half..(p + 1) * half];
        let s = &table.sin[p * half..(p + 1) * half];
        for head in row.chunks_exact_mut(table.head_dim) {
            let (a, b) = head.split_at_mut(half);
            for i in 0..half {
                let (x0, x1) = (a[i], b[i]);
                let si = if inverse { -s[i] } else { s[i] };
                a[i] = x0 * c[i] - x1 * si;
                b[i] = x1 * c[i] + x0 * si;
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
