//! Untrusted JSON in, checked parameters out: every request is validated here before anything
//! is queued, so the engine never sees an invalid request.

use super::error::ApiError;
use super::protocol::{ChatMessage, Prompt, SamplingFields, Stop};
use super::AppState;
use crate::engine::SamplingParams;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

/// Parses a JSON body, turning every failure into a 400 (or 413) with an OpenAI error body.
pub fn parse_json<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let bytes = body.map_err(|e| {
        let status = e.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(status, "request body too large")
        } else {
            ApiError::new(status, format!("cannot read the request body: {e}"))
        }
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

/// Checks `model` against the served name (absent means the served model).
pub fn check_model(st: &AppState, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        None => Ok(()),
        Some(m) if m == st.served_model_name || m == st.model_root => Ok(()),
        Some(m) => Err(ApiError {
            param: Some("model".into()),
            ..ApiError::new(
                StatusCode::NOT_FOUND,
                format!("The model `{m}` does not exist."),
            )
        }),
    }
}

fn int_in(param: &str, v: Option<i64>, lo: i64, hi: i64) -> Result<Option<i64>, ApiError> {
    match v {
        Some(x) if x < lo || x > hi => Err(ApiError::invalid_param(
            param,
            format!("{param} must be between {lo} and {hi}, got {x}"),
        )),
        _ => Ok(v),
    }
}

fn finite(param: &str, v: Option<f64>) -> Result<Option<f32>, ApiError> {
    match v {
        Some(x) if !x.is_finite() => Err(ApiError::invalid_param(
            param,
            format!("{param} must be a finite number"),
        )),
        Some(x) => Ok(Some(x as f32)),
        None => Ok(None),
    }
}

/// Builds validated sampling parameters. `max_tokens` is the resolved output limit;
/// `logprobs` the per-token top-k asked for.
pub fn sampling_params(
    st: &AppState,
    f: &SamplingFields,
    max_tokens: usize,
    logprobs: Option<usize>,
) -> Result<SamplingParams, ApiError> {
    let max_logprobs = st.engine.info().max_logprobs as i64;
    let mut p = SamplingParams {
        max_tokens,
        logprobs,
        ..Default::default()
    };
    if let Some(t) = finite("temperature", f.temperature)? {
        p.temperature = t;
    }
    if let Some(t) = finite("top_p", f.top_p)? {
        p.top_p = t;
    }
    if let Some(k) = f.top_k {
        if k < -1 {
            return Err(ApiError::invalid_param(
                "top_k",
                format!("top_k must be -1 (disabled) or at least 0, got {k}"),
            ));
        }
        p.top_k = k.max(0) as usize;
    }
    if let Some(m) = finite("min_p", f.min_p)? {
        p.min_p = m;
    }
    if let Some(n) = int_in("n", f.n, 1, 128)? {
        p.n = n as usize;
    }
    p.seed = f.seed.map(|s| s as u64);
    p.stop = match &f.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if let Some(ids) = &f.stop_token_ids {
        let vocab = st.engine.info().vocab_size as i64;
        for &t in ids {
            if !(0..vocab).contains(&t) {
                return Err(ApiError::invalid_param(
                    "stop_token_ids",
                    format!("token id {t} is out of range"),
                ));
            }
        }
        p.stop_token_ids = ids.iter().map(|&t| t as u32).collect();
    }
    p.ignore_eos = f.ignore_eos.unwrap_or(false);
    if let Some(m) = int_in("min_tokens", f.min_tokens, 0, i64::MAX)? {
        p.min_tokens = m as usize;
    }
    p.include_stop_str_in_output = f.include_stop_str_in_output.unwrap_or(false);
    p.skip_special_tokens = f.skip_special_tokens.unwrap_or(true);
    if let Some(v) = finite("presence_penalty", f.presence_penalty)? {
        p.presence_penalty = v;
    }
    if let Some(v) = finite("frequency_penalty", f.frequency_penalty)? {
        p.frequency_penalty = v;
    }
    if let Some(v) = finite("repetition_penalty", f.repetition_penalty)? {
        p.repetition_penalty = v;
    }
    p.prompt_logprobs =
        int_in("prompt_logprobs", f.prompt_logprobs, 0, max_logprobs)?.map(|k| k as usize);
    if f.stream_options.is_some() && f.stream != Some(true) {
        return Err(ApiError::invalid_param(
            "stream_options",
            "stream_options is only allowed when stream is true",
        ));
    }
    p.validate(st.engine.info().max_logprobs)
        .map_err(|e| ApiError::invalid_param(e.param, e.message))?;
    Ok(p)
}

