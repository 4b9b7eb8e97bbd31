//! The learner: f32 master weights and AdamW state; the model the server runs is those
//! weights rounded to the run dtype; log-probabilities come from the shared kernels (bitwise
//! the server's), gradients from `halfstep_model::backward` in the run dtype with dynamic loss
//! scaling.

use crate::loss::{token_loss, LossKind};
use crate::mismatch::MismatchStats;
use crate::optim::{
    adamw_update, clip_factor, global_norm, AdamConfig, LossScaler, LrSchedule, Moments,
};
use anyhow::{bail, Context, Result};
use halfstep_model::backward::{
    backward, forward_tape, token_logprob_backward, GradOptions, Grads, TrainWeights,
};
use halfstep_model::kernels::softmax::log_softmax;
use halfstep_model::testmodel::encode;
use halfstep_model::{ContiguousKv, Elem, Kernels, LogitsFor, Model, Span};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// How the trainer optimises.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerConfig {
    /// Learning-rate schedule.
    pub schedule: LrSchedule,
    /// AdamW hyper-parameters.
    pub adam: AdamConfig,
    /// Largest global gradient norm (0: no clipping).
    pub max_grad_norm: f64,
    /// Objective.
    pub loss: LossKind,
    /// Which parameters train.
    #[serde(with = "grad_options")]
    pub grad: GradOptions,
    /// Initial loss-scaler state.
    pub scaler: LossScaler,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        TrainerConfig {
            schedule: LrSchedule::constant(1e-5),
            adam: AdamConfig::default(),
            max_grad_norm: 1.0,
            loss: LossKind::Grpo,
            grad: GradOptions::default(),
            scaler: LossScaler::default(),
        }
    }
}

mod grad_options {
    use halfstep_model::backward::GradOptions;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    struct Repr {
        first_trainable_layer: usize,
        train_embeddings: bool,
        train_final_norm: bool,
        train_lm_head: bool,
    }

    pub fn serialize<S: Serializer>(g: &GradOptions, s: S) -> Result<S::Ok, S::Error> {
        Repr {
            first_trainable_layer: g.first_trainable_layer,
            train_embeddings: g.train_embeddings,
            train_final_norm: g.train_final_norm,
            train_lm_head: g.train_lm_head,
        }
        .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<GradOptions, D::Error> {
        let r = Repr::deserialize(d)?;
        Ok(GradOptions {
            first_trainable_layer: r.first_trainable_layer,
            train_embeddings: r.train_embeddings,
            train_final_norm: r.train_final_norm,
            train_lm_head: r.train_lm_head,
        })
    }
}

/// One sampled completion to learn from.
#[derive(Debug, Clone)]
pub struct Rollout {
    /// Prompt and completion token ids.
    pub tokens: Vec<u32>,
    /// Number of prompt tokens (at least 1).
    pub prompt_len: usize,
    /// The sampler's log-probability of each completion token.
    pub sampler_logprobs: Vec<f32>,
    /// The completion's advantage.
    pub advantage: f32,
}

/// What one step did.
#[derive(Debug, Clone)]
pub struct StepReport {
    /// Steps taken so far, this one included (skipped ones too).
    pub step: u64,
    /// Mean loss per completion token.
    pub loss: f64,
    /// Global gradient norm before clipping (unscaled; infinite when the step overflowed).
    pub grad_norm: f64,
    /// The loss scale this step ran with.
    pub loss_scale: f32,
    /// Whether the step was skipped for non-finite gradients.
    pub skipped: bool,
    /// Learning rate applied.
    pub lr: f64,
    /// Completion tokens trained on.
    pub tokens: usize,
    /// Tokens of every sequence through forward and backward.
    pub tokens_processed: usize,
    /// Sampler/learner mismatch on this batch, before the update.
    pub mismatch: MismatchStats,
    /// Wall time of forward + backward.
    pub fwd_bwd_seconds: f64,
    /// Wall time of the whole step.
    pub seconds: f64,
}

/// The persistent part of a trainer, saved beside the weights.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    config: TrainerConfig,
    dtype: String,
    steps_taken: u64,
    applied: u64,
    scaler: LossScaler,
}

/// An FP16/BF16 policy-gradient learner over a [`Model`].
pub struct Trainer<T: Elem> {
    cfg: TrainerConfig,
    model: Model<T>,
    names: Vec<String>,
    shapes: Vec<Vec<usize>>,
    master: Vec<Vec<f32>>,
    moments: HashMap<String, Moments>,
    weights: TrainWeights<f32>,
    // Kept across steps: allocating (and first touching) the buffers costs as much as a step's
    // backward on small batches.
    grads: Option<Grads<f32>>,
    scaler: LossScaler,
    steps_taken: u64,
    applied: u64,
    kern: Kernels,
}

