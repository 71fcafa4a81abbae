//! The client against a tiny in-process HTTP server that answers with JSON recorded
//! from `cubicle serve` and records what the client sent.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cubicle_client::{ApiClient, ClientError, CreateSandbox, ListParams, SandboxState};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

/// What the daemon answered to `POST /v2/sandboxes` (recorded).
const SANDBOX: &str = r#"{"templateID":"base","sandboxID":"i8f3k2m9q1w7e5r4t6y0","clientID":"cubicle","alias":"base","envdVersion":"0.6.4","envdAccessToken":"tok3n","trafficAccessToken":null,"domain":"localhost:3000"}"#;

/// What the daemon answered to `GET /sandboxes/{id}` (recorded).
const DETAIL: &str = r#"{"templateID":"base","sandboxID":"i8f3k2m9q1w7e5r4t6y0","clientID":"cubicle","alias":"base","startedAt":"2026-05-20T14:31:02.123Z","endAt":"2026-05-20T14:36:02.123Z","envdVersion":"0.6.4","cpuCount":2,"memoryMB":2048,"diskSizeMB":10240,"state":"running","metadata":{"owner":"ci"},"envdAccessToken":"tok3n","allowInternetAccess":true,"domain":"localhost:3000"}"#;

/// A request as the server saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path_and_query: String,
    headers: HashMap<String, String>,
    body: String,
}

