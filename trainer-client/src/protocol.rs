//! The JSON bodies of a halfstep server's routes, as the client sends and reads them.
//!
//! Requests leave out every field that is `None`, so the server applies its own defaults.
//! Responses keep fields this client does not know in `extra`, so a newer server neither breaks
//! the client nor loses information; per-token structures skip `extra` because they are the bulk
//! of large responses and serde would have to buffer them.

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
// Requests: completions and chat
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

/// `POST /v1/completions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionRequest {
    /// Served model name (absent: the one served).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The prompt(s).
    pub prompt: Prompt,
    /// Top log-probabilities per generated token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<u32>,
    /// Put the prompt (and its logprobs) before the generated text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub echo: Option<bool>,
    /// Text after the completion (the server refuses it; here for completeness).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suffix: Option<String>,
    /// Must equal `n` if given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub best_of: Option<u32>,
    /// Sampling parameters.
    #[serde(flatten)]
    pub sampling: SamplingParams,
    /// Further fields sent as they are (parameters this client has no name for).
    #[serde(flatten)]
    pub extra: Extra,
}

impl CompletionRequest {
    /// A request for `prompt` with the server's defaults for everything else.
    pub fn new(prompt: impl Into<Prompt>) -> Self {
        CompletionRequest {
            model: None,
            prompt: prompt.into(),
            logprobs: None,
            echo: None,
            suffix: None,
            best_of: None,
            sampling: SamplingParams::default(),
            extra: Extra::new(),
        }
    }
}

/// A chat message; `content` is text or a list of `{type: "text", text}` parts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// Text, or a list of content parts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<Value>,
    /// Other message fields (`name`, `tool_calls`, …), handed to the chat template.
    #[serde(flatten)]
    pub extra: Extra,
}

impl ChatMessage {
    /// A message with text content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: Some(Value::String(content.into())),
            extra: Extra::new(),
        }
    }

    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    /// An assistant message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionRequest {
    /// Served model name (absent: the one served).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// Return log-probabilities of generated tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<bool>,
    /// Alternatives per generated token (needs `logprobs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<u32>,
    /// OpenAI's name for `max_tokens`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u32>,
    /// Append the assistant turn opener (server default true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub add_generation_prompt: Option<bool>,
    /// Continue the last (assistant) message instead of starting a new one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub continue_final_message: Option<bool>,
    /// Extra variables for the chat template.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chat_template_kwargs: Option<Map<String, Value>>,
    /// Sampling parameters.
    #[serde(flatten)]
    pub sampling: SamplingParams,
    /// Further fields sent as they are (parameters this client has no name for).
    #[serde(flatten)]
    pub extra: Extra,
}

impl ChatCompletionRequest {
    /// A request for `messages` with the server's defaults for everything else.
    pub fn new(messages: Vec<ChatMessage>) -> Self {
        ChatCompletionRequest {
            messages,
            ..Default::default()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Responses: completions and chat
// ---------------------------------------------------------------------------------------------

/// Token counts of a request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens over all choices.
    #[serde(default)]
    pub completion_tokens: usize,
    /// Their sum.
    pub total_tokens: usize,
    /// Prompt token details (cached tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
    /// Fields this client does not know.
    #[serde(flatten)]
    pub extra: Extra,
}

/// `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens served from the prefix cache.
    #[serde(default)]
    pub cached_tokens: usize,
}

/// Completions `logprobs`: parallel lists, one entry per token.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CompletionLogprobs {
    /// Character offset of each token in the choice's text.
    #[serde(default)]
    pub text_offset: Vec<usize>,
    /// Log-probability of each token (`None` for the first prompt token with `echo`).
    pub token_logprobs: Vec<Option<f32>>,
    /// Token strings (`token_id:<id>` with `return_tokens_as_token_ids`).
    pub tokens: Vec<String>,
    /// Per position, the sampled token and the most likely alternatives: token → logprob.
    #[serde(default, deserialize_with = "top_logprob_maps")]
    pub top_logprobs: Vec<Option<OrderedMap<f32>>>,
}

/// One entry of `prompt_logprobs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptLogprob {
    /// Log-probability.
    #[serde(deserialize_with = "logprob")]
    pub logprob: f32,
    /// 1-based rank in the distribution.
    pub rank: Option<usize>,
    /// The token's text.
    pub decoded_token: Option<String>,
}

