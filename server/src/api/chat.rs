//! `POST /v1/chat/completions`, whole or streamed.

use super::error::ApiError;
use super::format::{
    chat_logprobs, merge, prompt_logprobs, stop_reason, weight_versions, TokenText,
};
use super::protocol::{
    ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
    ChatCompletionResponse, ChatDelta, ChatResponseMessage, Usage,
};
use super::validation::{
    check_model, parse_json, render_chat, resolve_max_tokens, sampling_params,
};
use super::{sse_response, AppState};
use crate::engine::{GeneratedToken, RequestOutput, TokenLogprob};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use std::sync::Arc;

/// Create a chat completion (OpenAI/vLLM `/v1/chat/completions`).
#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    request_body = ChatCompletionRequest,
    responses(
        (status = 200, description = "The reply (or an SSE stream of `chat.completion.chunk` with `stream`)", body = ChatCompletionResponse),
        (status = 400, description = "Invalid request", body = super::protocol::ErrorResponse),
        (status = 401, description = "Missing or wrong API key", body = super::protocol::ErrorResponse),
        (status = 404, description = "Unknown model", body = super::protocol::ErrorResponse),
        (status = 413, description = "Body too large", body = super::protocol::ErrorResponse),
        (status = 503, description = "Not ready or paused", body = super::protocol::ErrorResponse),
    ),
    tag = "inference"
)]
pub async fn create_chat_completion(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match chat(st, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn chat(
    st: Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: ChatCompletionRequest = parse_json(body)?;
    check_model(&st, req.model.as_deref())?;
    let max_lp = st.engine.info().max_logprobs as i64;
    let want_logprobs = req.logprobs.unwrap_or(false);
    let top = match req.top_logprobs {
        Some(k) if k < 0 || k > max_lp => {
            return Err(ApiError::invalid_param(
                "top_logprobs",
                format!("top_logprobs must be between 0 and {max_lp}, got {k}"),
            ))
        }
        Some(_) if !want_logprobs => {
            return Err(ApiError::invalid_param(
                "top_logprobs",
                "top_logprobs requires logprobs to be true",
            ))
        }
        k => k.unwrap_or(0) as usize,
    };
    let cont = req.continue_final_message.unwrap_or(false);
    let add_gen = req.add_generation_prompt.unwrap_or(!cont);
    let text = render_chat(
        &st,
        &req.messages,
        add_gen,
        cont,
        req.chat_template_kwargs.as_ref(),
    )?;
    let ids = st
        .engine
        .tokenizer()
        .encode(&text, false)
        .map_err(|e| ApiError::invalid_param("messages", e.to_string()))?;
    if ids.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "the rendered conversation is empty",
        ));
    }
    let asked = req.max_completion_tokens.or(req.sampling.max_tokens);
    let max_tokens = resolve_max_tokens(&st, asked, None, ids.len())?;
    let params = sampling_params(&st, &req.sampling, max_tokens, want_logprobs.then_some(top))?;
    st.engine.check(&ids, &params)?;
    st.ready()?;
    let id = st.new_id("chatcmpl", req.sampling.request_id.as_deref());
    let rx = st.engine.submit(id.clone(), ids.clone(), params.clone())?;
    let tt_ids = req.sampling.return_tokens_as_token_ids.unwrap_or(false);
    let token_ids = req.sampling.return_token_ids.unwrap_or(false);
    let n = params.n;
    if req.sampling.stream == Some(true) {
        let usage = req
            .sampling
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        return Ok(stream(
            st,
            id,
            rx,
            n,
            ids.len(),
            want_logprobs,
            top,
            tt_ids,
            token_ids,
            usage,
            continuous_usage(&req.sampling, usage),
        ));
    }
    let mut tokens: Vec<Vec<GeneratedToken>> = vec![Vec::new(); n];
    let mut texts = vec![String::new(); n];
    let mut fin: Vec<(Option<String>, Option<serde_json::Value>)> = vec![(None, None); n];
    let mut plp: Option<Vec<Option<TokenLogprob>>> = None;
    let mut outputs = merge(vec![rx]);
    while let Some((_, out)) = outputs.next().await {
        match out {
            RequestOutput::PromptLogprobs(p) => plp = Some(p),
            RequestOutput::Sample(s) => {
                tokens[s.index].extend(s.tokens);
                texts[s.index].push_str(&s.text);
                if let Some(f) = s.finish_reason {
                    fin[s.index] = (Some(f.as_str().to_string()), stop_reason(&s.stop_reason));
                }
            }
            RequestOutput::Error(e) => return Err(e.into()),
        }
    }
    if fin.iter().any(|f| f.0.is_none()) {
        // The outputs ended without a finish: the engine stopped (a bug, logged there).
        return Err(ApiError::new(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "the engine stopped before the request finished",
        ));
    }
    let tt = TokenText {
        tok: st.engine.tokenizer(),
        as_ids: tt_ids,
    };
    let completion_tokens = tokens.iter().map(Vec::len).sum();
    let choices = (0..n)
        .map(|i| {
            let (weight_version, weight_versions) = weight_versions(&tokens[i]);
            ChatChoice {
                index: i,
                message: ChatResponseMessage {
                    role: "assistant".into(),
                    content: Some(std::mem::take(&mut texts[i])),
                    tool_calls: vec![],
                },
                logprobs: want_logprobs.then(|| chat_logprobs(tt, &tokens[i], top)),
                finish_reason: fin[i].0.clone(),
                stop_reason: fin[i].1.clone(),
                token_ids: token_ids.then(|| tokens[i].iter().map(|t| t.token).collect()),
                weight_version: weight_version.or(Some(st.weight_version())),
                weight_versions,
            }
        })
        .collect();
    Ok(Json(ChatCompletionResponse {
        id,
        object: "chat.completion".into(),
        created: st.now(),
        model: st.served_model_name.clone(),
        choices,
        usage: Usage {
            prompt_tokens: ids.len(),
            completion_tokens,
            total_tokens: ids.len() + completion_tokens,
            prompt_tokens_details: None,
        },
        prompt_logprobs: req.sampling.prompt_logprobs.map(|k| {
            plp.map(|p| prompt_logprobs(tt, &ids, &p, k.max(0) as usize))
                .unwrap_or_default()
        }),
        prompt_token_ids: token_ids.then_some(ids),
    })
    .into_response())
}

