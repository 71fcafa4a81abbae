//! The agent's HTTP/1.1 server: accepts connections on the unix socket, authenticates
//! requests and routes them to the services.

use std::io;
use std::path::Path;
use std::sync::Arc;

use cubicle_envd::connect::{Code, ConnectError};
use cubicle_runtime::ns::message::AgentIdentity;
use cubicle_runtime::ns::message::{AGENT_SOCKET_NAME, SANDBOX_RUN_DIR};
use cubicle_runtime::AgentConfig;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};

use crate::auth;
use crate::rpc::{self, Body};
use crate::users::{Accounts, User, UserError};
use crate::{files, filesystem, process, tunnel, watch};

/// Shared state of the agent.
#[derive(Debug)]
pub struct Agent {
    /// What the runtime configured.
    pub config: AgentConfig,
    /// The sandbox's account database.
    pub accounts: Accounts,
    /// Processes started through envd.
    pub processes: process::Processes,
    /// Polling watchers (`CreateWatcher` ...).
    pub watchers: watch::Watchers,
    /// Connections from the host, so a checkpoint can close them all first.
    pub host_connections: HostConnections,
    /// Id, access token and env vars: set from `config`, replaced after a restore.
    pub identity: SharedIdentity,
    /// The template's main service, if it has one.
    pub service: Arc<crate::service::Service>,
}

/// The agent's [`AgentIdentity`], shared with the code interpreter.
pub type SharedIdentity = Arc<std::sync::RwLock<AgentIdentity>>;

/// The connections the agent serves for the host (the daemon's proxy, the runtime).
///
/// A checkpoint cannot include them: each is one end of a socket pair whose other end is
/// a host process. Before the runtime freezes the sandbox it asks `POST
/// /_cubicle/quiesce`, which ends all of them but its own; their processes run on, and
/// their clients reconnect after the checkpoint.
#[derive(Debug, Default)]
pub struct HostConnections {
    next: std::sync::atomic::AtomicU64,
    open: std::sync::Mutex<std::collections::HashMap<u64, tokio::task::JoinHandle<()>>>,
}

impl HostConnections {
    /// A number for a new host connection, before its task exists.
    fn reserve(&self) -> u64 {
        self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    fn add(&self, id: u64, task: tokio::task::JoinHandle<()>) {
        self.open.lock().expect("host connections").insert(id, task);
    }

    fn remove(&self, id: u64) {
        self.open.lock().expect("host connections").remove(&id);
    }

    /// Ends every host connection but `keep` and returns once their sockets are closed;
    /// returns how many were ended.
    async fn close_all_but(&self, keep: u64) -> usize {
        let ended: Vec<tokio::task::JoinHandle<()>> = {
            let mut open = self.open.lock().expect("host connections");
            let ids: Vec<u64> = open.keys().copied().filter(|id| *id != keep).collect();
            ids.iter().filter_map(|id| open.remove(id)).collect()
        };
        let count = ended.len();
        for task in ended {
            task.abort();
            // Resolves once the task, and with it the connection's socket, is dropped.
            let _ = task.await;
        }
        count
    }
}

impl Agent {
    /// A fresh agent for `config`, with the sandbox's `/etc` as account database.
    pub fn new(config: AgentConfig) -> Self {
        Agent {
            identity: Arc::new(std::sync::RwLock::new(AgentIdentity::of(&config))),
            config,
            accounts: Accounts::default(),
            processes: process::Processes::default(),
            watchers: watch::Watchers::default(),
            host_connections: HostConnections::default(),
            service: Arc::default(),
        }
    }

    /// The envd access token requests must carry, if any.
    pub fn access_token(&self) -> Option<String> {
        self.identity.read().expect("identity").access_token.clone()
    }

    /// The sandbox's environment variables.
    pub fn env_vars(&self) -> std::collections::BTreeMap<String, String> {
        self.identity.read().expect("identity").env_vars.clone()
    }

    /// Resolves the request's user (`None`: the default user).
    pub fn user(&self, name: Option<&str>) -> Result<User, UserError> {
        self.accounts
            .user(name.unwrap_or(&self.config.default_user))
    }

