//! Cgroups for sandboxes: one cgroup per sandbox, named after its id, under a parent
//! (`cubicle` by default), carrying its CPU, memory and pids limits.
//!
//! Two layouts exist in the wild and both are supported behind [`CgroupManager`]:
//! - **v2** (unified; most current distributions): `<mnt>/<parent>/<id>` with
//!   `cpu.max`, `memory.max`, `memory.swap.max`, `pids.max`.
//! - **v1** (legacy or hybrid, as on these machines, where the v2 hierarchy exists but
//!   holds no resource controllers): one directory per controller,
//!   `<memory mnt>/<parent>/<id>`, `<cpu mnt>/...`, `<pids mnt>/...`, `<freezer mnt>/...`.
//!
//! [`detect`] reads `/proc/self/mountinfo` once at start and picks the layout that has
//! the memory, cpu and pids controllers. Every path is derived from mount points given
//! at construction, so tests run against a directory tree that imitates cgroupfs.

mod v1;
mod v2;

use std::fmt::Debug;
use std::io;
use std::path::{Path, PathBuf};

use cubicle_core::{ErrorKind, Limits};

pub use v1::CgroupV1;
pub use v2::CgroupV2;

/// A cgroup operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// No hierarchy offers the controllers sandboxes need.
    #[error("no usable cgroup hierarchy: {0}")]
    NoControllers(String),
    /// Reading or writing a cgroup file or directory failed.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The cgroup still holds processes.
    #[error("cgroup {0} still has processes")]
    Busy(PathBuf),
    /// Not every process of the cgroup stopped within the time allowed (one stuck in
    /// the kernel); the cgroup was thawed again.
    #[error("cgroup {name} did not freeze within {after:?}")]
    FreezeTimeout {
        /// The cgroup.
        name: String,
        /// How long it was given.
        after: std::time::Duration,
    },
}

impl CgroupError {
    /// The coarse kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            CgroupError::NoControllers(_) => ErrorKind::Unavailable,
            CgroupError::Busy(_) => ErrorKind::Conflict,
            CgroupError::FreezeTimeout { .. } => ErrorKind::Unavailable,
            CgroupError::Io { .. } => ErrorKind::Internal,
        }
    }
}

/// How a sandbox's first process enters its cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Join {
    /// The process writes `0` into each of these `tasks` files itself, before it drops
    /// to the sandbox's uid (cgroup v1). A task moving itself through `tasks` skips the
    /// kernel's global threadgroup lock, whose RCU grace period otherwise adds
    /// milliseconds whenever other cgroup churn let it go idle.
    SelfJoin(Vec<PathBuf>),
    /// The runtime writes the pid into `cgroup.procs` ([`CgroupManager::add_process`]).
    RuntimeWrites,
}

/// Creates, fills and removes sandbox cgroups.
pub trait CgroupManager: Send + Sync + Debug {
    /// `"v1"` or `"v2"`.
    fn version(&self) -> &'static str;
    /// Creates the cgroup `name` and applies `limits`. An existing cgroup is reused.
    fn create(&self, name: &str, limits: &Limits) -> Result<(), CgroupError>;
    /// How the first process of cgroup `name` joins it.
    fn join(&self, name: &str) -> Join;
    /// Moves process `pid` into the cgroup.
    fn add_process(&self, name: &str, pid: libc::pid_t) -> Result<(), CgroupError>;
    /// The pids in the cgroup (empty when it does not exist).
    fn processes(&self, name: &str) -> Result<Vec<libc::pid_t>, CgroupError>;
    /// Removes the cgroup; a missing cgroup is not an error. Fails with
    /// [`CgroupError::Busy`] while processes remain.
    fn remove(&self, name: &str) -> Result<(), CgroupError>;
    /// Names of every cgroup under the parent (to find what is left behind).
    fn list(&self) -> Result<Vec<String>, CgroupError>;
    /// Where the controller file `file` (e.g. `pids.events`, `memory.max`) of cgroup
    /// `name` is, whatever the layout.
    fn file(&self, name: &str, file: &str) -> PathBuf;
    /// Resource usage of cgroup `name`.
    fn stats(&self, name: &str) -> Result<CgroupStats, CgroupError>;
    /// Asks the kernel to freeze (`true`) or thaw every process of cgroup `name`; a
    /// freeze completes asynchronously ([`freeze`] waits for it).
    fn set_frozen(&self, name: &str, frozen: bool) -> Result<(), CgroupError>;
    /// Where the freezer of cgroup `name` is.
    fn freezer_state(&self, name: &str) -> Result<FreezerState, CgroupError>;
    /// The directory of cgroup `name` that holds its freezer.
    fn freezer_dir(&self, name: &str) -> PathBuf;
    /// The files a process writes `0` into to move itself, and so everything it forks
    /// later, into cgroup `name`: `tasks` of each v1 hierarchy, or v2's `cgroup.procs`.
    /// A CRIU restore runs in the new sandbox's cgroups this way, so the restored
    /// processes are born in them (CRIU itself leaves cgroups alone).
    fn self_move_files(&self, name: &str) -> Vec<PathBuf>;
}

