//! The `ns` runtime: sandboxes made of Linux namespaces (user, mount, pid, uts, ipc,
//! network, cgroup), a cgroup with limits, a seccomp filter, a reduced capability set and
//! an overlayfs root whose lower layers are the template's (top first; one unless the
//! template is a layer on a parent).
//!
//! **Create** (this module, host side) → [`NsRuntime::create`]:
//! 1. directories: `sandboxes/<id>/{upper,work,rootfs,run}`, owned by the sandbox's root;
//! 2. cgroup with the limits;
//! 3. `clone()` into new namespaces; the child waits on the sync channel
//!    ([`message`]), the parent writes its uid/gid maps, protects it from the OOM killer,
//!    moves it into the cgroup and sends `Go`;
//! 4. the child executes `cubicle-agent init` ([`init`]), which builds the root, pivots
//!    into it, applies the security settings ([`security`]) and executes the agent from
//!    inside the sandbox; the agent binds its socket and reports `Ready`.
//!
//! **Destroy**: SIGKILL to the sandbox's pid 1 (the kernel then kills every process of
//! its pid namespace), reap, remove the cgroup and the directory. All mounts live only in
//! the sandbox's mount namespace, so they vanish with it; the one exception is the
//! writable layer of a sandbox with a size limit, a filesystem of its own mounted under
//! its directory ([`quota`]), which the destroy unmounts.

mod agent_store;
pub mod cgroup;
pub mod checkpoint;
pub mod init;
pub mod message;
pub mod quota;
pub mod security;
mod sys;
mod tree_copy;
pub mod zygote;

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use cubicle_core::{uid_map, DataDir, SandboxId};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use crate::{Runtime, RuntimeError, SandboxInfo, SandboxSpec, SandboxStats};
use cgroup::CgroupManager;
use message::{FromInit, InitSpec, ToInit, AGENT_SOCKET_NAME};

/// How the `ns` runtime is set up on this host.
#[derive(Debug, Clone)]
pub struct NsConfig {
    /// The data directory (sandboxes' writable layers live under it).
    pub data_dir: DataDir,
    /// The `cubicle-agent` binary (statically linked).
    pub agent_bin: PathBuf,
    /// Name of the parent cgroup of all sandboxes.
    pub cgroup_parent: String,
    /// How long a create may wait for the agent to report readiness.
    pub ready_timeout: Duration,
}

impl NsConfig {
    /// Defaults for a data dir and agent binary: the data dir's own cgroup parent
    /// ([`cgroup_parent_for`]), 10 s ready timeout.
    pub fn new(data_dir: DataDir, agent_bin: PathBuf) -> Self {
        NsConfig {
            cgroup_parent: cgroup_parent_for(&data_dir),
            data_dir,
            agent_bin,
            ready_timeout: Duration::from_secs(10),
        }
    }
}

/// The cgroup parent of a data dir's sandboxes: `cubicle` for the default data dir,
/// `cubicle-<8 hex digits of a hash of its path>` for any other. Each data dir gets its
/// own, so a runtime reconciling one data dir never mistakes another's sandboxes for
/// strays.
pub fn cgroup_parent_for(data_dir: &DataDir) -> String {
    let root = data_dir.root();
    if root == Path::new(DataDir::DEFAULT) {
        return "cubicle".into();
    }
    // FNV-1a: stable across builds and platforms (std's hasher is not).
    let hash = root
        .as_os_str()
        .as_encoded_bytes()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        });
    format!("cubicle-{:08x}", hash as u32)
}

/// Namespaces a sandbox gets at clone time (the cgroup namespace is created by init,
/// after the runtime moved it into its cgroup).
const CLONE_FLAGS: libc::c_int = libc::CLONE_NEWUSER
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWNET;

/// Longest unix socket path (`sun_path` minus the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// What is kept about each sandbox on disk (`runtime.json`), enough to find its process
/// again after the creating process is gone.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RuntimeRecord {
    pid: i32,
    /// The top template layer (the template's own rootfs). Kept so records stay
    /// readable by runtimes that predate layers.
    rootfs: PathBuf,
    /// Every template layer the sandbox runs on, top first (so templates in use are not
    /// deleted). Absent in records written before layers: then `[rootfs]`.
    #[serde(default)]
    layers: Vec<PathBuf>,
    /// Start time of `pid` in clock ticks since boot (`/proc/<pid>/stat` field 22), so a
    /// recycled pid is never mistaken for the sandbox.
    start_time: u64,
    /// The stored agent binary it runs (see `agent_store`), which its checkpoints name.
    /// Absent in records written before agents were stored by content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    agent_bin: Option<PathBuf>,
}

impl RuntimeRecord {
    /// The layers, top first, whichever format the record has.
    fn layers(&self) -> Vec<PathBuf> {
        if self.layers.is_empty() {
            vec![self.rootfs.clone()]
        } else {
            self.layers.clone()
        }
    }
}

/// Creates the directory `dir` with `mode`, owned by the sandbox's root (host uid and
/// gid `shift`).
fn create_sandbox_owned_dir(dir: &Path, mode: u32, shift: u32) -> Result<(), RuntimeError> {
    std::fs::DirBuilder::new()
        .mode(mode)
        .create(dir)
        .map_err(io_error("create", dir))?;
    std::os::unix::fs::chown(dir, Some(shift), Some(shift)).map_err(io_error("chown", dir))
}

/// The overlay's work directory (unless it is on the sandbox's own layer filesystem,
/// made with it), the root's mount point and the run directory, owned by the sandbox's root
/// (host uid `shift`), and the agent binary's mount point.
fn create_mount_dirs(paths: &SandboxPaths, shift: u32) -> Result<(), RuntimeError> {
    if !paths.has_own_layer_fs() {
        create_sandbox_owned_dir(&paths.work, 0o700, shift)?;
    }
    for (dir, mode) in [(&paths.merged, 0o755), (&paths.run, 0o700)] {
        create_sandbox_owned_dir(dir, mode, shift)?;
    }
    std::fs::File::create(&paths.agent_mount_point)
        .map_err(io_error("create", &paths.agent_mount_point))?;
    Ok(())
}

/// Checks the template layers of a spec: at least one, each an existing directory whose
/// path overlayfs' options can carry (absolute, UTF-8, no `:` `,` or newline).
fn check_layers(layers: &[PathBuf]) -> Result<(), RuntimeError> {
    let Some(top) = layers.first() else {
        return Err(RuntimeError::TemplateMissing(PathBuf::new()));
    };
    if layers.len() > MAX_LAYERS {
        return Err(RuntimeError::Config(format!(
            "{} template layers on {}, at most {MAX_LAYERS} are supported",
            layers.len(),
            top.display()
        )));
    }
    for layer in layers {
        let usable = layer.is_absolute()
            && layer
                .to_str()
                .is_some_and(|s| !s.contains([':', ',', '\n', '\\']));
        if !usable {
            return Err(RuntimeError::Config(format!(
                "template layer {:?} must be an absolute UTF-8 path without ':', ',', '\\' or newlines (overlayfs options)",
                layer
            )));
        }
        if !layer.is_dir() {
            return Err(RuntimeError::TemplateMissing(layer.clone()));
        }
    }
    Ok(())
}

