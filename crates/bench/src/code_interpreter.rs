//! `code-interpreter`: code-interpreter sandboxes through the public API of a daemon on
//! this host, the workload of the seed report (§3.2 create latency at c=1, §3.3 idle
//! memory per sandbox), plus the latency of the first `run_code` that a user waits for.
//!
//! The run, one sandbox at a time:
//!
//! 1. W warm-up sandboxes: create, run `1+1` twice, kill; not counted. They make sure
//!    the template's zygote runs before anything is measured, and that the daemon's
//!    sandboxes are visible in this host's cgroups (else the run stops).
//! 2. `MemAvailable` from `/proc/meminfo`, and the template zygotes' memory.
//! 3. N sandboxes, one after another: create (timed: request sent → `201`), then at once
//!    `1+1` through the sandbox proxy on port 49999 (timed: request sent →
//!    `end_of_execution`; the main result must be `2`), then `1+1` again (warm). All N
//!    stay alive.
//! 4. Idle: every sandbox's cgroup CPU time is read every 100 ms until none has grown
//!    for [`QUIET_WINDOW`], or until the bound; the report says which.
//! 5. `MemAvailable` again (the seed's method: the drop divided by N), then per sandbox
//!    the sum over the processes of its cgroup of PSS, USS (`Private_Clean` +
//!    `Private_Dirty`) and RSS from `/proc/<pid>/smaps_rollup`; the template zygotes
//!    again.
//! 6. Every sandbox is killed (untimed). Sandboxes stay registered in a [`Live`] until
//!    their kill was tried, so a caller interrupted mid-run can kill what is left.
//!
//! Reading other processes' `smaps_rollup` needs root.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use cubicle_client::{ApiClient, ClientError, CodeEvent, CreateSandbox, RunCode};
use cubicle_core::DataDir;
use cubicle_runtime::ns::cgroup::{self, CgroupError, CgroupManager};
use serde::Serialize;
use tokio::time::Instant;

use crate::api_create::{group_errors, ErrorCount};
use crate::stats::{percentile, Summary};

/// The code each sandbox runs, and the main result it must give.
pub const CODE: &str = "1+1";
/// See [`CODE`].
pub const EXPECTED: &str = "2";
/// How long a sandbox's CPU time must stay unchanged to count as idle.
pub const QUIET_WINDOW: Duration = Duration::from_secs(1);
/// How often CPU times are read while waiting for idle.
const QUIET_POLL: Duration = Duration::from_millis(100);
/// Longest wait for one `run_code` to end.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);
/// Marks the template zygote among the processes of a daemon (`python3 -c <kernel>
/// --template-zygote`).
const ZYGOTE_MARK: &[u8] = b"--template-zygote";

/// The seed report's (CubeSandbox's) figures for the same scenario.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Seed {
    /// §3.2, `cube-bench -c 1 -n 20 -w 3`: create latency at c=1, ms.
    pub create_ms: SeedCreate,
    /// §3.3: idle sandbox, MemAvailable drop per sandbox (`free -m`, so MiB), 20
    /// sandboxes.
    pub idle_mib: f64,
    /// §3.3: the range of that figure over 1, 5, 10 and 20 sandboxes.
    pub idle_mib_range: (f64, f64),
}

/// The seed's create latency statistics (ms).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SeedCreate {
    /// Creates measured.
    pub n: usize,
    /// Mean.
    pub avg: f64,
    /// Smallest.
    pub min: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

/// The seed's figures (16-vCPU VM, 2 vCPU / 2 GiB sandboxes).
pub const SEED: Seed = Seed {
    create_ms: SeedCreate {
        n: 20,
        avg: 66.7,
        min: 55.9,
        p50: 64.5,
        p90: 77.5,
        p95: 78.2,
        p99: 80.2,
        max: 80.2,
    },
    idle_mib: 30.0,
    idle_mib_range: (27.0, 34.0),
};

// --- the plan ---------------------------------------------------------------------

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// Sandboxes created, measured and kept alive together (N).
    pub sandboxes: usize,
    /// Warm-up sandboxes (created, used, killed; not counted).
    pub warmup: usize,
    /// Template to create them from.
    pub template: String,
    /// Longest wait for the sandboxes to be idle, ms.
    pub idle_bound_ms: u64,
    /// The lifetime asked for each sandbox, seconds: the daemon kills it then if this
    /// process could not.
    pub sandbox_timeout_s: u64,
}

/// Why a plan cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// N = 0.
    #[error("the number of sandboxes (-n) must be at least 1")]
    NoSandboxes,
    /// An empty template name.
    #[error("the template (-t) must not be empty")]
    NoTemplate,
    /// A zero idle bound.
    #[error("the idle timeout (--idle-timeout) must be at least 1 second")]
    NoIdleBound,
}

impl Plan {
    /// A checked plan; the sandboxes' lifetime covers the whole run with room to spare.
    pub fn new(
        sandboxes: usize,
        warmup: usize,
        template: &str,
        idle_bound: Duration,
    ) -> Result<Plan, PlanError> {
        if sandboxes == 0 {
            return Err(PlanError::NoSandboxes);
        }
        if template.trim().is_empty() {
            return Err(PlanError::NoTemplate);
        }
        if idle_bound < Duration::from_secs(1) {
            return Err(PlanError::NoIdleBound);
        }
        Ok(Plan {
            sandboxes,
            warmup,
            template: template.to_owned(),
            idle_bound_ms: idle_bound.as_millis() as u64,
            // 2 minutes, the idle bound, and 2 s per sandbox (a create and two runs
            // take well under 0.2 s).
            sandbox_timeout_s: 120 + idle_bound.as_secs() + 2 * (sandboxes as u64 + warmup as u64),
        })
    }
}