/// `prompt_logprobs`: per prompt position (`None` first), token id (as a string) → entry.
pub type PromptLogprobs = Vec<Option<OrderedMap<PromptLogprob>>>;

/// The weight version that produced tokens `start..end` of a choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightVersionSpan {
    /// Weight version.
    pub version: u64,
    /// First token index.
    pub start: usize,
    /// One past the last token index.
    pub end: usize,
}

/// One completion choice (or, streaming, the news of one choice).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionChoice {
    /// `prompt_index * n + sample_index`.
    pub index: usize,
    /// Generated text (the prompt first with `echo`); streaming, the new text.
    pub text: String,
    /// Per-token log-probabilities, when asked.
    #[serde(default)]
    pub logprobs: Option<CompletionLogprobs>,
    /// `stop`, `length` or `abort`; `None` while a stream goes on.
    #[serde(default)]
    pub finish_reason: Option<String>,
    /// The stop string or token id that matched.
    #[serde(default)]
    pub stop_reason: Option<Value>,
    /// Prompt logprobs, when asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<PromptLogprobs>,
    /// Prompt token ids (with `return_token_ids`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
    /// Generated token ids (with `return_token_ids`); streaming, the new ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
    /// Weight version of the tokens (the last one's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_version: Option<u64>,
    /// Versions by token span, when the weights changed during the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_versions: Option<Vec<WeightVersionSpan>>,
    /// Fields this client does not know.
    #[serde(flatten)]
    pub extra: Extra,
}

/// `POST /v1/completions` response; also the shape of each stream chunk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionResponse {
    /// `cmpl-…`, the same in every chunk of a stream.
    pub id: String,
    /// `text_completion`.
    #[serde(default)]
    pub object: String,
    /// Unix seconds.
    #[serde(default)]
    pub created: u64,
    /// Served model name.
    #[serde(default)]
    pub model: String,
    /// Choices (streaming: those with news; none in a usage-only chunk).
    pub choices: Vec<CompletionChoice>,
    /// Token counts (streaming: only when asked).
    #[serde(default)]
    pub usage: Option<Usage>,
    /// Fields this client does not know.
    #[serde(flatten)]
    pub extra: Extra,
}

/// A `/v1/completions` stream chunk.
pub type CompletionChunk = CompletionResponse;

/// An alternative token in chat `top_logprobs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatTopLogprob {
    /// Token text.
    pub token: String,
    /// Log-probability (the server writes -inf as -9999.0).
    #[serde(deserialize_with = "logprob")]
    pub logprob: f32,
    /// UTF-8 bytes of the token text.
    #[serde(default)]
    pub bytes: Option<Vec<u8>>,
}

/// One generated token in chat `logprobs.content`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatTokenLogprob {
    /// Token text.
    pub token: String,
    /// Log-probability (the server writes -inf as -9999.0).
    #[serde(deserialize_with = "logprob")]
    pub logprob: f32,
    /// UTF-8 bytes of the token text.
    #[serde(default)]
    pub bytes: Option<Vec<u8>>,
    /// Most likely alternatives.
    #[serde(default)]
    pub top_logprobs: Vec<ChatTopLogprob>,
}

/// Chat `logprobs`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatLogprobs {
    /// One entry per generated token.
    #[serde(default)]
    pub content: Option<Vec<ChatTokenLogprob>>,
}

/// The assistant's reply in a chat choice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatResponseMessage {
    /// `assistant`.
    pub role: String,
    /// Generated text.
    #[serde(default)]
    pub content: Option<String>,
    /// Tool calls (halfstep sends none).
    #[serde(default)]
    pub tool_calls: Vec<Value>,
    /// Fields this client does not know.
    #[serde(flatten)]
    pub extra: Extra,
}

/// One chat choice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatChoice {
    /// Choice index.
    pub index: usize,
    /// The reply.
    pub message: ChatResponseMessage,
    /// Log-probabilities, when asked.
    #[serde(default)]
    pub logprobs: Option<ChatLogprobs>,
    /// `stop`, `length` or `abort`.
    #[serde(default)]
    pub finish_reason: Option<String>,
    /// The stop string or token id that matched.
    #[serde(default)]
    pub stop_reason: Option<Value>,
    /// Generated token ids (with `return_token_ids`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
    /// Weight version of the tokens (the last one's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_version: Option<u64>,
    /// Versions by token span, when the weights changed during the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_versions: Option<Vec<WeightVersionSpan>>,
    /// Fields this client does not know.
    #[serde(flatten)]
    pub extra: Extra,
}