/// The master tensors rounded to `T` and widened back: exactly the values the server holds.
fn rounded<T: Elem>(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| T::round(x)).collect()
}

impl<T: Elem> Trainer<T> {
    /// A trainer whose master weights start as `model`'s.
    pub fn new(model: Model<T>, cfg: TrainerConfig) -> Result<Trainer<T>> {
        let names = model.param_names().to_vec();
        let mut shapes = Vec::new();
        let mut master: Vec<Vec<f32>> = Vec::new();
        for n in &names {
            let p = model.param(n).context("parameter listed but missing")?;
            shapes.push(p.shape.clone());
            master.push(p.data.iter().map(|x| x.to_f32()).collect());
        }
        let weights = TrainWeights::new(
            model.config(),
            names
                .iter()
                .zip(&shapes)
                .zip(&master)
                .map(|((n, s), m)| (n.clone(), s.clone(), m.clone()))
                .collect(),
        )?;
        let kern = model.kernels().clone();
        Ok(Trainer {
            scaler: cfg.scaler.clone(),
            cfg,
            model,
            names,
            shapes,
            master,
            moments: HashMap::new(),
            weights,
            grads: None,
            steps_taken: 0,
            applied: 0,
            kern,
        })
    }

    /// The model in the run dtype (what the server should hold).
    pub fn model(&self) -> &Model<T> {
        &self.model
    }

    /// The configuration.
    pub fn config(&self) -> &TrainerConfig {
        &self.cfg
    }

    /// The loss scaler's state.
    pub fn scaler(&self) -> &LossScaler {
        &self.scaler
    }

    /// Steps taken (skipped ones included).
    pub fn steps_taken(&self) -> u64 {
        self.steps_taken
    }

    /// A master tensor (f32).
    pub fn master(&self, name: &str) -> Option<&[f32]> {
        let i = self.names.iter().position(|n| n == name)?;
        Some(&self.master[i])
    }

    /// Names of the parameters the options train.
    pub fn trainable_names(&self) -> Vec<String> {
        Grads::new(&self.weights, &self.cfg.grad)
            .names()
            .map(str::to_string)
            .collect()
    }

    /// `log p(tokens[i] | tokens[..i])` for `i` in `from..tokens.len()`, computed with the shared
    /// kernels exactly as the server computes the logprobs it reports.
    pub fn logprobs(&self, tokens: &[u32], from: usize) -> Result<Vec<f32>> {
        score(&self.model, tokens, from)
    }

    /// One policy-gradient step on `batch`: loss over all completion tokens (mean per token),
    /// gradients in the run dtype under the loss scale, skip on overflow, clip, AdamW.
    pub fn step(&mut self, batch: &[Rollout]) -> Result<StepReport> {
        let t0 = Instant::now();
        let vocab = self.model.config().vocab_size;
        let n_tokens: usize = batch.iter().map(|r| r.sampler_logprobs.len()).sum();
        let mut mismatch = MismatchStats::new();
        let scale = self.scaler.scale;
        let mut grads = match self.grads.take() {
            Some(mut g) => {
                g.zero();
                g
            }
            None => Grads::new(&self.weights, &self.cfg.grad),
        };
        let mut loss = 0f64;
        let mut processed = 0usize;
        let mut fwd_bwd = 0f64;
        for r in batch {
            let comp = r.sampler_logprobs.len();
            if r.prompt_len == 0 || r.prompt_len + comp != r.tokens.len() {
                bail!(
                    "rollout of {} tokens with a {}-token prompt has {comp} sampler logprobs",
                    r.tokens.len(),
                    r.prompt_len
                );
            }
            if comp == 0 {
                continue;
            }
            let learner = self.logprobs(&r.tokens, r.prompt_len)?;
            mismatch.add_sequence(&r.sampler_logprobs, &learner)?;
            let tf = Instant::now();
            let rows: Vec<usize> = (r.prompt_len - 1..r.tokens.len() - 1).collect();
            let tape = forward_tape(&self.weights, &self.kern, &r.tokens, &rows);
            let mut dlogits = vec![0f32; rows.len() * vocab];
            for (j, &row) in rows.iter().enumerate() {
                let target = r.tokens[row + 1] as usize;
                let (l, d) = token_loss(
                    self.cfg.loss,
                    learner[j],
                    r.sampler_logprobs[j],
                    r.advantage,
                );
                loss += l;
                // d(loss)/d(log p), under the loss scale, through log-softmax to the logits.
                token_logprob_backward(
                    &tape.logits[j * vocab..(j + 1) * vocab],
                    target,
                    d * scale / n_tokens as f32,
                    &mut dlogits[j * vocab..(j + 1) * vocab],
                );
            }
            backward(
                &self.weights,
                &self.kern,
                &tape,
                &dlogits,
                &self.cfg.grad,
                &mut grads,
            );
            fwd_bwd += tf.elapsed().as_secs_f64();
            processed += r.tokens.len();
        }
        // Gradients in the run dtype: an f16 overflow shows up here as inf.
        let mut finite = true;
        for (_, g) in grads.iter_mut() {
            for x in g.iter_mut() {
                *x = T::round(*x);
                finite &= x.is_finite();
            }
        }
        self.steps_taken += 1;
        let lr = self.cfg.schedule.at(self.applied);
        let mut report = StepReport {
            step: self.steps_taken,
            loss: loss / n_tokens.max(1) as f64,
            grad_norm: f64::INFINITY,
            loss_scale: scale,
            skipped: true,
            lr,
            tokens: n_tokens,
            tokens_processed: processed,
            mismatch,
            fwd_bwd_seconds: fwd_bwd,
            seconds: 0.0,
        };
        if !self.scaler.update(finite) {
            self.grads = Some(grads);
            report.seconds = t0.elapsed().as_secs_f64();
            return Ok(report);
        }
        let inv = 1.0 / scale;
        for (_, g) in grads.iter_mut() {
            for x in g.iter_mut() {
                *x *= inv;
            }
        }
        let norm = global_norm(grads.iter().map(|(_, g)| g));
        let clip = clip_factor(norm, self.cfg.max_grad_norm) as f32;
        self.applied += 1;
        let mut updates = Vec::new();
        for (name, g) in grads.iter() {
            let i = self.names.iter().position(|n| n == name).expect("known");
            let g: Vec<f32> = g.iter().map(|x| x * clip).collect();
            let decay = self.shapes[i].len() >= 2;
            let st = self.moments.entry(name.to_string()).or_default();
            adamw_update(
                &self.cfg.adam,
                lr,
                self.applied,
                decay,
                &mut self.master[i],
                &g,
                st,
            );
            updates.push(i);
        }
        self.grads = Some(grads);
        self.refresh(&updates)?;
        report.grad_norm = norm;
        report.skipped = false;
        report.seconds = t0.elapsed().as_secs_f64();
        Ok(report)
    }

