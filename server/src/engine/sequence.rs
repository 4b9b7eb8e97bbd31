//! What a request is inside the engine: one [`Sequence`] per sample, with its tokens, block
//! table, sampling state and the outputs not yet sent.

use super::detokenizer::IncrementalDetokenizer;
use super::kv_pool::BlockId;
use super::sampler::{SeqRng, TokenLogprob};
use super::sampling_params::SamplingParams;
use std::sync::Arc;

/// Why a sequence stopped (vLLM's `finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS, a stop token or a stop string.
    Stop,
    /// `max_tokens` or the model's context ran out.
    Length,
    /// Aborted by the client or the server.
    Abort,
}

impl FinishReason {
    /// The OpenAI/vLLM string.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// What ended a `stop` finish: a stop string or a stop token id (vLLM's `stop_reason`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// A stop string.
    Text(String),
    /// A stop token id (EOS gives none).
    Token(u32),
}

/// One generated token with the weight version that produced it.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedToken {
    /// Token id.
    pub token: u32,
    /// Log-probabilities, when asked for.
    pub logprob: Option<TokenLogprob>,
    /// `weight_version` of the weights that computed this token's distribution.
    pub weight_version: u64,
}

/// Scheduling state of a sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqStatus {
    /// Queued: no blocks (new, or preempted and waiting to be recomputed).
    Waiting,
    /// Has blocks and is being computed.
    Running,
    /// Done; blocks released.
    Finished(FinishReason),
}

/// One sample of a request.
#[derive(Debug)]
pub struct Sequence {
    /// Engine-wide unique id.
    pub id: u64,
    /// The request it belongs to.
    pub request: Arc<RequestInfo>,
    /// Index among the request's `n` samples.
    pub sample_index: usize,
    /// Prompt followed by generated tokens.
    pub tokens: Vec<u32>,
    /// Tokens whose K/V are in the cache.
    pub num_computed: usize,
    /// K/V blocks, in position order.
    pub block_table: Vec<BlockId>,
    /// Scheduling state.
    pub status: SeqStatus,
    /// The sample's random stream.
    pub rng: SeqRng,
    /// Generated tokens with logprobs and versions.
    pub generated: Vec<GeneratedToken>,
    /// Tokens generated but not yet sent to the client.
    pub pending: usize,
    /// Output text state.
    pub detok: IncrementalDetokenizer,
    /// Why it finished, with the stop string/token.
    pub stop_reason: Option<StopReason>,
    /// Times it was preempted.
    pub preemptions: u32,
    /// Chain hashes of its full blocks already offered to the prefix cache.
    pub block_hashes: Vec<super::block_manager::BlockHash>,
    /// Prompt tokens whose K/V came from the prefix cache when it was first scheduled.
    pub cached_prompt_tokens: usize,
    /// When it was first scheduled.
    pub first_scheduled: Option<std::time::Instant>,
    /// When its first token was sampled.
    pub first_token_at: Option<std::time::Instant>,
    /// When its latest token was sampled.
    pub last_token_at: Option<std::time::Instant>,
}

/// The parts of a request shared by its samples.
#[derive(Debug)]
pub struct RequestInfo {
    /// Client-visible request id.
    pub id: String,
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Validated sampling parameters.
    pub params: SamplingParams,
    /// Longest stop string in bytes (text held back while streaming).
    pub stop_hold: usize,
    /// When it was submitted.
    pub arrival: std::time::Instant,
}

impl Sequence {
    /// Prompt length.
    pub fn prompt_len(&self) -> usize {
        self.request.prompt.len()
    }

    /// Generated tokens so far.
    pub fn output_tokens(&self) -> &[u32] {
        &self.tokens[self.prompt_len()..]
    }

    /// Whether it has finished.
    pub fn is_finished(&self) -> bool {
        matches!(self.status, SeqStatus::Finished(_))
    }

    /// Tokens still to be computed before the next sampling step.
    pub fn num_uncomputed(&self) -> usize {
        self.tokens.len() - self.num_computed
    }
}