/// `POST /v1/chat/completions` response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionResponse {
    /// `chatcmpl-…`.
    pub id: String,
    /// `chat.completion`.
    #[serde(default)]
    pub object: String,
    /// Unix seconds.
    #[serde(default)]
    pub created: u64,
    /// Served model name.
    #[serde(default)]
    pub model: String,
    /// Choices.
    pub choices: Vec<ChatChoice>,
    /// Token counts.
    #[serde(default)]
    pub usage: Option<Usage>,
    /// Prompt logprobs, when asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<PromptLogprobs>,
    /// Prompt token ids (with `return_token_ids`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
    /// Fields this client does not know.
    #[serde(flatten)]
    pub extra: Extra,
}

/// The `delta` of a chat stream chunk.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatDelta {
    /// `assistant` in the first chunk of a choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// New text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Fields this client does not know.
    #[serde(flatten)]
    pub extra: Extra,
}

/// A choice in a chat stream chunk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatChunkChoice {
    /// Choice index.
    pub index: usize,
    /// What is new.
    #[serde(default)]
    pub delta: ChatDelta,
    /// Log-probabilities of the new tokens.
    #[serde(default)]
    pub logprobs: Option<ChatLogprobs>,
    /// Set in the choice's last chunk.
    #[serde(default)]
    pub finish_reason: Option<String>,
    /// The stop string or token id that matched.
    #[serde(default)]
    pub stop_reason: Option<Value>,
    /// New token ids (with `return_token_ids`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
    /// Weight version of the new tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_version: Option<u64>,
    /// Fields this client does not know.
    #[serde(flatten)]
    pub extra: Extra,
}

/// A `/v1/chat/completions` stream chunk (`chat.completion.chunk`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionChunk {
    /// The same in every chunk of a stream.
    pub id: String,
    /// `chat.completion.chunk`.
    #[serde(default)]
    pub object: String,
    /// Unix seconds.
    #[serde(default)]
    pub created: u64,
    /// Served model name.
    #[serde(default)]
    pub model: String,
    /// Choices with news (none in a usage-only chunk).
    pub choices: Vec<ChatChunkChoice>,
    /// Token counts, when `stream_options.include_usage` asked for them.
    #[serde(default)]
    pub usage: Option<Usage>,
    /// Fields this client does not know.
    #[serde(flatten)]
    pub extra: Extra,
}

// ---------------------------------------------------------------------------------------------
// Scoring and mismatch reports
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// Small routes: models, tokenizer, version
// ---------------------------------------------------------------------------------------------

/// An entry of `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCard {
    /// Served model name.
    pub id: String,
    /// `model`.
    #[serde(default)]
    pub object: String,
    /// Unix seconds.
    #[serde(default)]
    pub created: u64,
    /// `halfstep`.
    #[serde(default)]
    pub owned_by: String,
    /// Path the model was loaded from.
    #[serde(default)]
    pub root: Option<String>,
    /// Parent model.
    #[serde(default)]
    pub parent: Option<String>,
    /// Longest prompt + output.
    #[serde(default)]
    pub max_model_len: Option<usize>,
    /// Fields this client does not know.
    #[serde(flatten)]
    pub extra: Extra,
}

/// `GET /v1/models` response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelList {
    /// `list`.
    #[serde(default)]
    pub object: String,
    /// The served models.
    pub data: Vec<ModelCard>,
    /// Fields this client does not know.
    #[serde(flatten)]
    pub extra: Extra,
}

/// `POST /tokenize`: give exactly one of `prompt` and `messages`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TokenizeRequest {
    /// Served model name (absent: the one served).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Text to tokenize.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// Messages to render with the chat template, then tokenize.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<ChatMessage>>,
    /// Add BOS where the model wants it (server default: true for prompts, false for messages).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub add_special_tokens: Option<bool>,
    /// Append the assistant turn opener (messages; server default true).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub add_generation_prompt: Option<bool>,
    /// Also return the token strings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub return_token_strs: Option<bool>,
}

