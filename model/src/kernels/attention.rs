//! Causal attention over K/V read through the [`KvCache`] trait.
//!
//! For each query token and head: scores s_j = (q · k_j) · scale with the striped dot, p = softmax
//! in position order, out = Σ_j p_j v_j accumulated with a fused multiply-add per position in
//! order, rounded to the run dtype. Pages only change where k_j and v_j are read from.

use super::dot::dot;
use super::math::exp;
use super::{split_range, Kernels, SimdLevel};
use crate::dtype::Elem;
use crate::kv::KvCache;

/// Shape of the attention: heads, K/V heads (GQA), head dimension.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (divides `n_heads`).
    pub n_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: threads write disjoint (token, head) slices of the output.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    // A method call makes closures capture the whole wrapper (Sync), not its raw field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Attention for a batch of query tokens; token `i` belongs to sequence `seqs[i]` at position
/// `positions[i]` and attends to positions `0..=positions[i]` of that sequence in `layer`.
/// `q` is tokens × (n_heads·head_dim); `out` has the same shape.
#[allow(clippy::too_many_arguments)]
pub fn attention<T: Elem>(
    kern: &Kernels,
    shape: AttentionShape,
    layer: usize,
    q: &[f32],
    seqs: &[usize],
    positions: &[usize],
    kv: &dyn KvCache<T>,
    out: &mut [f32],
) {
    let AttentionShape {
        n_heads,
        n_kv_heads,
        head_dim,
    } = shape;
    let q_dim = n_heads * head_dim;
    let n_tok = seqs.len();
    assert_eq!(q.len(), n_tok * q_dim);
    assert_eq!(out.len(), n_tok * q_dim);
    assert_eq!(positions.len(), n_tok);
    let pairs = n_tok * n_heads;
    let work: usize = positions.iter().map(|p| p + 1).sum::<usize>() * n_heads * head_dim;
    let threads = if work < 1 << 14 {
        1
    } else {
        kern.pool.threads()
    };
    let ranges = split_range(pairs, threads, 1);
    let op = OutPtr(out.as_mut_ptr());
    let level = kern.level;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let job = |t: usize| {
        let mut scores = Vec::new();
        let mut acc = vec![0f32; head_dim];
        for pair in ranges[t].clone() {
            let (i, h) = (pair / n_heads, pair % n_heads);
            let kvh = h / (n_heads / n_kv_heads);
            let qh = &q[i * q_dim + h * head_dim..i * q_dim + (h + 1) * head_dim];
            head_attention(
                level,
                shape,
                layer,
                qh,
                seqs[i],
                positions[i] + 1,
                kvh,
                scale,
                kv,
                &mut scores,
                &mut acc,
            );
            // SAFETY: pair (i, h) owns this slice of `out`.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(op.get().add(i * q_dim + h * head_dim), head_dim)
            };
            for (d, &a) in dst.iter_mut().zip(&acc) {
                *d = T::round(a);
            }
        }
    };
    if threads == 1 {
        job(0);
    } else {
        kern.pool.run(&job);
    }
}

#[allow(clippy::too_many_arguments)]
fn head_attention<T: Elem>(
    level: SimdLevel,
    shape: AttentionShape,
    layer: usize,
    qh: &[f32],
    seq: usize,
    len: usize,
    kvh: usize,
    scale: f32,
    kv: &dyn KvCache<T>,
    scores: &mut Vec<f32>,
    acc: &mut [f32],
) {
    let hd = shape.head_dim;
    let kv_dim = shape.n_kv_heads * hd;
    scores.clear();
    scores.resize(len, 0.0);
    kv.read(layer, seq, len, &mut |p0, keys, _| {
        for (i, key) in keys.chunks_exact(kv_dim).enumerate() {
            scores[p0 + i] = dot(level, qh, &key[kvh * hd..(kvh + 1) * hd]) * scale;
        }
    });
    let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = exp(*s - m);
        sum += *s;
    }
    for s in scores.iter_mut() {
        *s /= sum;
    }
    acc.fill(0.0);
    kv.read(layer, seq, len, &mut |p0, _, values| {
        for (i, val) in values.chunks_exact(kv_dim).enumerate() {
            axpy(level, scores[p0 + i], &val[kvh * hd..(kvh + 1) * hd], acc);
        }
    });
}

/// y[d] = fma(a, x[d], y[d]) for every d (elementwise, so every SIMD width gives the same bits).
#[inline]
pub fn axpy<T: Elem>(level: SimdLevel, a: f32, x: &[T], y: &mut [f32]) {
    assert_eq!(x.len(), y.len());
    match level {
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 | SimdLevel::Avx2 => unsafe { axpy_avx2(a, x, y) },
        _ => {
            for (yv, &xv) in y.iter_mut().zip(x) {
                *yv = a.mul_add(xv.to_f32(), *yv);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn axpy_avx2<T: Elem>(a: f32, x: &[T], y: &mut [f32]) {
    use super::dot::x86::load8_256;
    use std::arch::x86_64::*;
    let n = x.len();
    let full = n - n % 8;
    let av = _mm256_set1_ps(a);
    let mut i = 0;
    while i < full {
        let yp = y.as_mut_ptr().add(i);
        let r = _mm256_fmadd_ps(av, load8_256(x.as_ptr().add(i)), _mm256_loadu_ps(yp));
        _mm256_storeu_ps(yp, r);
        i += 8;
    }
    for j in full..n {
        y[j] = a.mul_add(x[j].to_f32(), y[j]);
    }
}
