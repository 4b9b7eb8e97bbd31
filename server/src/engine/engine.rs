//! The engine loop: one thread owns the model, the K/V pool and the scheduler; callers submit
//! requests through an [`EngineHandle`] and receive per-step outputs on a channel. Dropping the
//! receiver aborts the request.

use super::block_manager::BlockManager;
use super::detokenizer::IncrementalDetokenizer;
use super::hooks::{PauseMode, ScoreRequest, ScoreResult, UpdateCmd, UpdateMode, UpdateReport};
use super::kv_pool::{BlockId, KvPool};
use super::sampler::{
    sample, token_logprob, LogprobsMode, SampleContext, Sampled, SeqRng, TokenLogprob,
};
use super::sampling_params::SamplingParams;
use super::scheduler::{Scheduler, SchedulerConfig};
use super::sequence::{FinishReason, GeneratedToken, RequestInfo, SeqStatus, Sequence, StopReason};
use crate::metrics::Metrics;
use crate::weights::staging::TypedStaging;
use crate::weights::{StagedUpdate, Staging, WeightsView};
use halfstep_model::kernels::softmax::log_softmax;
use halfstep_model::{DType, Elem, LogitsFor, Model, ModelConfig, Span, Tokenizer};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::sync::oneshot;

/// How the engine is sized and behaves.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most sequences running at once (`--max-num-seqs`).
    pub max_num_seqs: usize,
    /// Token budget of one step (`--max-num-batched-tokens`).
    pub max_num_batched_tokens: usize,
    /// Positions per K/V block.
    pub block_size: usize,
    /// K/V blocks (`--num-kv-blocks`); if `None`, from `kv_cache_memory`.
    pub num_kv_blocks: Option<usize>,
    /// Bytes for the K/V cache (`--kv-cache-memory`).
    pub kv_cache_memory: usize,
    /// Longest prompt + output (`--max-model-len`); at most the model's context.
    pub max_model_len: usize,
    /// Cap on `logprobs`/`prompt_logprobs` (`--max-logprobs`).
    pub max_logprobs: usize,
    /// Distribution logprobs report (`--logprobs-mode`).
    pub logprobs_mode: LogprobsMode,
    /// Seed of the streams of requests that give none (`--seed`).
    pub seed: u64,
    /// Automatic prefix caching.
    pub enable_prefix_caching: bool,
    /// Where the engine records Prometheus metrics, if anywhere.
    pub metrics: Option<Arc<Metrics>>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_num_seqs: 256,
            max_num_batched_tokens: 2048,
            block_size: 16,
            num_kv_blocks: None,
            kv_cache_memory: 512 << 20,
            max_model_len: 8192,
            max_logprobs: 20,
            logprobs_mode: LogprobsMode::Raw,
            seed: 0,
            enable_prefix_caching: true,
            metrics: None,
        }
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// A parameter is out of range.
    #[error("{message}")]
    InvalidRequest {
        /// The parameter.
        param: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The prompt plus `max_tokens` exceed `max_model_len`.
    #[error("this model's maximum context length is {max_model_len} tokens; the request has {prompt_tokens} prompt tokens and asks for {max_tokens} more")]
    ContextTooLong {
        /// Context limit.
        max_model_len: usize,
        /// Prompt tokens.
        prompt_tokens: usize,
        /// Requested output tokens.
        max_tokens: usize,
    },
    /// The K/V cache cannot hold the prompt even when empty.
    #[error("the prompt needs {needed} K/V blocks but the cache has only {available}; raise --kv-cache-memory or --num-kv-blocks")]
    CacheTooSmall {
        /// Blocks the prompt needs.
        needed: usize,
        /// Blocks in the cache.
        available: usize,
    },
    /// Another live request has the same id.
    #[error("request id '{0}' is already in use")]
    DuplicateRequestId(String),
    /// The engine thread is gone.
    #[error("the engine has stopped")]
    Stopped,
}

/// What a request's channel carries.
#[derive(Debug, Clone, PartialEq)]
pub enum RequestOutput {
    /// Log-probabilities of the prompt tokens (the first is `None`), before any sample output.
    PromptLogprobs(Vec<Option<TokenLogprob>>),
    /// New tokens and text of one sample.
    Sample(SampleOutput),
    /// The request failed after it was queued.
    Error(EngineError),
}

/// One step's output for one sample.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleOutput {
    /// Which of the `n` samples.
    pub index: usize,
    /// Tokens generated since the last output.
    pub tokens: Vec<GeneratedToken>,
    /// Text added since the last output.
    pub text: String,
    /// Set on the last output of the sample.
    pub finish_reason: Option<FinishReason>,
    /// The stop string or token id that ended it.
    pub stop_reason: Option<StopReason>,
    /// Prompt tokens whose K/V came from the prefix cache.
    pub num_cached_tokens: usize,
}

