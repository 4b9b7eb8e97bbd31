//! What the trainer hooks ask of the engine thread: swap weights between two steps, pause and
//! resume, flush the prefix cache, score token sequences, and snapshot the serving weights.

use super::engine::{Engine, NewRequest};
use super::sampler::{token_logprob, TokenLogprob};
use crate::weights::{StagedUpdate, WeightsView};
use halfstep_model::kernels::math::exp;
use halfstep_model::kernels::softmax::log_softmax;
use halfstep_model::{ContiguousKv, Elem, LogitsFor, Span};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// What happens to in-flight requests when weights change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpdateMode {
    /// Finish in-flight requests on the old weights, then swap (new requests wait).
    #[default]
    Wait,
    /// Abort in-flight requests (`finish_reason: "abort"`), then swap.
    Abort,
    /// Swap now; in-flight requests go on with the new weights.
    Continue,
}

impl std::str::FromStr for UpdateMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "wait" => Ok(UpdateMode::Wait),
            "abort" => Ok(UpdateMode::Abort),
            "continue" => Ok(UpdateMode::Continue),
            _ => Err(format!("mode must be wait, abort or continue, got '{s}'")),
        }
    }
}

/// How `/pause` treats in-flight requests (vLLM's semantics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PauseMode {
    /// Abort them.
    Abort,
    /// Let them finish, then pause.
    Wait,
    /// Freeze them with their K/V kept until `/resume`.
    Keep,
}

impl std::str::FromStr for PauseMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "abort" => Ok(PauseMode::Abort),
            "wait" => Ok(PauseMode::Wait),
            "keep" => Ok(PauseMode::Keep),
            _ => Err(format!("mode must be abort, wait or keep, got '{s}'")),
        }
    }
}

/// The outcome of a weight swap.
#[derive(Debug, Clone)]
pub struct UpdateReport {
    /// The version now serving.
    pub weight_version: u64,
    /// Tensors replaced.
    pub tensors: usize,
    /// Time the swap itself took (after staging and validation).
    pub swap_time: Duration,
    /// Time spent waiting for in-flight requests (`wait` mode).
    pub wait_time: Duration,
    /// Requests aborted (`abort` mode).
    pub aborted: usize,
}

/// A queued weight update.
pub struct UpdateCmd {
    /// The staged tensors.
    pub staged: StagedUpdate,
    /// The version to serve afterwards (default: current + 1).
    pub version: Option<u64>,
    /// What happens to in-flight requests.
    pub mode: UpdateMode,
    /// Where the outcome goes.
    pub reply: oneshot::Sender<Result<UpdateReport, String>>,
    /// When the engine received it.
    pub(super) queued: Instant,
}

impl UpdateCmd {
    /// A command to send.
    pub fn new(
        staged: StagedUpdate,
        version: Option<u64>,
        mode: UpdateMode,
    ) -> (UpdateCmd, oneshot::Receiver<Result<UpdateReport, String>>) {
        let (reply, rx) = oneshot::channel();
        let cmd = UpdateCmd {
            staged,
            version,
            mode,
            reply,
            queued: Instant::now(),
        };
        (cmd, rx)
    }
}

/// Sequences to score under the current weights.
#[derive(Debug, Clone)]
pub struct ScoreRequest {
    /// Token ids, each sequence scored on its own.
    pub sequences: Vec<Vec<u32>>,
    /// Alternatives to return per position.
    pub top_logprobs: usize,
    /// Also return the entropy of each position's distribution.
    pub entropy: bool,
}

/// One scored position: the token's logprob (with rank and top) and optionally the entropy.
#[derive(Debug, Clone)]
pub struct ScoredToken {
    /// Log-probability of the token given its prefix, with rank and alternatives.
    pub logprob: TokenLogprob,
    /// Entropy of the distribution at this position (nats).
    pub entropy: Option<f32>,
}

/// Scores: per sequence, per position (`None` for the first token).
#[derive(Debug, Clone)]
pub struct ScoreResult {
    /// The weights that scored.
    pub weight_version: u64,
    /// Per sequence.
    pub sequences: Vec<Vec<Option<ScoredToken>>>,
}

impl<T: Elem> Engine<T> {
    pub(super) fn queue_update(&mut self, cmd: UpdateCmd) {
        if let Some(prev) = self.pending_update.take() {
            // Updates are serialised by the API; a second one here replaces nothing silently.
            let _ = prev.reply.send(Err("superseded by a newer update".into()));
        }
        match cmd.mode {
            UpdateMode::Abort => {
                let ids: Vec<String> = self.requests.keys().cloned().collect();
                let n = ids.len();
                for id in ids {
                    self.abort(&id, true);
                }
                self.apply_update(cmd, n);
            }
            // While paused nothing runs, so there is nothing to wait for.
            UpdateMode::Continue => self.apply_update(cmd, 0),
            UpdateMode::Wait if self.paused || !self.sched.has_work() => self.apply_update(cmd, 0),
            UpdateMode::Wait => self.pending_update = Some(cmd),
        }
    }

