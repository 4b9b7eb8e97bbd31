//! Gradients: every op's backward against central finite differences in f64, and the
//! whole-model tape against the shared forward (logits) and against finite differences of the
//! whole model (every parameter tensor, with and without frozen layers, tied embeddings and
//! q/k/v biases).

use halfstep_model::backward::{
    attention_backward, attention_forward, backward, causal_probs_len, embedding_backward,
    embedding_forward, forward_tape, linear_backward_bias, linear_backward_input,
    linear_backward_weight, linear_forward, residual_backward, residual_forward, rms_norm_backward,
    rms_norm_forward, rope_backward, rope_forward, silu_gate_backward, silu_gate_forward,
    token_logprob, token_logprob_backward, transpose, GradOptions, Grads, Real, RopeTable,
    TrainWeights,
};
use halfstep_model::forward::Param;
use halfstep_model::kernels::attention::AttentionShape;
use halfstep_model::kernels::rope::Rope;
use halfstep_model::testmodel::{SeededNormal, TinyModelSpec};
use halfstep_model::{
    Architecture, ContiguousKv, Kernels, LogitsFor, Model, ModelConfig, SimdLevel, Span,
    WeightError,
};
use std::sync::Arc;

/// Step of the central differences in f64.
const EPS: f64 = 1e-6;

fn normals(rng: &mut SeededNormal, n: usize, scale: f64) -> Vec<f64> {
    (0..n).map(|_| scale * rng.normal()).collect()
}

fn kern(threads: usize) -> Kernels {
    Kernels::with_threads(SimdLevel::detect(), threads)
}

/// Relative error with a floor, so entries whose gradient is (nearly) zero compare absolutely.
fn rel_err(got: f64, want: f64, floor: f64) -> f64 {
    (got - want).abs() / got.abs().max(want.abs()).max(floor)
}

/// Checks `grads[i]` (the analytic gradient of `loss` with respect to `inputs[i]`) against
/// central differences at every entry of every input.
fn assert_matches_finite_differences(
    op: &str,
    inputs: &[Vec<f64>],
    grads: &[Vec<f64>],
    loss: impl Fn(&[Vec<f64>]) -> f64,
) {
    let mut x = inputs.to_vec();
    for (i, g) in grads.iter().enumerate() {
        assert_eq!(
            g.len(),
            x[i].len(),
            "{op}: gradient {i} has the wrong shape"
        );
        for e in 0..g.len() {
            let v = x[i][e];
            x[i][e] = v + EPS;
            let plus = loss(&x);
            x[i][e] = v - EPS;
            let minus = loss(&x);
            x[i][e] = v;
            let fd = (plus - minus) / (2.0 * EPS);
            let err = rel_err(g[e], fd, 1e-2);
            assert!(
                err < 1e-6,
                "{op}: input {i} entry {e}: analytic {} vs finite differences {fd} (rel {err:.2e})",
                g[e]
            );
        }
    }
}

