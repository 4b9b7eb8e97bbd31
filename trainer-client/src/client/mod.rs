//! An async client for one halfstep server ([`Client`]) and for several replicas of it that a
//! trainer keeps on the same weights ([`Replicas`]).
//!
//! Every route has one method taking and returning the types of [`crate::protocol`]. Failures
//! are [`ClientError`]s: the server's OpenAI-shaped error with its HTTP status, a transport
//! failure, or a body this client could not read.

mod replicas;
mod sse;

pub use replicas::{ReplicaResult, Replicas, UpdateReport, VersionReport};
pub use sse::SseDecoder;

use crate::protocol::*;
use futures::stream::{self, Stream};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sse::sse_chunks;
use std::sync::Arc;
use std::time::Duration;

/// Weight uploads shared by several replicas are sent in pieces of this size, so memory holds one
/// piece per replica instead of one copy of the file.
const UPLOAD_CHUNK: usize = 4 << 20;

/// How much of an unreadable body an error message quotes.
const QUOTE_CHARS: usize = 300;

/// An error the server answered, in the OpenAI shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status (for an error inside a stream, the one its `code` names).
    pub status: u16,
    /// The server's message.
    pub message: String,
    /// Error class, e.g. `BadRequestError`.
    pub kind: Option<String>,
    /// The offending request parameter.
    pub param: Option<String>,
    /// The body's `code` (halfstep: the HTTP status as a number).
    pub code: Option<serde_json::Value>,
}

impl ApiError {
    /// Reads an error body; one that is not the OpenAI shape becomes the message as it is.
    pub fn from_body(status: u16, body: &str) -> ApiError {
        // vLLM's older servers send the details at the top level instead of under `error`.
        let info = serde_json::from_str::<ErrorResponse>(body)
            .map(|r| r.error)
            .or_else(|_| serde_json::from_str::<ErrorInfo>(body));
        match info {
            Ok(e) => ApiError {
                status,
                message: e.message,
                kind: e.kind,
                param: e.param,
                code: e.code,
            },
            Err(_) => ApiError {
                status,
                message: if body.trim().is_empty() {
                    reqwest::StatusCode::from_u16(status)
                        .ok()
                        .and_then(|s| s.canonical_reason())
                        .unwrap_or("error")
                        .to_string()
                } else {
                    quote(body)
                },
                kind: None,
                param: None,
                code: None,
            },
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HTTP {}", self.status)?;
        if let Some(k) = &self.kind {
            write!(f, " {k}")?;
        }
        write!(f, ": {}", self.message)?;
        if let Some(p) = &self.param {
            write!(f, " (param `{p}`)")?;
        }
        Ok(())
    }
}

/// What can go wrong talking to a server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error.
    #[error("{0}")]
    Api(ApiError),
    /// The request did not get through, or the connection broke.
    #[error("transport: {0}")]
    Transport(#[from] reqwest::Error),
    /// The server's answer is not the JSON this client expects.
    #[error("cannot read the answer of {route}: {source} (body: {body})")]
    Decode {
        /// The route asked.
        route: String,
        /// What serde found wrong.
        source: serde_json::Error,
        /// The start of the body.
        body: String,
    },
    /// A stream ended without `data: [DONE]` (the connection was cut).
    #[error("the stream of {route} ended before [DONE]")]
    StreamEnded {
        /// The route asked.
        route: String,
    },
    /// A base URL that is not an http(s) URL.
    #[error("invalid server URL '{url}': {reason}")]
    InvalidUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// [`Replicas`] made from no servers.
    #[error("no replica URLs given")]
    NoReplicas,
}

impl ClientError {
    /// The HTTP status of an error the server answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api(e) => Some(e.status),
            ClientError::Transport(e) => e.status().map(|s| s.as_u16()),
            _ => None,
        }
    }

    /// The server's error details, if the server answered with an error.
    pub fn api(&self) -> Option<&ApiError> {
        match self {
            ClientError::Api(e) => Some(e),
            _ => None,
        }
    }
}

