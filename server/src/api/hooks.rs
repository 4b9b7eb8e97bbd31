//! Trainer hooks: weight updates (from disk, by upload, multi-part), pause/resume, weight info,
//! prefix-cache reset, and `/v1/logprobs` scoring. Guarded by `--admin-key` (or enabled
//! explicitly with `--enable-weight-updates`).

use super::error::ApiError;
use super::format::TokenText;
use super::validation::{check_model, parse_json};
use super::AppState;
use crate::engine::{PauseMode, ScoreRequest, UpdateMode, UpdateReport};
use crate::weights::staging::stage_source;
use crate::weights::upload::stage_stream;
use crate::weights::Staging;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use std::path::{Component, Path};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use utoipa::{IntoParams, ToSchema};

/// A weight version given as a number or a numeric string (SGLang sends strings).
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(untagged)]
pub enum VersionArg {
    /// Numeric.
    Number(u64),
    /// Numeric string.
    Text(String),
}

fn parse_version(v: Option<&VersionArg>) -> Result<Option<u64>, ApiError> {
    match v {
        None => Ok(None),
        Some(VersionArg::Number(n)) => Ok(Some(*n)),
        Some(VersionArg::Text(s)) => s.trim().parse().map(Some).map_err(|_| {
            ApiError::invalid_param(
                "weight_version",
                format!("weight_version must be a non-negative integer, got '{s}'"),
            )
        }),
    }
}

/// `POST /update_weights_from_disk` (SGLang shape).
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct UpdateFromDiskRequest {
    /// A safetensors file or directory, or a GGUF file, under `--allowed-weight-dir`.
    pub model_path: String,
    /// The version to serve afterwards (default: current + 1).
    pub weight_version: Option<VersionArg>,
    /// Abort in-flight requests instead of letting them finish.
    pub abort_all_requests: Option<bool>,
    /// Accepted for compatibility; the prefix cache is always flushed.
    pub flush_cache: Option<bool>,
    /// `wait`, `abort` or `continue` (overrides `abort_all_requests`).
    pub mode: Option<String>,
}

/// Query of `POST /update_weights` and `POST /finish_weight_update`.
#[derive(Debug, Clone, Deserialize, IntoParams)]
pub struct UpdateQuery {
    /// The version to serve afterwards (default: current + 1).
    pub weight_version: Option<String>,
    /// `wait` (default), `abort` or `continue`.
    pub mode: Option<String>,
}

/// The outcome of a weight update.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UpdateResponse {
    /// Whether the new weights are serving.
    pub success: bool,
    /// What happened.
    pub message: String,
    /// The version serving now.
    pub weight_version: u64,
    /// Always 0 (SGLang field).
    pub num_paused_requests: usize,
    /// Requests aborted by the update.
    pub num_aborted_requests: usize,
    /// Tensors replaced.
    pub num_tensors: usize,
    /// Bytes staged in the run dtype.
    pub num_bytes: usize,
    /// Phase timings in seconds: stage (read + convert + check), wait, swap, total.
    pub timings: UpdateTimings,
}

/// Phase timings of an update.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct UpdateTimings {
    /// Reading, converting and validating the tensors.
    pub stage_s: f64,
    /// The part of `stage_s` spent checking names, shapes and dtypes.
    pub validate_s: f64,
    /// Waiting for in-flight requests (`wait` mode).
    pub wait_s: f64,
    /// The swap itself.
    pub swap_s: f64,
    /// End to end.
    pub total_s: f64,
}

/// `POST /v1/mismatch_report`: a trainer's sampler/learner mismatch figures.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct MismatchReport {
    /// The precision measured (`float16`, `bfloat16`, `float32`).
    pub dtype: String,
    /// Which learner recomputed the logprobs (`parity`, `independent`, `torch`...).
    pub learner: Option<String>,
    /// max |a − b|.
    pub max_abs: f64,
    /// mean |a − b|.
    pub mean_abs: f64,
    /// mean (a − b).
    pub k1: Option<f64>,
    /// mean (r − 1 − log r).
    pub k3: Option<f64>,
    /// min exp(b − a).
    pub ratio_min: Option<f64>,
    /// max exp(b − a).
    pub ratio_max: Option<f64>,
}