fn dot64(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

// ---------------------------------------------------------------------------------------------
// Ops

#[test]
fn embedding_backward_scatter_adds_into_the_looked_up_rows() {
    let mut rng = SeededNormal::new(1);
    let (vocab, dim) = (7, 5);
    let tokens = [3u32, 1, 3, 6];
    let table = normals(&mut rng, vocab * dim, 1.0);
    let cot = normals(&mut rng, tokens.len() * dim, 1.0);
    let loss = |x: &[Vec<f64>]| {
        let mut out = vec![0.0; tokens.len() * dim];
        embedding_forward(&x[0], dim, &tokens, &mut out);
        dot64(&out, &cot)
    };
    let mut dtable = vec![0.0; vocab * dim];
    embedding_backward(&mut dtable, dim, &tokens, &cot);
    assert_matches_finite_differences("embedding", &[table], &[dtable.clone()], loss);
    // Row 3 is looked up twice and gets both rows; unused rows get nothing.
    for d in 0..dim {
        assert_eq!(dtable[3 * dim + d], cot[d] + cot[2 * dim + d]);
        assert_eq!(dtable[dim * 2 + d], 0.0);
    }
}

#[test]
fn rms_norm_gradients_match_finite_differences() {
    let mut rng = SeededNormal::new(2);
    let (rows, d) = (3, 10);
    let x = normals(&mut rng, rows * d, 1.5);
    let w: Vec<f64> = (0..d).map(|_| 1.0 + 0.3 * rng.normal()).collect();
    let cot = normals(&mut rng, rows * d, 1.0);
    let eps = 1e-5;
    let level = SimdLevel::detect();
    let loss = |x: &[Vec<f64>]| {
        let mut out = vec![0.0; rows * d];
        let mut inv = vec![0.0; rows];
        rms_norm_forward(level, &x[0], &x[1], eps, &mut out, &mut inv);
        dot64(&out, &cot)
    };
    let mut out = vec![0.0; rows * d];
    let mut inv = vec![0.0; rows];
    rms_norm_forward(level, &x, &w, eps, &mut out, &mut inv);
    let mut dx = vec![0.0; rows * d];
    let mut dw = vec![0.0; d];
    rms_norm_backward(level, &x, &w, &inv, &cot, &mut dx, Some(&mut dw));
    assert_matches_finite_differences("rms_norm", &[x, w], &[dx, dw], loss);
}

#[test]
fn rms_norm_in_f32_is_the_kernel_bit_for_bit() {
    let mut rng = SeededNormal::new(3);
    let d = 37;
    let x: Vec<f32> = (0..4 * d).map(|_| rng.normal() as f32).collect();
    let w: Vec<f32> = (0..d).map(|_| (1.0 + 0.2 * rng.normal()) as f32).collect();
    for level in SimdLevel::available() {
        let mut want = vec![0f32; x.len()];
        halfstep_model::kernels::norm::rms_norm::<f32>(level, &x, &w, 1e-5, &mut want);
        let mut got = vec![0f32; x.len()];
        let mut inv = vec![0f32; 4];
        rms_norm_forward(level, &x, &w, 1e-5, &mut got, &mut inv);
        assert_eq!(got, want, "{level:?}");
    }
}

#[test]
fn linear_gradients_match_finite_differences() {
    let mut rng = SeededNormal::new(4);
    // 19 rows: more than one 16-lane stripe of the weight gradient's reduction, not a multiple.
    let (m, k, n) = (19, 6, 5);
    let x = normals(&mut rng, m * k, 1.0);
    let w = normals(&mut rng, n * k, 0.5);
    let b = normals(&mut rng, n, 0.5);
    let cot = normals(&mut rng, m * n, 1.0);
    let kern = kern(1);
    let loss = |v: &[Vec<f64>]| {
        let mut out = vec![0.0; m * n];
        linear_forward(&kern, &v[0], m, k, &v[1], n, Some(&v[2]), &mut out);
        dot64(&out, &cot)
    };
    let mut dx = vec![0.0; m * k];
    let mut dw = vec![0.0; n * k];
    let mut db = vec![0.0; n];
    linear_backward_input(&kern, &cot, m, n, &transpose(&w, n, k), k, &mut dx);
    linear_backward_weight(&kern, &x, m, k, &cot, n, &mut dw);
    linear_backward_bias(&cot, n, &mut db);
    assert_matches_finite_differences("linear", &[x, w, b], &[dx, dw, db], loss);
}

#[test]
fn linear_backward_in_f32_agrees_with_f64() {
    let mut rng = SeededNormal::new(5);
    // Sizes that exercise the matmul's tiles, tails, threads and the blocked weight gradient.
    let (m, k, n) = (21, 37, 2000);
    let x = normals(&mut rng, m * k, 1.0);
    let w = normals(&mut rng, n * k, 0.2);
    let dy = normals(&mut rng, m * n, 1.0);
    let f = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
    let (x32, w32, dy32) = (f(&x), f(&w), f(&dy));
    let kern = kern(2);
    let mut dx = vec![0.0; m * k];
    let mut dw = vec![0.0; n * k];
    linear_backward_input(&kern, &dy, m, n, &transpose(&w, n, k), k, &mut dx);
    linear_backward_weight(&kern, &x, m, k, &dy, n, &mut dw);
    let mut dx32 = vec![0f32; m * k];
    let mut dw32 = vec![0f32; n * k];
    linear_backward_input(&kern, &dy32, m, n, &transpose(&w32, n, k), k, &mut dx32);
    linear_backward_weight(&kern, &x32, m, k, &dy32, n, &mut dw32);
    for (got, want) in [(&dx32, &dx), (&dw32, &dw)] {
        let scale = want.iter().fold(0f64, |a, &b| a.max(b.abs()));
        for (g, w) in got.iter().zip(want.iter()) {
            assert!((*g as f64 - w).abs() < 1e-5 * scale, "{g} vs {w}");
        }
    }
}

#[test]
fn rope_gradients_match_finite_differences() {
    let mut rng = SeededNormal::new(6);
    let (hd, heads, t) = (8, 2, 5);
    let rope = Rope::new(hd, 10000.0, 16, None);
    let table = RopeTable::<f64>::new(&rope, hd, t);
    let width = heads * hd;
    let x = normals(&mut rng, t * width, 1.0);
    let cot = normals(&mut rng, t * width, 1.0);
    let loss = |v: &[Vec<f64>]| {
        let mut y = v[0].clone();
        rope_forward(&table, &mut y, width);
        dot64(&y, &cot)
    };
    let mut dx = cot.clone();
    rope_backward(&table, &mut dx, width);
    assert_matches_finite_differences("rope", &[x], &[dx], loss);
}

#[test]
fn rope_in_f32_rotates_like_the_kernel_bit_for_bit() {
    let mut rng = SeededNormal::new(7);
    let (hd, heads, t) = (18, 3, 40);
    let rope = Rope::new(hd, 10000.0, 64, None);
    let table = RopeTable::<f32>::new(&rope, hd, t);
    let x: Vec<f32> = (0..t * heads * hd).map(|_| rng.normal() as f32).collect();
    let mut got = x.clone();
    rope_forward(&table, &mut got, heads * hd);
    let mut want = x.clone();
    for (p, row) in want.chunks_exact_mut(heads * hd).enumerate() {
        rope.apply::<f32>(row, p);
    }
    assert_eq!(got, want);
}

fn attention_inputs(seed: u64, shape: AttentionShape, t: usize) -> [Vec<f64>; 4] {
    let mut rng = SeededNormal::new(seed);
    let (qd, kvd) = (
        shape.n_heads * shape.head_dim,
        shape.n_kv_heads * shape.head_dim,
    );
    [
        normals(&mut rng, t * qd, 1.0),
        normals(&mut rng, t * kvd, 1.0),
        normals(&mut rng, t * kvd, 1.0),
        normals(&mut rng, t * qd, 1.0),
    ]
}

#[test]
fn grouped_causal_attention_gradients_match_finite_differences() {
    let shape = AttentionShape {
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 6,
    };
    let t = 5;
    let [q, k, v, cot] = attention_inputs(8, shape, t);
    let kern = kern(1);
    let forward = |q: &[f64], k: &[f64], v: &[f64], probs: &mut [f64]| {
        let mut out = vec![0.0; q.len()];
        attention_forward(&kern, shape, t, q, k, v, &mut out, probs);
        out
    };
    let loss = |x: &[Vec<f64>]| {
        let mut probs = vec![0.0; causal_probs_len(shape, t)];
        dot64(&forward(&x[0], &x[1], &x[2], &mut probs), &cot)
    };
    let mut probs = vec![0.0; causal_probs_len(shape, t)];
    forward(&q, &k, &v, &mut probs);
    let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
    attention_backward(
        &kern, shape, t, &q, &k, &v, &probs, &cot, &mut dq, &mut dk, &mut dv,
    );
    assert_matches_finite_differences("attention", &[q, k, v], &[dq, dk, dv], loss);
    // Position 0 attends only to itself.
    assert_eq!(probs[0], 1.0);
}

#[test]
fn attention_does_not_depend_on_the_thread_count() {
    let shape = AttentionShape {
        n_heads: 6,
        n_kv_heads: 2,
        head_dim: 16,
    };
    let t = 48;
    let [q, k, v, dout] = attention_inputs(9, shape, t)
        .map(|x| x.into_iter().map(|v| v as f32).collect::<Vec<f32>>());
    let run = |kern: &Kernels| {
        let mut out = vec![0f32; q.len()];
        let mut probs = vec![0f32; causal_probs_len(shape, t)];
        attention_forward(kern, shape, t, &q, &k, &v, &mut out, &mut probs);
        let (mut dq, mut dk, mut dv) = (
            vec![0f32; q.len()],
            vec![0f32; k.len()],
            vec![0f32; v.len()],
        );
        attention_backward(
            kern, shape, t, &q, &k, &v, &probs, &dout, &mut dq, &mut dk, &mut dv,
        );
        (out, probs, dq, dk, dv)
    };
    assert_eq!(run(&kern(1)), run(&kern(3)));
}

#[test]
fn silu_gate_gradients_match_finite_differences() {
    let mut rng = SeededNormal::new(10);
    let n = 17;
    let g = normals(&mut rng, n, 3.0);
    let u = normals(&mut rng, n, 1.0);
    let cot = normals(&mut rng, n, 1.0);
    let loss = |x: &[Vec<f64>]| {
        let mut out = vec![0.0; n];
        silu_gate_forward(&x[0], &x[1], &mut out);
        dot64(&out, &cot)
    };
    let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
    silu_gate_backward(&g, &u, &cot, &mut dg, &mut du);
    assert_matches_finite_differences("silu_gate", &[g, u], &[dg, du], loss);
}

#[test]
fn silu_gate_in_f32_is_the_kernel_silu_times_up() {
    let mut rng = SeededNormal::new(11);
    let g: Vec<f32> = (0..100).map(|_| (4.0 * rng.normal()) as f32).collect();
    let u: Vec<f32> = (0..100).map(|_| rng.normal() as f32).collect();
    let mut out = vec![0f32; 100];
    silu_gate_forward(&g, &u, &mut out);
    for i in 0..100 {
        assert_eq!(out[i], halfstep_model::kernels::math::silu(g[i]) * u[i]);
    }
}

#[test]
fn residual_add_passes_the_gradient_to_both_branches() {
    let mut rng = SeededNormal::new(12);
    let n = 9;
    let h = normals(&mut rng, n, 1.0);
    let x = normals(&mut rng, n, 1.0);
    let cot = normals(&mut rng, n, 1.0);
    let loss = |v: &[Vec<f64>]| {
        let mut h = v[0].clone();
        residual_forward(&mut h, &v[1]);
        dot64(&h, &cot)
    };
    let mut dx = vec![0.0; n];
    residual_backward(&cot, &mut dx);
    assert_matches_finite_differences("residual", &[h, x], &[cot.clone(), dx], loss);
}

#[test]
fn token_logprob_gradient_is_coeff_times_onehot_minus_softmax() {
    let mut rng = SeededNormal::new(13);
    let logits = normals(&mut rng, 11, 3.0);
    let (target, coeff) = (4, -0.7);
    let loss = |x: &[Vec<f64>]| coeff * token_logprob(&x[0], target);
    let mut d = vec![0.0; 11];
    token_logprob_backward(&logits, target, coeff, &mut d);
    assert!(
        d.iter().sum::<f64>().abs() < 1e-15,
        "softmax gradients sum to 0"
    );
    let want = logits[target] - logits.iter().map(|x| x.exp()).sum::<f64>().ln();
    assert!((token_logprob(&logits, target) - want).abs() < 1e-14);
    assert_matches_finite_differences("token_logprob", &[logits], &[d], loss);
}

#[test]
fn token_logprob_in_f32_is_the_kernel_log_softmax() {
    let mut rng = SeededNormal::new(14);
    let logits: Vec<f32> = (0..259).map(|_| (5.0 * rng.normal()) as f32).collect();
    let mut lp = vec![0f32; 259];
    halfstep_model::kernels::softmax::log_softmax(&logits, &mut lp);
    for (t, &want) in lp.iter().enumerate() {
        assert_eq!(token_logprob(&logits, t), want);
    }
}

// ---------------------------------------------------------------------------------------------
// Whole model

/// HF-named tensors: (name, shape, values).
type Tensors<R> = Vec<(String, Vec<usize>, Vec<R>)>;

/// A tiny model's config and tensors: Llama with GQA, Qwen2 (q/k/v biases) or Llama with the
/// LM head tied to the embedding.
fn tiny(variant: &str) -> (ModelConfig, Tensors<f32>) {
    let spec = TinyModelSpec {
        architecture: if variant == "qwen2" {
            Architecture::Qwen2
        } else {
            Architecture::Llama
        },
        ..TinyModelSpec::default()
    };
    let mut config = spec.config();
    let mut tensors = spec.tensors();
    if variant == "tied" {
        config.tie_word_embeddings = true;
        tensors.retain(|(n, _, _)| n != "lm_head.weight");
    }
    (config, tensors)
}

fn to_f64(params: &[(String, Vec<usize>, Vec<f32>)]) -> Tensors<f64> {
    params
        .iter()
        .map(|(n, s, v)| (n.clone(), s.clone(), v.iter().map(|&x| x as f64).collect()))
        .collect()
}

fn tokens(seed: u64, n: usize, vocab: usize) -> Vec<u32> {
    let mut rng = SeededNormal::new(seed);
    (0..n)
        .map(|_| (rng.uniform() * vocab as f64) as u32 % vocab as u32)
        .collect()
}

/// Σ_r coeff_r · log softmax(logits_r)[target_r], the shape of every policy-gradient loss.
struct TokenLoss {
    rows: Vec<usize>,
    targets: Vec<usize>,
    coeffs: Vec<f64>,
}

impl TokenLoss {
    fn value<R: Real>(&self, logits: &[R], vocab: usize) -> f64 {
        (0..self.rows.len())
            .map(|i| {
                let row = &logits[i * vocab..(i + 1) * vocab];
                self.coeffs[i] * token_logprob(row, self.targets[i]).to_f64()
            })
            .sum()
    }

    fn dlogits<R: Real>(&self, logits: &[R], vocab: usize) -> Vec<R> {
        let mut d = vec![R::ZERO; logits.len()];
        for i in 0..self.rows.len() {
            let row = i * vocab..(i + 1) * vocab;
            let c = R::from_f64(self.coeffs[i]);
            token_logprob_backward(&logits[row.clone()], self.targets[i], c, &mut d[row]);
        }
        d
    }
}

fn gradients<R: Real>(
    w: &TrainWeights<R>,
    kern: &Kernels,
    toks: &[u32],
    loss: &TokenLoss,
    opts: &GradOptions,
) -> Grads<R> {
    let vocab = w.config().vocab_size;
    let tape = forward_tape(w, kern, toks, &loss.rows);
    let mut grads = Grads::new(w, opts);
    backward(
        w,
        kern,
        &tape,
        &loss.dlogits(&tape.logits, vocab),
        opts,
        &mut grads,
    );
    grads
}

/// In f32 the tape runs the shared forward's kernels in the same order, so its logits are the
/// model's, bit for bit, at every SIMD level.
#[test]
fn tape_logits_equal_the_shared_forward_bit_for_bit() {
    for variant in ["llama", "qwen2", "tied"] {
        let (config, params) = tiny(variant);
        let toks = tokens(20, 40, config.vocab_size);
        let all: Vec<usize> = (0..toks.len()).collect();
        let w = TrainWeights::new(&config, params.clone()).unwrap();
        for level in SimdLevel::available() {
            let kern = Kernels::with_threads(level, 2);
            let model = Model::<f32>::from_params(
                config.clone(),
                params
                    .iter()
                    .map(|(_, s, v)| Param {
                        shape: s.clone(),
                        data: Arc::new(v.clone()),
                    })
                    .collect(),
                kern.clone(),
            );
            let mut kv = ContiguousKv::<f32>::new(config.num_hidden_layers, config.kv_dim());
            let span = Span {
                seq: 0,
                start_pos: 0,
                tokens: &toks,
                logits: LogitsFor::All,
            };
            let want = model.forward(&[span], &mut kv).unwrap();
            let tape = forward_tape(&w, &kern, &toks, &all);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&tape.logits), bits(&want), "{variant} at {level:?}");
            // Only the requested rows, in request order (repeats allowed).
            let rows = [39, 5, 5, 17];
            let part = forward_tape(&w, &kern, &toks, &rows);
            let v = config.vocab_size;
            for (i, &r) in rows.iter().enumerate() {
                assert_eq!(
                    bits(&part.logits[i * v..(i + 1) * v]),
                    bits(&tape.logits[r * v..(r + 1) * v])
                );
            }
        }
    }
}

