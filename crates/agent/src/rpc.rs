//! Server side of the Connect protocol and the HTTP plumbing every handler shares:
//! response builders, unary request parsing, streaming request/response bodies, and the
//! `Connect-Timeout-Ms` / `Keepalive-Ping-Interval` headers.

use std::io;
use std::time::Duration;

use bytes::Bytes;
use cubicle_envd::connect::{
    self, Code, ConnectError, EnvelopeDecoder, CONTENT_TYPE_STREAM, CONTENT_TYPE_UNARY,
};
use futures_util::StreamExt;
use http::{header, HeaderMap, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::mpsc;

/// The response body type of every handler.
pub type Body = UnsyncBoxBody<Bytes, io::Error>;

/// Largest unary request body accepted.
pub const MAX_UNARY_BODY: usize = 16 << 20;

/// A complete response with a body.
pub fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(
            Full::new(body.into())
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
        .expect("valid response")
}

/// An empty response.
pub fn empty(status: StatusCode) -> Response<Body> {
    Response::builder()
        .status(status)
        .body(
            Full::new(Bytes::new())
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
        .expect("valid response")
}

/// A JSON response.
pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    full(
        status,
        "application/json",
        serde_json::to_vec(value).expect("response types serialise"),
    )
}

/// envd's HTTP error body: `{"code": <status>, "message": "..."}`.
pub fn http_error(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    json(
        status,
        &serde_json::json!({"code": status.as_u16(), "message": message.into()}),
    )
}

/// A successful unary RPC response.
pub fn unary_ok<T: Serialize>(msg: &T) -> Response<Body> {
    full(
        StatusCode::OK,
        CONTENT_TYPE_UNARY,
        serde_json::to_vec(msg).expect("protocol messages serialise"),
    )
}

/// A failed unary RPC response.
pub fn unary_err(err: &ConnectError) -> Response<Body> {
    full(
        StatusCode::from_u16(err.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        CONTENT_TYPE_UNARY,
        err.to_json(),
    )
}

/// Whether the request is a streaming Connect call (by content type).
pub fn is_streaming(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with(CONTENT_TYPE_STREAM))
}

/// Reads a whole body up to `limit` bytes.
pub async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, ConnectError> {
    let limited = http_body_util::Limited::new(body, limit);
    match limited.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ConnectError::new(
            Code::ResourceExhausted,
            format!("request body exceeds {limit} bytes"),
        )),
        Err(e) => Err(ConnectError::new(
            Code::Canceled,
            format!("reading request: {e}"),
        )),
    }
}

/// Parses a unary request body (an empty body is the empty message `{}`).
pub async fn unary_request<T: DeserializeOwned>(body: Incoming) -> Result<T, ConnectError> {
    let bytes = read_body(body, MAX_UNARY_BODY).await?;
    parse_message(if bytes.is_empty() { b"{}" } else { &bytes })
}

/// Parses one JSON message, mapping failures to `invalid_argument`.
pub fn parse_message<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ConnectError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ConnectError::new(Code::InvalidArgument, format!("malformed request: {e}")))
}

/// The message envelopes of a streaming request body.
#[derive(Debug)]
pub struct StreamRequest {
    body: Incoming,
    decoder: EnvelopeDecoder,
    done: bool,
}

impl StreamRequest {
    /// Wraps a streaming request body.
    pub fn new(body: Incoming) -> Self {
        StreamRequest {
            body,
            decoder: EnvelopeDecoder::default(),
            done: false,
        }
    }

    /// The next message, or `None` at the end of the request body.
    pub async fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, ConnectError> {
        loop {
            let invalid =
                |e: connect::CodecError| ConnectError::new(Code::InvalidArgument, e.to_string());
            if let Some(env) = self.decoder.next_envelope().map_err(invalid)? {
                if env.is_end_stream() {
                    self.done = true;
                    return Ok(None);
                }
                return parse_message(&env.data).map(Some);
            }
            if self.done {
                self.decoder.finish().map_err(invalid)?;
                return Ok(None);
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.decoder.push(&data);
                    }
                }
                Some(Err(e)) => {
                    return Err(ConnectError::new(
                        Code::Canceled,
                        format!("reading request: {e}"),
                    ))
                }
                None => self.done = true,
            }
        }
    }

    /// The one message of a server-streaming request. The rest of the body (normally
    /// just its end) is read in the background: a body left unread makes hyper close the
    /// connection after the response, and the daemon's proxy, which pooled it as
    /// keep-alive, may already be sending the next request into it ("connection closed
    /// before message completed").
    pub async fn single<T: DeserializeOwned>(mut self) -> Result<T, ConnectError> {
        let message = self
            .next()
            .await?
            .ok_or_else(|| ConnectError::new(Code::InvalidArgument, "missing request message"))?;
        if !self.done {
            tokio::spawn(async move { while let Some(Ok(_)) = self.body.frame().await {} });
        }
        Ok(message)
    }
}