// --- /proc and cgroups --------------------------------------------------------------

/// Memory of a process (or a sum of processes), KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ProcMemory {
    /// Proportional set size: private pages plus each shared page divided by its
    /// sharers. Sums over processes add up to the memory they use together.
    pub pss_kib: u64,
    /// Unique set size: `Private_Clean + Private_Dirty`, what freeing this process
    /// alone would give back.
    pub uss_kib: u64,
    /// Resident set size: every page mapped, shared or not.
    pub rss_kib: u64,
}

impl std::ops::AddAssign for ProcMemory {
    fn add_assign(&mut self, o: ProcMemory) {
        self.pss_kib += o.pss_kib;
        self.uss_kib += o.uss_kib;
        self.rss_kib += o.rss_kib;
    }
}

/// `Key:   123 kB` lines, as in `smaps_rollup` and `meminfo`: the value of `key` in KiB.
pub(crate) fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, rest) = line.split_once(':')?;
        if k.trim() != key {
            return None;
        }
        let mut words = rest.split_whitespace();
        let value = words.next()?.parse().ok()?;
        match words.next() {
            None | Some("kB") => Some(value),
            Some(_) => None,
        }
    })
}

/// PSS, USS and RSS from a `/proc/<pid>/smaps_rollup` text; `None` if a field is
/// missing.
pub fn parse_smaps_rollup(text: &str) -> Option<ProcMemory> {
    Some(ProcMemory {
        pss_kib: kib_field(text, "Pss")?,
        uss_kib: kib_field(text, "Private_Clean")? + kib_field(text, "Private_Dirty")?,
        rss_kib: kib_field(text, "Rss")?,
    })
}

/// `MemAvailable` from a `/proc/meminfo` text, KiB.
pub fn parse_mem_available(text: &str) -> Option<u64> {
    kib_field(text, "MemAvailable")
}

/// The parent pid from a `/proc/<pid>/stat` text (the command name in parentheses may
/// contain spaces and parentheses: fields are counted after the last `)`).
pub fn parse_stat_ppid(text: &str) -> Option<i32> {
    let (_, rest) = text.rsplit_once(')')?;
    // state, ppid
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// The parent of a set of processes (a sandbox's cgroup): the parent of those whose
/// parent is not in the set (the sandbox's first process), if there is exactly one.
/// `(pid, ppid)` pairs.
pub fn outside_parent(processes: &[(i32, i32)]) -> Option<i32> {
    let mut parents: Vec<i32> = processes
        .iter()
        .filter(|(_, ppid)| !processes.iter().any(|(pid, _)| pid == ppid))
        .map(|(_, ppid)| *ppid)
        .collect();
    parents.sort_unstable();
    parents.dedup();
    match parents[..] {
        [one] if one > 1 => Some(one),
        _ => None,
    }
}

/// One sandbox's processes and their memory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SandboxMemory {
    /// Processes found in its cgroup.
    pub processes: usize,
    /// Processes whose `smaps_rollup` could not be read (they exited meanwhile).
    pub unreadable: usize,
    /// Sum over the readable processes.
    pub total: ProcMemory,
}

/// How the template zygotes were found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ZygoteLookup {
    /// Children of the daemon (the parent of the sandboxes' first processes).
    DaemonChildren,
    /// Any process whose parent's command line has `serve` (the daemon was not known).
    ServeChildren,
}

/// The sandboxes' side of this host: their cgroups and processes, `/proc`.
#[derive(Debug)]
pub struct Host {
    cgroups: Box<dyn CgroupManager>,
    proc_root: PathBuf,
}

impl Host {
    /// The sandboxes of the daemon whose data dir is `data` (its cgroup parent, see
    /// `cubicle_runtime::ns::cgroup_parent_for`), in the cgroup layout of this host.
    pub fn new(data: &DataDir) -> Result<Host, CgroupError> {
        let parent = cubicle_runtime::ns::cgroup_parent_for(data);
        Ok(Host::with(cgroup::detect(&parent)?, "/proc"))
    }

    /// A host whose cgroups and `/proc` are elsewhere (tests).
    pub fn with(cgroups: Box<dyn CgroupManager>, proc_root: impl Into<PathBuf>) -> Host {
        Host {
            cgroups,
            proc_root: proc_root.into(),
        }
    }