/// Entries to check in a tensor: a few at random, plus for the embedding some of the rows the
/// sequence looks up (other rows only get the tied head's share).
fn sample(
    rng: &mut SeededNormal,
    name: &str,
    len: usize,
    hidden: usize,
    toks: &[u32],
) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..8)
        .map(|_| (rng.uniform() * len as f64) as usize % len)
        .collect();
    if name == "model.embed_tokens.weight" {
        for &t in &toks[..4] {
            idx.push(t as usize * hidden + (rng.uniform() * hidden as f64) as usize % hidden);
        }
    }
    idx
}

#[test]
fn whole_model_gradients_match_finite_differences() {
    for variant in ["llama", "qwen2", "tied"] {
        let (config, params) = tiny(variant);
        let vocab = config.vocab_size;
        let kern = kern(1);
        let toks = tokens(21, 12, vocab);
        // Row 7 appears twice, as a loss with two terms at one position would have it.
        let loss = TokenLoss {
            rows: vec![3, 7, 11, 7],
            targets: vec![17, 200, 3, 42],
            coeffs: vec![0.8, -1.3, 0.5, 0.9],
        };
        let opts = GradOptions::default();
        let p64 = to_f64(&params);
        let w64 = TrainWeights::<f64>::from_params(&config, p64.clone()).unwrap();
        let g64 = gradients(&w64, &kern, &toks, &loss, &opts);
        let w32 = TrainWeights::new(&config, params.clone()).unwrap();
        let g32 = gradients(&w32, &kern, &toks, &loss, &opts);
        let names: Vec<&str> = g64.names().collect();
        assert_eq!(
            names,
            w64.names().iter().map(String::as_str).collect::<Vec<_>>()
        );

        let loss_at = |p: Tensors<f64>| {
            let w = TrainWeights::<f64>::from_params(&config, p).unwrap();
            loss.value(&forward_tape(&w, &kern, &toks, &loss.rows).logits, vocab)
        };
        let mut rng = SeededNormal::new(22);
        let (mut worst64, mut worst32) = (0f64, 0f64);
        for (ti, (name, _, values)) in p64.iter().enumerate() {
            let (a64, a32) = (g64.get(name).unwrap(), g32.get(name).unwrap());
            for e in sample(&mut rng, name, values.len(), config.hidden_size, &toks) {
                let mut p = p64.clone();
                p[ti].2[e] = values[e] + EPS;
                let plus = loss_at(p.clone());
                p[ti].2[e] = values[e] - EPS;
                let minus = loss_at(p);
                let fd = (plus - minus) / (2.0 * EPS);
                let e64 = rel_err(a64[e], fd, 1e-3);
                let e32 = rel_err(a32[e] as f64, fd, 1e-2);
                assert!(
                    e64 < 1e-5,
                    "{variant} {name}[{e}]: f64 backward {} vs finite differences {fd}",
                    a64[e]
                );
                assert!(
                    e32 < 1e-3,
                    "{variant} {name}[{e}]: f32 backward {} vs finite differences {fd}",
                    a32[e]
                );
                worst64 = worst64.max(e64);
                worst32 = worst32.max(e32);
            }
        }
        eprintln!("{variant}: worst relative error f64 {worst64:.1e}, f32 {worst32:.1e}");
    }
}

