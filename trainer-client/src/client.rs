//! An async client for one halfstep server ([`Client`]) and for several replicas of it that a
//! trainer keeps on the same weights ([`Replicas`]).
//!
//! Every route has one method taking and returning the types of [`crate::protocol`]. Failures
//! are [`ClientError`]s: the server's OpenAI-shaped error with its HTTP status, a transport
//! failure, or a body this client could not read.

use crate::protocol::*;
use futures::stream::{self, Stream, StreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
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
// Server-Sent Events
// ---------------------------------------------------------------------------------------------

/// Splits a byte stream into the `data` of Server-Sent Events, whatever the network reads cut.
#[derive(Debug, Default)]
pub struct SseDecoder {
    /// Bytes of lines not yet complete.
    buf: Vec<u8>,
    /// How far `buf` has been searched for a line end.
    scanned: usize,
    /// The `data` lines of the event being read.
    data: Option<String>,
}

impl SseDecoder {
    /// A decoder at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next bytes; returns the data of every event they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(bytes);
        let mut events = Vec::new();
        let mut start = 0;
        let mut i = self.scanned.max(start);
        while i < self.buf.len() {
            let end = match self.buf[i] {
                b'\n' => i + 1,
                // A `\r` at the end of the buffer may be the first half of `\r\n`: wait.
                b'\r' if i + 1 == self.buf.len() => break,
                b'\r' if self.buf[i + 1] == b'\n' => i + 2,
                b'\r' => i + 1,
                _ => {
                    i += 1;
                    continue;
                }
            };
            let line = String::from_utf8_lossy(&self.buf[start..i]).into_owned();
            self.line(&line, &mut events);
            start = end;
            i = end;
        }
        self.buf.drain(..start);
        self.scanned = i - start;
        events
    }

    /// Ends the stream: an event the server did not close with a blank line still counts.
    pub fn finish(&mut self) -> Option<String> {
        let mut events = Vec::new();
        if !self.buf.is_empty() {
            let line = String::from_utf8_lossy(&self.buf).into_owned();
            let line = line.strip_suffix('\r').unwrap_or(&line);
            self.line(line, &mut events);
            self.buf.clear();
            self.scanned = 0;
        }
        self.line("", &mut events);
        events.pop()
    }

    fn line(&mut self, line: &str, events: &mut Vec<String>) {
        if line.is_empty() {
            events.extend(self.data.take());
            return;
        }
        if line.starts_with(':') {
            return; // a comment: the server's keep-alive
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        // `event`, `id` and `retry` carry nothing halfstep uses.
        if field == "data" {
            match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            }
        }
    }
}

/// Event data from a byte stream, ending at `[DONE]`; an end without it is an error.
fn sse_events<S, B, E>(bytes: S, route: String) -> impl Stream<Item = Result<String, ClientError>>
where
    S: Stream<Item = Result<B, E>>,
    B: AsRef<[u8]>,
    E: Into<ClientError>,
{
    struct State<S> {
        bytes: Pin<Box<S>>,
        decoder: SseDecoder,
        pending: VecDeque<String>,
        eof: bool,
        over: bool,
        route: String,
    }
    let state = State {
        bytes: Box::pin(bytes),
        decoder: SseDecoder::new(),
        pending: VecDeque::new(),
        eof: false,
        over: false,
        route,
    };
    stream::unfold(state, |mut st| async move {
        loop {
            if st.over {
                return None;
            }
            if let Some(data) = st.pending.pop_front() {
                if data.trim() == "[DONE]" {
                    return None;
                }
                return Some((Ok(data), st));
            }
            if st.eof {
                st.over = true;
                let route = st.route.clone();
                return Some((Err(ClientError::StreamEnded { route }), st));
            }
            match st.bytes.next().await {
                Some(Ok(b)) => st.pending.extend(st.decoder.push(b.as_ref())),
                Some(Err(e)) => {
                    st.over = true;
                    return Some((Err(e.into()), st));
                }
                None => {
                    st.eof = true;
                    st.pending.extend(st.decoder.finish());
                }
            }
        }
    })
}

