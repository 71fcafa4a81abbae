//! E2B's code interpreter, served by the agent on `127.0.0.1:49999` inside sandboxes
//! whose template enables it (`docs/interpreter.md`):
//!
//! - `POST /execute` runs code in a context and streams NDJSON lines as they happen;
//! - `GET/POST /contexts`, `DELETE /contexts/{id}`, `POST /contexts/{id}/restart`.
//!
//! A context is a kernel process. Python kernels are forked from a zygote that imported
//! the scientific stack once, so a context (or a restart) costs milliseconds and shares
//! the imported modules' memory. Executions in one context run one at a time; different
//! contexts run in parallel. When a client goes away mid-execution the kernel is
//! interrupted (SIGINT), and killed and replaced if it does not stop within a grace
//! period; a kernel that dies is reported in-band and replaced on the next execution.

pub mod kernel;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::rpc::{self, Body};
use cubicle_runtime::ns::message::WarmPython;
use kernel::{Kernel, KernelEnv, KernelError, Language, Zygote};

/// The port E2B's SDK sends code-interpreter traffic to.
pub const PORT: u16 = 49999;
/// How long an interrupted kernel may take to finish before it is replaced.
const INTERRUPT_GRACE: Duration = Duration::from_secs(3);
/// Largest `/execute` or `/contexts` body.
const MAX_BODY: usize = 32 << 20;

/// One context: a language, a working directory, and (once started) its kernel.
#[derive(Debug)]
pub struct Context {
    /// Its id.
    pub id: String,
    /// Its language.
    pub language: Language,
    /// Its working directory.
    pub cwd: PathBuf,
    /// The kernel; `None` until started or after it died. Held for a whole execution.
    kernel: tokio::sync::Mutex<Option<Kernel>>,
}

impl Context {
    fn describe(&self) -> Value {
        json!({"id": self.id, "language": self.language.as_str(), "cwd": self.cwd})
    }
}

/// The code interpreter of one sandbox.
#[derive(Debug)]
pub struct Interpreter {
    env: KernelEnv,
    zygote: tokio::sync::Mutex<Option<Zygote>>,
    contexts: Mutex<BTreeMap<String, Arc<Context>>>,
    defaults: Mutex<HashMap<Language, String>>,
    executions: AtomicU64,
}

impl Interpreter {
    /// Starts the Python zygote and the default Python context, so that the first
    /// execution is fast, and registers the default JavaScript context (started on first
    /// use). With `warm` (the sandbox was forked by a template zygote) both Python
    /// processes already exist and are adopted instead; if that fails they are started.
    pub async fn start(env: KernelEnv, warm: Option<WarmPython>) -> Result<Arc<Self>, KernelError> {
        let (zygote, kernel) = match warm {
            Some(warm) => {
                let (zygote, kernel) = tokio::join!(
                    Zygote::adopt(warm.zygote_fd, &env),
                    Kernel::adopt(warm.kernel_fd, &env)
                );
                (adopted(zygote), adopted(kernel))
            }
            None => (None, None),
        };
        let interpreter = Arc::new(Interpreter {
            env,
            zygote: tokio::sync::Mutex::new(zygote),
            contexts: Mutex::new(BTreeMap::new()),
            defaults: Mutex::new(HashMap::new()),
            executions: AtomicU64::new(0),
        });
        let home = interpreter.env.user.home.clone();
        let python = interpreter.new_context(Language::Python, home.clone());
        {
            let mut slot = python.kernel.lock().await;
            *slot = Some(match kernel {
                Some(k) => k,
                None => interpreter.start_kernel(&python).await?,
            });
        }
        interpreter.set_default(&python);
        let js = interpreter.new_context(Language::JavaScript, home);
        interpreter.set_default(&js);
        Ok(interpreter)
    }

    fn new_context(&self, language: Language, cwd: PathBuf) -> Arc<Context> {
        let ctx = Arc::new(Context {
            id: random_id(),
            language,
            cwd,
            kernel: tokio::sync::Mutex::new(None),
        });
        self.contexts
            .lock()
            .expect("contexts")
            .insert(ctx.id.clone(), ctx.clone());
        ctx
    }

    fn set_default(&self, ctx: &Arc<Context>) {
        self.defaults
            .lock()
            .expect("defaults")
            .insert(ctx.language, ctx.id.clone());
    }

    fn context(&self, id: &str) -> Option<Arc<Context>> {
        self.contexts.lock().expect("contexts").get(id).cloned()
    }