/// Engine counters, readable from any thread without locking.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Sequences running.
    pub running: AtomicU64,
    /// Sequences waiting.
    pub waiting: AtomicU64,
    /// Blocks free or evictable.
    pub free_blocks: AtomicU64,
    /// Blocks in the pool.
    pub total_blocks: AtomicU64,
    /// Whether no block has an owner.
    pub all_blocks_free: AtomicBool,
    /// Preemptions since start.
    pub preemptions: AtomicU64,
    /// Prefix cache queries (tokens).
    pub prefix_queries: AtomicU64,
    /// Prefix cache hits (tokens).
    pub prefix_hits: AtomicU64,
    /// Steps run.
    pub steps: AtomicU64,
    /// Current weight version.
    pub weight_version: AtomicU64,
    /// Whether generation is paused.
    pub paused: AtomicBool,
    /// Set if the engine thread died (a bug); nothing is served after that.
    pub engine_dead: AtomicBool,
}

/// Static facts about the engine, for validation before submitting.
#[derive(Debug, Clone)]
pub struct EngineInfo {
    /// Run dtype.
    pub dtype: DType,
    /// Vocabulary size of the model.
    pub vocab_size: usize,
    /// Longest prompt + output.
    pub max_model_len: usize,
    /// Cap on logprobs.
    pub max_logprobs: usize,
    /// Positions per block.
    pub block_size: usize,
    /// Blocks in the pool.
    pub num_blocks: usize,
    /// End-of-sequence token ids.
    pub eos_token_ids: Vec<u32>,
}

enum Command {
    Add(Box<NewRequest>),
    Abort(String),
    Update(Box<UpdateCmd>),
    Pause(PauseMode, oneshot::Sender<()>),
    Resume(oneshot::Sender<()>),
    ResetPrefixCache(oneshot::Sender<()>),
    Score(
        Box<ScoreRequest>,
        oneshot::Sender<Result<ScoreResult, String>>,
    ),
    Snapshot(oneshot::Sender<Arc<dyn WeightsView>>),
    Shutdown,
}

pub(super) struct NewRequest {
    info: Arc<RequestInfo>,
    tx: UnboundedSender<RequestOutput>,
}

type StagingFactory = Arc<dyn Fn() -> Box<dyn Staging> + Send + Sync>;

/// A cheap, cloneable way to talk to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    stats: Arc<EngineStats>,
    info: Arc<EngineInfo>,
    tokenizer: Arc<Tokenizer>,
    new_staging: StagingFactory,
    config: Arc<ModelConfig>,
    metrics: Option<Arc<Metrics>>,
}

impl EngineHandle {
    /// Static facts about the engine.
    pub fn info(&self) -> &EngineInfo {
        &self.info
    }

    /// Live counters.
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// The tokenizer the engine detokenises with.
    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    /// Checks a request against the engine's limits without queuing it.
    pub fn check(&self, prompt: &[u32], params: &SamplingParams) -> Result<(), EngineError> {
        let info = &self.info;
        params
            .validate(info.max_logprobs)
            .map_err(|e| EngineError::InvalidRequest {
                param: e.param,
                message: e.message,
            })?;
        if prompt.is_empty() {
            return Err(EngineError::InvalidRequest {
                param: "prompt",
                message: "the prompt is empty".into(),
            });
        }
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= info.vocab_size) {
            return Err(EngineError::InvalidRequest {
                param: "prompt",
                message: format!(
                    "token id {bad} is out of range (vocabulary size {})",
                    info.vocab_size
                ),
            });
        }
        if prompt.len() + params.max_tokens > info.max_model_len {
            return Err(EngineError::ContextTooLong {
                max_model_len: info.max_model_len,
                prompt_tokens: prompt.len(),
                max_tokens: params.max_tokens,
            });
        }
        let needed = (prompt.len() + 1).div_ceil(info.block_size);
        if needed > info.num_blocks {
            return Err(EngineError::CacheTooSmall {
                needed,
                available: info.num_blocks,
            });
        }
        Ok(())
    }

    /// Validates and queues a request; outputs arrive on the returned channel.
    pub fn submit(
        &self,
        id: String,
        prompt: Vec<u32>,
        params: SamplingParams,
    ) -> Result<UnboundedReceiver<RequestOutput>, EngineError> {
        self.check(&prompt, &params)?;
        let stop_hold = params.stop.iter().map(|s| s.len()).max().unwrap_or(0);
        let (tx, rx) = unbounded_channel();
        let info = Arc::new(RequestInfo {
            id,
            prompt,
            params,
            stop_hold,
            arrival: Instant::now(),
        });
        self.tx
            .send(Command::Add(Box::new(NewRequest { info, tx })))
            .map_err(|_| EngineError::Stopped)?;
        Ok(rx)
    }

    /// Aborts a request; its unfinished samples end with `finish_reason: abort`.
    pub fn abort(&self, id: &str) {
        let _ = self.tx.send(Command::Abort(id.to_string()));
    }

    /// Stops the engine thread after the current step.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown);
    }

    /// The metrics the engine records into, if any.
    pub fn metrics(&self) -> Option<Arc<Metrics>> {
        self.metrics.clone()
    }

    /// The served model's configuration.
    pub fn model_config(&self) -> &ModelConfig {
        &self.config
    }

    /// An empty staging buffer in the engine's run dtype.
    pub fn new_staging(&self) -> Box<dyn Staging> {
        (self.new_staging)()
    }

    /// Queues a staged weight update; the reply comes after the swap.
    pub async fn update_weights(
        &self,
        staged: StagedUpdate,
        version: Option<u64>,
        mode: UpdateMode,
    ) -> Result<UpdateReport, String> {
        let (cmd, rx) = UpdateCmd::new(staged, version, mode);
        self.tx
            .send(Command::Update(Box::new(cmd)))
            .map_err(|_| EngineError::Stopped.to_string())?;
        rx.await.map_err(|_| EngineError::Stopped.to_string())?
    }

    async fn call<R>(
        &self,
        make: impl FnOnce(oneshot::Sender<R>) -> Command,
    ) -> Result<R, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)
    }

    /// Pauses generation (returns when the pause is in effect).
    pub async fn pause(&self, mode: PauseMode) -> Result<(), EngineError> {
        self.call(|r| Command::Pause(mode, r)).await
    }

    /// Resumes generation.
    pub async fn resume(&self) -> Result<(), EngineError> {
        self.call(Command::Resume).await
    }

    /// Forgets every cached prefix block.
    pub async fn reset_prefix_cache(&self) -> Result<(), EngineError> {
        self.call(Command::ResetPrefixCache).await
    }

    /// Scores token sequences under the current weights.
    pub async fn score(
        &self,
        req: ScoreRequest,
    ) -> Result<Result<ScoreResult, String>, EngineError> {
        self.call(|r| Command::Score(Box::new(req), r)).await
    }

    /// A snapshot of the serving weights.
    pub async fn snapshot(&self) -> Result<Arc<dyn WeightsView>, EngineError> {
        self.call(Command::Snapshot).await
    }
}

