//! The HTTP API: routes, shared state, authentication, limits and error shapes.
//!
//! Routes follow vLLM's OpenAI-compatible server (see shared/design/api.md). Validation lives
//! in [`validation`]; handlers only queue checked requests and format engine outputs.

pub mod chat;
pub mod completions;
pub mod error;
pub mod format;
pub mod hooks;
pub mod misc;
pub mod openapi;
pub mod protocol;
pub mod validation;

use crate::engine::EngineHandle;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use error::ApiError;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tower_http::cors::CorsLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;

/// Server-wide settings of the API layer.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Name clients use for the model (`--served-model-name`).
    pub served_model_name: String,
    /// Where the model was loaded from.
    pub model_root: String,
    /// Key required on `/v1/*` (`--api-key`).
    pub api_key: Option<String>,
    /// Largest request body in bytes.
    pub max_body_bytes: usize,
    /// Largest total size of a request's header names and values in bytes.
    pub max_header_bytes: usize,
    /// Longest a request may take to produce its response head.
    pub request_timeout: Duration,
    /// Key required on trainer hooks (`--admin-key`).
    pub admin_key: Option<String>,
    /// Trainer hooks on without an admin key (`--enable-weight-updates`).
    pub enable_weight_updates: bool,
    /// Directory `update_weights_from_disk` may read from (`--allowed-weight-dir`).
    pub allowed_weight_dir: Option<std::path::PathBuf>,
}

/// What every handler shares.
pub struct AppState {
    /// The engine.
    pub engine: EngineHandle,
    /// Served model name.
    pub served_model_name: String,
    /// Model path.
    pub model_root: String,
    /// `--api-key`.
    pub api_key: Option<String>,
    /// Unix seconds at start.
    pub started: u64,
    /// Whether requests are accepted (false while shutting down).
    pub accepting: AtomicBool,
    /// New requests get 503 (paused in abort or wait mode).
    pub reject_new: AtomicBool,
    /// `--admin-key`.
    pub admin_key: Option<String>,
    /// Whether trainer hooks are on.
    pub hooks_enabled: bool,
    /// Canonical `--allowed-weight-dir`.
    pub allowed_weight_dir: Option<std::path::PathBuf>,
    /// Prometheus metrics (`/metrics`), if the server keeps them.
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
    /// Serialises weight updates; holds the staging of an open multi-part update.
    pub update_lock: tokio::sync::Mutex<Option<Box<dyn crate::weights::Staging>>>,
    next_id: AtomicU64,
}

impl AppState {
    /// State over a running engine.
    pub fn new(engine: EngineHandle, cfg: &ApiConfig) -> AppState {
        AppState {
            engine,
            served_model_name: cfg.served_model_name.clone(),
            model_root: cfg.model_root.clone(),
            api_key: cfg.api_key.clone(),
            started: unix_now(),
            accepting: AtomicBool::new(true),
            reject_new: AtomicBool::new(false),
            admin_key: cfg.admin_key.clone(),
            hooks_enabled: cfg.admin_key.is_some() || cfg.enable_weight_updates,
            allowed_weight_dir: cfg
                .allowed_weight_dir
                .as_ref()
                .and_then(|d| d.canonicalize().ok()),
            update_lock: tokio::sync::Mutex::new(None),
            metrics: None,
            next_id: AtomicU64::new(0),
        }
    }

    /// The same state exporting `metrics` at `/metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> AppState {
        self.metrics = Some(metrics);
        self
    }

    /// Unix seconds now.
    pub fn now(&self) -> u64 {
        unix_now()
    }

    /// The current weight version.
    pub fn weight_version(&self) -> u64 {
        self.engine.stats().weight_version.load(Ordering::Relaxed)
    }

    /// A unique response id (`<prefix>-<caller id>` or `<prefix>-<counter><start>`).
    pub fn new_id(&self, prefix: &str, requested: Option<&str>) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        match requested {
            Some(r) if !r.is_empty() => format!("{prefix}-{r}-{n}"),
            _ => format!("{prefix}-{:08x}{n:08x}", self.started as u32),
        }
    }

    /// Ok while requests are accepted; 503 otherwise.
    pub fn ready(&self) -> Result<(), ApiError> {
        if !self.accepting.load(Ordering::Relaxed) {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is shutting down",
            ));
        }
        if self.engine.stats().engine_dead.load(Ordering::Relaxed) {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the engine stopped (see the server log)",
            ));
        }
        if self.reject_new.load(Ordering::Relaxed) {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "generation is paused (POST /resume)",
            ));
        }
        Ok(())
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// An SSE response over serialised chunks, ending with `data: [DONE]`.
pub fn sse_response(rx: tokio::sync::mpsc::Receiver<String>) -> Response {
    let chunks = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|c| {
            (
                Ok::<_, std::convert::Infallible>(Event::default().data(c)),
                rx,
            )
        })
    });
    let done = futures::stream::once(async { Ok(Event::default().data("[DONE]")) });
    use futures::StreamExt;
    Sse::new(chunks.chain(done))
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// Compares secrets in time independent of where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= (x ^ y) as usize;
    }
    diff == 0
}

/// Checks `Authorization: Bearer <key>` against `expected`.
pub fn bearer_ok(req: &Request, expected: &str) -> bool {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|k| constant_time_eq(k.trim().as_bytes(), expected.as_bytes()))
}

async fn require_api_key(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.api_key {
        if !bearer_ok(&req, key) {
            return ApiError::new(StatusCode::UNAUTHORIZED, "missing or invalid API key")
                .into_response();
        }
    }
    next.run(req).await
}

