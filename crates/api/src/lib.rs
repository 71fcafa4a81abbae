//! The daemon's HTTP side, on one port: the E2B-compatible REST API (`E2B_API_URL`) and
//! the sandbox proxy (`E2B_SANDBOX_URL`, or host names `{port}-{id}.{domain}`).
//!
//! A request carrying `E2b-Sandbox-Id`, or addressed to a sandbox host name, is sandbox
//! traffic and goes to [`proxy`]; everything else is the REST API. Handlers are thin:
//! they decode JSON, call [`cubicle_control::Controller`] and encode E2B's shapes
//! ([`models`]); errors are always `{"code", "message"}` ([`error`]).

#![warn(missing_docs)]

pub mod auth;
pub mod body;
pub mod error;
pub mod models;
pub mod proxy;
pub mod sandboxes;
pub mod snapshots;
pub mod templates;

use std::future::Future;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cubicle_control::Controller;
use http::StatusCode;

use crate::error::ApiError;

/// Largest REST request body.
pub const MAX_BODY: usize = 1 << 20;

/// What every handler can reach.
#[derive(Debug)]
pub struct AppState {
    /// The control plane.
    pub controller: Arc<Controller>,
    /// Sandbox host names are `{port}-{id}.{domain}`; also returned as `domain`.
    pub domain: Option<String>,
    /// Sandbox traffic.
    pub proxy: proxy::Proxy,
}

impl AppState {
    /// State for a controller and an optional sandbox domain.
    pub fn new(controller: Arc<Controller>, domain: Option<String>) -> Arc<Self> {
        Arc::new(AppState {
            proxy: proxy::Proxy::new(controller.clone()),
            controller,
            domain,
        })
    }
}

/// The whole HTTP application.
pub fn app(state: Arc<AppState>) -> Router {
    use sandboxes as s;
    Router::new()
        .route("/health", get(health))
        .route("/sandboxes", post(s::create_v1).get(s::list_v1))
        .route("/v2/sandboxes", post(s::create_v2).get(s::list_v2))
        .route("/sandboxes/{id}", get(s::get).delete(s::kill))
        .route("/sandboxes/{id}/timeout", post(s::set_timeout))
        .route("/sandboxes/{id}/refreshes", post(s::refresh))
        .route("/sandboxes/{id}/connect", post(s::connect))
        .route("/v2/sandboxes/{id}/connect", post(s::connect))
        .route("/sandboxes/{id}/resume", post(s::resume))
        .route("/sandboxes/{id}/metrics", get(s::metrics))
        .route("/sandboxes/{id}/pause", post(s::pause))
        .route("/sandboxes/{id}/snapshots", post(snapshots::create))
        .route("/sandboxes/{id}/fork", post(snapshots::fork))
        .route("/sandboxes/{id}/clone", post(snapshots::fork))
        .route("/sandboxes/{id}/rollback", post(snapshots::rollback))
        .route("/snapshots", get(snapshots::list))
        .route(
            "/templates",
            get(templates::list).post(templates::e2b_build),
        )
        .route(
            "/templates/{id}",
            get(templates::get)
                .delete(templates::delete)
                .post(templates::e2b_build),
        )
        .route("/templates/aliases/{alias}", get(templates::alias))
        .route("/templates/images", post(templates::build_image))
        .route("/templates/{id}/rebuild", post(templates::rebuild))
        .route(
            "/templates/{id}/builds/{build}/status",
            get(templates::build_status),
        )
        .route("/templates/{id}/builds/{build}", post(templates::e2b_build))
        .route("/v3/templates", post(templates::e2b_build))
        .route("/v2/templates", post(templates::e2b_build))
        .route("/v2/templates/{*rest}", post(templates::e2b_build))
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), dispatch))
        .with_state(state)
}

/// Sends sandbox traffic to the proxy before any REST routing happens; REST requests
/// are read whole first, so that no answer leaves a body half read (see [`body`]).
async fn dispatch(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let target = proxy::target(req.headers(), state.domain.as_deref());
    if let Ok(Some(target)) = target {
        let (req, read) = body::Watched::request(req);
        let resp = state.proxy.forward(target, req).await;
        return read.close_if_unread(resp);
    }
    let req = match body::read_whole(req, MAX_BODY).await {
        Ok(req) => req,
        Err(resp) => return resp,
    };
    match target {
        Err(message) => ApiError::bad_request(message).into_response(),
        _ => next.run(req).await,
    }
}

/// `GET /health`: the daemon is up (no authentication).
async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok", "version": env!("CARGO_PKG_VERSION")}))
}

async fn no_route(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no such endpoint: {} {}", req.method(), req.uri().path()),
    )
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains open requests.
///
/// Accepted connections get `TCP_NODELAY`: streamed answers (command output, code
/// results) are written as many small chunks, and with Nagle's algorithm each chunk after
/// the first waits for the client's delayed ACK (~40 ms on Linux).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
    });
    axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown)
        .await
}
