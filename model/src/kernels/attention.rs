//! Causal attention over K/V read through the [`KvCache`] trait.
//!
//! For each query token and head: scores s_j = (q · k_j) · scale with the striped dot, p = softmax
//! in position order, out = Σ_j p_j v_j accumulated with a fused multiply-add per position in
//! order, rounded to the run dtype. Pages only change where k_j and v_j are read from.

use super::dot::dot;
use super::math::exp;
use super::pool::SpinBarrier;
use super::{part_range, Kernels, SimdLevel};
use crate::dtype::Elem;
use crate::kv::KvCache;

/// Mean positions per query token from which a few tokens are shared by all threads (see
/// [`attention`]).
const SHARED_MIN_LEN: usize = 96;

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
    // Threads write disjoint (token, head) slices of the output.
    let op = super::SharedOut::new(out);
    let level = kern.level;
    let scale = 1.0 / (head_dim as f32).sqrt();
    #[cfg(target_arch = "x86_64")]
    let avx512 = level >= SimdLevel::Avx512;
    #[cfg(target_arch = "x86_64")]
    if level >= SimdLevel::Avx2
        && n_heads.is_multiple_of(n_kv_heads)
        && head_dim <= 256
        && (avx512 || head_dim.is_multiple_of(8))
    {
        let mean_len = positions.iter().map(|p| p + 1).sum::<usize>() / n_tok.max(1);
        if avx512
            && threads > 1
            && n_tok < 4 * threads
            && mean_len >= SHARED_MIN_LEN
            && head_dim.is_multiple_of(16)
        {
            // Few tokens with long contexts (decode of a few sequences): all threads work on
            // each token in turn, each scoring a range of its positions over all K/V heads,
            // so every thread reads whole rows of the cache in order. One item per (token,
            // K/V head) instead has each thread read a third of every row, and spreads 3 K/V
            // heads over 2 threads as 2 + 1. Measured on Zen 4 (cold paged f16 K/V, 2
            // threads, alternating in one run), µs per layer: 1 token at 256 positions 19-22
            // → 14-16, at 1024 71-97 → 48-57, at 4096 347-366 → 173-216; 2 tokens at 1024 143
            // → 94, 7 at 200 153 → 126. Below about 96 positions the barriers cost more than
            // the reads save (2-7 tokens at 64: 15-25% slower).
            let max_len = positions.iter().max().map_or(0, |p| p + 1);
            SHARED_SCORES.with(|cell| {
                let mut buf = cell.borrow_mut();
                // Every score is written before it is read: grow, never clear.
                if buf.len() < n_heads * max_len {
                    buf.resize(n_heads * max_len, 0.0);
                }
                let scores = super::SharedOut::new(&mut buf[..]);
                let barrier = SpinBarrier::new(threads);
                let job = |t: usize| {
                    let _guard = barrier.guard();
                    SCRATCH.with(|cell| {
                        let scratch = &mut *cell.borrow_mut();
                        for i in 0..n_tok {
                            if i > 0 {
                                // The last token's weighted values are done with the scores.
                                barrier.wait();
                            }
                            let qi = &q[i * q_dim..(i + 1) * q_dim];
                            // SAFETY: AVX-512 at this level and whole-chunk heads, checked
                            // above; `scores` holds n_heads × len and token i's slice of `out`
                            // n_heads × head_dim, both used only by this call's threads.
                            unsafe {
                                x86::shared_token::<T>(
                                    shape,
                                    layer,
                                    qi,
                                    seqs[i],
                                    positions[i] + 1,
                                    scale,
                                    kv,
                                    scratch,
                                    scores.get(),
                                    op.get().add(i * q_dim),
                                    (t, threads),
                                    &barrier,
                                );
                            }
                        }
                    });
                };
                kern.pool.run(&job);
            });
            return;
        }
        // A work item is a token with all its K/V heads when there are enough tokens (each
        // block of the cache is then read whole, in order), else one (token, K/V head) pair.
        // Either way the query heads sharing a K/V head read each block once.
        let group = n_heads / n_kv_heads;
        let per_item = if n_tok >= 4 * threads { n_kv_heads } else { 1 };
        let slices = n_kv_heads / per_item;
        let items = n_tok * slices;
        // Threads take items one at a time: a thread held up (by the host, an interrupt) then
        // leaves its remaining items to the others instead of keeping them waiting.
        let next = std::sync::atomic::AtomicUsize::new(0);
        let job = |_: usize| {
            SCRATCH.with(|cell| {
                let scratch = &mut *cell.borrow_mut();
                loop {
                    let item = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if item >= items {
                        break;
                    }
                    let (i, kvh0) = (item / slices, (item % slices) * per_item);
                    let off = i * q_dim + kvh0 * group * head_dim;
                    let width = per_item * group * head_dim;
                    // SAFETY: item (i, kvh0..) owns these heads' slice of `out`; AVX2 is
                    // available at this level, AVX-512 where `avx512` says so.
                    unsafe {
                        let dst = std::slice::from_raw_parts_mut(op.get().add(off), width);
                        x86::group_attention::<T>(
                            shape,
                            layer,
                            &q[off..off + width],
                            seqs[i],
                            positions[i] + 1,
                            kvh0..kvh0 + per_item,
                            scale,
                            kv,
                            scratch,
                            dst,
                            avx512,
                        );
                    }
                }
            });
        };
        if threads == 1 || items == 1 {
            job(0);
        } else {
            kern.pool.run(&job);
        }
        return;
    }
    let job = |t: usize| {
        SCRATCH.with(|cell| {
            let Scratch {
                scores, kbuf: acc, ..
            } = &mut *cell.borrow_mut();
            acc.clear();
            acc.resize(head_dim, 0.0);
            for pair in part_range(pairs, threads, 1, t) {
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
                    scores,
                    acc,
                );
                // SAFETY: pair (i, h) owns this slice of `out`.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(op.get().add(i * q_dim + h * head_dim), head_dim)
                };
                for (d, &a) in dst.iter_mut().zip(acc.iter()) {
                    *d = T::round(a);
                }
            }
        });
    };
    if threads == 1 {
        job(0);
    } else {
        kern.pool.run(&job);
    }
}

