//! The sync channel between the runtime (host side) and the sandbox's init/agent.
//!
//! A `SOCK_STREAM` socketpair created before the clone; the child gets its end as fd 3.
//! Frames are a 4-byte big-endian length followed by one JSON message. The exchange is:
//!
//! ```text
//! runtime                               init (cubicle-agent init) → agent (serve)
//!   clone ──────────────────────────────▶ waits (peeks fd 3)
//!   uid/gid map, cgroups, oom_score_adj
//!   Go(InitSpec) ───────────────────────▶ namespaces, rootfs, pivot_root, security,
//!                                          exec agent ─▶ bind agent.sock
//!   ◀──────────────────────────────────── Ready | Failed{step, message}
//! ```
//!
//! After `Ready` both sides close the channel: no host fd stays inside a sandbox.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Largest frame accepted (guards against a corrupted length prefix).
pub const MAX_FRAME: usize = 16 << 20;

/// What the agent needs to serve envd for one sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentConfig {
    /// The sandbox id (also its host name).
    pub sandbox_id: String,
    /// Environment variables exported into every process started in the sandbox.
    #[serde(default)]
    pub env_vars: BTreeMap<String, String>,
    /// The user commands run as when a request names none.
    pub default_user: String,
    /// When set, every envd request except `/health` must carry it (`X-Access-Token`).
    #[serde(default)]
    pub access_token: Option<String>,
    /// Largest accepted upload (`POST /files`) in bytes.
    pub max_upload_bytes: u64,
    /// Serve E2B's code interpreter on port 49999 (templates that have its runtime).
    #[serde(default)]
    pub code_interpreter: bool,
    /// Warm Python processes the sandbox was forked with (set by the runtime when a
    /// template zygote made the sandbox, see [`super::zygote`]); the agent adopts them
    /// instead of starting a Python of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_python: Option<WarmPython>,
    /// The template's main service, which the agent starts once it serves (see
    /// [`ServiceConfig`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceConfig>,
}

/// A sandbox's main service (a template image's entrypoint and cmd): started by the
/// agent next to itself once it serves, with the sandbox's environment
/// ([`AgentConfig::env_vars`] over the user's basics), stdin `/dev/null`, stdout and
/// stderr kept in a bounded log; never restarted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceConfig {
    /// Program and arguments; the program is looked up in the environment's `PATH`
    /// when it has no `/`.
    pub argv: Vec<String>,
    /// Working directory (default `/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// `user`, `uid`, `user:group` or `uid:gid` (default root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// What `GET` [`SERVICE_PATH`] answers (host only): the main service's state and the
/// end of its output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatus {
    /// Its pid inside the sandbox, once started.
    pub pid: Option<u32>,
    /// Whether it runs.
    pub running: bool,
    /// How it ended, in words ("exited with status 3", "killed by signal 9", "could not
    /// start: ..."), if it did.
    pub ended: Option<String>,
    /// The last [`SERVICE_LOG_BYTES`] of its stdout and stderr.
    pub log: String,
}

/// The agent's path for the main service's [`ServiceStatus`].
pub const SERVICE_PATH: &str = "/_cubicle/service";
/// How much of the main service's output the agent keeps (the end of it).
pub const SERVICE_LOG_BYTES: usize = 64 << 10;

/// What a sandbox restored from a checkpoint takes over from its new spec (the agent's
/// `POST /_cubicle/identity`): everything else of the agent is the checkpoint's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentIdentity {
    /// The sandbox id.
    pub sandbox_id: String,
    /// The envd access token, if the sandbox has one.
    pub access_token: Option<String>,
    /// Environment variables of every process started from now on.
    pub env_vars: BTreeMap<String, String>,
}

impl AgentIdentity {
    /// The identity part of `config`.
    pub fn of(config: &AgentConfig) -> Self {
        AgentIdentity {
            sandbox_id: config.sandbox_id.clone(),
            access_token: config.access_token.clone(),
            env_vars: config.env_vars.clone(),
        }
    }
}

/// The sockets on which a zygote-made sandbox's Python processes wait for the agent's
/// `setup` (inherited by the agent from init).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WarmPython {
    /// The sandbox's Python zygote (forks new contexts).
    pub zygote_fd: i32,
    /// The default Python context's kernel.
    pub kernel_fd: i32,
}

