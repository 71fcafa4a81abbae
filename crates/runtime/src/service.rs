//! The host's view of a sandbox's main service, through its agent's socket (whatever
//! the runtime): its state and log ([`service_status`]), and an HTTP probe of a port
//! inside the sandbox through a `CONNECT` tunnel ([`probe_http`]).

use std::path::Path;
use std::time::Duration;

use cubicle_envd::client::EnvdClient;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::ns::message::{ServiceStatus, SERVICE_PATH};

/// Asks the agent behind `socket` how its main service is doing.
pub async fn service_status(socket: &Path) -> Result<ServiceStatus, String> {
    let req = http::Request::get(SERVICE_PATH)
        .body(Full::default())
        .map_err(|e| e.to_string())?;
    let resp = EnvdClient::new(socket)
        .send(req)
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    if !status.is_success() {
        return Err(format!(
            "the agent answered {status}: {}",
            String::from_utf8_lossy(&body)
        ));
    }
    serde_json::from_slice(&body).map_err(|e| format!("the agent's answer: {e}"))
}

/// `GET path` on `127.0.0.1:port` inside the sandbox behind `socket`, through a tunnel
/// of its agent. Returns the status line of the answer: any HTTP answer counts.
/// `Err` says why there was none (nothing listens, the connection closed, `wait`
/// passed).
pub async fn probe_http(
    socket: &Path,
    port: u16,
    path: &str,
    wait: Duration,
) -> Result<String, String> {
    let attempt = async {
        let mut stream = EnvdClient::new(socket)
            .tunnel(port)
            .await
            .map_err(|e| match &e {
                cubicle_envd::client::ClientError::Status { status, .. }
                    if status.as_u16() == 502 =>
                {
                    format!("nothing listens on port {port}")
                }
                _ => e.to_string(),
            })?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: cubicle-probe\r\n\
             Accept: */*\r\nConnection: close\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("sending the request: {e}"))?;
        let mut head = Vec::new();
        let mut buf = [0u8; 512];
        while !head.contains(&b'\n') && head.len() < 4096 {
            let n = stream
                .read(&mut buf)
                .await
                .map_err(|e| format!("reading the answer: {e}"))?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        let line = String::from_utf8_lossy(&head);
        let line = line.lines().next().unwrap_or_default().trim().to_owned();
        if line.starts_with("HTTP/") {
            Ok(line)
        } else if line.is_empty() {
            Err("the connection was closed without an answer".to_owned())
        } else {
            Err(format!("the answer is not HTTP: {line:?}"))
        }
    };
    tokio::time::timeout(wait, attempt)
        .await
        .map_err(|_| format!("no answer within {} ms", wait.as_millis()))?
}
