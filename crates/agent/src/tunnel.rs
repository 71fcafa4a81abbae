//! `CONNECT 127.0.0.1:<port>`: a byte tunnel from the host to a TCP port inside the
//! sandbox's network namespace, so the daemon can reach any port without the sandbox
//! having a routable address.

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use std::sync::Arc;

use crate::rpc::{self, Body};
use crate::server::{spawn_host_task, Agent};

/// Answers a CONNECT request: dials the port, then splices both directions (a host
/// connection of `agent`'s, ended like the others before a checkpoint).
pub async fn connect(agent: &Arc<Agent>, req: Request<Incoming>) -> Response<Body> {
    let port = match target_port(req.uri()) {
        Ok(p) => p,
        Err(msg) => return rpc::http_error(StatusCode::BAD_REQUEST, msg),
    };
    // Dial first so a closed port is reported as such instead of a dead tunnel.
    let upstream = match TcpStream::connect(("127.0.0.1", port)).await {
        Ok(s) => s,
        Err(e) => {
            return rpc::http_error(
                StatusCode::BAD_GATEWAY,
                format!("port {port} is not open in the sandbox: {e}"),
            )
        }
    };
    let _ = upstream.set_nodelay(true);
    spawn_host_task(agent, move |_| async move {
        match hyper::upgrade::on(req).await {
            Ok(upgraded) => {
                let mut upgraded = TokioIo::new(upgraded);
                let mut upstream = upstream;
                let _ = tokio::io::copy_bidirectional(&mut upgraded, &mut upstream).await;
            }
            Err(e) => tracing::debug!(error = %e, "tunnel upgrade failed"),
        }
    });
    rpc::empty(StatusCode::OK)
}

/// The port of a CONNECT target; only loopback targets are allowed.
fn target_port(uri: &http::Uri) -> Result<u16, String> {
    let authority = uri
        .authority()
        .ok_or_else(|| "CONNECT needs host:port".to_string())?;
    let host = authority.host();
    if !matches!(host, "127.0.0.1" | "localhost" | "[::1]" | "::1") {
        return Err(format!("tunnels only reach loopback ports, not {host}"));
    }
    match authority.port_u16() {
        Some(p) if p > 0 => Ok(p),
        _ => Err("CONNECT needs a port between 1 and 65535".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let uri = |s: &str| s.parse::<http::Uri>().unwrap();
        assert_eq!(target_port(&uri("127.0.0.1:8080")), Ok(8080));
        assert_eq!(target_port(&uri("localhost:49999")), Ok(49999));
        assert!(target_port(&uri("10.0.0.1:80")).is_err());
        assert!(target_port(&uri("127.0.0.1:0")).is_err());
    }
}