pub(super) struct RequestState {
    info: Arc<RequestInfo>,
    tx: UnboundedSender<RequestOutput>,
    seq_ids: Vec<u64>,
    seed: u64,
    forked: bool,
    prompt_logprobs: Option<Vec<Option<TokenLogprob>>>,
    prompt_logprobs_sent: bool,
    num_cached_tokens: usize,
}

pub(super) struct Engine<T: Elem> {
    pub(super) model: Model<T>,
    tokenizer: Arc<Tokenizer>,
    pool: KvPool<T>,
    pub(super) sched: Scheduler,
    pub(super) requests: HashMap<String, RequestState>,
    cfg: EngineConfig,
    next_seq_id: u64,
    pub(super) weight_version: u64,
    seeds: SeqRng,
    stats: Arc<EngineStats>,
    eos: Vec<u32>,
    /// No steps run while paused (requests are kept).
    pub(super) paused: bool,
    /// A `wait` update holding until in-flight requests finish.
    pub(super) pending_update: Option<UpdateCmd>,
    /// Requests that arrived while a `wait` update drains.
    pub(super) deferred: Vec<NewRequest>,
    /// `/pause?mode=wait` callers waiting for the engine to go idle.
    pub(super) drain_waiters: Vec<oneshot::Sender<()>>,
    /// Cumulative counters as last published to the metrics: (prefix queries, hits, preemptions).
    published: (u64, u64, u64),
    /// Test-only fault: panic once this many steps have run (`HALFSTEP_FAULT_ENGINE_PANIC_STEP`).
    panic_at_step: Option<u64>,
    /// The last step's logits, kept so a step does not allocate and clear a fresh buffer.
    logits: Vec<f32>,
}

