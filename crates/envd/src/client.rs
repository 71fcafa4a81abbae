//! A small envd client over the agent's unix socket, speaking the same wire protocol as
//! the E2B SDK. Used by the CLI, tests and benchmarks; the daemon's proxy forwards raw
//! HTTP instead.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::UnixStream;

use crate::connect::{
    self, CodecError, ConnectError, EndStream, EnvelopeDecoder, CONTENT_TYPE_STREAM,
    CONTENT_TYPE_UNARY,
};
use crate::proto::{DataEvent, ProcessEvent, ProcessStreamMessage, StartRequest};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting to the agent's socket failed.
    #[error("connect to {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// HTTP-level failure.
    #[error("http")]
    Http(#[from] hyper::Error),
    /// The agent answered with an error status that is not a Connect error.
    #[error("status {status}: {body}")]
    Status {
        /// The status.
        status: StatusCode,
        /// The body, as text.
        body: String,
    },
    /// The agent answered with a Connect error.
    #[error("rpc error")]
    Rpc(#[from] ConnectError),
    /// A message could not be decoded.
    #[error("decode")]
    Decode(#[from] serde_json::Error),
    /// The envelope stream was malformed.
    #[error("envelope stream")]
    Codec(#[from] CodecError),
    /// A process stream broke the protocol (no start first, no end).
    #[error("protocol: {0}")]
    Protocol(String),
}

/// Client for one sandbox's agent.
#[derive(Debug, Clone)]
pub struct EnvdClient {
    socket: PathBuf,
    access_token: Option<String>,
}

/// The body type of requests this client sends.
pub type RequestBody = Full<Bytes>;

impl EnvdClient {
    /// A client for the agent listening on `socket`.
    pub fn new(socket: impl AsRef<Path>) -> Self {
        EnvdClient {
            socket: socket.as_ref().to_owned(),
            access_token: None,
        }
    }

    /// Sends `X-Access-Token` with every request.
    pub fn with_access_token(mut self, token: impl Into<String>) -> Self {
        self.access_token = Some(token.into());
        self
    }

    /// Opens a fresh HTTP/1.1 connection and sends `req` on it.
    pub async fn send(
        &self,
        mut req: Request<RequestBody>,
    ) -> Result<Response<Incoming>, ClientError> {
        if let Some(token) = &self.access_token {
            req.headers_mut().insert(
                "x-access-token",
                token
                    .parse()
                    .map_err(|_| ClientError::Protocol("bad token".into()))?,
            );
        }
        req.headers_mut()
            .entry(header::HOST)
            .or_insert_with(|| header::HeaderValue::from_static("localhost"));
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ClientError::Connect {
                    path: self.socket.clone(),
                    source,
                })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            // Errors surface through the response future; upgrades need `with_upgrades`.
            let _ = conn.with_upgrades().await;
        });
        Ok(sender.send_request(req).await?)
    }

    /// `GET /health`.
    pub async fn health(&self) -> Result<StatusCode, ClientError> {
        let req = Request::get("/health")
            .body(Full::default())
            .expect("static request");
        Ok(self.send(req).await?.status())
    }

    /// A unary RPC such as `/filesystem.Filesystem/Stat`, as `user` (default user if None).
    pub async fn unary<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        path: &str,
        request: &Req,
        user: Option<&str>,
    ) -> Result<Resp, ClientError> {
        let body = serde_json::to_vec(request)?;
        let mut req = Request::post(path)
            .header(header::CONTENT_TYPE, CONTENT_TYPE_UNARY)
            .header("connect-protocol-version", "1");
        if let Some(user) = user {
            req = req.header(header::AUTHORIZATION, basic_auth(user));
        }
        let resp = self
            .send(req.body(Full::new(body.into())).expect("valid request"))
            .await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        if status == StatusCode::OK {
            return Ok(serde_json::from_slice(&bytes)?);
        }
        match serde_json::from_slice::<ConnectError>(&bytes) {
            Ok(e) => Err(e.into()),
            Err(_) => Err(ClientError::Status {
                status,
                body: String::from_utf8_lossy(&bytes).into_owned(),
            }),
        }
    }

    /// A server-streaming RPC (`Start`, `Connect`, `WatchDir`).
    pub async fn server_stream<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        path: &str,
        request: &Req,
        user: Option<&str>,
        timeout: Option<Duration>,
    ) -> Result<ServerStream<Resp>, ClientError> {
        self.client_and_server_stream(path, std::slice::from_ref(request), user, timeout)
            .await
    }

    /// Sends several messages as one streaming request body and returns the response
    /// stream (for `StreamInput`, whose response is one message).
    pub async fn client_and_server_stream<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        path: &str,
        requests: &[Req],
        user: Option<&str>,
        timeout: Option<Duration>,
    ) -> Result<ServerStream<Resp>, ClientError> {
        let mut body = Vec::new();
        for r in requests {
            body.extend_from_slice(&connect::message_envelope(r));
        }
        let mut req = Request::post(path)
            .header(header::CONTENT_TYPE, CONTENT_TYPE_STREAM)
            .header("connect-protocol-version", "1");
        if let Some(user) = user {
            req = req.header(header::AUTHORIZATION, basic_auth(user));
        }
        if let Some(t) = timeout {
            req = req.header("connect-timeout-ms", t.as_millis().to_string());
        }
        let resp = self
            .send(req.body(Full::new(body.into())).expect("valid request"))
            .await?;
        let status = resp.status();
        if status != StatusCode::OK {
            let bytes = resp.into_body().collect().await?.to_bytes();
            return Err(match serde_json::from_slice::<ConnectError>(&bytes) {
                Ok(e) => e.into(),
                Err(_) => ClientError::Status {
                    status,
                    body: String::from_utf8_lossy(&bytes).into_owned(),
                },
            });
        }
        Ok(ServerStream {
            body: resp.into_body(),
            decoder: EnvelopeDecoder::default(),
            ended: false,
            _msg: std::marker::PhantomData,
        })
    }

    /// Starts a process and returns its event stream (first event: `start`).
    pub async fn start(
        &self,
        request: &StartRequest,
        user: Option<&str>,
        timeout: Option<Duration>,
    ) -> Result<ServerStream<ProcessStreamMessage>, ClientError> {
        self.server_stream("/process.Process/Start", request, user, timeout)
            .await
    }

    /// Runs `bash -l -c <cmd>` to completion, like the SDK's `commands.run`.
    pub async fn run(&self, cmd: &str, user: Option<&str>) -> Result<CommandOutput, ClientError> {
        let stream = self.start(&StartRequest::shell(cmd), user, None).await?;
        stream.collect_output().await
    }

    /// Opens a TCP byte stream to `port` inside the sandbox (`CONNECT 127.0.0.1:<port>`
    /// through the agent). Only callers outside the sandbox may do this.
    pub async fn tunnel(
        &self,
        port: u16,
    ) -> Result<TokioIo<hyper::upgrade::Upgraded>, ClientError> {
        let req = Request::connect(format!("127.0.0.1:{port}"))
            .body(Full::default())
            .expect("valid request");
        let resp = self.send(req).await?;
        let status = resp.status();
        if status != StatusCode::OK {
            let body = resp.into_body().collect().await?.to_bytes();
            return Err(ClientError::Status {
                status,
                body: String::from_utf8_lossy(&body).into_owned(),
            });
        }
        Ok(TokioIo::new(hyper::upgrade::on(resp).await?))
    }
}

