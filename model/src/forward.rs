//! The decoder forward pass over a batch of token spans from different sequences.

use crate::config::ModelConfig;
use crate::dtype::Elem;
use crate::kernels::attention::{attention, AttentionShape};
use crate::kernels::gemm::{matmul, matmul_gate_up, matmul_many, Output, Proj};
use crate::kernels::norm::{residual_norm, rms_norm};
use crate::kernels::rope::Rope;
use crate::kernels::round::round_in_place;
use crate::kernels::Kernels;
use crate::kernels::SimdLevel;
use crate::kv::KvCache;
use crate::weights::{expected_tensors, validate, Coverage, TensorSource, WeightError};
use std::collections::HashMap;
use std::sync::Arc;

/// Which positions of a span need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// None (a prefill chunk that is not the last).
    None,
    /// Only the span's last token.
    Last,
    /// Every token of the span (prompt logprobs, scoring).
    All,
}

/// Consecutive tokens of one sequence starting at a known position.
#[derive(Debug, Clone, Copy)]
pub struct Span<'a> {
    /// The K/V store's handle of the sequence.
    pub seq: usize,
    /// Position of `tokens[0]`; positions before it must already be in the K/V store.
    pub start_pos: usize,
    /// Token ids.
    pub tokens: &'a [u32],
    /// Which logits to return.
    pub logits: LogitsFor,
}

/// Errors of a forward call (bad input, never a bug).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ForwardError {
    /// A token id outside the vocabulary.
    #[error("token id {id} is out of range (vocabulary size {vocab})")]
    TokenOutOfRange {
        /// The id.
        id: u32,
        /// Vocabulary size.
        vocab: usize,
    },
    /// A position beyond the model's context.
    #[error("position {pos} is beyond the model's maximum context ({max})")]
    PositionOutOfRange {
        /// The position.
        pos: usize,
        /// Positions supported.
        max: usize,
    },
}

/// One parameter: its shape and values in the run dtype, shared so that a partial weight update
/// can build a new model without copying unchanged tensors.
#[derive(Debug, Clone)]
pub struct Param<T: Elem> {
    /// Shape in PyTorch order.
    pub shape: Vec<usize>,
    /// Values, row-major.
    pub data: Arc<Vec<T>>,
}

/// Indices into the parameter list of one layer's tensors.
#[derive(Debug, Clone)]
struct LayerIdx {
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

/// A decoder-only transformer in run dtype `T`.
#[derive(Clone)]
pub struct Model<T: Elem> {
    config: ModelConfig,
    names: Arc<Vec<String>>,
    index: Arc<HashMap<String, usize>>,
    params: Vec<Param<T>>,
    layers: Arc<Vec<LayerIdx>>,
    embed: usize,
    norm: usize,
    lm_head: usize,
    rope: Arc<Rope>,
    kernels: Kernels,
}

impl<T: Elem> std::fmt::Debug for Model<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("dtype", &T::DTYPE)
            .field("config", &self.config)
            .finish()
    }
}

impl<T: Elem> Model<T> {
    /// Loads and validates every tensor of `source`, converting to `T`.
    pub fn load(
        config: ModelConfig,
        source: &dyn TensorSource,
        kernels: Kernels,
    ) -> Result<Model<T>, WeightError> {
        Self::load_with_progress(config, source, kernels, &mut |_, _| {})
    }

