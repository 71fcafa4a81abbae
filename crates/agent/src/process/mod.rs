//! `process.Process`: starting commands, streaming their output, input, signals, PTYs.
//!
//! Each started process gets a supervisor task that reads its output, fans every event
//! out to the streams attached to it (the `Start` stream and any `Connect` streams), and
//! sends the `end` event once the process has been reaped and its output drained. After
//! a signal death it stops waiting for EOF: grandchildren may hold the pipes open.
//! Subscribers get events through bounded channels, so a slow reader slows the process
//! down (pipe back-pressure) rather than losing output.

mod pty;
pub(crate) mod spawn;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cubicle_envd::connect::{Code, ConnectError};
use cubicle_envd::proto::{
    CloseStdinRequest, ConnectRequest, DataEvent, Empty, EndEvent, ListResponse, ProcessConfig,
    ProcessEvent, ProcessInfo, ProcessInput, ProcessSelector, ProcessStreamMessage,
    SendInputRequest, SendSignalRequest, Signal, StartRequest, StreamInputRequest, UpdateRequest,
};
use http::{Request, Response};
use hyper::body::Incoming;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::mpsc;

use crate::auth;
use crate::reaper::{Exit, Reaper};
use crate::rpc::{self, Body, StreamRequest, StreamSender};
use crate::server::{unknown_method, Agent};
use pty::PtyMaster;

/// Size of one output read (one `data` event at most).
const READ_CHUNK: usize = 32 * 1024;
/// Events buffered per attached stream before the process is slowed down.
const SUBSCRIBER_BUFFER: usize = 64;

/// The processes started through envd that have not ended yet.
#[derive(Debug, Default)]
pub struct Processes {
    table: Arc<Mutex<Table>>,
    reaper: Arc<Reaper>,
}

type Table = HashMap<u32, Arc<Proc>>;

#[derive(Debug)]
enum Input {
    None,
    Pipe(pipe::Sender),
    Pty(Arc<PtyMaster>),
}

#[derive(Debug)]
struct Proc {
    pid: u32,
    config: ProcessConfig,
    tag: Option<String>,
    input: tokio::sync::Mutex<Input>,
    pty: Option<Arc<PtyMaster>>,
    subscribers: Mutex<Vec<mpsc::Sender<ProcessEvent>>>,
}

impl Proc {
    /// Sends an event to every attached stream, dropping streams whose client is gone.
    async fn broadcast(&self, event: &ProcessEvent) {
        let subscribers = self.subscribers.lock().expect("subscribers lock").clone();
        for s in subscribers {
            let _ = s.send(event.clone()).await;
        }
        self.subscribers
            .lock()
            .expect("subscribers lock")
            .retain(|s| !s.is_closed());
    }

    fn signal_group(&self, sig: libc::c_int) {
        // The process is a session (and group) leader: signal everything it started.
        // SAFETY: kill(2) with integer arguments.
        unsafe {
            if libc::kill(-(self.pid as libc::pid_t), sig) != 0 {
                libc::kill(self.pid as libc::pid_t, sig);
            }
        }
    }
}

impl Processes {
    /// The reaper that delivers exit statuses (started by the server).
    pub fn reaper(&self) -> &Arc<Reaper> {
        &self.reaper
    }

    fn find(&self, selector: &ProcessSelector) -> Result<Arc<Proc>, ConnectError> {
        let table = self.table.lock().expect("process table lock");
        let found = match selector {
            ProcessSelector::Pid(pid) => table.get(pid).cloned(),
            ProcessSelector::Tag(tag) => table
                .values()
                .find(|p| p.tag.as_deref() == Some(tag.as_str()))
                .cloned(),
        };
        found.ok_or_else(|| {
            let what = match selector {
                ProcessSelector::Pid(pid) => format!("process with pid {pid}"),
                ProcessSelector::Tag(tag) => format!("process with tag '{tag}'"),
            };
            ConnectError::new(Code::NotFound, format!("{what} not found"))
        })
    }