/// `POST /tokenize` response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenizeResponse {
    /// Number of tokens.
    pub count: usize,
    /// Longest prompt + output.
    #[serde(default)]
    pub max_model_len: usize,
    /// Token ids.
    pub tokens: Vec<u32>,
    /// Token strings, when asked.
    #[serde(default)]
    pub token_strs: Option<Vec<String>>,
    /// Fields this client does not know.
    #[serde(flatten)]
    pub extra: Extra,
}

/// `POST /detokenize`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DetokenizeRequest {
    /// Served model name (absent: the one served).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Token ids.
    pub tokens: Vec<u32>,
}

/// `POST /detokenize` response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetokenizeResponse {
    /// The text.
    pub prompt: String,
    /// Fields this client does not know.
    #[serde(flatten)]
    pub extra: Extra,
}

/// `GET /version` response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionResponse {
    /// The server's version.
    pub version: String,
    /// Fields this client does not know.
    #[serde(flatten)]
    pub extra: Extra,
}

// ---------------------------------------------------------------------------------------------
// Trainer hooks
// ---------------------------------------------------------------------------------------------

/// What a weight update does with requests in flight.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpdateMode {
    /// Finish them on the old weights, then swap (the server's default).
    #[default]
    Wait,
    /// End them (`finish_reason: "abort"`), then swap.
    Abort,
    /// Swap at once; they go on with the new weights (their `weight_versions` say so).
    Continue,
}

impl UpdateMode {
    /// The name the server expects.
    pub fn as_str(self) -> &'static str {
        match self {
            UpdateMode::Wait => "wait",
            UpdateMode::Abort => "abort",
            UpdateMode::Continue => "continue",
        }
    }
}

/// What `/pause` does with requests in flight.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PauseMode {
    /// Let them finish; refuse new ones (the server's default).
    #[default]
    Wait,
    /// End them (`finish_reason: "abort"`); refuse new ones.
    Abort,
    /// Freeze them with their KV cache kept; queue new ones.
    Keep,
}

impl PauseMode {
    /// The name the server expects.
    pub fn as_str(self) -> &'static str {
        match self {
            PauseMode::Wait => "wait",
            PauseMode::Abort => "abort",
            PauseMode::Keep => "keep",
        }
    }
}

/// Query parameters of `POST /update_weights` and `POST /finish_weight_update`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateOptions {
    /// The version to serve afterwards (server default: current + 1). Leave it out on the
    /// parts of a multi-part update; give it to `/finish_weight_update`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight_version: Option<u64>,
    /// What happens to requests in flight (server default `wait`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<UpdateMode>,
}

/// `POST /update_weights_from_disk` (SGLang's shape, plus `mode`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UpdateFromDiskRequest {
    /// A safetensors file or directory, or a GGUF file, under the server's
    /// `--allowed-weight-dir`.
    pub model_path: String,
    /// The version to serve afterwards (server default: current + 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight_version: Option<u64>,
    /// Abort in-flight requests instead of letting them finish (SGLang's switch).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub abort_all_requests: Option<bool>,
    /// Accepted for SGLang compatibility; the server always flushes the prefix cache.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flush_cache: Option<bool>,
    /// What happens to requests in flight (overrides `abort_all_requests`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<UpdateMode>,
}

/// Phase timings of a weight update, in seconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UpdateTimings {
    /// Reading, converting and validating the tensors.
    #[serde(default)]
    pub stage_s: f64,
    /// The part of `stage_s` spent checking names, shapes and dtypes.
    #[serde(default)]
    pub validate_s: f64,
    /// Waiting for in-flight requests (`wait` mode).
    #[serde(default)]
    pub wait_s: f64,
    /// The swap itself.
    #[serde(default)]
    pub swap_s: f64,
    /// End to end.
    #[serde(default)]
    pub total_s: f64,
    /// Fields this client does not know.
    #[serde(flatten)]
    pub extra: Extra,
}

