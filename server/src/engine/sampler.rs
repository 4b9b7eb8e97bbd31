//! Turns a row of logits into the next token: penalties, temperature, top-k, top-p, min-p,
//! seeded sampling, and the log-probabilities the client asked for.

use super::sampling_params::SamplingParams;
use halfstep_model::kernels::math::{exp, exp_shifted, ln};
use halfstep_model::kernels::softmax::log_softmax;
use std::cmp::Ordering;

/// Which distribution reported log-probabilities come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogprobsMode {
    /// The model's own distribution (vLLM `raw_logprobs`), what a trainer recomputes.
    #[default]
    Raw,
    /// The distribution actually sampled from (after penalties, temperature, top-k/p, min-p).
    Processed,
}

impl std::str::FromStr for LogprobsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "raw_logprobs" | "raw" => Ok(LogprobsMode::Raw),
            "processed_logprobs" | "processed" => Ok(LogprobsMode::Processed),
            _ => Err(format!(
                "unknown logprobs mode '{s}' (expected raw_logprobs or processed_logprobs)"
            )),
        }
    }
}

/// The seeded random stream of one sample (SplitMix64): portable and cheap to fork.
#[derive(Debug, Clone)]
pub struct SeqRng(u64);

impl SeqRng {
    /// The stream of sample `index` of a request seeded with `seed`.
    pub fn new(seed: u64, index: u64) -> SeqRng {
        let mut r = SeqRng(seed ^ 0x6a09_e667_f3bc_c909);
        let mix = r.next_u64();
        SeqRng(mix ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A token's log-probability with its rank and the distribution's top entries.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The token.
    pub token: u32,
    /// Its log-probability.
    pub logprob: f32,
    /// 1 + the number of tokens with a strictly higher log-probability.
    pub rank: usize,
    /// The most likely tokens, most likely first (ties by id).
    pub top: Vec<(u32, f32)>,
}

/// Log-probabilities of `token` and the top `k` under the distribution `logprobs`.
pub fn token_logprob(logprobs: &[f32], token: u32, k: usize) -> TokenLogprob {
    let lp = logprobs[token as usize];
    let rank = 1 + logprobs.iter().filter(|&&x| x > lp).count();
    TokenLogprob {
        token,
        logprob: lp,
        rank,
        top: top_k(logprobs, k),
    }
}

/// The `k` largest entries as `(id, value)`, largest first, ties by lower id.
pub fn top_k(values: &[f32], k: usize) -> Vec<(u32, f32)> {
    if k == 0 {
        return Vec::new();
    }
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    for (i, &v) in values.iter().enumerate() {
        if best.len() == k && by_value_desc(&(i as u32, v), &best[k - 1]) != Ordering::Less {
            continue;
        }
        let at = best
            .binary_search_by(|e| by_value_desc(e, &(i as u32, v)))
            .unwrap_or_else(|e| e);
        best.insert(at, (i as u32, v));
        best.truncate(k);
    }
    best
}

fn by_value_desc(a: &(u32, f32), b: &(u32, f32)) -> Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// The outcome of one sampling step.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    /// The chosen token.
    pub token: u32,
    /// Its log-probability (and top entries), when the request asked for logprobs.
    pub logprob: Option<TokenLogprob>,
}

/// Everything the sampler needs to know about a sequence.
pub struct SampleContext<'a> {
    /// The request's parameters.
    pub params: &'a SamplingParams,
    /// The prompt tokens.
    pub prompt: &'a [u32],
    /// Tokens generated so far.
    pub output: &'a [u32],
    /// Tokens that end generation (EOS), masked until `min_tokens` are out.
    pub eos_token_ids: &'a [u32],
    /// Which distribution logprobs report.
    pub mode: LogprobsMode,
}