#[test]
fn frozen_layers_get_no_gradient_and_leave_the_rest_unchanged() {
    let (config, params) = tiny("llama");
    let kern = kern(2);
    let toks = tokens(23, 40, config.vocab_size);
    let loss = TokenLoss {
        rows: vec![10, 25, 39],
        targets: vec![5, 6, 7],
        coeffs: vec![1.0, -0.5, 2.0],
    };
    let w = TrainWeights::new(&config, params).unwrap();
    let full = gradients(&w, &kern, &toks, &loss, &GradOptions::default());
    for first in [1, config.num_hidden_layers] {
        let opts = GradOptions {
            first_trainable_layer: first,
            ..GradOptions::default()
        };
        let part = gradients(&w, &kern, &toks, &loss, &opts);
        for name in w.names() {
            let frozen = name == "model.embed_tokens.weight"
                || (0..first).any(|l| name.starts_with(&format!("model.layers.{l}.")));
            match part.get(name) {
                None => assert!(frozen, "{name} should be trainable"),
                Some(g) => {
                    assert!(!frozen, "{name} should be frozen");
                    assert_eq!(g, full.get(name).unwrap(), "{name}");
                }
            }
        }
    }
}

#[test]
fn only_the_lm_head_trains_when_everything_else_is_off() {
    let (config, params) = tiny("llama");
    let kern = kern(1);
    let toks = tokens(24, 9, config.vocab_size);
    let loss = TokenLoss {
        rows: vec![8],
        targets: vec![100],
        coeffs: vec![1.0],
    };
    let w = TrainWeights::new(&config, params).unwrap();
    let opts = GradOptions {
        first_trainable_layer: config.num_hidden_layers,
        train_embeddings: false,
        train_final_norm: false,
        train_lm_head: true,
    };
    let g = gradients(&w, &kern, &toks, &loss, &opts);
    assert_eq!(g.names().collect::<Vec<_>>(), ["lm_head.weight"]);
    let full = gradients(&w, &kern, &toks, &loss, &GradOptions::default());
    assert_eq!(g.get("lm_head.weight"), full.get("lm_head.weight"));
}