/// The outcome of a weight update (or of staging one part of a multi-part update).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpdateResponse {
    /// Whether the request did what it was asked.
    pub success: bool,
    /// What happened (`staged; …` for a part of a multi-part update).
    #[serde(default)]
    pub message: String,
    /// The version serving now.
    pub weight_version: u64,
    /// Always 0 (SGLang's field).
    #[serde(default)]
    pub num_paused_requests: usize,
    /// Requests the update aborted.
    #[serde(default)]
    pub num_aborted_requests: usize,
    /// Tensors replaced (or staged so far).
    #[serde(default)]
    pub num_tensors: usize,
    /// Bytes staged in the serving dtype.
    #[serde(default)]
    pub num_bytes: usize,
    /// Phase timings.
    #[serde(default)]
    pub timings: UpdateTimings,
    /// Fields this client does not know.
    #[serde(flatten)]
    pub extra: Extra,
}

/// `{success, message}`, the answer of several hooks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SuccessResponse {
    /// Whether it worked.
    pub success: bool,
    /// What happened.
    #[serde(default)]
    pub message: String,
    /// Fields this client does not know.
    #[serde(flatten)]
    pub extra: Extra,
}

/// `{is_paused}`, the answer of `/pause`, `/resume` and `/is_paused`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PausedResponse {
    /// Whether generation is paused.
    pub is_paused: bool,
    /// Fields this client does not know.
    #[serde(flatten)]
    pub extra: Extra,
}

/// A tensor's name and shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorShape {
    /// Hugging Face tensor name.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
}

/// `GET /weight_info` response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeightInfo {
    /// The version serving.
    pub weight_version: u64,
    /// Serving dtype (`float16`, `bfloat16`, `float32`).
    #[serde(default)]
    pub dtype: String,
    /// Number of tensors.
    #[serde(default)]
    pub num_tensors: usize,
    /// Bytes in the serving dtype.
    #[serde(default)]
    pub num_bytes: usize,
    /// Fingerprint of every tensor's name and bits.
    #[serde(default)]
    pub checksum: String,
    /// Tensor names and shapes.
    #[serde(default)]
    pub tensors: Vec<TensorShape>,
    /// Fields this client does not know.
    #[serde(flatten)]
    pub extra: Extra,
}

/// `GET /get_weights_by_name` response: a tensor's leading rows.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorValues {
    /// A 1-D tensor's leading values.
    Vector(Vec<f32>),
    /// Leading rows of a tensor of 2 or more dimensions, each row flattened.
    Rows(Vec<Vec<f32>>),
}

impl TensorValues {
    /// Every value in row-major order.
    pub fn flatten(&self) -> Vec<f32> {
        match self {
            TensorValues::Vector(v) => v.clone(),
            TensorValues::Rows(r) => r.concat(),
        }
    }
}

impl<'de> Deserialize<'de> for TensorValues {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // serde_json writes NaN and ±inf as `null`; a checking tool wants to see such weights,
        // not a decode error, so `null` is read as NaN.
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Vector(Vec<Option<f32>>),
            Rows(Vec<Vec<Option<f32>>>),
        }
        let values = |v: Vec<Option<f32>>| v.into_iter().map(|x| x.unwrap_or(f32::NAN)).collect();
        Ok(match Raw::deserialize(d)? {
            Raw::Vector(v) => TensorValues::Vector(values(v)),
            Raw::Rows(r) => TensorValues::Rows(r.into_iter().map(values).collect()),
        })
    }
}

