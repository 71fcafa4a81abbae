//! Kernel processes (one per context) and the Python zygote they are forked from; the
//! agent side of the protocol in `docs/interpreter.md`.

use std::collections::BTreeMap;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::unix::pipe;
use tokio::sync::oneshot;

use crate::process::spawn::{environment, spawn_with_fds};
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
    /// The sandbox's environment variables.
    pub env_vars: BTreeMap<String, String>,
    /// Reaps kernels and tells us when they exit.
    pub reaper: Arc<Reaper>,
}

impl KernelEnv {
    fn environment(&self) -> BTreeMap<String, String> {
        let mut env = environment(&self.user, &self.env_vars, &BTreeMap::new());
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

/// The descriptors of a kernel-to-be: the child's ends and ours.
struct Pipes {
    child: [OwnedFd; 4],
    stdin: pipe::Sender,
    events: pipe::Receiver,
    stdout: pipe::Receiver,
    stderr: pipe::Receiver,
}

impl Pipes {
    fn new() -> std::io::Result<Self> {
        let (in_tx, in_rx) = pipe::pipe()?;
        let (ev_tx, ev_rx) = pipe::pipe()?;
        let (out_tx, out_rx) = pipe::pipe()?;
        let (err_tx, err_rx) = pipe::pipe()?;
        let blocking = |tx: pipe::Sender| tx.into_blocking_fd();
        let child = [
            in_rx.into_blocking_fd()?,
            blocking(out_tx)?,
            blocking(err_tx)?,
            blocking(ev_tx)?,
        ];
        Ok(Pipes {
            child,
            stdin: in_tx,
            events: ev_rx,
            stdout: out_rx,
            stderr: err_rx,
        })
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
        let pipes = Pipes::new()?;
        let [stdin, stdout, stderr, events] = pipes.child;
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
        let exit = env.reaper.watch(pid as i32);
        let mut kernel = Kernel {
            pid,
            stdin: pipes.stdin,
            events: BufReader::new(pipes.events).lines(),
            stdout: Some(pipes.stdout),
            stderr: Some(pipes.stderr),
            exit,
        };
        kernel
            .wait_ready()
            .await
            .map_err(|e| start_error(e.to_string()))?;
        Ok(kernel)
    }

    /// Waits for the kernel's `ready` event.
    async fn wait_ready(&mut self) -> Result<(), KernelError> {
        let ready = tokio::time::timeout(READY_TIMEOUT, async {
            loop {
                match self.next_event().await? {
                    Some(v) if v["type"] == "ready" => return Ok(()),
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
        let pipes = Pipes::new()?;
        let [stdin, stdout, stderr, events] = pipes.child;
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
        let exit = env.reaper.watch(pid as i32);
        let mut kernel = Kernel {
            pid,
            stdin: pipes.stdin,
            events: BufReader::new(pipes.events).lines(),
            stdout: Some(pipes.stdout),
            stderr: Some(pipes.stderr),
            exit,
        };
        kernel
            .wait_ready()
            .await
            .map_err(|e| start_error(e.to_string()))?;
        // The zygote runs no user code; whatever it prints (warnings) is dropped.
        for mut output in [kernel.stdout.take(), kernel.stderr.take()]
            .into_iter()
            .flatten()
        {
            tokio::spawn(async move { drain(&mut output).await });
        }
        Ok(Zygote {
            kernel,
            control: ours,
            next_fork: 0,
        })
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
        let pipes = Pipes::new()?;
        self.kernel
            .send(&serde_json::json!({"op": "fork", "id": id, "cwd": cwd}))
            .await?;
        send_fds(&self.control, &pipes.child)?;
        drop(pipes.child);
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
        let exit = env.reaper.watch(pid as i32);
        let mut kernel = Kernel {
            pid,
            stdin: pipes.stdin,
            events: BufReader::new(pipes.events).lines(),
            stdout: Some(pipes.stdout),
            stderr: Some(pipes.stderr),
            exit,
        };
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

/// Sends the child's four descriptors over the zygote's control socket (one byte of
/// data, the descriptors as `SCM_RIGHTS`).
fn send_fds(socket: &UnixStream, fds: &[OwnedFd; 4]) -> std::io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let data = [IoSlice::new(b"F")];
    sendmsg::<()>(
        socket.as_raw_fd(),
        &data,
        &[ControlMessage::ScmRights(&raw)],
        MsgFlags::empty(),
        None,
    )
    .map_err(std::io::Error::from)?;
    Ok(())
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