    /// Starts a process whose events go to `subscriber` from the very first byte.
    fn start(
        &self,
        agent: &Agent,
        user: Option<&str>,
        request: StartRequest,
        timeout: Option<Duration>,
        subscriber: mpsc::Sender<ProcessEvent>,
    ) -> Result<u32, ConnectError> {
        if request.process.cmd.is_empty() {
            return Err(ConnectError::new(
                Code::InvalidArgument,
                "process.cmd is empty",
            ));
        }
        let user = agent.rpc_user(user)?;
        let env = spawn::environment(&user, &agent.env_vars(), &request.process.envs);
        let cwd = spawn::working_dir(request.process.cwd.as_deref(), &user)?;
        let with_stdin = request.stdin.unwrap_or(true);
        let pty_size = request.pty.map(|p| p.size);
        let (child, io) = spawn::spawn(&request.process, &user, &env, &cwd, pty_size, with_stdin)?;
        let pid = child.id();
        // Registration happens before any await, so the exit cannot be missed.
        let exit = self.reaper.watch(pid as i32);
        let (input, pty, output) = match io {
            spawn::ChildIo::Pipes {
                stdin,
                stdout,
                stderr,
            } => {
                let pipe_in = match stdin {
                    Some(fd) => Input::Pipe(pipe::Sender::from_owned_fd(fd).map_err(internal)?),
                    None => Input::None,
                };
                let out = Output::Pipes {
                    stdout: Some(pipe::Receiver::from_owned_fd(stdout).map_err(internal)?),
                    stderr: Some(pipe::Receiver::from_owned_fd(stderr).map_err(internal)?),
                };
                (pipe_in, None, out)
            }
            spawn::ChildIo::Pty { master } => {
                let master = Arc::new(PtyMaster::new(master).map_err(internal)?);
                (
                    Input::Pty(master.clone()),
                    Some(master.clone()),
                    Output::Pty(Some(master)),
                )
            }
        };
        let proc = Arc::new(Proc {
            pid,
            config: request.process,
            tag: request.tag,
            input: tokio::sync::Mutex::new(input),
            pty,
            subscribers: Mutex::new(vec![subscriber]),
        });
        self.table
            .lock()
            .expect("process table lock")
            .insert(pid, proc.clone());
        tokio::spawn(supervise(
            proc,
            output,
            exit,
            timeout,
            Arc::downgrade(&self.table),
        ));
        Ok(pid)
    }

    /// Attaches a new stream to a running process.
    fn subscribe(
        &self,
        selector: &ProcessSelector,
        subscriber: mpsc::Sender<ProcessEvent>,
    ) -> Result<u32, ConnectError> {
        let table = self.table.lock().expect("process table lock");
        let proc = match selector {
            ProcessSelector::Pid(pid) => table.get(pid),
            ProcessSelector::Tag(tag) => table.values().find(|p| p.tag.as_deref() == Some(tag)),
        }
        .ok_or_else(|| ConnectError::new(Code::NotFound, "process not found"))?;
        proc.subscribers
            .lock()
            .expect("subscribers lock")
            .push(subscriber);
        Ok(proc.pid)
    }

    fn list(&self) -> ListResponse {
        let table = self.table.lock().expect("process table lock");
        let mut processes: Vec<ProcessInfo> = table
            .values()
            .map(|p| ProcessInfo {
                config: p.config.clone(),
                pid: p.pid,
                tag: p.tag.clone(),
            })
            .collect();
        processes.sort_by_key(|p| p.pid);
        ListResponse { processes }
    }
}

/// The output side of a process.
#[derive(Debug)]
enum Output {
    Pipes {
        stdout: Option<pipe::Receiver>,
        stderr: Option<pipe::Receiver>,
    },
    Pty(Option<Arc<PtyMaster>>),
}

/// Which stream a chunk came from.
#[derive(Debug, Clone, Copy)]
enum Source {
    Stdout,
    Stderr,
    Pty,
}

impl Source {
    fn event(self, data: Vec<u8>) -> ProcessEvent {
        ProcessEvent::Data(match self {
            Source::Stdout => DataEvent::Stdout(data),
            Source::Stderr => DataEvent::Stderr(data),
            Source::Pty => DataEvent::Pty(data),
        })
    }
}

async fn read_pipe(p: &mut Option<pipe::Receiver>, buf: &mut [u8]) -> std::io::Result<usize> {
    match p {
        Some(p) => p.read(buf).await,
        None => std::future::pending().await,
    }
}

async fn read_pty(p: &Option<Arc<PtyMaster>>, buf: &mut [u8]) -> std::io::Result<usize> {
    match p {
        Some(p) => p.read(buf).await,
        None => std::future::pending().await,
    }
}

impl Output {
    fn is_done(&self) -> bool {
        match self {
            Output::Pipes { stdout, stderr } => stdout.is_none() && stderr.is_none(),
            Output::Pty(p) => p.is_none(),
        }
    }

