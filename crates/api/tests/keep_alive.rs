//! Keep-alive over real TCP: an answer given without reading the request body must not
//! leave the client a connection that hyper closes under its next request.
//!
//! The client sends a request's head, then its body only once the server has answered
//! or 100 ms have passed. A server that answers before the body arrives (a 501, a 401,
//! a 404) used to close the connection silently afterwards; the next request on it then
//! got no answer, which the E2B SDK reports as "Server disconnected without sending a
//! response". The 100 ms only decide when the body is sent: a correct server passes
//! whatever the timing.

use std::sync::Arc;
use std::time::Duration;

use cubicle_api::AppState;
use cubicle_control::testing::{fake_templates, FakeRuntime};
use cubicle_control::{ControlConfig, Controller};
use cubicle_store::Store;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

struct Server {
    addr: std::net::SocketAddr,
    key: String,
    _templates: tempfile::TempDir,
}

async fn server() -> Server {
    let store = Store::open_in_memory().unwrap();
    let (_, key) = store.create_key("main").unwrap();
    let (tmp, templates) = fake_templates();
    let controller = Controller::start(
        ControlConfig::default(),
        Arc::new(FakeRuntime::default()),
        store,
        templates,
    )
    .await
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = AppState::new(controller, None);
    tokio::spawn(cubicle_api::serve(
        listener,
        state,
        std::future::pending::<()>(),
    ));
    Server {
        addr,
        key,
        _templates: tmp,
    }
}

/// One answer: status, headers (lower-case names), body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one answer, or `None` if the server closed the connection first; a server that
/// says nothing for 10 s fails the test.
async fn read_answer(conn: &mut BufReader<TcpStream>) -> Option<Answer> {
    tokio::time::timeout(Duration::from_secs(10), read_answer_now(conn))
        .await
        .expect("no answer within 10 s")
}

async fn read_answer_now(conn: &mut BufReader<TcpStream>) -> Option<Answer> {
    let mut status_line = String::new();
    if conn.read_line(&mut status_line).await.ok()? == 0 {
        return None;
    }
    let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        conn.read_line(&mut line).await.unwrap();
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (k, v) = line.split_once(':').unwrap();
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .map(|(_, v)| v.parse().unwrap())
        .expect("answers here have a Content-Length");
    let mut body = vec![0; len];
    conn.read_exact(&mut body).await.unwrap();
    Some(Answer {
        status,
        headers,
        body,
    })
}

/// Sends `head` (without the blank line) and a 7-byte JSON body late, as described at
/// the top; returns the first answer and whether the connection still serves
/// `GET /health`.
async fn late_body_then_health(server: &Server, head: &str) -> (Answer, Option<Answer>) {
    let stream = TcpStream::connect(server.addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let mut conn = BufReader::new(stream);
    let body = b"{\"a\":1}";
    let head = format!(
        "{head}\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    conn.get_mut().write_all(head.as_bytes()).await.unwrap();
    let early = tokio::time::timeout(Duration::from_millis(100), read_answer_now(&mut conn)).await;
    conn.get_mut().write_all(body).await.unwrap();
    let first = match early {
        Ok(answer) => answer.expect("an answer to the first request"),
        Err(_) => read_answer(&mut conn)
            .await
            .expect("an answer to the first request"),
    };
    if first.header("connection") == Some("close") {
        return (first, None);
    }
    let _ = conn
        .get_mut()
        .write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await;
    let second = read_answer(&mut conn).await;
    (first, second)
}

#[tokio::test]
async fn rest_answers_that_ignore_the_body_keep_the_connection_usable() {
    let server = server().await;
    let key = &server.key;
    for (head, status) in [
        (
            format!("POST /v3/templates HTTP/1.1\r\nX-API-KEY: {key}"),
            501,
        ),
        (
            "POST /sandboxes HTTP/1.1\r\nX-API-KEY: wrong".to_owned(),
            401,
        ),
        (
            format!("POST /no/such/endpoint HTTP/1.1\r\nX-API-KEY: {key}"),
            404,
        ),
        (format!("PUT /sandboxes HTTP/1.1\r\nX-API-KEY: {key}"), 405),
        // Read and refused: `a` is not a field of the body.
        (
            format!("POST /sandboxes/nosuch/timeout HTTP/1.1\r\nX-API-KEY: {key}"),
            400,
        ),
    ] {
        let (first, second) = late_body_then_health(&server, &head).await;
        assert_eq!(first.status, status, "{head}: {:?}", first.body);
        assert_eq!(first.header("connection"), None, "{head}");
        let second = second
            .unwrap_or_else(|| panic!("{head}: the server closed the connection after its answer"));
        assert_eq!(second.status, 200, "{head}");
    }
}

#[tokio::test]
async fn proxy_answers_that_ignore_the_body_say_the_connection_closes() {
    let server = server().await;
    let (first, second) = late_body_then_health(
        &server,
        "POST /filesystem.Filesystem/Stat HTTP/1.1\r\nE2b-Sandbox-Id: nosuch",
    )
    .await;
    assert_eq!(first.status, 502);
    // The proxy answers without reading the body, so hyper ends the connection: the
    // answer must say so (and then nothing more is sent on it).
    assert_eq!(first.header("connection"), Some("close"));
    assert!(second.is_none());
}

#[tokio::test]
async fn an_oversized_rest_body_is_413_and_closes_the_connection() {
    let server = server().await;
    let stream = TcpStream::connect(server.addr).await.unwrap();
    let mut conn = BufReader::new(stream);
    let head = format!(
        "POST /v2/sandboxes HTTP/1.1\r\nHost: x\r\nX-API-KEY: {}\r\nContent-Length: {}\r\n\r\n",
        server.key,
        cubicle_api::MAX_BODY + 1
    );
    conn.get_mut().write_all(head.as_bytes()).await.unwrap();
    let answer = read_answer(&mut conn).await.expect("an answer");
    assert_eq!(answer.status, 413);
    assert_eq!(answer.header("connection"), Some("close"));
    let body: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
    assert_eq!(body["code"], 413);
}

#[tokio::test]
async fn a_body_cut_short_is_a_400_that_closes_the_connection() {
    let server = server().await;
    let stream = TcpStream::connect(server.addr).await.unwrap();
    let mut conn = BufReader::new(stream);
    let head = format!(
        "POST /v2/sandboxes HTTP/1.1\r\nHost: x\r\nX-API-KEY: {}\r\nContent-Length: 10\r\n\r\n{{\"a\"",
        server.key
    );
    conn.get_mut().write_all(head.as_bytes()).await.unwrap();
    conn.get_mut().shutdown().await.unwrap();
    // The client sent 4 of the 10 bytes it announced, then stopped.
    let answer = read_answer(&mut conn).await.expect("an answer");
    assert_eq!(answer.status, 400);
    assert_eq!(answer.header("connection"), Some("close"));
    let body: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
    assert_eq!(body["code"], 400);
    let message = body["message"].as_str().unwrap();
    assert!(
        message.starts_with("cannot read the request body"),
        "{message}"
    );
}