/// Record a trainer's mismatch figures in the metrics (`halfstep_mismatch_*`).
#[utoipa::path(post, path = "/v1/mismatch_report", request_body = MismatchReport,
    responses((status = 200, body = SuccessResponse), (status = 400, body = super::protocol::ErrorResponse)), tag = "trainer")]
pub async fn mismatch_report(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    respond(
        async {
            let r: MismatchReport = parse_json(body)?;
            let learner = r.learner.clone().unwrap_or_else(|| "parity".into());
            let values = [
                Some(r.max_abs),
                Some(r.mean_abs),
                r.k1,
                r.k3,
                r.ratio_min,
                r.ratio_max,
            ];
            if values.iter().flatten().any(|v| !v.is_finite()) {
                return Err(ApiError::bad_request(
                    "mismatch figures must be finite numbers",
                ));
            }
            if let Some(m) = &st.metrics {
                for ((_, g), v) in m.mismatch.iter().zip(values) {
                    if let Some(v) = v {
                        g.with_label_values(&[&r.dtype, &learner]).set(v);
                    }
                }
                m.mismatch_reports.inc();
            }
            Ok(SuccessResponse {
                success: true,
                message: "recorded".into(),
            })
        }
        .await,
    )
}

/// `{success, message}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SuccessResponse {
    /// Whether it worked.
    pub success: bool,
    /// What happened.
    pub message: String,
}

fn update_mode(s: Option<&str>) -> Result<UpdateMode, ApiError> {
    s.map(str::parse)
        .transpose()
        .map_err(|e: String| ApiError::invalid_param("mode", e))
        .map(Option::unwrap_or_default)
}

fn weight_error(e: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(format!(
        "weight update rejected, serving weights unchanged: {e}"
    ))
}

async fn swap(
    st: &AppState,
    staging: Box<dyn Staging>,
    version: Option<u64>,
    mode: UpdateMode,
    t0: Instant,
) -> Result<UpdateResponse, ApiError> {
    if staging.is_empty() {
        return Err(ApiError::bad_request("the update holds no tensors"));
    }
    let staged = staging.finish();
    let (count, bytes, stage, validate) = (
        staged.count,
        staged.bytes,
        staged.stage_time,
        staged.validate_time,
    );
    let r: UpdateReport = st
        .engine
        .update_weights(staged, version, mode)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    tracing::info!(
        "weights updated to version {} ({count} tensors, {:.1} MB; swap {:.3} ms)",
        r.weight_version,
        bytes as f64 / 1e6,
        r.swap_time.as_secs_f64() * 1e3
    );
    Ok(UpdateResponse {
        success: true,
        message: format!(
            "updated {count} tensor{}",
            if count == 1 { "" } else { "s" }
        ),
        weight_version: r.weight_version,
        num_paused_requests: 0,
        num_aborted_requests: r.aborted,
        num_tensors: count,
        num_bytes: bytes,
        timings: UpdateTimings {
            stage_s: stage.as_secs_f64(),
            validate_s: validate.as_secs_f64(),
            wait_s: r.wait_time.as_secs_f64(),
            swap_s: r.swap_time.as_secs_f64(),
            total_s: t0.elapsed().as_secs_f64(),
        },
    })
}

