//! The sandbox side of the `ns` runtime: what `cubicle-agent init` does between the
//! clone and the start of the envd server.
//!
//! It runs as root of the sandbox's fresh user namespace (uid 0 inside, an unprivileged
//! uid on the host), already inside its mount, pid, uts, ipc and network namespaces and
//! already in its cgroup. [`run`] is one linear sequence, in the order youki and runc use,
//! with one [`Step`] per action so a failure names what broke:
//!
//! 1. cgroup namespace (after the runtime moved us into the sandbox's cgroup)
//! 2. private mount propagation, overlay root (template layers + the sandbox's upper), /proc (before `pivot_root`: in a user
//!    namespace it cannot be mounted afterwards), read-only /sys, minimal /dev, /run
//! 3. `pivot_root` and detach the host's tree
//! 4. masked and read-only paths (as runc), host name, loopback up, rlimits
//! 5. seccomp filter, capability bounding set
//! 6. `execve` of the agent binary from inside the sandbox, which then reports `Ready`.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::sys::statvfs::{statvfs, FsFlags};
use nix::unistd::{chdir, dup2, pivot_root, sethostname};

use super::message::{
    read_frame, write_frame, FromInit, InitSpec, ToInit, AGENT_LOG_NAME, SANDBOX_AGENT_BIN,
    SANDBOX_RUN_DIR, SYNC_FD,
};
use super::security;
use super::sys;

/// One step of the sandbox set-up; its `Display` is what a failure report says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Step {
    /// Read the init spec from the runtime.
    #[error("read the init spec")]
    ReadSpec,
    /// Point stdio away from the host.
    #[error("redirect stdio")]
    Stdio,
    /// Start a session.
    #[error("start a session")]
    Session,
    /// Enter a new cgroup namespace rooted at the sandbox's cgroup.
    #[error("create the cgroup namespace")]
    CgroupNamespace,
    /// Make every mount private so nothing propagates back to the host.
    #[error("make mounts private")]
    PrivateMounts,
    /// Mount the overlay root (template layers below, the sandbox's upper on top).
    #[error("mount the overlay root")]
    Overlay,
    /// Mount a fresh procfs.
    #[error("mount /proc")]
    Proc,
    /// Mount sysfs read-only.
    #[error("mount /sys")]
    Sys,
    /// Populate a minimal /dev.
    #[error("populate /dev")]
    Dev,
    /// Mount /run with the agent's directory.
    #[error("mount /run")]
    Run,
    /// Switch to the new root and detach the host's tree.
    #[error("pivot_root")]
    PivotRoot,
    /// Hide or freeze sensitive /proc and /sys paths.
    #[error("mask /proc and /sys paths")]
    MaskPaths,
    /// Set the host name.
    #[error("set the host name")]
    Hostname,
    /// Bring loopback up.
    #[error("bring loopback up")]
    Loopback,
    /// Set resource limits.
    #[error("set rlimits")]
    Rlimits,
    /// Install the seccomp filter.
    #[error("install the seccomp filter")]
    Seccomp,
    /// Restrict capabilities.
    #[error("drop capabilities")]
    Capabilities,
    /// Hand the agent its configuration.
    #[error("pass the agent configuration")]
    AgentConfig,
    /// Execute the agent.
    #[error("execute the agent")]
    ExecAgent,
}

/// A failed step and why.
#[derive(Debug, thiserror::Error)]
#[error("{step}: {source}")]
pub struct InitError {
    /// Which step.
    pub step: Step,
    /// The underlying error.
    #[source]
    pub source: io::Error,
}

trait StepExt<T> {
    fn step(self, step: Step) -> Result<T, InitError>;
}

impl<T, E: Into<io::Error>> StepExt<T> for Result<T, E> {
    fn step(self, step: Step) -> Result<T, InitError> {
        self.map_err(|e| InitError {
            step,
            source: e.into(),
        })
    }
}