/// Chooses the next token from `logits`.
pub fn sample(logits: &[f32], cx: &SampleContext<'_>, rng: &mut SeqRng) -> Sampled {
    let p = cx.params;
    let penalised =
        p.repetition_penalty != 1.0 || p.presence_penalty != 0.0 || p.frequency_penalty != 0.0;
    let masked = cx.output.len() < p.min_tokens;
    let inv_t = (!p.greedy()).then(|| 1.0 / p.temperature);
    let processed_wanted = cx.mode == LogprobsMode::Processed && p.logprobs.is_some();
    // The common case of a draw: the whole vocabulary at a temperature, nothing to renormalise.
    if let Some(s) = inv_t {
        if !penalised && !masked && keeps_all(p) && !processed_wanted {
            let token = draw_scaled(logits, s, rng.uniform());
            return Sampled {
                token,
                logprob: p.logprobs.map(|k| raw_logprob(logits, token, k)),
            };
        }
    }
    // Penalties apply before the temperature; without them the copy and the scaling are one
    // pass, and greedy decoding of unmodified logits (the common case) reads them in place.
    let mut l = if penalised {
        let mut l = logits.to_vec();
        apply_penalties(&mut l, cx);
        if let Some(s) = inv_t {
            for v in l.iter_mut() {
                *v *= s;
            }
        }
        std::borrow::Cow::Owned(l)
    } else if let Some(s) = inv_t {
        std::borrow::Cow::Owned(logits.iter().map(|&v| v * s).collect())
    } else {
        std::borrow::Cow::Borrowed(logits)
    };
    // Masked tokens are -inf before and after scaling alike.
    if masked {
        let l = l.to_mut();
        for &t in cx.eos_token_ids.iter().chain(&p.stop_token_ids) {
            if let Some(v) = l.get_mut(t as usize) {
                *v = f32::NEG_INFINITY;
            }
        }
    }
    let (token, processed) = if p.greedy() {
        let token = argmax(&l);
        let processed = (cx.mode == LogprobsMode::Processed && p.logprobs.is_some()).then(|| {
            let mut out = vec![0f32; l.len()];
            log_softmax(&l, &mut out);
            out
        });
        (token, processed)
    } else {
        let kept = filter(&l, p);
        let token = draw(&l, &kept, rng.uniform());
        let processed = (cx.mode == LogprobsMode::Processed && p.logprobs.is_some())
            .then(|| renormalised_logprobs(&l, &kept));
        (token, processed)
    };
    let logprob = p.logprobs.map(|k| match processed {
        Some(lp) => token_logprob(&lp, token, k),
        None => raw_logprob(logits, token, k),
    });
    Sampled { token, logprob }
}

/// The log-probability of `token` (and the `k` most likely) under the unmodified logits.
fn raw_logprob(logits: &[f32], token: u32, k: usize) -> TokenLogprob {
    let mut lp = vec![0f32; logits.len()];
    log_softmax(logits, &mut lp);
    token_logprob(&lp, token, k)
}

/// Whether top-k, top-p and min-p all keep every token.
fn keeps_all(p: &SamplingParams) -> bool {
    p.top_k == 0 && p.top_p >= 1.0 && p.min_p <= 0.0
}

/// [`draw`] from the whole vocabulary of `logits · s`, bit for bit, without storing the scaled
/// logits or their exponentials: one pass finds the maximum, one sums each block's
/// exponentials, and only the blocks the walk reaches are computed again.
fn draw_scaled(logits: &[f32], s: f32, u: f64) -> u32 {
    let m = max_scaled(logits, s);
    let mut scaled = [0f32; DRAW_BLOCK];
    let mut block = |b: usize, out: &mut [f32]| {
        let src = &logits[b * DRAW_BLOCK..(b * DRAW_BLOCK + out.len())];
        let sc = &mut scaled[..out.len()];
        for (d, &v) in sc.iter_mut().zip(src) {
            *d = v * s;
        }
        exp_shifted(sc, m, out);
    };
    pick_blocks(logits.len(), &mut block, u).unwrap_or(0) as u32
}

/// The largest of `v · s`, ignoring NaN as `f32::max` does; −inf for none.
fn max_scaled(v: &[f32], s: f32) -> f32 {
    // Sixteen independent maxima: one chain of dependent compares was most of a draw's time.
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = v.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            *m = m.max(x * s);
        }
    }
    tail.iter()
        .map(|&x| x * s)
        .chain(lanes)
        .fold(f32::NEG_INFINITY, f32::max)
}

/// Index of the largest value (the lowest such index on ties).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