    /// Reads the next chunk from whichever stream has data; `None` when that stream hit
    /// EOF (it is then closed). Uses `bufs[0]` for stdout/pty and `bufs[1]` for stderr.
    async fn next_chunk(&mut self, bufs: &mut [Vec<u8>; 2]) -> Option<(Source, Vec<u8>)> {
        let [out_buf, err_buf] = bufs;
        match self {
            Output::Pipes { stdout, stderr } => {
                tokio::select! {
                    r = read_pipe(stdout, out_buf) => match r {
                        Ok(n) if n > 0 => Some((Source::Stdout, out_buf[..n].to_vec())),
                        _ => { *stdout = None; None }
                    },
                    r = read_pipe(stderr, err_buf) => match r {
                        Ok(n) if n > 0 => Some((Source::Stderr, err_buf[..n].to_vec())),
                        _ => { *stderr = None; None }
                    },
                }
            }
            Output::Pty(p) => match read_pty(p, out_buf).await {
                Ok(n) if n > 0 => Some((Source::Pty, out_buf[..n].to_vec())),
                // EIO once the slave side is closed everywhere: EOF.
                _ => {
                    *p = None;
                    None
                }
            },
        }
    }

    /// What can be read without waiting, for after a signal death.
    fn drain_ready(&mut self, buf: &mut [u8]) -> Vec<(Source, Vec<u8>)> {
        let mut out = Vec::new();
        match self {
            Output::Pipes { stdout, stderr } => {
                for (src, p) in [(Source::Stdout, stdout), (Source::Stderr, stderr)] {
                    if let Some(r) = p.as_ref() {
                        while let Ok(n) = r.try_read(buf) {
                            if n == 0 {
                                break;
                            }
                            out.push((src, buf[..n].to_vec()));
                        }
                    }
                }
            }
            Output::Pty(Some(p)) => {
                while let Ok(n) = p.try_read(buf) {
                    if n == 0 {
                        break;
                    }
                    out.push((Source::Pty, buf[..n].to_vec()));
                }
            }
            Output::Pty(None) => {}
        }
        out
    }
}

/// Runs for the lifetime of one process: output fan-out, deadline, end event.
async fn supervise(
    proc: Arc<Proc>,
    mut output: Output,
    mut exit: tokio::sync::oneshot::Receiver<Exit>,
    timeout: Option<Duration>,
    table: std::sync::Weak<Mutex<Table>>,
) {
    let mut bufs = [vec![0u8; READ_CHUNK], vec![0u8; READ_CHUNK]];
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let mut status: Option<Exit> = None;
    let mut deadline_hit = false;
    loop {
        if status.is_some() && output.is_done() {
            break;
        }
        tokio::select! {
            chunk = output.next_chunk(&mut bufs), if !output.is_done() => {
                if let Some((src, bytes)) = chunk {
                    proc.broadcast(&src.event(bytes)).await;
                }
            }
            e = &mut exit, if status.is_none() => {
                let e = e.unwrap_or(Exit::Signal(libc::SIGKILL));
                status = Some(e);
                if matches!(e, Exit::Signal(_)) {
                    // Killed: do not wait for EOF from pipes that descendants may hold.
                    for (src, bytes) in output.drain_ready(&mut bufs[0]) {
                        proc.broadcast(&src.event(bytes)).await;
                    }
                    break;
                }
            }
            _ = sleep_until(deadline), if !deadline_hit && status.is_none() => {
                deadline_hit = true;
                proc.signal_group(libc::SIGKILL);
            }
        }
    }
    let end = end_event(status.unwrap_or(Exit::Signal(libc::SIGKILL)));
    proc.broadcast(&ProcessEvent::End(end)).await;
    if let Some(table) = table.upgrade() {
        table.lock().expect("process table lock").remove(&proc.pid);
    }
    // Dropping the senders closes every attached stream.
    proc.subscribers.lock().expect("subscribers lock").clear();
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// envd's end event for an exit status (Go's `ProcessState.String()` wording).
fn end_event(exit: Exit) -> EndEvent {
    match exit {
        Exit::Code(code) => {
            let status = format!("exit status {code}");
            EndEvent {
                exit_code: code,
                exited: true,
                error: (code != 0).then(|| status.clone()),
                status,
            }
        }
        Exit::Signal(sig) => {
            let status = format!("signal: {}", signal_name(sig));
            EndEvent {
                exit_code: -1,
                exited: false,
                error: Some(status.clone()),
                status,
            }
        }
    }
}

/// Go's `syscall.Signal.String()` for the common signals.
fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGHUP => "hangup",
        libc::SIGINT => "interrupt",
        libc::SIGQUIT => "quit",
        libc::SIGILL => "illegal instruction",
        libc::SIGTRAP => "trace/breakpoint trap",
        libc::SIGABRT => "aborted",
        libc::SIGBUS => "bus error",
        libc::SIGFPE => "floating point exception",
        libc::SIGKILL => "killed",
        libc::SIGUSR1 => "user defined signal 1",
        libc::SIGSEGV => "segmentation fault",
        libc::SIGUSR2 => "user defined signal 2",
        libc::SIGPIPE => "broken pipe",
        libc::SIGALRM => "alarm clock",
        libc::SIGTERM => "terminated",
        libc::SIGXCPU => "CPU time limit exceeded",
        libc::SIGXFSZ => "file size limit exceeded",
        _ => return format!("signal {sig}"),
    }
    .to_owned()
}