    /// Like [`Model::load`], calling `progress(done, total)` after each tensor.
    pub fn load_with_progress(
        config: ModelConfig,
        source: &dyn TensorSource,
        kernels: Kernels,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Model<T>, WeightError> {
        validate(&config, &source.tensor_infos(), Coverage::Full)?;
        let specs = expected_tensors(&config);
        let mut params = Vec::with_capacity(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            let values = source.read_f32(&spec.name)?;
            params.push(Param {
                shape: spec.shape.clone(),
                data: Arc::new(to_run_dtype::<T>(&spec.name, &values)?),
            });
            progress(i + 1, specs.len());
        }
        Ok(Self::from_params(config, params, kernels))
    }

    /// Builds a model from parameters in the order of [`expected_tensors`].
    pub fn from_params(config: ModelConfig, params: Vec<Param<T>>, kernels: Kernels) -> Model<T> {
        let names: Vec<String> = expected_tensors(&config)
            .into_iter()
            .map(|t| t.name)
            .collect();
        assert_eq!(
            names.len(),
            params.len(),
            "parameter count does not match the config"
        );
        let index: HashMap<String, usize> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i))
            .collect();
        let at = |n: String| index[&n];
        let layers = (0..config.num_hidden_layers)
            .map(|l| {
                let p = format!("model.layers.{l}");
                LayerIdx {
                    attn_norm: at(format!("{p}.input_layernorm.weight")),
                    q: at(format!("{p}.self_attn.q_proj.weight")),
                    k: at(format!("{p}.self_attn.k_proj.weight")),
                    v: at(format!("{p}.self_attn.v_proj.weight")),
                    qkv_bias: config.attention_bias.then(|| {
                        ["q", "k", "v"].map(|x| at(format!("{p}.self_attn.{x}_proj.bias")))
                    }),
                    o: at(format!("{p}.self_attn.o_proj.weight")),
                    mlp_norm: at(format!("{p}.post_attention_layernorm.weight")),
                    gate: at(format!("{p}.mlp.gate_proj.weight")),
                    up: at(format!("{p}.mlp.up_proj.weight")),
                    down: at(format!("{p}.mlp.down_proj.weight")),
                }
            })
            .collect();
        let embed = at("model.embed_tokens.weight".into());
        let lm_head = if config.tie_word_embeddings {
            embed
        } else {
            at("lm_head.weight".into())
        };
        let rope = Rope::new(
            config.head_dim,
            config.rope_theta,
            config.max_position_embeddings,
            config.rope_scaling.as_ref(),
        );
        Model {
            norm: at("model.norm.weight".into()),
            config,
            names: Arc::new(names),
            index: Arc::new(index),
            params,
            layers: Arc::new(layers),
            embed,
            lm_head,
            rope: Arc::new(rope),
            kernels,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The kernel context calls run with.
    pub fn kernels(&self) -> &Kernels {
        &self.kernels
    }

    /// The same weights run with another kernel context (SIMD level, threads).
    pub fn with_kernels(&self, kernels: Kernels) -> Model<T> {
        Model {
            kernels,
            ..self.clone()
        }
    }

    /// Parameter names in canonical order.
    pub fn param_names(&self) -> &[String] {
        &self.names
    }

    /// A parameter by HF name.
    pub fn param(&self, name: &str) -> Option<&Param<T>> {
        self.index.get(name).map(|&i| &self.params[i])
    }

    /// All parameters in canonical order.
    pub fn params(&self) -> &[Param<T>] {
        &self.params
    }

    /// A copy of this model with some parameters replaced (shapes must match).
    pub fn with_replaced(
        &self,
        updates: Vec<(String, Arc<Vec<T>>)>,
    ) -> Result<Model<T>, WeightError> {
        let mut m = self.clone();
        for (name, data) in updates {
            let &i = self
                .index
                .get(&name)
                .ok_or_else(|| WeightError::Unexpected(name.clone()))?;
            let n: usize = m.params[i].shape.iter().product();
            if data.len() != n {
                return Err(WeightError::Shape {
                    name,
                    expected: m.params[i].shape.clone(),
                    got: vec![data.len()],
                });
            }
            m.params[i].data = data;
        }
        Ok(m)
    }

    fn w(&self, i: usize) -> &[T] {
        &self.params[i].data
    }

    /// Runs the decoder over `spans`, writing each token's K/V to `kv`, and returns f32 logits
    /// for the positions the spans ask for, rows in span order (`rows × vocab_size`).
    pub fn forward(
        &self,
        spans: &[Span<'_>],
        kv: &mut dyn KvCache<T>,
    ) -> Result<Vec<f32>, ForwardError> {
        let mut logits = Vec::new();
        self.forward_into(spans, kv, &mut logits)?;
        Ok(logits)
    }

    /// [`Model::forward`] into a caller's buffer, resized to `rows × vocab_size`: a server
    /// that keeps one buffer does not allocate and clear megabytes of logits every step.
    pub fn forward_into(
        &self,
        spans: &[Span<'_>],
        kv: &mut dyn KvCache<T>,
        logits: &mut Vec<f32>,
    ) -> Result<(), ForwardError> {
        // Flatten the spans into token rows, checking input first. The row lists, like the
        // activations below, are the calling thread's, kept between calls.
        let mut rows = ROWS.with(|r| std::mem::take(&mut *r.borrow_mut()));
        let flat = self.flatten(spans, &mut rows);
        let result = flat.map(|()| self.run_rows(&rows, kv, logits));
        ROWS.with(|r| *r.borrow_mut() = rows);
        result
    }

    /// Fills `rows` with the token rows of `spans`, checking tokens and positions.
    fn flatten(&self, spans: &[Span<'_>], rows: &mut Rows) -> Result<(), ForwardError> {
        let c = &self.config;
        rows.clear();
        for s in spans {
            for (i, &t) in s.tokens.iter().enumerate() {
                if t as usize >= c.vocab_size {
                    return Err(ForwardError::TokenOutOfRange {
                        id: t,
                        vocab: c.vocab_size,
                    });
                }
                let pos = s.start_pos + i;
                if pos >= self.rope.max_positions() {
                    return Err(ForwardError::PositionOutOfRange {
                        pos,
                        max: self.rope.max_positions(),
                    });
                }
                let want = match s.logits {
                    LogitsFor::None => false,
                    LogitsFor::Last => i + 1 == s.tokens.len(),
                    LogitsFor::All => true,
                };
                if want {
                    rows.logit_rows.push(rows.tokens.len());
                }
                rows.tokens.push(t);
                rows.seqs.push(s.seq);
                rows.positions.push(pos);
            }
        }
        Ok(())
    }

    /// The forward pass over flattened token rows.
    fn run_rows(&self, rows: &Rows, kv: &mut dyn KvCache<T>, logits: &mut Vec<f32>) {
        let c = &self.config;
        let kern = &self.kernels;
        let level = kern.level;
        let (hd, qd, kvd, inter) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let eps = c.rms_norm_eps as f32;
        let Rows {
            tokens,
            seqs,
            positions,
            logit_rows,
        } = rows;
        let m = tokens.len();
        if m == 0 {
            logits.clear();
            return;
        }
        let embed = self.w(self.embed);
        // Activation buffers are the calling thread's, kept between calls: a decode step
        // allocates nothing, and a long prefill does not fault in fresh pages every time.
        let mut scratch = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
        let [h, xn, q, k, v, att, o, g, u, sel, normed] = &mut scratch;
        let h = grown(h, m * hd);
        let xn = grown(xn, m * hd);
        let q = grown(q, m * qd);
        let k = grown(k, m * kvd);
        let v = grown(v, m * kvd);
        let att = grown(att, m * qd);
        let o = grown(o, m * hd);
        let g = grown(g, m * inter);
        let u = grown(u, m * inter);
        for (r, &t) in tokens.iter().enumerate() {
            let row = &embed[t as usize * hd..(t as usize + 1) * hd];
            for (d, &e) in h[r * hd..(r + 1) * hd].iter_mut().zip(row) {
                *d = e.to_f32();
            }
        }
        // K/V rows in the run dtype on their way to the cache; typed, so kept as `Any`.
        let mut kv_rows = KV_ROWS
            .with(|c| c.borrow_mut().take())
            .filter(|b| b.is::<(Vec<T>, Vec<T>)>())
            .unwrap_or_else(|| Box::new((Vec::<T>::new(), Vec::<T>::new())));
        let (kt, vt) = kv_rows
            .downcast_mut::<(Vec<T>, Vec<T>)>()
            .expect("checked just above");
        kt.resize(kvd, T::default());
        vt.resize(kvd, T::default());
        let (kt, vt) = (&mut kt[..kvd], &mut vt[..kvd]);
        let shape = AttentionShape {
            n_heads: c.num_attention_heads,
            n_kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
        };
        for (li, l) in self.layers.iter().enumerate() {
            // The residual add that ends a layer is done with the next layer's first norm, in
            // one pass over the rows.
            let add = (li > 0).then_some(&o[..]);
            residual_norm(kern, h, add, self.w(l.attn_norm), eps, xn);
            let bias = |j: usize| l.qkv_bias.map(|b| self.w(b[j]));
            matmul_many(
                kern,
                xn,
                m,
                hd,
                &mut [
                    Proj {
                        w: self.w(l.q),
                        n: qd,
                        bias: bias(0),
                        out: q,
                    },
                    Proj {
                        w: self.w(l.k),
                        n: kvd,
                        bias: bias(1),
                        out: k,
                    },
                    Proj {
                        w: self.w(l.v),
                        n: kvd,
                        bias: bias(2),
                        out: v,
                    },
                ],
                Output::Round,
            );
            for r in 0..m {
                self.rope
                    .apply_at::<T>(level, &mut q[r * qd..(r + 1) * qd], positions[r]);
                self.rope
                    .apply_at::<T>(level, &mut k[r * kvd..(r + 1) * kvd], positions[r]);
                T::from_f32_slice(&k[r * kvd..(r + 1) * kvd], kt);
                T::from_f32_slice(&v[r * kvd..(r + 1) * kvd], vt);
                kv.write(li, seqs[r], positions[r], kt, vt);
            }
            attention::<T>(kern, shape, li, q, seqs, positions, &*kv, att);
            matmul(kern, att, m, qd, self.w(l.o), hd, None, Output::Round, o);
            residual_norm(kern, h, Some(o), self.w(l.mlp_norm), eps, xn);
            // As PyTorch in the run dtype: act(gate) is rounded, then the product.
            matmul_gate_up(kern, xn, m, hd, (self.w(l.gate), self.w(l.up)), inter, g, u);
            matmul(
                kern,
                g,
                m,
                inter,
                self.w(l.down),
                hd,
                None,
                Output::Round,
                o,
            );
        }
        if !self.layers.is_empty() {
            add_round::<T>(level, h, o);
        }
        KV_ROWS.with(|c| *c.borrow_mut() = Some(kv_rows));
        let n = logit_rows.len();
        let sel = grown(sel, n * hd);
        for (i, &r) in logit_rows.iter().enumerate() {
            sel[i * hd..(i + 1) * hd].copy_from_slice(&h[r * hd..(r + 1) * hd]);
        }
        let normed = grown(normed, n * hd);
        rms_norm(level, sel, self.w(self.norm), eps, normed);
        let vocab = c.vocab_size;
        // Every element is written by the projection below: only grow, never clear.
        if logits.len() < n * vocab {
            logits.resize(n * vocab, 0.0);
        }
        logits.truncate(n * vocab);
        matmul(
            kern,
            normed,
            n,
            hd,
            self.w(self.lm_head),
            vocab,
            None,
            Output::F32,
            logits,
        );
        SCRATCH.with(|s| *s.borrow_mut() = scratch);
    }
}

/// The token rows of one forward call: id, sequence, position, and which rows need logits.
#[derive(Default)]
struct Rows {
    tokens: Vec<u32>,
    seqs: Vec<usize>,
    positions: Vec<usize>,
    logit_rows: Vec<usize>,
}

impl Rows {
    /// Empties every list, keeping its capacity.
    fn clear(&mut self) {
        self.tokens.clear();
        self.seqs.clear();
        self.positions.clear();
        self.logit_rows.clear();
    }
}

thread_local! {
    /// [`Model::forward`]'s activation buffers (h, xn, q, k, v, att, o, gate, up, the rows
    /// that get logits, and those rows normed).
    static SCRATCH: std::cell::RefCell<[Vec<f32>; 11]> = Default::default();
    /// [`Model::forward`]'s token rows.
    static ROWS: std::cell::RefCell<Rows> = Default::default();
    /// [`Model::forward`]'s K and V rows in the run dtype, as `(Vec<T>, Vec<T>)`.
    static KV_ROWS: std::cell::RefCell<Option<Box<dyn std::any::Any>>> =
        const { std::cell::RefCell::new(None) };
}

/// The first `n` values of `v`, growing it if needed (contents unspecified: callers overwrite).
fn grown(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

/// h = round(h + x), the residual add.
fn add_round<T: Elem>(level: SimdLevel, h: &mut [f32], x: &[f32]) {
    for (a, &b) in h.iter_mut().zip(x) {
        *a += b;
    }
    round_in_place::<T>(level, h);
}

/// Rounds a tensor's f32 values to `T`, rejecting values that are or become non-finite.
pub fn to_run_dtype<T: Elem>(name: &str, values: &[f32]) -> Result<Vec<T>, WeightError> {
    let mut out = crate::mem::huge_capacity(values.len());
    for (i, &x) in values.iter().enumerate() {
        let t = T::from_f32(x);
        if !t.to_f32().is_finite() {
            return Err(WeightError::NonFinite {
                name: name.to_string(),
                index: i,
            });
        }
        out.push(t);
    }
    Ok(out)
}