    /// `"v1"` or `"v2"`.
    pub fn cgroup_version(&self) -> &'static str {
        self.cgroups.version()
    }

    /// Where the processes of sandbox `id` are listed (for messages).
    pub fn procs_file(&self, id: &str) -> PathBuf {
        self.cgroups.file(id, "cgroup.procs")
    }

    /// The processes of sandbox `id` (empty if its cgroup does not exist here).
    pub fn processes(&self, id: &str) -> Result<Vec<i32>, CgroupError> {
        self.cgroups.processes(id)
    }

    /// CPU time sandbox `id` used so far, ns.
    pub fn cpu_usage_ns(&self, id: &str) -> Result<u64, CgroupError> {
        Ok(self.cgroups.stats(id)?.cpu_usage_ns)
    }

    fn proc_file(&self, pid: i32, file: &str) -> PathBuf {
        self.proc_root.join(pid.to_string()).join(file)
    }

    /// One process's memory.
    pub fn process_memory(&self, pid: i32) -> io::Result<ProcMemory> {
        let path = self.proc_file(pid, "smaps_rollup");
        let text = std::fs::read_to_string(&path)?;
        parse_smaps_rollup(&text).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: no Pss/Rss/Private_* fields", path.display()),
            )
        })
    }

    /// The memory of every process of sandbox `id`.
    pub fn sandbox_memory(&self, id: &str) -> Result<SandboxMemory, CgroupError> {
        let pids = self.processes(id)?;
        let mut m = SandboxMemory {
            processes: pids.len(),
            ..SandboxMemory::default()
        };
        for pid in pids {
            match self.process_memory(pid) {
                Ok(p) => m.total += p,
                Err(_) => m.unreadable += 1,
            }
        }
        Ok(m)
    }

    /// `MemAvailable`, KiB.
    pub fn mem_available_kib(&self) -> io::Result<u64> {
        let path = self.proc_root.join("meminfo");
        parse_mem_available(&std::fs::read_to_string(&path)?).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: no MemAvailable", path.display()),
            )
        })
    }

    fn ppid(&self, pid: i32) -> Option<i32> {
        parse_stat_ppid(&std::fs::read_to_string(self.proc_file(pid, "stat")).ok()?)
    }

    fn cmdline(&self, pid: i32) -> Vec<u8> {
        std::fs::read(self.proc_file(pid, "cmdline")).unwrap_or_default()
    }

    /// Whether `pid` looks like a daemon: an argument `serve`, and not a sandbox's
    /// agent (`cubicle-agent serve`).
    fn is_serve(&self, pid: i32) -> bool {
        let cmdline = self.cmdline(pid);
        let mut args = cmdline.split(|b| *b == 0);
        let argv0 = args.next().unwrap_or_default();
        let name = argv0.rsplit(|b| *b == b'/').next().unwrap_or_default();
        name != b"cubicle-agent" && args.any(|a| a == b"serve")
    }

    /// The daemon that runs sandbox `id`: the parent of its first process, if that is
    /// still the process that created it.
    pub fn daemon_of(&self, id: &str) -> Option<i32> {
        let pairs: Vec<(i32, i32)> = self
            .processes(id)
            .ok()?
            .into_iter()
            .filter_map(|pid| Some((pid, self.ppid(pid)?)))
            .collect();
        outside_parent(&pairs)
    }

    fn all_pids(&self) -> Vec<i32> {
        let Ok(entries) = std::fs::read_dir(&self.proc_root) else {
            return Vec::new();
        };
        let mut pids: Vec<i32> = entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        pids.sort_unstable();
        pids
    }

    /// Template zygotes: children of `daemon` started as `--template-zygote`, or without
    /// a daemon, such processes whose parent's command line has `serve` (and is not a
    /// sandbox's agent, whose Python zygote and kernel carry the same command line).
    pub fn template_zygotes(&self, daemon: Option<i32>) -> (Vec<Zygote>, ZygoteLookup) {
        let lookup = match daemon {
            Some(_) => ZygoteLookup::DaemonChildren,
            None => ZygoteLookup::ServeChildren,
        };
        let zygotes = self
            .all_pids()
            .into_iter()
            .filter_map(|pid| {
                let ppid = self.ppid(pid)?;
                let parent_ok = match daemon {
                    Some(d) => ppid == d,
                    None => ppid > 1 && self.is_serve(ppid),
                };
                let marked = parent_ok
                    && self
                        .cmdline(pid)
                        .split(|b| *b == 0)
                        .any(|a| a == ZYGOTE_MARK);
                marked.then(|| Zygote {
                    pid,
                    daemon: ppid,
                    memory: self.process_memory(pid).ok(),
                })
            })
            .collect();
        (zygotes, lookup)
    }
}

/// A template zygote and its memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Zygote {
    /// Its pid.
    pub pid: i32,
    /// Its parent, the daemon.
    pub daemon: i32,
    /// Its memory (`None` if it could not be read).
    pub memory: Option<ProcMemory>,
}

// --- idle detection -------------------------------------------------------------------

/// Decides when CPU counters stopped growing: each counter's samples over the last
/// `window`.
#[derive(Debug)]
pub struct Quiet {
    window: Duration,
    samples: BTreeMap<String, VecDeque<(Duration, u64)>>,
}

impl Quiet {
    /// Counters are quiet once unchanged for `window`.
    pub fn new(window: Duration) -> Quiet {
        Quiet {
            window,
            samples: BTreeMap::new(),
        }
    }

    /// Counter `id` read `value` at `at` (times increase).
    pub fn record(&mut self, id: &str, at: Duration, value: u64) {
        let s = self.samples.entry(id.to_owned()).or_default();
        s.push_back((at, value));
        // Keep the newest sample at or before the window's start, and what follows.
        let start = at.saturating_sub(self.window);
        while s.len() > 1 && s[1].0 <= start {
            s.pop_front();
        }
    }

    /// Whether counter `id` has not changed over the `window` before `now` (never true
    /// before it has been watched that long).
    pub fn is_quiet(&self, id: &str, now: Duration) -> bool {
        let Some(s) = self.samples.get(id) else {
            return false;
        };
        match (s.front(), s.back()) {
            (Some(first), Some(last)) => {
                first.0 + self.window <= now && last.0 >= first.0 && last.1 == first.1
            }
            _ => false,
        }
    }
}

// --- statistics -------------------------------------------------------------------------

/// Statistics of per-sandbox memory, MiB.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemSummary {
    /// Sandboxes.
    pub n: usize,
    /// Smallest.
    pub min: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// Largest.
    pub max: f64,
    /// Mean.
    pub avg: f64,
    /// Sum over all sandboxes.
    pub sum: f64,
}