/// The start of a body, for error messages.
fn quote(body: &str) -> String {
    let body = body.trim();
    match body.char_indices().nth(QUOTE_CHARS) {
        Some((i, _)) => format!("{}…", &body[..i]),
        None => body.to_string(),
    }
}

fn decode<T: DeserializeOwned>(route: &str, body: &[u8]) -> Result<T, ClientError> {
    serde_json::from_slice(body).map_err(|source| ClientError::Decode {
        route: route.to_string(),
        source,
        body: quote(&String::from_utf8_lossy(body)),
    })
}

// ---------------------------------------------------------------------------------------------
// One server
// ---------------------------------------------------------------------------------------------

/// A client of one halfstep server.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    /// Scheme, host, port and path prefix, without a trailing `/`.
    base: String,
    api_key: Option<String>,
    admin_key: Option<String>,
}

/// The `reqwest` client used unless one is given: no overall timeout, since generations and
/// weight uploads may take long, but a bounded wait for the connection.
fn default_http() -> Result<reqwest::Client, ClientError> {
    Ok(reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()?)
}

/// Checks a base URL and drops a trailing `/` or `/v1` (OpenAI clients conventionally end it
/// with `/v1`, but halfstep's own routes sit at the root).
fn normalize_base(url: &str) -> Result<String, ClientError> {
    let invalid = |reason: String| ClientError::InvalidUrl {
        url: url.to_string(),
        reason,
    };
    let parsed = reqwest::Url::parse(url).map_err(|e| invalid(e.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(invalid(format!(
            "scheme '{}' is not http(s)",
            parsed.scheme()
        )));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(invalid("a base URL takes no query or fragment".into()));
    }
    let mut base = url.trim_end_matches('/');
    if let Some(b) = base.strip_suffix("/v1") {
        base = b.trim_end_matches('/');
    }
    Ok(base.to_string())
}

/// Which key a route wants.
#[derive(Clone, Copy)]
enum Auth {
    /// The inference routes: the API key.
    Api,
    /// The trainer hooks: the admin key.
    Admin,
}

impl Client {
    /// A client of the server at `base_url` (e.g. `http://localhost:8000`).
    pub fn new(base_url: &str) -> Result<Client, ClientError> {
        Ok(Client {
            http: default_http()?,
            base: normalize_base(base_url)?,
            api_key: None,
            admin_key: None,
        })
    }

    /// The same client sending `Authorization: Bearer <key>` on inference routes.
    pub fn with_api_key(mut self, key: impl Into<String>) -> Client {
        self.api_key = Some(key.into());
        self
    }

    /// The same client sending `Authorization: Bearer <key>` on trainer hooks; without it they
    /// get the API key, if any.
    pub fn with_admin_key(mut self, key: impl Into<String>) -> Client {
        self.admin_key = Some(key.into());
        self
    }

    /// The same client over another `reqwest` client (timeouts, proxies, connection pool).
    pub fn with_http_client(mut self, http: reqwest::Client) -> Client {
        self.http = http;
        self
    }

    /// The server's base URL, without a trailing `/`.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn request(&self, method: reqwest::Method, route: &str, auth: Auth) -> reqwest::RequestBuilder {
        let rb = self.http.request(method, format!("{}{route}", self.base));
        let key = match auth {
            Auth::Api => self.api_key.as_ref(),
            // The server checks only the admin key here; a client given one key uses it for both.
            Auth::Admin => self.admin_key.as_ref().or(self.api_key.as_ref()),
        };
        match key {
            Some(k) => rb.bearer_auth(k),
            None => rb,
        }
    }

    /// Sends a request; a status other than 2xx becomes [`ClientError::Api`].
    async fn send(rb: reqwest::RequestBuilder) -> Result<reqwest::Response, ClientError> {
        let resp = rb.send().await?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = resp.text().await.unwrap_or_default();
        Err(ClientError::Api(ApiError::from_body(
            status.as_u16(),
            &body,
        )))
    }

    async fn json<T: DeserializeOwned>(
        rb: reqwest::RequestBuilder,
        route: &str,
    ) -> Result<T, ClientError> {
        let body = Self::send(rb).await?.bytes().await?;
        decode(route, &body)
    }

    async fn get<T: DeserializeOwned>(&self, route: &str, auth: Auth) -> Result<T, ClientError> {
        Self::json(self.request(reqwest::Method::GET, route, auth), route).await
    }

    async fn post<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        route: &str,
        auth: Auth,
        body: &B,
    ) -> Result<T, ClientError> {
        Self::json(
            self.request(reqwest::Method::POST, route, auth).json(body),
            route,
        )
        .await
    }

    /// POST without a body (the hooks that take none or only a query).
    async fn post_empty<Q: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        route: &str,
        query: &Q,
    ) -> Result<T, ClientError> {
        let rb = self
            .request(reqwest::Method::POST, route, Auth::Admin)
            .query(query);
        Self::json(rb, route).await
    }

    async fn stream<B: Serialize + ?Sized, T: DeserializeOwned + Send + 'static>(
        &self,
        route: &'static str,
        body: &B,
    ) -> Result<impl Stream<Item = Result<T, ClientError>> + Send + 'static, ClientError> {
        let rb = self
            .request(reqwest::Method::POST, route, Auth::Api)
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .json(body);
        let resp = Self::send(rb).await?;
        Ok(sse_chunks(resp.bytes_stream(), route))
    }

    // --- inference --------------------------------------------------------------------------

    /// `POST /v1/completions`, whole (a `stream` field in `req` is ignored).
    pub async fn completions(
        &self,
        req: &CompletionRequest,
    ) -> Result<CompletionResponse, ClientError> {
        let mut req = req.clone();
        req.sampling.stream = None;
        self.post("/v1/completions", Auth::Api, &req).await
    }

    /// `POST /v1/completions` streamed: chunks until `[DONE]`. An error the server reports
    /// before streaming is the outer error; one inside the stream is an item.
    pub async fn completions_stream(
        &self,
        req: &CompletionRequest,
    ) -> Result<
        impl Stream<Item = Result<CompletionChunk, ClientError>> + Send + 'static,
        ClientError,
    > {
        let mut req = req.clone();
        req.sampling.stream = Some(true);
        self.stream("/v1/completions", &req).await
    }

    /// `POST /v1/chat/completions`, whole (a `stream` field in `req` is ignored).
    pub async fn chat(
        &self,
        req: &ChatCompletionRequest,
    ) -> Result<ChatCompletionResponse, ClientError> {
        let mut req = req.clone();
        req.sampling.stream = None;
        self.post("/v1/chat/completions", Auth::Api, &req).await
    }

    /// `POST /v1/chat/completions` streamed: chunks until `[DONE]`. An error the server reports
    /// before streaming is the outer error; one inside the stream is an item.
    pub async fn chat_stream(
        &self,
        req: &ChatCompletionRequest,
    ) -> Result<
        impl Stream<Item = Result<ChatCompletionChunk, ClientError>> + Send + 'static,
        ClientError,
    > {
        let mut req = req.clone();
        req.sampling.stream = Some(true);
        self.stream("/v1/chat/completions", &req).await
    }

    /// `POST /v1/logprobs`: per-token logprobs of sequences under the serving weights.
    pub async fn logprobs(&self, req: &LogprobsRequest) -> Result<LogprobsResponse, ClientError> {
        self.post("/v1/logprobs", Auth::Api, req).await
    }

    /// `POST /v1/mismatch_report`: hands sampler/learner mismatch figures to the server's metrics.
    pub async fn mismatch_report(
        &self,
        report: &MismatchReport,
    ) -> Result<SuccessResponse, ClientError> {
        self.post("/v1/mismatch_report", Auth::Api, report).await
    }

    /// `GET /v1/models`.
    pub async fn models(&self) -> Result<ModelList, ClientError> {
        self.get("/v1/models", Auth::Api).await
    }

    /// `POST /tokenize`.
    pub async fn tokenize(&self, req: &TokenizeRequest) -> Result<TokenizeResponse, ClientError> {
        self.post("/tokenize", Auth::Api, req).await
    }

    /// `POST /detokenize`.
    pub async fn detokenize(
        &self,
        req: &DetokenizeRequest,
    ) -> Result<DetokenizeResponse, ClientError> {
        self.post("/detokenize", Auth::Api, req).await
    }

    // --- operations -------------------------------------------------------------------------

    /// `GET /health`: `Ok` while the server runs (paused included), an error with status 503
    /// while it shuts down or after its engine stopped.
    pub async fn health(&self) -> Result<(), ClientError> {
        Self::send(self.request(reqwest::Method::GET, "/health", Auth::Api)).await?;
        Ok(())
    }

    /// `GET /ping`: the same as [`Client::health`].
    pub async fn ping(&self) -> Result<(), ClientError> {
        Self::send(self.request(reqwest::Method::GET, "/ping", Auth::Api)).await?;
        Ok(())
    }

    /// `GET /version`.
    pub async fn version(&self) -> Result<VersionResponse, ClientError> {
        self.get("/version", Auth::Api).await
    }

    /// `GET /metrics`: the Prometheus text exposition.
    pub async fn metrics(&self) -> Result<String, ClientError> {
        let resp = Self::send(self.request(reqwest::Method::GET, "/metrics", Auth::Api)).await?;
        Ok(resp.text().await?)
    }

    /// Waits until `/health` answers `Ok`, polling every `every`, for at most `timeout`.
    pub async fn wait_healthy(
        &self,
        timeout: Duration,
        every: Duration,
    ) -> Result<(), ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.health().await {
                Ok(()) => return Ok(()),
                Err(e) if tokio::time::Instant::now() + every > deadline => return Err(e),
                Err(_) => tokio::time::sleep(every).await,
            }
        }
    }

    // --- trainer hooks ----------------------------------------------------------------------

    /// `POST /update_weights`: uploads a safetensors file (all tensors or any subset). Inside a
    /// multi-part update it is only staged; leave `opts` empty then.
    pub async fn update_weights(
        &self,
        safetensors: impl Into<Arc<Vec<u8>>>,
        opts: &UpdateOptions,
    ) -> Result<UpdateResponse, ClientError> {
        let data: Arc<Vec<u8>> = safetensors.into();
        let len = data.len();
        let body = match Arc::try_unwrap(data) {
            // Sole owner: hand the buffer over without copying.
            Ok(v) => reqwest::Body::from(v),
            // Shared (e.g. with other replicas): send it in pieces copied as they go out.
            Err(shared) => {
                let pieces = (0..len).step_by(UPLOAD_CHUNK).map(move |at| {
                    let piece = shared[at..(at + UPLOAD_CHUNK).min(len)].to_vec();
                    Ok::<_, std::convert::Infallible>(piece)
                });
                reqwest::Body::wrap_stream(stream::iter(pieces))
            }
        };
        let rb = self
            .request(reqwest::Method::POST, "/update_weights", Auth::Admin)
            .query(opts)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            // A streamed body would otherwise go chunked; the length lets the server see the
            // size up front.
            .header(reqwest::header::CONTENT_LENGTH, len)
            .body(body);
        Self::json(rb, "/update_weights").await
    }

    /// `POST /update_weights_from_disk`: loads a checkpoint from the server's disk.
    pub async fn update_weights_from_disk(
        &self,
        req: &UpdateFromDiskRequest,
    ) -> Result<UpdateResponse, ClientError> {
        self.post("/update_weights_from_disk", Auth::Admin, req)
            .await
    }

    /// `POST /start_weight_update`: opens a multi-part update; later uploads are staged.
    pub async fn start_weight_update(&self) -> Result<SuccessResponse, ClientError> {
        self.post_empty("/start_weight_update", &()).await
    }

    /// `POST /finish_weight_update`: applies everything staged since the start, atomically.
    pub async fn finish_weight_update(
        &self,
        opts: &UpdateOptions,
    ) -> Result<UpdateResponse, ClientError> {
        self.post_empty("/finish_weight_update", opts).await
    }

    /// `POST /pause?mode=`: pauses generation.
    pub async fn pause(&self, mode: PauseMode) -> Result<PausedResponse, ClientError> {
        self.post_empty("/pause", &[("mode", mode.as_str())]).await
    }

    /// `POST /resume`: resumes generation.
    pub async fn resume(&self) -> Result<PausedResponse, ClientError> {
        self.post_empty("/resume", &()).await
    }

    /// `GET /is_paused`.
    pub async fn is_paused(&self) -> Result<PausedResponse, ClientError> {
        self.get("/is_paused", Auth::Admin).await
    }

    /// `GET /weight_info`: version, dtype, size and checksum of the serving weights.
    pub async fn weight_info(&self) -> Result<WeightInfo, ClientError> {
        self.get("/weight_info", Auth::Admin).await
    }

    /// `GET /get_weights_by_name`: the leading `truncate_size` rows (server default 100) of a
    /// serving tensor.
    pub async fn get_weights_by_name(
        &self,
        name: &str,
        truncate_size: Option<usize>,
    ) -> Result<TensorValues, ClientError> {
        #[derive(Serialize)]
        struct Query<'a> {
            name: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            truncate_size: Option<usize>,
        }
        let rb = self
            .request(reqwest::Method::GET, "/get_weights_by_name", Auth::Admin)
            .query(&Query {
                name,
                truncate_size,
            });
        Self::json(rb, "/get_weights_by_name").await
    }

    /// `POST /reset_prefix_cache`: forgets every cached prefix block.
    pub async fn reset_prefix_cache(&self) -> Result<SuccessResponse, ClientError> {
        self.post_empty("/reset_prefix_cache", &()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_error_reads_the_openai_shape() {
        let e = ApiError::from_body(
            400,
            r#"{"error":{"message":"n must be at most 8","type":"BadRequestError","param":"n","code":400}}"#,
        );
        assert_eq!(e.status, 400);
        assert_eq!(e.message, "n must be at most 8");
        assert_eq!(e.kind.as_deref(), Some("BadRequestError"));
        assert_eq!(e.param.as_deref(), Some("n"));
        assert_eq!(e.code, Some(serde_json::json!(400)));
        assert_eq!(
            e.to_string(),
            "HTTP 400 BadRequestError: n must be at most 8 (param `n`)"
        );
    }

    #[test]
    fn api_error_reads_vllm_flat_shape_and_plain_text() {
        let flat = ApiError::from_body(
            404,
            r#"{"object":"error","message":"no model","type":"NotFoundError","param":null,"code":404}"#,
        );
        assert_eq!(flat.message, "no model");
        assert_eq!(flat.kind.as_deref(), Some("NotFoundError"));
        let text = ApiError::from_body(502, "Bad Gateway from proxy");
        assert_eq!(text.message, "Bad Gateway from proxy");
        assert_eq!(text.kind, None);
        let empty = ApiError::from_body(503, "");
        assert_eq!(empty.message, "Service Unavailable");
    }

    #[test]
    fn base_url_drops_trailing_slash_and_v1() {
        assert_eq!(normalize_base("http://h:8000/").unwrap(), "http://h:8000");
        assert_eq!(
            normalize_base("http://h:8000/v1/").unwrap(),
            "http://h:8000"
        );
        assert_eq!(
            normalize_base("https://gw/halfstep/v1").unwrap(),
            "https://gw/halfstep"
        );
        assert!(matches!(
            normalize_base("ftp://h"),
            Err(ClientError::InvalidUrl { .. })
        ));
        assert!(normalize_base("not a url").is_err());
    }
}