fn internal(e: std::io::Error) -> ConnectError {
    ConnectError::new(Code::Internal, e.to_string())
}

/// Handles `/process.Process/<method>`.
pub async fn rpc(agent: &Arc<Agent>, method: &str, req: Request<Incoming>) -> Response<Body> {
    let user = match auth::basic_user(req.headers()) {
        Ok(u) => u,
        Err(e) => return rpc::unary_err(&ConnectError::new(Code::Unauthenticated, e.to_string())),
    };
    let timeout = rpc::connect_timeout(req.headers());
    let keepalive = rpc::keepalive_interval(req.headers());
    let body = req.into_body();
    match method {
        "Start" => {
            let result = async {
                let request: StartRequest = StreamRequest::new(body).single().await?;
                let (tx, rx) = mpsc::channel(SUBSCRIBER_BUFFER);
                let pid = agent
                    .processes
                    .start(agent, user.as_deref(), request, timeout, tx)?;
                Ok::<_, ConnectError>((pid, rx))
            }
            .await;
            stream_events(result, keepalive)
        }
        "Connect" => {
            let result = async {
                let request: ConnectRequest = StreamRequest::new(body).single().await?;
                let (tx, rx) = mpsc::channel(SUBSCRIBER_BUFFER);
                let pid = agent.processes.subscribe(&request.process, tx)?;
                Ok::<_, ConnectError>((pid, rx))
            }
            .await;
            stream_events(result, keepalive)
        }
        "StreamInput" => stream_input(agent, body).await,
        _ => unary(agent, method, body).await,
    }
}

