//! Sandbox traffic: requests for a sandbox's envd (port 49983), code interpreter (49999)
//! or any other port, chosen by the `E2b-Sandbox-Id` / `E2b-Sandbox-Port` headers (what
//! the SDK sends with `E2B_SANDBOX_URL`) or by a host name `{port}-{id}.{domain}`.
//!
//! Everything travels over the sandbox agent's unix socket: envd requests directly, other
//! ports through a `CONNECT` tunnel the agent opens inside the sandbox's network
//! namespace. Connections are pooled per sandbox and port by a hyper client whose
//! connector does the dialling. Bodies stream both ways; upgrades (WebSocket) are
//! spliced. Unknown, killed or paused sandboxes get E2B's 502 "The sandbox was not found".

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use cubicle_control::Controller;
use http::{header, HeaderMap, HeaderValue, Request, StatusCode, Uri};
use http_body_util::Empty;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::UnixStream;

/// envd's port: requests for it go to the agent itself.
pub const ENVD_PORT: u16 = 49983;
/// Pseudo-domain of the proxy's internal URIs (`http://{port}-{id}.sandbox/…`).
const INTERNAL_DOMAIN: &str = "sandbox.internal";

/// Which sandbox and port a request is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Sandbox id, as given (validated when routed).
    pub id: String,
    /// Port inside the sandbox.
    pub port: u16,
}

/// Finds the target of sandbox traffic, if the request is sandbox traffic at all.
/// `Err` for a sandbox request with a malformed port.
pub fn target(headers: &HeaderMap, domain: Option<&str>) -> Result<Option<Target>, String> {
    if let Some(id) = headers.get("e2b-sandbox-id") {
        let id = id
            .to_str()
            .map_err(|_| "E2b-Sandbox-Id is not ASCII".to_string())?;
        let port = match headers.get("e2b-sandbox-port") {
            None => ENVD_PORT,
            Some(p) => p
                .to_str()
                .ok()
                .and_then(|p| p.trim().parse::<u16>().ok())
                .filter(|p| *p > 0)
                .ok_or_else(|| "E2b-Sandbox-Port must be a port number".to_string())?,
        };
        return Ok(Some(Target {
            id: id.trim().to_owned(),
            port,
        }));
    }
    let (Some(domain), Some(host)) = (domain, headers.get(header::HOST)) else {
        return Ok(None);
    };
    let host = host.to_str().unwrap_or_default();
    Ok(host_target(host, domain))
}

/// `{port}-{id}.{domain}` (ports of host and domain ignored).
fn host_target(host: &str, domain: &str) -> Option<Target> {
    let strip_port = |h: &str| match h.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name.to_owned(),
        _ => h.to_owned(),
    };
    let host = strip_port(host).to_ascii_lowercase();
    let domain = strip_port(domain).to_ascii_lowercase();
    let label = host.strip_suffix(&domain)?.strip_suffix('.')?;
    let (port, id) = label.split_once('-')?;
    let port = port.parse::<u16>().ok().filter(|p| *p > 0)?;
    (!id.is_empty() && !id.contains('.')).then(|| Target {
        id: id.to_owned(),
        port,
    })
}

/// The proxy: a pooled client over agent sockets and tunnels.
#[derive(Debug, Clone)]
pub struct Proxy {
    client: Client<Dialer, Body>,
    dialer: Dialer,
}

impl Proxy {
    /// A proxy that finds sandboxes through `controller`.
    pub fn new(controller: Arc<Controller>) -> Self {
        let dialer = Dialer { controller };
        let client = pooled_client(dialer.clone(), POOL_IDLE_TIMEOUT);
        Proxy { client, dialer }
    }