/// Starts the engine thread for `model` and returns its handle.
pub fn start_engine<T: Elem>(
    model: Model<T>,
    tokenizer: Arc<Tokenizer>,
    mut cfg: EngineConfig,
) -> EngineHandle {
    let c = model.config().clone();
    cfg.max_model_len = cfg.max_model_len.min(c.max_position_embeddings);
    let bytes_per_block =
        KvPool::<T>::bytes_per_block(c.num_hidden_layers, cfg.block_size, c.kv_dim());
    let num_blocks = cfg
        .num_kv_blocks
        .unwrap_or(cfg.kv_cache_memory / bytes_per_block)
        .max(1);
    let pool = KvPool::<T>::new(c.num_hidden_layers, num_blocks, cfg.block_size, c.kv_dim());
    let blocks = BlockManager::new(num_blocks, cfg.block_size, cfg.enable_prefix_caching);
    let sched = Scheduler::new(
        SchedulerConfig {
            max_num_seqs: cfg.max_num_seqs,
            max_num_batched_tokens: cfg.max_num_batched_tokens,
        },
        blocks,
    );
    let mut eos: Vec<u32> = tokenizer.eos_token_ids().to_vec();
    for e in &c.eos_token_ids {
        if !eos.contains(e) {
            eos.push(*e);
        }
    }
    let info = Arc::new(EngineInfo {
        dtype: T::DTYPE,
        vocab_size: c.vocab_size,
        max_model_len: cfg.max_model_len,
        max_logprobs: cfg.max_logprobs,
        block_size: cfg.block_size,
        num_blocks,
        eos_token_ids: eos.clone(),
    });
    let stats = Arc::new(EngineStats::default());
    stats
        .total_blocks
        .store(num_blocks as u64, Ordering::Relaxed);
    stats
        .free_blocks
        .store(num_blocks as u64, Ordering::Relaxed);
    stats.all_blocks_free.store(true, Ordering::Relaxed);
    let (tx, rx) = mpsc::channel();
    let cfg_metrics = cfg.metrics.clone();
    if let Some(m) = &cfg_metrics {
        m.cache_config_info
            .with_label_values(&[
                &cfg.block_size.to_string(),
                &num_blocks.to_string(),
                T::DTYPE.name(),
                &cfg.enable_prefix_caching.to_string(),
            ])
            .set(1.0);
    }
    let mut engine = Engine {
        model,
        tokenizer: tokenizer.clone(),
        pool,
        sched,
        requests: HashMap::new(),
        seeds: SeqRng::new(cfg.seed, u64::MAX),
        cfg,
        next_seq_id: 0,
        weight_version: 0,
        stats: stats.clone(),
        eos,
        paused: false,
        pending_update: None,
        deferred: Vec::new(),
        drain_waiters: Vec::new(),
        published: (0, 0, 0),
        panic_at_step: std::env::var("HALFSTEP_FAULT_ENGINE_PANIC_STEP")
            .ok()
            .and_then(|v| v.parse().ok()),
        logits: Vec::new(),
    };
    let dead = stats.clone();
    std::thread::Builder::new()
        .name("halfstep-engine".into())
        .spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| engine.run(rx)));
            if r.is_err() {
                // A bug: say so instead of leaving requests hanging; the server exits non-zero.
                tracing::error!("the engine thread panicked; the server is no longer serving");
                dead.engine_dead.store(true, Ordering::SeqCst);
            }
        })
        .expect("spawning the engine thread");
    let staging_config = c.clone();
    EngineHandle {
        tx,
        stats,
        info,
        tokenizer,
        new_staging: Arc::new(move || {
            Box::new(TypedStaging::<T>::new(staging_config.clone())) as Box<dyn Staging>
        }),
        config: Arc::new(c),
        metrics: cfg_metrics,
    }
}

impl<T: Elem> Engine<T> {
    fn run(&mut self, rx: mpsc::Receiver<Command>) {
        loop {
            let cmd = if !self.paused && self.sched.has_work() {
                match rx.try_recv() {
                    Ok(c) => Some(c),
                    Err(mpsc::TryRecvError::Empty) => None,
                    Err(mpsc::TryRecvError::Disconnected) => return,
                }
            } else {
                match rx.recv() {
                    Ok(c) => Some(c),
                    Err(_) => return,
                }
            };
            if let Some(cmd) = cmd {
                match cmd {
                    Command::Add(r) => {
                        if let Some(r) = self.defer_if_updating(*r) {
                            self.add(r)
                        }
                    }
                    Command::Abort(id) => self.abort(&id, true),
                    Command::Update(u) => self.queue_update(*u),
                    Command::Pause(mode, reply) => self.pause(mode, reply),
                    Command::Resume(reply) => {
                        self.paused = false;
                        self.publish_stats();
                        let _ = reply.send(());
                    }
                    Command::ResetPrefixCache(reply) => {
                        self.sched.blocks.reset_prefix_cache();
                        let _ = reply.send(());
                    }
                    Command::Score(req, reply) => {
                        let _ = reply.send(self.score(&req));
                    }
                    Command::Snapshot(reply) => {
                        let _ = reply.send(self.snapshot());
                    }
                    Command::Shutdown => return,
                }
                self.maintain();
                // Take every queued command before the next step so requests batch together.
                continue;
            }
            self.step();
            self.publish_stats();
            self.maintain();
        }
    }

    pub(super) fn publish_stats(&mut self) {
        let s = &self.stats;
        let b = &self.sched.blocks;
        s.running
            .store(self.sched.num_running() as u64, Ordering::Relaxed);
        s.waiting
            .store(self.sched.num_waiting() as u64, Ordering::Relaxed);
        s.free_blocks.store(b.num_free() as u64, Ordering::Relaxed);
        s.all_blocks_free.store(b.all_free(), Ordering::Relaxed);
        s.preemptions
            .store(self.sched.num_preemptions, Ordering::Relaxed);
        s.prefix_queries.store(b.prefix_queries, Ordering::Relaxed);
        s.prefix_hits.store(b.prefix_hits, Ordering::Relaxed);
        s.weight_version
            .store(self.weight_version, Ordering::Relaxed);
        s.paused.store(self.paused, Ordering::Relaxed);
        if let Some(m) = self.cfg.metrics.as_deref() {
            let total = b.num_blocks() as i64;
            let free = b.num_free() as i64;
            m.num_requests_running.set(self.sched.num_running() as i64);
            m.num_requests_waiting
                .set((self.sched.num_waiting() + self.deferred.len()) as i64);
            m.num_requests_waiting_by_reason
                .with_label_values(&["capacity"])
                .set(self.sched.num_waiting() as i64);
            m.num_requests_waiting_by_reason
                .with_label_values(&["deferred"])
                .set(self.deferred.len() as i64);
            m.kv_blocks_total.set(total);
            m.kv_blocks_free.set(free);
            m.kv_cache_usage
                .set(1.0 - free as f64 / total.max(1) as f64);
            m.weight_version.set(self.weight_version as i64);
            let now = (b.prefix_queries, b.prefix_hits, self.sched.num_preemptions);
            m.prefix_cache_queries.inc_by(now.0 - self.published.0);
            m.prefix_cache_hits.inc_by(now.1 - self.published.1);
            m.num_preemptions.inc_by(now.2 - self.published.2);
            self.published = now;
        }
    }

