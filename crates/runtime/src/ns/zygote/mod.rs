//! Template zygotes: one warm Python per code-interpreter template, from which the
//! sandboxes of that template are forked, so that their interpreter is ready (and its
//! memory shared) from the moment they exist.
//!
//! A zygote is a child of the runtime, started by `cubicle-agent zygote` ([`setup`]) in
//! namespaces of its own:
//!
//! - a **user namespace** whose root is the sandboxes' host uid base (the zygote runs as
//!   the template's `user` there, with only the capabilities to write id maps, and has
//!   nothing on the host);
//! - a **mount namespace** whose `/` is the template's layers under a throwaway tmpfs
//!   upper, with the host's tree at [`HOST_DIR`] (where sandbox set-up finds its paths);
//! - network, ipc and uts namespaces; the host's pid namespace.
//!
//! There it imports the scientific stack once (`python_kernel.py --template-zygote`).
//! [`Zygote::spawn`] then replaces the runtime's own `clone()` for a sandbox of that
//! template: the zygote forks the sandbox's pid 1 into new namespaces nested in its own
//! user namespace (uid maps written by the zygote, which owns the parent namespace),
//! as the runtime's own child (`CLONE_PARENT`); pid 1 forks the sandbox's own Python
//! zygote and default kernel, then executes `cubicle-agent init` exactly as after a
//! clone, and the agent adopts both through
//! [`AgentConfig::warm_python`](super::message::AgentConfig::warm_python).
//!
//! A template whose zygote cannot start (no Python, user namespaces forbidden by the
//! host) is created the ordinary way; the failure is logged and retried later.

pub mod setup;

use std::collections::HashMap;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cubicle_core::{uid_map, DataDir};
use nix::sys::socket::{
    recvmsg, sendmsg, setsockopt, socketpair, sockopt, AddressFamily, ControlMessage, MsgFlags,
    SockFlag, SockType,
};
use nix::sys::time::TimeVal;
use serde::{Deserialize, Serialize};

use super::sys;

/// Where the host's root appears in a zygote's mount namespace.
pub const HOST_DIR: &str = "/run/host";
/// The fd on which a zygote-made sandbox's init and agent find the socket of the
/// sandbox's own Python zygote (python_kernel.py's `SANDBOX_ZYGOTE_FD`).
pub const SANDBOX_ZYGOTE_FD: i32 = 4;
/// Likewise for its default Python kernel (`SANDBOX_KERNEL_FD`).
pub const SANDBOX_KERNEL_FD: i32 = 5;

/// Namespaces of a zygote (it shares the host's pid namespace: the sandboxes it forks
/// get pid namespaces of their own).
const ZYGOTE_FLAGS: libc::c_int = libc::CLONE_NEWUSER
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS;

/// How long a zygote may take to import its modules (a cold page cache on a slow disk).
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one spawn may take before the zygote counts as broken.
const SPAWN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a template whose zygote failed is created the ordinary way before the
/// zygote is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(60);
/// Largest control message.
const MAX_MESSAGE: usize = 64 * 1024;

/// Why a zygote could not start or spawn.
#[derive(Debug, thiserror::Error)]
pub enum ZygoteError {
    /// A host-side system call failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The zygote's set-up or the zygote itself reported a failure.
    #[error("{step}: {message}")]
    Failed {
        /// What failed.
        step: String,
        /// Why.
        message: String,
    },
    /// The zygote broke the protocol or went away.
    #[error("the zygote stopped answering: {0}")]
    Gone(String),
}

fn io_err(op: impl Into<String>) -> impl FnOnce(io::Error) -> ZygoteError {
    let op = op.into();
    move |source| ZygoteError::Io { op, source }
}

/// What `cubicle-agent zygote` needs; the first message on its control socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ZygoteSpec {
    /// The template's layers, top first (host paths).
    pub layers: Vec<PathBuf>,
    /// Where to mount the zygote's root (host path, an empty directory).
    pub root: PathBuf,
    /// Where to mount the tmpfs holding the root's throwaway upper layer.
    pub scratch: PathBuf,
    /// The zygote's log (host path; stdout and stderr go there).
    pub log: PathBuf,
    /// Environment of the Python process.
    pub env: Vec<(String, String)>,
    /// Its working directory inside the template.
    pub cwd: PathBuf,
}

