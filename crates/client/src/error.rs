//! [`ClientError`]: everything a call can fail with, worded for the person reading it.

use http::StatusCode;

/// Why a call to the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No API key in the environment.
    #[error("no API key: set E2B_API_KEY; `cubicle keys create <name>` makes one")]
    NoApiKey,
    /// The base URL cannot be used.
    #[error("invalid API URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Nothing answered at the base URL.
    #[error(
        "cannot reach the Cubicle API at {url} ({reason}): is `cubicle serve` running at {url}?"
    )]
    Unreachable {
        /// The base URL.
        url: String,
        /// The connect error, e.g. "connection refused".
        reason: String,
    },
    /// The connection failed after it was made (the daemon went away mid-request).
    #[error("request to {url} failed")]
    Transport {
        /// The request URL.
        url: String,
        /// The transport error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// No answer within the client's request timeout.
    #[error("no answer from {url} within {:.1} s", after.as_secs_f64())]
    Timeout {
        /// The request URL.
        url: String,
        /// The timeout.
        after: std::time::Duration,
    },
    /// The daemon answered with an error. Displays as the server's message.
    #[error("{message}")]
    Api {
        /// The HTTP status.
        status: StatusCode,
        /// The body's `code` (E2B: the status again), if the body had one.
        code: Option<i64>,
        /// The body's `message`, or the body's text if it was not E2B's error JSON.
        message: String,
    },
    /// A success answer whose body is not what the API documents.
    #[error("unexpected answer from {url}: {source} (body: {body})")]
    Decode {
        /// The request URL.
        url: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
        /// The start of the body.
        body: String,
    },
}

impl ClientError {
    /// The HTTP status of an API error.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// An API error with status 404.
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(StatusCode::NOT_FOUND)
    }

    /// An API error with status 401 (missing or unknown API key).
    pub fn is_unauthorized(&self) -> bool {
        self.status() == Some(StatusCode::UNAUTHORIZED)
    }

    /// The daemon could not be reached at all.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ClientError::Unreachable { .. })
    }

    /// The error for a non-success answer: E2B's `{code, message}` if the body is that,
    /// else the body's text (or the status's reason for an empty body).
    pub(crate) fn from_response(status: StatusCode, body: &[u8]) -> ClientError {
        if let Ok(e) = serde_json::from_slice::<crate::models::ErrorBody>(body) {
            return ClientError::Api {
                status,
                code: e.code,
                message: e.message,
            };
        }
        let text = String::from_utf8_lossy(body).trim().to_owned();
        let message = if text.is_empty() {
            format!(
                "{} {}",
                status.as_u16(),
                status.canonical_reason().unwrap_or("error")
            )
        } else {
            format!("{}: {}", status.as_u16(), truncate(&text, 500))
        };
        ClientError::Api {
            status,
            code: None,
            message,
        }
    }
}

/// At most `max` bytes of `s`, cut at a character boundary.
pub(crate) fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_errors_show_the_servers_message() {
        let e = ClientError::from_response(
            StatusCode::NOT_FOUND,
            br#"{"code":404,"message":"sandbox abc not found"}"#,
        );
        assert_eq!(e.to_string(), "sandbox abc not found");
        assert!(e.is_not_found());
        assert!(matches!(
            e,
            ClientError::Api {
                code: Some(404),
                ..
            }
        ));
        let e = ClientError::from_response(StatusCode::BAD_GATEWAY, b"upstream broke\n");
        assert_eq!(e.to_string(), "502: upstream broke");
        let e = ClientError::from_response(StatusCode::SERVICE_UNAVAILABLE, b"");
        assert_eq!(e.to_string(), "503 Service Unavailable");
        assert_eq!(e.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
    }

    #[test]
    fn truncation_keeps_characters_whole() {
        assert_eq!(truncate("abc", 5), "abc");
        assert_eq!(truncate("ééé", 3), "é…");
    }
}
