//! Request and response bodies of the HTTP API, in vLLM's JSON shapes (OpenAI-compatible).

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// A JSON object that keeps insertion order (vLLM lists the chosen token first, then by rank).
#[derive(Debug, Clone, PartialEq)]
pub struct OrderedMap<V>(pub Vec<(String, V)>);

impl<V> Default for OrderedMap<V> {
    fn default() -> Self {
        OrderedMap(Vec::new())
    }
}

impl<V> OrderedMap<V> {
    /// Adds `key` unless present (the first value wins, as in a Python dict built in order).
    pub fn insert_first(&mut self, key: String, value: V) {
        if !self.0.iter().any(|(k, _)| *k == key) {
            self.0.push((key, value));
        }
    }

    /// Entries in order.
    pub fn entries(&self) -> &[(String, V)] {
        &self.0
    }
}

impl<V: Serialize> Serialize for OrderedMap<V> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for OrderedMap<V> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> serde::de::Visitor<'de> for Visit<V> {
            type Value = OrderedMap<V>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Self::Value, A::Error> {
                let mut v = Vec::new();
                while let Some(e) = a.next_entry()? {
                    v.push(e);
                }
                Ok(OrderedMap(v))
            }
        }
        d.deserialize_map(Visit(std::marker::PhantomData))
    }
}

/// A prompt: text, several texts, token ids, or several token-id lists.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(untagged)]
pub enum Prompt {
    /// One text.
    Text(String),
    /// Several texts (one completion set per text).
    Texts(Vec<String>),
    /// One prompt as token ids.
    Tokens(Vec<i64>),
    /// Several prompts as token ids.
    TokenLists(Vec<Vec<i64>>),
}

/// `stop`: one string or several.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(untagged)]
pub enum Stop {
    /// One stop string.
    One(String),
    /// Several stop strings.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
pub struct StreamOptions {
    /// Send a last chunk with `usage`.
    #[serde(default)]
    pub include_usage: Option<bool>,
    /// Send `usage` in every chunk.
    #[serde(default)]
    pub continuous_usage_stats: Option<bool>,
}

/// Sampling parameters shared by completions and chat (vLLM's extra parameters included).
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
pub struct SamplingFields {
    /// Maximum tokens to generate.
    pub max_tokens: Option<i64>,
    /// Softmax temperature (0 = greedy).
    pub temperature: Option<f64>,
    /// Nucleus sampling mass.
    pub top_p: Option<f64>,
    /// Keep the k most likely tokens (-1 or 0: all).
    pub top_k: Option<i64>,
    /// Minimum probability relative to the most likely token.
    pub min_p: Option<f64>,
    /// Completions per prompt.
    pub n: Option<i64>,
    /// Seed of the sampling stream.
    pub seed: Option<i64>,
    /// Stop strings.
    pub stop: Option<Stop>,
    /// Stop token ids.
    pub stop_token_ids: Option<Vec<i64>>,
    /// Generate past EOS.
    pub ignore_eos: Option<bool>,
    /// Fewest tokens before a stop condition may end the output.
    pub min_tokens: Option<i64>,
    /// Keep a matched stop string in the text.
    pub include_stop_str_in_output: Option<bool>,
    /// Leave special tokens out of the text (default true).
    pub skip_special_tokens: Option<bool>,
    /// Penalty for tokens already present.
    pub presence_penalty: Option<f64>,
    /// Penalty per occurrence.
    pub frequency_penalty: Option<f64>,
    /// Multiplicative penalty for tokens in prompt or output.
    pub repetition_penalty: Option<f64>,
    /// Top log-probabilities per prompt token.
    pub prompt_logprobs: Option<i64>,
    /// Return `token_ids` and `prompt_token_ids` per choice.
    pub return_token_ids: Option<bool>,
    /// Spell tokens in logprobs as `token_id:<id>`.
    pub return_tokens_as_token_ids: Option<bool>,
    /// Stream Server-Sent Events.
    pub stream: Option<bool>,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// End-user id (accepted, unused).
    pub user: Option<String>,
    /// Caller's request id (used in the response id).
    pub request_id: Option<String>,
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct CompletionRequest {
    /// Served model name (optional: the one served).
    pub model: Option<String>,
    /// The prompt(s).
    pub prompt: Prompt,
    /// Top log-probabilities per generated token (0..=max_logprobs).
    pub logprobs: Option<i64>,
    /// Prepend the prompt to the text (and its logprobs).
    pub echo: Option<bool>,
    /// Text after the completion (not supported; must be absent).
    pub suffix: Option<String>,
    /// Must equal `n` if given.
    pub best_of: Option<i64>,
    /// Sampling parameters.
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// A chat message (content as text or as text parts).
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// Text, or a list of `{type: "text", text}` parts.
    #[schema(value_type = Option<Value>)]
    pub content: Option<Value>,
    /// Other fields (name, tool_calls…) are passed to the template.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub extra: BTreeMap<String, Value>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct ChatCompletionRequest {
    /// Served model name (optional).
    pub model: Option<String>,
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// Return log-probabilities of generated tokens.
    pub logprobs: Option<bool>,
    /// Top log-probabilities per token (needs `logprobs`).
    pub top_logprobs: Option<i64>,
    /// Alias of `max_tokens`.
    pub max_completion_tokens: Option<i64>,
    /// Append the assistant turn opener (default true).
    pub add_generation_prompt: Option<bool>,
    /// Continue the last (assistant) message instead of starting a new one.
    pub continue_final_message: Option<bool>,
    /// Extra variables for the chat template.
    #[schema(value_type = Object)]
    pub chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    /// Sampling parameters.
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// Token counts of a request.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens over all choices.
    pub completion_tokens: usize,
    /// Their sum.
    pub total_tokens: usize,
    /// Prompt token details (cached tokens).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

/// `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct PromptTokensDetails {
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
}

/// Completions `logprobs`: parallel lists per token.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct CompletionLogprobs {
    /// Character offset of each token in the choice's text.
    pub text_offset: Vec<usize>,
    /// Log-probability of each token (`null` for the first prompt token with `echo`).
    pub token_logprobs: Vec<Option<f32>>,
    /// Token strings.
    pub tokens: Vec<String>,
    /// Most likely alternatives per position, token → logprob.
    #[schema(value_type = Vec<Option<Object>>)]
    pub top_logprobs: Vec<Option<OrderedMap<f32>>>,
}

/// One entry of `prompt_logprobs`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct PromptLogprob {
    /// Log-probability.
    pub logprob: f32,
    /// 1-based rank in the distribution.
    pub rank: usize,
    /// The token's text.
    pub decoded_token: String,
}