/// Zygote → runtime, one JSON object per message.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Report {
    Ready {
        #[allow(dead_code)]
        pid: i64,
    },
    Failed {
        step: String,
        message: String,
    },
    Spawned {
        id: u64,
        pid: i32,
    },
    SpawnFailed {
        id: Option<u64>,
        /// The sandbox process, if it was created (it exits at once; we reap it).
        #[serde(default)]
        pid: Option<i32>,
        message: String,
    },
}

/// Where a host path is in a zygote's mount namespace: under [`HOST_DIR`], with
/// symlinks resolved on the host (an absolute symlink would otherwise resolve against
/// the zygote's root, the template). A path that cannot be resolved is used as is.
pub fn host_view(path: &Path) -> PathBuf {
    let resolved = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    Path::new(HOST_DIR).join(resolved.strip_prefix("/").unwrap_or(&resolved))
}

/// What pid 1 of a spawned sandbox executes, in the zygote's mount namespace.
#[derive(Debug, Clone)]
pub struct InitCommand {
    /// The path of the agent binary as the zygote sees it (under [`HOST_DIR`]).
    pub program: PathBuf,
    /// argv, starting with argv[0].
    pub argv: Vec<String>,
    /// cgroup `tasks` files the process writes `0` into (joins) first, opened by us.
    pub join: Vec<PathBuf>,
}

/// One running template zygote.
#[derive(Debug)]
pub struct Zygote {
    pid: i32,
    pidfd: OwnedFd,
    control: Mutex<OwnedFd>,
    next_id: AtomicU64,
    log: PathBuf,
}