pub(super) fn io_err(what: impl std::fmt::Display, e: impl Into<io::Error>) -> io::Error {
    let e = e.into();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Entry point of `cubicle-agent init`. Never returns: it either executes the agent or
/// reports the failure on the sync channel and exits.
pub fn run() -> ! {
    // SAFETY: fd 3 is the sync socket the runtime placed there before exec; nothing else
    // in this fresh process owns it.
    let mut sync = unsafe { UnixStream::from_raw_fd(SYNC_FD) };
    let err = match set_up(&mut sync) {
        Ok(never) => match never {},
        Err(err) => err,
    };
    let _ = write_frame(
        &mut sync,
        &FromInit::Failed {
            step: err.step.to_string(),
            message: err.source.to_string(),
        },
    );
    std::process::exit(1)
}

fn set_up(sync: &mut UnixStream) -> Result<std::convert::Infallible, InitError> {
    let spec = match read_frame::<_, ToInit>(sync).step(Step::ReadSpec)? {
        Some(ToInit::Go(spec)) => *spec,
        None => {
            return Err(InitError {
                step: Step::ReadSpec,
                source: io::Error::new(io::ErrorKind::UnexpectedEof, "runtime hung up"),
            })
        }
    };
    // Until pivot_root, stdio still points at whatever the runtime's process had.
    redirect_stdio(Path::new("/dev/null"), None).step(Step::Stdio)?;
    // A session of our own (a pid namespace's session leader must be inside it for
    // CRIU). A template zygote's child already made one.
    if nix::unistd::getsid(None).ok() != Some(nix::unistd::getpid()) {
        nix::unistd::setsid().step(Step::Session)?;
    }

    unshare(CloneFlags::CLONE_NEWCGROUP).step(Step::CgroupNamespace)?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .step(Step::PrivateMounts)?;

    let root = spec.merged.as_path();
    mount_overlay(&spec).step(Step::Overlay)?;
    mount_proc(root).step(Step::Proc)?;
    mount_sys(root).step(Step::Sys)?;
    populate_dev(root, SpecialDirs::OnOverlay).step(Step::Dev)?;
    mount_run(root, &spec).step(Step::Run)?;

    enter_root(root).step(Step::PivotRoot)?;
    redirect_stdio(
        Path::new("/dev/null"),
        Some(&Path::new(SANDBOX_RUN_DIR).join(AGENT_LOG_NAME)),
    )
    .step(Step::Stdio)?;
    mask_paths().step(Step::MaskPaths)?;
    sethostname(&spec.hostname).step(Step::Hostname)?;
    write_host_files(&spec.hostname).step(Step::Hostname)?;
    sys::loopback_up().step(Step::Loopback)?;
    set_rlimits().step(Step::Rlimits)?;

    // Order matters (see `security`): installing the filter without no_new_privs needs
    // CAP_SYS_ADMIN in our user namespace, which restricting capabilities removes.
    let keep = security::caps::SANDBOX_CAPS;
    let filter = security::SeccompPolicy::default_policy()
        .and_then(|p| p.compile())
        .step(Step::Seccomp)?;
    security::caps::drop_bounding_set(keep).step(Step::Capabilities)?;
    filter.install().step(Step::Seccomp)?;
    security::caps::restrict_to(keep).step(Step::Capabilities)?;
    let config_fd = agent_config_fd(&spec).step(Step::AgentConfig)?;
    exec_agent(config_fd).step(Step::ExecAgent)
}

/// Points fd 0 at `stdin` and fds 1 and 2 at `log` (or `stdin` when `None`).
pub(super) fn redirect_stdio(stdin: &Path, log: Option<&Path>) -> io::Result<()> {
    let input = File::open(stdin).map_err(|e| io_err(stdin.display(), e))?;
    let output = match log {
        Some(log) => OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(log)
            .map_err(|e| io_err(log.display(), e))?,
        None => OpenOptions::new().write(true).open(stdin)?,
    };
    dup2(input.as_raw_fd(), 0)?;
    dup2(output.as_raw_fd(), 1)?;
    dup2(output.as_raw_fd(), 2)?;
    Ok(())
}

fn mount_overlay(spec: &InitSpec) -> io::Result<()> {
    let opts = overlay_options(&spec.lower, &spec.upper, &spec.work)?;
    mount(
        Some("overlay"),
        &spec.merged,
        Some("overlay"),
        MsFlags::empty(),
        Some(opts.as_str()),
    )
    .map_err(|e| io_err(&opts, e))
}

/// The overlay's mount options: every template layer as a lower layer, top first.
///
/// userxattr: in a user namespace overlayfs cannot set trusted.* xattrs; without it
/// removing a template directory fails with EIO and renaming any directory with EXDEV.
/// It also makes overlayfs read the `user.overlay.*` marks (opaque directories) that
/// layered templates were built with.
pub(super) fn overlay_options(lower: &[PathBuf], upper: &Path, work: &Path) -> io::Result<String> {
    if lower.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "no template layer",
        ));
    }
    let lower = lower
        .iter()
        .map(|l| l.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    Ok(format!(
        "lowerdir={lower},upperdir={},workdir={},userxattr",
        upper.display(),
        work.display()
    ))
}