/// A weight version that produced tokens `start..end` of a choice.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct WeightVersionSpan {
    /// Weight version.
    pub version: u64,
    /// First token index.
    pub start: usize,
    /// One past the last token index.
    pub end: usize,
}

/// One completion choice.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CompletionChoice {
    /// Choice index (`prompt_index * n + sample_index`).
    pub index: usize,
    /// Generated text (with the prompt first if `echo`).
    pub text: String,
    /// Per-token log-probabilities.
    pub logprobs: Option<CompletionLogprobs>,
    /// `stop`, `length` or `abort`; null while streaming.
    pub finish_reason: Option<String>,
    /// The stop string or token id that matched.
    #[schema(value_type = Option<Value>)]
    pub stop_reason: Option<Value>,
    /// `[null, {"<id>": {...}}, ...]` when `prompt_logprobs` was asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Option<Object>>>)]
    pub prompt_logprobs: Option<Vec<Option<OrderedMap<PromptLogprob>>>>,
    /// Prompt token ids (with `return_token_ids`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
    /// Generated token ids (with `return_token_ids`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
    /// Weight version of the tokens (the last one's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight_version: Option<u64>,
    /// Versions by token span, when the weights changed mid-request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight_versions: Option<Vec<WeightVersionSpan>>,
}

/// `POST /v1/completions` response (and, with `object = text_completion`, stream chunks).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CompletionResponse {
    /// `cmpl-…`.
    pub id: String,
    /// `text_completion`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// Served model name.
    pub model: String,
    /// Choices.
    pub choices: Vec<CompletionChoice>,
    /// Token counts (null in stream chunks unless asked).
    pub usage: Option<Usage>,
}

/// One entry of chat `top_logprobs`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ChatTopLogprob {
    /// Token text.
    pub token: String,
    /// Log-probability (-9999.0 for -inf).
    pub logprob: f32,
    /// UTF-8 bytes of the token text.
    pub bytes: Option<Vec<u8>>,
}

/// One generated token of chat `logprobs.content`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ChatTokenLogprob {
    /// Token text.
    pub token: String,
    /// Log-probability (-9999.0 for -inf).
    pub logprob: f32,
    /// UTF-8 bytes of the token text.
    pub bytes: Option<Vec<u8>>,
    /// Most likely alternatives.
    pub top_logprobs: Vec<ChatTopLogprob>,
}

/// Chat `logprobs`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ChatLogprobs {
    /// One entry per generated token.
    pub content: Option<Vec<ChatTokenLogprob>>,
}

/// The assistant's message.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatResponseMessage {
    /// `assistant`.
    pub role: String,
    /// Generated text.
    pub content: Option<String>,
    /// Tool calls (always empty).
    pub tool_calls: Vec<Value>,
}

