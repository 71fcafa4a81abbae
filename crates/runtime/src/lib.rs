//! Sandbox runtimes: what turns template layers and a [`SandboxSpec`] into an isolated,
//! running sandbox with an agent inside, and tears it down again.
//!
//! Callers (the CLI, the daemon, tests, benchmarks) only use the [`Runtime`] trait, so a
//! gVisor or KVM runtime can be added beside [`ns::NsRuntime`] (Linux namespaces,
//! cgroups, seccomp, overlayfs) without touching them. Whatever the runtime, the agent
//! inside speaks envd on a unix socket whose host path is [`SandboxInfo::agent_socket`].

#![warn(missing_docs)]

pub mod ns;
pub mod service;

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use cubicle_core::{ErrorKind, Limits, LimitsError, SandboxId};
use serde::{Deserialize, Serialize};

pub use ns::message::{AgentConfig, ServiceConfig, ServiceStatus};

/// What to start.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    /// The new sandbox's id (also its host name).
    pub id: SandboxId,
    /// The template's read-only layers, top first (overlayfs `lowerdir` order): the
    /// template's own root filesystem, then its parent's layers. At least one.
    pub layers: Vec<PathBuf>,
    /// Host uid that the template's root files are owned by (see
    /// [`cubicle_core::uid_map`]); must match the runtime's mapping.
    pub uid_shift: u32,
    /// Resource limits.
    pub limits: Limits,
    /// Size limit of the sandbox's writable layer in MiB (`--writable-layer-size`):
    /// writes beyond it fail with ENOSPC inside. `None`: no limit but the host's disk.
    pub writable_layer_mib: Option<u64>,
    /// What the agent inside needs (env vars, default user, access token).
    pub agent: AgentConfig,
}

/// A sandbox that runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxInfo {
    /// Its id.
    pub id: SandboxId,
    /// Host pid of its first process (the agent).
    pub pid: i32,
    /// The template layers it runs on, top first (the first is the template's own
    /// `rootfs/`); every one of them must stay while the sandbox exists.
    pub layers: Vec<PathBuf>,
    /// The agent's envd socket on the host.
    pub agent_socket: PathBuf,
    /// Whether it is paused ([`Runtime::pause`]): its processes exist but do not run.
    #[serde(default)]
    pub paused: bool,
}

/// A checkpoint a runtime wrote ([`Runtime::checkpoint`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointInfo {
    /// Bytes it takes on disk (memory images and the copy of the writable layer).
    pub size_bytes: u64,
    /// How long the sandbox's processes were stopped for it, microseconds.
    pub frozen_us: u64,
    /// The template layers the sandbox ran on, top first; a restore needs the same.
    pub layers: Vec<PathBuf>,
}

/// Resource usage of a running sandbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SandboxStats {
    /// CPU time used since start, nanoseconds.
    pub cpu_usage_ns: u64,
    /// Memory in use (including page cache), bytes.
    pub memory_bytes: u64,
    /// Memory limit, bytes.
    pub memory_limit_bytes: u64,
    /// Page cache part of `memory_bytes`.
    pub memory_cache_bytes: u64,
    /// Bytes the sandbox has written to its own filesystem layer.
    pub disk_used_bytes: u64,
    /// Tasks (processes and threads) now.
    pub pids: u64,
}