/// Resolves `max_tokens` (or `max_completion_tokens`) against the context left by the prompt.
pub fn resolve_max_tokens(
    st: &AppState,
    asked: Option<i64>,
    default: Option<usize>,
    prompt_len: usize,
) -> Result<usize, ApiError> {
    let max_len = st.engine.info().max_model_len;
    if prompt_len >= max_len {
        return Err(ApiError::invalid_param(
            "prompt",
            format!("This model's maximum context length is {max_len} tokens. However, your prompt has {prompt_len} tokens."),
        ));
    }
    let left = max_len - prompt_len;
    match asked {
        Some(m) if m < 1 => Err(ApiError::invalid_param("max_tokens", format!("max_tokens must be at least 1, got {m}"))),
        Some(m) if m as u64 > left as u64 => Err(ApiError::invalid_param(
            "max_tokens",
            format!(
                "This model's maximum context length is {max_len} tokens. However, you requested {m} output tokens and your prompt has {prompt_len} tokens ({} in total).",
                m as u64 + prompt_len as u64
            ),
        )),
        Some(m) => Ok(m as usize),
        None => Ok(default.unwrap_or(left).min(left)),
    }
}

/// One prompt to generate from: its text (if given as text) and its token ids.
pub struct PromptInput {
    /// The text, when the prompt was text.
    pub text: Option<String>,
    /// Token ids.
    pub ids: Vec<u32>,
}

/// Tokenises a completions prompt (string, strings, ids or id lists).
pub fn completion_prompts(st: &AppState, prompt: &Prompt) -> Result<Vec<PromptInput>, ApiError> {
    let tok = st.engine.tokenizer();
    let vocab = st.engine.info().vocab_size as i64;
    let text = |s: &String| -> Result<PromptInput, ApiError> {
        let ids = tok
            .encode(s, true)
            .map_err(|e| ApiError::invalid_param("prompt", e.to_string()))?;
        Ok(PromptInput {
            text: Some(s.clone()),
            ids,
        })
    };
    let ids = |v: &Vec<i64>| -> Result<PromptInput, ApiError> {
        if let Some(&bad) = v.iter().find(|&&t| !(0..vocab).contains(&t)) {
            return Err(ApiError::invalid_param(
                "prompt",
                format!("token id {bad} is out of range (vocabulary size {vocab})"),
            ));
        }
        Ok(PromptInput {
            text: None,
            ids: v.iter().map(|&t| t as u32).collect(),
        })
    };
    let out: Vec<PromptInput> = match prompt {
        Prompt::Text(s) => vec![text(s)?],
        Prompt::Texts(v) => v.iter().map(text).collect::<Result<_, _>>()?,
        Prompt::Tokens(v) => vec![ids(v)?],
        Prompt::TokenLists(v) => v.iter().map(ids).collect::<Result<_, _>>()?,
    };
    if out.is_empty() {
        return Err(ApiError::invalid_param(
            "prompt",
            "prompt must not be an empty list",
        ));
    }
    if out.iter().any(|p| p.ids.is_empty()) {
        return Err(ApiError::invalid_param(
            "prompt",
            "prompt must not be empty",
        ));
    }
    Ok(out)
}

/// Renders chat messages with the model's template.
pub fn render_chat(
    st: &AppState,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    continue_final_message: bool,
    kwargs: Option<&serde_json::Map<String, serde_json::Value>>,
) -> Result<String, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "messages must not be empty",
        ));
    }
    if continue_final_message && add_generation_prompt {
        return Err(ApiError::invalid_param(
            "continue_final_message",
            "continue_final_message and add_generation_prompt cannot both be true",
        ));
    }
    let mut msgs = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        if !matches!(
            m.role.as_str(),
            "system" | "user" | "assistant" | "tool" | "developer"
        ) {
            return Err(ApiError::invalid_param("messages", format!("messages[{i}].role '{}' is not one of system, user, assistant, tool, developer", m.role)));
        }
        let content = match &m.content {
            None | Some(serde_json::Value::Null) => String::new(),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(parts)) => {
                let mut s = String::new();
                for p in parts {
                    match (
                        p.get("type").and_then(|t| t.as_str()),
                        p.get("text").and_then(|t| t.as_str()),
                    ) {
                        (Some("text"), Some(t)) => s.push_str(t),
                        _ => {
                            return Err(ApiError::invalid_param(
                                "messages",
                                format!("messages[{i}].content: only text parts are supported"),
                            ))
                        }
                    }
                }
                s
            }
            Some(_) => {
                return Err(ApiError::invalid_param(
                    "messages",
                    format!("messages[{i}].content must be a string or a list of text parts"),
                ))
            }
        };
        let mut obj = serde_json::Map::new();
        for (k, v) in &m.extra {
            obj.insert(k.clone(), v.clone());
        }
        obj.insert("role".into(), m.role.clone().into());
        obj.insert("content".into(), content.into());
        msgs.push(serde_json::Value::Object(obj));
    }
    let last = msgs
        .last()
        .and_then(|m| m["content"].as_str())
        .unwrap_or("")
        .to_string();
    let rendered = st
        .engine
        .tokenizer()
        .apply_chat_template(
            &serde_json::Value::Array(msgs),
            add_generation_prompt,
            kwargs,
        )
        .map_err(|e| ApiError::invalid_param("messages", e.to_string()))?;
    if continue_final_message {
        // Cut what the template adds after the final message (its end-of-turn marker).
        return match rendered.rfind(&last) {
            Some(i) if !last.is_empty() => Ok(rendered[..i + last.len()].to_string()),
            _ => Ok(rendered),
        };
    }
    Ok(rendered)
}