#[test]
fn tied_embeddings_accumulate_head_and_lookup_shares_into_one_tensor() {
    let (tied_config, tied_params) = tiny("tied");
    // The same model untied: an LM head that is a copy of the embedding.
    let mut config = tied_config.clone();
    config.tie_word_embeddings = false;
    let mut params = tied_params.clone();
    let embed = params[0].clone();
    params.push(("lm_head.weight".into(), embed.1, embed.2));
    let kern = kern(1);
    let toks = tokens(25, 16, config.vocab_size);
    let loss = TokenLoss {
        rows: vec![4, 15],
        targets: vec![9, 99],
        coeffs: vec![1.0, 0.7],
    };
    let tied = TrainWeights::new(&tied_config, tied_params).unwrap();
    let untied = TrainWeights::new(&config, params).unwrap();
    let name = "model.embed_tokens.weight";
    for first in [0, 1] {
        let opts = GradOptions {
            first_trainable_layer: first,
            ..GradOptions::default()
        };
        let gt = gradients(&tied, &kern, &toks, &loss, &opts);
        let gu = gradients(&untied, &kern, &toks, &loss, &opts);
        let head = gu.get("lm_head.weight").unwrap();
        let got = gt.get(name).unwrap();
        assert!(gt.get("lm_head.weight").is_none());
        match gu.get(name) {
            // Layer 0 frozen: the lookup is not reached, the tied tensor gets the head's share.
            None => assert_eq!(got, head),
            Some(lookup) => {
                for i in 0..got.len() {
                    let want = head[i] + lookup[i];
                    assert!((got[i] - want).abs() <= 1e-6 * want.abs().max(1e-3), "{i}");
                }
            }
        }
    }
}

