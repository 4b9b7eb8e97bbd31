//! Small routes: models, tokenize/detokenize, health, ping, version.

use super::error::ApiError;
use super::format::TokenText;
use super::protocol::{
    DetokenizeRequest, DetokenizeResponse, ModelCard, ModelList, TokenizeRequest, TokenizeResponse,
    VersionResponse,
};
use super::validation::{check_model, parse_json, render_chat};
use super::AppState;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::sync::Arc;

/// List the served model.
#[utoipa::path(get, path = "/v1/models", responses((status = 200, body = ModelList)), tag = "inference")]
pub async fn list_models(State(st): State<Arc<AppState>>) -> Json<ModelList> {
    Json(ModelList {
        object: "list".into(),
        data: vec![ModelCard {
            id: st.served_model_name.clone(),
            object: "model".into(),
            created: st.started,
            owned_by: "halfstep".into(),
            root: st.model_root.clone(),
            parent: None,
            max_model_len: st.engine.info().max_model_len,
        }],
    })
}

/// Tokenize a prompt or chat messages (vLLM shape).
#[utoipa::path(post, path = "/tokenize", request_body = TokenizeRequest,
    responses((status = 200, body = TokenizeResponse), (status = 400, body = super::protocol::ErrorResponse)),
    tag = "inference")]
pub async fn tokenize(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let go = || -> Result<TokenizeResponse, ApiError> {
        let req: TokenizeRequest = parse_json(body)?;
        check_model(&st, req.model.as_deref())?;
        let tok = st.engine.tokenizer();
        let ids = match (&req.prompt, &req.messages) {
            (Some(p), None) => tok
                .encode(p, req.add_special_tokens.unwrap_or(true))
                .map_err(|e| ApiError::invalid_param("prompt", e.to_string()))?,
            (None, Some(m)) => {
                let text = render_chat(
                    &st,
                    m,
                    req.add_generation_prompt.unwrap_or(true),
                    false,
                    None,
                )?;
                tok.encode(&text, req.add_special_tokens.unwrap_or(false))
                    .map_err(|e| ApiError::invalid_param("messages", e.to_string()))?
            }
            _ => {
                return Err(ApiError::bad_request(
                    "give exactly one of prompt or messages",
                ))
            }
        };
        let tt = TokenText { tok, as_ids: false };
        Ok(TokenizeResponse {
            count: ids.len(),
            max_model_len: st.engine.info().max_model_len,
            token_strs: req.return_token_strs.unwrap_or(false).then(|| {
                ids.iter()
                    .map(|&i| tok.id_to_token(i).unwrap_or_else(|| tt.of(i)))
                    .collect()
            }),
            tokens: ids,
        })
    };
    match go() {
        Ok(r) => Json(r).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Turn token ids back into text.
#[utoipa::path(post, path = "/detokenize", request_body = DetokenizeRequest,
    responses((status = 200, body = DetokenizeResponse), (status = 400, body = super::protocol::ErrorResponse)),
    tag = "inference")]
pub async fn detokenize(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let go = || -> Result<DetokenizeResponse, ApiError> {
        let req: DetokenizeRequest = parse_json(body)?;
        check_model(&st, req.model.as_deref())?;
        let vocab = st.engine.info().vocab_size as i64;
        if let Some(&bad) = req.tokens.iter().find(|&&t| !(0..vocab).contains(&t)) {
            return Err(ApiError::invalid_param(
                "tokens",
                format!("token id {bad} is out of range (vocabulary size {vocab})"),
            ));
        }
        let ids: Vec<u32> = req.tokens.iter().map(|&t| t as u32).collect();
        let prompt = st
            .engine
            .tokenizer()
            .decode(&ids, false)
            .map_err(|e| ApiError::invalid_param("tokens", e.to_string()))?;
        Ok(DetokenizeResponse { prompt })
    };
    match go() {
        Ok(r) => Json(r).into_response(),
        Err(e) => e.into_response(),
    }
}

/// 200 while the server runs (also while paused), 503 once it is shutting down.
#[utoipa::path(get, path = "/health", responses((status = 200, description = "Ready"), (status = 503, description = "Not ready", body = super::protocol::ErrorResponse)), tag = "ops")]
pub async fn health(State(st): State<Arc<AppState>>) -> Response {
    // A paused server is healthy: a liveness probe must not kill it during a weight sync.
    let engine_alive = !st
        .engine
        .stats()
        .engine_dead
        .load(std::sync::atomic::Ordering::Relaxed);
    if st.accepting.load(std::sync::atomic::Ordering::Relaxed) && engine_alive {
        StatusCode::OK.into_response()
    } else {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down or its engine stopped",
        )
        .into_response()
    }
}

/// Liveness probe (SageMaker-style `/ping`), same as `/health`.
#[utoipa::path(get, path = "/ping", responses((status = 200, description = "Ready"), (status = 503, description = "Not ready", body = super::protocol::ErrorResponse)), tag = "ops")]
pub async fn ping(st: State<Arc<AppState>>) -> Response {
    health(st).await
}

/// halfstep's version.
#[utoipa::path(get, path = "/version", responses((status = 200, body = VersionResponse)), tag = "ops")]
pub async fn version() -> Json<VersionResponse> {
    Json(VersionResponse {
        version: env!("CARGO_PKG_VERSION").to_string(),
    })
}
