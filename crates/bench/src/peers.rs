//! Peers: other ways to start a process on the same rootfs (crun, runc, bubblewrap,
//! gVisor's runsc), and CRIU checkpointing a comparable process tree, measured with the
//! same statistics as Cubicle.
//!
//! A peer runs one of two workloads: `/bin/true`, timed from spawn to the launcher's exit
//! (as `hyperfine` would; `ns-create`), or the rootfs's `/bin/sh` printing `ready`,
//! timed from spawn to that line read (the create scenarios' ready signal, as Cubicle's
//! create is timed to its agent answering).

use std::io::{self, BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::stats::{BatchStats, Summary};

/// Why a peer cannot be measured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// Unknown peer name.
    #[error("unknown peer '{0}' (known: crun, runc, bwrap, runsc)")]
    Unknown(String),
    /// The peer's binary is not installed.
    #[error("{0} is not installed (apt-get install {0})")]
    NotInstalled(&'static str),
    /// Preparing or running the peer failed.
    #[error("{peer}: {message}")]
    Failed {
        /// Which peer.
        peer: String,
        /// What happened.
        message: String,
    },
}

/// Something that can start a process in the rootfs, once per call; calls may run
/// concurrently.
pub trait Peer: Send + Sync {
    /// Its name in reports.
    fn name(&self) -> &str;
    /// Starts it once and waits for it to finish; returns the time of its workload
    /// (to exit, or to the ready line).
    fn run_once(&self) -> Result<Duration, PeerError>;
}

/// What a peer runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// `/bin/true`, timed to the launcher's exit.
    TrueToExit,
    /// `/bin/sh -c 'echo ready'`, timed to the line read.
    Ready,
}

impl Workload {
    fn args(self) -> &'static [&'static str] {
        match self {
            Workload::TrueToExit => &["/bin/true"],
            Workload::Ready => &["/bin/sh", "-c", "echo ready"],
        }
    }
}

/// The peers the create scenarios measure, by name.
pub const CONTAINER_PEERS: [&str; 4] = ["crun", "runc", "bwrap", "runsc"];

/// Creates the named peer for `rootfs`, running `/bin/true` (ns-create).
pub fn make(name: &str, rootfs: &Path) -> Result<Box<dyn Peer>, PeerError> {
    make_with(name, rootfs, Workload::TrueToExit)
}

/// Creates the named peer for `rootfs` running `workload`.
pub fn make_with(
    name: &str,
    rootfs: &Path,
    workload: Workload,
) -> Result<Box<dyn Peer>, PeerError> {
    match name {
        "crun" => Ok(Box::new(Oci::new("crun", rootfs, workload)?)),
        "runc" => Ok(Box::new(Oci::new("runc", rootfs, workload)?)),
        "runsc" => Ok(Box::new(Oci::new("runsc", rootfs, workload)?)),
        "bwrap" => {
            which("bwrap").ok_or(PeerError::NotInstalled("bubblewrap"))?;
            Ok(Box::new(Bwrap {
                rootfs: rootfs.to_owned(),
                workload,
            }))
        }
        other => Err(PeerError::Unknown(other.to_owned())),
    }
}