    /// Forwards one request to its target and returns the sandbox's answer.
    pub async fn forward(&self, target: Target, mut req: Request<Body>) -> Response {
        if self.dialer.controller.route(&target.id).is_none() {
            return not_found(&target.id);
        }
        // The agent's host-only control requests (quiesce before a checkpoint, identity
        // after a restore) come from the runtime, never through the proxy: the agent
        // sees the proxy as the host too.
        if target.port == ENVD_PORT && is_agent_control(req.uri().path()) {
            return agent_control_refused();
        }
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".into());
        let uri: Uri = match format!(
            "http://{}-{}.{INTERNAL_DOMAIN}{path}",
            target.port, target.id
        )
        .parse()
        {
            Ok(u) => u,
            Err(_) => return not_found(&target.id),
        };
        *req.uri_mut() = uri;
        if is_upgrade(req.headers()) {
            return self.forward_upgrade(target, req).await;
        }
        strip_hop_by_hop(req.headers_mut());
        match self.client.request(req).await {
            Ok(resp) => resp.map(Body::new).into_response(),
            Err(e) => failure(&target, &e),
        }
    }

    /// Upgrades get their own connection: forward the request, and on `101` splice the
    /// client's upgraded connection with the sandbox's.
    async fn forward_upgrade(&self, target: Target, mut req: Request<Body>) -> Response {
        let client_upgrade = hyper::upgrade::on(&mut req);
        let conn = match self.dialer.dial(&target).await {
            Ok(c) => c,
            Err(e) => return dial_failure(&target, &e),
        };
        let (mut sender, connection) = match hyper::client::conn::http1::handshake(conn).await {
            Ok(pair) => pair,
            Err(e) => return bad_gateway(&target, &format!("handshake: {e}")),
        };
        tokio::spawn(async move {
            let _ = connection.with_upgrades().await;
        });
        let mut resp = match sender.send_request(req).await {
            Ok(r) => r,
            Err(e) => return bad_gateway(&target, &e.to_string()),
        };
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let upstream = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                if let (Ok(a), Ok(b)) = (client_upgrade.await, upstream.await) {
                    let _ =
                        tokio::io::copy_bidirectional(&mut TokioIo::new(a), &mut TokioIo::new(b))
                            .await;
                }
            });
        }
        resp.map(Body::new).into_response()
    }
}

/// How long an unused pooled connection to a sandbox stays open.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// A client that keeps up to 16 idle connections per sandbox port for `idle`. Without a
/// pool timer hyper never closes idle connections, and each one holds a socket in the
/// sandbox's agent for good (which also stops a checkpoint of the sandbox).
fn pooled_client<C>(connector: C, idle: Duration) -> Client<C, Body>
where
    C: hyper_util::client::legacy::connect::Connect + Clone,
{
    Client::builder(TokioExecutor::new())
        .pool_timer(hyper_util::rt::TokioTimer::new())
        .pool_idle_timeout(idle)
        .pool_max_idle_per_host(16)
        .build(connector)
}

/// Paths of the agent's control requests (`/_cubicle/...`), however spelled.
fn is_agent_control(path: &str) -> bool {
    let decoded = percent_encoding::percent_decode_str(path).decode_utf8_lossy();
    decoded
        .trim_start_matches('/')
        .to_ascii_lowercase()
        .starts_with("_cubicle")
}

fn agent_control_refused() -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(serde_json::json!({
            "code": 404, "message": "no such endpoint in the sandbox"
        })),
    )
        .into_response()
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

/// Headers that belong to one hop, not to the request (RFC 9110 §7.6.1).
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|t| t.trim().to_ascii_lowercase()))
        .collect();
    for name in named {
        headers.remove(name.as_str());
    }
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
    ] {
        headers.remove(name);
    }
}

/// E2B's answer for an unknown, killed or paused sandbox (the SDK matches "was not found").
pub fn not_found(id: &str) -> Response {
    json_502(serde_json::json!({
        "sandboxId": id, "code": 502, "message": "The sandbox was not found"
    }))
}

fn port_closed(target: &Target) -> Response {
    json_502(serde_json::json!({
        "sandboxId": target.id, "port": target.port, "code": 502,
        "message": "The sandbox is running but port is not open"
    }))
}

