//! A small envd client speaking the same wire protocol as the E2B SDK, over one of two
//! transports:
//!
//! - the agent's unix socket ([`EnvdClient::new`]): the runtime, tests and benchmarks,
//!   on the host that runs the sandbox; a fresh connection per request;
//! - the daemon's sandbox proxy ([`EnvdClient::via_proxy`]): plain HTTP to
//!   `E2B_SANDBOX_URL` with the `E2b-Sandbox-Id` / `E2b-Sandbox-Port` headers the SDK
//!   sends, connections kept alive and pooled. This is what the CLI uses.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
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
    /// The daemon's proxy could not be reached or broke the connection.
    #[error("request to the sandbox proxy at {url} failed")]
    Proxy {
        /// The request URL.
        url: String,
        /// The error.
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    /// The proxy URL cannot be used.
    #[error("invalid sandbox URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
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

/// envd's port inside a sandbox (`E2b-Sandbox-Port`).
pub const ENVD_PORT: u16 = 49983;

/// Client for one sandbox's agent.
#[derive(Debug, Clone)]
pub struct EnvdClient {
    transport: Transport,
    access_token: Option<String>,
}

/// How requests reach the agent.
#[derive(Debug, Clone)]
enum Transport {
    /// The agent's unix socket, one connection per request.
    Unix(PathBuf),
    /// The daemon's proxy over TCP.
    Proxy {
        /// `http://host:port` (no trailing `/`).
        base: String,
        /// `E2b-Sandbox-Id`.
        sandbox_id: header::HeaderValue,
        /// Pooled keep-alive connections.
        client: Client<HttpConnector, RequestBody>,
    },
}

/// The body type of requests this client sends.
pub type RequestBody = Full<Bytes>;

impl EnvdClient {
    /// A client for the agent listening on `socket`.
    pub fn new(socket: impl AsRef<Path>) -> Self {
        EnvdClient {
            transport: Transport::Unix(socket.as_ref().to_owned()),
            access_token: None,
        }
    }

    /// A client for sandbox `sandbox_id`'s envd behind the daemon's proxy at `base_url`
    /// (`E2B_SANDBOX_URL`, e.g. `http://127.0.0.1:3000`), sending `X-Access-Token` when
    /// the sandbox has a token (create, connect and get return it as `envdAccessToken`).
    pub fn via_proxy(
        base_url: &str,
        sandbox_id: &str,
        access_token: Option<&str>,
    ) -> Result<Self, ClientError> {
        let invalid = |reason: &str| ClientError::InvalidUrl {
            url: base_url.to_owned(),
            reason: reason.to_owned(),
        };
        let base = base_url.trim().trim_end_matches('/');
        let uri: http::Uri = base
            .parse()
            .map_err(|_| invalid("not a URL (expected http://host:port)"))?;
        if uri.scheme_str() != Some("http") || uri.host().is_none_or(str::is_empty) {
            return Err(invalid("expected http://host:port (plain http only)"));
        }
        let sandbox_id = header::HeaderValue::from_str(sandbox_id)
            .map_err(|_| ClientError::Protocol(format!("bad sandbox id {sandbox_id:?}")))?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(10)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(EnvdClient {
            transport: Transport::Proxy {
                base: base.to_owned(),
                sandbox_id,
                client,
            },
            access_token: access_token.map(str::to_owned),
        })
    }

    /// Sends `X-Access-Token` with every request.
    pub fn with_access_token(mut self, token: impl Into<String>) -> Self {
        self.access_token = Some(token.into());
        self
    }

    /// Sends `req` (whose URI is a path such as `/health`): over a fresh HTTP/1.1
    /// connection to the agent's socket, or through the proxy on a pooled connection.
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
        let socket = match &self.transport {
            Transport::Unix(socket) => socket,
            Transport::Proxy {
                base,
                sandbox_id,
                client,
            } => {
                let path = req
                    .uri()
                    .path_and_query()
                    .map_or("/", |p| p.as_str())
                    .to_owned();
                let url = format!("{base}{path}");
                *req.uri_mut() = url.parse().map_err(|_| ClientError::InvalidUrl {
                    url: url.clone(),
                    reason: "not a URL".into(),
                })?;
                let headers = req.headers_mut();
                headers.insert("e2b-sandbox-id", sandbox_id.clone());
                headers.insert("e2b-sandbox-port", header::HeaderValue::from(ENVD_PORT));
                return client
                    .request(req)
                    .await
                    .map_err(|source| ClientError::Proxy { url, source });
            }
        };
        req.headers_mut()
            .entry(header::HOST)
            .or_insert_with(|| header::HeaderValue::from_static("localhost"));
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|source| ClientError::Connect {
                path: socket.clone(),
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
    /// through the agent). Only callers outside the sandbox may do this, over the unix
    /// transport; through the proxy, send requests with `E2b-Sandbox-Port` instead.
    pub async fn tunnel(
        &self,
        port: u16,
    ) -> Result<TokioIo<hyper::upgrade::Upgraded>, ClientError> {
        if matches!(self.transport, Transport::Proxy { .. }) {
            return Err(ClientError::Protocol(
                "tunnels need the agent's socket; the proxy routes by E2b-Sandbox-Port".into(),
            ));
        }
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

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::proto::EndEvent;

    /// A stand-in for the daemon's proxy: records request headers and answers a
    /// process stream on `Start`, `/health` with 200, and anything for sandbox `gone`
    /// with the proxy's 502.
    async fn fake_proxy() -> (String, Arc<Mutex<Vec<http::HeaderMap>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let seen = seen2.clone();
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let seen = seen.clone();
                    async move {
                        seen.lock().unwrap().push(req.headers().clone());
                        let gone = req.headers()["e2b-sandbox-id"] == "gone";
                        let path = req.uri().path().to_owned();
                        let _ = req.into_body().collect().await;
                        let resp = Response::builder();
                        let resp = if gone {
                            resp.status(502).body(Full::new(Bytes::from_static(
                                br#"{"sandboxId":"gone","code":502,"message":"The sandbox was not found"}"#,
                            )))
                        } else if path == "/process.Process/Start" {
                            let mut body = Vec::new();
                            for event in [
                                ProcessEvent::Start { pid: 7 },
                                ProcessEvent::Data(DataEvent::Stdout(b"hi\n".to_vec())),
                                ProcessEvent::End(EndEvent {
                                    exit_code: 3,
                                    exited: true,
                                    status: "exit status 3".into(),
                                    error: None,
                                }),
                            ] {
                                let msg = ProcessStreamMessage { event };
                                body.extend_from_slice(&connect::message_envelope(&msg));
                            }
                            body.extend_from_slice(&connect::end_stream_ok());
                            resp.header(header::CONTENT_TYPE, CONTENT_TYPE_STREAM)
                                .body(Full::new(Bytes::from(body)))
                        } else {
                            resp.body(Full::new(Bytes::from_static(b"{}")))
                        };
                        Ok::<_, Infallible>(resp.unwrap())
                    }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (url, seen)
    }

    #[tokio::test]
    async fn proxy_transport_sends_the_sdk_headers() {
        let (url, seen) = fake_proxy().await;
        let client = EnvdClient::via_proxy(&format!("{url}/"), "abc123", Some("tok")).unwrap();
        assert_eq!(client.health().await.unwrap(), StatusCode::OK);
        let out = client.run("echo hi; exit 3", Some("root")).await.unwrap();
        assert_eq!(
            (out.pid, out.stdout_text(), out.end.exit_code),
            (7, "hi\n".into(), 3)
        );
        let seen = seen.lock().unwrap();
        for h in seen.iter() {
            assert_eq!(h["e2b-sandbox-id"], "abc123");
            assert_eq!(h["e2b-sandbox-port"], "49983");
            assert_eq!(h["x-access-token"], "tok");
            assert!(h.contains_key(header::HOST));
        }
        assert_eq!(seen[1][header::AUTHORIZATION], basic_auth("root"));
        assert_eq!(seen[1][header::CONTENT_TYPE], CONTENT_TYPE_STREAM);
    }

    #[tokio::test]
    async fn proxy_errors_are_reported() {
        let (url, _) = fake_proxy().await;
        let gone = EnvdClient::via_proxy(&url, "gone", None).unwrap();
        match gone.run("true", None).await {
            Err(ClientError::Status { status, body }) => {
                assert_eq!(status, 502);
                assert!(body.contains("The sandbox was not found"), "{body}");
            }
            other => panic!("expected a 502, got {other:?}"),
        }
        assert!(matches!(
            gone.tunnel(8080).await,
            Err(ClientError::Protocol(_))
        ));
        for bad in ["", "https://x", "localhost:3000", "http://"] {
            assert!(
                matches!(
                    EnvdClient::via_proxy(bad, "a", None),
                    Err(ClientError::InvalidUrl { .. })
                ),
                "{bad}"
            );
        }
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let down = EnvdClient::via_proxy(&format!("http://127.0.0.1:{port}"), "a", None).unwrap();
        assert!(matches!(
            down.health().await,
            Err(ClientError::Proxy { .. })
        ));
    }
}
