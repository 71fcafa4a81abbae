//! Kernel processes (one per context) and the Python zygote they are forked from; the
//! agent side of the protocol in `docs/interpreter.md`.

use std::collections::BTreeMap;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::unix::pipe;
use tokio::sync::oneshot;

use base64::Engine;
use cubicle_runtime::ns::security;

use crate::process::spawn::{environment, spawn_with_fds, USER_OOM_SCORE_ADJ};
use crate::reaper::{Exit, Reaper};
use crate::users::User;

/// The Python kernel program (runs as `python3 -c`).
pub const PYTHON_KERNEL: &str = include_str!("python_kernel.py");
/// The JavaScript kernel program (runs as `node -e`).
pub const JS_KERNEL: &str = include_str!("js_kernel.js");
/// The bash kernel program (runs as `python3 -c`).
pub const BASH_KERNEL: &str = include_str!("bash_kernel.py");

/// How long a kernel may take to say `ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Languages a context can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Language {
    /// Python 3 with IPython.
    Python,
    /// JavaScript (Node.js).
    JavaScript,
    /// bash.
    Bash,
}

impl Language {
    /// Parses an E2B language name (case-insensitive; `js` is JavaScript).
    pub fn parse(name: &str) -> Option<Language> {
        match name.to_ascii_lowercase().as_str() {
            "python" | "python3" | "py" => Some(Language::Python),
            "javascript" | "js" | "node" => Some(Language::JavaScript),
            "bash" | "sh" | "shell" => Some(Language::Bash),
            _ => None,
        }
    }

    /// The name contexts report.
    pub fn as_str(self) -> &'static str {
        match self {
            Language::Python => "python",
            Language::JavaScript => "javascript",
            Language::Bash => "bash",
        }
    }
}

/// Why a kernel could not be started or talked to.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// Starting the process failed.
    #[error("cannot start the {language} kernel: {message}")]
    Start {
        /// Which kernel.
        language: &'static str,
        /// Why.
        message: String,
    },
    /// The kernel died or broke the protocol.
    #[error("the kernel stopped: {0}")]
    Died(String),
    /// I/O with the kernel failed.
    #[error("kernel i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Everything the kernels of one sandbox share: who they run as, with what environment.
#[derive(Debug, Clone)]
pub struct KernelEnv {
    /// The user kernels run as.
    pub user: User,
    /// The sandbox's identity, with the environment variables (replaced after a restore).
    pub identity: crate::server::SharedIdentity,
    /// Reaps kernels and tells us when they exit.
    pub reaper: Arc<Reaper>,
}

impl KernelEnv {
    fn environment(&self) -> BTreeMap<String, String> {
        let env_vars = self.identity.read().expect("identity").env_vars.clone();
        let mut env = environment(&self.user, &env_vars, &BTreeMap::new());
        env.insert("SHELL".into(), "/bin/bash".into());
        env
    }
}

/// One end of a running kernel: requests in, events and raw output out.
#[derive(Debug)]
pub struct Kernel {
    /// Its pid in the sandbox.
    pub pid: u32,
    stdin: pipe::Sender,
    /// Its event lines (fd 3).
    pub events: Lines<BufReader<pipe::Receiver>>,
    /// Raw stdout of the kernel and its subprocesses.
    pub stdout: Option<pipe::Receiver>,
    /// Raw stderr of the kernel and its subprocesses.
    pub stderr: Option<pipe::Receiver>,
    /// Resolves when the kernel exits.
    pub exit: oneshot::Receiver<Exit>,
}

/// The agent's ends of a kernel-to-be's fds 0-3.
struct Ends {
    stdin: pipe::Sender,
    events: pipe::Receiver,
    stdout: pipe::Receiver,
    stderr: pipe::Receiver,
}

/// Pipes for a kernel-to-be: its fds 0 (requests), 1, 2 (raw output) and 3 (events),
/// and our ends.
fn pipes() -> std::io::Result<([OwnedFd; 4], Ends)> {
    let (in_tx, in_rx) = pipe::pipe()?;
    let (ev_tx, ev_rx) = pipe::pipe()?;
    let (out_tx, out_rx) = pipe::pipe()?;
    let (err_tx, err_rx) = pipe::pipe()?;
    let child = [
        in_rx.into_blocking_fd()?,
        out_tx.into_blocking_fd()?,
        err_tx.into_blocking_fd()?,
        ev_tx.into_blocking_fd()?,
    ];
    let ends = Ends {
        stdin: in_tx,
        events: ev_rx,
        stdout: out_rx,
        stderr: err_rx,
    };
    Ok((child, ends))
}

