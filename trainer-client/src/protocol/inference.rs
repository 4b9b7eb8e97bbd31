//! `POST /v1/completions` and `POST /v1/chat/completions`: requests, whole responses and stream
//! chunks.

use super::{logprob, top_logprob_maps, Extra, OrderedMap, Prompt, SamplingParams};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

// ---------------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------------

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
// Responses
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Stop, StreamOptions, UpdateOptions};
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
}