impl Zygote {
    /// Starts the zygote of a template and waits until it has imported its modules.
    pub async fn start(
        data_dir: &DataDir,
        agent_bin: &Path,
        layers: &[PathBuf],
    ) -> Result<Zygote, ZygoteError> {
        let dir = zygote_dir(data_dir, layers);
        let spec = prepare_dir(&dir, layers)?;
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| io_err("create the control socket")(e.into()))?;
        let (pid, pidfd) = {
            let exec = sys::ChildExec::new(agent_bin, &["cubicle-agent", "zygote"], &[], &[])
                .map_err(io_err("prepare execve"))?;
            sys::clone_into_namespaces(ZYGOTE_FLAGS, theirs.as_raw_fd(), &exec)
                .map_err(io_err("clone into new namespaces"))?
        };
        drop(theirs);
        let zygote = Zygote {
            pid,
            pidfd,
            control: Mutex::new(ours),
            next_id: AtomicU64::new(1),
            log: spec.log.clone(),
        };
        let map = format!("0 {} {}\n", uid_map::HOST_BASE, uid_map::RANGE);
        for file in ["uid_map", "gid_map"] {
            std::fs::write(format!("/proc/{pid}/{file}"), &map)
                .map_err(io_err(format!("write the zygote's {file}")))?;
        }
        let body = serde_json::to_vec(&spec).expect("a spec serializes");
        zygote.send(&body, &[])?;
        let zygote = Arc::new(zygote);
        let waiting = zygote.clone();
        let report = tokio::task::spawn_blocking(move || waiting.receive(READY_TIMEOUT))
            .await
            .map_err(|e| ZygoteError::Gone(e.to_string()))?;
        let zygote = Arc::into_inner(zygote).expect("the waiting task is done");
        match report {
            Ok(Report::Ready { .. }) => Ok(zygote),
            Ok(Report::Failed { step, message }) => Err(ZygoteError::Failed { step, message }),
            Ok(other) => Err(ZygoteError::Gone(format!("unexpected {other:?}"))),
            Err(e) => Err(zygote.explain(e)),
        }
    }

    /// Clones the first process of a new sandbox, as our child: pid 1 of fresh user,
    /// mount, pid, net, uts and ipc namespaces (its id maps already written), waiting on
    /// `sync` for the runtime's go-ahead like a child we cloned, then executing `init`.
    /// Returns its host pid.
    pub async fn spawn(
        self: &Arc<Self>,
        sync: OwnedFd,
        init: &InitCommand,
    ) -> Result<i32, ZygoteError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut argv = vec![init.program.to_string_lossy().into_owned()];
        argv.extend(init.argv.iter().skip(1).cloned());
        let request = serde_json::json!({
            "op": "spawn",
            "id": id,
            "init": argv,
            "argv0": init.argv.first().cloned().unwrap_or_default(),
            "env": {},
            // The sandbox's ids are the zygote's own, one to one (both start at the
            // host uid base).
            "id_map": format!("0 0 {}", uid_map::RANGE),
        });
        let mut fds = vec![sync];
        for file in &init.join {
            let tasks = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(file)
                .map_err(io_err(format!("open {}", file.display())))?;
            fds.push(OwnedFd::from(tasks));
        }
        let zygote = self.clone();
        let answer = tokio::task::spawn_blocking(move || {
            // One request at a time: answers carry the id, but a zygote forks serially
            // anyway.
            let control = zygote.control.lock().expect("zygote control poisoned");
            let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
            send_on(&control, &serde_json::to_vec(&request).expect("JSON"), &raw)?;
            drop(fds);
            loop {
                match receive_on(&control, SPAWN_TIMEOUT)? {
                    Report::Spawned { id: got, pid } if got == id => return Ok(pid),
                    Report::SpawnFailed {
                        id: got,
                        pid,
                        message,
                    } if got == Some(id) || got.is_none() => {
                        if let Some(pid) = pid {
                            reap_failed_child(pid);
                        }
                        return Err(ZygoteError::Failed {
                            step: "fork the sandbox".into(),
                            message,
                        });
                    }
                    _ => continue,
                }
            }
        })
        .await
        .map_err(|e| ZygoteError::Gone(e.to_string()))?;
        answer.map_err(|e| self.explain(e))
    }

    /// Whether the zygote process still runs.
    pub fn is_alive(&self) -> bool {
        !sys::pidfd_exited(&self.pidfd)
    }

    /// Its host pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    fn send(&self, body: &[u8], fds: &[i32]) -> Result<(), ZygoteError> {
        let control = self.control.lock().expect("zygote control poisoned");
        send_on(&control, body, fds)
    }

    fn receive(&self, timeout: Duration) -> Result<Report, ZygoteError> {
        let control = self.control.lock().expect("zygote control poisoned");
        receive_on(&control, timeout)
    }

    /// A lost zygote's error, with the end of its log (where Python prints why).
    fn explain(&self, e: ZygoteError) -> ZygoteError {
        match e {
            ZygoteError::Gone(what) => {
                let tail = log_tail(&self.log, 5);
                if tail.is_empty() {
                    ZygoteError::Gone(what)
                } else {
                    ZygoteError::Gone(format!("{what}; its log ends with: {tail}"))
                }
            }
            other => other,
        }
    }
}

impl Drop for Zygote {
    fn drop(&mut self) {
        // Closing the control socket makes the zygote exit on its own; SIGKILL covers a
        // zygote stuck elsewhere. Either way it is our child and is reaped here.
        let _ = sys::pidfd_kill(&self.pidfd, libc::SIGKILL);
        if sys::pidfd_wait(&self.pidfd, Duration::from_secs(5)) {
            let _ = sys::pidfd_try_reap(&self.pidfd);
        }
    }
}