impl Ends {
    /// The kernel these ends talk to, once its pid is known (0 until its `ready`).
    fn into_kernel(self, pid: u32, exit: oneshot::Receiver<Exit>) -> Kernel {
        Kernel {
            pid,
            stdin: self.stdin,
            events: BufReader::new(self.events).lines(),
            stdout: Some(self.stdout),
            stderr: Some(self.stderr),
            exit,
        }
    }
}

impl Kernel {
    /// Starts a kernel directly (JavaScript, bash, or Python without a zygote) in `cwd`.
    pub async fn spawn(
        language: Language,
        env: &KernelEnv,
        cwd: &Path,
    ) -> Result<Kernel, KernelError> {
        let start_error = |message: String| KernelError::Start {
            language: language.as_str(),
            message,
        };
        let (program, args): (&str, Vec<&str>) = match language {
            Language::Python => ("python3", vec!["-c", PYTHON_KERNEL]),
            Language::JavaScript => ("node", vec!["-e", JS_KERNEL]),
            Language::Bash => ("python3", vec!["-c", BASH_KERNEL]),
        };
        let ([stdin, stdout, stderr, events], ends) = pipes()?;
        let pid = spawn_with_fds(
            program,
            &args,
            &env.user,
            &env.environment(),
            cwd,
            [stdin, stdout, stderr],
            vec![(3, events)],
        )
        .map_err(|e| start_error(e.message))?;
        let mut kernel = ends.into_kernel(pid, env.reaper.watch(pid as i32));
        kernel
            .wait_ready()
            .await
            .map_err(|e| start_error(e.to_string()))?;
        Ok(kernel)
    }

    /// Adopts the default Python kernel a template zygote forked into this sandbox
    /// (`fd`, its socket, inherited from init; see [`send_setup`]).
    pub async fn adopt(fd: RawFd, env: &KernelEnv) -> Result<Kernel, KernelError> {
        let (child, ends) = pipes()?;
        send_setup(fd, env, &child).map_err(|e| adopt_error("kernel", e))?;
        drop(child);
        let mut kernel = ends.into_kernel(0, oneshot::channel().1);
        kernel.pid = kernel
            .wait_ready()
            .await
            .map_err(|e| adopt_error("kernel", e))?;
        kernel.exit = env.reaper.watch(kernel.pid as i32);
        Ok(kernel)
    }

    /// Waits for the kernel's `ready` event; returns the pid it reports.
    async fn wait_ready(&mut self) -> Result<u32, KernelError> {
        let ready = tokio::time::timeout(READY_TIMEOUT, async {
            loop {
                match self.next_event().await? {
                    Some(v) if v["type"] == "ready" => {
                        return Ok(v["pid"].as_u64().unwrap_or(u64::from(self.pid)) as u32)
                    }
                    Some(_) => continue,
                    None => return Err(KernelError::Died("exited before it was ready".into())),
                }
            }
        })
        .await;
        match ready {
            Ok(r) => r,
            Err(_) => Err(KernelError::Died(format!(
                "not ready after {READY_TIMEOUT:?}"
            ))),
        }
    }

    /// Sends one request line.
    pub async fn send(&mut self, request: &Value) -> Result<(), KernelError> {
        let mut line = serde_json::to_vec(request).expect("JSON values serialise");
        line.push(b'\n');
        self.stdin.write_all(&line).await?;
        Ok(())
    }

    /// The next event (`None` once the kernel closed fd 3).
    pub async fn next_event(&mut self) -> Result<Option<Value>, KernelError> {
        read_event(&mut self.events).await
    }

    /// Sends a signal to the kernel process.
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) with integer arguments.
        unsafe {
            libc::kill(self.pid as libc::pid_t, signal);
        }
    }
}

impl Drop for Kernel {
    fn drop(&mut self) {
        // A kernel nobody talks to any more must not linger.
        self.signal(libc::SIGKILL);
    }
}

