//! `POST /v1/completions`, whole or streamed.

use super::error::ApiError;
use super::format::{
    merge, prompt_logprobs, stop_reason, weight_versions, CompletionLogprobsBuilder, TokenText,
};
use super::protocol::{CompletionChoice, CompletionRequest, CompletionResponse, Usage};
use super::validation::{
    check_model, completion_prompts, parse_json, resolve_max_tokens, sampling_params, PromptInput,
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

/// Create a completion (OpenAI/vLLM `/v1/completions`).
#[utoipa::path(
    post,
    path = "/v1/completions",
    request_body = CompletionRequest,
    responses(
        (status = 200, description = "The completion (or an SSE stream of chunks with `stream`)", body = CompletionResponse),
        (status = 400, description = "Invalid request", body = super::protocol::ErrorResponse),
        (status = 401, description = "Missing or wrong API key", body = super::protocol::ErrorResponse),
        (status = 404, description = "Unknown model", body = super::protocol::ErrorResponse),
        (status = 413, description = "Body too large", body = super::protocol::ErrorResponse),
        (status = 503, description = "Not ready or paused", body = super::protocol::ErrorResponse),
    ),
    tag = "inference"
)]
pub async fn create_completion(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match completion(st, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

#[derive(Default, Clone)]
struct ChoiceState {
    tokens: Vec<GeneratedToken>,
    text: String,
    finish: Option<String>,
    stop: Option<serde_json::Value>,
    started: bool,
}

async fn completion(
    st: Arc<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse_json(body)?;
    check_model(&st, req.model.as_deref())?;
    if req.suffix.is_some() {
        return Err(ApiError::invalid_param("suffix", "suffix is not supported"));
    }
    let n = req.sampling.n.unwrap_or(1);
    if let Some(b) = req.best_of {
        if b != n {
            return Err(ApiError::invalid_param(
                "best_of",
                "best_of must equal n (or be omitted)",
            ));
        }
    }
    let max_lp = st.engine.info().max_logprobs as i64;
    let logprobs = match req.logprobs {
        Some(k) if k < 0 || k > max_lp => {
            return Err(ApiError::invalid_param(
                "logprobs",
                format!("logprobs must be between 0 and {max_lp} (--max-logprobs), got {k}"),
            ))
        }
        k => k.map(|k| k as usize),
    };
    let echo = req.echo.unwrap_or(false);
    let prompts = completion_prompts(&st, &req.prompt)?;
    // Check every prompt before queuing any.
    let mut plans = Vec::with_capacity(prompts.len());
    for p in &prompts {
        let max_tokens = resolve_max_tokens(&st, req.sampling.max_tokens, Some(16), p.ids.len())?;
        let mut params = sampling_params(&st, &req.sampling, max_tokens, logprobs)?;
        if echo && logprobs.is_some() {
            // Echoed prompt tokens carry logprobs: compute them as prompt logprobs.
            params.prompt_logprobs = Some(
                params
                    .prompt_logprobs
                    .unwrap_or(0)
                    .max(logprobs.unwrap_or(0)),
            );
        }
        st.engine.check(&p.ids, &params)?;
        plans.push(params);
    }
    st.ready()?;
    let id = st.new_id("cmpl", req.sampling.request_id.as_deref());
    let mut rxs = Vec::with_capacity(prompts.len());
    for (i, (p, params)) in prompts.iter().zip(plans.iter()).enumerate() {
        rxs.push(
            st.engine
                .submit(format!("{id}-{i}"), p.ids.clone(), params.clone())?,
        );
    }
    let ctx = Ctx {
        st: st.clone(),
        id,
        n: n as usize,
        echo,
        as_ids: req.sampling.return_tokens_as_token_ids.unwrap_or(false),
        token_ids: req.sampling.return_token_ids.unwrap_or(false),
        want_logprobs: logprobs.is_some(),
        prompt_logprobs: req.sampling.prompt_logprobs.map(|k| k.max(0) as usize),
        prompts,
    };
    if req.sampling.stream == Some(true) {
        let usage = req
            .sampling
            .stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        let continuous = super::chat::continuous_usage(&req.sampling, usage);
        return Ok(stream(ctx, rxs, usage, continuous));
    }
    let mut choices = vec![ChoiceState::default(); ctx.prompts.len() * ctx.n];
    let mut plps: Vec<Option<Vec<Option<TokenLogprob>>>> = vec![None; ctx.prompts.len()];
    let mut outputs = merge(rxs);
    while let Some((pi, out)) = outputs.next().await {
        match out {
            RequestOutput::PromptLogprobs(p) => plps[pi] = Some(p),
            RequestOutput::Sample(s) => {
                let c = &mut choices[pi * ctx.n + s.index];
                c.tokens.extend(s.tokens);
                c.text.push_str(&s.text);
                if let Some(f) = s.finish_reason {
                    c.finish = Some(f.as_str().to_string());
                    c.stop = stop_reason(&s.stop_reason);
                }
            }
            RequestOutput::Error(e) => return Err(e.into()),
        }
    }
    if choices.iter().any(|c| c.finish.is_none()) {
        // The outputs ended without a finish: the engine stopped (a bug, logged there).
        return Err(ApiError::new(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "the engine stopped before the request finished",
        ));
    }
    let tt = TokenText {
        tok: st.engine.tokenizer(),
        as_ids: ctx.as_ids,
    };
    let mut usage = Usage::default();
    let mut out = Vec::with_capacity(choices.len());
    for (ci, c) in choices.into_iter().enumerate() {
        let pi = ci / ctx.n;
        let p = &ctx.prompts[pi];
        if ci % ctx.n == 0 {
            usage.prompt_tokens += p.ids.len();
        }
        usage.completion_tokens += c.tokens.len();
        out.push(ctx.choice(tt, ci, &c, plps[pi].as_deref(), true, 0));
    }
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens;
    Ok(Json(CompletionResponse {
        id: ctx.id.clone(),
        object: "text_completion".into(),
        created: st.now(),
        model: st.served_model_name.clone(),
        choices: out,
        usage: Some(usage),
    })
    .into_response())
}

struct Ctx {
    st: Arc<AppState>,
    id: String,
    n: usize,
    echo: bool,
    as_ids: bool,
    token_ids: bool,
    want_logprobs: bool,
    prompt_logprobs: Option<usize>,
    prompts: Vec<PromptInput>,
}

impl Ctx {
    /// A choice from accumulated state; `first` adds the echoed prompt and prompt fields.
    fn choice(
        &self,
        tt: TokenText,
        ci: usize,
        c: &ChoiceState,
        plp: Option<&[Option<TokenLogprob>]>,
        first: bool,
        text_offset: usize,
    ) -> CompletionChoice {
        let p = &self.prompts[ci / self.n];
        let echo = self.echo && first;
        let prompt_text = if echo {
            p.text.clone().unwrap_or_else(|| {
                self.st
                    .engine
                    .tokenizer()
                    .decode(&p.ids, false)
                    .unwrap_or_default()
            })
        } else {
            String::new()
        };
        let logprobs = self.want_logprobs.then(|| {
            let mut b = CompletionLogprobsBuilder::new(text_offset);
            if echo {
                b.push_prompt(tt, &p.ids, plp.unwrap_or(&[]));
            }
            b.push_generated(tt, &c.tokens);
            b.out
        });
        let (weight_version, weight_versions) = weight_versions(&c.tokens);
        CompletionChoice {
            index: ci,
            text: format!("{prompt_text}{}", c.text),
            logprobs,
            finish_reason: c.finish.clone(),
            stop_reason: c.stop.clone(),
            prompt_logprobs: self.prompt_logprobs.filter(|_| first).map(|k| {
                plp.map(|l| prompt_logprobs(tt, &p.ids, l, k))
                    .unwrap_or_default()
            }),
            prompt_token_ids: (first && self.token_ids).then(|| p.ids.clone()),
            token_ids: self
                .token_ids
                .then(|| c.tokens.iter().map(|t| t.token).collect()),
            weight_version: weight_version.or(Some(
                self.st
                    .engine
                    .stats()
                    .weight_version
                    .load(std::sync::atomic::Ordering::Relaxed),
            )),
            weight_versions,
        }
    }
}

fn stream(
    ctx: Ctx,
    rxs: Vec<tokio::sync::mpsc::UnboundedReceiver<RequestOutput>>,
    include_usage: bool,
    continuous_usage: bool,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(64);
    tokio::spawn(async move {
        let st = ctx.st.clone();
        let tt = TokenText {
            tok: st.engine.tokenizer(),
            as_ids: ctx.as_ids,
        };
        let mut started = vec![false; ctx.prompts.len() * ctx.n];
        let mut offsets = vec![0usize; ctx.prompts.len() * ctx.n];
        let prompt_tokens: usize = ctx.prompts.iter().map(|p| p.ids.len()).sum();
        let mut plps: Vec<Option<Vec<Option<TokenLogprob>>>> = vec![None; ctx.prompts.len()];
        let mut completion_tokens = 0;
        let created = st.now();
        let mut outputs = merge(rxs);
        while let Some((pi, out)) = outputs.next().await {
            let s = match out {
                RequestOutput::PromptLogprobs(p) => {
                    plps[pi] = Some(p);
                    continue;
                }
                RequestOutput::Sample(s) => s,
                RequestOutput::Error(e) => {
                    let body = serde_json::to_string(&ApiError::from(e).body()).unwrap_or_default();
                    let _ = tx.send(body).await;
                    break;
                }
            };
            let ci = pi * ctx.n + s.index;
            completion_tokens += s.tokens.len();
            let state = ChoiceState {
                tokens: s.tokens,
                text: s.text,
                finish: s.finish_reason.map(|f| f.as_str().to_string()),
                stop: stop_reason(&s.stop_reason),
                started: started[ci],
            };
            let first = !state.started;
            started[ci] = true;
            let mut choice = ctx.choice(tt, ci, &state, plps[pi].as_deref(), first, offsets[ci]);
            // Offsets run over the whole streamed text, as vLLM counts them.
            offsets[ci] += choice.text.chars().count();
            if !ctx.token_ids {
                choice.token_ids = None;
            }
            choice.weight_versions = None;
            let chunk = CompletionResponse {
                id: ctx.id.clone(),
                object: "text_completion".into(),
                created,
                model: st.served_model_name.clone(),
                choices: vec![choice],
                usage: continuous_usage.then(|| Usage {
                    prompt_tokens,
                    completion_tokens,
                    total_tokens: prompt_tokens + completion_tokens,
                    prompt_tokens_details: None,
                }),
            };
            if tx
                .send(serde_json::to_string(&chunk).unwrap_or_default())
                .await
                .is_err()
            {
                return; // client gone: dropping `outputs` aborts the requests
            }
        }
        if include_usage {
            let chunk = CompletionResponse {
                id: ctx.id.clone(),
                object: "text_completion".into(),
                created,
                model: st.served_model_name.clone(),
                choices: vec![],
                usage: Some(Usage {
                    prompt_tokens,
                    completion_tokens,
                    total_tokens: prompt_tokens + completion_tokens,
                    prompt_tokens_details: None,
                }),
            };
            let _ = tx
                .send(serde_json::to_string(&chunk).unwrap_or_default())
                .await;
        }
    });
    sse_response(rx)
}