impl MemSummary {
    /// Summarises values in KiB; `None` for none.
    pub fn of(kib: &[u64]) -> Option<MemSummary> {
        if kib.is_empty() {
            return None;
        }
        let mut mib: Vec<f64> = kib.iter().map(|k| *k as f64 / 1024.0).collect();
        mib.sort_by(|a, b| a.total_cmp(b));
        let sum: f64 = mib.iter().sum();
        Some(MemSummary {
            n: mib.len(),
            min: mib[0],
            p50: percentile(&mib, 50.0),
            p90: percentile(&mib, 90.0),
            max: mib[mib.len() - 1],
            avg: sum / mib.len() as f64,
            sum,
        })
    }
}

/// Whether an execution gave the expected main result: `result` is the main result's
/// text, `error` the execution's error.
pub fn check_result(
    result: Option<&str>,
    error: Option<&str>,
    expected: &str,
) -> Result<(), String> {
    match (result, error) {
        (_, Some(e)) => Err(format!("the code raised {e}")),
        (Some(r), None) if r == expected => Ok(()),
        (Some(r), None) => Err(format!("result {r:?} instead of {expected:?}")),
        (None, None) => Err("no result".into()),
    }
}

// --- the report -------------------------------------------------------------------------

/// How waiting for idle went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Idle {
    /// From the last create to idle (or the bound), ms.
    pub waited_ms: u64,
    /// The window: no CPU time for this long, ms.
    pub window_ms: u64,
    /// Whether the bound was hit with sandboxes still busy.
    pub bound_hit: bool,
    /// Sandboxes still busy when the wait ended.
    pub busy: usize,
}

/// `MemAvailable` around the measured creates.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemAvailable {
    /// Before the first measured create, MiB.
    pub before_mib: f64,
    /// With all sandboxes created and idle, MiB.
    pub after_mib: f64,
    /// `before - after`, MiB.
    pub drop_mib: f64,
    /// `drop / sandboxes created`, MiB.
    pub per_sandbox_mib: f64,
}

/// Idle memory of the sandboxes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Memory {
    /// Sandboxes measured (those created whose cgroup still had processes).
    pub sandboxes: usize,
    /// Processes per sandbox: fewest and most.
    pub processes: (usize, usize),
    /// Processes that exited before their memory was read.
    pub unreadable_processes: usize,
    /// PSS per sandbox.
    pub pss_mib: Option<MemSummary>,
    /// USS per sandbox.
    pub uss_mib: Option<MemSummary>,
    /// RSS per sandbox.
    pub rss_mib: Option<MemSummary>,
}

impl Memory {
    /// Summarises per-sandbox measurements.
    pub fn of(sandboxes: &[SandboxMemory]) -> Memory {
        let field = |f: fn(&ProcMemory) -> u64| {
            MemSummary::of(&sandboxes.iter().map(|s| f(&s.total)).collect::<Vec<_>>())
        };
        Memory {
            sandboxes: sandboxes.len(),
            processes: (
                sandboxes.iter().map(|s| s.processes).min().unwrap_or(0),
                sandboxes.iter().map(|s| s.processes).max().unwrap_or(0),
            ),
            unreadable_processes: sandboxes.iter().map(|s| s.unreadable).sum(),
            pss_mib: field(|m| m.pss_kib),
            uss_mib: field(|m| m.uss_kib),
            rss_mib: field(|m| m.rss_kib),
        }
    }
}

/// A template zygote, before the measured creates and with all sandboxes idle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ZygoteReport {
    /// Its pid.
    pub pid: i32,
    /// The daemon (its parent).
    pub daemon: i32,
    /// Its memory before the first measured create (`None`: it was not running yet).
    pub before: Option<ProcMemory>,
    /// Its memory with the N sandboxes idle.
    pub with_sandboxes: Option<ProcMemory>,
}

/// The result of a run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// The plan.
    pub plan: Plan,
    /// Cgroup layout of this host.
    pub cgroup_version: &'static str,
    /// Sandboxes created.
    pub created: usize,
    /// Creates that failed.
    pub create_failed: usize,
    /// Create latency, ms (request sent → 201).
    pub create_ms: Option<Summary>,
    /// Failed creates by message.
    pub create_errors: Vec<ErrorCount>,
    /// First `1+1` in each sandbox, ms (request sent → `end_of_execution`).
    pub first_run_ms: Option<Summary>,
    /// Second `1+1` in each sandbox, ms.
    pub second_run_ms: Option<Summary>,
    /// First runs that failed or gave another result.
    pub first_run_failed: usize,
    /// Second runs that failed or gave another result.
    pub second_run_failed: usize,
    /// Failed runs by message (`first: ...`, `second: ...`).
    pub run_errors: Vec<ErrorCount>,
    /// Warm-up sandboxes that failed (create or run).
    pub warmup_failures: usize,
    /// Waiting for idle.
    pub idle: Idle,
    /// `MemAvailable` before and after (`None` if it could not be read).
    pub mem_available: Option<MemAvailable>,
    /// Per-sandbox memory from `smaps_rollup`.
    pub memory: Memory,
    /// The daemon's template zygotes.
    pub zygotes: Vec<ZygoteReport>,
    /// How they were found.
    pub zygote_lookup: ZygoteLookup,
    /// Kills that failed (those sandboxes live until their timeout).
    pub kill_errors: Vec<ErrorCount>,
    /// The seed's figures.
    pub seed: Seed,
}

impl Report {
    /// Whether anything failed.
    pub fn failures(&self) -> usize {
        self.create_failed + self.first_run_failed + self.second_run_failed
    }
}