/// Records an update's outcome and phase times in the metrics, then answers.
fn respond_update(
    st: &AppState,
    op: &str,
    t0: Instant,
    r: Result<UpdateResponse, ApiError>,
) -> Response {
    if let Some(m) = &st.metrics {
        m.rl_operation_duration
            .with_label_values(&[op])
            .observe(t0.elapsed().as_secs_f64());
        match &r {
            // A part of a multi-part update only stages; the update is counted at finish.
            Ok(u) if u.message.starts_with("staged") => {}
            Ok(u) => {
                m.weight_updates.with_label_values(&["success"]).inc();
                m.weight_bytes_loaded.inc_by(u.num_bytes as u64);
                let t = &u.timings;
                for (phase, v) in [
                    ("stage", t.stage_s - t.validate_s),
                    ("validate", t.validate_s),
                    ("wait", t.wait_s),
                    ("swap", t.swap_s),
                ] {
                    m.weight_update_duration
                        .with_label_values(&[phase])
                        .observe(v.max(0.0));
                }
            }
            Err(_) => m.weight_updates.with_label_values(&["rejected"]).inc(),
        }
    }
    respond(r)
}

fn respond<T: Serialize>(r: Result<T, ApiError>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Checks `model_path` lies under `--allowed-weight-dir` after resolving symlinks and `..`.
pub fn allowed_path(st: &AppState, raw: &str) -> Result<std::path::PathBuf, ApiError> {
    let Some(dir) = &st.allowed_weight_dir else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "updates from disk are disabled: start the server with --allowed-weight-dir",
        ));
    };
    let p = Path::new(raw);
    if p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(ApiError::invalid_param(
            "model_path",
            "model_path must not contain '..'",
        ));
    }
    let full = if p.is_absolute() {
        p.to_path_buf()
    } else {
        dir.join(p)
    };
    let resolved = full
        .canonicalize()
        .map_err(|e| ApiError::invalid_param("model_path", format!("cannot open {raw}: {e}")))?;
    if !resolved.starts_with(dir) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("model_path {raw} is outside --allowed-weight-dir"),
        ));
    }
    Ok(resolved)
}

/// Load new weights from a checkpoint on disk (SGLang `update_weights_from_disk`).
#[utoipa::path(post, path = "/update_weights_from_disk", request_body = UpdateFromDiskRequest,
    responses((status = 200, body = UpdateResponse), (status = 400, body = super::protocol::ErrorResponse),
              (status = 401, body = super::protocol::ErrorResponse), (status = 403, body = super::protocol::ErrorResponse)),
    tag = "trainer")]
pub async fn update_weights_from_disk(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let t_op = Instant::now();
    respond_update(
        &st,
        "update_weights_from_disk",
        t_op,
        async {
            let t0 = Instant::now();
            let req: UpdateFromDiskRequest = parse_json(body)?;
            let path = allowed_path(&st, &req.model_path)?;
            let version = parse_version(req.weight_version.as_ref())?;
            let mode = match req.mode.as_deref() {
                Some(m) => update_mode(Some(m))?,
                None if req.abort_all_requests == Some(true) => UpdateMode::Abort,
                None => UpdateMode::Wait,
            };
            let session = st.update_lock.lock().await;
            if session.is_some() {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "a multi-part weight update is open: finish it first",
                ));
            }
            let mut staging = st.engine.new_staging();
            let staging = tokio::task::spawn_blocking(move || {
                let tensors = halfstep_model::weights::open_tensors(&path)?;
                stage_source(&mut *staging, &*tensors)?;
                Ok::<_, halfstep_model::WeightError>(staging)
            })
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
            .map_err(weight_error)?;
            swap(&st, staging, version, mode, t0).await
        }
        .await,
    )
}

/// Upload weights as a safetensors body (any subset of tensors); applied at once, or held until
/// `/finish_weight_update` when a multi-part update is open.
#[utoipa::path(post, path = "/update_weights", params(UpdateQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "A safetensors file"),
    responses((status = 200, body = UpdateResponse), (status = 400, body = super::protocol::ErrorResponse),
              (status = 401, body = super::protocol::ErrorResponse)),
    tag = "trainer")]