fn send_on(control: &OwnedFd, body: &[u8], fds: &[i32]) -> Result<(), ZygoteError> {
    let iov = [IoSlice::new(body)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(
        control.as_raw_fd(),
        &iov,
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(|e| ZygoteError::Gone(format!("send: {e}")))?;
    Ok(())
}

fn receive_on(control: &OwnedFd, timeout: Duration) -> Result<Report, ZygoteError> {
    let tv = TimeVal::new(timeout.as_secs() as _, timeout.subsec_micros() as _);
    setsockopt(control, sockopt::ReceiveTimeout, &tv)
        .map_err(|e| io_err("set the control socket's timeout")(e.into()))?;
    let started = Instant::now();
    let mut buf = vec![0u8; MAX_MESSAGE];
    let len = loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        match recvmsg::<()>(
            control.as_raw_fd(),
            &mut iov,
            None,
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => break msg.bytes,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::EAGAIN) => {
                return Err(ZygoteError::Gone(format!(
                    "no answer within {:.1} s",
                    started.elapsed().as_secs_f64()
                )))
            }
            Err(e) => return Err(ZygoteError::Gone(format!("receive: {e}"))),
        }
    };
    if len == 0 {
        return Err(ZygoteError::Gone("it exited".into()));
    }
    serde_json::from_slice(&buf[..len])
        .map_err(|e| ZygoteError::Gone(format!("malformed message: {e}")))
}

/// `<data>/zygotes/<16 hex digits>`: one directory per distinct layer stack.
fn zygote_dir(data_dir: &DataDir, layers: &[PathBuf]) -> PathBuf {
    let hash = layers
        .iter()
        .flat_map(|l| l.as_os_str().as_encoded_bytes().iter().chain(b"\n"))
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        });
    data_dir.root().join("zygotes").join(format!("{hash:016x}"))
}

/// Creates the zygote's directories (its set-up runs as the unprivileged host uid base:
/// everything on the way must be traversable, the log writable) and its spec.
fn prepare_dir(dir: &Path, layers: &[PathBuf]) -> Result<ZygoteSpec, ZygoteError> {
    let parent = dir.parent().expect("zygote dirs have a parent");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(parent)
        .map_err(io_err(format!("create {}", parent.display())))?;
    let spec = ZygoteSpec {
        layers: layers.to_vec(),
        root: dir.join("root"),
        scratch: dir.join("scratch"),
        log: dir.join("zygote.log"),
        env: vec![
            (
                "PATH".into(),
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            ),
            ("HOME".into(), "/home/user".into()),
            ("USER".into(), "user".into()),
            ("LOGNAME".into(), "user".into()),
            ("LANG".into(), "C.UTF-8".into()),
            ("SHELL".into(), "/bin/bash".into()),
        ],
        cwd: PathBuf::from("/home/user"),
    };
    for sub in [dir, &spec.root, &spec.scratch] {
        match std::fs::DirBuilder::new().mode(0o711).create(sub) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(format!("create {}", sub.display()))(e)),
        }
    }
    let _log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&spec.log)
        .map_err(io_err(format!("create {}", spec.log.display())))?;
    std::os::unix::fs::chown(
        &spec.log,
        Some(uid_map::HOST_BASE),
        Some(uid_map::HOST_BASE),
    )
    .map_err(io_err(format!("chown {}", spec.log.display())))?;
    Ok(spec)
}

/// The last `lines` non-empty lines of a log, joined by ` | ` (empty if unreadable).
fn log_tail(path: &Path, lines: usize) -> String {
    let Ok(text) = std::fs::read_to_string(path) else {
        return String::new();
    };
    let tail: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    tail[tail.len().saturating_sub(lines)..].join(" | ")
}

/// The template zygotes of one runtime, started on first use.
#[derive(Debug)]
pub struct ZygotePool {
    data_dir: DataDir,
    agent_bin: PathBuf,
    slots: tokio::sync::Mutex<HashMap<Vec<PathBuf>, Slot>>,
}

#[derive(Debug)]
enum Slot {
    Running(Arc<Zygote>),
    Failed { at: Instant },
}