/// The response of `Start`/`Connect`: `start` first, then the process's events, with
/// keepalives in quiet periods.
fn stream_events(
    started: Result<(u32, mpsc::Receiver<ProcessEvent>), ConnectError>,
    keepalive: Duration,
) -> Response<Body> {
    let (pid, mut events) = match started {
        Ok(s) => s,
        Err(e) => return rpc::stream_error(&e),
    };
    let (out, response) = rpc::stream_channel();
    tokio::spawn(async move {
        let msg = |event| ProcessStreamMessage { event };
        if !out.send(&msg(ProcessEvent::Start { pid })).await {
            return;
        }
        loop {
            match tokio::time::timeout(keepalive, events.recv()).await {
                Ok(Some(event)) => {
                    let last = matches!(event, ProcessEvent::End(_));
                    if !out.send(&msg(event)).await {
                        return;
                    }
                    if last {
                        break;
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    if !out.send(&msg(ProcessEvent::Keepalive {})).await {
                        return;
                    }
                }
            }
        }
        finish(out).await;
    });
    response
}

async fn finish(out: StreamSender) {
    out.finish(Ok(())).await
}

async fn unary(agent: &Arc<Agent>, method: &str, body: Incoming) -> Response<Body> {
    let procs = &agent.processes;
    let result: Result<Response<Body>, ConnectError> = async {
        match method {
            "List" => {
                let _: Empty = rpc::unary_request(body).await?;
                Ok(rpc::unary_ok(&procs.list()))
            }
            "SendInput" => {
                let r: SendInputRequest = rpc::unary_request(body).await?;
                let proc = procs.find(&r.process)?;
                write_input(&proc, r.input).await?;
                Ok(rpc::unary_ok(&Empty {}))
            }
            "SendSignal" => {
                let r: SendSignalRequest = rpc::unary_request(body).await?;
                let proc = procs.find(&r.process)?;
                let sig = match r.signal {
                    Signal::Sigkill => libc::SIGKILL,
                    Signal::Sigterm => libc::SIGTERM,
                    Signal::Unspecified => {
                        return Err(ConnectError::new(
                            Code::InvalidArgument,
                            "signal is unspecified",
                        ))
                    }
                };
                proc.signal_group(sig);
                Ok(rpc::unary_ok(&Empty {}))
            }
            "CloseStdin" => {
                let r: CloseStdinRequest = rpc::unary_request(body).await?;
                let proc = procs.find(&r.process)?;
                let mut input = proc.input.lock().await;
                match &*input {
                    Input::Pty(_) => {
                        return Err(ConnectError::new(
                            Code::FailedPrecondition,
                            "a PTY has no stdin to close; send Ctrl-D (0x04) instead",
                        ))
                    }
                    Input::None | Input::Pipe(_) => *input = Input::None,
                }
                Ok(rpc::unary_ok(&Empty {}))
            }
            "Update" => {
                let r: UpdateRequest = rpc::unary_request(body).await?;
                let proc = procs.find(&r.process)?;
                if let Some(size) = r.pty {
                    let master = proc.pty.as_ref().ok_or_else(|| {
                        ConnectError::new(Code::FailedPrecondition, "process has no PTY")
                    })?;
                    spawn::resize(master.fd(), size.size).map_err(internal)?;
                }
                Ok(rpc::unary_ok(&Empty {}))
            }
            other => Err(unknown_method("process.Process", other)),
        }
    }
    .await;
    result.unwrap_or_else(|e| rpc::unary_err(&e))
}

async fn write_input(proc: &Proc, input: ProcessInput) -> Result<(), ConnectError> {
    let mut target = proc.input.lock().await;
    let result = match (&mut *target, input) {
        (Input::Pipe(p), ProcessInput::Stdin(bytes)) => p.write_all(&bytes).await,
        (Input::Pty(m), ProcessInput::Pty(bytes)) => m.write_all(&bytes).await,
        (Input::Pty(m), ProcessInput::Stdin(bytes)) => m.write_all(&bytes).await,
        (Input::Pipe(_) | Input::None, ProcessInput::Pty(_)) => {
            return Err(ConnectError::new(
                Code::FailedPrecondition,
                "process has no PTY",
            ))
        }
        (Input::None, ProcessInput::Stdin(_)) => {
            return Err(ConnectError::new(
                Code::FailedPrecondition,
                "stdin of the process is closed (start it with stdin enabled)",
            ))
        }
    };
    result.map_err(|e| match e.kind() {
        std::io::ErrorKind::BrokenPipe => {
            ConnectError::new(Code::FailedPrecondition, "the process closed its stdin")
        }
        _ => internal(e),
    })
}

/// `StreamInput`: a client stream of `start`, then `data`/`keepalive` messages; answered
/// with exactly one empty message after the request ends.
async fn stream_input(agent: &Arc<Agent>, body: Incoming) -> Response<Body> {
    let mut messages = StreamRequest::new(body);
    let result = async {
        let proc = match messages.next::<StreamInputRequest>().await? {
            Some(StreamInputRequest::Start { process }) => agent.processes.find(&process)?,
            Some(_) => {
                return Err(ConnectError::new(
                    Code::InvalidArgument,
                    "the first StreamInput message must be start",
                ))
            }
            None => {
                return Err(ConnectError::new(
                    Code::InvalidArgument,
                    "empty input stream",
                ))
            }
        };
        while let Some(msg) = messages.next::<StreamInputRequest>().await? {
            match msg {
                StreamInputRequest::Data { input } => write_input(&proc, input).await?,
                StreamInputRequest::Keepalive {} => {}
                StreamInputRequest::Start { .. } => {
                    return Err(ConnectError::new(
                        Code::InvalidArgument,
                        "second start message",
                    ))
                }
            }
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) => {
            let (out, response) = rpc::stream_channel();
            tokio::spawn(async move {
                out.send(&Empty {}).await;
                out.finish(Ok(())).await;
            });
            response
        }
        Err(e) => rpc::stream_error(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_events_match_envd() {
        let ok = end_event(Exit::Code(0));
        assert_eq!(
            (ok.exit_code, ok.exited, ok.status.as_str(), ok.error),
            (0, true, "exit status 0", None)
        );
        let bad = end_event(Exit::Code(3));
        assert_eq!(bad.error.as_deref(), Some("exit status 3"));
        let killed = end_event(Exit::Signal(libc::SIGKILL));
        assert_eq!((killed.exit_code, killed.exited), (-1, false));
        assert_eq!(killed.status, "signal: killed");
        assert_eq!(
            end_event(Exit::Signal(libc::SIGTERM)).status,
            "signal: terminated"
        );
        assert_eq!(signal_name(64), "signal 64");
    }
}