/// What a finished command produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommandOutput {
    /// Its pid.
    pub pid: u32,
    /// All stdout bytes.
    pub stdout: Vec<u8>,
    /// All stderr bytes.
    pub stderr: Vec<u8>,
    /// All pty bytes.
    pub pty: Vec<u8>,
    /// The end event.
    pub end: crate::proto::EndEvent,
}

impl CommandOutput {
    /// stdout as (lossy) text.
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    /// stderr as (lossy) text.
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// The messages of a streaming response.
#[derive(Debug)]
pub struct ServerStream<T> {
    body: Incoming,
    decoder: EnvelopeDecoder,
    ended: bool,
    _msg: std::marker::PhantomData<T>,
}

impl<T: DeserializeOwned> ServerStream<T> {
    /// The next message; `None` after a successful end of stream. A stream that closes
    /// without its end-of-stream envelope is an error.
    pub async fn next(&mut self) -> Option<Result<T, ClientError>> {
        loop {
            if self.ended {
                return None;
            }
            match self.decoder.next_envelope() {
                Err(e) => return Some(Err(e.into())),
                Ok(Some(env)) if env.is_end_stream() => {
                    self.ended = true;
                    return match serde_json::from_slice::<EndStream>(&env.data) {
                        Ok(EndStream { error: Some(e) }) => Some(Err(e.into())),
                        Ok(_) => None,
                        Err(e) => Some(Err(e.into())),
                    };
                }
                Ok(Some(env)) => {
                    return Some(serde_json::from_slice(&env.data).map_err(Into::into))
                }
                Ok(None) => {}
            }
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.decoder.push(&data);
                    }
                }
                Some(Err(e)) => return Some(Err(e.into())),
                None => {
                    self.ended = true;
                    return Some(Err(ClientError::Protocol(
                        "stream closed without end-of-stream envelope".into(),
                    )));
                }
            }
        }
    }
}

impl ServerStream<ProcessStreamMessage> {
    /// Reads a process stream to its end, checking the protocol's event order.
    pub async fn collect_output(mut self) -> Result<CommandOutput, ClientError> {
        let mut out = CommandOutput::default();
        let mut started = false;
        let mut ended = false;
        while let Some(msg) = self.next().await {
            match msg?.event {
                ProcessEvent::Start { pid } if !started => {
                    started = true;
                    out.pid = pid;
                }
                _ if !started => return Err(ClientError::Protocol("expected start event".into())),
                ProcessEvent::Start { .. } => {
                    return Err(ClientError::Protocol("second start event".into()))
                }
                ProcessEvent::Data(DataEvent::Stdout(b)) => out.stdout.extend(b),
                ProcessEvent::Data(DataEvent::Stderr(b)) => out.stderr.extend(b),
                ProcessEvent::Data(DataEvent::Pty(b)) => out.pty.extend(b),
                ProcessEvent::End(end) => {
                    ended = true;
                    out.end = end;
                }
                ProcessEvent::Keepalive {} => {}
            }
        }
        if !ended {
            return Err(ClientError::Protocol(
                "command ended without an end event".into(),
            ));
        }
        Ok(out)
    }
}

/// `Authorization: Basic base64("<user>:")`, how the SDK names the user on RPCs.
pub fn basic_auth(user: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:"))
    )
}

/// Builds a request with a method and path (for raw calls such as `/files`).
pub fn request(method: Method, path_and_query: &str) -> http::request::Builder {
    Request::builder().method(method).uri(path_and_query)
}