pub async fn update_weights(
    State(st): State<Arc<AppState>>,
    Query(q): Query<UpdateQuery>,
    body: Body,
) -> Response {
    let t_op = Instant::now();
    respond_update(
        &st,
        "update_weights",
        t_op,
        async {
            let t0 = Instant::now();
            let mode = update_mode(q.mode.as_deref())?;
            let version = parse_version(q.weight_version.clone().map(VersionArg::Text).as_ref())?;
            let mut session = st.update_lock.lock().await;
            let stream = body.into_data_stream();
            if session.is_some() && (q.mode.is_some() || q.weight_version.is_some()) {
                return Err(ApiError::invalid_param(
                    "weight_version",
                    "a multi-part update is open: give weight_version and mode to /finish_weight_update",
                ));
            }
            if let Some(staging) = session.take() {
                // Part of a multi-part update: stage only.
                let staging = match stage_stream(stream, staging).await {
                    Ok((s, _)) => session.insert(s),
                    Err(e) => {
                        return Err(weight_error(format!(
                            "{e}; the multi-part update was discarded"
                        )))
                    }
                };
                let (n, b) = (staging.len(), staging.bytes());
                return Ok(UpdateResponse {
                    success: true,
                    message: format!("staged; {n} tensors held until /finish_weight_update"),
                    weight_version: st.weight_version(),
                    num_paused_requests: 0,
                    num_aborted_requests: 0,
                    num_tensors: n,
                    num_bytes: b,
                    timings: UpdateTimings {
                        stage_s: staging.elapsed().as_secs_f64(),
                        total_s: t0.elapsed().as_secs_f64(),
                        ..Default::default()
                    },
                });
            }
            let (staging, _) = stage_stream(stream, st.engine.new_staging())
                .await
                .map_err(weight_error)?;
            swap(&st, staging, version, mode, t0).await
        }
        .await,
    )
}

/// Open a multi-part update: later `/update_weights` bodies are staged, not applied.
#[utoipa::path(post, path = "/start_weight_update", responses((status = 200, body = SuccessResponse), (status = 409, body = super::protocol::ErrorResponse)), tag = "trainer")]
pub async fn start_weight_update(State(st): State<Arc<AppState>>) -> Response {
    let mut session = st.update_lock.lock().await;
    if session.is_some() {
        return ApiError::new(
            StatusCode::CONFLICT,
            "a multi-part weight update is already open",
        )
        .into_response();
    }
    *session = Some(st.engine.new_staging());
    Json(SuccessResponse {
        success: true,
        message: "multi-part weight update started".into(),
    })
    .into_response()
}

/// Apply everything staged since `/start_weight_update` as one atomic update.
#[utoipa::path(post, path = "/finish_weight_update", params(UpdateQuery),
    responses((status = 200, body = UpdateResponse), (status = 400, body = super::protocol::ErrorResponse), (status = 409, body = super::protocol::ErrorResponse)),
    tag = "trainer")]
pub async fn finish_weight_update(
    State(st): State<Arc<AppState>>,
    Query(q): Query<UpdateQuery>,
) -> Response {
    let t_op = Instant::now();
    respond_update(
        &st,
        "finish_weight_update",
        t_op,
        async {
            let t0 = Instant::now();
            let mode = update_mode(q.mode.as_deref())?;
            let version = parse_version(q.weight_version.clone().map(VersionArg::Text).as_ref())?;
            let mut session = st.update_lock.lock().await;
            let staging = session.take().ok_or_else(|| {
                ApiError::new(
                    StatusCode::CONFLICT,
                    "no multi-part weight update is open (POST /start_weight_update first)",
                )
            })?;
            swap(&st, staging, version, mode, t0).await
        }
        .await,
    )
}

/// Query of `/pause`.
#[derive(Debug, Clone, Deserialize, IntoParams)]
pub struct PauseQuery {
    /// `abort`, `wait` (default) or `keep`.
    pub mode: Option<String>,
}

/// `{is_paused}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PausedResponse {
    /// Whether generation is paused.
    pub is_paused: bool,
}