/// The Python zygote: imports the scientific stack once; every Python context is a fork
/// of it.
#[derive(Debug)]
pub struct Zygote {
    kernel: Kernel,
    control: UnixStream,
    next_fork: u64,
}

impl Zygote {
    /// Starts the zygote and waits until it is ready.
    pub async fn start(env: &KernelEnv) -> Result<Zygote, KernelError> {
        let start_error = |message: String| KernelError::Start {
            language: "python",
            message,
        };
        let (ours, theirs) = UnixStream::pair()?;
        let ([stdin, stdout, stderr, events], ends) = pipes()?;
        let pid = spawn_with_fds(
            "python3",
            &["-c", PYTHON_KERNEL, "--zygote"],
            &env.user,
            &env.environment(),
            &env.user.home,
            [stdin, stdout, stderr],
            vec![(3, events), (4, OwnedFd::from(theirs))],
        )
        .map_err(|e| start_error(e.message))?;
        let mut kernel = ends.into_kernel(pid, env.reaper.watch(pid as i32));
        kernel
            .wait_ready()
            .await
            .map_err(|e| start_error(e.to_string()))?;
        Ok(Zygote::new(kernel, ours))
    }

    /// Adopts the Python zygote a template zygote forked into this sandbox (`fd`, its
    /// socket, inherited from init; see [`send_setup`]).
    pub async fn adopt(fd: RawFd, env: &KernelEnv) -> Result<Zygote, KernelError> {
        let (ours, theirs) = UnixStream::pair()?;
        let ([stdin, stdout, stderr, events], ends) = pipes()?;
        let fds = [stdin, stdout, stderr, events, OwnedFd::from(theirs)];
        send_setup(fd, env, &fds).map_err(|e| adopt_error("zygote", e))?;
        drop(fds);
        let mut kernel = ends.into_kernel(0, oneshot::channel().1);
        kernel.pid = kernel
            .wait_ready()
            .await
            .map_err(|e| adopt_error("zygote", e))?;
        kernel.exit = env.reaper.watch(kernel.pid as i32);
        Ok(Zygote::new(kernel, ours))
    }

    fn new(mut kernel: Kernel, control: UnixStream) -> Zygote {
        // The zygote runs no user code; whatever it prints (warnings) is dropped.
        for mut output in [kernel.stdout.take(), kernel.stderr.take()]
            .into_iter()
            .flatten()
        {
            tokio::spawn(async move { drain(&mut output).await });
        }
        Zygote {
            kernel,
            control,
            next_fork: 0,
        }
    }

    /// Whether the zygote process still runs.
    pub fn is_alive(&mut self) -> bool {
        matches!(
            self.kernel.exit.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        )
    }

    /// Forks a fresh Python kernel working in `cwd`.
    pub async fn fork(&mut self, env: &KernelEnv, cwd: &Path) -> Result<Kernel, KernelError> {
        self.next_fork += 1;
        let id = format!("fork-{}", self.next_fork);
        let (child, ends) = pipes()?;
        self.kernel
            .send(&serde_json::json!({"op": "fork", "id": id, "cwd": cwd}))
            .await?;
        send_fds(&self.control, &child)?;
        drop(child);
        let pid = loop {
            match self.kernel.next_event().await? {
                Some(v) if v["type"] == "forked" && v["id"] == id.as_str() => {
                    break v["pid"]
                        .as_u64()
                        .ok_or_else(|| KernelError::Died("forked event without a pid".into()))?
                        as u32
                }
                Some(v) if v["type"] == "fork_failed" && v["id"] == id.as_str() => {
                    return Err(KernelError::Start {
                        language: "python",
                        message: format!(
                            "the zygote could not fork a kernel: {}",
                            v["message"].as_str().unwrap_or("no reason given")
                        ),
                    });
                }
                Some(_) => continue,
                None => return Err(KernelError::Died("the zygote exited".into())),
            }
        };
        let mut kernel = ends.into_kernel(pid, env.reaper.watch(pid as i32));
        kernel.wait_ready().await?;
        Ok(kernel)
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.kernel.pid
    }
}