/// Most template layers one sandbox may stack (overlayfs allows far more; the mount
/// options must fit in a page).
const MAX_LAYERS: usize = 16;

/// A sandbox this process started: its pidfd lets us kill and reap it without races.
#[derive(Debug)]
struct Live {
    pidfd: OwnedFd,
}

/// The Linux-namespace runtime.
#[derive(Debug)]
pub struct NsRuntime {
    config: NsConfig,
    cgroups: Box<dyn CgroupManager>,
    live: Mutex<HashMap<SandboxId, Live>>,
    zygotes: std::sync::Arc<zygote::ZygotePool>,
    /// Ready-made and retiring filesystems of limited writable layers.
    layers: std::sync::Arc<quota::LayerPool>,
}

impl Drop for NsRuntime {
    /// Ready layers are mounts: they go with the runtime.
    fn drop(&mut self) {
        self.layers.drain();
    }
}

/// Paths of one sandbox on the host.
#[derive(Debug)]
struct SandboxPaths {
    dir: PathBuf,
    /// The writable layer: `dir/upper`, or, for a sandbox with a writable-layer limit,
    /// `dir/layer/upper` on its own filesystem ([`quota`]).
    upper: PathBuf,
    /// The overlay's work directory (next to `upper`).
    work: PathBuf,
    merged: PathBuf,
    run: PathBuf,
    agent_mount_point: PathBuf,
    socket: PathBuf,
    record: PathBuf,
    /// Which files of `upper` are those of a checkpoint's copy (`tree_copy::LayerOrigin`).
    layer_origin: PathBuf,
    /// A restored sandbox's layer below `upper`: hard links to the checkpoint's copy of
    /// the layer (absent for a sandbox created from its template).
    base: PathBuf,
}

impl SandboxPaths {
    fn new(data: &DataDir, id: &SandboxId) -> Self {
        let dir = data.sandbox(id);
        let run = dir.join("run");
        let layer = quota::LayerFs::of(&dir);
        let (upper, work) = match layer.exists() {
            true => (layer.upper(), layer.work()),
            false => (dir.join("upper"), dir.join("work")),
        };
        SandboxPaths {
            upper,
            work,
            merged: dir.join("rootfs"),
            agent_mount_point: run.join("cubicle-agent"),
            socket: run.join(AGENT_SOCKET_NAME),
            record: dir.join("runtime.json"),
            layer_origin: dir.join("layer-origin.json"),
            base: dir.join("base"),
            run,
            dir,
        }
    }

    /// Whether the writable layer is on a filesystem of its own (a sandbox with a
    /// limit, see [`quota`]).
    fn has_own_layer_fs(&self) -> bool {
        self.upper != self.dir.join("upper")
    }
}

fn io_error<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> RuntimeError + 'a {
    move |source| RuntimeError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