/// Sending half of a streaming response. Dropping it without [`StreamSender::finish`]
/// still ends the stream properly (with an `internal` error).
#[derive(Debug)]
pub struct StreamSender {
    tx: mpsc::Sender<Bytes>,
    finished: bool,
}

impl StreamSender {
    /// Sends one message; `false` when the client has gone away.
    pub async fn send<T: Serialize>(&self, msg: &T) -> bool {
        self.tx.send(connect::message_envelope(msg)).await.is_ok()
    }

    /// Resolves when the client has gone away.
    pub async fn closed(&self) {
        self.tx.closed().await
    }

    /// Ends the stream, successfully or with an error.
    pub async fn finish(mut self, result: Result<(), ConnectError>) {
        self.finished = true;
        let end = match result {
            Ok(()) => connect::end_stream_ok(),
            Err(e) => e.end_stream_envelope(),
        };
        let _ = self.tx.send(end).await;
    }
}

impl Drop for StreamSender {
    fn drop(&mut self) {
        if !self.finished {
            let end = ConnectError::new(Code::Internal, "stream ended unexpectedly")
                .end_stream_envelope();
            let _ = self.tx.try_send(end);
        }
    }
}

/// A streaming response and the sender that feeds it. Every envelope is flushed as its
/// own chunk.
pub fn stream_channel() -> (StreamSender, Response<Body>) {
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, io::Error>(Frame::data(b)), rx))
    });
    let body = StreamBody::new(stream.boxed()).boxed_unsync();
    let response = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, CONTENT_TYPE_STREAM)
        .body(body)
        .expect("valid response");
    (
        StreamSender {
            tx,
            finished: false,
        },
        response,
    )
}

/// A streaming response that fails at once (Connect sends it as 200 + end-of-stream).
pub fn stream_error(err: &ConnectError) -> Response<Body> {
    full(
        StatusCode::OK,
        CONTENT_TYPE_STREAM,
        err.end_stream_envelope(),
    )
}

/// `Connect-Timeout-Ms`, if present and non-zero.
pub fn connect_timeout(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get("connect-timeout-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis)
}

/// `Keepalive-Ping-Interval` in seconds (default 90 s, as envd).
pub fn keepalive_interval(headers: &HeaderMap) -> Duration {
    headers
        .get("keepalive-ping-interval")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|s| *s > 0)
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(90))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers() {
        let mut h = HeaderMap::new();
        assert_eq!(connect_timeout(&h), None);
        assert_eq!(keepalive_interval(&h), Duration::from_secs(90));
        h.insert("connect-timeout-ms", "60000".parse().unwrap());
        h.insert("keepalive-ping-interval", "50".parse().unwrap());
        assert_eq!(connect_timeout(&h), Some(Duration::from_secs(60)));
        assert_eq!(keepalive_interval(&h), Duration::from_secs(50));
        h.insert("connect-timeout-ms", "0".parse().unwrap());
        assert_eq!(connect_timeout(&h), None);
        h.insert(
            header::CONTENT_TYPE,
            "application/connect+json".parse().unwrap(),
        );
        assert!(is_streaming(&h));
    }

    #[tokio::test]
    async fn stream_sender_always_ends_the_stream() {
        let (tx, resp) = stream_channel();
        assert_eq!(resp.headers()[header::CONTENT_TYPE], CONTENT_TYPE_STREAM);
        assert!(tx.send(&serde_json::json!({"x": 1})).await);
        drop(tx);
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let mut dec = EnvelopeDecoder::default();
        dec.push(&bytes);
        assert!(!dec.next_envelope().unwrap().unwrap().is_end_stream());
        let end = dec.next_envelope().unwrap().unwrap();
        assert!(end.is_end_stream());
        assert!(std::str::from_utf8(&end.data).unwrap().contains("internal"));
    }
}