/// One stream chunk: `T`, or the error the server reported inside the stream.
fn decode_chunk<T: DeserializeOwned>(route: &str, data: &str) -> Result<T, ClientError> {
    match serde_json::from_str::<T>(data) {
        Ok(chunk) => Ok(chunk),
        Err(source) => match serde_json::from_str::<ErrorResponse>(data) {
            Ok(e) => {
                let status = e
                    .error
                    .code
                    .as_ref()
                    .and_then(|c| c.as_u64())
                    .and_then(|c| u16::try_from(c).ok())
                    .unwrap_or(500);
                Err(ClientError::Api(ApiError {
                    status,
                    message: e.error.message,
                    kind: e.error.kind,
                    param: e.error.param,
                    code: e.error.code,
                }))
            }
            Err(_) => Err(ClientError::Decode {
                route: route.to_string(),
                source,
                body: quote(data),
            }),
        },
    }
}

/// Typed chunks from a byte stream of Server-Sent Events.
fn sse_chunks<T, S, B, E>(bytes: S, route: &str) -> impl Stream<Item = Result<T, ClientError>>
where
    T: DeserializeOwned,
    S: Stream<Item = Result<B, E>>,
    B: AsRef<[u8]>,
    E: Into<ClientError>,
{
    let r = route.to_string();
    // Fused: polling after the end answers `None` again instead of panicking.
    sse_events(bytes, route.to_string())
        .map(move |d| d.and_then(|d| decode_chunk(&r, &d)))
        .fuse()
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

// ---------------------------------------------------------------------------------------------
// Several replicas
// ---------------------------------------------------------------------------------------------

/// What one replica answered.
#[derive(Debug)]
pub struct ReplicaResult<T> {
    /// The replica's base URL.
    pub url: String,
    /// Its answer.
    pub result: Result<T, ClientError>,
}

/// The outcome of pushing weights to every replica.
#[derive(Debug)]
pub struct UpdateReport {
    /// One entry per replica, in replica order.
    pub replicas: Vec<ReplicaResult<UpdateResponse>>,
}

impl UpdateReport {
    /// Whether every replica took the update.
    pub fn all_ok(&self) -> bool {
        self.replicas
            .iter()
            .all(|r| r.result.as_ref().is_ok_and(|u| u.success))
    }

    /// The version every replica serves now, if the update left them all on the same one.
    pub fn version(&self) -> Option<u64> {
        common(self.replicas.iter().map(|r| {
            r.result
                .as_ref()
                .ok()
                .filter(|u| u.success)
                .map(|u| u.weight_version)
        }))
    }

    /// The replicas that failed, with their errors.
    pub fn failures(&self) -> impl Iterator<Item = (&str, &ClientError)> {
        self.replicas
            .iter()
            .filter_map(|r| r.result.as_ref().err().map(|e| (r.url.as_str(), e)))
    }
}

/// Which replica serves which weights.
#[derive(Debug)]
pub struct VersionReport {
    /// Each replica's `/weight_info`, in replica order.
    pub replicas: Vec<ReplicaResult<WeightInfo>>,
}

impl VersionReport {
    /// Replica URLs by the weight version they serve; unreachable replicas are left out.
    pub fn by_version(&self) -> BTreeMap<u64, Vec<String>> {
        let mut out: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        for r in &self.replicas {
            if let Ok(info) = &r.result {
                out.entry(info.weight_version)
                    .or_default()
                    .push(r.url.clone());
            }
        }
        out
    }

    /// The version all replicas serve, if every one answered with the same version and the same
    /// checksum (equal versions with different bits mean an update went wrong somewhere).
    pub fn consistent(&self) -> Option<u64> {
        let checksum = common(
            self.replicas
                .iter()
                .map(|r| r.result.as_ref().ok().map(|i| i.checksum.clone())),
        );
        checksum?;
        common(
            self.replicas
                .iter()
                .map(|r| r.result.as_ref().ok().map(|i| i.weight_version)),
        )
    }

    /// The replicas that did not answer, with their errors.
    pub fn unreachable(&self) -> impl Iterator<Item = (&str, &ClientError)> {
        self.replicas
            .iter()
            .filter_map(|r| r.result.as_ref().err().map(|e| (r.url.as_str(), e)))
    }
}

/// The value every item holds, if there is at least one item and none is missing or different.
fn common<T: PartialEq>(mut items: impl Iterator<Item = Option<T>>) -> Option<T> {
    let first = items.next()??;
    for x in items {
        if x.as_ref() != Some(&first) {
            return None;
        }
    }
    Some(first)
}

/// Several servers serving the same model: weights go to all, sampling to one at a time.
#[derive(Debug)]
pub struct Replicas {
    clients: Vec<Client>,
    next: AtomicUsize,
}

impl Replicas {
    /// Clients of the servers at `urls`, sharing one connection pool.
    pub fn new<I, S>(urls: I) -> Result<Replicas, ClientError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let http = default_http()?;
        let clients = urls
            .into_iter()
            .map(|u| Ok(Client::new(u.as_ref())?.with_http_client(http.clone())))
            .collect::<Result<Vec<_>, ClientError>>()?;
        Replicas::from_clients(clients)
    }

    /// Replicas over clients made elsewhere (each with its own keys).
    pub fn from_clients(clients: Vec<Client>) -> Result<Replicas, ClientError> {
        if clients.is_empty() {
            return Err(ClientError::NoReplicas);
        }
        Ok(Replicas {
            clients,
            next: AtomicUsize::new(0),
        })
    }

    /// The same replicas sending `key` on inference routes.
    pub fn with_api_key(mut self, key: &str) -> Replicas {
        self.clients = self
            .clients
            .into_iter()
            .map(|c| c.with_api_key(key))
            .collect();
        self
    }

    /// The same replicas sending `key` on trainer hooks.
    pub fn with_admin_key(mut self, key: &str) -> Replicas {
        self.clients = self
            .clients
            .into_iter()
            .map(|c| c.with_admin_key(key))
            .collect();
        self
    }

    /// Number of replicas (at least one).
    pub fn len(&self) -> usize {
        self.clients.len()
    }

    /// Always false: there is at least one replica.
    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// Every replica's client, in order.
    pub fn clients(&self) -> &[Client] {
        &self.clients
    }

    /// Replica `i`, counting round (`i` modulo the number of replicas).
    pub fn pick(&self, i: usize) -> &Client {
        &self.clients[i % self.clients.len()]
    }

    /// The next replica in round-robin order.
    pub fn next_client(&self) -> &Client {
        self.pick(self.next.fetch_add(1, Ordering::Relaxed))
    }

    /// Runs `f` on every replica at once; one result per replica, in order.
    pub async fn broadcast<'a, T, F, Fut>(&'a self, f: F) -> Vec<ReplicaResult<T>>
    where
        F: Fn(&'a Client) -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let results = futures::future::join_all(self.clients.iter().map(&f)).await;
        self.clients
            .iter()
            .zip(results)
            .map(|(c, result)| ReplicaResult {
                url: c.base_url().to_string(),
                result,
            })
            .collect()
    }

    /// Uploads the same safetensors file to every replica at once (`POST /update_weights`).
    pub async fn update_weights(
        &self,
        safetensors: impl Into<Arc<Vec<u8>>>,
        opts: &UpdateOptions,
    ) -> UpdateReport {
        let data: Arc<Vec<u8>> = safetensors.into();
        let replicas = self
            .broadcast(|c| c.update_weights(data.clone(), opts))
            .await;
        UpdateReport { replicas }
    }

    /// Asks every replica which weights it serves (`GET /weight_info`).
    pub async fn versions(&self) -> VersionReport {
        VersionReport {
            replicas: self.broadcast(Client::weight_info).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;
    use futures::TryStreamExt;

    /// Decodes `pieces` as a stream whose network reads end where the pieces do.
    fn events(pieces: &[&[u8]]) -> Vec<Result<String, ClientError>> {
        let reads: Vec<Result<Vec<u8>, ClientError>> =
            pieces.iter().map(|p| Ok(p.to_vec())).collect();
        block_on(sse_events(stream::iter(reads), "/test".into()).collect())
    }

    fn ok(events: Vec<Result<String, ClientError>>) -> Vec<String> {
        events.into_iter().map(|e| e.unwrap()).collect()
    }

    #[test]
    fn sse_events_end_at_done() {
        let got = ok(events(&[
            b"data: {\"a\":1}\n\ndata: {\"a\":2}\n\ndata: [DONE]\n\n",
        ]));
        assert_eq!(got, ["{\"a\":1}", "{\"a\":2}"]);
    }

    #[test]
    fn sse_events_survive_reads_split_anywhere() {
        let whole = "data: {\"t\":\"é✓\"}\r\n\r\n: keep-alive\n\ndata:x\n\ndata: [DONE]\n\n";
        let bytes = whole.as_bytes();
        for cut in 0..bytes.len() {
            let got = ok(events(&[&bytes[..cut], &bytes[cut..]]));
            assert_eq!(got, ["{\"t\":\"é✓\"}", "x"], "cut at {cut}");
        }
        let single: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(ok(events(&single)), ["{\"t\":\"é✓\"}", "x"]);
    }

    #[test]
    fn sse_multiline_data_joins_with_newlines() {
        let got = ok(events(&[b"data: a\ndata: b\nid: 3\n\ndata: [DONE]\n\n"]));
        assert_eq!(got, ["a\nb"]);
    }

    #[test]
    fn sse_without_done_ends_with_an_error() {
        let got = events(&[b"data: 1\n\ndata: 2"]);
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].as_ref().unwrap(), "1");
        // The unterminated last event still counts: the connection ended, not the event.
        assert_eq!(got[1].as_ref().unwrap(), "2");
        assert!(matches!(got[2], Err(ClientError::StreamEnded { .. })));
    }

    #[test]
    fn sse_unterminated_done_still_ends_the_stream() {
        assert_eq!(ok(events(&[b"data: 1\n\ndata: [DONE]"])), ["1"]);
    }

    #[test]
    fn stream_chunks_decode_and_report_errors_inside_the_stream() {
        let body = concat!(
            "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"text\":\"hi\",\"weight_version\":4}]}\n\n",
            "data: {\"error\":{\"message\":\"engine stopped\",\"type\":\"ServiceUnavailableError\",\"param\":null,\"code\":503}}\n\n",
            "data: [DONE]\n\n"
        );
        let reads = vec![Ok::<_, ClientError>(body.as_bytes().to_vec())];
        let got: Vec<Result<CompletionChunk, ClientError>> =
            block_on(sse_chunks(stream::iter(reads), "/v1/completions").collect());
        assert_eq!(got.len(), 2);
        let chunk = got[0].as_ref().unwrap();
        assert_eq!(chunk.choices[0].text, "hi");
        assert_eq!(chunk.choices[0].weight_version, Some(4));
        let err = got[1].as_ref().unwrap_err();
        assert_eq!(err.status(), Some(503));
        assert_eq!(err.api().unwrap().message, "engine stopped");
    }

    #[test]
    fn undecodable_chunk_is_a_decode_error() {
        let reads = vec![Ok::<_, ClientError>(b"data: {\"nope\":1}\n\n".to_vec())];
        let got: Result<Vec<CompletionChunk>, ClientError> =
            block_on(sse_chunks(stream::iter(reads), "/v1/completions").try_collect());
        assert!(matches!(got, Err(ClientError::Decode { .. })));
    }

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

    #[test]
    fn replicas_pick_round_robin() {
        let r = Replicas::new(["http://a:1", "http://b:2"]).unwrap();
        assert_eq!(r.pick(3).base_url(), "http://b:2");
        let order: Vec<&str> = (0..3).map(|_| r.next_client().base_url()).collect();
        assert_eq!(order, ["http://a:1", "http://b:2", "http://a:1"]);
        assert!(matches!(
            Replicas::new(Vec::<String>::new()),
            Err(ClientError::NoReplicas)
        ));
    }

    fn info(version: u64, checksum: &str) -> WeightInfo {
        WeightInfo {
            weight_version: version,
            dtype: "float16".into(),
            num_tensors: 1,
            num_bytes: 2,
            checksum: checksum.into(),
            tensors: vec![],
            extra: Default::default(),
        }
    }

    fn replica<T>(url: &str, result: Result<T, ClientError>) -> ReplicaResult<T> {
        ReplicaResult {
            url: url.into(),
            result,
        }
    }

    #[test]
    fn version_report_groups_replicas_and_checks_consistency() {
        let same = VersionReport {
            replicas: vec![
                replica("a", Ok(info(3, "x"))),
                replica("b", Ok(info(3, "x"))),
            ],
        };
        assert_eq!(same.consistent(), Some(3));
        let split = VersionReport {
            replicas: vec![
                replica("a", Ok(info(3, "x"))),
                replica("b", Ok(info(4, "y"))),
                replica("c", Err(ClientError::NoReplicas)),
            ],
        };
        assert_eq!(split.consistent(), None);
        let by = split.by_version();
        assert_eq!(by[&3], ["a"]);
        assert_eq!(by[&4], ["b"]);
        assert_eq!(split.unreachable().count(), 1);
        let bits_differ = VersionReport {
            replicas: vec![
                replica("a", Ok(info(3, "x"))),
                replica("b", Ok(info(3, "z"))),
            ],
        };
        assert_eq!(bits_differ.consistent(), None);
    }
}
