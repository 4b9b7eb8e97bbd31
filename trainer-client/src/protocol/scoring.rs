//! `POST /v1/logprobs` (score token sequences under the serving weights) and
//! `POST /v1/mismatch_report` (sampler/learner mismatch figures for the server's metrics).

use super::{logprob, Extra};
use serde::{Deserialize, Serialize};

/// `POST /v1/logprobs`: score token sequences under the serving weights.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LogprobsRequest {
    /// Served model name (absent: the one served).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Token-id sequences to score.
    pub sequences: Vec<Vec<u32>>,
    /// Per sequence, positions before this are not scored (score only the completion).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_lengths: Option<Vec<usize>>,
    /// Alternatives per position.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<u32>,
    /// Also return the entropy per position.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub return_entropy: Option<bool>,
}

/// An alternative token in `/v1/logprobs` output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopLogprob {
    /// Token id.
    pub token_id: u32,
    /// Token text.
    #[serde(default)]
    pub token: String,
    /// Log-probability.
    #[serde(deserialize_with = "logprob")]
    pub logprob: f32,
}

/// The scores of one sequence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SequenceLogprobs {
    /// Which sequence of the request.
    pub index: usize,
    /// Its tokens.
    #[serde(default)]
    pub token_ids: Vec<u32>,
    /// log p(token_t | tokens_<t); `None` at t = 0 and before the prompt length.
    pub logprobs: Vec<Option<f32>>,
    /// 1-based ranks of the tokens.
    #[serde(default)]
    pub ranks: Vec<Option<usize>>,
    /// Alternatives per position, when asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<Vec<Option<Vec<TopLogprob>>>>,
    /// Entropy per position, when asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<Vec<Option<f32>>>,
}

/// `POST /v1/logprobs` response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogprobsResponse {
    /// `logprobs`.
    #[serde(default)]
    pub object: String,
    /// Served model name.
    #[serde(default)]
    pub model: String,
    /// The weights that scored.
    pub weight_version: u64,
    /// One entry per sequence, in request order.
    pub data: Vec<SequenceLogprobs>,
    /// Fields this client does not know.
    #[serde(flatten)]
    pub extra: Extra,
}

/// `POST /v1/mismatch_report`: sampler/learner mismatch figures for the server's metrics.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MismatchReport {
    /// The precision measured (`float16`, `bfloat16`, `float32`).
    pub dtype: String,
    /// Which learner recomputed the logprobs (`parity`, `independent`, `torch`, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub learner: Option<String>,
    /// max |a − b|.
    pub max_abs: f64,
    /// mean |a − b|.
    pub mean_abs: f64,
    /// mean (a − b).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub k1: Option<f64>,
    /// mean (r − 1 − log r).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub k3: Option<f64>,
    /// min exp(b − a).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio_min: Option<f64>,
    /// max exp(b − a).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio_max: Option<f64>,
}