    /// The default context of a language, created on first use.
    fn default_context(&self, language: Language) -> Arc<Context> {
        let existing = self
            .defaults
            .lock()
            .expect("defaults")
            .get(&language)
            .cloned()
            .and_then(|id| self.context(&id));
        existing.unwrap_or_else(|| {
            let ctx = self.new_context(language, self.env.user.home.clone());
            self.set_default(&ctx);
            ctx
        })
    }

    /// A fresh kernel for `ctx`: forked from the zygote for Python, spawned otherwise.
    async fn start_kernel(&self, ctx: &Context) -> Result<Kernel, KernelError> {
        if ctx.language != Language::Python {
            return Kernel::spawn(ctx.language, &self.env, &ctx.cwd).await;
        }
        let mut zygote = self.zygote.lock().await;
        if !zygote.as_mut().is_some_and(Zygote::is_alive) {
            *zygote = Some(Zygote::start(&self.env).await?);
        }
        zygote
            .as_mut()
            .expect("zygote just ensured")
            .fork(&self.env, &ctx.cwd)
            .await
    }

    /// Runs `code` in `ctx`, streaming NDJSON lines into `out`.
    async fn execute(
        &self,
        ctx: Arc<Context>,
        code: String,
        env: BTreeMap<String, String>,
        out: LineSink,
    ) {
        let mut guard = ctx.kernel.lock().await;
        let alive = guard.as_mut().is_some_and(|k| {
            matches!(
                k.exit.try_recv(),
                Err(tokio::sync::oneshot::error::TryRecvError::Empty)
            )
        });
        if !alive {
            *guard = None;
            match self.start_kernel(&ctx).await {
                Ok(k) => *guard = Some(k),
                Err(e) => {
                    out.send(&json!({"type": "error", "name": "KernelStartError", "value": e.to_string(), "traceback": ""})).await;
                    out.send(&json!({"type": "end_of_execution"})).await;
                    return;
                }
            }
        }
        let kernel = guard.as_mut().expect("kernel ensured");
        let id = format!("x{}", self.executions.fetch_add(1, Ordering::Relaxed));
        discard_pending_output(kernel);
        if let Err(e) = kernel
            .send(&json!({"op": "execute", "id": id, "code": code, "env": env}))
            .await
        {
            *guard = None;
            report_death(&out, &e.to_string()).await;
            return;
        }
        match run(kernel, &id, &out).await {
            Outcome::Finished => {}
            Outcome::Died(why) => {
                *guard = None;
                report_death(&out, &why).await;
            }
            Outcome::Abandoned => {
                // The client left and the kernel did not stop: replace it.
                *guard = None;
            }
        }
    }

    /// `GET /contexts`.
    fn list(&self) -> Value {
        Value::Array(
            self.contexts
                .lock()
                .expect("contexts")
                .values()
                .map(|c| c.describe())
                .collect(),
        )
    }

    /// `POST /contexts`: a new context with its kernel started.
    async fn create(&self, language: Language, cwd: PathBuf) -> Result<Arc<Context>, KernelError> {
        let ctx = self.new_context(language, cwd);
        let started = self.start_kernel(&ctx).await;
        match started {
            Ok(k) => {
                *ctx.kernel.lock().await = Some(k);
                Ok(ctx)
            }
            Err(e) => {
                self.contexts.lock().expect("contexts").remove(&ctx.id);
                Err(e)
            }
        }
    }

    /// `POST /contexts/{id}/restart`: same id, fresh kernel.
    async fn restart(&self, ctx: &Context) -> Result<(), KernelError> {
        let mut kernel = ctx.kernel.lock().await;
        *kernel = None;
        *kernel = Some(self.start_kernel(ctx).await?);
        Ok(())
    }

    /// `DELETE /contexts/{id}`.
    fn remove(&self, id: &str) -> bool {
        let removed = self.contexts.lock().expect("contexts").remove(id);
        self.defaults
            .lock()
            .expect("defaults")
            .retain(|_, v| v != id);
        // Dropping the last reference to the context drops (kills) its kernel.
        removed.is_some()
    }
}

/// How an execution ended.
enum Outcome {
    Finished,
    Died(String),
    Abandoned,
}