async fn require_admin(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    match &st.admin_key {
        Some(key) if !bearer_ok(&req, key) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "trainer hooks need the admin key (Authorization: Bearer <admin key>)",
        )
        .into_response(),
        None if !st.hooks_enabled => ApiError::new(
            StatusCode::FORBIDDEN,
            "trainer hooks are off: start the server with --admin-key (or --enable-weight-updates)",
        )
        .into_response(),
        _ => next.run(req).await,
    }
}

/// The Prometheus text exposition.
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format", content_type = "text/plain")), tag = "ops")]
pub async fn metrics_text(State(st): State<Arc<AppState>>) -> Response {
    match &st.metrics {
        Some(m) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            m.render(),
        )
            .into_response(),
        None => ApiError::new(StatusCode::NOT_FOUND, "metrics are off").into_response(),
    }
}

/// Counts requests and their latency by route (`http_requests_total`, `http_request_duration_seconds`).
async fn http_metrics(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let Some(m) = st.metrics.clone() else {
        return next.run(req).await;
    };
    let handler = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "none".to_string());
    let method = req.method().as_str().to_string();
    let t0 = std::time::Instant::now();
    let resp = next.run(req).await;
    let status = format!("{}xx", resp.status().as_u16() / 100);
    m.http_requests
        .with_label_values(&[&handler, &status, &method])
        .inc();
    m.http_request_duration
        .with_label_values(&[&handler, &method])
        .observe(t0.elapsed().as_secs_f64());
    resp
}

/// Rewrites error responses made outside our handlers (body limit, timeout, unknown route,
/// wrong method) into the OpenAI error shape.
async fn json_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if (status.is_client_error() || status.is_server_error()) && !is_json {
        let msg = match status {
            StatusCode::PAYLOAD_TOO_LARGE => "request body too large".to_string(),
            StatusCode::REQUEST_TIMEOUT => "request timed out".to_string(),
            StatusCode::METHOD_NOT_ALLOWED => "method not allowed".to_string(),
            StatusCode::NOT_FOUND => "not found".to_string(),
            s => s.canonical_reason().unwrap_or("error").to_string(),
        };
        return ApiError::new(status, msg).into_response();
    }
    resp
}

/// Answers a body declared over the limit with 413 after reading (and discarding) it, up to a
/// cap: replying before the client finished sending makes most clients see a reset connection
/// instead of the error. Bodies without a length are cut by `RequestBodyLimitLayer`.
async fn declared_body_limit(State(limit): State<usize>, req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(n) if n > limit as u64 => {
            if n <= (limit as u64).saturating_mul(4).max(16 << 20) {
                use futures::StreamExt;
                let mut body = req.into_body().into_data_stream();
                while let Some(Ok(_)) = body.next().await {}
            }
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body of {n} bytes exceeds the limit of {limit} bytes"),
            )
            .into_response()
        }
        _ => next.run(req).await,
    }
}

/// Answers 431 when a request's headers exceed the limit, before authentication or routing
/// looks at them. (hyper itself refuses header blocks over about 400 KiB or 100 headers.)
async fn header_limit(State(limit): State<usize>, req: Request, next: Next) -> Response {
    let size: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum();
    if size > limit {
        return ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!("request headers of {size} bytes exceed the limit of {limit} bytes"),
        )
        .into_response();
    }
    next.run(req).await
}

async fn not_found(req: Request<Body>) -> Response {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("route {} {} not found", req.method(), req.uri().path()),
    )
    .into_response()
}

/// The application: every route with its layers.
pub fn router(state: Arc<AppState>, cfg: &ApiConfig) -> Router {
    let v1 = Router::new()
        .route("/v1/completions", post(completions::create_completion))
        .route("/v1/chat/completions", post(chat::create_chat_completion))
        .route("/v1/logprobs", post(hooks::score_logprobs))
        .route("/v1/models", get(misc::list_models))
        .route("/v1/mismatch_report", post(hooks::mismatch_report))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    let inference = Router::new()
        .merge(v1)
        .route("/tokenize", post(misc::tokenize))
        .route("/detokenize", post(misc::detokenize))
        .route("/health", get(misc::health))
        .route("/ping", get(misc::ping).post(misc::ping))
        .route("/version", get(misc::version))
        .route("/metrics", get(metrics_text))
        .layer(RequestBodyLimitLayer::new(cfg.max_body_bytes))
        .layer(middleware::from_fn_with_state(
            cfg.max_body_bytes,
            declared_body_limit,
        ))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            cfg.request_timeout,
        ));
    // Weight uploads stream large bodies: no body limit or timeout, but the admin key.
    let trainer = Router::new()
        .route(
            "/update_weights_from_disk",
            post(hooks::update_weights_from_disk),
        )
        .route("/update_weights", post(hooks::update_weights))
        .route("/start_weight_update", post(hooks::start_weight_update))
        .route("/finish_weight_update", post(hooks::finish_weight_update))
        .route("/pause", post(hooks::pause))
        .route("/resume", post(hooks::resume))
        .route("/is_paused", get(hooks::is_paused))
        .route("/weight_info", get(hooks::weight_info))
        .route("/get_weights_by_name", get(hooks::get_weights_by_name))
        .route("/reset_prefix_cache", post(hooks::reset_prefix_cache))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_admin));
    Router::new()
        .merge(inference)
        .merge(trainer)
        .fallback(not_found)
        .route_layer(middleware::from_fn_with_state(state.clone(), http_metrics))
        .layer(CorsLayer::permissive())
        .layer(middleware::from_fn_with_state(
            cfg.max_header_bytes,
            header_limit,
        ))
        .layer(middleware::from_fn(json_errors))
        .with_state(state)
}
