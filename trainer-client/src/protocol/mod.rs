//! The JSON bodies of a halfstep server's routes, as the client sends and reads them.
//!
//! Requests leave out every field that is `None`, so the server applies its own defaults.
//! Responses keep fields this client does not know in `extra`, so a newer server neither breaks
//! the client nor loses information; per-token structures skip `extra` because they are the bulk
//! of large responses and serde would have to buffer them.
//!
//! The bodies live by route family: `inference.rs` (completions and chat), `scoring.rs`
//! (`/v1/logprobs`, `/v1/mismatch_report`), `misc.rs` (models, tokenizer, version) and
//! `hooks.rs` (the trainer hooks); this module holds what several of them share and the error
//! body, and re-exports them all, so every type is `protocol::X`.

mod hooks;
mod inference;
mod misc;
mod scoring;

pub use hooks::*;
pub use inference::*;
pub use misc::*;
pub use scoring::*;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

/// Fields a response carried that this client has no name for.
pub type Extra = Map<String, Value>;

/// A JSON object whose entries keep the server's order (vLLM lists the chosen token first).
#[derive(Debug, Clone, PartialEq)]
pub struct OrderedMap<V>(pub Vec<(String, V)>);

impl<V> Default for OrderedMap<V> {
    fn default() -> Self {
        OrderedMap(Vec::new())
    }
}

impl<V> OrderedMap<V> {
    /// The entries in the server's order.
    pub fn entries(&self) -> &[(String, V)] {
        &self.0
    }

    /// The value under `key`.
    pub fn get(&self, key: &str) -> Option<&V> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<V: Serialize> Serialize for OrderedMap<V> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for OrderedMap<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entries<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> serde::de::Visitor<'de> for Entries<V> {
            type Value = OrderedMap<V>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Self::Value, A::Error> {
                let mut out = Vec::with_capacity(a.size_hint().unwrap_or(0));
                while let Some(entry) = a.next_entry()? {
                    out.push(entry);
                }
                Ok(OrderedMap(out))
            }
        }
        d.deserialize_map(Entries(std::marker::PhantomData))
    }
}

/// JSON has no -inf: serde_json writes it as `null`, so a logprob read as `null` is -inf.
fn logprob<'de, D: Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
    Ok(Option::<f32>::deserialize(d)?.unwrap_or(f32::NEG_INFINITY))
}

/// Completions `top_logprobs` with `null` values read as -inf (see [`logprob`]).
#[allow(clippy::type_complexity)]
fn top_logprob_maps<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Vec<Option<OrderedMap<f32>>>, D::Error> {
    let raw: Vec<Option<OrderedMap<Option<f32>>>> = Deserialize::deserialize(d)?;
    Ok(raw
        .into_iter()
        .map(|m| {
            m.map(|m| {
                OrderedMap(
                    m.0.into_iter()
                        .map(|(k, v)| (k, v.unwrap_or(f32::NEG_INFINITY)))
                        .collect(),
                )
            })
        })
        .collect())
}

// ---------------------------------------------------------------------------------------------
// Request parts: prompts, stop strings, sampling
// ---------------------------------------------------------------------------------------------

/// A prompt: text or token ids, one or a batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// One text.
    Text(String),
    /// Several texts (each gets `n` completions).
    Texts(Vec<String>),
    /// One prompt as token ids.
    Tokens(Vec<u32>),
    /// Several prompts as token ids.
    TokenBatch(Vec<Vec<u32>>),
}

impl From<&str> for Prompt {
    fn from(s: &str) -> Self {
        Prompt::Text(s.to_string())
    }
}

impl From<String> for Prompt {
    fn from(s: String) -> Self {
        Prompt::Text(s)
    }
}

impl From<Vec<String>> for Prompt {
    fn from(v: Vec<String>) -> Self {
        Prompt::Texts(v)
    }
}

impl From<Vec<u32>> for Prompt {
    fn from(v: Vec<u32>) -> Self {
        Prompt::Tokens(v)
    }
}

impl From<Vec<Vec<u32>>> for Prompt {
    fn from(v: Vec<Vec<u32>>) -> Self {
        Prompt::TokenBatch(v)
    }
}

/// `stop`: one string or several.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One stop string.
    One(String),
    /// Several stop strings.
    Many(Vec<String>),
}

impl From<&str> for Stop {
    fn from(s: &str) -> Self {
        Stop::One(s.to_string())
    }
}

impl From<Vec<String>> for Stop {
    fn from(v: Vec<String>) -> Self {
        Stop::Many(v)
    }
}

/// `stream_options`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with `usage`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub include_usage: Option<bool>,
    /// Send `usage` in every chunk (with `include_usage`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub continuous_usage_stats: Option<bool>,
}

/// Sampling parameters shared by completions and chat (vLLM's extra parameters included).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// Most tokens to generate per choice.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Softmax temperature (0 = greedy).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Nucleus sampling mass.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// Keep the k most likely tokens (-1 or 0: all).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<i32>,
    /// Minimum probability relative to the most likely token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f64>,
    /// Choices per prompt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    /// Seed of the sampling stream.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    /// Stop strings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
    /// Stop token ids.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_token_ids: Option<Vec<u32>>,
    /// Generate past EOS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ignore_eos: Option<bool>,
    /// Fewest tokens before a stop condition may end a choice.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_tokens: Option<u32>,
    /// Keep a matched stop string in the text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub include_stop_str_in_output: Option<bool>,
    /// Leave special tokens out of the text (server default true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skip_special_tokens: Option<bool>,
    /// Penalty for tokens already present.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f64>,
    /// Penalty per occurrence.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f64>,
    /// Multiplicative penalty for tokens in prompt or output.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f64>,
    /// Top log-probabilities per prompt token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<u32>,
    /// Return `token_ids` and `prompt_token_ids` per choice.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub return_token_ids: Option<bool>,
    /// Spell tokens in logprobs as `token_id:<id>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub return_tokens_as_token_ids: Option<bool>,
    /// Stream Server-Sent Events (the client's streaming methods set it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    /// Streaming options.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    /// End-user id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Caller's request id (appears in the response id).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// The error body: `{"error": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorResponse {
    /// What went wrong.
    pub error: ErrorInfo,
}

/// Error details in the OpenAI shape (halfstep sends the HTTP status as `code`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorInfo {
    /// Human-readable message.
    pub message: String,
    /// Error class, e.g. `BadRequestError`.
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    /// The offending parameter.
    #[serde(default)]
    pub param: Option<String>,
    /// A number (the HTTP status) or, from other servers, a string.
    #[serde(default)]
    pub code: Option<Value>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn error_body_reads_the_halfstep_shape() {
        let e: ErrorResponse = serde_json::from_value(json!({"error": {
            "message": "n too large", "type": "BadRequestError", "param": "n", "code": 400
        }}))
        .unwrap();
        assert_eq!(e.error.kind.as_deref(), Some("BadRequestError"));
        assert_eq!(e.error.param.as_deref(), Some("n"));
        assert_eq!(e.error.code, Some(json!(400)));
    }
}