/// Forwards one execution's events and output until `end_of_execution`.
async fn run(kernel: &mut Kernel, id: &str, out: &LineSink) -> Outcome {
    let mut stdout = Utf8Stream::default();
    let mut stderr = Utf8Stream::default();
    let mut out_buf = vec![0u8; 32 * 1024];
    let mut err_buf = vec![0u8; 32 * 1024];
    let mut out_pipe = kernel.stdout.take();
    let mut err_pipe = kernel.stderr.take();
    let mut interrupted_at: Option<tokio::time::Instant> = None;
    let pid = kernel.pid;
    let outcome = loop {
        let deadline = interrupted_at.map(|t| t + INTERRUPT_GRACE);
        tokio::select! {
            event = kernel::read_event(&mut kernel.events) => match event {
                Ok(Some(mut v)) => {
                    if v.get("id").and_then(Value::as_str) != Some(id) {
                        continue;
                    }
                    let end = v["type"] == "end_of_execution";
                    if end {
                        // Output written before the end belongs to this execution.
                        flush_pipe(&mut out_pipe, &mut stdout, "stdout", out).await;
                        flush_pipe(&mut err_pipe, &mut stderr, "stderr", out).await;
                    }
                    if let Some(obj) = v.as_object_mut() {
                        obj.remove("id");
                    }
                    out.send(&v).await;
                    if end {
                        break Outcome::Finished;
                    }
                }
                Ok(None) => break Outcome::Died("the kernel exited".into()),
                Err(e) => break Outcome::Died(e.to_string()),
            },
            n = read_some(&mut out_pipe, &mut out_buf) => {
                if let Some(text) = stdout.push(&out_buf[..n]) {
                    out.send(&stream_event("stdout", text)).await;
                }
            }
            n = read_some(&mut err_pipe, &mut err_buf) => {
                if let Some(text) = stderr.push(&err_buf[..n]) {
                    out.send(&stream_event("stderr", text)).await;
                }
            }
            status = &mut kernel.exit => {
                break Outcome::Died(match status {
                    Ok(crate::reaper::Exit::Code(c)) => format!("the kernel exited with status {c}"),
                    Ok(crate::reaper::Exit::Signal(s)) => format!("the kernel was killed by signal {s}"),
                    Err(_) => "the kernel exited".into(),
                });
            }
            _ = out.closed(), if interrupted_at.is_none() => {
                // SAFETY: kill(2) with integer arguments.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGINT) };
                interrupted_at = Some(tokio::time::Instant::now());
            }
            _ = sleep_until(deadline), if deadline.is_some() => break Outcome::Abandoned,
        }
    };
    kernel.stdout = out_pipe;
    kernel.stderr = err_pipe;
    outcome
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Reads some bytes from an optional pipe; pending forever on `None` or at EOF (a closed
/// pipe is then dropped).
async fn read_some(pipe: &mut Option<tokio::net::unix::pipe::Receiver>, buf: &mut [u8]) -> usize {
    let Some(p) = pipe.as_mut() else {
        return std::future::pending().await;
    };
    match p.read(buf).await {
        Ok(n) if n > 0 => n,
        _ => {
            *pipe = None;
            std::future::pending().await
        }
    }
}

/// Forwards what can be read from a pipe right now.
async fn flush_pipe(
    pipe: &mut Option<tokio::net::unix::pipe::Receiver>,
    decoder: &mut Utf8Stream,
    kind: &str,
    out: &LineSink,
) {
    let Some(p) = pipe.as_ref() else { return };
    let mut buf = vec![0u8; 32 * 1024];
    while let Ok(n) = p.try_read(&mut buf) {
        if n == 0 {
            break;
        }
        if let Some(text) = decoder.push(&buf[..n]) {
            out.send(&stream_event(kind, text)).await;
        }
    }
    if let Some(text) = decoder.finish() {
        out.send(&stream_event(kind, text)).await;
    }
}

/// Output left in a kernel's pipes from between executions does not belong to the next.
fn discard_pending_output(kernel: &Kernel) {
    let mut buf = [0u8; 8192];
    for pipe in [&kernel.stdout, &kernel.stderr].into_iter().flatten() {
        while matches!(pipe.try_read(&mut buf), Ok(n) if n > 0) {}
    }
}

async fn report_death(out: &LineSink, why: &str) {
    out.send(&json!({
        "type": "error",
        "name": "UnexpectedEndOfExecution",
        "value": format!("{why}; the next execution starts a fresh kernel"),
        "traceback": "",
    }))
    .await;
    out.send(&json!({"type": "unexpected_end_of_execution"}))
        .await;
}

fn stream_event(kind: &str, text: String) -> Value {
    json!({
        "type": kind,
        "text": text,
        "timestamp": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
    })
}

/// Incremental UTF-8 decoding of a byte stream (a chunk may end inside a character).
#[derive(Debug, Default)]
struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// Adds bytes; returns the text that is complete so far.
    fn push(&mut self, bytes: &[u8]) -> Option<String> {
        self.pending.extend_from_slice(bytes);
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            // Invalid bytes (not just a cut-off character): replace them.
            Err(_) => self.pending.len(),
        };
        let rest = self.pending.split_off(valid);
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending = rest;
        (!text.is_empty()).then_some(text)
    }

    /// Whatever is left (a cut-off character becomes U+FFFD).
    fn finish(&mut self) -> Option<String> {
        let text = String::from_utf8_lossy(&std::mem::take(&mut self.pending)).into_owned();
        (!text.is_empty()).then_some(text)
    }
}