impl ZygotePool {
    /// A pool for a runtime's data dir and agent binary.
    pub fn new(data_dir: DataDir, agent_bin: PathBuf) -> Self {
        ZygotePool {
            data_dir,
            agent_bin,
            slots: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The running zygote of a template, started if needed; `None` (logged) when it
    /// cannot run, so that the caller creates the sandbox the ordinary way.
    pub async fn get(&self, layers: &[PathBuf]) -> Option<Arc<Zygote>> {
        let mut slots = self.slots.lock().await;
        match slots.get(layers) {
            Some(Slot::Running(z)) if z.is_alive() => return Some(z.clone()),
            Some(Slot::Running(z)) => {
                tracing::warn!(pid = z.pid(), log = %z.log.display(), "template zygote died; restarting it");
            }
            Some(Slot::Failed { at }) if at.elapsed() < RETRY_AFTER => return None,
            _ => {}
        }
        let started = Instant::now();
        match Zygote::start(&self.data_dir, &self.agent_bin, layers).await {
            Ok(z) => {
                tracing::info!(
                    template = %layers[0].display(),
                    pid = z.pid(),
                    took = ?started.elapsed(),
                    "template zygote ready"
                );
                let z = Arc::new(z);
                slots.insert(layers.to_vec(), Slot::Running(z.clone()));
                Some(z)
            }
            Err(e) => {
                tracing::warn!(
                    template = %layers[0].display(),
                    error = %e,
                    "template zygote failed; sandboxes of this template start their own interpreter"
                );
                slots.insert(layers.to_vec(), Slot::Failed { at: Instant::now() });
                None
            }
        }
    }

    /// Forgets a zygote that failed a spawn, so the next `get` starts a new one.
    pub async fn discard(&self, zygote: &Arc<Zygote>) {
        let mut slots = self.slots.lock().await;
        slots.retain(|_, slot| !matches!(slot, Slot::Running(z) if Arc::ptr_eq(z, zygote)));
    }
}

/// Reaps a sandbox process the zygote created (as our child, `CLONE_PARENT`) but gave
/// up on; it exits at once.
fn reap_failed_child(pid: i32) {
    if let Ok(pidfd) = sys::pidfd_open(pid) {
        if sys::pidfd_wait(&pidfd, Duration::from_secs(5)) {
            let _ = sys::pidfd_try_reap(&pidfd);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_layer_stack_has_its_own_directory() {
        let data = DataDir::new("/var/lib/cubicle");
        let a = zygote_dir(
            &data,
            &[
                PathBuf::from("/t/ci/rootfs"),
                PathBuf::from("/t/base/rootfs"),
            ],
        );
        let b = zygote_dir(&data, &[PathBuf::from("/t/base/rootfs")]);
        assert_ne!(a, b);
        assert_eq!(
            a,
            zygote_dir(
                &data,
                &[
                    PathBuf::from("/t/ci/rootfs"),
                    PathBuf::from("/t/base/rootfs")
                ]
            ),
            "stable"
        );
        assert!(a.starts_with("/var/lib/cubicle/zygotes"), "{}", a.display());
    }

    #[test]
    fn host_paths_are_resolved_then_moved_under_the_host_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let canonical = std::fs::canonicalize(&real).unwrap();
        let expected = Path::new(HOST_DIR).join(canonical.strip_prefix("/").unwrap());
        assert_eq!(host_view(&link), expected);
        assert_eq!(host_view(&real), expected);
        assert_eq!(
            host_view(Path::new("/does/not/exist")),
            Path::new("/run/host/does/not/exist")
        );
    }

    #[test]
    fn reports_parse() {
        let r: Report = serde_json::from_str(r#"{"type":"spawned","id":3,"pid":42}"#).unwrap();
        assert!(matches!(r, Report::Spawned { id: 3, pid: 42 }));
        let r: Report =
            serde_json::from_str(r#"{"type":"spawn_failed","id":null,"message":"x"}"#).unwrap();
        assert!(matches!(r, Report::SpawnFailed { id: None, .. }));
        let r: Report =
            serde_json::from_str(r#"{"type":"failed","step":"mount","message":"EPERM"}"#).unwrap();
        assert!(matches!(r, Report::Failed { .. }));
    }

    #[test]
    fn log_tails() {
        let tmp = tempfile::tempdir().unwrap();
        let log = tmp.path().join("log");
        assert_eq!(log_tail(&log, 3), "");
        std::fs::write(&log, "a\n\nb\nc\nd\n").unwrap();
        assert_eq!(log_tail(&log, 2), "c | d");
    }
}
