//! The code interpreter of a sandbox (port [`INTERPRETER_PORT`], templates with
//! `code_interpreter`) through the daemon's sandbox proxy, as the
//! `e2b-code-interpreter` SDK's `run_code` reaches it: `POST /execute`, answered with
//! one JSON event per line until the execution ends.

use std::collections::BTreeMap;

use bytes::{Buf, BytesMut};
use http::{header, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{ApiClient, ClientError};

/// The port the code interpreter listens on inside a sandbox (E2B's).
pub const INTERPRETER_PORT: u16 = 49999;

/// The body of `POST /execute`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunCode {
    /// The code (a notebook cell).
    pub code: String,
    /// The language's default context (`python`, `javascript`, `bash`...); exclusive
    /// with `context_id`. Neither means Python.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    /// A context made by `POST /contexts`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context_id: Option<String>,
    /// Environment variables for this execution only.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub env_vars: BTreeMap<String, String>,
}

/// One line of the `/execute` answer.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CodeEvent {
    /// Text the code printed to stdout.
    Stdout {
        /// The text.
        text: String,
    },
    /// Text the code printed to stderr.
    Stderr {
        /// The text.
        text: String,
    },
    /// A displayed value, or (`is_main_result`) the value of the cell's last expression.
    Result(CodeResult),
    /// The code raised.
    Error {
        /// The exception's type, e.g. `ZeroDivisionError`.
        name: String,
        /// Its message.
        value: String,
        /// The formatted traceback.
        traceback: String,
    },
    /// The context's execution counter after this execution.
    NumberOfExecutions {
        /// The counter.
        execution_count: u64,
    },
    /// The execution finished.
    EndOfExecution,
    /// The kernel died during the execution (an `Error` event says why).
    UnexpectedEndOfExecution,
    /// An event this client does not know.
    #[serde(other)]
    Unknown,
}

/// A `result` event: the MIME bundle of a value under E2B's names.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CodeResult {
    /// The value of the cell's last expression (not a `display()` call).
    #[serde(default)]
    pub is_main_result: bool,
    /// The plain-text representation.
    #[serde(default)]
    pub text: Option<String>,
    /// The other representations: `html`, `png` (base64), `svg`, `chart`, `extra`...
    #[serde(flatten)]
    pub formats: BTreeMap<String, Value>,
}

impl CodeResult {
    /// The names of the non-empty representations other than `text`, e.g. `["html"]`.
    pub fn other_formats(&self) -> Vec<&str> {
        self.formats
            .iter()
            .filter(|(k, v)| !v.is_null() && k.as_str() != "timestamp")
            .filter(|(k, v)| k.as_str() != "extra" || v.as_object().is_some_and(|o| !o.is_empty()))
            .map(|(k, _)| k.as_str())
            .collect()
    }
}

/// The event stream of one execution.
pub struct CodeRun {
    url: String,
    body: Incoming,
    buf: BytesMut,
    done: bool,
}

impl std::fmt::Debug for CodeRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CodeRun")
            .field("url", &self.url)
            .field("buffered", &self.buf.len())
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl CodeRun {
    /// The next event, or `None` once the answer has ended.
    pub async fn next(&mut self) -> Option<Result<CodeEvent, ClientError>> {
        loop {
            if let Some(line) = self.take_line() {
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Some(self.decode(&line));
            }
            if self.done {
                return None;
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
                Some(Err(e)) => {
                    self.done = true;
                    return Some(Err(ClientError::Transport {
                        url: self.url.clone(),
                        source: Box::new(e),
                    }));
                }
                None => {
                    self.done = true;
                    if !self.buf.is_empty() {
                        let rest = self.buf.split();
                        if !rest.iter().all(u8::is_ascii_whitespace) {
                            return Some(self.decode(&rest));
                        }
                    }
                    return None;
                }
            }
        }
    }

    fn take_line(&mut self) -> Option<BytesMut> {
        let end = self.buf.iter().position(|&b| b == b'\n')?;
        let line = self.buf.split_to(end);
        self.buf.advance(1);
        Some(line)
    }

    fn decode(&self, line: &[u8]) -> Result<CodeEvent, ClientError> {
        decode_event(line).map_err(|source| ClientError::Decode {
            url: self.url.clone(),
            source,
            body: crate::error::truncate(&String::from_utf8_lossy(line), 200),
        })
    }
}

fn decode_event(line: &[u8]) -> Result<CodeEvent, serde_json::Error> {
    serde_json::from_slice(line)
}