impl Serialize for TensorValues {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            TensorValues::Vector(v) => v.serialize(s),
            TensorValues::Rows(r) => r.serialize(s),
        }
    }
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
    fn unset_request_fields_are_left_out() {
        let req = CompletionRequest::new(vec![1u32, 2, 3]);
        assert_eq!(
            serde_json::to_value(&req).unwrap(),
            json!({"prompt": [1, 2, 3]})
        );
        let chat = ChatCompletionRequest::new(vec![ChatMessage::user("hi")]);
        assert_eq!(
            serde_json::to_value(&chat).unwrap(),
            json!({"messages": [{"role": "user", "content": "hi"}]})
        );
        assert_eq!(
            serde_json::to_value(UpdateOptions::default()).unwrap(),
            json!({})
        );
    }

    #[test]
    fn sampling_fields_sit_at_the_top_level_of_the_request() {
        let mut req = CompletionRequest::new("Hello");
        req.logprobs = Some(2);
        req.sampling.n = Some(4);
        req.sampling.temperature = Some(0.7);
        req.sampling.top_k = Some(-1);
        req.sampling.stop = Some(Stop::from("\n"));
        req.sampling.stream_options = Some(StreamOptions {
            include_usage: Some(true),
            continuous_usage_stats: None,
        });
        req.extra.insert("priority".into(), json!(3));
        assert_eq!(
            serde_json::to_value(&req).unwrap(),
            json!({
                "prompt": "Hello", "logprobs": 2, "n": 4, "temperature": 0.7, "top_k": -1,
                "stop": "\n", "stream_options": {"include_usage": true}, "priority": 3
            })
        );
    }

    #[test]
    fn request_read_back_keeps_unknown_fields_apart_from_sampling() {
        let req: CompletionRequest =
            serde_json::from_value(json!({"prompt": [[1, 2], [3]], "seed": 7, "priority": 1}))
                .unwrap();
        assert_eq!(req.prompt, Prompt::TokenBatch(vec![vec![1, 2], vec![3]]));
        assert_eq!(req.sampling.seed, Some(7));
        assert_eq!(req.extra.len(), 1);
        assert_eq!(req.extra["priority"], json!(1));
    }

    #[test]
    fn update_modes_use_the_server_names() {
        let opts = UpdateOptions {
            weight_version: Some(3),
            mode: Some(UpdateMode::Continue),
        };
        assert_eq!(
            serde_json::to_value(opts).unwrap(),
            json!({"weight_version": 3, "mode": "continue"})
        );
        assert_eq!(
            serde_json::to_value(PauseMode::Keep).unwrap(),
            json!("keep")
        );
    }

    #[test]
    fn completion_response_keeps_token_order_and_unknown_fields() {
        // A string, not `json!`: a `Value` would sort the keys before the client saw them.
        let body = r#"{
            "id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
            "choices": [{
                "index": 0, "text": "ab", "finish_reason": "length", "stop_reason": null,
                "logprobs": {
                    "text_offset": [0, 1], "token_logprobs": [null, -0.5],
                    "tokens": ["a", "b"],
                    "top_logprobs": [null, {"z": -0.5, "b": -0.25, "x": null}]
                },
                "token_ids": [5, 6], "weight_version": 2,
                "weight_versions": [{"version": 1, "start": 0, "end": 1},
                                    {"version": 2, "start": 1, "end": 2}],
                "future_field": true
            }],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
            "system_fingerprint": "fp"
        }"#;
        let r: CompletionResponse = serde_json::from_str(body).unwrap();
        let c = &r.choices[0];
        let lp = c.logprobs.as_ref().unwrap();
        assert_eq!(lp.token_logprobs, vec![None, Some(-0.5)]);
        let top = lp.top_logprobs[1].as_ref().unwrap();
        let keys: Vec<&str> = top.entries().iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["z", "b", "x"]);
        assert_eq!(top.get("x"), Some(&f32::NEG_INFINITY));
        assert_eq!(c.weight_versions.as_ref().unwrap()[1].version, 2);
        assert_eq!(c.extra["future_field"], json!(true));
        assert_eq!(r.extra["system_fingerprint"], json!("fp"));
        assert_eq!(r.usage.unwrap().total_tokens, 5);
    }

    #[test]
    fn prompt_logprobs_read_as_ordered_maps_by_token_id() {
        let v: PromptLogprobs = serde_json::from_str(
            r#"[null, {"17": {"logprob": -1.5, "rank": 3, "decoded_token": "x"},
                       "4": {"logprob": -0.1, "rank": 1, "decoded_token": "y"}}]"#,
        )
        .unwrap();
        let m = v[1].as_ref().unwrap();
        assert_eq!(m.entries()[0].0, "17");
        assert_eq!(m.get("4").unwrap().rank, Some(1));
    }

    #[test]
    fn tensor_values_read_vectors_rows_and_nan() {
        let v: TensorValues = serde_json::from_value(json!([1.0, null])).unwrap();
        assert!(matches!(&v, TensorValues::Vector(x) if x[0] == 1.0 && x[1].is_nan()));
        let r: TensorValues = serde_json::from_value(json!([[1.0, 2.0], [3.0, 4.0]])).unwrap();
        assert_eq!(r.flatten(), vec![1.0, 2.0, 3.0, 4.0]);
    }

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