impl NsRuntime {
    /// Checks the configuration and the host (agent binary, paths, cgroups).
    pub fn new(mut config: NsConfig) -> Result<Self, RuntimeError> {
        let agent = &config.agent_bin;
        match std::fs::metadata(agent) {
            Ok(md) if md.is_file() && md.permissions().mode() & 0o001 != 0 => {}
            Ok(_) => {
                return Err(RuntimeError::Config(format!(
                    "agent binary {} is not a world-executable file",
                    agent.display()
                )))
            }
            Err(e) => {
                return Err(RuntimeError::Config(format!(
                    "agent binary {}: {e}",
                    agent.display()
                )))
            }
        }
        let root = config.data_dir.root();
        let root_str = root.to_str().ok_or_else(|| {
            RuntimeError::Config(format!("data dir {} is not UTF-8", root.display()))
        })?;
        if !root.is_absolute() || root_str.contains([',', ':', '\n']) {
            return Err(RuntimeError::Config(format!(
                "data dir {root_str:?} must be an absolute path without ',' or ':' (overlayfs options)"
            )));
        }
        let longest = SandboxPaths::new(
            &config.data_dir,
            &"a".repeat(SandboxId::MAX_LEN).parse().expect("valid id"),
        )
        .socket;
        if longest.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(RuntimeError::Config(format!(
                "data dir {root_str:?} is too long: agent socket paths would exceed {MAX_SOCKET_PATH} bytes"
            )));
        }
        let cgroups = cgroup::detect(&config.cgroup_parent)?;
        for dir in [root.to_owned(), config.data_dir.sandboxes()] {
            make_traversable_dir(&dir)?;
        }
        // Sandboxes run the stored copy, which no upgrade replaces (see agent_store).
        config.agent_bin = agent_store::install(&config.data_dir, &config.agent_bin)?;
        let zygotes = std::sync::Arc::new(zygote::ZygotePool::new(
            config.data_dir.clone(),
            config.agent_bin.clone(),
        ));
        let layers = std::sync::Arc::new(quota::LayerPool::new(config.data_dir.clone()));
        Ok(NsRuntime {
            config,
            cgroups,
            live: Mutex::new(HashMap::new()),
            zygotes,
            layers,
        })
    }

    /// Which cgroup layout this host uses (`"v1"` or `"v2"`).
    pub fn cgroup_version(&self) -> &'static str {
        self.cgroups.version()
    }

    /// The host path of a cgroup controller file of a sandbox (e.g. `pids.events`).
    pub fn cgroup_file(&self, id: &SandboxId, file: &str) -> PathBuf {
        self.cgroups.file(id.as_str(), file)
    }

    /// Names of sandbox cgroups that exist (for leak checks).
    pub fn cgroup_names(&self) -> Result<Vec<String>, RuntimeError> {
        Ok(self.cgroups.list()?)
    }

    /// Removes the ready-made layer filesystems of limited sandboxes (mounts) and waits
    /// for layers being made or removed in the background; also done when the runtime is
    /// dropped. Later limited creates still work, each making its own layer.
    pub fn drain_layer_pool(&self) {
        self.layers.drain();
    }

    /// Bytes in use and total bytes of the writable layer of a sandbox with a limit
    /// (its own filesystem, see [`quota`]); `None` for a sandbox without one.
    pub fn layer_usage(&self, id: &SandboxId) -> Result<Option<(u64, u64)>, RuntimeError> {
        let layer = quota::LayerFs::of(&self.config.data_dir.sandbox(id));
        if !layer.exists() {
            return Ok(None);
        }
        layer
            .usage()
            .map(Some)
            .map_err(io_error("measure", &layer.mount))
    }

    fn prepare_dirs(
        &self,
        spec: &SandboxSpec,
        paths: &mut SandboxPaths,
    ) -> Result<(), RuntimeError> {
        match std::fs::DirBuilder::new().mode(0o711).create(&paths.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(RuntimeError::AlreadyExists(spec.id.clone()))
            }
            Err(e) => return Err(io_error("create", &paths.dir)(e)),
        }
        self.make_writable_layer(spec, paths)?;
        // The sandbox's /dev and /run start empty whatever the template has there (init
        // fills them): opaque directories of the writable layer, which a checkpoint
        // copies, unlike a tmpfs (see `init::SpecialDirs`).
        for dir in ["dev", "run"] {
            let dir = paths.upper.join(dir);
            create_sandbox_owned_dir(&dir, 0o755, spec.uid_shift)?;
            sys::set_overlay_opaque(&dir).map_err(io_error("mark opaque", &dir))?;
        }
        create_mount_dirs(paths, spec.uid_shift)
    }

    /// The sandbox's (empty) writable layer: `upper/` in its directory, or, with a limit,
    /// on a filesystem of its own of the limit's size.
    fn make_writable_layer(
        &self,
        spec: &SandboxSpec,
        paths: &mut SandboxPaths,
    ) -> Result<(), RuntimeError> {
        match spec.writable_layer_mib {
            None => create_sandbox_owned_dir(&paths.upper, 0o755, spec.uid_shift),
            Some(mib) => {
                let layer = quota::LayerFs::of(&paths.dir);
                self.layers.provide(&layer, mib, spec.uid_shift)?;
                paths.upper = layer.upper();
                paths.work = layer.work();
                Ok(())
            }
        }
    }

    /// Clones the sandbox's first process and drives it to `Ready`.
    async fn start(
        &self,
        spec: &SandboxSpec,
        paths: &SandboxPaths,
    ) -> Result<(i32, OwnedFd), (RuntimeError, Option<OwnedFd>)> {
        let (mut host, child) =
            StdUnixStream::pair().map_err(|e| (spawn_error("create the sync socket")(e), None))?;
        // A template zygote's mount namespace is private: it does not see the mount of a
        // limited sandbox's layer, so such a sandbox is cloned the ordinary way.
        let zygote = match spec.agent.code_interpreter && !paths.has_own_layer_fs() {
            true => self.zygotes.get(&spec.layers).await,
            false => None,
        };
        let join = self.cgroups.join(spec.id.as_str());
        let forked = match zygote {
            Some(zygote) => self.spawn_from_zygote(&zygote, &child, &join).await,
            None => None,
        };
        let from_zygote = forked.is_some();
        let (pid, pidfd) = match forked {
            Some(forked) => forked,
            None => {
                let self_join = match &join {
                    cgroup::Join::SelfJoin(files) => files.as_slice(),
                    cgroup::Join::RuntimeWrites => &[],
                };
                let exec = sys::ChildExec::new(
                    &self.config.agent_bin,
                    &["cubicle-agent", "init"],
                    &[],
                    self_join,
                )
                .map_err(|e| (spawn_error("prepare execve")(e), None))?;
                sys::clone_into_namespaces(CLONE_FLAGS, child.as_raw_fd(), &exec)
                    .map_err(|e| (spawn_error("clone into new namespaces")(e), None))?
            }
        };
        drop(child);

        let prepared = (|| {
            if !from_zygote {
                // A zygote writes the maps itself: it owns the parent user namespace.
                let map = format!("0 {} {}\n", spec.uid_shift, uid_map::RANGE);
                for file in ["uid_map", "gid_map"] {
                    let path = PathBuf::from(format!("/proc/{pid}/{file}"));
                    std::fs::write(&path, &map).map_err(io_error("write", &path))?;
                }
            }
            shield_from_oom_killer(pid);
            if join == cgroup::Join::RuntimeWrites {
                self.cgroups.add_process(spec.id.as_str(), pid)?;
            }
            let record = RuntimeRecord {
                pid,
                rootfs: spec.layers[0].clone(),
                layers: spec.layers.clone(),
                start_time: process_start_time(pid)
                    .map_err(io_error("read start time of", Path::new("/proc")))?,
                agent_bin: Some(self.config.agent_bin.clone()),
            };
            write_json(&paths.record, &record)?;
            // A zygote's child sees the host's tree under zygote::HOST_DIR, where an
            // absolute symlink would point back into the template: resolve them here.
            let host_path = |p: &Path| match from_zygote {
                true => zygote::host_view(p),
                false => p.to_owned(),
            };
            let mut agent = spec.agent.clone();
            if from_zygote {
                agent.warm_python = Some(message::WarmPython {
                    zygote_fd: zygote::SANDBOX_ZYGOTE_FD,
                    kernel_fd: zygote::SANDBOX_KERNEL_FD,
                });
            }
            let go = ToInit::Go(Box::new(InitSpec {
                hostname: spec.id.to_string(),
                lower: spec.layers.iter().map(|l| host_path(l)).collect(),
                upper: host_path(&paths.upper),
                work: host_path(&paths.work),
                merged: host_path(&paths.merged),
                run_dir: host_path(&paths.run),
                agent_bin: host_path(&self.config.agent_bin),
                agent,
            }));
            message::write_frame(&mut host, &go).map_err(spawn_error("send go to init"))
        })();
        if let Err(e) = prepared {
            return Err((e, Some(pidfd)));
        }

        let waiting = std::time::Instant::now();
        let report = tokio::time::timeout(self.config.ready_timeout, read_report(host)).await;
        tracing::debug!(sandbox = %spec.id, took = ?waiting.elapsed(), "go to ready");
        match report {
            Ok(Ok(Some(FromInit::Ready))) => {
                // Ready means the socket listens; one real round trip proves envd answers.
                match cubicle_envd::client::EnvdClient::new(&paths.socket)
                    .health()
                    .await
                {
                    Ok(status) if status.is_success() => Ok((pid, pidfd)),
                    Ok(status) => Err((
                        RuntimeError::Init {
                            step: "answer the first health check".into(),
                            message: format!("agent answered {status}"),
                        },
                        Some(pidfd),
                    )),
                    Err(e) => Err((
                        RuntimeError::Init {
                            step: "answer the first health check".into(),
                            message: e.to_string(),
                        },
                        Some(pidfd),
                    )),
                }
            }
            Ok(Ok(Some(FromInit::Failed { step, message }))) => {
                Err((RuntimeError::Init { step, message }, Some(pidfd)))
            }
            Ok(Ok(None)) => {
                // The child died without a word: the exit code tells which early step.
                let reaped = wait_exit(&pidfd).await;
                let err = match reaped {
                    Ok(Some(sys::ExitStatus::Exited(code))) => match sys::child_exit::step(code) {
                        Some(step) => RuntimeError::Spawn {
                            step,
                            source: io::Error::other(format!("child exited with {code}")),
                        },
                        None => RuntimeError::Init {
                            step: "start".into(),
                            message: format!("exited with status {code} before reporting"),
                        },
                    },
                    Ok(Some(sys::ExitStatus::Signaled(sig))) => RuntimeError::Init {
                        step: "start".into(),
                        message: format!("killed by signal {sig} before reporting"),
                    },
                    Ok(None) | Err(_) => RuntimeError::Init {
                        step: "start".into(),
                        message: "closed the sync channel without reporting".into(),
                    },
                };
                Err((err, Some(pidfd)))
            }
            Ok(Err(e)) => Err((spawn_error("read the init report")(e), Some(pidfd))),
            Err(_) => Err((
                RuntimeError::ReadyTimeout(self.config.ready_timeout),
                Some(pidfd),
            )),
        }
    }

    /// Has a template zygote fork the sandbox's first process (see [`zygote`]) with
    /// `child` as its sync socket. `None` (logged) when the zygote failed: the caller
    /// then clones it the ordinary way.
    async fn spawn_from_zygote(
        &self,
        zygote: &std::sync::Arc<zygote::Zygote>,
        child: &StdUnixStream,
        join: &cgroup::Join,
    ) -> Option<(i32, OwnedFd)> {
        let sync = match child.try_clone() {
            Ok(s) => OwnedFd::from(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot pass the sync socket to the zygote");
                return None;
            }
        };
        // As a cloned child would, it joins its cgroups itself (through files we open:
        // it is not host root).
        let join_files = match join {
            cgroup::Join::SelfJoin(files) => files.as_slice(),
            cgroup::Join::RuntimeWrites => &[],
        };
        let init = zygote::InitCommand {
            program: zygote::host_view(&self.config.agent_bin),
            argv: vec!["cubicle-agent".into(), "init".into()],
            join: join_files.to_vec(),
        };
        let started = std::time::Instant::now();
        let pid = match zygote.spawn(sync, &init).await {
            Ok(pid) => {
                tracing::debug!(pid, took = ?started.elapsed(), "forked by the template zygote");
                pid
            }
            Err(e) => {
                tracing::warn!(error = %e, "template zygote failed a spawn; replacing it");
                self.zygotes.discard(zygote).await;
                return None;
            }
        };
        match sys::pidfd_open(pid) {
            Ok(pidfd) => Some((pid, pidfd)),
            Err(e) => {
                tracing::warn!(pid, error = %e, "the zygote's sandbox process vanished");
                None
            }
        }
    }

    /// Kills the sandbox's processes, waits for them, removes its cgroup and directory.
    async fn tear_down(&self, id: &SandboxId, pidfd: Option<OwnedFd>) -> Result<(), RuntimeError> {
        let paths = SandboxPaths::new(&self.config.data_dir, id);
        if let Some(pidfd) = pidfd {
            sys::pidfd_kill(&pidfd, libc::SIGKILL).map_err(io_error("kill", &paths.dir))?;
            // A paused sandbox's processes only act on the SIGKILL once thawed; they
            // never run user code again (a pending SIGKILL is handled first).
            if self.cgroups.freezer_state(id.as_str()).ok() != Some(cgroup::FreezerState::Thawed) {
                let _ = cgroup::thaw(self.cgroups.as_ref(), id.as_str());
            }
            wait_exit(&pidfd)
                .await
                .map_err(io_error("wait for", &paths.dir))?;
        }
        self.remove_cgroup(id).await?;
        let layer = quota::LayerFs::of(&paths.dir);
        if layer.exists() {
            self.layers.discard(&layer);
        }
        match std::fs::remove_dir_all(&paths.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error("remove", &paths.dir)(e)),
        }
    }

    /// Removes the sandbox's cgroup once the kernel has finished tearing its processes
    /// down (the last tasks of a killed pid namespace can linger for a moment).
    async fn remove_cgroup(&self, id: &SandboxId) -> Result<(), RuntimeError> {
        const ATTEMPTS: u32 = 2000;
        for attempt in 0.. {
            match self.cgroups.remove(id.as_str()) {
                Err(cgroup::CgroupError::Busy(_)) if attempt < ATTEMPTS => {
                    for pid in self.cgroups.processes(id.as_str())? {
                        // SAFETY: kill(2) with a pid read from the sandbox's own cgroup.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                    tokio::task::yield_now().await;
                }
                other => return Ok(other?),
            }
        }
        unreachable!("loop returns")
    }

    /// Freezes the sandbox (unless it is paused), dumps it with CRIU, copies its writable
    /// layer and agent log, thaws it. Returns how long it was frozen.
    async fn checkpoint_into(
        &self,
        id: &SandboxId,
        pid: i32,
        paths: &SandboxPaths,
        dir: &Path,
    ) -> Result<u64, RuntimeError> {
        let was_paused = matches!(
            self.cgroups.freezer_state(id.as_str()),
            Ok(cgroup::FreezerState::Frozen)
        );
        const ATTEMPTS: u32 = 3;
        let mut attempt = 1;
        // A paused sandbox is dumped as it is: `pause` ended the host's connections
        // before freezing, and the proxy opens none to a paused sandbox.
        let mut frozen = was_paused;
        // Which layer files the last checkpoint (or the restore) holds: read before the
        // freeze, and the new one written after the thaw, so neither adds to the pause.
        let origin: Option<tree_copy::LayerOrigin> = std::fs::read(&paths.layer_origin)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok());
        loop {
            // Connections from the host cannot be in a checkpoint: have the agent end
            // them, then freeze.
            if !frozen {
                checkpoint::quiesce_agent(&paths.socket).await?;
            }
            let started = std::time::Instant::now();
            if !frozen {
                cgroup::freeze(self.cgroups.as_ref(), id.as_str()).await?;
            }
            let dumped = self.dump_frozen(id, pid, paths, dir, origin.clone()).await;
            let retry = attempt < ATTEMPTS
                && matches!(&dumped, Err(e) if checkpoint::is_transient_dump_error(e));
            if !was_paused || retry {
                cgroup::thaw(self.cgroups.as_ref(), id.as_str())?;
                frozen = false;
            }
            match dumped {
                Ok(new_origin) => {
                    let frozen_us = checkpoint::micros_since(started);
                    // Not worth failing the checkpoint over: without it the next one
                    // copies every file.
                    let _ = write_json(&paths.layer_origin, &new_origin);
                    return Ok(frozen_us);
                }
                // A passing failure (a host connection that arrived after the quiesce,
                // or one a paused sandbox kept; a process caught mid-fork): try again. A
                // paused sandbox runs for that moment and is frozen again for the dump.
                Err(_) if retry => {
                    tracing::debug!(sandbox = %id, attempt, "transient checkpoint failure; retrying");
                    let _ = std::fs::remove_dir_all(dir.join("images"));
                    let _ = std::fs::remove_dir_all(dir.join("upper"));
                    attempt += 1;
                }
                Err(e) => {
                    if was_paused && !frozen {
                        cgroup::freeze(self.cgroups.as_ref(), id.as_str()).await?;
                    }
                    return Err(e);
                }
            }
        }
    }

    /// Dumps the frozen sandbox's processes with CRIU and copies its writable layer (files
    /// `origin` holds unchanged are linked) and agent log next to the images. Returns the
    /// origin of the layer for the next checkpoint.
    async fn dump_frozen(
        &self,
        id: &SandboxId,
        pid: i32,
        paths: &SandboxPaths,
        dir: &Path,
        origin: Option<tree_copy::LayerOrigin>,
    ) -> Result<tree_copy::LayerOrigin, RuntimeError> {
        let images = dir.join("images");
        let args = checkpoint::dump_args(
            pid,
            &images,
            &self.cgroups.freezer_dir(id.as_str()),
            &init::host_bind_mounts(),
        );
        let (upper, run, dir) = (paths.upper.clone(), paths.run.clone(), dir.to_owned());
        let base = paths.base.clone();
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir(&images).map_err(io_error("create", &images))?;
            let log = images.join("dump.log");
            let mut criu = std::process::Command::new(checkpoint::criu_binary());
            // Code-interpreter processes map files of the template zygote's mount
            // namespace, which are the same files under the sandbox's root
            // (scripts/criu-patches/0001).
            criu.env("CRIU_FOREIGN_MNT_FALLBACK", "1");
            checkpoint::run_criu("checkpoint", criu, &args, &log)?;
            // While still frozen: the files must be what the processes' memory expects.
            // What is unchanged since the last checkpoint (or the restore) is linked.
            let copy = dir.join("upper");
            let copied = if base.is_dir() {
                // A restored sandbox: its base layer and its writable layer, flattened.
                checkpoint::link_tree(&base, &copy)?;
                checkpoint::merge_upper(&upper, &copy, origin.as_ref())?
            } else {
                checkpoint::copy_tree(&upper, &copy, origin.as_ref())?
            };
            tracing::debug!(
                copied = copied.copied_bytes,
                linked = copied.reused_bytes,
                "writable layer copied"
            );
            let agent_log = run.join("agent.log");
            if agent_log.exists() {
                checkpoint::copy_tree(&agent_log, &dir.join("agent.log"), None)?;
            }
            Ok::<_, RuntimeError>(copied.source_origin(&copy))
        })
        .await
        .map_err(|e| RuntimeError::Checkpoint {
            op: "checkpoint",
            message: e.to_string(),
        })
        .and_then(|r| r)
    }

    /// Builds the new sandbox's directories and cgroups from the checkpoint in `dir` and
    /// restores its processes; returns its pid 1 once the agent answers.
    async fn restore_into(
        &self,
        dir: &Path,
        agent_bin: &Path,
        spec: &SandboxSpec,
        paths: &mut SandboxPaths,
    ) -> Result<(i32, OwnedFd), (RuntimeError, Option<OwnedFd>)> {
        let shift = spec.uid_shift;
        let prepared = (|| {
            // The checkpoint's layer, never written, becomes the sandbox's base layer
            // by hard links; the writable layer above it starts empty (on a filesystem
            // of the spec's limit, if it has one).
            checkpoint::link_tree(&dir.join("upper"), &paths.base)?;
            self.make_writable_layer(spec, paths)?;
            checkpoint::write_host_files(&paths.upper, spec.id.as_str(), shift)?;
            create_mount_dirs(paths, shift)?;
            let agent_log = dir.join("agent.log");
            if agent_log.exists() {
                checkpoint::copy_tree(&agent_log, &paths.run.join("agent.log"), None)?;
            }
            // The images as the checkpoint has them, but for the new host name.
            let images = paths.dir.join("restore-images");
            std::fs::create_dir(&images).map_err(io_error("create", &images))?;
            let source = dir.join("images");
            for entry in std::fs::read_dir(&source).map_err(io_error("read", &source))? {
                let entry = entry.map_err(io_error("read", &source))?;
                let name = entry.file_name();
                let target = images.join(&name);
                if name.to_string_lossy().starts_with("utsns-") {
                    let image =
                        std::fs::read(entry.path()).map_err(io_error("read", &entry.path()))?;
                    let rewritten =
                        checkpoint::rewrite_utsns(&image, spec.id.as_str()).map_err(|message| {
                            RuntimeError::Checkpoint {
                                op: "restore",
                                message,
                            }
                        })?;
                    std::fs::write(&target, rewritten).map_err(io_error("write", &target))?;
                } else if name != "dump.log" {
                    // Hard links (CRIU opens some images from inside the restored
                    // mount namespace, where a symlink's target does not exist); a
                    // copy when the checkpoint is on another filesystem.
                    if std::fs::hard_link(entry.path(), &target).is_err() {
                        std::fs::copy(entry.path(), &target).map_err(io_error("copy", &target))?;
                    }
                }
            }
            self.cgroups.create(spec.id.as_str(), &spec.limits)?;
            Ok::<_, RuntimeError>(images)
        })();
        let images = prepared.map_err(|e| (e, None))?;

        let pidfile = paths.dir.join("restore.pid");
        let args = checkpoint::restore_args(
            &images,
            &paths.merged,
            &pidfile,
            &init::host_bind_mounts(),
            &checkpoint::RestoreMounts {
                run_dir: paths.run.clone(),
                agent_bin: agent_bin.to_owned(),
            },
        );
        let lower: Vec<PathBuf> = std::iter::once(paths.base.clone())
            .chain(spec.layers.iter().cloned())
            .collect();
        let options = init::overlay_options(&lower, &paths.upper, &paths.work)
            .map_err(|e| (spawn_error("build the overlay options")(e), None))?;
        let mut cmd = std::process::Command::new(checkpoint::criu_binary());
        let cgroup_files = self.cgroups.self_move_files(spec.id.as_str());
        sys::restore_pre_exec(&mut cmd, &cgroup_files, &paths.merged, &options).map_err(|e| {
            (
                spawn_error("prepare the restore's mount namespace")(e),
                None,
            )
        })?;
        let log = images.join("restore.log");
        let restored =
            tokio::task::spawn_blocking(move || checkpoint::run_criu("restore", cmd, &args, &log))
                .await
                .map_err(|e| RuntimeError::Checkpoint {
                    op: "restore",
                    message: e.to_string(),
                })
                .and_then(|r| r);
        let pid = restored
            .and_then(|()| {
                std::fs::read_to_string(&pidfile)
                    .map_err(io_error("read", &pidfile))?
                    .trim()
                    .parse::<i32>()
                    .map_err(|e| RuntimeError::Checkpoint {
                        op: "restore",
                        message: format!("criu wrote no pid: {e}"),
                    })
            })
            .map_err(|e| (e, None))?;
        let pidfd =
            sys::pidfd_open(pid).map_err(|e| (io_error("open pidfd of", &pidfile)(e), None))?;
        let finish = async {
            let record = RuntimeRecord {
                pid,
                rootfs: spec.layers[0].clone(),
                layers: spec.layers.clone(),
                start_time: process_start_time(pid)
                    .map_err(io_error("read start time of", Path::new("/proc")))?,
                agent_bin: Some(agent_bin.to_owned()),
            };
            write_json(&paths.record, &record)?;
            let _ = std::fs::remove_dir_all(&images);
            let _ = std::fs::remove_file(&pidfile);
            // The agent's socket is restored listening; wait for its first answer.
            let deadline = tokio::time::Instant::now() + self.config.ready_timeout;
            let client = cubicle_envd::client::EnvdClient::new(&paths.socket);
            loop {
                match client.health().await {
                    Ok(status) if status.is_success() => break,
                    _ if tokio::time::Instant::now() >= deadline => {
                        return Err(RuntimeError::ReadyTimeout(self.config.ready_timeout))
                    }
                    _ => tokio::time::sleep(std::time::Duration::from_millis(1)).await,
                }
            }
            // The checkpoint's agent still has the source's token and env vars.
            checkpoint::set_agent_identity(&paths.socket, &message::AgentIdentity::of(&spec.agent))
                .await
        };
        match finish.await {
            Ok(()) => Ok((pid, pidfd)),
            Err(e) => Err((e, Some(pidfd))),
        }
    }

    /// The end of a create or restore: the sandbox is tracked and described, or, if it
    /// failed, everything it had is removed.
    async fn started(
        &self,
        spec: SandboxSpec,
        paths: SandboxPaths,
        outcome: Result<(i32, OwnedFd), (RuntimeError, Option<OwnedFd>)>,
    ) -> Result<SandboxInfo, RuntimeError> {
        if let Some(mib) = spec.writable_layer_mib {
            self.layers.top_up(mib, spec.uid_shift);
        }
        match outcome {
            Ok((pid, pidfd)) => {
                self.live
                    .lock()
                    .expect("live map poisoned")
                    .insert(spec.id.clone(), Live { pidfd });
                Ok(SandboxInfo {
                    id: spec.id,
                    pid,
                    layers: spec.layers,
                    agent_socket: paths.socket,
                    paused: false,
                })
            }
            Err((err, pidfd)) => {
                if let Err(cleanup) = self.tear_down(&spec.id, pidfd).await {
                    tracing::error!(sandbox = %spec.id, error = %cleanup, "cleanup after a failed start");
                }
                Err(err)
            }
        }
    }

    /// The host pid of a running sandbox's first process; [`RuntimeError::NotFound`] if
    /// the sandbox does not run.
    fn running_pid(&self, id: &SandboxId) -> Result<i32, RuntimeError> {
        let paths = SandboxPaths::new(&self.config.data_dir, id);
        match read_record(&paths.record)? {
            Some(record) if process_start_time(record.pid).ok() == Some(record.start_time) => {
                Ok(record.pid)
            }
            _ => Err(RuntimeError::NotFound(id.clone())),
        }
    }

    /// The pidfd of a running sandbox: ours from create, or found through runtime.json.
    fn pidfd_of(&self, id: &SandboxId) -> Result<Option<OwnedFd>, RuntimeError> {
        if let Some(live) = self.live.lock().expect("live map poisoned").remove(id) {
            return Ok(Some(live.pidfd));
        }
        let paths = SandboxPaths::new(&self.config.data_dir, id);
        let Some(record) = read_record(&paths.record)? else {
            return Ok(None);
        };
        let Ok(pidfd) = sys::pidfd_open(record.pid) else {
            return Ok(None);
        };
        // The pid may have been recycled: only a matching start time is our sandbox.
        match process_start_time(record.pid) {
            Ok(t) if t == record.start_time => Ok(Some(pidfd)),
            _ => Ok(None),
        }
    }
}