    /// Rebuilds the run-dtype model and the f32 training weights after tensors `changed`.
    fn refresh(&mut self, changed: &[usize]) -> Result<()> {
        let mut repl = Vec::new();
        for &i in changed {
            let data: Vec<T> = self.master[i].iter().map(|&x| T::from_f32(x)).collect();
            if data.iter().any(|x| !x.to_f32().is_finite()) {
                bail!("{} left the range of {}", self.names[i], T::DTYPE.name());
            }
            repl.push((self.names[i].clone(), Arc::new(data)));
        }
        self.model = self.model.with_replaced(repl)?;
        self.weights = TrainWeights::new(
            self.model.config(),
            self.names
                .iter()
                .zip(&self.shapes)
                .zip(&self.master)
                .map(|((n, s), m)| (n.clone(), s.clone(), rounded::<T>(m)))
                .collect(),
        )?;
        Ok(())
    }

    /// A safetensors file of the run-dtype weights (the trainable ones, or all): exactly the
    /// bytes the server should load.
    pub fn weights_safetensors(&self, only_trainable: bool) -> Result<Vec<u8>> {
        let keep: Vec<String> = if only_trainable {
            self.trainable_names()
        } else {
            self.names.clone()
        };
        let mut tensors = Vec::new();
        for (i, n) in self.names.iter().enumerate() {
            if keep.contains(n) {
                tensors.push((
                    n.clone(),
                    self.shapes[i].clone(),
                    encode(T::DTYPE, &rounded::<T>(&self.master[i])),
                ));
            }
        }
        serialize(T::DTYPE, &tensors)
    }