// --- the run ----------------------------------------------------------------------------

/// Sandboxes created and not yet killed: what to kill if the run is cut short.
#[derive(Debug, Default)]
pub struct Live {
    ids: Mutex<Vec<String>>,
}

impl Live {
    fn add(&self, id: &str) {
        self.ids.lock().expect("live list").push(id.to_owned());
    }

    fn remove(&self, id: &str) {
        self.ids.lock().expect("live list").retain(|x| x != id);
    }

    /// The sandboxes not yet killed.
    pub fn ids(&self) -> Vec<String> {
        self.ids.lock().expect("live list").clone()
    }
}

/// Kills every sandbox in `live`, one after another; each leaves `live` once tried.
/// Returns the failures.
pub async fn kill_all(client: &ApiClient, live: &Live) -> Vec<ErrorCount> {
    let mut errors = Vec::new();
    for id in live.ids() {
        match client.kill(&id).await {
            Ok(true) => {}
            Ok(false) => errors.push("the sandbox was already gone".to_owned()),
            Err(e) => errors.push(error_message(&e)),
        }
        live.remove(&id);
    }
    group_errors(errors.iter().map(String::as_str))
}

/// Progress of a run, for a status line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Warm-up sandbox `done` of `total` is done.
    Warmup {
        /// Done so far.
        done: usize,
        /// W.
        total: usize,
    },
    /// `done` of `total` sandboxes are created (and ran their code).
    Created {
        /// Done so far.
        done: usize,
        /// N.
        total: usize,
        /// Failed creates or runs so far.
        failed: usize,
    },
    /// Waiting for idle: `busy` sandboxes still use CPU.
    Settling {
        /// Not yet idle.
        busy: usize,
        /// Waited so far, ms.
        waited_ms: u64,
    },
    /// Reading memory.
    Measuring,
    /// Killing `count` sandboxes.
    Killing {
        /// Sandboxes to kill.
        count: usize,
    },
}

/// Why a run stopped before it had a report.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The daemon's sandboxes are not on this host, or not under this data dir.
    #[error(
        "sandbox {id} has no processes in {procs}: the daemon must run on this host \
         with the data dir given by --data-dir (the cgroup parent derives from it)"
    )]
    NotHere {
        /// The sandbox.
        id: String,
        /// Where its processes should be listed.
        procs: String,
    },
    /// Reading the host's cgroups failed.
    #[error("reading the sandboxes' cgroups")]
    Cgroup(#[from] CgroupError),
}

/// A created sandbox.
struct Created {
    id: String,
    token: Option<String>,
}

async fn create(client: &ApiClient, request: &CreateSandbox) -> Result<Created, String> {
    client
        .create(request)
        .await
        .map(|s| Created {
            id: s.sandbox_id,
            token: s.envd_access_token,
        })
        .map_err(|e| error_message(&e))
}

/// Runs [`CODE`] in the sandbox's default Python context; the time from the request
/// sent to `end_of_execution`.
async fn run_code(client: &ApiClient, sandbox: &Created) -> Result<Duration, String> {
    let request = RunCode {
        code: CODE.into(),
        ..RunCode::default()
    };
    let started = Instant::now();
    let run = async {
        let mut run = client
            .run_code(&sandbox.id, sandbox.token.as_deref(), &request)
            .await
            .map_err(|e| error_message(&e))?;
        let (mut result, mut error) = (None, None);
        loop {
            match run.next().await {
                Some(Ok(CodeEvent::Result(r))) if r.is_main_result => result = r.text,
                Some(Ok(CodeEvent::Error { name, value, .. })) => {
                    error = Some(format!("{name}: {value}"))
                }
                Some(Ok(CodeEvent::EndOfExecution)) => {
                    let took = started.elapsed();
                    // Read the answer to its end so the connection can be reused.
                    let _ = tokio::time::timeout(Duration::from_secs(5), async {
                        while run.next().await.is_some() {}
                    })
                    .await;
                    check_result(result.as_deref(), error.as_deref(), EXPECTED)?;
                    return Ok(took);
                }
                Some(Ok(CodeEvent::UnexpectedEndOfExecution)) => {
                    return Err("the kernel died (unexpected_end_of_execution)".into())
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(error_message(&e)),
                None => return Err("the answer ended before end_of_execution".into()),
            }
        }
    };
    tokio::time::timeout(RUN_TIMEOUT, run)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "no end_of_execution within {} s",
                RUN_TIMEOUT.as_secs()
            ))
        })
}

