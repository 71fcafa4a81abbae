//! The Connect protocol's JSON codec, as connect-go (envd) and connect-python (the E2B
//! SDK) speak it over HTTP/1.1:
//!
//! - **unary**: `POST /pkg.Service/Method`, `Content-Type: application/json`, one JSON
//!   message each way; errors are a non-200 status with `{"code": "...", "message": ...}`.
//! - **streaming**: `Content-Type: application/connect+json`; both bodies are sequences
//!   of envelopes `[flags u8][len u32 BE][JSON]`. The response ends with exactly one
//!   end-of-stream envelope (flag `0x02`) holding `{}` or `{"error": {...}}`.

use bytes::{Buf, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

/// Content type of unary requests and responses.
pub const CONTENT_TYPE_UNARY: &str = "application/json";
/// Content type of streaming requests and responses (exactly, no parameters).
pub const CONTENT_TYPE_STREAM: &str = "application/connect+json";
/// Envelope flag: a message.
pub const FLAG_MESSAGE: u8 = 0x00;
/// Envelope flag: compressed (never used by E2B; refused).
pub const FLAG_COMPRESSED: u8 = 0x01;
/// Envelope flag: end of stream.
pub const FLAG_END_STREAM: u8 = 0x02;
/// Largest envelope accepted from a peer.
pub const MAX_ENVELOPE: usize = 64 << 20;

/// Connect error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Code {
    /// Canceled by the caller.
    Canceled,
    /// Unknown error.
    Unknown,
    /// Bad argument.
    InvalidArgument,
    /// Deadline passed.
    DeadlineExceeded,
    /// Not found.
    NotFound,
    /// Already exists.
    AlreadyExists,
    /// Not allowed.
    PermissionDenied,
    /// Out of some resource.
    ResourceExhausted,
    /// The system is not in a state for this.
    FailedPrecondition,
    /// Aborted.
    Aborted,
    /// Out of range.
    OutOfRange,
    /// Not implemented.
    Unimplemented,
    /// Internal error.
    Internal,
    /// Unavailable.
    Unavailable,
    /// Data loss.
    DataLoss,
    /// Missing or bad credentials.
    Unauthenticated,
}

impl Code {
    /// The HTTP status a unary error with this code is sent with.
    pub fn http_status(self) -> u16 {
        match self {
            Code::Canceled => 499,
            Code::Unknown | Code::Internal | Code::DataLoss => 500,
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => 400,
            Code::DeadlineExceeded => 504,
            Code::NotFound => 404,
            Code::AlreadyExists | Code::Aborted => 409,
            Code::PermissionDenied => 403,
            Code::ResourceExhausted => 429,
            Code::Unimplemented => 501,
            Code::Unavailable => 503,
            Code::Unauthenticated => 401,
        }
    }

    /// The code a proxy error with this HTTP status stands for (Connect's fallback).
    pub fn from_http_status(status: u16) -> Code {
        match status {
            400 => Code::InvalidArgument,
            401 => Code::Unauthenticated,
            403 => Code::PermissionDenied,
            404 => Code::NotFound,
            409 => Code::AlreadyExists,
            429 => Code::ResourceExhausted,
            502..=503 => Code::Unavailable,
            504 => Code::DeadlineExceeded,
            _ => Code::Unknown,
        }
    }
}

/// A Connect error: `{"code": "not_found", "message": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ConnectError {
    /// The code.
    pub code: Code,
    /// Human-readable text.
    #[serde(default)]
    pub message: String,
}

impl ConnectError {
    /// An error with a code and a message.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        ConnectError {
            code,
            message: message.into(),
        }
    }

    /// The JSON body of a unary error response.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("plain struct serialises")
    }

    /// The end-of-stream envelope carrying this error.
    pub fn end_stream_envelope(&self) -> Bytes {
        #[derive(Serialize)]
        struct End<'a> {
            error: &'a ConnectError,
        }
        envelope(
            FLAG_END_STREAM,
            &serde_json::to_vec(&End { error: self }).expect("plain struct serialises"),
        )
    }
}

/// The end-of-stream envelope of a successful stream: `{}`.
pub fn end_stream_ok() -> Bytes {
    envelope(FLAG_END_STREAM, b"{}")
}