fn bad_gateway(target: &Target, detail: &str) -> Response {
    tracing::debug!(sandbox = %target.id, port = target.port, detail, "proxy failure");
    json_502(serde_json::json!({
        "sandboxId": target.id, "port": target.port, "code": 502,
        "message": format!("the sandbox did not answer on port {}: {detail}", target.port)
    }))
}

fn json_502(body: serde_json::Value) -> Response {
    let mut resp = (StatusCode::BAD_GATEWAY, axum::Json(body)).into_response();
    resp.headers_mut()
        .insert("should-retry", HeaderValue::from_static("false"));
    resp
}

fn failure(target: &Target, e: &hyper_util::client::legacy::Error) -> Response {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(dial) = s.downcast_ref::<DialError>() {
            return dial_failure(target, dial);
        }
        source = s.source();
    }
    // hyper's top-level message ("client error (SendRequest)") says little; the causes say why.
    let mut detail = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        detail.push_str(": ");
        detail.push_str(&s.to_string());
        source = s.source();
    }
    bad_gateway(target, &detail)
}

fn dial_failure(target: &Target, e: &DialError) -> Response {
    match e {
        DialError::NoSandbox => not_found(&target.id),
        DialError::PortClosed => port_closed(target),
        DialError::Io(detail) => {
            // The agent's socket is gone: for a caller the sandbox is gone.
            tracing::debug!(sandbox = %target.id, %detail, "agent unreachable");
            not_found(&target.id)
        }
    }
}

/// Why a connection to a sandbox port could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The sandbox is not running.
    #[error("sandbox not running")]
    NoSandbox,
    /// Nothing listens on the port inside the sandbox.
    #[error("port not open")]
    PortClosed,
    /// The agent could not be reached.
    #[error("{0}")]
    Io(String),
}

/// Opens connections to sandbox ports named by internal URIs.
#[derive(Debug, Clone)]
struct Dialer {
    controller: Arc<Controller>,
}

impl Dialer {
    async fn dial(&self, target: &Target) -> Result<SandboxConn, DialError> {
        let route = self
            .controller
            .route(&target.id)
            .ok_or(DialError::NoSandbox)?;
        let stream = UnixStream::connect(&route.socket)
            .await
            .map_err(|e| DialError::Io(e.to_string()))?;
        if target.port == ENVD_PORT {
            return Ok(SandboxConn::Agent(TokioIo::new(stream)));
        }
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| DialError::Io(e.to_string()))?;
        tokio::spawn(async move {
            let _ = connection.with_upgrades().await;
        });
        let req = Request::connect(format!("127.0.0.1:{}", target.port))
            .header(header::HOST, format!("127.0.0.1:{}", target.port))
            .body(Empty::<bytes::Bytes>::new())
            .map_err(|e| DialError::Io(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| DialError::Io(e.to_string()))?;
        match resp.status() {
            StatusCode::OK => {}
            StatusCode::BAD_GATEWAY => return Err(DialError::PortClosed),
            other => return Err(DialError::Io(format!("tunnel refused: {other}"))),
        }
        let upgraded = hyper::upgrade::on(resp)
            .await
            .map_err(|e| DialError::Io(e.to_string()))?;
        Ok(SandboxConn::Tunnel(upgraded))
    }
}

impl tower_service::Service<Uri> for Dialer {
    type Response = SandboxConn;
    type Error = DialError;
    type Future = Pin<Box<dyn Future<Output = Result<SandboxConn, DialError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), DialError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let dialer = self.clone();
        Box::pin(async move {
            let target = uri
                .host()
                .and_then(|h| host_target(h, INTERNAL_DOMAIN))
                .ok_or(DialError::NoSandbox)?;
            dialer.dial(&target).await
        })
    }
}

/// A connection to a sandbox port: the agent's socket itself or a tunnel through it.
#[derive(Debug)]
enum SandboxConn {
    Agent(TokioIo<UnixStream>),
    Tunnel(hyper::upgrade::Upgraded),
}