/// Why a runtime operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The limits are out of range.
    #[error("invalid limits")]
    InvalidLimits(#[from] LimitsError),
    /// A template layer does not exist (or none was given).
    #[error("template layer {0} does not exist")]
    TemplateMissing(PathBuf),
    /// The template was prepared for another uid mapping.
    #[error("template files are owned by uid {template}, but sandboxes map root to uid {runtime}; rebuild the template")]
    UidShiftMismatch {
        /// The template's shift.
        template: u32,
        /// The runtime's mapping.
        runtime: u32,
    },
    /// A sandbox with this id already exists.
    #[error("sandbox {0} already exists")]
    AlreadyExists(SandboxId),
    /// No sandbox with this id.
    #[error("sandbox {0} not found")]
    NotFound(SandboxId),
    /// The runtime's own configuration is unusable (missing agent binary, bad paths).
    #[error("runtime configuration: {0}")]
    Config(String),
    /// A cgroup operation failed.
    #[error("cgroup")]
    Cgroup(#[from] ns::cgroup::CgroupError),
    /// A host-side operation failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Starting the sandbox's first process failed before it could report.
    #[error("start sandbox: {step}")]
    Spawn {
        /// The step, in words.
        step: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A set-up step inside the sandbox failed.
    #[error("sandbox init failed to {step}: {message}")]
    Init {
        /// The step, in words.
        step: String,
        /// Why.
        message: String,
    },
    /// The writable-layer quota could not be set up (or its size is out of range).
    #[error(transparent)]
    Quota(#[from] ns::quota::QuotaError),
    /// The agent did not report readiness in time.
    #[error("agent not ready after {0:?}")]
    ReadyTimeout(Duration),
    /// The runtime cannot do this (yet, or on this host); the message says why.
    #[error("{0}")]
    Unsupported(String),
    /// Checkpointing or restoring failed; the message says at which step and why.
    #[error("{op} failed: {message}")]
    Checkpoint {
        /// `"checkpoint"` or `"restore"`.
        op: &'static str,
        /// What went wrong (the checkpoint tool's own error lines, if any).
        message: String,
    },
}

impl RuntimeError {
    /// The coarse kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            RuntimeError::InvalidLimits(_) | RuntimeError::UidShiftMismatch { .. } => {
                ErrorKind::InvalidInput
            }
            RuntimeError::TemplateMissing(_) | RuntimeError::NotFound(_) => ErrorKind::NotFound,
            RuntimeError::AlreadyExists(_) => ErrorKind::Conflict,
            RuntimeError::Config(_)
            | RuntimeError::ReadyTimeout(_)
            | RuntimeError::Unsupported(_) => ErrorKind::Unavailable,
            RuntimeError::Cgroup(e) => e.kind(),
            RuntimeError::Quota(ns::quota::QuotaError::Limit(_)) => ErrorKind::InvalidInput,
            RuntimeError::Quota(ns::quota::QuotaError::Format { .. }) => ErrorKind::Unavailable,
            RuntimeError::Quota(ns::quota::QuotaError::Io { .. }) => ErrorKind::Internal,
            RuntimeError::Io { .. }
            | RuntimeError::Spawn { .. }
            | RuntimeError::Init { .. }
            | RuntimeError::Checkpoint { .. } => ErrorKind::Internal,
        }
    }
}

/// A way of running sandboxes.
#[async_trait]
pub trait Runtime: Send + Sync + std::fmt::Debug {
    /// Short name (`"ns"`).
    fn name(&self) -> &'static str;

    /// Starts a sandbox; returns once its agent answers `GET /health`. A failed create
    /// leaves nothing behind.
    async fn create(&self, spec: SandboxSpec) -> Result<SandboxInfo, RuntimeError>;

    /// Stops every process of the sandbox and removes everything it had. Destroying a
    /// sandbox that does not exist (any more) succeeds.
    async fn destroy(&self, id: &SandboxId) -> Result<(), RuntimeError>;

    /// The sandboxes that run now.
    async fn list(&self) -> Result<Vec<SandboxInfo>, RuntimeError>;

    /// Ids of every sandbox the runtime holds any state for (directory, cgroup), running
    /// or not: what a reconcile must either adopt or destroy.
    async fn residues(&self) -> Result<Vec<SandboxId>, RuntimeError>;

    /// Current resource usage of a running sandbox.
    async fn stats(&self, id: &SandboxId) -> Result<SandboxStats, RuntimeError>;

    /// Stops every process of the sandbox where it is, memory kept; returns once none
    /// runs. Its agent does not answer until [`Runtime::resume`]. Pausing a paused
    /// sandbox succeeds; destroying one works as for a running sandbox.
    async fn pause(&self, id: &SandboxId) -> Result<(), RuntimeError>;

    /// Lets a paused sandbox's processes run again. Resuming a sandbox that is not
    /// paused succeeds.
    async fn resume(&self, id: &SandboxId) -> Result<(), RuntimeError>;

    /// Writes a checkpoint of sandbox `id` into the directory `dir`, which must not exist:
    /// the memory and state of every process and the sandbox's writable filesystem. The
    /// sandbox keeps running; its processes are stopped only while the copy is made (a
    /// paused sandbox stays paused). On error `dir` does not exist and the sandbox runs on
    /// as before.
    async fn checkpoint(&self, id: &SandboxId, dir: &Path) -> Result<CheckpointInfo, RuntimeError>;

    /// Starts a new sandbox from the checkpoint in `dir`, every process as it was, with
    /// `spec`'s id (and host name), limits and agent configuration (access token, env
    /// vars); `spec.layers` must be the checkpoint's. Returns once its agent answers. The
    /// checkpoint is only read, so it can be restored any number of times. A failed
    /// restore leaves nothing behind.
    async fn restore(&self, dir: &Path, spec: SandboxSpec) -> Result<SandboxInfo, RuntimeError>;

    /// Gets ready, in the background, to create sandboxes on these template layers with
    /// this agent configuration quickly (the `ns` runtime starts the template's warm
    /// interpreter). `create` works without it. The default does nothing.
    fn prepare(&self, _layers: &[PathBuf], _agent: &AgentConfig) {}
}