/// The sending half of a streamed NDJSON response.
#[derive(Debug, Clone)]
struct LineSink {
    tx: mpsc::Sender<Bytes>,
}

impl LineSink {
    fn new() -> (LineSink, Body) {
        let (tx, rx) = mpsc::channel::<Bytes>(64);
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<_, std::io::Error>(Frame::data(b)), rx))
        });
        (
            LineSink { tx },
            StreamBody::new(stream.boxed()).boxed_unsync(),
        )
    }

    /// Sends one line; silently dropped when the client has gone.
    async fn send(&self, value: &Value) {
        let mut line = serde_json::to_vec(value).expect("JSON values serialise");
        line.push(b'\n');
        let _ = self.tx.send(Bytes::from(line)).await;
    }

    async fn closed(&self) {
        self.tx.closed().await
    }
}

/// A random UUID (v4) from /dev/urandom, read afresh at each call: a userspace
/// generator's state would be restored with a checkpoint, and every clone of it would
/// then hand out the same ids.
fn random_id() -> String {
    let mut b = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    // UUID v4 layout.
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    cubicle_core::uuid_shaped(&hex)
}

/// A warm process that could not be adopted is logged and replaced by a fresh one.
fn adopted<T>(result: Result<T, KernelError>) -> Option<T> {
    result
        .map_err(|e| tracing::warn!(error = %e, "starting a fresh one instead"))
        .ok()
}

// --------------------------------------------------------------------------------------
// HTTP (port 49999)
// --------------------------------------------------------------------------------------

/// Serves the code interpreter on `listener` (`127.0.0.1:`[`PORT`]) until it fails.
pub async fn serve(listener: TcpListener, interpreter: Arc<Interpreter>) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let interpreter = interpreter.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let interpreter = interpreter.clone();
                async move { Ok::<_, std::convert::Infallible>(route(&interpreter, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

/// E2B's code interpreter answers errors as plain text.
fn text(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    rpc::full(status, "text/plain; charset=utf-8", message.into())
}

/// A request refused before anything ran: answered as plain text with its status.
#[derive(Debug)]
struct Rejection {
    status: StatusCode,
    message: String,
}

impl Rejection {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Rejection {
            status,
            message: message.into(),
        }
    }

    fn into_response(self) -> Response<Body> {
        text(self.status, self.message)
    }
}

#[derive(Debug, Deserialize)]
struct ExecuteRequest {
    code: String,
    #[serde(default)]
    context_id: Option<String>,
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    env_vars: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
struct CreateContextRequest {
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    cwd: Option<String>,
}

/// The request's JSON body; an empty body is `when_empty` if that is given.
async fn json_body<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
    when_empty: Option<T>,
) -> Result<T, Rejection> {
    let bytes = rpc::read_body(req.into_body(), MAX_BODY)
        .await
        .map_err(|e| Rejection::new(StatusCode::PAYLOAD_TOO_LARGE, e.message))?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        if let Some(value) = when_empty {
            return Ok(value);
        }
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| Rejection::new(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))
}

fn language(name: &str) -> Result<Language, Rejection> {
    Language::parse(name).ok_or_else(|| {
        Rejection::new(
            StatusCode::BAD_REQUEST,
            format!(
                "language '{name}' is not supported; supported are python, javascript and bash"
            ),
        )
    })
}

async fn route(interpreter: &Arc<Interpreter>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let answer = match (method, segments.as_slice()) {
        (Method::GET, ["health"]) => Ok(text(StatusCode::OK, "ok")),
        (Method::POST, ["execute"]) => {
            let token = interpreter
                .env
                .identity
                .read()
                .expect("identity")
                .access_token
                .clone();
            if !crate::auth::token_ok(token.as_deref(), req.headers()) {
                return text(StatusCode::UNAUTHORIZED, "missing or invalid access token");
            }
            execute(interpreter, req).await
        }
        (Method::GET, ["contexts"]) => Ok(rpc::json(StatusCode::OK, &interpreter.list())),
        (Method::POST, ["contexts"]) => create_context(interpreter, req).await,
        (Method::DELETE, ["contexts", id]) => {
            if interpreter.remove(id) {
                Ok(rpc::empty(StatusCode::OK))
            } else {
                Err(not_found(id))
            }
        }
        (Method::POST, ["contexts", id, "restart"]) => match interpreter.context(id) {
            Some(ctx) => match interpreter.restart(&ctx).await {
                Ok(()) => Ok(rpc::empty(StatusCode::OK)),
                Err(e) => Err(Rejection::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    e.to_string(),
                )),
            },
            None => Err(not_found(id)),
        },
        (m, _) => Err(Rejection::new(
            StatusCode::NOT_FOUND,
            format!("no route for {m} {path}"),
        )),
    };
    answer.unwrap_or_else(Rejection::into_response)
}