/// Pause generation (vLLM semantics): abort, drain (`wait`) or freeze (`keep`) in-flight
/// requests. New requests get 503 while paused in abort or wait mode.
#[utoipa::path(post, path = "/pause", params(PauseQuery), responses((status = 200, body = PausedResponse), (status = 400, body = super::protocol::ErrorResponse)), tag = "trainer")]
pub async fn pause(State(st): State<Arc<AppState>>, Query(q): Query<PauseQuery>) -> Response {
    let _timer = st.metrics.as_ref().map(|m| {
        m.rl_operation_duration
            .with_label_values(&["pause"])
            .start_timer()
    });
    respond(
        async {
            let mode: PauseMode = q
                .mode
                .as_deref()
                .unwrap_or("wait")
                .parse()
                .map_err(|e: String| ApiError::invalid_param("mode", e))?;
            // The latest pause decides whether new requests are refused (keep queues them).
            st.reject_new
                .store(mode != PauseMode::Keep, Ordering::Relaxed);
            st.engine.pause(mode).await?;
            Ok(PausedResponse { is_paused: true })
        }
        .await,
    )
}

/// Resume generation.
#[utoipa::path(post, path = "/resume", responses((status = 200, body = PausedResponse)), tag = "trainer")]
pub async fn resume(State(st): State<Arc<AppState>>) -> Response {
    let _timer = st.metrics.as_ref().map(|m| {
        m.rl_operation_duration
            .with_label_values(&["resume"])
            .start_timer()
    });
    respond(
        async {
            st.engine.resume().await?;
            st.reject_new.store(false, Ordering::Relaxed);
            Ok(PausedResponse { is_paused: false })
        }
        .await,
    )
}

/// Whether generation is paused.
#[utoipa::path(get, path = "/is_paused", responses((status = 200, body = PausedResponse)), tag = "trainer")]
pub async fn is_paused(State(st): State<Arc<AppState>>) -> Json<PausedResponse> {
    Json(PausedResponse {
        is_paused: st.engine.stats().paused.load(Ordering::Relaxed),
    })
}

/// `GET /weight_info`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WeightInfo {
    /// The version serving.
    pub weight_version: u64,
    /// Run dtype (`float16`, `bfloat16`, `float32`).
    pub dtype: String,
    /// Tensors.
    pub num_tensors: usize,
    /// Bytes in the run dtype.
    pub num_bytes: usize,
    /// Fingerprint of every tensor's name and bits.
    pub checksum: String,
    /// Tensor names and shapes.
    pub tensors: Vec<TensorShape>,
}

/// A tensor's name and shape.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TensorShape {
    /// HF name.
    pub name: String,
    /// Shape.
    pub shape: Vec<usize>,
}

/// Version, dtype, size and checksum of the serving weights.
#[utoipa::path(get, path = "/weight_info", responses((status = 200, body = WeightInfo)), tag = "trainer")]
pub async fn weight_info(State(st): State<Arc<AppState>>) -> Response {
    respond(
        async {
            // Version and weights come from one snapshot taken between two engine steps.
            let version_before = st.weight_version();
            let view = st.engine.snapshot().await?;
            let version = st.weight_version().max(version_before);
            let info = tokio::task::spawn_blocking(move || WeightInfo {
                weight_version: version,
                dtype: view.dtype().name().to_string(),
                num_tensors: view.names().len(),
                num_bytes: view.num_bytes(),
                checksum: view.checksum(),
                tensors: view
                    .names()
                    .into_iter()
                    .map(|n| TensorShape {
                        shape: view.shape(&n).unwrap_or_default(),
                        name: n,
                    })
                    .collect(),
            })
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
            Ok(info)
        }
        .await,
    )
}

/// Query of `/get_weights_by_name`.
#[derive(Debug, Clone, Deserialize, IntoParams)]
pub struct WeightsByNameQuery {
    /// HF tensor name.
    pub name: String,
    /// Leading rows (first dimension) to return (default 100).
    pub truncate_size: Option<usize>,
}