fn mount_proc(root: &Path) -> io::Result<()> {
    let target = root.join("proc");
    mount(
        Some("proc"),
        &target,
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| io_err(target.display(), e))
}

fn mount_sys(root: &Path) -> io::Result<()> {
    let target = root.join("sys");
    mount(
        Some("sysfs"),
        &target,
        Some("sysfs"),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| io_err(target.display(), e))
}

/// Device nodes bind-mounted from the host (a user namespace cannot `mknod`).
const HOST_DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// Where a sandbox's `/dev` and `/run` live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SpecialDirs {
    /// In the root's own directories, on the sandbox's overlay: a checkpoint copies them
    /// with the writable layer, where a tmpfs would cost CRIU a tar archive on every
    /// dump and restore (~4 ms each way).
    OnOverlay,
    /// On a fresh tmpfs, leaving the root untouched (a template zygote, whose root is the
    /// template itself).
    OnTmpfs,
}

/// `/dev`: the host's device nodes bound onto files, a devpts instance, a tmpfs
/// `/dev/shm` and the usual symlinks. On the overlay, whatever the template has there is
/// made to fit (missing entries created, a `ptmx` device node replaced by the symlink).
pub(super) fn populate_dev(root: &Path, dirs: SpecialDirs) -> io::Result<()> {
    let dev = root.join("dev");
    match dirs {
        SpecialDirs::OnOverlay => ensure_dir(&dev, 0o755)?,
        SpecialDirs::OnTmpfs => mount(
            Some("tmpfs"),
            &dev,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_STRICTATIME,
            Some("mode=755,size=65536k"),
        )
        .map_err(|e| io_err(dev.display(), e))?,
    }
    for name in HOST_DEVICES {
        let target = dev.join(name);
        ensure_mount_point_file(&target)?;
        let source = Path::new("/dev").join(name);
        bind(&source, &target)?;
    }
    let pts = dev.join("pts");
    ensure_dir(&pts, 0o755)?;
    mount(
        Some("devpts"),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )
    .map_err(|e| io_err(pts.display(), e))?;
    let shm = dev.join("shm");
    ensure_dir(&shm, 0o1777)?;
    mount(
        Some("shm"),
        &shm,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )
    .map_err(|e| io_err(shm.display(), e))?;
    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        ensure_symlink(&dev.join(link), Path::new(target))?;
    }
    Ok(())
}

/// `/run` (the root's own, on the overlay) with `/run/lock`, and the agent's run
/// directory and binary bound into `/run/cubicle`.
fn mount_run(root: &Path, spec: &InitSpec) -> io::Result<()> {
    let run = root.join("run");
    ensure_dir(&run, 0o755)?;
    ensure_dir(&run.join("lock"), 0o1777)?;
    let ours = root.join(SANDBOX_RUN_DIR.trim_start_matches('/'));
    ensure_dir(&ours, 0o700)?;
    bind(&spec.run_dir, &ours)?;
    // The runtime created an empty file as the mount point of the agent binary.
    let agent = root.join(SANDBOX_AGENT_BIN.trim_start_matches('/'));
    bind(&spec.agent_bin, &agent)?;
    remount_read_only(&agent)
}

/// A directory at `path` with `mode`: made if missing (or in place of a non-directory),
/// else given `mode`.
pub(super) fn ensure_dir(path: &Path, mode: u32) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        // Left alone when it is right: a chmod would copy a template directory up.
        Ok(m) if m.is_dir() && m.permissions().mode() & 0o7777 == mode => Ok(()),
        Ok(m) if m.is_dir() => fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .map_err(|e| io_err(path.display(), e)),
        Ok(_) => {
            fs::remove_file(path).map_err(|e| io_err(path.display(), e))?;
            mkdir(path, mode)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => mkdir(path, mode),
        Err(e) => Err(io_err(path.display(), e)),
    }
}