/// One envelope.
pub fn envelope(flags: u8, json: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + json.len());
    out.extend_from_slice(&[flags]);
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(json);
    out.freeze()
}

/// A message envelope holding `msg` as JSON.
pub fn message_envelope<T: Serialize>(msg: &T) -> Bytes {
    envelope(
        FLAG_MESSAGE,
        &serde_json::to_vec(msg).expect("protocol messages serialise"),
    )
}

/// A decoded envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Its flags.
    pub flags: u8,
    /// Its JSON payload.
    pub data: Bytes,
}

impl Envelope {
    /// Whether this is the end-of-stream envelope.
    pub fn is_end_stream(&self) -> bool {
        self.flags & FLAG_END_STREAM != 0
    }
}

/// What can be wrong with a stream of envelopes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// An envelope larger than [`MAX_ENVELOPE`].
    #[error("envelope of {0} bytes is too large")]
    TooLarge(usize),
    /// A compressed envelope (no compression was negotiated).
    #[error("compressed envelopes are not supported")]
    Compressed,
    /// The stream ended inside an envelope.
    #[error("stream ended inside an envelope")]
    Truncated,
}

/// Incremental envelope decoder: feed body chunks, take whole envelopes.
#[derive(Debug, Default)]
pub struct EnvelopeDecoder {
    buf: BytesMut,
}

impl EnvelopeDecoder {
    /// Appends a chunk of body.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next complete envelope, if any.
    pub fn next_envelope(&mut self) -> Result<Option<Envelope>, CodecError> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let flags = self.buf[0];
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > MAX_ENVELOPE {
            return Err(CodecError::TooLarge(len));
        }
        if flags & FLAG_COMPRESSED != 0 {
            return Err(CodecError::Compressed);
        }
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        self.buf.advance(5);
        let data = self.buf.split_to(len).freeze();
        Ok(Some(Envelope { flags, data }))
    }

    /// Call at the end of the body: leftover bytes mean a truncated envelope.
    pub fn finish(&self) -> Result<(), CodecError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(CodecError::Truncated)
        }
    }
}

/// The JSON of an end-of-stream envelope.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct EndStream {
    /// Set when the stream failed.
    #[serde(default)]
    pub error: Option<ConnectError>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_decode_across_chunk_boundaries() {
        let mut wire = Vec::new();
        wire.extend_from_slice(&message_envelope(&serde_json::json!({"a": 1})));
        wire.extend_from_slice(&end_stream_ok());
        let mut dec = EnvelopeDecoder::default();
        let mut got = Vec::new();
        for byte in &wire {
            dec.push(std::slice::from_ref(byte));
            while let Some(e) = dec.next_envelope().unwrap() {
                got.push(e);
            }
        }
        dec.finish().unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(&got[0].data[..], br#"{"a":1}"#);
        assert!(!got[0].is_end_stream());
        assert!(got[1].is_end_stream());
        assert_eq!(&got[1].data[..], b"{}");
    }

    #[test]
    fn bad_envelopes_are_errors() {
        let mut dec = EnvelopeDecoder::default();
        dec.push(&[0, 0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(dec.next_envelope(), Err(CodecError::TooLarge(_))));
        let mut dec = EnvelopeDecoder::default();
        dec.push(&[FLAG_COMPRESSED, 0, 0, 0, 0]);
        assert_eq!(dec.next_envelope(), Err(CodecError::Compressed));
        let mut dec = EnvelopeDecoder::default();
        dec.push(&[0, 0, 0, 0, 9, b'{']);
        assert_eq!(dec.next_envelope(), Ok(None));
        assert_eq!(dec.finish(), Err(CodecError::Truncated));
    }

    #[test]
    fn errors_serialise_as_connect_expects() {
        let e = ConnectError::new(Code::NotFound, "no such process");
        assert_eq!(
            e.to_json(),
            br#"{"code":"not_found","message":"no such process"}"#
        );
        let env = e.end_stream_envelope();
        assert_eq!(env[0], FLAG_END_STREAM);
        let end: EndStream = serde_json::from_slice(&env[5..]).unwrap();
        assert_eq!(end.error, Some(e));
        assert_eq!(Code::NotFound.http_status(), 404);
        assert_eq!(Code::from_http_status(503), Code::Unavailable);
    }
}