fn apply_penalties(l: &mut [f32], cx: &SampleContext<'_>) {
    let p = cx.params;
    if p.repetition_penalty != 1.0 {
        let mut seen = vec![false; l.len()];
        for &t in cx.prompt.iter().chain(cx.output) {
            if let Some(s) = seen.get_mut(t as usize) {
                *s = true;
            }
        }
        for (v, s) in l.iter_mut().zip(seen) {
            if s {
                *v = if *v > 0.0 {
                    *v / p.repetition_penalty
                } else {
                    *v * p.repetition_penalty
                };
            }
        }
    }
    if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
        let mut counts = std::collections::HashMap::<u32, u32>::new();
        for &t in cx.output {
            *counts.entry(t).or_default() += 1;
        }
        for (t, c) in counts {
            if let Some(v) = l.get_mut(t as usize) {
                *v -= p.frequency_penalty * c as f32 + p.presence_penalty;
            }
        }
    }
}

/// Token ids that survive top-k, top-p and min-p, most likely first; `None` keeps all.
fn filter(l: &[f32], p: &SamplingParams) -> Option<Vec<u32>> {
    if p.top_k == 0 && p.top_p >= 1.0 && p.min_p <= 0.0 {
        return None;
    }
    let m = max_of(l);
    let mut e = vec![0f32; l.len()];
    exp_shifted(l, m, &mut e);
    let z = sum_f64(&e);
    let order = |a: &u32, b: &u32| by_value_desc(&(*a, l[*a as usize]), &(*b, l[*b as usize]));
    // Sorting the whole vocabulary every step is slow; the kept set is almost always among
    // the most likely few hundred, so sort those and widen only if they fall short.
    let mut cand: Vec<u32> = (0..l.len() as u32).collect();
    let mut width = 256.min(cand.len());
    loop {
        if width < cand.len() {
            cand.select_nth_unstable_by(width - 1, order);
        }
        cand[..width].sort_unstable_by(order);
        let mass: f64 = cand[..width]
            .iter()
            .map(|&t| exp(l[t as usize] - m) as f64)
            .sum();
        let enough_k = p.top_k > 0 && p.top_k <= width;
        let enough_min_p = p.min_p > 0.0
            && exp(l[cand[width - 1] as usize] - m) < p.min_p * exp(l[cand[0] as usize] - m);
        if width == cand.len() || enough_k || enough_min_p || mass / z >= p.top_p as f64 {
            break;
        }
        width = (width * 8).min(cand.len());
    }
    let mut kept = Vec::new();
    let mut cum = 0f64;
    let p_max = exp(l[cand[0] as usize] - m) as f64 / z;
    for (i, &t) in cand[..width].iter().enumerate() {
        if p.top_k > 0 && i >= p.top_k {
            break;
        }
        let prob = exp(l[t as usize] - m) as f64 / z;
        // top-p keeps the smallest prefix whose mass reaches top_p (always at least one).
        if i > 0 && cum >= p.top_p as f64 {
            break;
        }
        if i > 0 && prob < p.min_p as f64 * p_max {
            break;
        }
        kept.push(t);
        cum += prob;
    }
    Some(kept)
}

/// Inverse-CDF draw over the kept tokens (in their order) or the whole vocabulary (id order).
fn draw(l: &[f32], kept: &Option<Vec<u32>>, u: f64) -> u32 {
    let (w, id): (Vec<f32>, Box<dyn Fn(usize) -> u32 + '_>) = match kept {
        Some(k) => {
            let m = k
                .iter()
                .map(|&t| l[t as usize])
                .fold(f32::NEG_INFINITY, f32::max);
            let w = k.iter().map(|&t| exp(l[t as usize] - m)).collect();
            (w, Box::new(move |i| k[i]))
        }
        None => {
            // The whole vocabulary: exponentials 16 wide (same bits as `exp`).
            let m = max_of(l);
            let mut w = vec![0f32; l.len()];
            exp_shifted(l, m, &mut w);
            (w, Box::new(|i| i as u32))
        }
    };
    let mut block = |b: usize, out: &mut [f32]| {
        out.copy_from_slice(&w[b * DRAW_BLOCK..b * DRAW_BLOCK + out.len()]);
    };
    pick_blocks(w.len(), &mut block, u)
        .map(&id)
        .unwrap_or_else(|| id(0))
}

/// Positions summed per block when drawing from a whole vocabulary.
const DRAW_BLOCK: usize = 1024;