/// Something a file can be bind-mounted onto at `path`: an existing file or device
/// node is kept (the mount hides it); a symlink (which a bind would follow) or nothing
/// becomes an empty file.
fn ensure_mount_point_file(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => Err(io_err(
            path.display(),
            io::Error::new(io::ErrorKind::IsADirectory, "a directory, not a file"),
        )),
        Ok(m) if !m.file_type().is_symlink() => Ok(()),
        Ok(_) => {
            fs::remove_file(path).map_err(|e| io_err(path.display(), e))?;
            File::create(path)
                .map(drop)
                .map_err(|e| io_err(path.display(), e))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => File::create(path)
            .map(drop)
            .map_err(|e| io_err(path.display(), e)),
        Err(e) => Err(io_err(path.display(), e)),
    }
}

/// A symlink at `link` to `target`, replacing whatever else is there.
fn ensure_symlink(link: &Path, target: &Path) -> io::Result<()> {
    if fs::read_link(link).is_ok_and(|t| t == target) {
        return Ok(());
    }
    match fs::symlink_metadata(link) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(link),
        Ok(_) => fs::remove_file(link),
        Err(_) => Ok(()),
    }
    .map_err(|e| io_err(link.display(), e))?;
    std::os::unix::fs::symlink(target, link).map_err(|e| io_err(link.display(), e))
}

fn enter_root(root: &Path) -> io::Result<()> {
    chdir(root)?;
    pivot_root(".", ".")?;
    umount2(".", MntFlags::MNT_DETACH)?;
    chdir("/")?;
    Ok(())
}

/// The mount points, as the sandbox sees them, of every bind mount init makes from a
/// host file: the device nodes, the masked files (those this kernel has), the agent's run
/// directory and binary. A checkpoint names them as external mounts, and a restore binds
/// them to the new sandbox's host files.
pub fn host_bind_mounts() -> Vec<PathBuf> {
    let mut points: Vec<PathBuf> = HOST_DEVICES
        .iter()
        .map(|d| Path::new("/dev").join(d))
        .collect();
    points.extend(
        MASKED
            .iter()
            .map(PathBuf::from)
            .filter(|p| fs::symlink_metadata(p).is_ok_and(|m| !m.is_dir())),
    );
    points.push(PathBuf::from(SANDBOX_RUN_DIR));
    points.push(PathBuf::from(SANDBOX_AGENT_BIN));
    points
}

/// Files hidden behind /dev/null and directories hidden behind an empty read-only tmpfs
/// (what runc masks by default).
const MASKED: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Paths made read-only (what runc makes read-only by default).
const READ_ONLY: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

fn mask_paths() -> io::Result<()> {
    for path in MASKED.iter().map(Path::new) {
        match fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(path.display(), e)),
            Ok(md) if md.is_dir() => mount(
                Some("tmpfs"),
                path,
                Some("tmpfs"),
                MsFlags::MS_RDONLY,
                Some("size=0"),
            )
            .map_err(|e| io_err(path.display(), e))?,
            Ok(_) => bind(Path::new("/dev/null"), path)?,
        }
    }
    for path in READ_ONLY.iter().map(Path::new) {
        if !path.exists() {
            continue;
        }
        bind(path, path)?;
        remount_read_only(path)?;
    }
    Ok(())
}

/// `/etc/hostname` and `/etc/hosts` name the sandbox (so `sudo` and resolvers know the
/// host name). Written into the sandbox's own layer; user code may change them.
fn write_host_files(hostname: &str) -> io::Result<()> {
    fs::write("/etc/hostname", format!("{hostname}\n"))?;
    fs::write("/etc/hosts", hosts_file(hostname))
}

/// The `/etc/hosts` of a sandbox named `hostname`.
pub(super) fn hosts_file(hostname: &str) -> String {
    format!(
        "127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n\
         ::1\tlocalhost ip6-localhost ip6-loopback\n\
         ff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n"
    )
}

fn set_rlimits() -> io::Result<()> {
    // The usual systemd defaults, so sandboxes look the same whoever started the runtime
    // (limits can only be lowered: raising needs CAP_SYS_RESOURCE on the host).
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let hard = hard.min(524_288);
    setrlimit(Resource::RLIMIT_NOFILE, hard.min(1024), hard)?;
    Ok(())
}

/// Writes the agent configuration into an inheritable memfd (not argv or env, which
/// sandbox code could read: the config carries the access token).
fn agent_config_fd(spec: &InitSpec) -> io::Result<RawFd> {
    let name = CString::new("cubicle-agent-config").expect("no NUL in literal");
    let fd = sys::memfd_inheritable(&name)?;
    let mut file = File::from(fd);
    serde_json::to_writer(&mut file, &spec.agent).map_err(io::Error::other)?;
    file.flush()?;
    file.rewind()?;
    Ok(file.into_raw_fd())
}