/// Per-thread buffers of the attention kernels, kept between calls (the pool's threads live as
/// long as the process): a decode step allocates nothing.
#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    qpad: Vec<f32>,
    kbuf: Vec<f32>,
    /// Row sums of the softmax.
    sums: Vec<f32>,
    /// The allocation behind a work item's list of K/V runs, kept empty between items.
    runs: Vec<(usize, &'static [u8], &'static [u8])>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = Default::default();
    /// The calling thread's scores of one token, shared with the pool threads (see
    /// `x86::shared_token`).
    static SHARED_SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `v`'s allocation as an empty vector of `B`, an element type of the same size and alignment
/// (the runs of K/V slices of any dtype and lifetime share one buffer this way).
fn recycle<A, B>(mut v: Vec<A>) -> Vec<B> {
    const {
        assert!(
            std::mem::size_of::<A>() == std::mem::size_of::<B>()
                && std::mem::align_of::<A>() == std::mem::align_of::<B>()
        )
    };
    v.clear();
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: the allocation was made for `capacity` elements of `A`, which is the same layout
    // as `capacity` elements of `B`; the new vector is empty, so no `A` is read as a `B`.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<B>(), 0, v.capacity()) }
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

/// The AVX-512 and AVX2 paths: the same definition as [`head_attention`] (same bits), organised
/// for throughput. Scores of 16 keys (8 with AVX2) are reduced together by a transposing tree
/// that performs, per key, exactly the additions of the striped dot's fixed tree; exp and the
/// division run 16 (8) wide; the weighted sum of values keeps every head's accumulators in
/// registers and adds positions in order with one fused multiply-add each.
#[cfg(target_arch = "x86_64")]
// Register tiles index accumulators by (head, chunk); iterator chains would hide that.
#[allow(clippy::needless_range_loop)]
mod x86 {
    use super::super::dot::x86::{lanes, load16_512, reduce16x16, round_f16_512};
    use super::super::math::x86::exp512;
    use super::*;
    use crate::dtype::ElemKind;
    use std::arch::x86_64::*;

    /// Attention of the query heads (`qg`, contiguous) of K/V heads `kvhs`, with the AVX-512
    /// kernels where `avx512` says so, else the AVX2 ones.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C, and AVX-512 (F, BW, VL) when `avx512` is set.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn group_attention<T: Elem>(
        shape: AttentionShape,
        layer: usize,
        qg: &[f32],
        seq: usize,
        len: usize,
        kvhs: std::ops::Range<usize>,
        scale: f32,
        kv: &dyn KvCache<T>,
        scratch: &mut Scratch,
        out: &mut [f32],
        avx512: bool,
    ) {
        // Keys scored together: one transposing reduction's worth.
        let block = if avx512 { 16 } else { 8 };
        let hd = shape.head_dim;
        let heads = qg.len() / hd;
        let g = heads / kvhs.len();
        let kv_dim = shape.n_kv_heads * hd;
        let hdp = hd.div_ceil(16) * 16;
        let Scratch {
            scores,
            qpad,
            kbuf,
            sums,
            runs: spare,
        } = scratch;
        // Queries zero-padded to whole chunks: padded lanes add fma(0, 0, acc) = acc, exactly
        // as the striped dot pads its tail.
        qpad.clear();
        qpad.resize(heads * hdp, 0.0);
        for h in 0..heads {
            qpad[h * hdp..h * hdp + hd].copy_from_slice(&qg[h * hd..(h + 1) * hd]);
        }
        // Every key slot and score is written before it is read: grow, never clear.
        if kbuf.len() < block * hdp {
            kbuf.resize(block * hdp, 0.0);
        }
        if scores.len() < heads * len {
            scores.resize(heads * len, 0.0);
        }
        let mut runs: Vec<(usize, &[T], &[T])> = recycle(std::mem::take(spare));
        kv.read(layer, seq, len, &mut |p0, k, v| runs.push((p0, k, v)));
        {
            let kbuf = &mut kbuf[..block * hdp];
            let at = scores[..heads * len].as_mut_ptr();
            score_runs(
                &runs,
                &qpad[..],
                hd,
                g,
                kv_dim,
                kvhs.clone(),
                scale,
                len,
                0..len,
                kbuf,
                at,
                avx512,
            );
        }
        if avx512 {
            softmax_rows(&mut scores[..heads * len], len, sums);
        } else {
            avx2::softmax_rows(&mut scores[..heads * len], len, sums);
        }
        for (s, kvh) in kvhs.enumerate() {
            let probs = &scores[s * g * len..(s + 1) * g * len];
            let dst = out[s * g * hd..(s + 1) * g * hd].as_mut_ptr();
            if avx512 {
                weighted_values::<T>(&runs, probs, hd, hdp, g, kv_dim, kvh, len, 0..hdp / 16, dst);
            } else {
                let dst = std::slice::from_raw_parts_mut(dst, g * hd);
                avx2::weighted_values::<T>(&runs, probs, hd, g, kv_dim, kvh, len, dst);
            }
        }
        *spare = recycle(runs);
    }

    /// Thread `t` of `threads`' part of one query token's attention over all K/V heads, the
    /// threads running it together (see [`attention`]): the scores of a range of positions,
    /// then (after a barrier) the softmax of a range of heads, then (after another) the
    /// weighted values of a range of (K/V head, 16 dims). Every score, sum and output lane is
    /// still computed whole, in the same order, by one thread: the bits of
    /// [`group_attention`].
    ///
    /// # Safety
    /// The CPU has AVX-512 (F, BW, VL), AVX2, FMA and F16C; `head_dim` is a multiple of 16;
    /// `scores` holds `n_heads · len` values and `out` `n_heads · head_dim`, shared by the
    /// threads and touched only here until the call returns.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn shared_token<T: Elem>(
        shape: AttentionShape,
        layer: usize,
        q: &[f32],
        seq: usize,
        len: usize,
        scale: f32,
        kv: &dyn KvCache<T>,
        scratch: &mut Scratch,
        scores: *mut f32,
        out: *mut f32,
        (t, threads): (usize, usize),
        barrier: &SpinBarrier,
    ) {
        let hd = shape.head_dim;
        let heads = shape.n_heads;
        let nkv = shape.n_kv_heads;
        let g = heads / nkv;
        let kv_dim = nkv * hd;
        let chunks = hd / 16;
        let Scratch {
            runs: spare, sums, ..
        } = scratch;
        let mut runs: Vec<(usize, &[T], &[T])> = recycle(std::mem::take(spare));
        kv.read(layer, seq, len, &mut |p0, k, v| runs.push((p0, k, v)));
        let mine = part_range(len, threads, 16, t);
        if !mine.is_empty() {
            // Whole-chunk heads need no padding: the queries are read in place.
            score_runs(
                &runs,
                q,
                hd,
                g,
                kv_dim,
                0..nkv,
                scale,
                len,
                mine,
                &mut [],
                scores,
                true,
            );
        }
        barrier.wait();
        let rows = part_range(heads, threads, 1, t);
        if !rows.is_empty() {
            let s = std::slice::from_raw_parts_mut(scores.add(rows.start * len), rows.len() * len);
            softmax_rows(s, len, sums);
        }
        barrier.wait();
        let probs = std::slice::from_raw_parts(scores, heads * len);
        let units = part_range(nkv * chunks, threads, 1, t);
        for kvh in 0..nkv {
            let (a, b) = (
                units.start.max(kvh * chunks),
                units.end.min((kvh + 1) * chunks),
            );
            if a < b {
                let group = &probs[kvh * g * len..(kvh + 1) * g * len];
                let cols = a - kvh * chunks..b - kvh * chunks;
                let dst = out.add(kvh * g * hd);
                weighted_values::<T>(&runs, group, hd, hd, g, kv_dim, kvh, len, cols, dst);
            }
        }
        *spare = recycle(runs);
    }

    /// Scores of positions `range` of K/V heads `kvhs` for their query heads (`qpad`, `g`
    /// per K/V head, each padded to whole chunks), stored from `at` (head h's row `len`
    /// further on each); the AVX-512 kernels where `avx512` says so, else the AVX2 ones.
    /// `kbuf` holds one block of widened keys where the keys are not read in place.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C, and AVX-512 (F, BW, VL) where `avx512` says so. `at`
    /// holds `kvhs.len() · g` rows of `len` scores; other threads may write other positions
    /// of them only on the in-place path (AVX-512, whole-chunk heads), which writes through
    /// the pointer alone.
    #[allow(clippy::too_many_arguments)]
    unsafe fn score_runs<T: Elem>(
        runs: &[(usize, &[T], &[T])],
        qpad: &[f32],
        hd: usize,
        g: usize,
        kv_dim: usize,
        kvhs: std::ops::Range<usize>,
        scale: f32,
        len: usize,
        range: std::ops::Range<usize>,
        kbuf: &mut [f32],
        at: *mut f32,
        avx512: bool,
    ) {
        let hdp = hd.div_ceil(16) * 16;
        // The rows of each run inside `range`, as (first position, keys, values).
        let mut runs = runs
            .iter()
            .filter_map(|&(p0, k, v)| {
                let n = k.len() / kv_dim;
                let (a, b) = (range.start.max(p0), range.end.min(p0 + n));
                if a >= b {
                    return None;
                }
                let rows = (a - p0) * kv_dim..(b - p0) * kv_dim;
                Some((a, &k[rows.clone()], &v[rows]))
            })
            .peekable();
        if let Some(&(_, k, v)) = runs.peek() {
            prefetch_rows(k, kv_dim, kvhs.start * hd, kvhs.len() * hd);
            prefetch_rows(v, kv_dim, kvhs.start * hd, kvhs.len() * hd);
        }
        // Keys read in place, converted in the inner loop, 8 at a time for up to 3 heads (see
        // `score_keys`); other head widths go through the key buffer.
        let block = if avx512 { 16 } else { 8 };
        let in_place = avx512 && hd.is_multiple_of(16);
        let step = if in_place { 8 } else { block };
        let mut pending = Pending::default();
        while let Some((p0, keys, _)) = runs.next() {
            // Pages are scattered: fetch the next run's keys and values while this one
            // computes (the hardware prefetchers do not cross into another page). The
            // AVX-512 path asks for them into L2 a few lines per key scored; AVX2 asks
            // for them all at once.
            let n = keys.len() / kv_dim;
            // Keys scored in this run, counted once per K/V head: the pace of `ahead`.
            let slots = n * kvhs.len();
            let mut ahead = Ahead::default();
            if let Some(&(_, nk, nv)) = runs.peek() {
                if avx512 {
                    ahead = Ahead::new(nk, nv, kv_dim, kvhs.start * hd, kvhs.len() * hd, slots);
                } else {
                    prefetch_rows(nk, kv_dim, kvhs.start * hd, kvhs.len() * hd);
                    prefetch_rows(nv, kv_dim, kvhs.start * hd, kvhs.len() * hd);
                }
            }
            let mut b = 0;
            while b < n {
                let nb = (n - b).min(step);
                for (s, kvh) in kvhs.clone().enumerate() {
                    let sb = ScoreBlock {
                        qpad: &qpad[s * g * hdp..(s + 1) * g * hdp],
                        hd,
                        hdp,
                        g,
                        kv_dim,
                        kvh,
                        scale,
                        len,
                    };
                    // This K/V head's query heads' rows of scores.
                    let dst = at.add(s * g * len);
                    if in_place {
                        let keys = &keys[b * kv_dim + kvh * hd..];
                        score_keys(sb, keys, nb, dst.add(p0 + b), &mut ahead, &mut pending);
                    } else {
                        // Only one thread scores a work item off the in-place path.
                        let dst = std::slice::from_raw_parts_mut(dst, g * len);
                        if avx512 {
                            score_block(sb, keys, b, nb, kbuf, dst, p0 + b, &mut ahead);
                        } else {
                            avx2::score_block(sb, keys, b, nb, kbuf, dst, p0 + b)
                        }
                    }
                }
                b += nb;
            }
        }
        // Only `score_keys` (AVX-512) leaves a row pending; `flush` is AVX-512 code, so
        // the AVX2 path must not call it even when nothing is pending.
        if avx512 {
            pending.flush(scale);
        }
    }

    /// What [`score_block`] needs of the work item: its queries and shapes.
    #[derive(Clone, Copy)]
    struct ScoreBlock<'a> {
        /// The group's queries, each zero-padded to `hdp`.
        qpad: &'a [f32],
        hd: usize,
        hdp: usize,
        /// Query heads in the group.
        g: usize,
        kv_dim: usize,
        kvh: usize,
        scale: f32,
        /// Positions attended (row length of the scores).
        len: usize,
    }

    /// Prefetches columns `start..start + width` of every `row`-wide row of `rows` into L1.
    #[inline]
    unsafe fn prefetch_rows<T: Elem>(rows: &[T], row: usize, start: usize, width: usize) {
        let bytes = width * std::mem::size_of::<T>();
        for r in 0..rows.len() / row {
            let p = rows.as_ptr().wrapping_add(r * row + start) as *const i8;
            for off in (0..bytes).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off));
            }
        }
    }

    /// The next run's keys and values, asked for into L2 a few lines at a time while the
    /// current run is scored.
    ///
    /// Measured on Zen 4 (64 decode rows × 200 positions from DRAM): asking for a whole run at
    /// once into L1 leaves the core waiting on its miss buffers, and attention took 900–1030
    /// µs per layer; spread over the keys into L2, 580–700 µs.
    #[derive(Default)]
    struct Ahead {
        keys: usize,
        values: usize,
        /// Bytes from one row to the next.
        stride: usize,
        /// Cache lines asked for per row, and in all.
        per_row: usize,
        lines: usize,
        issued: usize,
        /// Keys of the current run still to be scored, counted once per K/V head.
        slots: usize,
        /// `lines · steps mod slots`: carries the fraction of a line owed between steps.
        owed: usize,
        /// Where the next line is: its row's offset, and the line within that row.
        row_off: usize,
        in_row: usize,
    }

    impl Ahead {
        /// Columns `start..start + width` of every `row`-wide row of `keys` and `values`, asked
        /// for evenly over `slots` calls of [`Ahead::step`].
        fn new<T: Elem>(
            keys: &[T],
            values: &[T],
            row: usize,
            start: usize,
            width: usize,
            slots: usize,
        ) -> Ahead {
            let size = std::mem::size_of::<T>();
            let per_row = (width * size).div_ceil(64);
            Ahead {
                keys: keys.as_ptr() as usize + start * size,
                values: values.as_ptr() as usize + start * size,
                stride: row * size,
                per_row,
                lines: keys.len() / row * per_row,
                slots: slots.max(1),
                ..Ahead::default()
            }
        }

        /// One more key scored: asks for the lines that bring the total to
        /// `lines · steps / slots`. Counted without a division: one per key cost as much as
        /// the key's multiply-adds.
        #[inline]
        unsafe fn step(&mut self) {
            self.owed += self.lines;
            while self.owed >= self.slots && self.issued < self.lines {
                self.owed -= self.slots;
                let off = self.row_off + self.in_row * 64;
                _mm_prefetch::<_MM_HINT_T2>((self.keys + off) as *const i8);
                _mm_prefetch::<_MM_HINT_T2>((self.values + off) as *const i8);
                self.issued += 1;
                self.in_row += 1;
                if self.in_row == self.per_row {
                    self.in_row = 0;
                    self.row_off += self.stride;
                }
            }
        }
    }

    /// Σ_j p[h][j] · v_j for the `g` heads of K/V head `kvh`, 16-lane chunks `cols` of the
    /// head dims, rounded to `T` into `out` (head h's row `hd` further on each).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn weighted_values<T: Elem>(
        runs: &[(usize, &[T], &[T])],
        scores: &[f32],
        hd: usize,
        hdp: usize,
        g: usize,
        kv_dim: usize,
        kvh: usize,
        len: usize,
        cols: std::ops::Range<usize>,
        out: *mut f32,
    ) {
        debug_assert!(cols.end <= hdp / 16);
        // Heads in groups of up to 4, head dims in passes of up to 4 chunks.
        let mut h0 = 0;
        while h0 < g {
            let hg = (g - h0).min(4);
            let mut c0 = cols.start;
            while c0 < cols.end {
                let pw = match cols.end - c0 {
                    1 => 1,
                    2 | 3 => 2,
                    _ => 4,
                };
                let args = PvArgs {
                    hd,
                    kv_dim,
                    kvh,
                    len,
                    h0,
                    c0,
                };
                match (hg, pw) {
                    (1, 4) => pv::<T, 1, 4>(runs, scores, args, out),
                    (2, 4) => pv::<T, 2, 4>(runs, scores, args, out),
                    (3, 4) => pv::<T, 3, 4>(runs, scores, args, out),
                    (4, 4) => pv::<T, 4, 4>(runs, scores, args, out),
                    (1, 2) => pv::<T, 1, 2>(runs, scores, args, out),
                    (2, 2) => pv::<T, 2, 2>(runs, scores, args, out),
                    (3, 2) => pv::<T, 3, 2>(runs, scores, args, out),
                    (4, 2) => pv::<T, 4, 2>(runs, scores, args, out),
                    (1, _) => pv::<T, 1, 1>(runs, scores, args, out),
                    (2, _) => pv::<T, 2, 1>(runs, scores, args, out),
                    (3, _) => pv::<T, 3, 1>(runs, scores, args, out),
                    _ => pv::<T, 4, 1>(runs, scores, args, out),
                }
                c0 += pw;
            }
            h0 += hg;
        }
    }

    /// Scores of keys `b..b + nb` (≤ 16) of one run for every head of the group, stored at
    /// positions `pos..pos + nb`; `ahead` takes a step per key on the way.
    #[inline]
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn score_block<T: Elem>(
        sb: ScoreBlock<'_>,
        keys: &[T],
        b: usize,
        nb: usize,
        kbuf: &mut [f32],
        scores: &mut [f32],
        pos: usize,
        ahead: &mut Ahead,
    ) {
        let ScoreBlock {
            qpad,
            hd,
            hdp,
            g,
            kv_dim,
            kvh,
            scale,
            len,
        } = sb;
        let chunks = hdp / 16;
        // Key j goes to slot (j % 4) * 4 + j / 4 so that the transposing tree leaves the score
        // of key j in lane j. Slots of missing keys stay zero.
        for j in 0..16 {
            let slot = (j % 4) * 4 + j / 4;
            let dst = kbuf.as_mut_ptr().add(slot * hdp);
            if j < nb {
                ahead.step();
                let src = keys.as_ptr().add((b + j) * kv_dim + kvh * hd);
                let full = hd / 16;
                for c in 0..full {
                    _mm512_storeu_ps(dst.add(c * 16), load16_512(src.add(c * 16)));
                }
                for d in full * 16..hd {
                    *dst.add(d) = (*src.add(d)).to_f32();
                }
                for d in hd..hdp {
                    *dst.add(d) = 0.0;
                }
            } else {
                for c in 0..chunks {
                    _mm512_storeu_ps(dst.add(c * 16), _mm512_setzero_ps());
                }
            }
        }
        let kp = kbuf.as_ptr();
        for h in 0..g {
            let qp = qpad.as_ptr().add(h * hdp);
            let mut acc = [_mm512_setzero_ps(); 16];
            for c in 0..chunks {
                let qv = _mm512_loadu_ps(qp.add(c * 16));
                for s in 0..16 {
                    acc[s] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(kp.add(s * hdp + c * 16)), acc[s]);
                }
            }
            let r = _mm512_mul_ps(reduce16x16(&acc), _mm512_set1_ps(scale));
            _mm512_mask_storeu_ps(scores.as_mut_ptr().add(h * len + pos), lanes(nb), r);
        }
    }

    /// Up to 8 keys' scores of one head, waiting for a second such row to share a transposing
    /// reduction: the dot partials of each key, where they go, and how many keys there are.
    struct Row {
        sums: [__m512; 8],
        dst: *mut f32,
        n: usize,
    }

    /// The row waiting for its partner in [`score_keys`]; flushed once a work item is scored.
    #[derive(Default)]
    struct Pending(Option<Row>);

    impl Pending {
        /// Adds `row`: reduces it with the waiting one, or waits.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
        unsafe fn push(&mut self, row: Row, scale: f32) {
            match self.0.take() {
                Some(first) => store_rows(&first, Some(&row), scale),
                None => self.0 = Some(row),
            }
        }

        /// Stores a row still waiting, reduced alone.
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
        unsafe fn flush(&mut self, scale: f32) {
            if let Some(row) = self.0.take() {
                store_rows(&row, None, scale);
            }
        }
    }

    /// Scores of two rows (or one) through one transposing reduction: lanes 0..8 of it are row
    /// `a`'s keys, lanes 8..16 row `b`'s; each key's sum is its own fixed tree either way.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn store_rows(a: &Row, b: Option<&Row>, scale: f32) {
        let mut v = [_mm512_setzero_ps(); 16];
        for o in 0..16 {
            // Lane o of the reduction is the sum of v[(o % 4) · 4 + o / 4].
            let src = if o < 8 {
                a.sums[o]
            } else if let Some(b) = b {
                b.sums[o - 8]
            } else {
                continue;
            };
            v[(o % 4) * 4 + o / 4] = src;
        }
        let r = _mm512_mul_ps(reduce16x16(&v), _mm512_set1_ps(scale));
        _mm512_mask_storeu_ps(a.dst, lanes(a.n), r);
        if let Some(b) = b {
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(r)));
            _mm256_mask_storeu_ps(b.dst, lanes(b.n) as __mmask8, hi);
        }
    }

    /// Scores of the `nb` (≤ 8) keys at `keys` (rows `kv_dim` apart, this K/V head's columns
    /// first) for every head of the group, stored from `at` (head h's row `len` further on
    /// each); `ahead` takes a step per key.
    ///
    /// The keys are converted as they are loaded, in the inner loop, and 8 keys × 3 heads of
    /// accumulators stay in registers: each loaded key vector serves 3 multiply-adds and
    /// nothing goes through memory, where [`score_block`] widens 16 keys into a buffer and
    /// reloads each for every head.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn score_keys<T: Elem>(
        sb: ScoreBlock<'_>,
        keys: &[T],
        nb: usize,
        at: *mut f32,
        ahead: &mut Ahead,
        pending: &mut Pending,
    ) {
        for _ in 0..nb {
            ahead.step();
        }
        // Missing keys repeat the last one; their lanes are never stored.
        let mut kp = [keys.as_ptr(); 8];
        for (j, p) in kp.iter_mut().enumerate() {
            *p = keys.as_ptr().add(j.min(nb - 1) * sb.kv_dim);
        }
        let mut h0 = 0;
        while h0 < sb.g {
            let hg = (sb.g - h0).min(3);
            match hg {
                1 => head_scores::<T, 1>(sb, &kp, nb, h0, at, pending),
                2 => head_scores::<T, 2>(sb, &kp, nb, h0, at, pending),
                _ => head_scores::<T, 3>(sb, &kp, nb, h0, at, pending),
            }
            h0 += hg;
        }
    }

    /// [`score_keys`] for heads `h0..h0 + G` of the group.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn head_scores<T: Elem, const G: usize>(
        sb: ScoreBlock<'_>,
        kp: &[*const T; 8],
        nb: usize,
        h0: usize,
        at: *mut f32,
        pending: &mut Pending,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 8]; G];
        let qp = sb.qpad.as_ptr().add(h0 * sb.hdp);
        for c in 0..sb.hd / 16 {
            let mut q = [_mm512_setzero_ps(); G];
            for h in 0..G {
                q[h] = _mm512_loadu_ps(qp.add(h * sb.hdp + c * 16));
            }
            for j in 0..8 {
                let k = load16_512(kp[j].add(c * 16));
                for h in 0..G {
                    acc[h][j] = _mm512_fmadd_ps(q[h], k, acc[h][j]);
                }
            }
        }
        for h in 0..G {
            let row = Row {
                sums: acc[h],
                dst: at.add((h0 + h) * sb.len),
                n: nb,
            };
            pending.push(row, sb.scale);
        }
    }

    /// Each `len`-long row of `s`: p = exp(s − max) / Σ exp, summed in position order (as
    /// [`head_attention`]).
    ///
    /// The maximum is the same value in any order, so it is taken 16 wide. The sums must stay
    /// in position order, one dependent add each: rows are summed side by side so that their
    /// chains overlap instead of waiting on each other.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn softmax_rows(s: &mut [f32], len: usize, sums: &mut Vec<f32>) {
        let rows = s.len() / len;
        let p = s.as_mut_ptr();
        for r in 0..rows {
            let row = p.add(r * len);
            let mut mv = _mm512_set1_ps(f32::NEG_INFINITY);
            let mut i = 0;
            while i < len {
                let k = lanes(len - i);
                let v = _mm512_mask_loadu_ps(_mm512_set1_ps(f32::NEG_INFINITY), k, row.add(i));
                mv = _mm512_max_ps(mv, v);
                i += 16;
            }
            let mv = _mm512_set1_ps(_mm512_reduce_max_ps(mv));
            let mut i = 0;
            while i < len {
                let k = lanes(len - i);
                let e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, row.add(i)), mv));
                _mm512_mask_storeu_ps(row.add(i), k, e);
                i += 16;
            }
        }
        all_row_sums(p, rows, len, sums);
        for (r, &sum) in sums.iter().enumerate() {
            let row = p.add(r * len);
            let sv = _mm512_set1_ps(sum);
            let mut i = 0;
            while i < len {
                let k = lanes(len - i);
                let q = _mm512_div_ps(_mm512_maskz_loadu_ps(k, row.add(i)), sv);
                _mm512_mask_storeu_ps(row.add(i), k, q);
                i += 16;
            }
        }
    }

    /// The position-order sum of each of the `rows` rows of length `len` at `p`.
    unsafe fn all_row_sums(p: *const f32, rows: usize, len: usize, sums: &mut Vec<f32>) {
        sums.clear();
        sums.resize(rows, 0.0);
        let mut r0 = 0;
        while r0 < rows {
            match rows - r0 {
                1 => sums[r0] = row_sums::<1>(p.add(r0 * len), len)[0],
                2 | 3 => sums[r0..r0 + 2].copy_from_slice(&row_sums::<2>(p.add(r0 * len), len)),
                4..=7 => sums[r0..r0 + 4].copy_from_slice(&row_sums::<4>(p.add(r0 * len), len)),
                _ => sums[r0..r0 + 8].copy_from_slice(&row_sums::<8>(p.add(r0 * len), len)),
            }
            r0 += match rows - r0 {
                1 => 1,
                2 | 3 => 2,
                4..=7 => 4,
                _ => 8,
            };
        }
    }

    /// Σ_j of `R` consecutive `len`-long rows at `p`, each in position order.
    #[inline]
    unsafe fn row_sums<const R: usize>(p: *const f32, len: usize) -> [f32; R] {
        let mut sums = [0f32; R];
        for j in 0..len {
            for r in 0..R {
                sums[r] += *p.add(r * len + j);
            }
        }
        sums
    }

    #[derive(Clone, Copy)]
    struct PvArgs {
        hd: usize,
        kv_dim: usize,
        kvh: usize,
        len: usize,
        /// First head of this pass within the group.
        h0: usize,
        /// First 16-lane chunk of this pass.
        c0: usize,
    }

    /// out[h][chunk] = Σ_j p[h][j] · v_j[chunk] for heads `h0..h0+G` and chunks `c0..c0+PW`,
    /// one fused multiply-add per position in order, then rounded to `T`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn pv<T: Elem, const G: usize, const PW: usize>(
        runs: &[(usize, &[T], &[T])],
        probs: &[f32],
        a: PvArgs,
        out: *mut f32,
    ) {
        let mut acc = [[_mm512_setzero_ps(); PW]; G];
        for &(p0, _, values) in runs {
            pv_run::<T, G, PW>(&mut acc, probs, a, p0, values);
        }
        let hd = a.hd;
        for h in 0..G {
            for c in 0..PW {
                let d0 = (a.c0 + c) * 16;
                let dst = out.add((a.h0 + h) * hd + d0);
                let n = (hd - d0).min(16);
                let v = acc[h][c];
                if T::KIND == ElemKind::F16 {
                    let r = round_f16_512(v);
                    _mm512_mask_storeu_ps(dst, lanes(n), r);
                } else {
                    let mut tmp = [0f32; 16];
                    _mm512_storeu_ps(tmp.as_mut_ptr(), v);
                    for d in 0..n {
                        *dst.add(d) = T::round(tmp[d]);
                    }
                }
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn pv_run<T: Elem, const G: usize, const PW: usize>(
        acc: &mut [[__m512; PW]; G],
        probs: &[f32],
        a: PvArgs,
        p0: usize,
        values: &[T],
    ) {
        let n = values.len() / a.kv_dim;
        let mut local = *acc;
        let base = values.as_ptr().add(a.kvh * a.hd + a.c0 * 16);
        let pr = probs.as_ptr().add(a.h0 * a.len + p0);
        if (a.c0 + PW) * 16 <= a.hd {
            // Whole chunks: a branch-free body, so the accumulators stay in registers.
            for j in 0..n {
                let row = base.add(j * a.kv_dim);
                let mut w = [_mm512_setzero_ps(); PW];
                for c in 0..PW {
                    w[c] = load16_512(row.add(c * 16));
                }
                for h in 0..G {
                    let p = _mm512_set1_ps(*pr.add(h * a.len + j));
                    for c in 0..PW {
                        local[h][c] = _mm512_fmadd_ps(p, w[c], local[h][c]);
                    }
                }
            }
        } else {
            for j in 0..n {
                let row = base.add(j * a.kv_dim);
                let mut w = [_mm512_setzero_ps(); PW];
                for c in 0..PW {
                    let d0 = (a.c0 + c) * 16;
                    let mut tmp = [0f32; 16];
                    for d in d0..a.hd.min(d0 + 16) {
                        tmp[d - d0] = (*row.add(d - a.c0 * 16)).to_f32();
                    }
                    w[c] = _mm512_loadu_ps(tmp.as_ptr());
                }
                for h in 0..G {
                    let p = _mm512_set1_ps(*pr.add(h * a.len + j));
                    for c in 0..PW {
                        local[h][c] = _mm512_fmadd_ps(p, w[c], local[h][c]);
                    }
                }
            }
        }
        *acc = local;
    }

    /// The AVX2 kernels of the grouped path: 8 lanes, 16-lane striped dots as lo/hi pairs.
    pub(super) mod avx2 {
        use super::super::super::dot::x86::load8_256;
        use super::super::super::math::exp;
        use super::super::super::math::x86::exp256;
        use super::{all_row_sums, ScoreBlock};
        use crate::dtype::{Elem, ElemKind};
        use std::arch::x86_64::*;

        /// Scores of keys `b..b + nb` (≤ 8) of one run for every head of the group, stored at
        /// positions `pos..pos + nb`.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        pub(super) unsafe fn score_block<T: Elem>(
            sb: ScoreBlock<'_>,
            keys: &[T],
            b: usize,
            nb: usize,
            kbuf: &mut [f32],
            scores: &mut [f32],
            pos: usize,
        ) {
            let ScoreBlock {
                qpad,
                hd,
                hdp,
                g,
                kv_dim,
                kvh,
                scale,
                len,
            } = sb;
            // Keys widened once for all the group's heads; missing keys and padding are zero.
            for j in 0..8 {
                let dst = kbuf.as_mut_ptr().add(j * hdp);
                let mut d = 0;
                if j < nb {
                    let src = keys.as_ptr().add((b + j) * kv_dim + kvh * hd);
                    while d < hd {
                        _mm256_storeu_ps(dst.add(d), load8_256(src.add(d)));
                        d += 8;
                    }
                }
                while d < hdp {
                    _mm256_storeu_ps(dst.add(d), _mm256_setzero_ps());
                    d += 8;
                }
            }
            let chunks = hdp / 16;
            let kp = kbuf.as_ptr();
            for h in 0..g {
                let qp = qpad.as_ptr().add(h * hdp);
                let mut quads = [_mm256_setzero_ps(); 2];
                for (half, quad) in quads.iter_mut().enumerate() {
                    let mut lo = [_mm256_setzero_ps(); 4];
                    let mut hi = [_mm256_setzero_ps(); 4];
                    for c in 0..chunks {
                        let ql = _mm256_loadu_ps(qp.add(c * 16));
                        let qh = _mm256_loadu_ps(qp.add(c * 16 + 8));
                        for s in 0..4 {
                            let k = kp.add((4 * half + s) * hdp + c * 16);
                            lo[s] = _mm256_fmadd_ps(ql, _mm256_loadu_ps(k), lo[s]);
                            hi[s] = _mm256_fmadd_ps(qh, _mm256_loadu_ps(k.add(8)), hi[s]);
                        }
                    }
                    *quad = reduce_quad(&lo, &hi);
                }
                // The last step of the tree, (0, 1), for both quads at once: lanes hold keys
                // 0, 2, 4, 6, 1, 3, 5, 7.
                let r = _mm256_hadd_ps(quads[0], quads[1]);
                let r = _mm256_permutevar8x32_ps(r, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
                let r = _mm256_mul_ps(r, _mm256_set1_ps(scale));
                let dst = scores.as_mut_ptr().add(h * len + pos);
                if nb == 8 {
                    _mm256_storeu_ps(dst, r);
                } else {
                    let mut tmp = [0f32; 8];
                    _mm256_storeu_ps(tmp.as_mut_ptr(), r);
                    std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst, nb);
                }
            }
        }

        /// The striped dot's tree for 4 keys up to its last step: from lanes 0..8 (`lo`) and
        /// 8..16 (`hi`) of each key's accumulator, the pairs (l, l+8), (l, l+4), (l, l+2).
        /// Lanes 2i, 2i+1 of the result hold the two partial sums of key 0, 2, 1, 3 (i = 0..4).
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn reduce_quad(lo: &[__m256; 4], hi: &[__m256; 4]) -> __m256 {
            let v: [__m256; 4] = std::array::from_fn(|s| _mm256_add_ps(lo[s], hi[s]));
            // (l, l+4): key 0 in lanes 0..4 and key 1 in lanes 4..8; keys 2, 3 alike.
            let fold = |a: __m256, b: __m256| {
                _mm256_add_ps(
                    _mm256_permute2f128_ps::<0x20>(a, b),
                    _mm256_permute2f128_ps::<0x31>(a, b),
                )
            };
            let (t01, t23) = (fold(v[0], v[1]), fold(v[2], v[3]));
            // (l, l+2) within each key's 4 lanes.
            let (a, b) = (_mm256_castps_pd(t01), _mm256_castps_pd(t23));
            _mm256_add_ps(
                _mm256_castpd_ps(_mm256_unpacklo_pd(a, b)),
                _mm256_castpd_ps(_mm256_unpackhi_pd(a, b)),
            )
        }

        /// Each `len`-long row of `s`: p = exp(s − max) / Σ exp, summed in position order.
        #[target_feature(enable = "avx2,fma,f16c")]
        pub(super) unsafe fn softmax_rows(s: &mut [f32], len: usize, sums: &mut Vec<f32>) {
            let rows = s.len() / len;
            let p = s.as_mut_ptr();
            let full = len - len % 8;
            for r in 0..rows {
                let row = p.add(r * len);
                let mut mv = _mm256_set1_ps(f32::NEG_INFINITY);
                let mut i = 0;
                while i < full {
                    mv = _mm256_max_ps(mv, _mm256_loadu_ps(row.add(i)));
                    i += 8;
                }
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), mv);
                let m = (full..len).fold(
                    lanes.into_iter().fold(f32::NEG_INFINITY, f32::max),
                    |m, j| m.max(*row.add(j)),
                );
                let mv = _mm256_set1_ps(m);
                let mut i = 0;
                while i < full {
                    let e = exp256(_mm256_sub_ps(_mm256_loadu_ps(row.add(i)), mv));
                    _mm256_storeu_ps(row.add(i), e);
                    i += 8;
                }
                for j in full..len {
                    *row.add(j) = exp(*row.add(j) - m);
                }
            }
            all_row_sums(p, rows, len, sums);
            for (r, &sum) in sums.iter().enumerate() {
                let row = p.add(r * len);
                let sv = _mm256_set1_ps(sum);
                let mut i = 0;
                while i < full {
                    _mm256_storeu_ps(row.add(i), _mm256_div_ps(_mm256_loadu_ps(row.add(i)), sv));
                    i += 8;
                }
                for j in full..len {
                    *row.add(j) /= sum;
                }
            }
        }

        /// Σ_j p[h][j] · v_j for the `g` heads of K/V head `kvh`, rounded to `T` into `out`
        /// (`hd` a multiple of 8).
        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = "avx2,fma,f16c")]
        pub(super) unsafe fn weighted_values<T: Elem>(
            runs: &[(usize, &[T], &[T])],
            probs: &[f32],
            hd: usize,
            g: usize,
            kv_dim: usize,
            kvh: usize,
            len: usize,
            out: &mut [f32],
        ) {
            // Up to 3 heads × 4 columns of 8 lanes: 12 accumulators, 3 broadcast
            // probabilities and one value register.
            let cols = hd / 8;
            let mut h0 = 0;
            while h0 < g {
                let hg = (g - h0).min(3);
                let mut c0 = 0;
                while c0 < cols {
                    let pw = match cols - c0 {
                        1 => 1,
                        2 | 3 => 2,
                        _ => 4,
                    };
                    let a = Pv {
                        hd,
                        kv_dim,
                        kvh,
                        len,
                        h0,
                        c0,
                    };
                    match (hg, pw) {
                        (1, 4) => pv::<T, 1, 4>(runs, probs, a, out),
                        (2, 4) => pv::<T, 2, 4>(runs, probs, a, out),
                        (3, 4) => pv::<T, 3, 4>(runs, probs, a, out),
                        (1, 2) => pv::<T, 1, 2>(runs, probs, a, out),
                        (2, 2) => pv::<T, 2, 2>(runs, probs, a, out),
                        (3, 2) => pv::<T, 3, 2>(runs, probs, a, out),
                        (1, _) => pv::<T, 1, 1>(runs, probs, a, out),
                        (2, _) => pv::<T, 2, 1>(runs, probs, a, out),
                        _ => pv::<T, 3, 1>(runs, probs, a, out),
                    }
                    c0 += pw;
                }
                h0 += hg;
            }
        }

        /// Where a [`pv`] pass works: heads from `h0`, 8-lane columns from `c0`.
        #[derive(Clone, Copy)]
        struct Pv {
            hd: usize,
            kv_dim: usize,
            kvh: usize,
            len: usize,
            h0: usize,
            c0: usize,
        }

        /// Heads `h0..h0 + G`, columns `c0..c0 + PW`: one fused multiply-add per position in
        /// order, then rounded to `T`.
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn pv<T: Elem, const G: usize, const PW: usize>(
            runs: &[(usize, &[T], &[T])],
            probs: &[f32],
            a: Pv,
            out: &mut [f32],
        ) {
            let mut acc = [[_mm256_setzero_ps(); PW]; G];
            for &(p0, _, values) in runs {
                let n = values.len() / a.kv_dim;
                let base = values.as_ptr().add(a.kvh * a.hd + a.c0 * 8);
                let pr = probs.as_ptr().add(a.h0 * a.len + p0);
                for j in 0..n {
                    let row = base.add(j * a.kv_dim);
                    let p: [__m256; G] =
                        std::array::from_fn(|h| _mm256_set1_ps(*pr.add(h * a.len + j)));
                    for c in 0..PW {
                        let w = load8_256(row.add(c * 8));
                        for h in 0..G {
                            acc[h][c] = _mm256_fmadd_ps(p[h], w, acc[h][c]);
                        }
                    }
                }
            }
            for h in 0..G {
                for c in 0..PW {
                    let dst = out.as_mut_ptr().add((a.h0 + h) * a.hd + (a.c0 + c) * 8);
                    let v = acc[h][c];
                    if T::KIND == ElemKind::F16 {
                        let r = _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v));
                        _mm256_storeu_ps(dst, r);
                    } else {
                        let mut tmp = [0f32; 8];
                        _mm256_storeu_ps(tmp.as_mut_ptr(), v);
                        for (d, t) in tmp.iter().enumerate() {
                            *dst.add(d) = T::round(*t);
                        }
                    }
                }
            }
        }
    }
}