#[async_trait]
impl Runtime for NsRuntime {
    fn name(&self) -> &'static str {
        "ns"
    }

    async fn create(&self, spec: SandboxSpec) -> Result<SandboxInfo, RuntimeError> {
        spec.limits.validate()?;
        if spec.uid_shift != uid_map::HOST_BASE {
            return Err(RuntimeError::UidShiftMismatch {
                template: spec.uid_shift,
                runtime: uid_map::HOST_BASE,
            });
        }
        check_layers(&spec.layers)?;
        if let Some(mib) = spec.writable_layer_mib {
            quota::check_limit(mib)?;
        }
        let mut paths = SandboxPaths::new(&self.config.data_dir, &spec.id);
        if let Err(e) = self.prepare_dirs(&spec, &mut paths) {
            // A half-made directory (and layer filesystem) goes; an existing sandbox stays.
            if !matches!(e, RuntimeError::AlreadyExists(_)) {
                quota::LayerFs::of(&paths.dir).remove();
                let _ = std::fs::remove_dir_all(&paths.dir);
            }
            return Err(e);
        }
        let started = match self.cgroups.create(spec.id.as_str(), &spec.limits) {
            Ok(()) => self.start(&spec, &paths).await,
            Err(e) => Err((e.into(), None)),
        };
        self.started(spec, paths, started).await
    }

    async fn destroy(&self, id: &SandboxId) -> Result<(), RuntimeError> {
        let pidfd = self.pidfd_of(id)?;
        self.tear_down(id, pidfd).await
    }

    async fn pause(&self, id: &SandboxId) -> Result<(), RuntimeError> {
        self.running_pid(id)?;
        if self.cgroups.freezer_state(id.as_str())? == cgroup::FreezerState::Thawed {
            // Connections from the host end at a pause (as an E2B sandbox's do), so a
            // paused sandbox can be checkpointed as it is.
            let socket = SandboxPaths::new(&self.config.data_dir, id).socket;
            if let Err(e) = checkpoint::quiesce_agent(&socket).await {
                tracing::warn!(sandbox = %id, error = %e, "agent did not close host connections before the pause");
            }
        }
        cgroup::freeze(self.cgroups.as_ref(), id.as_str()).await?;
        Ok(())
    }

    async fn resume(&self, id: &SandboxId) -> Result<(), RuntimeError> {
        self.running_pid(id)?;
        cgroup::thaw(self.cgroups.as_ref(), id.as_str())?;
        Ok(())
    }

    async fn checkpoint(
        &self,
        id: &SandboxId,
        dir: &Path,
    ) -> Result<crate::CheckpointInfo, RuntimeError> {
        let pid = self.running_pid(id)?;
        let paths = SandboxPaths::new(&self.config.data_dir, id);
        let record =
            read_record(&paths.record)?.ok_or_else(|| RuntimeError::NotFound(id.clone()))?;
        // Traversable (not listable) by others: CRIU opens some images from inside the
        // restored sandbox's user namespace.
        std::fs::DirBuilder::new()
            .mode(0o711)
            .create(dir)
            .map_err(io_error("create", dir))?;
        let taken = self.checkpoint_into(id, pid, &paths, dir).await;
        let frozen_us = match taken {
            Ok(us) => us,
            Err(e) => {
                let _ = std::fs::remove_dir_all(dir);
                return Err(e);
            }
        };
        let meta = checkpoint::CheckpointMeta {
            format: checkpoint::FORMAT,
            layers: record.layers(),
            uid_shift: uid_map::HOST_BASE,
            hostname: id.to_string(),
            size_bytes: checkpoint::tree_size(dir),
            frozen_us,
            agent_bin: record.agent_bin.clone(),
        };
        if let Err(e) = write_json(&dir.join(checkpoint::META_FILE), &meta) {
            let _ = std::fs::remove_dir_all(dir);
            return Err(e);
        }
        tracing::info!(sandbox = %id, bytes = meta.size_bytes, frozen_us, "checkpoint written");
        Ok(crate::CheckpointInfo {
            size_bytes: meta.size_bytes,
            frozen_us,
            layers: meta.layers,
        })
    }

    async fn restore(&self, dir: &Path, spec: SandboxSpec) -> Result<SandboxInfo, RuntimeError> {
        spec.limits.validate()?;
        check_layers(&spec.layers)?;
        let meta_path = dir.join(checkpoint::META_FILE);
        let meta: checkpoint::CheckpointMeta = std::fs::read(&meta_path)
            .map_err(|e| RuntimeError::Checkpoint {
                op: "restore",
                message: format!("no checkpoint in {}: {e}", dir.display()),
            })
            .and_then(|bytes| {
                serde_json::from_slice(&bytes).map_err(|e| RuntimeError::Checkpoint {
                    op: "restore",
                    message: format!("{}: {e}", meta_path.display()),
                })
            })?;
        if meta.format != checkpoint::FORMAT || meta.uid_shift != uid_map::HOST_BASE {
            return Err(RuntimeError::Checkpoint {
                op: "restore",
                message: format!("checkpoint format {} is not this runtime's", meta.format),
            });
        }
        if meta.layers != spec.layers {
            return Err(RuntimeError::Checkpoint {
                op: "restore",
                message: "the checkpoint was taken on other template layers".into(),
            });
        }
        if let Some(mib) = spec.writable_layer_mib {
            quota::check_limit(mib)?;
        }
        let mut paths = SandboxPaths::new(&self.config.data_dir, &spec.id);
        match std::fs::DirBuilder::new().mode(0o711).create(&paths.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(RuntimeError::AlreadyExists(spec.id.clone()))
            }
            Err(e) => return Err(io_error("create", &paths.dir)(e)),
        }
        // The agent the checkpoint was taken with (still in the store), else this
        // runtime's: a checkpoint from before agents were stored by content.
        let agent_bin = meta
            .agent_bin
            .filter(|p| p.is_file())
            .unwrap_or_else(|| self.config.agent_bin.clone());
        let restored = self.restore_into(dir, &agent_bin, &spec, &mut paths).await;
        self.started(spec, paths, restored).await
    }

    fn prepare(&self, layers: &[PathBuf], agent: &crate::AgentConfig) {
        if !agent.code_interpreter || check_layers(layers).is_err() {
            return;
        }
        let zygotes = self.zygotes.clone();
        let layers = layers.to_vec();
        tokio::spawn(async move {
            zygotes.get(&layers).await;
        });
    }

    async fn list(&self) -> Result<Vec<SandboxInfo>, RuntimeError> {
        let dir = self.config.data_dir.sandboxes();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_error("list", &dir)(e)),
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let Some(id) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<SandboxId>().ok())
            else {
                continue;
            };
            let paths = SandboxPaths::new(&self.config.data_dir, &id);
            let Some(record) = read_record(&paths.record)? else {
                continue;
            };
            if process_start_time(record.pid).ok() == Some(record.start_time) {
                out.push(SandboxInfo {
                    layers: record.layers(),
                    paused: matches!(
                        self.cgroups.freezer_state(id.as_str()),
                        Ok(cgroup::FreezerState::Frozen | cgroup::FreezerState::Freezing)
                    ),
                    id,
                    pid: record.pid,
                    agent_socket: paths.socket,
                });
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn residues(&self) -> Result<Vec<SandboxId>, RuntimeError> {
        let dir = self.config.data_dir.sandboxes();
        let mut ids: Vec<SandboxId> = match std::fs::read_dir(&dir) {
            Ok(entries) => entries
                .flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
                .collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io_error("list", &dir)(e)),
        };
        ids.extend(
            self.cgroups
                .list()?
                .into_iter()
                .filter_map(|n| n.parse::<SandboxId>().ok()),
        );
        ids.sort();
        ids.dedup();
        Ok(ids)
    }

    async fn stats(&self, id: &SandboxId) -> Result<SandboxStats, RuntimeError> {
        let paths = SandboxPaths::new(&self.config.data_dir, id);
        if !paths.dir.is_dir() {
            return Err(RuntimeError::NotFound(id.clone()));
        }
        let cg = self.cgroups.stats(id.as_str())?;
        let upper = paths.upper.clone();
        let disk_used_bytes = tokio::task::spawn_blocking(move || disk_usage(&upper))
            .await
            .unwrap_or(0);
        Ok(SandboxStats {
            cpu_usage_ns: cg.cpu_usage_ns,
            memory_bytes: cg.memory_bytes,
            memory_limit_bytes: cg.memory_limit_bytes,
            memory_cache_bytes: cg.memory_cache_bytes,
            disk_used_bytes,
            pids: cg.pids,
        })
    }
}