impl AgentConfig {
    /// The defaults E2B sandboxes have: user `user`, no token, 1 GiB uploads.
    pub fn new(sandbox_id: impl Into<String>) -> Self {
        AgentConfig {
            sandbox_id: sandbox_id.into(),
            env_vars: BTreeMap::new(),
            default_user: "user".into(),
            access_token: None,
            max_upload_bytes: 1 << 30,
            code_interpreter: false,
            warm_python: None,
            service: None,
        }
    }
}

/// Everything the init process needs; sent by the runtime once the child's namespaces,
/// id maps and cgroups are in place.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InitSpec {
    /// Host name inside the sandbox (the sandbox id).
    pub hostname: String,
    /// Template layers, top first (overlay lower layers, read-only): joined with `:`
    /// into `lowerdir`. The runtime checked that none contains `:`, `,` or a newline.
    pub lower: Vec<PathBuf>,
    /// Overlay upper layer (the sandbox's writable state).
    pub upper: PathBuf,
    /// Overlay work dir (same filesystem as `upper`).
    pub work: PathBuf,
    /// Where the merged root is mounted before `pivot_root`.
    pub merged: PathBuf,
    /// Host directory shared with the sandbox at [`SANDBOX_RUN_DIR`] (agent socket, log).
    pub run_dir: PathBuf,
    /// Host path of the agent binary, bind-mounted read-only into the sandbox.
    pub agent_bin: PathBuf,
    /// Passed on to the agent.
    pub agent: AgentConfig,
}

/// Where the runtime's per-sandbox directory appears inside the sandbox.
pub const SANDBOX_RUN_DIR: &str = "/run/cubicle";
/// The agent binary inside the sandbox.
pub const SANDBOX_AGENT_BIN: &str = "/run/cubicle/cubicle-agent";
/// The agent's socket, relative to the run dir (host and sandbox side alike).
pub const AGENT_SOCKET_NAME: &str = "agent.sock";
/// The agent's log, relative to the run dir.
pub const AGENT_LOG_NAME: &str = "agent.log";
/// File descriptor of the sync channel in the init and agent processes.
pub const SYNC_FD: i32 = 3;

/// Runtime → init.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ToInit {
    /// Set the sandbox up and start the agent.
    Go(Box<InitSpec>),
}

/// Init/agent → runtime.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FromInit {
    /// The agent listens on its socket.
    Ready,
    /// A set-up step failed; the process exits after sending this.
    Failed {
        /// The step, in words ("mount the overlay root").
        step: String,
        /// The error, including errno text.
        message: String,
    },
}

/// Writes one frame.
pub fn write_frame<W: Write, T: Serialize>(w: &mut W, msg: &T) -> io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(io::Error::other)?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    w.write_all(&frame)
}

/// Reads one frame; `Ok(None)` on a clean EOF before the first byte.
pub fn read_frame<R: Read, T: for<'de> Deserialize<'de>>(r: &mut R) -> io::Result<Option<T>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds {MAX_FRAME}"),
        ));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let mut buf = Vec::new();
        let msg = FromInit::Failed {
            step: "mount".into(),
            message: "EPERM".into(),
        };
        write_frame(&mut buf, &msg).unwrap();
        write_frame(&mut buf, &FromInit::Ready).unwrap();
        let mut r = &buf[..];
        assert_eq!(read_frame::<_, FromInit>(&mut r).unwrap(), Some(msg));
        assert_eq!(
            read_frame::<_, FromInit>(&mut r).unwrap(),
            Some(FromInit::Ready)
        );
        assert_eq!(read_frame::<_, FromInit>(&mut r).unwrap(), None);
    }

    #[test]
    fn oversized_and_truncated_frames_are_errors() {
        let mut r = &[0xff, 0xff, 0xff, 0xff][..];
        assert!(read_frame::<_, FromInit>(&mut r).is_err());
        let mut r = &[0, 0, 0, 10, b'{'][..];
        assert!(read_frame::<_, FromInit>(&mut r).is_err());
    }
}