    /// Records a finished (or aborted) sequence in the metrics.
    fn record_finish(&self, seq: &Sequence, reason: FinishReason) {
        let Some(m) = self.cfg.metrics.as_deref() else {
            return;
        };
        let now = Instant::now();
        m.request_success
            .with_label_values(&[reason.as_str()])
            .inc();
        m.e2e_request_latency
            .observe((now - seq.request.arrival).as_secs_f64());
        m.request_prompt_tokens.observe(seq.prompt_len() as f64);
        m.request_generation_tokens
            .observe(seq.generated.len() as f64);
        m.request_max_num_generation_tokens
            .observe(seq.request.params.max_tokens as f64);
        if let (Some(first), Some(last)) = (seq.first_token_at, seq.last_token_at) {
            if seq.generated.len() > 1 {
                let per = (last - first).as_secs_f64() / (seq.generated.len() - 1) as f64;
                m.request_time_per_output_token.observe(per);
            }
        }
        if let Some(t) = seq.first_token_at {
            m.request_decode_time.observe((now - t).as_secs_f64());
        }
        if let Some(t) = seq.first_scheduled {
            m.request_inference_time.observe((now - t).as_secs_f64());
        }
    }

    fn new_seq(&mut self, info: &Arc<RequestInfo>, index: usize, seed: u64) -> Sequence {
        self.next_seq_id += 1;
        Sequence {
            id: self.next_seq_id,
            request: info.clone(),
            sample_index: index,
            tokens: info.prompt.clone(),
            num_computed: 0,
            block_table: Vec::new(),
            status: SeqStatus::Waiting,
            rng: SeqRng::new(seed, index as u64),
            generated: Vec::new(),
            pending: 0,
            detok: IncrementalDetokenizer::default(),
            stop_reason: None,
            preemptions: 0,
            block_hashes: Vec::new(),
            cached_prompt_tokens: 0,
            first_scheduled: None,
            first_token_at: None,
            last_token_at: None,
        }
    }

    pub(super) fn add(&mut self, r: NewRequest) {
        let id = r.info.id.clone();
        if self.requests.contains_key(&id) {
            let _ =
                r.tx.send(RequestOutput::Error(EngineError::DuplicateRequestId(id)));
            return;
        }
        let seed = r.info.params.seed.unwrap_or_else(|| self.seeds.next_u64());
        let leader = self.new_seq(&r.info, 0, seed);
        let prompt_logprobs = r
            .info
            .params
            .prompt_logprobs
            .map(|_| vec![None; r.info.prompt.len()]);
        self.requests.insert(
            id,
            RequestState {
                seq_ids: vec![leader.id],
                info: r.info,
                tx: r.tx,
                seed,
                forked: false,
                prompt_logprobs,
                prompt_logprobs_sent: false,
                num_cached_tokens: 0,
            },
        );
        self.sched.add(leader);
        self.publish_stats();
    }

    /// Ends every unfinished sample of a request; `notify` sends `finish_reason: abort`.
    pub(super) fn abort(&mut self, id: &str, notify: bool) {
        let Some(st) = self.requests.remove(id) else {
            return;
        };
        let mut st = st;
        if notify {
            // Samples not forked yet get their abort too.
            close_unforked(&mut st, FinishReason::Abort);
        }
        for sid in st.seq_ids {
            if let Some(seq) = self.sched.remove(sid) {
                self.record_finish(&seq, FinishReason::Abort);
                if notify {
                    let _ = st.tx.send(RequestOutput::Sample(SampleOutput {
                        index: seq.sample_index,
                        tokens: seq.generated[seq.generated.len() - seq.pending..].to_vec(),
                        text: String::new(),
                        finish_reason: Some(FinishReason::Abort),
                        stop_reason: None,
                        num_cached_tokens: st.num_cached_tokens,
                    }));
                }
            }
        }
        self.publish_stats();
    }