fn not_found(context_id: &str) -> Rejection {
    Rejection::new(
        StatusCode::NOT_FOUND,
        format!("context {context_id} not found"),
    )
}

async fn create_context(
    interpreter: &Arc<Interpreter>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Rejection> {
    let body: CreateContextRequest = json_body(req, Some(CreateContextRequest::default())).await?;
    let lang = language(body.language.as_deref().unwrap_or("python"))?;
    let cwd = resolve_cwd(body.cwd.as_deref(), &interpreter.env.user.home)?;
    match interpreter.create(lang, cwd).await {
        Ok(ctx) => Ok(rpc::json(StatusCode::OK, &ctx.describe())),
        Err(e) => Err(Rejection::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            e.to_string(),
        )),
    }
}

/// A context's working directory: absolute, or relative to the user's home; must exist.
fn resolve_cwd(cwd: Option<&str>, home: &Path) -> Result<PathBuf, Rejection> {
    let dir = match cwd {
        None | Some("") => home.to_owned(),
        Some(c) => crate::paths::resolve(c, home)
            .map_err(|e| Rejection::new(StatusCode::BAD_REQUEST, e.to_string()))?,
    };
    if !dir.is_dir() {
        return Err(Rejection::new(
            StatusCode::BAD_REQUEST,
            format!("cwd '{}' is not an existing directory", dir.display()),
        ));
    }
    Ok(dir)
}

async fn execute(
    interpreter: &Arc<Interpreter>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Rejection> {
    let body: ExecuteRequest = json_body(req, None).await?;
    let ctx = match (body.context_id.as_deref(), body.language.as_deref()) {
        (Some(_), Some(_)) => {
            return Err(Rejection::new(
                StatusCode::BAD_REQUEST,
                "context_id and language are mutually exclusive",
            ))
        }
        (Some(id), None) => interpreter.context(id).ok_or_else(|| not_found(id))?,
        (None, Some(lang)) => interpreter.default_context(language(lang)?),
        (None, None) => interpreter.default_context(Language::Python),
    };
    let (out, body_stream) = LineSink::new();
    let interpreter = interpreter.clone();
    let env = body.env_vars.unwrap_or_default();
    tokio::spawn(async move { interpreter.execute(ctx, body.code, env, out).await });
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(body_stream)
        .expect("valid response"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_stream_keeps_cut_characters_for_later() {
        let mut s = Utf8Stream::default();
        let snow = "☃".as_bytes();
        assert_eq!(s.push(&[b'a', snow[0]]).as_deref(), Some("a"));
        assert_eq!(s.push(&snow[1..]).as_deref(), Some("☃"));
        assert_eq!(s.push(&[0xff, b'b']).as_deref(), Some("\u{fffd}b"));
        assert_eq!(s.push(&[snow[0]]), None);
        assert_eq!(s.finish().as_deref(), Some("\u{fffd}"));
    }

    #[test]
    fn ids_look_like_uuids() {
        let id = random_id();
        assert_eq!(id.len(), 36);
        assert_eq!(id.as_bytes()[14], b'4');
        assert_ne!(id, random_id());
    }
}