/// Reads the next event line (`None` at EOF). A free function so callers can wait on
/// events and on other fields of a [`Kernel`] at once.
pub async fn read_event(
    events: &mut Lines<BufReader<pipe::Receiver>>,
) -> Result<Option<Value>, KernelError> {
    loop {
        let Some(line) = events.next_line().await? else {
            return Ok(None);
        };
        if line.trim().is_empty() {
            continue;
        }
        return serde_json::from_str(&line)
            .map(Some)
            .map_err(|e| KernelError::Died(format!("malformed event {e}: {line:.200}")));
    }
}

/// Sends a warm Python process parked on `fd` (forked by a template zygote, see
/// `cubicle_runtime::ns::zygote`) what makes it one of ours: `fds` for its 0, 1, ...,
/// the kernel user, the environment, the sandbox's rlimits, capability bounding set
/// and seccomp filter (which it installs itself: it was forked before init installed
/// them). Closes `fd`.
fn send_setup(fd: RawFd, env: &KernelEnv, fds: &[OwnedFd]) -> Result<(), KernelError> {
    // SAFETY: init passed this descriptor to us for exactly this purpose; nothing else
    // in the agent owns it, and it is consumed here.
    let socket = unsafe { UnixStream::from_raw_fd(fd) };
    let program = security::SeccompPolicy::default_policy()
        .and_then(|p| p.compile())
        .map_err(|e| KernelError::Died(format!("seccomp filter: {e}")))?;
    let (soft, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_err(std::io::Error::from)?;
    let setup = serde_json::json!({
        "op": "setup",
        "uid": env.user.uid,
        "gid": env.user.gid,
        "groups": env.user.groups,
        "env": env.environment(),
        "cwd": env.user.home,
        "nofile": [soft, hard],
        "oom_score_adj": String::from_utf8_lossy(USER_OOM_SCORE_ADJ),
        "keep_caps": security::caps::SANDBOX_CAPS.iter().map(|c| c.index()).collect::<Vec<_>>(),
        "seccomp": base64::engine::general_purpose::STANDARD.encode(bpf_bytes(&program)),
    });
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    sendmsg_fds(&socket, &serde_json::to_vec(&setup).expect("JSON"), &raw)?;
    Ok(())
}

fn adopt_error(what: &str, e: impl std::fmt::Display) -> KernelError {
    KernelError::Start {
        language: "python",
        message: format!("adopting the warm {what}: {e}"),
    }
}

/// Sends the child's four descriptors over the zygote's control socket (one byte of
/// data, the descriptors as `SCM_RIGHTS`).
fn send_fds(socket: &UnixStream, fds: &[OwnedFd; 4]) -> std::io::Result<()> {
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    sendmsg_fds(socket, b"F", &raw)
}

/// One message with `data` and `fds` as `SCM_RIGHTS`.
fn sendmsg_fds(socket: &UnixStream, data: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let data = [IoSlice::new(data)];
    let sent = sendmsg::<()>(
        socket.as_raw_fd(),
        &data,
        &[ControlMessage::ScmRights(fds)],
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(std::io::Error::from)?;
    if sent != data[0].len() {
        return Err(std::io::Error::other("short send"));
    }
    Ok(())
}

/// A seccomp program as the kernel reads it: `struct sock_filter` (code u16, jt u8,
/// jf u8, k u32) in native byte order, one after another.
fn bpf_bytes(program: &security::BpfProgram) -> Vec<u8> {
    program
        .instructions()
        .iter()
        .flat_map(|i| {
            let mut b = [0u8; 8];
            b[..2].copy_from_slice(&i.code.to_ne_bytes());
            b[2] = i.jt;
            b[3] = i.jf;
            b[4..].copy_from_slice(&i.k.to_ne_bytes());
            b
        })
        .collect()
}

/// Reads a pipe to its end and forgets what it read.
async fn drain(reader: &mut pipe::Receiver) {
    let mut buf = [0u8; 8192];
    while let Ok(n) = reader.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

/// The default working directory of contexts.
pub fn default_cwd(user: &User) -> PathBuf {
    user.home.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn languages() {
        assert_eq!(Language::parse("Python"), Some(Language::Python));
        assert_eq!(Language::parse("js"), Some(Language::JavaScript));
        assert_eq!(Language::parse("bash"), Some(Language::Bash));
        assert_eq!(Language::parse("r"), None);
        assert_eq!(Language::JavaScript.as_str(), "javascript");
    }
}