    fn step(&mut self) {
        // Fault injection for the black-box test of an engine crash (see tests/http.rs).
        if let Some(n) = self.panic_at_step {
            if self.stats.steps.load(Ordering::Relaxed) >= n {
                panic!("HALFSTEP_FAULT_ENGINE_PANIC_STEP={n} reached");
            }
        }
        // Clients that went away: free their blocks before planning.
        let gone: Vec<String> = self
            .requests
            .iter()
            .filter(|(_, st)| st.tx.is_closed())
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            self.abort(&id, false);
        }
        let plan = self.sched.schedule();
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let metrics = self.cfg.metrics.clone();
        for s in &plan.scheduled {
            if let Some(seq) = self.sched.seqs.get_mut(&s.id) {
                if seq.first_scheduled.is_none() {
                    seq.first_scheduled = Some(now);
                    if let Some(m) = &metrics {
                        m.request_queue_time
                            .observe((now - seq.request.arrival).as_secs_f64());
                    }
                }
            }
        }
        if let Some(m) = &metrics {
            if !plan.scheduled.is_empty() {
                m.iteration_tokens
                    .observe(plan.scheduled.iter().map(|s| s.len).sum::<usize>() as f64);
            }
        }
        if plan.scheduled.is_empty() {
            self.fail_unschedulable();
            return;
        }
        for &(src, dst) in &plan.copies {
            self.pool.copy_block(src, dst);
        }
        let mut logits = std::mem::take(&mut self.logits);
        let done = {
            let seqs = &self.sched.seqs;
            let spans: Vec<Span> = plan
                .scheduled
                .iter()
                .enumerate()
                .map(|(i, s)| Span {
                    seq: i,
                    start_pos: s.start,
                    tokens: &seqs[&s.id].tokens[s.start..s.start + s.len],
                    logits: s.logits,
                })
                .collect();
            let tables: Vec<&[BlockId]> = plan
                .scheduled
                .iter()
                .map(|s| seqs[&s.id].block_table.as_slice())
                .collect();
            let mut view = self.pool.view(&tables);
            self.model.forward_into(&spans, &mut view, &mut logits)
        };
        match done {
            Ok(()) => {}
            Err(e) => {
                // Inputs are validated at submit, so this is a bug; fail the batch, keep serving.
                tracing::error!("forward failed: {e}");
                let ids: Vec<String> = plan
                    .scheduled
                    .iter()
                    .filter_map(|s| self.sched.seqs.get(&s.id).map(|q| q.request.id.clone()))
                    .collect();
                for id in ids {
                    self.abort(&id, true);
                }
                return;
            }
        };
        let vocab = self.model.config().vocab_size;
        let mut row = 0;
        let mut touched: Vec<String> = Vec::new();
        // (sequence, offset of its logits row): sampled together once bookkeeping is done.
        let mut to_sample: Vec<(u64, usize)> = Vec::new();
        for s in &plan.scheduled {
            let rows = match s.logits {
                LogitsFor::None => 0,
                LogitsFor::Last => 1,
                LogitsFor::All => s.len,
            };
            let block = &logits[row * vocab..(row + rows) * vocab];
            row += rows;
            let Some(seq) = self.sched.seqs.get_mut(&s.id) else {
                continue;
            };
            seq.num_computed += s.len;
            let computed = seq.num_computed;
            self.sched.blocks.cache_full_blocks(
                &seq.block_table,
                &seq.tokens[..computed],
                &mut seq.block_hashes,
            );
            let req_id = seq.request.id.clone();
            if s.logits == LogitsFor::All {
                self.record_prompt_logprobs(&req_id, s.start, s.len, block);
            }
            if computed == self.sched.seqs[&s.id].tokens.len() && rows > 0 {
                to_sample.extend(
                    self.fork_samples(s.id)
                        .into_iter()
                        .map(|sid| (sid, (row - 1) * vocab)),
                );
                if !touched.contains(&req_id) {
                    touched.push(req_id);
                }
            }
        }
        self.sample_all(&to_sample, &logits, vocab);
        self.logits = logits;
        for id in touched {
            self.emit(&id);
        }
    }

    /// A waiting sequence that cannot fit even in an empty cache (it grew past it) ends.
    fn fail_unschedulable(&mut self) {
        if self.sched.num_running() > 0 || self.sched.num_waiting() == 0 {
            return;
        }
        let stuck: Vec<String> = self
            .sched
            .seqs
            .values()
            .filter(|s| s.status == SeqStatus::Waiting)
            .map(|s| s.request.id.clone())
            .collect();
        for id in stuck {
            if let Some(st) = self.requests.get(&id) {
                for &sid in &st.seq_ids.clone() {
                    if let Some(seq) = self.sched.seqs.get_mut(&sid) {
                        if seq.status == SeqStatus::Waiting {
                            seq.status = SeqStatus::Finished(FinishReason::Length);
                        }
                    }
                }
            }
            self.emit(&id);
        }
    }

    fn record_prompt_logprobs(&mut self, req_id: &str, start: usize, len: usize, block: &[f32]) {
        let vocab = self.model.config().vocab_size;
        let Some(st) = self.requests.get_mut(req_id) else {
            return;
        };
        let k = st.info.params.prompt_logprobs.unwrap_or(0);
        let prompt = &st.info.prompt;
        let Some(entries) = st.prompt_logprobs.as_mut() else {
            return;
        };
        let mut lp = vec![0f32; vocab];
        for i in 0..len {
            let next = start + i + 1;
            if next >= prompt.len() {
                break;
            }
            log_softmax(&block[i * vocab..(i + 1) * vocab], &mut lp);
            entries[next] = Some(token_logprob(&lp, prompt[next], k));
        }
    }

    /// The sequences to sample from `id`'s logits: `id` itself, and its `n > 1` siblings when
    /// its prompt just ended (they are forked here).
    fn fork_samples(&mut self, id: u64) -> Vec<u64> {
        let (req_id, fork) = {
            let seq = &self.sched.seqs[&id];
            let st = &self.requests[&seq.request.id];
            (
                seq.request.id.clone(),
                seq.sample_index == 0 && !st.forked && seq.request.params.n > 1,
            )
        };
        let mut ids = vec![id];
        if let Some(st) = self.requests.get_mut(&req_id) {
            let seq = &self.sched.seqs[&id];
            if seq.sample_index == 0 && seq.generated.is_empty() {
                st.num_cached_tokens = seq.cached_prompt_tokens;
            }
        }
        if fork {
            let (info, seed) = {
                let st = &self.requests[&req_id];
                (st.info.clone(), st.seed)
            };
            for i in 1..info.params.n {
                let mut sib = self.new_seq(&info, i, seed);
                let leader = &self.sched.seqs[&id];
                sib.block_table = self.sched.blocks.fork(&leader.block_table);
                sib.block_hashes = leader.block_hashes.clone();
                sib.num_computed = leader.num_computed;
                sib.first_scheduled = leader.first_scheduled;
                sib.status = SeqStatus::Running;
                ids.push(sib.id);
                self.sched.add_running(sib);
            }
            let st = self.requests.get_mut(&req_id).expect("request exists");
            st.forked = true;
            st.seq_ids.extend(&ids[1..]);
        }
        ids
    }

    /// Samples every `(sequence, logits offset)` of `jobs` and records the tokens. Rows are
    /// independent (each sequence has its own random stream), so they are drawn on all kernel
    /// threads: with 64 streams, sampling serially on this thread idled the others.
    fn sample_all(&mut self, jobs: &[(u64, usize)], logits: &[f32], vocab: usize) {
        let drawn: Vec<std::sync::Mutex<Option<(Sampled, SeqRng)>>> =
            jobs.iter().map(|_| std::sync::Mutex::new(None)).collect();
        {
            let seqs = &self.sched.seqs;
            let work: Vec<(SampleContext<'_>, &SeqRng, &[f32])> = jobs
                .iter()
                .map(|&(sid, off)| {
                    let seq = &seqs[&sid];
                    let cx = SampleContext {
                        params: &seq.request.params,
                        prompt: &seq.request.prompt,
                        output: &seq.tokens[seq.request.prompt.len()..],
                        eos_token_ids: &self.eos,
                        mode: self.cfg.logprobs_mode,
                    };
                    (cx, &seq.rng, &logits[off..off + vocab])
                })
                .collect();
            let next = AtomicUsize::new(0);
            let job = |_: usize| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((cx, rng, row)) = work.get(i) else {
                    break;
                };
                let mut rng = (*rng).clone();
                let s = sample(row, cx, &mut rng);
                *drawn[i].lock().unwrap_or_else(|e| e.into_inner()) = Some((s, rng));
            };
            if work.len() > 1 {
                self.model.kernels().pool.run(&job);
            } else {
                job(0);
            }
        }
        for (&(sid, _), d) in jobs.iter().zip(drawn) {
            let (s, rng) = d
                .into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .expect("every job was drawn");
            self.record_sample(sid, s, rng);
        }
    }

    /// Appends sampled token `s` to `sid` (whose stream is now `rng`) and updates its metrics.
    fn record_sample(&mut self, sid: u64, s: Sampled, rng: SeqRng) {
        let seq = self.sched.seqs.get_mut(&sid).expect("sequence exists");
        seq.rng = rng;
        let now = Instant::now();
        if let Some(m) = self.cfg.metrics.as_deref() {
            m.generation_tokens.inc();
            match seq.last_token_at {
                Some(t) => m.inter_token_latency.observe((now - t).as_secs_f64()),
                None => {
                    m.time_to_first_token
                        .observe((now - seq.request.arrival).as_secs_f64());
                    if seq.sample_index == 0 {
                        let all = seq.prompt_len() as u64;
                        let cached = seq.cached_prompt_tokens as u64;
                        m.prompt_tokens.inc_by(all);
                        m.prompt_tokens_cached.inc_by(cached);
                        let by_source = &m.prompt_tokens_by_source;
                        by_source
                            .with_label_values(&["local_cache_hit"])
                            .inc_by(cached);
                        by_source
                            .with_label_values(&["local_compute"])
                            .inc_by(all - cached);
                        m.request_prefill_kv_computed_tokens
                            .observe((all - cached) as f64);
                    }
                    if let Some(f) = seq.first_scheduled {
                        m.request_prefill_time.observe((now - f).as_secs_f64());
                    }
                }
            }
        }
        if seq.first_token_at.is_none() {
            seq.first_token_at = Some(now);
        }
        seq.last_token_at = Some(now);
        seq.tokens.push(s.token);
        seq.generated.push(GeneratedToken {
            token: s.token,
            logprob: s.logprob,
            weight_version: self.weight_version,
        });
        seq.pending += 1;
        check_stop(seq, &self.tokenizer, &self.eos, self.cfg.max_model_len);
    }

    /// Sends what is new for each sample of a request; removes finished samples.
    fn emit(&mut self, req_id: &str) {
        let Some(st) = self.requests.get_mut(req_id) else {
            return;
        };
        let mut ok = true;
        if !st.prompt_logprobs_sent {
            if let Some(pl) = &st.prompt_logprobs {
                ok &= st
                    .tx
                    .send(RequestOutput::PromptLogprobs(pl.clone()))
                    .is_ok();
            }
            st.prompt_logprobs_sent = true;
        }
        let mut finished = Vec::new();
        for &sid in &st.seq_ids {
            let Some(seq) = self.sched.seqs.get_mut(&sid) else {
                continue;
            };
            let fin = match seq.status {
                SeqStatus::Finished(r) => Some(r),
                _ => None,
            };
            if seq.pending == 0 && fin.is_none() {
                continue;
            }
            let hold = seq.request.stop_hold.saturating_sub(1);
            let out = SampleOutput {
                index: seq.sample_index,
                tokens: seq.generated[seq.generated.len() - seq.pending..].to_vec(),
                text: seq.detok.take_delta(fin.is_some(), hold),
                finish_reason: fin,
                stop_reason: seq.stop_reason.clone(),
                num_cached_tokens: st.num_cached_tokens,
            };
            seq.pending = 0;
            ok &= st.tx.send(RequestOutput::Sample(out)).is_ok();
            if fin.is_some() {
                finished.push(sid);
            }
        }
        let mut leader_reason = None;
        for sid in &finished {
            if let Some(seq) = self.sched.remove(*sid) {
                if let SeqStatus::Finished(r) = seq.status {
                    self.record_finish(&seq, r);
                    leader_reason = leader_reason.or((seq.sample_index == 0).then_some(r));
                }
            }
        }
        let st = self.requests.get_mut(req_id).expect("request exists");
        st.seq_ids.retain(|s| !finished.contains(s));
        if let (false, Some(r)) = (st.forked, leader_reason) {
            // The leader ended before its n > 1 siblings were forked (the cache could not hold
            // its prompt): the other samples end the same way, with no tokens.
            close_unforked(st, r);
        }
        let done = st.seq_ids.is_empty() && (st.forked || st.info.params.n == 1);
        if done {
            self.requests.remove(req_id);
        } else if !ok {
            self.abort(req_id, false);
        }
    }
}