/// One chat choice.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatChoice {
    /// Choice index.
    pub index: usize,
    /// The reply.
    pub message: ChatResponseMessage,
    /// Log-probabilities, when asked.
    pub logprobs: Option<ChatLogprobs>,
    /// `stop`, `length` or `abort`.
    pub finish_reason: Option<String>,
    /// The stop string or token id that matched.
    #[schema(value_type = Option<Value>)]
    pub stop_reason: Option<Value>,
    /// Generated token ids (with `return_token_ids`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
    /// Weight version of the tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight_version: Option<u64>,
    /// Versions by token span, when the weights changed mid-request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight_versions: Option<Vec<WeightVersionSpan>>,
}

/// `POST /v1/chat/completions` response.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatCompletionResponse {
    /// `chatcmpl-…`.
    pub id: String,
    /// `chat.completion`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// Served model name.
    pub model: String,
    /// Choices.
    pub choices: Vec<ChatChoice>,
    /// Token counts.
    pub usage: Usage,
    /// Prompt log-probabilities, when asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Option<Object>>>)]
    pub prompt_logprobs: Option<Vec<Option<OrderedMap<PromptLogprob>>>>,
    /// Prompt token ids (with `return_token_ids`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
}

/// The `delta` of a chat stream chunk.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct ChatDelta {
    /// `assistant` in the first chunk of a choice.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// New text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// A choice in a chat stream chunk.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatChunkChoice {
    /// Choice index.
    pub index: usize,
    /// What is new.
    pub delta: ChatDelta,
    /// Log-probabilities of the new tokens.
    pub logprobs: Option<ChatLogprobs>,
    /// Set in the choice's last chunk.
    pub finish_reason: Option<String>,
    /// The stop string or token id that matched.
    #[schema(value_type = Option<Value>)]
    pub stop_reason: Option<Value>,
    /// New token ids (with `return_token_ids`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
    /// Weight version of the new tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight_version: Option<u64>,
}

/// A chat stream chunk (`chat.completion.chunk`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatCompletionChunk {
    /// Same id in every chunk.
    pub id: String,
    /// `chat.completion.chunk`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// Served model name.
    pub model: String,
    /// Choices with news.
    pub choices: Vec<ChatChunkChoice>,
    /// Usage in the last chunk when `stream_options.include_usage`.
    pub usage: Option<Usage>,
}

/// `GET /v1/models` entry.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ModelCard {
    /// Served name.
    pub id: String,
    /// `model`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// `halfstep`.
    pub owned_by: String,
    /// Path it was loaded from.
    pub root: String,
    /// Parent model (none).
    pub parent: Option<String>,
    /// Longest prompt + output.
    pub max_model_len: usize,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ModelList {
    /// `list`.
    pub object: String,
    /// The served model.
    pub data: Vec<ModelCard>,
}

/// `POST /tokenize`: a prompt or chat messages.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct TokenizeRequest {
    /// Served model name (optional).
    pub model: Option<String>,
    /// Text to tokenize.
    pub prompt: Option<String>,
    /// Messages to render with the chat template, then tokenize.
    pub messages: Option<Vec<ChatMessage>>,
    /// Add BOS where the model wants it (default true for prompts, false for messages).
    pub add_special_tokens: Option<bool>,
    /// Append the assistant turn opener (messages; default true).
    pub add_generation_prompt: Option<bool>,
    /// Also return the token strings.
    pub return_token_strs: Option<bool>,
}

/// `POST /tokenize` response.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenizeResponse {
    /// Number of tokens.
    pub count: usize,
    /// Longest prompt + output.
    pub max_model_len: usize,
    /// Token ids.
    pub tokens: Vec<u32>,
    /// Token strings, when asked.
    pub token_strs: Option<Vec<String>>,
}

/// `POST /detokenize`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct DetokenizeRequest {
    /// Served model name (optional).
    pub model: Option<String>,
    /// Token ids.
    pub tokens: Vec<i64>,
}

/// `POST /detokenize` response.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DetokenizeResponse {
    /// The text.
    pub prompt: String,
}

/// `GET /version`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VersionResponse {
    /// halfstep's version.
    pub version: String,
}

/// The error body: `{"error": {...}}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorResponse {
    /// What went wrong.
    pub error: ErrorInfo,
}

/// Error details (OpenAI shape; `code` is the HTTP status as vLLM sends it).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorInfo {
    /// Human-readable message.
    pub message: String,
    /// Error class, e.g. `BadRequestError`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The offending parameter, if any.
    pub param: Option<String>,
    /// HTTP status code.
    pub code: u16,
}