/// The first `i` with `w[i] > 0` at which the running sum of the `n` weights passes `u · Σw`,
/// where `block(b, out)` writes weights `b·DRAW_BLOCK..` (a whole block, fewer at the end).
/// Whole blocks are skipped by their sums, and only the block holding the target is walked one
/// weight at a time. Rounding can leave the target past the end: then the last weight above
/// zero; `None` when there is none.
fn pick_blocks(n: usize, block: &mut dyn FnMut(usize, &mut [f32]), u: f64) -> Option<usize> {
    let blocks = n.div_ceil(DRAW_BLOCK);
    let len = |b: usize| (n - b * DRAW_BLOCK).min(DRAW_BLOCK);
    let mut buf = [0f32; DRAW_BLOCK];
    let sums: Vec<f64> = (0..blocks)
        .map(|b| {
            let w = &mut buf[..len(b)];
            block(b, w);
            sum_f64(w)
        })
        .collect();
    let target = u * sums.iter().sum::<f64>();
    let mut cum = 0f64;
    let mut walking = false;
    for (b, &s) in sums.iter().enumerate() {
        // Once walking, the walk runs on past its block while its running sum rounds below
        // `cum + s`.
        if walking || cum + s > target {
            walking = true;
            let w = &mut buf[..len(b)];
            block(b, w);
            for (i, &wi) in w.iter().enumerate() {
                cum += wi as f64;
                if cum > target && wi > 0.0 {
                    return Some(b * DRAW_BLOCK + i);
                }
            }
        } else {
            cum += s;
        }
    }
    (0..blocks).rev().find_map(|b| {
        let w = &mut buf[..len(b)];
        block(b, w);
        w.iter()
            .rposition(|&wi| wi > 0.0)
            .map(|i| b * DRAW_BLOCK + i)
    })
}

/// [`pick_blocks`] over weights held in memory.
#[cfg(test)]
fn pick(w: &[f32], u: f64) -> Option<usize> {
    let mut block = |b: usize, out: &mut [f32]| {
        out.copy_from_slice(&w[b * DRAW_BLOCK..b * DRAW_BLOCK + out.len()]);
    };
    pick_blocks(w.len(), &mut block, u)
}

/// The largest value, ignoring NaN as `f32::max` does; −inf for none.
fn max_of(v: &[f32]) -> f32 {
    // x · 1 is x, bit for bit.
    max_scaled(v, 1.0)
}

/// Σ v in f64, eight positions at a time (a fixed order, so the same bits every call).
fn sum_f64(v: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let chunks = v.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x as f64;
        }
    }
    let pairs = [
        acc[0] + acc[4],
        acc[1] + acc[5],
        acc[2] + acc[6],
        acc[3] + acc[7],
    ];
    tail.iter()
        .fold((pairs[0] + pairs[2]) + (pairs[1] + pairs[3]), |s, &x| {
            s + x as f64
        })
}