/// Allocated bytes under `dir` (each inode once; symlinks not followed).
fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut seen = std::collections::HashSet::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(md) = entry.metadata() else { continue };
            if seen.insert((md.dev(), md.ino())) {
                total += md.blocks() * 512;
            }
            if md.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    total
}

/// Makes the sandbox's first process (the agent) exempt from the OOM killer when the
/// runtime may (CAP_SYS_RESOURCE). Without that capability the agent still survives a
/// memory hog: it starts every user process with a raised `oom_score_adj`, so the kernel
/// always prefers user code as the victim.
fn shield_from_oom_killer(pid: i32) {
    let path = format!("/proc/{pid}/oom_score_adj");
    if let Err(e) = std::fs::write(&path, "-1000") {
        tracing::debug!(%path, error = %e, "cannot exempt the agent from the OOM killer");
    }
}

fn spawn_error(step: &'static str) -> impl FnOnce(io::Error) -> RuntimeError {
    move |source| RuntimeError::Spawn { step, source }
}

/// Creates `dir` (and parents) with mode 0711: sandbox init processes run as an
/// unprivileged host uid and must be able to traverse to their layers.
fn make_traversable_dir(dir: &Path) -> Result<(), RuntimeError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(dir)
        .map_err(io_error("create", dir))?;
    let mut perms = std::fs::metadata(dir)
        .map_err(io_error("stat", dir))?
        .permissions();
    if perms.mode() & 0o001 == 0 {
        perms.set_mode(perms.mode() | 0o711);
        std::fs::set_permissions(dir, perms).map_err(io_error("chmod", dir))?;
    }
    Ok(())
}

