//! Server-Sent Events: [`SseDecoder`] splits a byte stream into event data, whatever the network
//! reads cut, and the streaming routes read their typed chunks (or the error the server reported
//! inside the stream) from it.

use super::{quote, ApiError, ClientError};
use crate::protocol::ErrorResponse;
use futures::stream::{self, Stream, StreamExt};
use serde::de::DeserializeOwned;
use std::collections::VecDeque;
use std::pin::Pin;

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
pub(super) fn sse_chunks<T, S, B, E>(
    bytes: S,
    route: &str,
) -> impl Stream<Item = Result<T, ClientError>>
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::CompletionChunk;
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
}