/// Log-probabilities of the distribution restricted to `kept` and renormalised.
fn renormalised_logprobs(l: &[f32], kept: &Option<Vec<u32>>) -> Vec<f32> {
    match kept {
        None => {
            let mut out = vec![0f32; l.len()];
            log_softmax(l, &mut out);
            out
        }
        Some(k) => {
            let m = k
                .iter()
                .map(|&t| l[t as usize])
                .fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for &t in k {
                sum += exp(l[t as usize] - m);
            }
            let ln_sum = ln(sum);
            let mut out = vec![f32::NEG_INFINITY; l.len()];
            for &t in k {
                out[t as usize] = (l[t as usize] - m) - ln_sum;
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cx<'a>(p: &'a SamplingParams, out: &'a [u32]) -> SampleContext<'a> {
        SampleContext {
            params: p,
            prompt: &[],
            output: out,
            eos_token_ids: &[0],
            mode: LogprobsMode::Raw,
        }
    }

    /// The target distribution computed independently in f64, straight from the definitions.
    fn reference(logits: &[f64], t: f64, top_k: usize, top_p: f64, min_p: f64) -> Vec<f64> {
        let n = logits.len();
        let z: Vec<f64> = logits.iter().map(|l| l / t).collect();
        let m = z.iter().cloned().fold(f64::MIN, f64::max);
        let e: Vec<f64> = z.iter().map(|v| (v - m).exp()).collect();
        let s: f64 = e.iter().sum();
        let p: Vec<f64> = e.iter().map(|v| v / s).collect();
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| p[b].partial_cmp(&p[a]).unwrap().then(a.cmp(&b)));
        let mut keep = vec![false; n];
        let mut cum = 0.0;
        for (i, &t) in order.iter().enumerate() {
            if (top_k > 0 && i >= top_k) || (i > 0 && cum >= top_p) || p[t] < min_p * p[order[0]] {
                break;
            }
            keep[t] = true;
            cum += p[t];
        }
        let kept: f64 = (0..n).filter(|&i| keep[i]).map(|i| p[i]).sum();
        (0..n)
            .map(|i| if keep[i] { p[i] / kept } else { 0.0 })
            .collect()
    }

    #[test]
    fn empirical_distribution_matches_target_by_chi_square() {
        let logits = [1.0f32, 2.0, 0.5, -1.0, 1.5, 0.0, 2.2, -0.3];
        let l64: Vec<f64> = logits.iter().map(|&x| x as f64).collect();
        let cases = [
            (1.0, 0, 1.0, 0.0),
            (0.7, 0, 1.0, 0.0),
            (1.3, 5, 1.0, 0.0),
            (1.0, 0, 0.8, 0.0),
            (0.9, 6, 0.9, 0.0),
            (1.0, 0, 1.0, 0.3),
        ];
        for (t, k, tp, mp) in cases {
            let p = SamplingParams {
                temperature: t,
                top_k: k,
                top_p: tp,
                min_p: mp,
                ..Default::default()
            };
            let mut rng = SeqRng::new(1234, 0);
            let n = 40_000;
            let mut counts = [0usize; 8];
            for _ in 0..n {
                let c = SampleContext {
                    eos_token_ids: &[],
                    ..cx(&p, &[])
                };
                counts[sample(&logits, &c, &mut rng).token as usize] += 1;
            }
            let want = reference(&l64, t as f64, k, tp as f64, mp as f64);
            let mut chi2 = 0.0;
            let mut df = 0;
            for i in 0..8 {
                if want[i] == 0.0 {
                    assert_eq!(
                        counts[i], 0,
                        "token {i} drawn though filtered ({t} {k} {tp} {mp})"
                    );
                } else {
                    let e = want[i] * n as f64;
                    chi2 += (counts[i] as f64 - e).powi(2) / e;
                    df += 1;
                }
            }
            // 99.9th percentile of chi-square with up to 7 degrees of freedom is 24.3.
            assert!(
                chi2 < 24.3,
                "chi2 {chi2} df {} for {t} {k} {tp} {mp}: {counts:?}",
                df - 1
            );
        }
    }

    #[test]
    fn streamed_draw_is_the_draw_over_stored_scaled_logits() {
        // Vocabulary sizes around whole blocks, logits spread so that most weights underflow
        // and the draw lands anywhere.
        let mut rng = SeqRng::new(7, 0);
        for n in [1, 37, DRAW_BLOCK, 3 * DRAW_BLOCK + 1, 49_152] {
            let logits: Vec<f32> = (0..n)
                .map(|_| (rng.uniform() as f32 - 0.5) * 40.0)
                .collect();
            for s in [1.0f32, 1.25, 0.3] {
                let scaled: Vec<f32> = logits.iter().map(|&v| v * s).collect();
                assert_eq!(max_scaled(&logits, s).to_bits(), max_of(&scaled).to_bits());
                for k in 0..200 {
                    let u = (k as f64 + 0.5) / 200.0;
                    assert_eq!(
                        draw_scaled(&logits, s, u),
                        draw(&scaled, &None, u),
                        "n {n} s {s} u {u}"
                    );
                }
            }
        }
    }

    #[test]
    fn block_draw_finds_the_token_a_sequential_walk_finds() {
        // A vocabulary-sized weight row with runs of zeros (masked tokens) and a tail.
        let n = 5 * DRAW_BLOCK + 37;
        let mut rng = SeqRng::new(99, 0);
        let w: Vec<f32> = (0..n)
            .map(|i| {
                let r = rng.uniform() as f32;
                if (i / 300) % 4 == 1 {
                    0.0
                } else {
                    r * r
                }
            })
            .collect();
        let total: f64 = w.iter().map(|&x| x as f64).sum();
        assert!((sum_f64(&w) - total).abs() <= 1e-12 * total);
        let want_max = w.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        assert_eq!(max_of(&w), want_max);
        assert_eq!(max_of(&[]), f32::NEG_INFINITY);
        for k in 0..2000 {
            let u = (k as f64 + 0.5) / 2000.0;
            let target = u * total;
            let (mut cum, mut want) = (0f64, None);
            for (i, &wi) in w.iter().enumerate() {
                let before = cum;
                cum += wi as f64;
                if cum > target && wi > 0.0 {
                    // Both walks agree unless the target sits within rounding of a boundary.
                    let near = (before - target).abs().min((cum - target).abs()) < 1e-9 * total;
                    want = (!near).then_some(i);
                    break;
                }
            }
            if let Some(i) = want {
                assert_eq!(pick(&w, u), Some(i), "u = {u}");
                assert!(w[i] > 0.0);
            }
        }
        assert_eq!(pick(&[0.0; 3000], 0.5), None);
    }

    #[test]
    fn same_seed_same_tokens_and_greedy_takes_argmax() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let p = SamplingParams::default();
        let run = |seed| {
            let mut rng = SeqRng::new(seed, 0);
            (0..20)
                .map(|_| sample(&logits, &cx(&p, &[]), &mut rng).token)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        let g = SamplingParams {
            temperature: 0.0,
            ..Default::default()
        };
        assert_eq!(
            sample(&logits, &cx(&g, &[]), &mut SeqRng::new(0, 0)).token,
            argmax(&logits)
        );
    }

    #[test]
    fn min_tokens_masks_eos_and_penalties_move_logits() {
        let logits = vec![5.0, 1.0, 0.5];
        let g = SamplingParams {
            temperature: 0.0,
            min_tokens: 2,
            ..Default::default()
        };
        assert_eq!(
            sample(&logits, &cx(&g, &[1]), &mut SeqRng::new(0, 0)).token,
            1
        );
        assert_eq!(
            sample(&logits, &cx(&g, &[1, 1]), &mut SeqRng::new(0, 0)).token,
            0
        );
        let logits = vec![0.0, 3.0, 2.9];
        let pen = SamplingParams {
            temperature: 0.0,
            frequency_penalty: 0.2,
            ..Default::default()
        };
        assert_eq!(
            sample(&logits, &cx(&pen, &[1]), &mut SeqRng::new(0, 0)).token,
            2
        );
        let rep = SamplingParams {
            temperature: 0.0,
            repetition_penalty: 1.1,
            ..Default::default()
        };
        assert_eq!(
            sample(&logits, &cx(&rep, &[1]), &mut SeqRng::new(0, 0)).token,
            2
        );
    }

    #[test]
    fn raw_logprobs_are_the_models_and_processed_are_renormalised() {
        let logits = vec![2.0f32, 1.0, 0.0, -1.0];
        let p = SamplingParams {
            top_k: 2,
            logprobs: Some(2),
            ..Default::default()
        };
        let s = sample(&logits, &cx(&p, &[]), &mut SeqRng::new(3, 0));
        let z: f64 = logits.iter().map(|&x| (x as f64).exp()).sum();
        let lp = s.logprob.unwrap();
        assert!((lp.logprob as f64 - (logits[s.token as usize] as f64 - z.ln())).abs() < 1e-6);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![0, 1]);
        let c = SampleContext {
            mode: LogprobsMode::Processed,
            ..cx(&p, &[])
        };
        let s = sample(&logits, &c, &mut SeqRng::new(3, 0));
        let z2 = (2.0f64).exp() + 1f64.exp();
        let want = logits[s.token as usize] as f64 - z2.ln();
        assert!((s.logprob.unwrap().logprob as f64 - want).abs() < 1e-6);
    }

    #[test]
    fn top_k_helper_orders_by_value_then_id() {
        assert_eq!(
            top_k(&[1.0, 3.0, 3.0, 2.0], 3),
            vec![(1, 3.0), (2, 3.0), (3, 2.0)]
        );
        assert_eq!(top_k(&[1.0], 5), vec![(0, 1.0)]);
    }
}