type Handler = Arc<dyn Fn(&Seen) -> (u16, Vec<(&'static str, String)>, String) + Send + Sync>;

struct Server {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    connections: Arc<AtomicUsize>,
}

impl Server {
    async fn start(handler: Handler) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (seen2, conns2) = (seen.clone(), connections.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                conns2.fetch_add(1, Ordering::SeqCst);
                let (handler, seen) = (handler.clone(), seen2.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (handler, seen) = (handler.clone(), seen.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.unwrap().to_bytes();
                            let s = Seen {
                                method: parts.method.to_string(),
                                path_and_query: parts
                                    .uri
                                    .path_and_query()
                                    .map(|p| p.to_string())
                                    .unwrap_or_default(),
                                headers: parts
                                    .headers
                                    .iter()
                                    .map(|(k, v)| {
                                        (k.to_string(), v.to_str().unwrap_or("").to_owned())
                                    })
                                    .collect(),
                                body: String::from_utf8_lossy(&body).into_owned(),
                            };
                            seen.lock().unwrap().push(s.clone());
                            let (status, headers, body) = handler(&s);
                            if status == 0 {
                                // "Never answer."
                                tokio::time::sleep(Duration::from_secs(3600)).await;
                            }
                            let mut resp = Response::builder().status(status);
                            if !body.is_empty() {
                                resp = resp.header("content-type", "application/json");
                            }
                            for (k, v) in headers {
                                resp = resp.header(k, v);
                            }
                            Ok::<_, Infallible>(resp.body(Full::new(Bytes::from(body))).unwrap())
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Server {
            addr,
            seen,
            connections,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn client(&self) -> ApiClient {
        ApiClient::new(&self.url(), "e2b_testkey").unwrap()
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn error(status: u16, message: &str) -> (u16, Vec<(&'static str, String)>, String) {
    (
        status,
        vec![],
        serde_json::json!({"code": status, "message": message}).to_string(),
    )
}

#[tokio::test]
async fn create_sends_the_sdk_shape_and_reads_the_sandbox() {
    let server = Server::start(Arc::new(|s: &Seen| {
        match (s.method.as_str(), s.path_and_query.as_str()) {
            ("POST", "/v2/sandboxes") => (201, vec![], SANDBOX.into()),
            _ => error(404, "no such endpoint"),
        }
    }))
    .await;
    let mut req = CreateSandbox::new("base");
    req.timeout = Some(60);
    req.env_vars.insert("GREETING".into(), "hi".into());
    req.idempotency_key = Some("retry-1".into());
    let sbx = server.client().create(&req).await.unwrap();
    assert_eq!(sbx.sandbox_id, "i8f3k2m9q1w7e5r4t6y0");
    assert_eq!(sbx.envd_access_token.as_deref(), Some("tok3n"));
    assert_eq!(sbx.domain.as_deref(), Some("localhost:3000"));
    let seen = &server.seen()[0];
    assert_eq!(seen.headers["x-api-key"], "e2b_testkey");
    assert_eq!(seen.headers["content-type"], "application/json");
    assert_eq!(seen.headers["idempotency-key"], "retry-1");
    assert!(seen.headers["user-agent"].starts_with("cubicle-client/"));
    let body: serde_json::Value = serde_json::from_str(&seen.body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"templateID": "base", "timeout": 60, "metadata": {},
                           "envVars": {"GREETING": "hi"}})
    );
}

#[tokio::test]
async fn list_pages_through_x_next_token() {
    let server = Server::start(Arc::new(|s: &Seen| {
        let item = |id: &str| DETAIL.replace("i8f3k2m9q1w7e5r4t6y0", id);
        if s.path_and_query.contains("nextToken=c2") {
            (
                200,
                vec![("x-next-token", String::new())],
                format!("[{}]", item("c")),
            )
        } else {
            (
                200,
                vec![("x-next-token", "c2".into())],
                format!("[{},{}]", item("a"), item("b")),
            )
        }
    }))
    .await;
    let api = server.client();
    let params = ListParams {
        metadata: vec![("owner".into(), "ci".into())],
        states: vec![SandboxState::Running],
        limit: Some(2),
        ..ListParams::default()
    };
    let page = api.list(&params).await.unwrap();
    assert_eq!(page.items.len(), 2);
    assert_eq!(page.next_token.as_deref(), Some("c2"));
    assert_eq!(page.items[0].metadata["owner"], "ci");
    assert_eq!(page.items[0].cpu_count, 2);
    assert_eq!(page.items[0].extra["allowInternetAccess"], true);
    let all = api.list_all(&params).await.unwrap();
    let ids: Vec<&str> = all.iter().map(|d| d.sandbox_id.as_str()).collect();
    assert_eq!(ids, ["a", "b", "c"]);
    let seen = server.seen();
    assert_eq!(
        seen[0].path_and_query,
        "/v2/sandboxes?metadata=owner%3Dci&state=running&limit=2"
    );
    assert_eq!(
        seen[2].path_and_query,
        "/v2/sandboxes?metadata=owner%3Dci&state=running&limit=2&nextToken=c2"
    );
}

#[tokio::test]
async fn get_kill_timeout_connect_metrics_templates_health() {
    let server = Server::start(Arc::new(|s: &Seen| {
        let known = s.path_and_query.contains("i8f3k2m9q1w7e5r4t6y0");
        match (s.method.as_str(), s.path_and_query.as_str()) {
            ("GET", "/health") => (200, vec![], r#"{"status":"ok","version":"0.1.0"}"#.into()),
            ("GET", "/templates") => (
                200,
                vec![],
                r#"[{"templateID":"base","buildID":"0123abcd-0000-0000-0000-000000000000","cpuCount":2,"memoryMB":2048,"diskSizeMB":10240,"public":false,"aliases":["base"],"names":["base"],"createdAt":"2026-05-20T14:31:02.000Z","updatedAt":"2026-05-20T14:31:02.000Z","createdBy":null,"lastSpawnedAt":null,"spawnCount":0,"buildCount":1,"envdVersion":"0.6.4","buildStatus":"ready"}]"#.into(),
            ),
            ("GET", p) if p.ends_with("/metrics") && known => (
                200,
                vec![],
                r#"[{"timestamp":"2026-05-20T14:31:07.000Z","timestampUnix":1779287467,"cpuCount":2,"cpuUsedPct":1.5,"memUsed":3145728,"memTotal":2147483648,"memCache":0,"diskUsed":4096,"diskTotal":10737418240}]"#.into(),
            ),
            ("GET", _) if known => (200, vec![], DETAIL.into()),
            ("DELETE", _) if known => (204, vec![], String::new()),
            ("POST", p) if p.ends_with("/timeout") && known => (204, vec![], String::new()),
            ("POST", p) if p.starts_with("/v2/") && p.ends_with("/connect") && known => {
                (200, vec![], SANDBOX.into())
            }
            ("DELETE", "/sandboxes/broken") => error(500, "destroy failed: EBUSY"),
            _ => error(404, "sandbox nope not found"),
        }
    }))
    .await;
    let api = server.client();
    let id = "i8f3k2m9q1w7e5r4t6y0";
    let d = api.get(id).await.unwrap();
    assert_eq!(d.state, "running");
    assert_eq!(d.envd_access_token.as_deref(), Some("tok3n"));
    assert_eq!((d.end_at - d.started_at).num_seconds(), 300);

    let e = api.get("nope").await.unwrap_err();
    assert!(e.is_not_found(), "{e:?}");
    assert_eq!(e.to_string(), "sandbox nope not found");

    assert!(api.kill(id).await.unwrap());
    assert!(!api.kill("nope").await.unwrap());
    let e = api.kill("broken").await.unwrap_err();
    assert_eq!(e.status(), Some(StatusCode::INTERNAL_SERVER_ERROR));
    assert_eq!(e.to_string(), "destroy failed: EBUSY");

    api.set_timeout(id, 900).await.unwrap();
    assert!(api.set_timeout("nope", 1).await.unwrap_err().is_not_found());
    let sbx = api.connect(id, Some(60)).await.unwrap();
    assert_eq!(sbx.sandbox_id, id);

    let m = api.metrics(id).await.unwrap();
    assert_eq!(
        (m.len(), m[0].mem_used, m[0].cpu_used_pct),
        (1, 3_145_728, 1.5)
    );
    let t = api.templates().await.unwrap();
    assert_eq!(
        (t[0].template_id.as_str(), t[0].build_status.as_str()),
        ("base", "ready")
    );
    assert_eq!(api.health().await.unwrap().status, "ok");

    let seen = server.seen();
    let timeout = seen
        .iter()
        .find(|s| s.path_and_query.ends_with("/timeout"))
        .unwrap();
    assert_eq!(timeout.body, r#"{"timeout":900}"#);
    let connect = seen
        .iter()
        .find(|s| s.path_and_query.ends_with("/connect"))
        .unwrap();
    assert_eq!(
        connect.path_and_query,
        format!("/v2/sandboxes/{id}/connect")
    );
    assert_eq!(connect.body, r#"{"timeout":60}"#);
    // Everything above went over one kept-alive connection.
    assert_eq!(server.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn non_json_errors_and_bad_bodies_are_reported() {
    let server = Server::start(Arc::new(|s: &Seen| match s.path_and_query.as_str() {
        "/health" => (200, vec![], "<html>not json</html>".into()),
        _ => (502, vec![], "Bad Gateway".into()),
    }))
    .await;
    let api = server.client();
    let e = api.get("x").await.unwrap_err();
    assert_eq!(e.to_string(), "502: Bad Gateway");
    let e = api.health().await.unwrap_err();
    assert!(matches!(e, ClientError::Decode { .. }), "{e:?}");
    assert!(e.to_string().contains("<html>not json</html>"), "{e}");
}

#[tokio::test]
async fn unreachable_daemon_gets_a_clear_message() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}");
    let api = ApiClient::new(&url, "k").unwrap();
    let e = api.health().await.unwrap_err();
    assert!(e.is_unreachable(), "{e:?}");
    assert_eq!(
        e.to_string(),
        format!(
            "cannot reach the Cubicle API at {url} (connection refused): \
             is `cubicle serve` running at {url}?"
        )
    );
}

#[tokio::test]
async fn slow_answers_time_out() {
    let server = Server::start(Arc::new(|_: &Seen| (0, vec![], String::new()))).await;
    let api = server.client().with_timeout(Duration::from_millis(200));
    let e = api.health().await.unwrap_err();
    assert!(matches!(e, ClientError::Timeout { .. }), "{e:?}");
}