/// A tensor's leading rows as nested lists (SGLang `get_weights_by_name`).
#[utoipa::path(get, path = "/get_weights_by_name", params(WeightsByNameQuery),
    responses((status = 200, description = "Nested lists of values"), (status = 404, body = super::protocol::ErrorResponse)), tag = "trainer")]
pub async fn get_weights_by_name(
    State(st): State<Arc<AppState>>,
    Query(q): Query<WeightsByNameQuery>,
) -> Response {
    respond(
        async {
            let view = st.engine.snapshot().await?;
            let shape = view.shape(&q.name).ok_or_else(|| ApiError {
                param: Some("name".into()),
                ..ApiError::new(
                    StatusCode::NOT_FOUND,
                    format!("no tensor named '{}'", q.name),
                )
            })?;
            let values = view.values(&q.name).unwrap_or_default();
            let rows = q.truncate_size.unwrap_or(100).min(shape[0]);
            let out = if shape.len() == 1 {
                serde_json::json!(values[..rows])
            } else {
                let width: usize = shape[1..].iter().product();
                serde_json::Value::Array(
                    (0..rows)
                        .map(|r| serde_json::json!(values[r * width..(r + 1) * width]))
                        .collect(),
                )
            };
            Ok(out)
        }
        .await,
    )
}

/// Forget every cached prefix block.
#[utoipa::path(post, path = "/reset_prefix_cache", responses((status = 200, body = SuccessResponse)), tag = "trainer")]
pub async fn reset_prefix_cache(State(st): State<Arc<AppState>>) -> Response {
    respond(
        async {
            st.engine.reset_prefix_cache().await?;
            Ok(SuccessResponse {
                success: true,
                message: "prefix cache reset".into(),
            })
        }
        .await,
    )
}

/// `POST /v1/logprobs`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct LogprobsRequest {
    /// Served model name (optional).
    pub model: Option<String>,
    /// Token-id sequences to score.
    pub sequences: Vec<Vec<i64>>,
    /// Per sequence, positions before this get `null` (score only the completion).
    pub prompt_lengths: Option<Vec<usize>>,
    /// Alternatives per position (0..=max_logprobs).
    pub top_logprobs: Option<usize>,
    /// Also return the entropy per position.
    pub return_entropy: Option<bool>,
}

/// One alternative token.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TopLogprob {
    /// Token id.
    pub token_id: u32,
    /// Token text.
    pub token: String,
    /// Log-probability.
    pub logprob: f32,
}

/// Scores of one sequence.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SequenceLogprobs {
    /// Which sequence.
    pub index: usize,
    /// Its tokens.
    pub token_ids: Vec<u32>,
    /// log p(token_t | tokens_<t); `null` for t = 0 and before the prompt length.
    pub logprobs: Vec<Option<f32>>,
    /// 1-based ranks of the tokens.
    pub ranks: Vec<Option<usize>>,
    /// Alternatives per position, when asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<Vec<Option<Vec<TopLogprob>>>>,
    /// Entropy per position, when asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entropy: Option<Vec<Option<f32>>>,
}

/// `POST /v1/logprobs` response.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LogprobsResponse {
    /// `logprobs`.
    pub object: String,
    /// Served model name.
    pub model: String,
    /// The weights that scored.
    pub weight_version: u64,
    /// One entry per sequence.
    pub data: Vec<SequenceLogprobs>,
}

/// Score token sequences under the current weights: the same numbers sampling reports.
#[utoipa::path(post, path = "/v1/logprobs", request_body = LogprobsRequest,
    responses((status = 200, body = LogprobsResponse), (status = 400, body = super::protocol::ErrorResponse)), tag = "inference")]
