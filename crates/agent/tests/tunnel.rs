//! The agent socket carries TCP streams to ports inside the sandbox (`CONNECT`), for the
//! host only: this is how the proxy reaches the code interpreter and user servers.

mod support;

use std::time::Duration;

use cubicle_envd::client::ClientError;
use cubicle_envd::proto::StartRequest;
use support::TestEnv;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn host_reaches_a_server_inside_the_sandbox_through_the_agent() {
    let env = TestEnv::new();
    let sbx = env.create().await;
    // A web server on loopback inside the sandbox (the sandbox has no other address).
    sbx.sh("mkdir -p /tmp/www && echo 'hello through the tunnel' > /tmp/www/index.html")
        .await;
    let mut server =
        StartRequest::shell("cd /tmp/www && exec python3 -m http.server 8080 --bind 127.0.0.1");
    server.tag = Some("web".into());
    let _server = sbx.client.start(&server, None, None).await.unwrap();
    // Ready when the port accepts: poll the port through the tunnel itself.
    let mut stream = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match sbx.client.tunnel(8080).await {
                Ok(s) => break s,
                Err(ClientError::Status { status, body }) => {
                    assert_eq!(status, 502, "{body}");
                    assert!(body.contains("port 8080 is not open"), "{body}");
                    tokio::task::yield_now().await;
                }
                Err(e) => panic!("tunnel: {e:?}"),
            }
        }
    })
    .await
    .expect("server came up");
    stream
        .write_all(b"GET /index.html HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.0 200"), "{text}");
    assert!(text.ends_with("hello through the tunnel\n"), "{text}");

    // A closed port is reported as such; non-loopback targets are refused.
    match sbx.client.tunnel(9).await {
        Err(ClientError::Status { status, .. }) => assert_eq!(status, 502),
        other => panic!("expected 502, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn code_inside_the_sandbox_cannot_open_tunnels() {
    let env = TestEnv::new();
    let sbx = env.create().await;
    // Sandbox root talks to the agent socket directly: envd works (like E2B's
    // localhost:49983), tunnels are refused.
    let probe = r#"
import socket
s = socket.socket(socket.AF_UNIX)
s.connect("/run/cubicle/agent.sock")
s.sendall(b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: x\r\n\r\n")
print(s.recv(200).split(b"\r\n")[0].decode())
s = socket.socket(socket.AF_UNIX)
s.connect("/run/cubicle/agent.sock")
s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
print(s.recv(200).split(b"\r\n")[0].decode())
"#;
    sbx.root_sh(&format!("cat > /tmp/p.py <<'EOF'\n{probe}\nEOF"))
        .await;
    let out = sbx.root_sh("python3 /tmp/p.py").await;
    assert_eq!(
        out.stdout_text(),
        "HTTP/1.1 403 Forbidden\nHTTP/1.1 204 No Content\n",
        "{}",
        out.stderr_text()
    );
    // The default user cannot even open the socket.
    let denied = sbx.sh("python3 /tmp/p.py").await;
    assert_ne!(denied.end.exit_code, 0);
    assert!(
        denied.stderr_text().contains("Permission denied"),
        "{}",
        denied.stderr_text()
    );
}