    fn apply_update(&mut self, cmd: UpdateCmd, aborted: usize) {
        let wait_time = cmd.queued.elapsed();
        let t0 = Instant::now();
        let result = match cmd.staged.tensors.downcast::<Vec<(String, Arc<Vec<T>>)>>() {
            Err(_) => Err("staged tensors have the wrong dtype".to_string()),
            Ok(tensors) => {
                let count = tensors.len();
                match self.model.with_replaced(*tensors) {
                    Err(e) => Err(e.to_string()),
                    Ok(m) => {
                        self.model = m;
                        self.weight_version = cmd.version.unwrap_or(self.weight_version + 1);
                        // Cached K/V were computed by the old weights.
                        self.sched.blocks.reset_prefix_cache();
                        Ok(UpdateReport {
                            weight_version: self.weight_version,
                            tensors: count,
                            swap_time: t0.elapsed(),
                            wait_time,
                            aborted,
                        })
                    }
                }
            }
        };
        self.publish_stats();
        let _ = cmd.reply.send(result);
        for r in std::mem::take(&mut self.deferred) {
            self.add(r);
        }
    }

    /// Holds a new request back while a `wait` update drains the old ones.
    pub(super) fn defer_if_updating(&mut self, r: NewRequest) -> Option<NewRequest> {
        if self.pending_update.is_some() {
            self.deferred.push(r);
            None
        } else {
            Some(r)
        }
    }

    pub(super) fn pause(&mut self, mode: PauseMode, reply: oneshot::Sender<()>) {
        match mode {
            PauseMode::Abort => {
                let ids: Vec<String> = self.requests.keys().cloned().collect();
                for id in ids {
                    self.abort(&id, true);
                }
                self.paused = true;
            }
            PauseMode::Keep => self.paused = true,
            PauseMode::Wait => {}
        }
        // Wait mode replies from `maintain` once the engine is idle.
        self.drain_waiters.push(reply);
        self.maintain();
        if self.paused {
            self.publish_stats();
            for w in self.drain_waiters.drain(..) {
                let _ = w.send(());
            }
        }
    }

    /// Runs what was waiting for the engine to go idle (a `wait` update, a `wait` pause).
    pub(super) fn maintain(&mut self) {
        if self.sched.has_work() && !self.paused {
            return;
        }
        if let Some(cmd) = self.pending_update.take() {
            self.apply_update(cmd, 0);
        }
        if !self.drain_waiters.is_empty() && !self.sched.has_work() {
            self.paused = true;
            // Published before replying, so /is_paused agrees once /pause has returned.
            self.publish_stats();
            for w in self.drain_waiters.drain(..) {
                let _ = w.send(());
            }
        }
    }

    pub(super) fn score(&mut self, req: &ScoreRequest) -> Result<ScoreResult, String> {
        let c = self.model.config().clone();
        let vocab = c.vocab_size;
        let mut out = Vec::with_capacity(req.sequences.len());
        let mut lp = vec![0f32; vocab];
        for seq in &req.sequences {
            let mut kv = ContiguousKv::<T>::new(c.num_hidden_layers, c.kv_dim());
            let span = Span {
                seq: 0,
                start_pos: 0,
                tokens: seq,
                logits: LogitsFor::All,
            };
            let logits = self
                .model
                .forward(&[span], &mut kv)
                .map_err(|e| e.to_string())?;
            let mut scored = vec![None];
            for pos in 1..seq.len() {
                // The same function the sampler reports raw logprobs with: identical bits.
                log_softmax(&logits[(pos - 1) * vocab..pos * vocab], &mut lp);
                let entropy = req.entropy.then(|| {
                    let mut h = 0f32;
                    for &l in &lp {
                        if l > f32::NEG_INFINITY {
                            h -= exp(l) * l;
                        }
                    }
                    h
                });
                scored.push(Some(ScoredToken {
                    logprob: token_logprob(&lp, seq[pos], req.top_logprobs),
                    entropy,
                }));
            }
            out.push(scored);
        }
        Ok(ScoreResult {
            weight_version: self.weight_version,
            sequences: out,
        })
    }

    pub(super) fn snapshot(&self) -> Arc<dyn WeightsView> {
        Arc::new(self.model.clone())
    }
}