pub async fn score_logprobs(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    respond(
        async {
            let req: LogprobsRequest = parse_json(body)?;
            check_model(&st, req.model.as_deref())?;
            let info = st.engine.info();
            if req.sequences.is_empty() {
                return Err(ApiError::invalid_param(
                    "sequences",
                    "sequences must not be empty",
                ));
            }
            let k = req.top_logprobs.unwrap_or(0);
            if k > info.max_logprobs {
                return Err(ApiError::invalid_param(
                    "top_logprobs",
                    format!("top_logprobs must be at most {}", info.max_logprobs),
                ));
            }
            if let Some(p) = &req.prompt_lengths {
                if p.len() != req.sequences.len() {
                    return Err(ApiError::invalid_param(
                        "prompt_lengths",
                        "prompt_lengths must have one entry per sequence",
                    ));
                }
                if let Some(i) = (0..p.len()).find(|&i| p[i] > req.sequences[i].len()) {
                    return Err(ApiError::invalid_param(
                        "prompt_lengths",
                        format!("prompt_lengths[{i}] exceeds the length of sequences[{i}]"),
                    ));
                }
            }
            let mut seqs = Vec::with_capacity(req.sequences.len());
            for (i, s) in req.sequences.iter().enumerate() {
                if s.is_empty() || s.len() > info.max_model_len {
                    return Err(ApiError::invalid_param(
                        "sequences",
                        format!("sequences[{i}] must have 1..={} tokens", info.max_model_len),
                    ));
                }
                if let Some(&bad) = s.iter().find(|&&t| t < 0 || t as usize >= info.vocab_size) {
                    return Err(ApiError::invalid_param(
                        "sequences",
                        format!("sequences[{i}]: token id {bad} is out of range"),
                    ));
                }
                seqs.push(s.iter().map(|&t| t as u32).collect::<Vec<u32>>());
            }
            st.ready()?;
            let entropy = req.return_entropy.unwrap_or(false);
            let r = st
                .engine
                .score(ScoreRequest {
                    sequences: seqs.clone(),
                    top_logprobs: k,
                    entropy,
                })
                .await?
                .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e))?;
            let tt = TokenText {
                tok: st.engine.tokenizer(),
                as_ids: false,
            };
            let data = r
                .sequences
                .into_iter()
                .zip(seqs)
                .enumerate()
                .map(|(i, (scored, ids))| {
                    let from = req.prompt_lengths.as_ref().map(|p| p[i]).unwrap_or(0);
                    let keep = |pos: usize| pos >= from.max(1);
                    SequenceLogprobs {
                        index: i,
                        logprobs: scored
                            .iter()
                            .enumerate()
                            .map(|(p, s)| s.as_ref().filter(|_| keep(p)).map(|s| s.logprob.logprob))
                            .collect(),
                        ranks: scored
                            .iter()
                            .enumerate()
                            .map(|(p, s)| s.as_ref().filter(|_| keep(p)).map(|s| s.logprob.rank))
                            .collect(),
                        top_logprobs: (k > 0).then(|| {
                            scored
                                .iter()
                                .enumerate()
                                .map(|(p, s)| {
                                    s.as_ref().filter(|_| keep(p)).map(|s| {
                                        s.logprob
                                            .top
                                            .iter()
                                            .map(|&(id, lp)| TopLogprob {
                                                token_id: id,
                                                token: tt.of(id),
                                                logprob: lp,
                                            })
                                            .collect()
                                    })
                                })
                                .collect()
                        }),
                        entropy: entropy.then(|| {
                            scored
                                .iter()
                                .enumerate()
                                .map(|(p, s)| {
                                    s.as_ref().filter(|_| keep(p)).and_then(|s| s.entropy)
                                })
                                .collect()
                        }),
                        token_ids: ids,
                    }
                })
                .collect();
            Ok(LogprobsResponse {
                object: "logprobs".into(),
                model: st.served_model_name.clone(),
                weight_version: r.weight_version,
                data,
            })
        }
        .await,
    )
}