impl ApiClient {
    /// `POST /execute` on the sandbox's code interpreter, through the sandbox proxy
    /// with its envd access token (if it has one). Returns once the interpreter
    /// answers; the events follow through [`CodeRun::next`], for as long as the code
    /// runs (the client's timeout bounds only the wait for the answer to start).
    pub async fn run_code(
        &self,
        sandbox_id: &str,
        access_token: Option<&str>,
        request: &RunCode,
    ) -> Result<CodeRun, ClientError> {
        let url = format!("{}/execute", self.sandbox_url);
        let uri: Uri = url.parse().map_err(|e| ClientError::InvalidUrl {
            url: url.clone(),
            reason: format!("{e}"),
        })?;
        let bad_header = |what: &str| ClientError::InvalidUrl {
            url: url.clone(),
            reason: format!("the {what} contains characters a header cannot carry"),
        };
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .header(
                header::USER_AGENT,
                concat!("cubicle-client/", env!("CARGO_PKG_VERSION")),
            )
            .header("e2b-sandbox-port", INTERPRETER_PORT)
            .body(Full::new(
                serde_json::to_vec(request)
                    .expect("a RunCode serializes")
                    .into(),
            ))
            .expect("valid request");
        let headers = req.headers_mut();
        headers.insert(
            "e2b-sandbox-id",
            HeaderValue::from_str(sandbox_id).map_err(|_| bad_header("sandbox id"))?,
        );
        if let Some(token) = access_token {
            let mut value = HeaderValue::from_str(token).map_err(|_| bad_header("access token"))?;
            value.set_sensitive(true);
            headers.insert("x-access-token", value);
        }
        let resp = tokio::time::timeout(self.timeout, self.http.request(req))
            .await
            .map_err(|_| ClientError::Timeout {
                url: url.clone(),
                after: self.timeout,
            })?
            .map_err(|e| self.transport(&url, e))?;
        let (parts, body) = resp.into_parts();
        if !parts.status.is_success() {
            let bytes = tokio::time::timeout(self.timeout, body.collect())
                .await
                .ok()
                .and_then(Result::ok)
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            return Err(ClientError::from_response(parts.status, &bytes));
        }
        Ok(CodeRun {
            url,
            body,
            buf: BytesMut::new(),
            done: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_decode_from_e2b_lines() {
        let ev = |s: &str| decode_event(s.as_bytes()).unwrap();
        assert_eq!(
            ev(r#"{"type":"stdout","text":"hi\n","timestamp":"2026-01-01T00:00:00Z"}"#),
            CodeEvent::Stdout {
                text: "hi\n".into()
            }
        );
        assert_eq!(
            ev(
                r#"{"type":"error","name":"ZeroDivisionError","value":"division by zero","traceback":"tb"}"#
            ),
            CodeEvent::Error {
                name: "ZeroDivisionError".into(),
                value: "division by zero".into(),
                traceback: "tb".into()
            }
        );
        assert_eq!(
            ev(r#"{"type":"number_of_executions","execution_count":3}"#),
            CodeEvent::NumberOfExecutions { execution_count: 3 }
        );
        assert_eq!(
            ev(r#"{"type":"end_of_execution"}"#),
            CodeEvent::EndOfExecution
        );
        assert_eq!(ev(r#"{"type":"something_new","x":1}"#), CodeEvent::Unknown);
        let CodeEvent::Result(r) = ev(
            r#"{"type":"result","is_main_result":true,"text":"42","html":null,"png":"iVBO","extra":{}}"#,
        ) else {
            panic!("not a result")
        };
        assert!(r.is_main_result);
        assert_eq!(r.text.as_deref(), Some("42"));
        assert_eq!(r.other_formats(), vec!["png"]);
        assert!(decode_event(b"{\"text\":\"no type\"}").is_err());
    }

    #[test]
    fn requests_leave_out_what_is_unset() {
        let body = serde_json::to_value(RunCode {
            code: "1+1".into(),
            ..RunCode::default()
        })
        .unwrap();
        assert_eq!(body, serde_json::json!({"code": "1+1"}));
        let body = serde_json::to_value(RunCode {
            code: "echo $A".into(),
            language: Some("bash".into()),
            env_vars: [("A".to_owned(), "1".to_owned())].into(),
            ..RunCode::default()
        })
        .unwrap();
        assert_eq!(
            body,
            serde_json::json!({"code": "echo $A", "language": "bash", "env_vars": {"A": "1"}})
        );
    }
}
