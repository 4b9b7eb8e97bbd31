//! Small routes: `GET /v1/models`, `POST /tokenize`, `POST /detokenize`, `GET /version`.

use super::{ChatMessage, Extra};
use serde::{Deserialize, Serialize};

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