async fn read_report(host: StdUnixStream) -> io::Result<Option<FromInit>> {
    host.set_nonblocking(true)?;
    let mut host = tokio::net::UnixStream::from_std(host)?;
    let mut len = [0u8; 4];
    match host.read_exact(&mut len).await {
        Ok(_) => {}
        // A reset is a hang-up too: the child exited with our go frame still unread in
        // its socket (it died before its first read), and its exit code says why.
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > message::MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "report too large",
        ));
    }
    let mut body = vec![0u8; len];
    host.read_exact(&mut body).await?;
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Waits until the process behind `pidfd` has exited and reaps it if it is our child.
async fn wait_exit(pidfd: &OwnedFd) -> io::Result<Option<sys::ExitStatus>> {
    if !sys::pidfd_exited(pidfd) {
        sys::readable(pidfd.as_fd()).await?;
    }
    sys::pidfd_try_reap(pidfd)
}

/// Field 22 of `/proc/<pid>/stat`: start time in clock ticks after boot.
fn process_start_time(pid: i32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may contain spaces and parentheses; skip past its end.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed stat"))?;
    rest.split_whitespace()
        .nth(19)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed stat"))
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), RuntimeError> {
    let tmp = path.with_extension("json.tmp");
    let bytes =
        serde_json::to_vec(value).map_err(|e| io_error("write", &tmp)(io::Error::other(e)))?;
    std::fs::write(&tmp, bytes).map_err(io_error("write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io_error("rename", path))
}

fn read_record(path: &Path) -> Result<Option<RuntimeRecord>, RuntimeError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error("read", path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_usage_counts_each_inode_once() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("a"), vec![1u8; 64 * 1024]).unwrap();
        std::fs::create_dir(tmp.path().join("d")).unwrap();
        std::fs::hard_link(tmp.path().join("a"), tmp.path().join("d/b")).unwrap();
        let used = disk_usage(tmp.path());
        assert!((64 * 1024..64 * 1024 + 16 * 1024).contains(&used), "{used}");
        assert_eq!(disk_usage(&tmp.path().join("missing")), 0);
    }

    #[test]
    fn every_data_dir_has_its_own_cgroup_parent() {
        assert_eq!(
            cgroup_parent_for(&DataDir::new(DataDir::DEFAULT)),
            "cubicle"
        );
        let a = cgroup_parent_for(&DataDir::new("/tmp/a"));
        let b = cgroup_parent_for(&DataDir::new("/tmp/b"));
        assert_ne!(a, b);
        assert_eq!(a, cgroup_parent_for(&DataDir::new("/tmp/a")), "stable");
        assert!(
            a.starts_with("cubicle-") && a.len() == "cubicle-".len() + 8,
            "{a}"
        );
    }

    #[test]
    fn layers_are_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("a");
        let b = tmp.path().join("b");
        std::fs::create_dir(&a).unwrap();
        std::fs::create_dir(&b).unwrap();
        check_layers(std::slice::from_ref(&a)).unwrap();
        check_layers(&[a.clone(), b.clone()]).unwrap();
        assert!(matches!(
            check_layers(&[]),
            Err(RuntimeError::TemplateMissing(_))
        ));
        let missing = tmp.path().join("missing");
        assert!(matches!(
            check_layers(&[a.clone(), missing.clone()]),
            Err(RuntimeError::TemplateMissing(p)) if p == missing
        ));
        for bad in ["relative", "/x:y", "/x,y", "/x\ny"] {
            let err = check_layers(&[a.clone(), PathBuf::from(bad)]).unwrap_err();
            assert!(
                matches!(&err, RuntimeError::Config(m) if m.contains("overlayfs")),
                "{err:?}"
            );
        }
        assert!(check_layers(&vec![a; MAX_LAYERS + 1]).is_err());
    }

    #[test]
    fn runtime_records_of_before_layers_still_read() {
        let old: RuntimeRecord =
            serde_json::from_str(r#"{"pid":42,"rootfs":"/d/templates/base/rootfs","startTime":7}"#)
                .unwrap();
        assert_eq!(old.layers(), [PathBuf::from("/d/templates/base/rootfs")]);
        let new = RuntimeRecord {
            pid: 1,
            rootfs: "/t/ci/rootfs".into(),
            layers: vec!["/t/ci/rootfs".into(), "/t/base/rootfs".into()],
            start_time: 2,
            agent_bin: None,
        };
        let json = serde_json::to_value(&new).unwrap();
        assert_eq!(json["rootfs"], "/t/ci/rootfs");
        assert_eq!(json["layers"][1], "/t/base/rootfs");
        let back: RuntimeRecord = serde_json::from_value(json).unwrap();
        assert_eq!(back.layers(), new.layers);
    }

    #[test]
    fn start_time_of_self_is_stable() {
        let me = std::process::id() as i32;
        let a = process_start_time(me).unwrap();
        assert_eq!(a, process_start_time(me).unwrap());
        assert!(process_start_time(i32::MAX).is_err());
    }

    #[test]
    fn bad_configs_are_refused_with_reasons() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = NsConfig::new(DataDir::new(tmp.path()), tmp.path().join("nope"));
        assert!(
            matches!(NsRuntime::new(missing), Err(RuntimeError::Config(m)) if m.contains("nope"))
        );
        let bin = std::env::current_exe().unwrap();
        let colon = NsConfig::new(DataDir::new("/tmp/a:b"), bin.clone());
        assert!(matches!(NsRuntime::new(colon), Err(RuntimeError::Config(m)) if m.contains("':'")));
        let long = NsConfig::new(DataDir::new(format!("/tmp/{}", "x".repeat(80))), bin);
        assert!(
            matches!(NsRuntime::new(long), Err(RuntimeError::Config(m)) if m.contains("too long"))
        );
    }
}