    /// Saves master weights, AdamW moments and the trainer state into `dir`.
    pub fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        let mut tensors = Vec::new();
        for (i, n) in self.names.iter().enumerate() {
            tensors.push((
                n.clone(),
                self.shapes[i].clone(),
                encode(halfstep_model::DType::Float32, &self.master[i]),
            ));
            if let Some(m) = self.moments.get(n) {
                for (tag, v) in [("exp_avg", &m.m), ("exp_avg_sq", &m.v)] {
                    tensors.push((
                        format!("{tag}.{n}"),
                        self.shapes[i].clone(),
                        encode(halfstep_model::DType::Float32, v),
                    ));
                }
            }
        }
        let bytes = serialize(halfstep_model::DType::Float32, &tensors)?;
        let state = State {
            config: self.cfg.clone(),
            dtype: T::DTYPE.name().to_string(),
            steps_taken: self.steps_taken,
            applied: self.applied,
            scaler: self.scaler.clone(),
        };
        // Written under temporary names and renamed: a crash mid-save leaves the old checkpoint.
        let tmp = dir.join("trainer.safetensors.tmp");
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, dir.join("trainer.safetensors"))?;
        let tmp = dir.join("trainer_state.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&state)?)?;
        std::fs::rename(&tmp, dir.join("trainer_state.json"))?;
        Ok(())
    }

    /// Resumes a trainer saved by [`save_checkpoint`](Self::save_checkpoint) over `model`
    /// (the same architecture; its weights are replaced by the saved master weights).
    pub fn load_checkpoint(model: Model<T>, dir: &Path) -> Result<Trainer<T>> {
        let state: State = serde_json::from_slice(
            &std::fs::read(dir.join("trainer_state.json")).context("trainer_state.json")?,
        )?;
        if state.dtype != T::DTYPE.name() {
            bail!(
                "the checkpoint was trained in {}, not {}",
                state.dtype,
                T::DTYPE.name()
            );
        }
        let bytes =
            std::fs::read(dir.join("trainer.safetensors")).context("trainer.safetensors")?;
        let st = safetensors::SafeTensors::deserialize(&bytes)?;
        let mut t = Trainer::new(model, state.config.clone())?;
        let read = |name: &str| -> Result<Option<Vec<f32>>> {
            match st.tensor(name) {
                Ok(v) => Ok(Some(
                    v.data()
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                )),
                Err(_) => Ok(None),
            }
        };
        for i in 0..t.names.len() {
            let n = t.names[i].clone();
            let m = read(&n)?.with_context(|| format!("{n} missing from the checkpoint"))?;
            if m.len() != t.master[i].len() {
                bail!(
                    "{n} has {} values in the checkpoint, {} in the model",
                    m.len(),
                    t.master[i].len()
                );
            }
            t.master[i] = m;
            if let (Some(a), Some(b)) = (
                read(&format!("exp_avg.{n}"))?,
                read(&format!("exp_avg_sq.{n}"))?,
            ) {
                t.moments.insert(n, Moments { m: a, v: b });
            }
        }
        let all: Vec<usize> = (0..t.names.len()).collect();
        t.refresh(&all)?;
        t.steps_taken = state.steps_taken;
        t.applied = state.applied;
        t.scaler = state.scaler;
        Ok(t)
    }
}

/// A safetensors file of `(name, shape, little-endian bytes)` tensors of one dtype.
fn serialize(
    dtype: halfstep_model::DType,
    tensors: &[(String, Vec<usize>, Vec<u8>)],
) -> Result<Vec<u8>> {
    use safetensors::tensor::TensorView;
    let st_dtype = match dtype {
        halfstep_model::DType::Float16 => safetensors::Dtype::F16,
        halfstep_model::DType::Bfloat16 => safetensors::Dtype::BF16,
        halfstep_model::DType::Float32 => safetensors::Dtype::F32,
    };
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, s, b)| Ok((n.clone(), TensorView::new(st_dtype, s.clone(), b)?)))
        .collect::<Result<_>>()?;
    Ok(safetensors::tensor::serialize(views, None)?)
}

/// `log p(tokens[i] | tokens[..i])` for `i` in `from..tokens.len()` under `model`, computed with
/// the shared kernels exactly as the server computes the logprobs it reports.
pub fn score<T: Elem>(model: &Model<T>, tokens: &[u32], from: usize) -> Result<Vec<f32>> {
    if from == 0 || from > tokens.len() {
        bail!("scoring must start at a position in 1..={}", tokens.len());
    }
    let c = model.config();
    let vocab = c.vocab_size;
    let mut kv = ContiguousKv::<T>::new(c.num_hidden_layers, c.kv_dim());
    // The prompt without logits first, then the rest: rows are computed independently of how
    // the sequence is split, so this is the server's chunked prefill, bit for bit.
    if from > 1 {
        let prefix = Span {
            seq: 0,
            start_pos: 0,
            tokens: &tokens[..from - 1],
            logits: LogitsFor::None,
        };
        model.forward(&[prefix], &mut kv)?;
    }
    if tokens.len() == from {
        return Ok(Vec::new());
    }
    let rest = Span {
        seq: 0,
        start_pos: from - 1,
        tokens: &tokens[from - 1..tokens.len() - 1],
        logits: LogitsFor::All,
    };
    let logits = model.forward(&[rest], &mut kv)?;
    let mut lp = vec![0f32; vocab];
    Ok((from..tokens.len())
        .map(|pos| {
            let row = pos - from;
            log_softmax(&logits[row * vocab..(row + 1) * vocab], &mut lp);
            lp[tokens[pos] as usize]
        })
        .collect())
}