/// Ends samples 1..n of a request whose leader has not forked them yet.
fn close_unforked(st: &mut RequestState, reason: FinishReason) {
    if st.forked {
        return;
    }
    st.forked = true;
    for index in 1..st.info.params.n {
        let _ = st.tx.send(RequestOutput::Sample(SampleOutput {
            index,
            tokens: Vec::new(),
            text: String::new(),
            finish_reason: Some(reason),
            stop_reason: None,
            num_cached_tokens: 0,
        }));
    }
}

/// Applies EOS, stop tokens, stop strings, `max_tokens` and the context limit after a token.
fn check_stop(seq: &mut Sequence, tok: &Tokenizer, eos: &[u32], max_model_len: usize) {
    let p = &seq.request.params;
    let t = *seq.tokens.last().expect("a token was just appended");
    let n_out = seq.tokens.len() - seq.prompt_len();
    // Like vLLM, no stop condition but the length limits applies before min_tokens.
    let may_stop = n_out >= p.min_tokens;
    let mut reason = None;
    if may_stop && !p.ignore_eos && eos.contains(&t) {
        reason = Some(FinishReason::Stop);
    } else if may_stop && p.stop_token_ids.contains(&t) {
        reason = Some(FinishReason::Stop);
        seq.stop_reason = Some(StopReason::Token(t));
    }
    let output = &seq.tokens[seq.prompt_len()..];
    let stops: &[String] = if reason.is_none() && may_stop {
        &p.stop
    } else {
        &[]
    };
    if let Some(m) = seq.detok.update(
        tok,
        output,
        p.skip_special_tokens,
        stops,
        p.include_stop_str_in_output,
    ) {
        reason = Some(FinishReason::Stop);
        seq.stop_reason = Some(StopReason::Text(m.stop));
    }
    if reason.is_none() && (n_out >= p.max_tokens || seq.tokens.len() >= max_model_len) {
        reason = Some(FinishReason::Length);
    }
    if let Some(r) = reason {
        if !matches!(seq.stop_reason, Some(StopReason::Text(_))) {
            let output = &seq.tokens[seq.prompt_len()..];
            seq.detok.flush(tok, output, p.skip_special_tokens);
        }
        seq.status = SeqStatus::Finished(r);
    }
}
