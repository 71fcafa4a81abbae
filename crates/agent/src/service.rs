//! The sandbox's main service (a template image's entrypoint and cmd, see
//! [`ServiceConfig`]): started once the agent serves, as its user in its working
//! directory with the sandbox's environment, stdin `/dev/null`, stdout and stderr in one
//! pipe whose last [`SERVICE_LOG_BYTES`] the agent keeps ([`Service::status`], served to
//! the host as `GET /_cubicle/service`). It is started like every user process (own
//! session, `oom_score_adj` 500, the sandbox's seccomp filter and bounding set) and
//! never restarted; how it ended goes to the agent's log. Being the agent's child with
//! a pipe to it, it is part of every checkpoint, log included.

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::{Arc, Mutex};

use cubicle_runtime::ns::message::{ServiceStatus, SERVICE_LOG_BYTES};
use cubicle_runtime::ServiceConfig;
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;

use crate::process::spawn;
use crate::reaper::Exit;
use crate::server::Agent;

/// The main service's state, shared by its supervisor tasks and the status endpoint.
#[derive(Debug, Default)]
pub struct Service {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    pid: Option<u32>,
    running: bool,
    ended: Option<String>,
    log: Ring,
}

/// The end of a byte stream: at most [`SERVICE_LOG_BYTES`].
#[derive(Debug, Default)]
struct Ring {
    bytes: VecDeque<u8>,
}

impl Ring {
    fn push(&mut self, data: &[u8]) {
        let data = &data[data.len().saturating_sub(SERVICE_LOG_BYTES)..];
        let over = (self.bytes.len() + data.len()).saturating_sub(SERVICE_LOG_BYTES);
        self.bytes.drain(..over);
        self.bytes.extend(data);
    }

    fn text(&self) -> String {
        let (a, b) = self.bytes.as_slices();
        let mut all = Vec::with_capacity(a.len() + b.len());
        all.extend_from_slice(a);
        all.extend_from_slice(b);
        String::from_utf8_lossy(&all).into_owned()
    }
}

impl Service {
    /// Its state and log now.
    pub fn status(&self) -> ServiceStatus {
        let state = self.state.lock().expect("service state");
        ServiceStatus {
            pid: state.pid,
            running: state.running,
            ended: state.ended.clone(),
            log: state.log.text(),
        }
    }

    fn failed(&self, message: String) {
        tracing::error!(%message, "the main service could not start");
        let mut state = self.state.lock().expect("service state");
        state.log.push(format!("cubicle: {message}\n").as_bytes());
        state.ended = Some(format!("could not start: {message}"));
    }
}

/// Starts `config` as the sandbox's main service (the agent's reaper must run).
pub fn start(agent: &Arc<Agent>, config: &ServiceConfig) {
    let service = agent.service.clone();
    let started = spawn_service(agent, config);
    let (pid, output) = match started {
        Ok(x) => x,
        Err(message) => return service.failed(message),
    };
    {
        let mut state = service.state.lock().expect("service state");
        state.pid = Some(pid);
        state.running = true;
    }
    tracing::info!(pid, argv = ?config.argv, "main service started");
    let exited = agent.processes.reaper().watch(pid as i32);
    let reader = service.clone();
    tokio::spawn(async move {
        let mut output = output;
        let mut buf = vec![0u8; 8192];
        loop {
            match output.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => reader
                    .state
                    .lock()
                    .expect("service state")
                    .log
                    .push(&buf[..n]),
            }
        }
    });
    tokio::spawn(async move {
        let ended = match exited.await {
            Ok(Exit::Code(code)) => format!("exited with status {code}"),
            Ok(Exit::Signal(sig)) => format!("killed by signal {sig}"),
            Err(_) => "ended (status unknown)".to_owned(),
        };
        tracing::warn!(pid, %ended, "main service ended; it is not restarted");
        let mut state = service.state.lock().expect("service state");
        state.running = false;
        state.ended = Some(ended);
    });
}

/// Forks and executes the service; returns its pid and the read end of its output.
fn spawn_service(
    agent: &Arc<Agent>,
    config: &ServiceConfig,
) -> Result<(u32, pipe::Receiver), String> {
    let program = config
        .argv
        .first()
        .ok_or_else(|| "the service has no program".to_owned())?;
    let user = agent
        .accounts
        .by_spec(config.user.as_deref().unwrap_or("root"))
        .map_err(|e| e.to_string())?;
    let cwd = Path::new(config.cwd.as_deref().unwrap_or("/"));
    let env = spawn::environment(&user, &agent.env_vars(), &BTreeMap::new());
    let devnull = std::fs::File::open("/dev/null").map_err(|e| format!("open /dev/null: {e}"))?;
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| format!("create a pipe: {e}"))?;
    let write2 = write
        .try_clone()
        .map_err(|e| format!("duplicate a pipe: {e}"))?;
    let args: Vec<&str> = config.argv[1..].iter().map(String::as_str).collect();
    let pid = spawn::spawn_with_fds(
        program,
        &args,
        &user,
        &env,
        cwd,
        [OwnedFd::from(devnull), write, write2],
        Vec::new(),
    )
    .map_err(|e| e.message)?;
    let output = pipe::Receiver::from_owned_fd(read).map_err(|e| format!("read the pipe: {e}"))?;
    Ok((pid, output))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_keeps_the_end() {
        let mut ring = Ring::default();
        ring.push(b"hello ");
        ring.push(b"world\n");
        assert_eq!(ring.text(), "hello world\n");
        let chunk = vec![b'x'; SERVICE_LOG_BYTES - 3];
        ring.push(&chunk);
        assert_eq!(ring.bytes.len(), SERVICE_LOG_BYTES);
        assert!(ring.text().starts_with("ld\n"));
        ring.push(&vec![b'y'; SERVICE_LOG_BYTES * 2]);
        assert_eq!(ring.bytes.len(), SERVICE_LOG_BYTES);
        assert!(ring.text().bytes().all(|b| b == b'y'));
    }
}