fn exec_agent(config_fd: RawFd) -> io::Result<std::convert::Infallible> {
    use std::os::unix::process::CommandExt;
    sys::set_inheritable(SYNC_FD)?;
    let err = std::process::Command::new(SANDBOX_AGENT_BIN)
        .arg0("cubicle-agent")
        .args(["serve", "--config-fd", &config_fd.to_string()])
        .env_clear()
        .exec();
    Err(io_err(SANDBOX_AGENT_BIN, err))
}

pub(super) fn mkdir(path: &Path, mode: u32) -> io::Result<()> {
    fs::DirBuilder::new()
        .mode(mode)
        .create(path)
        .map_err(|e| io_err(path.display(), e))?;
    // The umask may have cleared bits (sticky, group/other write).
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|e| io_err(path.display(), e))
}

pub(super) fn bind(source: &Path, target: &Path) -> io::Result<()> {
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| {
        io_err(
            format!("bind {} on {}", source.display(), target.display()),
            e,
        )
    })
}

/// Remounts a bind mount read-only, keeping the flags the kernel locked on it (in a user
/// namespace a remount that would clear nosuid/nodev/noexec/atime flags is refused).
fn remount_read_only(path: &Path) -> io::Result<()> {
    let current = statvfs(path)
        .map_err(|e| io_err(path.display(), e))?
        .flags();
    let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY;
    for (st, ms) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if current.contains(st) {
            flags |= ms;
        }
    }
    mount(None::<&str>, path, None::<&str>, flags, None::<&str>)
        .map_err(|e| io_err(format!("remount {} read-only", path.display()), e))
}

/// Sends `Ready` on the sync channel and closes it. Called by the agent once it listens.
pub fn report_ready() -> io::Result<()> {
    // SAFETY: fd 3 is the sync socket inherited from init; we take ownership and close it.
    let mut sync = unsafe { UnixStream::from_raw_fd(SYNC_FD) };
    write_frame(&mut sync, &FromInit::Ready)
}

/// Tells the runtime that the agent cannot serve (instead of [`report_ready`]); the
/// create fails with `step` and `message`.
pub fn report_failed(step: &str, message: &str) -> io::Result<()> {
    // SAFETY: as in `report_ready`: fd 3 is the inherited sync socket, used once.
    let mut sync = unsafe { UnixStream::from_raw_fd(SYNC_FD) };
    write_frame(
        &mut sync,
        &FromInit::Failed {
            step: step.to_owned(),
            message: message.to_owned(),
        },
    )
}

/// The host directory that appears as [`SANDBOX_RUN_DIR`] in a sandbox, given its dir.
pub fn host_run_dir(sandbox_dir: &Path) -> PathBuf {
    sandbox_dir.join("run")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ns::message::AgentConfig;

    fn spec(lower: &[&str]) -> InitSpec {
        InitSpec {
            hostname: "h".into(),
            lower: lower.iter().map(PathBuf::from).collect(),
            upper: "/d/sandboxes/x/upper".into(),
            work: "/d/sandboxes/x/work".into(),
            merged: "/d/sandboxes/x/rootfs".into(),
            run_dir: "/d/sandboxes/x/run".into(),
            agent_bin: "/usr/local/bin/cubicle-agent".into(),
            agent: AgentConfig::new("x"),
        }
    }

    #[test]
    fn overlay_lower_layers_are_joined_top_first() {
        let opts = |layers: &[&str]| {
            let s = spec(layers);
            overlay_options(&s.lower, &s.upper, &s.work)
        };
        assert_eq!(
            opts(&["/d/templates/base/rootfs"]).unwrap(),
            "lowerdir=/d/templates/base/rootfs,upperdir=/d/sandboxes/x/upper,\
             workdir=/d/sandboxes/x/work,userxattr"
        );
        assert_eq!(
            opts(&[
                "/d/templates/code-interpreter/rootfs",
                "/d/templates/base/rootfs"
            ])
            .unwrap(),
            "lowerdir=/d/templates/code-interpreter/rootfs:/d/templates/base/rootfs,\
             upperdir=/d/sandboxes/x/upper,workdir=/d/sandboxes/x/work,userxattr"
        );
        assert!(opts(&[]).is_err());
    }
}