impl Connection for SandboxConn {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl Read for SandboxConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SandboxConn::Agent(s) => Pin::new(s).poll_read(cx, buf),
            SandboxConn::Tunnel(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl Write for SandboxConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            SandboxConn::Agent(s) => Pin::new(s).poll_write(cx, buf),
            SandboxConn::Tunnel(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SandboxConn::Agent(s) => Pin::new(s).poll_flush(cx),
            SandboxConn::Tunnel(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SandboxConn::Agent(s) => Pin::new(s).poll_shutdown(cx),
            SandboxConn::Tunnel(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dials one unix socket, like [`Dialer`] dials an agent.
    #[derive(Clone)]
    struct UnixDial(std::path::PathBuf);

    impl tower_service::Service<Uri> for UnixDial {
        type Response = SandboxConn;
        type Error = io::Error;
        type Future = Pin<Box<dyn Future<Output = io::Result<SandboxConn>> + Send>>;
        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _uri: Uri) -> Self::Future {
            let path = self.0.clone();
            Box::pin(async move {
                Ok(SandboxConn::Agent(TokioIo::new(
                    UnixStream::connect(path).await?,
                )))
            })
        }
    }

    #[tokio::test]
    async fn idle_pooled_connections_are_closed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let (closed_tx, mut closed_rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let closed = closed_tx.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(
                            http::Response::builder()
                                .status(StatusCode::NO_CONTENT)
                                .body(Empty::<bytes::Bytes>::new())
                                .unwrap(),
                        )
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                    let _ = closed.send(());
                });
            }
        });
        let client = pooled_client(UnixDial(path), Duration::from_millis(100));
        let resp = client
            .request(
                Request::get("http://49983-x.sandbox.internal/health")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
        drop(resp);
        // The server sees the pooled connection closed once it has been idle long enough.
        tokio::time::timeout(Duration::from_secs(5), closed_rx.recv())
            .await
            .expect("the idle connection was closed")
            .unwrap();
    }

    #[test]
    fn header_targets() {
        let mut h = HeaderMap::new();
        assert_eq!(target(&h, Some("localhost:3000")).unwrap(), None);
        h.insert("e2b-sandbox-id", "abc".parse().unwrap());
        assert_eq!(
            target(&h, None).unwrap(),
            Some(Target {
                id: "abc".into(),
                port: ENVD_PORT
            })
        );
        h.insert("e2b-sandbox-port", "49999".parse().unwrap());
        assert_eq!(target(&h, None).unwrap().unwrap().port, 49999);
        h.insert("e2b-sandbox-port", "0".parse().unwrap());
        assert!(target(&h, None).is_err());
        h.insert("e2b-sandbox-port", "http".parse().unwrap());
        assert!(target(&h, None).is_err());
    }

    #[test]
    fn host_targets() {
        let t = |host: &str, domain: &str| host_target(host, domain);
        assert_eq!(
            t("8080-abc123.localhost:3000", "localhost:3000"),
            Some(Target {
                id: "abc123".into(),
                port: 8080
            })
        );
        assert_eq!(
            t("49983-x.sbx.example.com", "sbx.example.com")
                .unwrap()
                .port,
            49983
        );
        assert_eq!(t("localhost:3000", "localhost:3000"), None);
        assert_eq!(t("api.localhost", "localhost"), None);
        assert_eq!(t("0-abc.localhost", "localhost"), None);
        assert_eq!(t("8080-a.b.localhost", "localhost"), None);
        assert_eq!(t("8080-abc.evil.com", "localhost"), None);
    }

    #[test]
    fn agent_control_paths_are_recognised_however_spelled() {
        for p in [
            "/_cubicle/identity",
            "/_cubicle/quiesce",
            "//_cubicle/quiesce",
            "/%5Fcubicle/identity",
            "/_CUBICLE/identity",
        ] {
            assert!(is_agent_control(p), "{p}");
        }
        for p in ["/health", "/process.Process/Start", "/files", "/cubicle"] {
            assert!(!is_agent_control(p), "{p}");
        }
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, x-custom".parse().unwrap());
        h.insert("x-custom", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-access-token", "t".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-access-token"));
    }
}