/// Runs the plan against the daemon behind `client`, whose sandboxes `host` sees.
/// Every sandbox created is in `live` until its kill was tried.
pub async fn run(
    client: &ApiClient,
    plan: &Plan,
    host: &Host,
    live: &Live,
    progress: &dyn Fn(Progress),
) -> Result<Report, RunError> {
    let mut request = CreateSandbox::new(plan.template.clone());
    request.timeout = Some(plan.sandbox_timeout_s);
    let mut daemon = None;
    let mut checked = false;

    // Warm-up: the template's zygote starts if it was not running; the first sandbox
    // proves that this host sees the daemon's sandboxes.
    let mut warmup_failures = 0;
    for i in 0..plan.warmup {
        match create(client, &request).await {
            Ok(sandbox) => {
                live.add(&sandbox.id);
                let runs = [
                    run_code(client, &sandbox).await,
                    run_code(client, &sandbox).await,
                ];
                if runs.iter().any(Result::is_err) {
                    warmup_failures += 1;
                }
                let here = match checked {
                    true => Ok(()),
                    false => check_here(host, &sandbox.id),
                };
                checked = true;
                daemon = daemon.or_else(|| host.daemon_of(&sandbox.id));
                let _ = client.kill(&sandbox.id).await;
                live.remove(&sandbox.id);
                here?;
            }
            Err(_) => warmup_failures += 1,
        }
        progress(Progress::Warmup {
            done: i + 1,
            total: plan.warmup,
        });
    }

    let before_kib = host.mem_available_kib().ok();
    let (zygotes_before, _) = host.template_zygotes(daemon);

    let mut created = Vec::with_capacity(plan.sandboxes);
    let (mut create_times, mut first_times, mut second_times) =
        (Vec::new(), Vec::new(), Vec::new());
    let (mut create_errors, mut run_errors) = (Vec::new(), Vec::new());
    let (mut first_failed, mut second_failed) = (0, 0);
    for i in 0..plan.sandboxes {
        let started = Instant::now();
        let result = create(client, &request).await;
        let took = started.elapsed();
        match result {
            Ok(sandbox) => {
                live.add(&sandbox.id);
                create_times.push(took);
                match run_code(client, &sandbox).await {
                    Ok(t) => first_times.push(t),
                    Err(e) => {
                        first_failed += 1;
                        run_errors.push(format!("first: {e}"));
                    }
                }
                match run_code(client, &sandbox).await {
                    Ok(t) => second_times.push(t),
                    Err(e) => {
                        second_failed += 1;
                        run_errors.push(format!("second: {e}"));
                    }
                }
                if !checked {
                    check_here(host, &sandbox.id)?;
                    checked = true;
                }
                if daemon.is_none() {
                    daemon = host.daemon_of(&sandbox.id);
                }
                created.push(sandbox);
            }
            Err(e) => create_errors.push(e),
        }
        progress(Progress::Created {
            done: i + 1,
            total: plan.sandboxes,
            failed: create_errors.len() + first_failed + second_failed,
        });
    }

    // Idle: no sandbox's CPU time grows for QUIET_WINDOW.
    let ids: Vec<&str> = created.iter().map(|s| s.id.as_str()).collect();
    let bound = Duration::from_millis(plan.idle_bound_ms);
    let mut quiet = Quiet::new(QUIET_WINDOW);
    let started = Instant::now();
    let idle = loop {
        let now = started.elapsed();
        let mut busy = 0;
        for id in &ids {
            match host.cpu_usage_ns(id) {
                Ok(ns) => quiet.record(id, now, ns),
                // Gone: nothing left to wait for.
                Err(_) => continue,
            }
            if !quiet.is_quiet(id, now) {
                busy += 1;
            }
        }
        let waited_ms = now.as_millis() as u64;
        progress(Progress::Settling { busy, waited_ms });
        if busy == 0 || now >= bound {
            break Idle {
                waited_ms,
                window_ms: QUIET_WINDOW.as_millis() as u64,
                bound_hit: busy > 0,
                busy,
            };
        }
        tokio::time::sleep(QUIET_POLL).await;
    };

    progress(Progress::Measuring);
    let after_kib = host.mem_available_kib().ok();
    let mut per_sandbox = Vec::with_capacity(ids.len());
    for id in &ids {
        let m = host.sandbox_memory(id)?;
        if m.processes > 0 {
            per_sandbox.push(m);
        }
    }
    let (zygotes_after, zygote_lookup) = host.template_zygotes(daemon);
    let zygotes = zygotes_after
        .into_iter()
        .map(|z| ZygoteReport {
            before: zygotes_before
                .iter()
                .find(|b| b.pid == z.pid)
                .and_then(|b| b.memory),
            pid: z.pid,
            daemon: z.daemon,
            with_sandboxes: z.memory,
        })
        .collect();
    let mem_available = match (before_kib, after_kib) {
        (Some(b), Some(a)) if !created.is_empty() => {
            let (b, a) = (b as f64 / 1024.0, a as f64 / 1024.0);
            Some(MemAvailable {
                before_mib: b,
                after_mib: a,
                drop_mib: b - a,
                per_sandbox_mib: (b - a) / created.len() as f64,
            })
        }
        _ => None,
    };

    progress(Progress::Killing { count: ids.len() });
    let kill_errors = kill_all(client, live).await;

    Ok(Report {
        plan: plan.clone(),
        cgroup_version: host.cgroup_version(),
        created: created.len(),
        create_failed: create_errors.len(),
        create_ms: Summary::of(&create_times),
        create_errors: group_errors(create_errors.iter().map(String::as_str)),
        first_run_ms: Summary::of(&first_times),
        second_run_ms: Summary::of(&second_times),
        first_run_failed: first_failed,
        second_run_failed: second_failed,
        run_errors: group_errors(run_errors.iter().map(String::as_str)),
        warmup_failures,
        idle,
        mem_available,
        memory: Memory::of(&per_sandbox),
        zygotes,
        zygote_lookup,
        kill_errors,
        seed: SEED,
    })
}

/// Fails unless this host sees processes in sandbox `id`'s cgroup.
fn check_here(host: &Host, id: &str) -> Result<(), RunError> {
    if host.processes(id)?.is_empty() {
        return Err(RunError::NotHere {
            id: id.to_owned(),
            procs: host.procs_file(id).display().to_string(),
        });
    }
    Ok(())
}