    /// The user of an RPC. An unknown user is `unauthenticated`, as envd's Basic-auth
    /// check answers.
    pub fn rpc_user(&self, name: Option<&str>) -> Result<User, ConnectError> {
        self.user(name).map_err(|e| match e {
            UserError::Unknown(name) => {
                ConnectError::new(Code::Unauthenticated, format!("invalid username: '{name}'"))
            }
            e @ (UserError::Read { .. } | UserError::UnknownGroup(_)) => {
                ConnectError::new(Code::Internal, e.to_string())
            }
        })
    }
}

/// Binds the agent socket in the sandbox, reports readiness to the runtime and serves.
pub async fn run(config: AgentConfig) -> io::Result<()> {
    let path = Path::new(SANDBOX_RUN_DIR).join(AGENT_SOCKET_NAME);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    let agent = Arc::new(Agent::new(config));
    agent.processes.reaper().spawn()?;
    if agent.config.code_interpreter {
        if let Err(message) = start_interpreter(&agent).await {
            tracing::error!(%message, "code interpreter failed to start");
            cubicle_runtime::ns::init::report_failed("start the code interpreter", &message)?;
            return Err(io::Error::other(message));
        }
    }
    cubicle_runtime::ns::init::report_ready()?;
    tracing::info!(sandbox = %agent.config.sandbox_id, "agent ready");
    if let Some(service) = agent.config.service.clone() {
        crate::service::start(&agent, &service);
    }
    serve(listener, agent).await
}

/// Starts the code interpreter (warm: the sandbox is reported ready only once its
/// default Python context is). A template whose code interpreter cannot start fails the
/// create with the reason.
async fn start_interpreter(agent: &Arc<Agent>) -> Result<(), String> {
    let user = agent
        .user(None)
        .map_err(|e| format!("no default user: {e}"))?;
    let env = crate::interpreter::kernel::KernelEnv {
        user,
        identity: agent.identity.clone(),
        reaper: agent.processes.reaper().clone(),
    };
    let port = crate::interpreter::PORT;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .map_err(|e| format!("listen on port {port}: {e}"))?;
    let started = std::time::Instant::now();
    let warm = agent.config.warm_python;
    let interpreter = crate::interpreter::Interpreter::start(env, warm)
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(took = ?started.elapsed(), warm = warm.is_some(), "code interpreter ready");
    tokio::spawn(async move {
        if let Err(e) = crate::interpreter::serve(listener, interpreter).await {
            tracing::error!(error = %e, "code interpreter server stopped");
        }
    });
    Ok(())
}

/// Serves connections from `listener` until it fails.
pub async fn serve(listener: UnixListener, agent: Arc<Agent>) -> io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        // A peer outside our pid namespace (the host's runtime or daemon) shows pid 0.
        let from_host = stream
            .peer_cred()
            .map(|c| c.pid() == Some(0))
            .unwrap_or(false);
        let conn_agent = agent.clone();
        if from_host {
            spawn_host_task(&agent, move |id| async move {
                if let Err(e) = serve_connection(stream, conn_agent, true, Some(id)).await {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
            });
        } else {
            tokio::spawn(async move {
                if let Err(e) = serve_connection(stream, conn_agent, false, None).await {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
            });
        }
    }
}

/// Spawns a task that holds a connection from the host (a served connection, a
/// tunnel), registered in [`HostConnections`] while it runs so a checkpoint can end it.
pub(crate) fn spawn_host_task<F, Fut>(agent: &Arc<Agent>, task: F)
where
    F: FnOnce(u64) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let connections = &agent.host_connections;
    let id = connections.reserve();
    let owner = agent.clone();
    let fut = task(id);
    let handle = tokio::spawn(async move {
        fut.await;
        owner.host_connections.remove(id);
    });
    connections.add(id, handle);
    // A task that ended before it was added removed nothing: drop its entry again.
    let finished = connections
        .open
        .lock()
        .expect("host connections")
        .get(&id)
        .is_some_and(|t| t.is_finished());
    if finished {
        connections.remove(id);
    }
}