/// Spawns `cmd` with stdout piped and times it: to exit, or to a `ready` line (then
/// waits for the exit, untimed). A non-zero exit is a failure with its stderr.
fn time_command(cmd: &mut Command, peer: &str, workload: Workload) -> Result<Duration, PeerError> {
    let failed = |message: String| PeerError::Failed {
        peer: peer.into(),
        message,
    };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(|e| failed(e.to_string()))?;
    let mut took = None;
    if workload == Workload::Ready {
        let stdout = child.stdout.take().expect("piped");
        for line in BufReader::new(stdout).lines() {
            match line {
                Ok(l) if l.trim() == "ready" => {
                    took = Some(started.elapsed());
                    break;
                }
                Ok(_) => {}
                Err(e) => return Err(failed(e.to_string())),
            }
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| failed(e.to_string()))?;
    let took = match (workload, took) {
        (Workload::TrueToExit, _) => started.elapsed(),
        (Workload::Ready, Some(t)) => t,
        (Workload::Ready, None) => {
            return Err(failed(format!(
                "no ready line ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    };
    if !out.status.success() {
        return Err(failed(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    Ok(took)
}

fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(bin))
        .find(|p| p.is_file())
}

/// An OCI runtime (`crun run` / `runc run`) with a bundle whose root is the rootfs,
/// read-only, and whose process is `/bin/true`.
struct Oci {
    bin: &'static str,
    bundle: tempfile::TempDir,
    runs: AtomicU64,
    workload: Workload,
    /// crun 1.8 refuses hybrid cgroup layouts; it runs in a private mount namespace
    /// without `/sys/fs/cgroup/unified` there (the workaround from the facts sheet).
    hide_unified: bool,
}

impl Oci {
    fn new(bin: &'static str, rootfs: &Path, workload: Workload) -> Result<Self, PeerError> {
        which(bin).ok_or(PeerError::NotInstalled(bin))?;
        let failed = |message: String| PeerError::Failed {
            peer: bin.into(),
            message,
        };
        let bundle = tempfile::tempdir().map_err(|e| failed(e.to_string()))?;
        // runsc has no bundle flag for `spec`: it writes into its working directory.
        let out = Command::new(bin)
            .arg("spec")
            .args(if bin == "runsc" { &[][..] } else { &["-b"][..] })
            .args((bin != "runsc").then(|| bundle.path()))
            .current_dir(bundle.path())
            .output()
            .map_err(|e| failed(e.to_string()))?;
        if !out.status.success() {
            return Err(failed(format!(
                "spec: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let path = bundle.path().join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| failed(e.to_string()))?;
        let mut config: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| failed(e.to_string()))?;
        config["root"] = serde_json::json!({"path": rootfs, "readonly": true});
        config["process"]["terminal"] = false.into();
        config["process"]["args"] = serde_json::json!(workload.args());
        std::fs::write(&path, config.to_string()).map_err(|e| failed(e.to_string()))?;
        let hybrid = bin == "crun" && Path::new("/sys/fs/cgroup/unified/cgroup.procs").exists();
        Ok(Oci {
            bin,
            bundle,
            runs: AtomicU64::new(0),
            workload,
            hide_unified: hybrid,
        })
    }
}

impl Peer for Oci {
    fn name(&self) -> &str {
        self.bin
    }

    fn run_once(&self) -> Result<Duration, PeerError> {
        let run = self.runs.fetch_add(1, Ordering::Relaxed) + 1;
        let id = format!("cubicle-bench-{}-{}", std::process::id(), run);
        let mut cmd = Command::new(self.bin);
        if self.bin == "runsc" {
            // No network namespace set-up: the others get none either.
            cmd.args(["--network=none", "run", "-bundle"]);
        } else {
            cmd.args(["run", "-b"]);
        }
        cmd.arg(self.bundle.path()).arg(&id);
        if self.hide_unified {
            // SAFETY: only syscalls between fork and exec.
            unsafe {
                cmd.pre_exec(hide_cgroup2);
            }
        }
        time_command(&mut cmd, self.bin, self.workload)
    }
}

fn hide_cgroup2() -> io::Result<()> {
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )?;
    umount2("/sys/fs/cgroup/unified", MntFlags::MNT_DETACH)?;
    Ok(())
}

/// bubblewrap with every namespace it can unshare, the rootfs read-only as `/`.
struct Bwrap {
    rootfs: PathBuf,
    workload: Workload,
}

impl Peer for Bwrap {
    fn name(&self) -> &str {
        "bwrap"
    }

    fn run_once(&self) -> Result<Duration, PeerError> {
        let mut cmd = Command::new("bwrap");
        cmd.args(["--unshare-all", "--ro-bind"])
            .arg(&self.rootfs)
            .args(["/", "--proc", "/proc", "--dev", "/dev"])
            .args(self.workload.args());
        time_command(&mut cmd, "bwrap", self.workload)
    }
}

// --- peers under the seed's concurrency ------------------------------------------------

/// What a peer measured for one row of a table, or why it did not.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum PeerOutcome {
    /// Measured.
    Measured {
        /// Latency of each operation, ms.
        latency_ms: Summary,
        /// Wall and per of the batches (`None` where the table has no batches).
        batch: Option<BatchStats>,
        /// Operations that failed (not in the statistics).
        failed: usize,
        /// The first failure's message.
        first_error: Option<String>,
    },
    /// Its binary is missing.
    NotInstalled {
        /// Which package to install.
        message: String,
    },
    /// It could not be set up or every run failed.
    Failed {
        /// Why.
        message: String,
    },
    /// There is no comparable operation.
    NotComparable {
        /// Why.
        reason: String,
    },
}

impl PeerOutcome {
    /// The outcome of a peer that could not be made.
    pub fn from_error(e: &PeerError) -> PeerOutcome {
        match e {
            PeerError::NotInstalled(_) => PeerOutcome::NotInstalled {
                message: e.to_string(),
            },
            _ => PeerOutcome::Failed {
                message: e.to_string(),
            },
        }
    }
}

/// One peer's line in a table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PeerResult {
    /// The peer.
    pub name: String,
    /// What was timed.
    pub what: String,
    /// The figures, or why there are none.
    pub outcome: PeerOutcome,
}

/// Runs `peer` as the create scenario runs Cubicle: `warmup` rounds of `concurrency`
/// runs at once (discarded), then `concurrency` threads share a queue of `requests`
/// runs; wall = first start to last finish, per = wall / requests.
pub fn run_queue(
    peer: &dyn Peer,
    concurrency: usize,
    requests: usize,
    warmup: usize,
) -> PeerOutcome {
    let concurrency = concurrency.clamp(1, requests.max(1));
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Result<Duration, PeerError>>> = Mutex::new(Vec::new());
    for _ in 0..warmup {
        std::thread::scope(|s| {
            for _ in 0..concurrency {
                s.spawn(|| {
                    let _ = peer.run_once();
                });
            }
        });
    }
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..concurrency {
            s.spawn(|| {
                while next.fetch_add(1, Ordering::Relaxed) < requests {
                    let r = peer.run_once();
                    results.lock().expect("results").push(r);
                }
            });
        }
    });
    let wall = started.elapsed();
    outcome_of(
        results.into_inner().expect("results"),
        Some((vec![wall], requests)),
    )
}

/// Statistics of runs, and of batches (`(walls, ops per batch)`) if given.
fn outcome_of(
    results: Vec<Result<Duration, PeerError>>,
    batches: Option<(Vec<Duration>, usize)>,
) -> PeerOutcome {
    let mut ok = Vec::new();
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(d) => ok.push(d),
            Err(e) => errors.push(e.to_string()),
        }
    }
    match Summary::of(&ok) {
        Some(latency_ms) => PeerOutcome::Measured {
            latency_ms,
            batch: batches.and_then(|(walls, n)| BatchStats::of(&walls, n)),
            failed: errors.len(),
            first_error: errors.into_iter().next(),
        },
        None => PeerOutcome::Failed {
            message: errors
                .into_iter()
                .next()
                .unwrap_or_else(|| "no runs".into()),
        },
    }
}

// --- CRIU ------------------------------------------------------------------------------

/// The Python program of the CRIU peer's process tree: the init of its own pid
/// namespace (as a sandbox is) in its own session, and a sleeping child; the parent holds
/// `mib` MiB of random bytes, prints `ready` once they are written, then leaves only
/// `/dev/null` open (no pipe for CRIU to trip on).
pub fn tree_program(mib: u64) -> String {
    format!(
        "import os, sys, time
os.setsid()
null = os.open('/dev/null', os.O_RDWR)
os.dup2(null, 0)
os.dup2(null, 2)
if os.fork() == 0:
    os.dup2(null, 1)
    time.sleep(1e9)
n = {mib} << 20
b = bytearray(n)
v = memoryview(b)
for i in range(0, n, 1 << 20):
    v[i:i + (1 << 20)] = os.urandom(min(1 << 20, n - i))
sys.stdout.write('ready\\n')
sys.stdout.flush()
os.dup2(null, 1)
time.sleep(1e9)
"
    )
}

/// CRIU dumping and restoring a small process tree: two Python processes (~10 MiB each,
/// like a sandbox's agent and its shell) in their own pid namespace (`unshare --pid`), so
/// that each restore gets a namespace of its own, with optional dirty memory. Needs root,
/// `criu` and `unshare`.
#[derive(Debug)]
pub struct Criu {
    images: tempfile::TempDir,
    python: PathBuf,
    runs: AtomicU64,
}

/// What CRIU measured over the rounds of a batch plan.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CriuBatch {
    /// Wall of each round's concurrent dumps.
    pub dump_walls: Vec<Duration>,
    /// Wall of each round's concurrent restores.
    pub restore_walls: Vec<Duration>,
    /// Each dump.
    pub dumps: Vec<Result<Duration, PeerError>>,
    /// Each restore.
    pub restores: Vec<Result<Duration, PeerError>>,
    /// Image sizes, bytes.
    pub image_bytes: Vec<u64>,
}

impl CriuBatch {
    /// Dumps as a peer outcome (batches of `per_batch`).
    pub fn dump_outcome(&self, per_batch: usize) -> PeerOutcome {
        outcome_of(
            clone_results(&self.dumps),
            Some((self.dump_walls.clone(), per_batch)),
        )
    }

    /// Restores as a peer outcome.
    pub fn restore_outcome(&self, per_batch: usize) -> PeerOutcome {
        outcome_of(
            clone_results(&self.restores),
            Some((self.restore_walls.clone(), per_batch)),
        )
    }

    /// Dump then restore of each tree (the rollback flow): the round's dump wall plus its
    /// restore wall.
    pub fn flow_outcome(&self, per_batch: usize) -> PeerOutcome {
        let walls: Vec<Duration> = self
            .dump_walls
            .iter()
            .zip(&self.restore_walls)
            .map(|(a, b)| *a + *b)
            .collect();
        let flows = self
            .dumps
            .iter()
            .zip(&self.restores)
            .map(|(d, r)| match (d, r) {
                (Ok(d), Ok(r)) => Ok(*d + *r),
                (Err(e), _) | (_, Err(e)) => Err(PeerError::Failed {
                    peer: "criu".into(),
                    message: e.to_string(),
                }),
            })
            .collect();
        outcome_of(flows, Some((walls, per_batch)))
    }
}

fn clone_results(r: &[Result<Duration, PeerError>]) -> Vec<Result<Duration, PeerError>> {
    r.iter()
        .map(|r| match r {
            Ok(d) => Ok(*d),
            Err(e) => Err(PeerError::Failed {
                peer: "criu".into(),
                message: e.to_string(),
            }),
        })
        .collect()
}

/// A running tree: `unshare` (our child) and the init of its pid namespace.
struct Tree {
    child: Child,
    pid: i32,
}

/// Kills the init of a pid namespace we created, and so everything in it.
fn kill_ns(init: i32) {
    if init > 1 {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(init),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

impl Tree {
    /// Kills the namespace (our processes only) and reaps `unshare`.
    fn kill(mut self) {
        kill_ns(self.pid);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn criu_failed(message: impl std::fmt::Display) -> PeerError {
    PeerError::Failed {
        peer: "criu".into(),
        message: message.to_string(),
    }
}

impl Criu {
    /// Checks that CRIU, `setsid` and a Python are here.
    pub fn new() -> Result<Criu, PeerError> {
        which("criu").ok_or(PeerError::NotInstalled("criu"))?;
        which("unshare").ok_or(PeerError::NotInstalled("util-linux"))?;
        // Debian's interpreter, not a shim in front of it (pyenv's is a shell script).
        let python = ["/usr/bin/python3", "/usr/local/bin/python3"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .or_else(|| which("python3"))
            .ok_or(PeerError::NotInstalled("python3"))?;
        if !nix::unistd::geteuid().is_root() {
            return Err(criu_failed("CRIU needs root"));
        }
        let images = tempfile::Builder::new()
            .prefix("cubicle-bench-criu-")
            .tempdir()
            .map_err(criu_failed)?;
        Ok(Criu {
            images,
            python,
            runs: AtomicU64::new(0),
        })
    }

    fn spawn_tree(&self, dirty_mib: u64) -> Result<Tree, PeerError> {
        let mut child = Command::new("unshare")
            .args(["--pid", "--fork"])
            .arg(&self.python)
            .arg("-c")
            .arg(tree_program(dirty_mib))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(criu_failed)?;
        let outer = child.id();
        let stdout = child.stdout.take().expect("piped");
        let ready = BufReader::new(stdout)
            .lines()
            .any(|l| l.map(|l| l.trim() == "ready").unwrap_or(false));
        // The namespace's init is unshare's only child.
        let pid = std::fs::read_to_string(format!("/proc/{outer}/task/{outer}/children"))
            .ok()
            .and_then(|t| t.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        let tree = Tree { child, pid };
        if !ready || pid == 0 {
            tree.kill();
            return Err(criu_failed("the process tree exited before it was ready"));
        }
        Ok(tree)
    }

    fn image_dir(&self) -> Result<PathBuf, PeerError> {
        let run = self.runs.fetch_add(1, Ordering::Relaxed);
        let dir = self.images.path().join(run.to_string());
        std::fs::create_dir_all(&dir).map_err(criu_failed)?;
        Ok(dir)
    }

    fn criu(args: &[&str], dir: &Path, log: &str) -> Result<Duration, PeerError> {
        let started = Instant::now();
        let out = Command::new("criu")
            .args(args)
            .arg("-D")
            .arg(dir)
            .args(["-o", log])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .map_err(criu_failed)?;
        let took = started.elapsed();
        if !out.status.success() {
            let log = std::fs::read_to_string(dir.join(log)).unwrap_or_default();
            // The first error is the cause; the last is "Dumping FAILED".
            let first = log
                .lines()
                .find(|l| l.contains("Error"))
                .unwrap_or("see criu.log");
            return Err(criu_failed(format!("criu {}: {first}", args[0])));
        }
        Ok(took)
    }

    /// Restores the tree dumped in `dir`, detached, into a new pid namespace; its init's
    /// pid goes to `restored.pid` there.
    fn restore(dir: &Path) -> Result<Duration, PeerError> {
        Criu::restore_as(dir, 0)
    }

    /// Restore number `i` of the image in `dir` (`restored.pid`, `restored-<i>.pid`).
    fn restore_as(dir: &Path, i: usize) -> Result<Duration, PeerError> {
        let name = match i {
            0 => "restored".to_owned(),
            i => format!("restored-{i}"),
        };
        let pidfile = dir.join(format!("{name}.pid"));
        let pidfile = pidfile
            .to_str()
            .ok_or_else(|| criu_failed("non-UTF-8 path"))?;
        Criu::criu(
            &["restore", "-d", "--pidfile", pidfile],
            dir,
            &format!("{name}.log"),
        )
    }

    /// The clone scenario's peer: each round dumps a fresh tree holding `dirty_mib` MiB
    /// and leaves it running, then restores that image `n` times with `concurrency`
    /// restores at once (each into its own pid namespace). Timed: the dump and the
    /// restores (wall = dump start → last restore done, per = wall / n); the latency is
    /// each restore's.
    pub fn clone_batch(
        &self,
        n: usize,
        concurrency: usize,
        rounds: usize,
        warmup: usize,
        dirty_mib: u64,
    ) -> PeerOutcome {
        let mut walls = Vec::new();
        let mut ops = Vec::new();
        for round in 0..warmup + rounds {
            let counted = round >= warmup;
            let (tree, dir) = match self.spawn_tree(dirty_mib).and_then(|t| {
                let dir = self.image_dir();
                match dir {
                    Ok(d) => Ok((t, d)),
                    Err(e) => {
                        t.kill();
                        Err(e)
                    }
                }
            }) {
                Ok(x) => x,
                Err(e) => {
                    if counted {
                        ops.push(Err(e));
                    }
                    continue;
                }
            };
            let started = Instant::now();
            let pid = tree.pid.to_string();
            let dumped = Criu::criu(&["dump", "--leave-running", "-t", &pid], &dir, "dump.log");
            let next = AtomicUsize::new(0);
            let results: Mutex<Vec<Result<Duration, PeerError>>> = Mutex::new(Vec::new());
            let mut clean = dumped.is_ok();
            if let Err(e) = dumped {
                if counted {
                    ops.push(Err(e));
                }
            } else {
                std::thread::scope(|s| {
                    for _ in 0..concurrency.clamp(1, n.max(1)) {
                        s.spawn(|| loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if i >= n {
                                return;
                            }
                            let r = Criu::restore_as(&dir, i + 1);
                            results.lock().expect("results").push(r);
                        });
                    }
                });
            }
            let wall = started.elapsed();
            let results = results.into_inner().expect("results");
            clean &= results.iter().all(Result::is_ok);
            for i in 1..=n {
                let pid = std::fs::read_to_string(dir.join(format!("restored-{i}.pid")))
                    .ok()
                    .and_then(|t| t.trim().parse().ok())
                    .unwrap_or(0);
                kill_ns(pid);
            }
            tree.kill();
            let _ = std::fs::remove_dir_all(&dir);
            if counted {
                if clean {
                    walls.push(wall);
                }
                ops.extend(results);
            }
        }
        outcome_of(ops, Some((walls, n)))
    }

    /// `warmup` + `rounds` rounds; each spawns `concurrency` trees (untimed, until
    /// ready), dumps them all at once (timed), then restores them all at once (timed) and
    /// kills what was restored.
    pub fn batch(
        &self,
        concurrency: usize,
        rounds: usize,
        warmup: usize,
        dirty_mib: u64,
    ) -> CriuBatch {
        let mut out = CriuBatch::default();
        for round in 0..warmup + rounds {
            let counted = round >= warmup;
            let trees: Vec<Result<(Tree, PathBuf), PeerError>> = (0..concurrency)
                .map(|_| Ok((self.spawn_tree(dirty_mib)?, self.image_dir()?)))
                .collect();
            let mut ready = Vec::new();
            for t in trees {
                match t {
                    Ok(t) => ready.push(t),
                    Err(e) => {
                        if counted {
                            out.dumps.push(Err(e));
                        }
                    }
                }
            }
            // Dump (the tree is killed by CRIU once dumped).
            let started = Instant::now();
            let dumps: Vec<Result<Duration, PeerError>> = std::thread::scope(|s| {
                let handles: Vec<_> = ready
                    .iter()
                    .map(|(t, dir)| {
                        let pid = t.pid.to_string();
                        s.spawn(move || Criu::criu(&["dump", "-t", &pid], dir, "dump.log"))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("dump thread"))
                    .collect()
            });
            let dump_wall = started.elapsed();
            let mut dumped = Vec::new();
            let clean = ready.len() == concurrency && dumps.iter().all(Result::is_ok);
            for ((tree, dir), result) in ready.into_iter().zip(dumps) {
                let ok = result.is_ok();
                if counted {
                    if ok {
                        out.image_bytes.push(dir_size(&dir));
                    }
                    out.dumps.push(result);
                }
                let pid = tree.pid;
                // Reaps the dumped leader (or kills a tree whose dump failed).
                tree.kill();
                if ok {
                    dumped.push((pid, dir));
                }
            }
            // Restore, detached; then kill the restored sessions.
            let started = Instant::now();
            let restores: Vec<Result<Duration, PeerError>> = std::thread::scope(|s| {
                let handles: Vec<_> = dumped
                    .iter()
                    .map(|(_, dir)| s.spawn(move || Criu::restore(dir)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("restore thread"))
                    .collect()
            });
            let restore_wall = started.elapsed();
            for ((_, dir), result) in dumped.iter().zip(&restores) {
                if result.is_ok() {
                    kill_ns(restored_pid(dir));
                }
                let _ = std::fs::remove_dir_all(dir);
            }
            if counted {
                // As for Cubicle, a round with a failure has no wall (concurrent dumps of
                // trees that share the host's mount namespace fail now and then in CRIU's
                // parasite: "Can't get proc fd").
                if clean && restores.iter().all(Result::is_ok) {
                    out.dump_walls.push(dump_wall);
                    out.restore_walls.push(restore_wall);
                }
                out.restores.extend(restores);
            }
        }
        out
    }
}

/// The init of the tree restored from `dir` (CRIU's `--pidfile`).
fn restored_pid(dir: &Path) -> i32 {
    std::fs::read_to_string(dir.join("restored.pid"))
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0)
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer that takes `ms[i]` for its i-th run.
    struct Fake {
        ms: Vec<u64>,
        i: AtomicUsize,
    }

    impl Peer for Fake {
        fn name(&self) -> &str {
            "fake"
        }
        fn run_once(&self) -> Result<Duration, PeerError> {
            let i = self.i.fetch_add(1, Ordering::Relaxed);
            match self.ms.get(i) {
                Some(0) | None => Err(PeerError::Failed {
                    peer: "fake".into(),
                    message: format!("run {i}"),
                }),
                Some(ms) => Ok(Duration::from_millis(*ms)),
            }
        }
    }

    #[test]
    fn queued_runs_are_summarised_and_warmup_discarded() {
        // One warm-up run (the 1000 ms), then 4 measured, one failing.
        let fake = Fake {
            ms: vec![1000, 10, 20, 0, 30],
            i: AtomicUsize::new(0),
        };
        match run_queue(&fake, 1, 4, 1) {
            PeerOutcome::Measured {
                latency_ms,
                batch,
                failed,
                first_error,
            } => {
                assert_eq!(
                    (latency_ms.n, latency_ms.min, latency_ms.max),
                    (3, 10.0, 30.0)
                );
                assert_eq!(latency_ms.avg, 20.0);
                assert_eq!(failed, 1);
                assert_eq!(first_error.as_deref(), Some("fake: run 3"));
                let b = batch.unwrap();
                assert_eq!((b.wall.n, b.ops_per_batch), (1, 4));
            }
            other => panic!("{other:?}"),
        }
        let none = Fake {
            ms: vec![],
            i: AtomicUsize::new(0),
        };
        assert!(matches!(
            run_queue(&none, 2, 2, 0),
            PeerOutcome::Failed { .. }
        ));
    }

    #[test]
    fn the_flow_adds_dump_and_restore() {
        let ms = Duration::from_millis;
        let b = CriuBatch {
            dump_walls: vec![ms(10), ms(20)],
            restore_walls: vec![ms(30), ms(40)],
            dumps: vec![Ok(ms(10)), Ok(ms(20))],
            restores: vec![Ok(ms(30)), Ok(ms(40))],
            image_bytes: vec![],
        };
        match b.flow_outcome(1) {
            PeerOutcome::Measured {
                latency_ms, batch, ..
            } => {
                assert_eq!((latency_ms.min, latency_ms.max), (40.0, 60.0));
                assert_eq!(batch.unwrap().per_avg, 50.0);
            }
            other => panic!("{other:?}"),
        }
        assert!(tree_program(8).contains("n = 8 << 20"));
    }

    #[test]
    fn a_missing_binary_says_not_installed() {
        let e = PeerError::NotInstalled("runsc");
        assert!(matches!(
            PeerOutcome::from_error(&e),
            PeerOutcome::NotInstalled { .. }
        ));
        assert!(matches!(
            make_with("nope", Path::new("/"), Workload::Ready),
            Err(PeerError::Unknown(_))
        ));
    }
}