/// The freezer state of a cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreezerState {
    /// Its processes run.
    Thawed,
    /// A freeze was asked for; some processes still run.
    Freezing,
    /// Every process is stopped.
    Frozen,
}

/// Longest wait for every process of a cgroup to stop.
pub const FREEZE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Freezes cgroup `name` and returns once every process in it has stopped. A process
/// that is busy in the kernel can delay a v1 freeze, so the request is repeated while
/// waiting; past [`FREEZE_TIMEOUT`] the cgroup is thawed again and the error says so.
pub async fn freeze(cgroups: &dyn CgroupManager, name: &str) -> Result<(), CgroupError> {
    let deadline = tokio::time::Instant::now() + FREEZE_TIMEOUT;
    let mut poll = std::time::Duration::from_micros(50);
    loop {
        cgroups.set_frozen(name, true)?;
        if cgroups.freezer_state(name)? == FreezerState::Frozen {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            cgroups.set_frozen(name, false)?;
            return Err(CgroupError::FreezeTimeout {
                name: name.to_owned(),
                after: FREEZE_TIMEOUT,
            });
        }
        // The kernel offers no notification for v1; poll with a growing interval.
        tokio::time::sleep(poll).await;
        poll = (poll * 2).min(std::time::Duration::from_millis(5));
    }
}

/// Thaws cgroup `name` (one that is not frozen stays as it is).
pub fn thaw(cgroups: &dyn CgroupManager, name: &str) -> Result<(), CgroupError> {
    cgroups.set_frozen(name, false)
}

/// Resource usage of one sandbox's cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupStats {
    /// CPU time used, in nanoseconds, since the cgroup was created.
    pub cpu_usage_ns: u64,
    /// Memory charged now (including page cache), bytes.
    pub memory_bytes: u64,
    /// The memory limit, bytes.
    pub memory_limit_bytes: u64,
    /// Page cache part of `memory_bytes`.
    pub memory_cache_bytes: u64,
    /// Tasks now.
    pub pids: u64,
}

/// Picks the cgroup layout of this host; sandbox cgroups go under `parent`.
pub fn detect(parent: &str) -> Result<Box<dyn CgroupManager>, CgroupError> {
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| CgroupError::Io {
            op: "read",
            path: "/proc/self/mountinfo".into(),
            source,
        })?;
    let mounts = parse_mountinfo(&mountinfo);
    if let Some(v2) = mounts
        .iter()
        .find(|m| m.fstype == "cgroup2")
        .filter(|m| CgroupV2::has_required_controllers(&m.mount_point))
    {
        return Ok(Box::new(CgroupV2::new(v2.mount_point.clone(), parent)));
    }
    let v1 = |controller: &str| {
        mounts
            .iter()
            .find(|m| m.fstype == "cgroup" && m.super_options.split(',').any(|o| o == controller))
            .map(|m| m.mount_point.clone())
    };
    match (
        v1("memory"),
        v1("cpu"),
        v1("cpuacct"),
        v1("pids"),
        v1("freezer"),
    ) {
        (Some(memory), Some(cpu), Some(cpuacct), Some(pids), Some(freezer)) => {
            Ok(Box::new(CgroupV1::new(
                v1::Mounts {
                    memory,
                    cpu,
                    cpuacct,
                    pids,
                    freezer,
                },
                parent,
            )))
        }
        _ => Err(CgroupError::NoControllers(
            "need memory, cpu and pids in cgroup v2, or memory, cpu, cpuacct, pids and freezer \
             in v1"
                .into(),
        )),
    }
}