/// `stream_options.continuous_usage_stats` (only with `include_usage`, as vLLM).
pub(super) fn continuous_usage(f: &super::protocol::SamplingFields, include_usage: bool) -> bool {
    include_usage
        && f.stream_options
            .as_ref()
            .and_then(|o| o.continuous_usage_stats)
            .unwrap_or(false)
}

#[allow(clippy::too_many_arguments)]
fn stream(
    st: Arc<AppState>,
    id: String,
    rx: tokio::sync::mpsc::UnboundedReceiver<RequestOutput>,
    n: usize,
    prompt_tokens: usize,
    want_logprobs: bool,
    top: usize,
    as_ids: bool,
    token_ids: bool,
    include_usage: bool,
    continuous_usage: bool,
) -> Response {
    let (tx, out_rx) = tokio::sync::mpsc::channel::<String>(64);
    tokio::spawn(async move {
        let tt = TokenText {
            tok: st.engine.tokenizer(),
            as_ids,
        };
        let created = st.now();
        let chunk = |choices: Vec<ChatChunkChoice>, usage: Option<Usage>| {
            serde_json::to_string(&ChatCompletionChunk {
                id: id.clone(),
                object: "chat.completion.chunk".into(),
                created,
                model: st.served_model_name.clone(),
                choices,
                usage,
            })
            .unwrap_or_default()
        };
        // vLLM opens every choice with a role-only delta.
        for i in 0..n {
            let c = ChatChunkChoice {
                index: i,
                delta: ChatDelta {
                    role: Some("assistant".into()),
                    content: Some(String::new()),
                },
                logprobs: None,
                finish_reason: None,
                stop_reason: None,
                token_ids: None,
                weight_version: Some(st.weight_version()),
            };
            if tx.send(chunk(vec![c], None)).await.is_err() {
                return;
            }
        }
        let mut completion_tokens = 0;
        let mut outputs = merge(vec![rx]);
        while let Some((_, out)) = outputs.next().await {
            let s = match out {
                RequestOutput::PromptLogprobs(_) => continue,
                RequestOutput::Sample(s) => s,
                RequestOutput::Error(e) => {
                    let _ = tx
                        .send(serde_json::to_string(&ApiError::from(e).body()).unwrap_or_default())
                        .await;
                    break;
                }
            };
            completion_tokens += s.tokens.len();
            let (weight_version, _) = weight_versions(&s.tokens);
            let c = ChatChunkChoice {
                index: s.index,
                delta: ChatDelta {
                    role: None,
                    content: Some(s.text),
                },
                logprobs: want_logprobs.then(|| chat_logprobs(tt, &s.tokens, top)),
                finish_reason: s.finish_reason.map(|f| f.as_str().to_string()),
                stop_reason: stop_reason(&s.stop_reason),
                token_ids: token_ids.then(|| s.tokens.iter().map(|t| t.token).collect()),
                weight_version,
            };
            let usage = continuous_usage.then(|| Usage {
                prompt_tokens,
                completion_tokens,
                total_tokens: prompt_tokens + completion_tokens,
                prompt_tokens_details: None,
            });
            if tx.send(chunk(vec![c], usage)).await.is_err() {
                return;
            }
        }
        if include_usage {
            let usage = Usage {
                prompt_tokens,
                completion_tokens,
                total_tokens: prompt_tokens + completion_tokens,
                prompt_tokens_details: None,
            };
            let _ = tx.send(chunk(vec![], Some(usage))).await;
        }
    });
    sse_response(out_rx)
}