#[test]
fn gradients_do_not_depend_on_the_thread_count() {
    let (config, params) = tiny("qwen2");
    let toks = tokens(26, 40, config.vocab_size);
    let loss = TokenLoss {
        rows: (20..40).collect(),
        targets: (0..20).map(|i| i * 11).collect(),
        coeffs: (0..20).map(|i| 0.1 * i as f64 - 1.0).collect(),
    };
    let w = TrainWeights::new(&config, params).unwrap();
    let opts = GradOptions::default();
    let one = gradients(&w, &kern(1), &toks, &loss, &opts);
    let three = gradients(&w, &kern(3), &toks, &loss, &opts);
    for (name, g) in one.iter() {
        assert_eq!(g, three.get(name).unwrap(), "{name}");
    }
}

#[test]
fn grads_accumulate_over_calls_and_zero_resets_them() {
    let (config, params) = tiny("llama");
    let kern = kern(1);
    let toks = tokens(27, 8, config.vocab_size);
    let w = TrainWeights::new(&config, params).unwrap();
    let opts = GradOptions::default();
    let tape = forward_tape(&w, &kern, &toks, &[7]);
    let mut d = vec![0f32; config.vocab_size];
    token_logprob_backward(&tape.logits, 3, 1.0, &mut d);
    let mut grads = Grads::new(&w, &opts);
    backward(&w, &kern, &tape, &d, &opts, &mut grads);
    let once = grads.get("model.norm.weight").unwrap().to_vec();
    backward(&w, &kern, &tape, &d, &opts, &mut grads);
    let twice = grads.get("model.norm.weight").unwrap();
    for (a, b) in once.iter().zip(twice) {
        assert_eq!(2.0 * a, *b);
    }
    grads.zero();
    assert!(grads.iter().all(|(_, g)| g.iter().all(|&x| x == 0.0)));
    assert_eq!(
        grads.shape("model.norm.weight"),
        Some(&[config.hidden_size][..])
    );
}

#[test]
fn train_weights_reject_missing_misshapen_and_unknown_tensors() {
    let (config, params) = tiny("llama");
    let mut missing = params.clone();
    let gone = missing.remove(3).0;
    assert!(matches!(
        TrainWeights::new(&config, missing),
        Err(WeightError::Missing(n)) if n == gone
    ));
    let mut bad = params.clone();
    bad[2].1 = vec![1, 2];
    assert!(matches!(
        TrainWeights::new(&config, bad),
        Err(WeightError::Shape { .. })
    ));
    let mut extra = params;
    extra.push(("lm_head.bias".into(), vec![1], vec![0.0]));
    assert!(matches!(
        TrainWeights::new(&config, extra),
        Err(WeightError::Unexpected(n)) if n == "lm_head.bias"
    ));
}