async fn serve_connection(
    stream: UnixStream,
    agent: Arc<Agent>,
    from_host: bool,
    conn_id: Option<u64>,
) -> Result<(), hyper::Error> {
    let service = service_fn(move |req: Request<Incoming>| {
        let agent = agent.clone();
        async move {
            if from_host && req.method() == Method::POST && req.uri().path() == QUIESCE_PATH {
                let ended = match conn_id {
                    Some(id) => agent.host_connections.close_all_but(id).await,
                    None => 0,
                };
                tracing::info!(ended, "host connections closed for a checkpoint");
                let mut resp = rpc::empty(StatusCode::NO_CONTENT);
                resp.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
                return Ok::<_, std::convert::Infallible>(resp);
            }
            if from_host && req.method() == Method::POST && req.uri().path() == IDENTITY_PATH {
                return Ok(set_identity(&agent, req).await);
            }
            if from_host && req.method() == Method::GET && req.uri().path() == SERVICE_PATH {
                return Ok(rpc::json(StatusCode::OK, &agent.service.status()));
            }
            let has_body = has_body(&req);
            let mut resp = route(&agent, from_host, req).await;
            close_after_refusal(has_body, &mut resp);
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades()
        .await
}

use cubicle_runtime::ns::checkpoint::{IDENTITY_PATH, QUIESCE_PATH};
use cubicle_runtime::ns::message::SERVICE_PATH;

/// Takes over the identity a restored sandbox is given (host only).
async fn set_identity(agent: &Agent, req: Request<Incoming>) -> Response<Body> {
    let body = match rpc::read_body(req.into_body(), 1 << 20).await {
        Ok(b) => b,
        Err(e) => return rpc::http_error(StatusCode::BAD_REQUEST, e.message),
    };
    match serde_json::from_slice::<AgentIdentity>(&body) {
        Ok(identity) => {
            tracing::info!(sandbox = %identity.sandbox_id, "identity set after a restore");
            *agent.identity.write().expect("identity") = identity;
            rpc::empty(StatusCode::NO_CONTENT)
        }
        Err(e) => rpc::http_error(StatusCode::BAD_REQUEST, format!("identity: {e}")),
    }
}

fn has_body(req: &Request<Incoming>) -> bool {
    use hyper::body::Body as _;
    !req.body().is_end_stream()
}

/// An error answer may leave the request body unread, and hyper then closes the
/// connection after the answer. Saying so in the answer keeps the daemon's proxy from
/// pooling the connection and sending its next request into the closing socket.
fn close_after_refusal(has_body: bool, resp: &mut Response<Body>) {
    let status = resp.status();
    if has_body && (status.is_client_error() || status.is_server_error()) {
        resp.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
    }
}

/// Dispatches one request.
pub async fn route(agent: &Arc<Agent>, from_host: bool, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    tracing::debug!(%method, %path, "request");
    if method == Method::CONNECT {
        return if from_host {
            tunnel::connect(agent, req).await
        } else {
            rpc::http_error(StatusCode::FORBIDDEN, "tunnels are for the host only")
        };
    }
    if method == Method::GET && path == "/health" {
        return rpc::empty(StatusCode::NO_CONTENT);
    }
    // /files may authenticate with a URL signature instead of the token header.
    if path == "/files" {
        return match method {
            Method::GET => files::download(agent, req).await,
            Method::POST => files::upload(agent, req).await,
            _ => rpc::http_error(StatusCode::METHOD_NOT_ALLOWED, "use GET or POST on /files"),
        };
    }
    let token = agent.access_token();
    if !auth::token_ok(token.as_deref(), req.headers()) {
        let err = ConnectError::new(Code::Unauthenticated, auth::AuthError::BadToken.to_string());
        return if path.starts_with("/process.") || path.starts_with("/filesystem.") {
            rpc::unary_err(&err)
        } else {
            rpc::http_error(StatusCode::UNAUTHORIZED, err.message)
        };
    }
    match (method, path.as_str()) {
        (Method::GET, "/envs") => rpc::json(StatusCode::OK, &agent.env_vars()),
        (Method::POST, p) if p.starts_with("/process.Process/") => {
            process::rpc(agent, &p["/process.Process/".len()..], req).await
        }
        (Method::POST, p) if p.starts_with("/filesystem.Filesystem/") => {
            filesystem::rpc(agent, &p["/filesystem.Filesystem/".len()..], req).await
        }
        (_, p) => rpc::http_error(StatusCode::NOT_FOUND, format!("no route for {p}")),
    }
}

/// The error for an RPC method the service does not have.
pub fn unknown_method(service: &str, method: &str) -> ConnectError {
    ConnectError::new(
        Code::Unimplemented,
        format!("{service} has no method {method}"),
    )
}