/// A failure as it is grouped: the status and the server's message, or the error and
/// its causes.
fn error_message(e: &ClientError) -> String {
    if let Some(status) = e.status() {
        return format!("{}: {e}", status.as_u16());
    }
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use cubicle_runtime::ns::cgroup::CgroupV2;

    const ROLLUP: &str = "\
55d4c0a6b000-7ffc8a5f2000 ---p 00000000 00:00 0                          [rollup]
Rss:              104256 kB
Pss:               38456 kB
Pss_Dirty:         36122 kB
Pss_Anon:          36122 kB
Pss_File:           2333 kB
Pss_Shmem:             0 kB
Shared_Clean:      11520 kB
Shared_Dirty:      86620 kB
Private_Clean:         4 kB
Private_Dirty:      6112 kB
Referenced:       104256 kB
Anonymous:         92732 kB
Private_Hugetlb:       0 kB
Swap:                  0 kB
SwapPss:               0 kB
Locked:                0 kB
";

    const MEMINFO: &str = "\
MemTotal:       24684032 kB
MemFree:        22565376 kB
MemAvailable:   24048128 kB
Buffers:           61952 kB
HugePages_Total:       0
Hugepagesize:       2048 kB
";

    #[test]
    fn smaps_rollup_gives_pss_uss_rss() {
        assert_eq!(
            parse_smaps_rollup(ROLLUP),
            Some(ProcMemory {
                pss_kib: 38456,
                uss_kib: 4 + 6112,
                rss_kib: 104256,
            })
        );
        // Pss_Dirty and friends are not Pss.
        let no_pss: String = ROLLUP
            .lines()
            .filter(|l| !l.starts_with("Pss:"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(parse_smaps_rollup(&no_pss), None);
        assert_eq!(parse_smaps_rollup(""), None);
        let mut sum = ProcMemory::default();
        sum += parse_smaps_rollup(ROLLUP).unwrap();
        sum += parse_smaps_rollup(ROLLUP).unwrap();
        assert_eq!(
            (sum.pss_kib, sum.uss_kib, sum.rss_kib),
            (76912, 12232, 208512)
        );
    }

    #[test]
    fn meminfo_gives_mem_available() {
        assert_eq!(parse_mem_available(MEMINFO), Some(24048128));
        assert_eq!(parse_mem_available("MemTotal: 1 kB\n"), None);
        // Only kB values (or none) are accepted.
        assert_eq!(
            kib_field("HugePages_Total:       0\n", "HugePages_Total"),
            Some(0)
        );
        assert_eq!(kib_field("X: 5 MB\n", "X"), None);
    }

    #[test]
    fn stat_gives_the_parent_even_with_odd_names() {
        assert_eq!(
            parse_stat_ppid("30831 (cubicle-agent) S 28378 30831 30831 0 -1 4194560"),
            Some(28378)
        );
        assert_eq!(parse_stat_ppid("7 (a) b) (c) R 1 7 7 0"), Some(1));
        assert_eq!(parse_stat_ppid("garbage"), None);
    }

    #[test]
    fn the_daemon_is_the_parent_of_the_first_process() {
        // agent 10 (child of the daemon 5), zygote 11 and kernel 12 (children of 10).
        assert_eq!(outside_parent(&[(10, 5), (11, 10), (12, 10)]), Some(5));
        // Re-parented to init: no daemon to find.
        assert_eq!(outside_parent(&[(10, 1), (11, 10)]), None);
        // Two outside parents: ambiguous.
        assert_eq!(outside_parent(&[(10, 5), (11, 6)]), None);
        assert_eq!(outside_parent(&[]), None);
    }

    #[test]
    fn quiet_needs_a_whole_window_without_growth() {
        let ms = Duration::from_millis;
        let mut q = Quiet::new(ms(1000));
        assert!(!q.is_quiet("a", ms(0)));
        q.record("a", ms(0), 100);
        assert!(!q.is_quiet("a", ms(0)), "not watched for a window yet");
        q.record("a", ms(500), 100);
        assert!(!q.is_quiet("a", ms(500)));
        q.record("a", ms(1000), 100);
        assert!(q.is_quiet("a", ms(1000)));
        // It grows: busy until a full window passes without growth again.
        q.record("a", ms(1100), 150);
        assert!(!q.is_quiet("a", ms(1100)));
        q.record("a", ms(1600), 150);
        assert!(!q.is_quiet("a", ms(1600)));
        q.record("a", ms(2100), 150);
        assert!(q.is_quiet("a", ms(2100)));
        // Old samples are dropped.
        assert!(q.samples["a"].len() <= 3);
        // Counters are independent.
        q.record("b", ms(2100), 1);
        assert!(!q.is_quiet("b", ms(2100)));
    }

    #[test]
    fn memory_summaries() {
        let kib: Vec<u64> = (1..=10).map(|m| m * 1024).collect();
        let s = MemSummary::of(&kib).unwrap();
        assert_eq!(
            (s.n, s.min, s.p50, s.p90, s.max, s.avg, s.sum),
            (10, 1.0, 5.0, 9.0, 10.0, 5.5, 55.0)
        );
        assert!(MemSummary::of(&[]).is_none());
        let sandbox = |pss, procs, unreadable| SandboxMemory {
            processes: procs,
            unreadable,
            total: ProcMemory {
                pss_kib: pss,
                uss_kib: pss / 2,
                rss_kib: pss * 10,
            },
        };
        let m = Memory::of(&[sandbox(2048, 3, 0), sandbox(4096, 2, 1)]);
        assert_eq!(
            (m.sandboxes, m.processes, m.unreadable_processes),
            (2, (2, 3), 1)
        );
        assert_eq!(m.pss_mib.unwrap().p50, 2.0);
        assert_eq!(m.uss_mib.unwrap().max, 2.0);
        assert_eq!(m.rss_mib.unwrap().sum, 60.0);
        assert_eq!(Memory::of(&[]).pss_mib, None);
    }

    #[test]
    fn results_are_checked_and_errors_grouped() {
        assert_eq!(check_result(Some("2"), None, "2"), Ok(()));
        assert_eq!(
            check_result(Some("3"), None, "2"),
            Err("result \"3\" instead of \"2\"".into())
        );
        assert_eq!(check_result(None, None, "2"), Err("no result".into()));
        assert_eq!(
            check_result(Some("2"), Some("NameError: x"), "2"),
            Err("the code raised NameError: x".into())
        );
        let e = group_errors(["b", "a", "b"]);
        assert_eq!(
            (e[0].message.as_str(), e[0].count, e[1].message.as_str()),
            ("b", 2, "a")
        );
    }

    #[test]
    fn plans_are_checked() {
        let s = Duration::from_secs;
        assert_eq!(
            Plan::new(0, 1, "code-interpreter", s(30)),
            Err(PlanError::NoSandboxes)
        );
        assert_eq!(Plan::new(5, 1, " ", s(30)), Err(PlanError::NoTemplate));
        assert_eq!(
            Plan::new(5, 1, "x", Duration::from_millis(10)),
            Err(PlanError::NoIdleBound)
        );
        let p = Plan::new(50, 1, "code-interpreter", s(30)).unwrap();
        assert_eq!((p.idle_bound_ms, p.sandbox_timeout_s), (30_000, 252));
    }

    /// A fake host: a cgroup v2 tree and a `/proc` made of directories.
    fn fake_host() -> (tempfile::TempDir, Host) {
        let tmp = tempfile::tempdir().unwrap();
        let write = |path: &str, text: &str| {
            let p = tmp.path().join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        };
        // The default data dir's sandboxes live under the `cubicle` parent.
        let parent = cubicle_runtime::ns::cgroup_parent_for(&DataDir::new(DataDir::DEFAULT));
        assert_eq!(parent, "cubicle");
        write("cg/cubicle/sbx1/cgroup.procs", "10\n11\n12\n");
        write(
            "cg/cubicle/sbx1/cpu.stat",
            "usage_usec 1500\nuser_usec 1000\n",
        );
        write("cg/cubicle/sbx1/memory.stat", "file 0\n");
        write("cg/cubicle/sbx1/memory.current", "1000\n");
        write("cg/cubicle/sbx1/memory.max", "max\n");
        write("cg/cubicle/sbx1/pids.current", "3\n");
        let procs = [
            (5, 1, "cubicle\0serve\0"),
            (9, 5, "python3\0-c\0...\0--template-zygote\0"),
            (10, 5, "cubicle-agent\0serve\0"),
            (11, 10, "python3\0-c\0...\0--template-zygote\0"),
            (12, 10, "python3\0-c\0...\0--template-zygote\0"),
            (20, 1, "python3\0-c\0...\0--template-zygote\0"),
        ];
        for (pid, ppid, cmdline) in procs {
            write(
                &format!("proc/{pid}/stat"),
                &format!("{pid} (x y) S {ppid} {pid} {pid} 0"),
            );
            write(&format!("proc/{pid}/cmdline"), cmdline);
            if pid != 12 {
                write(&format!("proc/{pid}/smaps_rollup"), ROLLUP);
            }
        }
        write("proc/meminfo", MEMINFO);
        let host = Host::with(
            Box::new(CgroupV2::new(tmp.path().join("cg"), &parent)),
            tmp.path().join("proc"),
        );
        (tmp, host)
    }

    #[test]
    fn the_host_finds_sandbox_processes_through_their_cgroup() {
        let (tmp, host) = fake_host();
        assert_eq!(host.cgroup_version(), "v2");
        assert_eq!(
            host.procs_file("sbx1"),
            tmp.path().join("cg/cubicle/sbx1/cgroup.procs")
        );
        assert_eq!(host.processes("sbx1").unwrap(), vec![10, 11, 12]);
        assert_eq!(host.processes("nope").unwrap(), Vec::<i32>::new());
        assert_eq!(host.cpu_usage_ns("sbx1").unwrap(), 1_500_000);
        let m = host.sandbox_memory("sbx1").unwrap();
        // Pid 12 has no smaps_rollup (it "exited").
        assert_eq!((m.processes, m.unreadable), (3, 1));
        assert_eq!(m.total.pss_kib, 2 * 38456);
        assert_eq!(host.mem_available_kib().unwrap(), 24048128);
        assert_eq!(host.daemon_of("sbx1"), Some(5));
        assert!(check_here(&host, "sbx1").is_ok());
        assert!(matches!(
            check_here(&host, "other"),
            Err(RunError::NotHere { .. })
        ));
    }

    #[test]
    fn template_zygotes_are_children_of_the_daemon() {
        let (_tmp, host) = fake_host();
        let (z, how) = host.template_zygotes(Some(5));
        assert_eq!(how, ZygoteLookup::DaemonChildren);
        assert_eq!(z.len(), 1);
        assert_eq!((z[0].pid, z[0].daemon), (9, 5));
        assert_eq!(z[0].memory.unwrap().rss_kib, 104256);
        // Without the daemon: parents with a `serve` argument, but not the sandbox's
        // agent (`cubicle-agent serve`), whose Python zygote and kernel (11, 12) carry
        // the template zygote's command line; 20 is an orphan.
        let (z, how) = host.template_zygotes(None);
        assert_eq!(how, ZygoteLookup::ServeChildren);
        let pids: Vec<i32> = z.iter().map(|z| z.pid).collect();
        assert_eq!(pids, vec![9]);
    }
}