/// One cgroup mount from `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CgroupMount {
    mount_point: PathBuf,
    fstype: String,
    super_options: String,
}

/// Picks the cgroup and cgroup2 mounts out of a mountinfo text.
fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split(' ').nth(4)?;
            let mut right = right.split(' ');
            let fstype = right.next()?;
            let _source = right.next()?;
            let super_options = right.next().unwrap_or("");
            (fstype == "cgroup" || fstype == "cgroup2").then(|| CgroupMount {
                mount_point: PathBuf::from(unescape_mountinfo(mount_point)),
                fstype: fstype.to_owned(),
                super_options: super_options.to_owned(),
            })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` (octal).
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match (bytes[i], octal) {
            (b'\\', Some(v)) => {
                out.push(v);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|source| CgroupError::Io {
        op: "write",
        path: path.to_owned(),
        source,
    })
}

fn make_dir(path: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(CgroupError::Io {
            op: "create",
            path: path.to_owned(),
            source,
        }),
    }
}

fn remove_dir(path: &Path) -> Result<(), CgroupError> {
    match std::fs::remove_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Err(CgroupError::Busy(path.to_owned())),
        Err(source) => Err(CgroupError::Io {
            op: "remove",
            path: path.to_owned(),
            source,
        }),
    }
}

fn read_pids(procs: &Path) -> Result<Vec<libc::pid_t>, CgroupError> {
    match std::fs::read_to_string(procs) {
        Ok(text) => Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(CgroupError::Io {
            op: "read",
            path: procs.to_owned(),
            source,
        }),
    }
}

fn list_dirs(parent: &Path) -> Result<Vec<String>, CgroupError> {
    let entries = match std::fs::read_dir(parent) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(CgroupError::Io {
                op: "list",
                path: parent.to_owned(),
                source,
            })
        }
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    Ok(names)
}

fn read_text(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(|source| CgroupError::Io {
        op: "read",
        path: path.to_owned(),
        source,
    })
}

/// A number from a one-value cgroup file (`max` reads as `u64::MAX`).
fn read_u64(path: &Path) -> Result<u64, CgroupError> {
    let text = read_text(path)?;
    let text = text.trim();
    if text == "max" {
        return Ok(u64::MAX);
    }
    text.parse().map_err(|_| CgroupError::Io {
        op: "parse",
        path: path.to_owned(),
        source: io::Error::new(
            io::ErrorKind::InvalidData,
            format!("not a number: {text:?}"),
        ),
    })
}

/// `key value` lines as in `memory.stat` and `cpu.stat`.
fn stat_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// The CFS period used for CPU limits (100 ms, the kernel default).
const CPU_PERIOD_US: u64 = 100_000;

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 30 0:23 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
26 25 0:24 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw
27 25 0:25 / /sys/fs/cgroup/memory rw,nosuid shared:11 - cgroup cgroup rw,memory
28 25 0:26 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:12 - cgroup cgroup rw,cpu,cpuacct
29 25 0:27 / /sys/fs/cgroup/pids rw,nosuid shared:13 - cgroup cgroup rw,pids
30 25 0:28 / /sys/fs/cgroup/freezer rw,nosuid shared:14 - cgroup cgroup rw,freezer
31 25 0:29 / /sys/fs/cgroup/with\\040space rw - cgroup cgroup rw,name=x
";

    /// A freezer that completes after `polls` state reads (never, for `u32::MAX`).
    #[derive(Debug)]
    struct SlowFreezer {
        polls: u32,
        reads: std::sync::atomic::AtomicU32,
        frozen: std::sync::Mutex<Option<bool>>,
    }

    impl SlowFreezer {
        fn new(polls: u32) -> Self {
            SlowFreezer {
                polls,
                reads: Default::default(),
                frozen: Default::default(),
            }
        }
    }

    impl CgroupManager for SlowFreezer {
        fn version(&self) -> &'static str {
            "fake"
        }
        fn create(&self, _: &str, _: &Limits) -> Result<(), CgroupError> {
            Ok(())
        }
        fn join(&self, _: &str) -> Join {
            Join::RuntimeWrites
        }
        fn add_process(&self, _: &str, _: libc::pid_t) -> Result<(), CgroupError> {
            Ok(())
        }
        fn processes(&self, _: &str) -> Result<Vec<libc::pid_t>, CgroupError> {
            Ok(vec![])
        }
        fn remove(&self, _: &str) -> Result<(), CgroupError> {
            Ok(())
        }
        fn list(&self) -> Result<Vec<String>, CgroupError> {
            Ok(vec![])
        }
        fn file(&self, _: &str, file: &str) -> PathBuf {
            PathBuf::from(file)
        }
        fn stats(&self, _: &str) -> Result<CgroupStats, CgroupError> {
            Ok(CgroupStats::default())
        }
        fn set_frozen(&self, _: &str, frozen: bool) -> Result<(), CgroupError> {
            *self.frozen.lock().unwrap() = Some(frozen);
            Ok(())
        }
        fn freezer_dir(&self, _: &str) -> PathBuf {
            PathBuf::new()
        }
        fn self_move_files(&self, _: &str) -> Vec<PathBuf> {
            Vec::new()
        }
        fn freezer_state(&self, _: &str) -> Result<FreezerState, CgroupError> {
            let reads = self
                .reads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1;
            Ok(match *self.frozen.lock().unwrap() {
                Some(true) if reads >= self.polls => FreezerState::Frozen,
                Some(true) => FreezerState::Freezing,
                _ => FreezerState::Thawed,
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn freeze_waits_until_every_process_stopped() {
        let cg = SlowFreezer::new(5);
        freeze(&cg, "sbx").await.unwrap();
        assert_eq!(cg.reads.load(std::sync::atomic::Ordering::Relaxed), 5);
        assert_eq!(*cg.frozen.lock().unwrap(), Some(true));
    }

    #[tokio::test(start_paused = true)]
    async fn a_freeze_that_never_completes_is_undone_and_reported() {
        let cg = SlowFreezer::new(u32::MAX);
        let started = tokio::time::Instant::now();
        let err = freeze(&cg, "sbx").await.unwrap_err();
        assert!(matches!(err, CgroupError::FreezeTimeout { .. }), "{err:?}");
        assert!(started.elapsed() >= FREEZE_TIMEOUT);
        assert_eq!(*cg.frozen.lock().unwrap(), Some(false), "thawed again");
        assert_eq!(err.kind(), ErrorKind::Unavailable);
    }

    #[test]
    fn mountinfo_finds_v1_and_v2_mounts() {
        let mounts = parse_mountinfo(HYBRID);
        assert_eq!(mounts.len(), 6);
        assert_eq!(mounts[0].fstype, "cgroup2");
        assert_eq!(mounts[0].mount_point, Path::new("/sys/fs/cgroup/unified"));
        assert_eq!(
            mounts[2].mount_point,
            Path::new("/sys/fs/cgroup/cpu,cpuacct")
        );
        assert!(mounts[2].super_options.split(',').any(|o| o == "cpu"));
        assert_eq!(
            mounts[5].mount_point,
            Path::new("/sys/fs/cgroup/with space")
        );
    }

    #[test]
    fn stat_files() {
        let text = "cache 4096\nrss 100\ntotal_cache 8192\n";
        assert_eq!(stat_field(text, "cache"), Some(4096));
        assert_eq!(stat_field(text, "total_cache"), Some(8192));
        assert_eq!(stat_field(text, "swap"), None);
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("x");
        std::fs::write(&f, "max\n").unwrap();
        assert_eq!(read_u64(&f).unwrap(), u64::MAX);
        std::fs::write(&f, "123\n").unwrap();
        assert_eq!(read_u64(&f).unwrap(), 123);
        std::fs::write(&f, "x").unwrap();
        assert!(read_u64(&f).is_err());
    }

    #[test]
    fn detection_on_this_host_works() {
        // Whatever this host has, detection must either find a layout or say why.
        match detect("cubicle-detect-test") {
            Ok(m) => assert!(["v1", "v2"].contains(&m.version())),
            Err(e) => assert_eq!(e.kind(), ErrorKind::Unavailable),
        }
    }
}
