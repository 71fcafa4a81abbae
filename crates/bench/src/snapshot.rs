//! `snapshot`: the seed report's chapter 4 (§4.1-4.6) through the public API of a
//! daemon, at c=1: pause and resume, snapshot, create from a snapshot, rollback and
//! clone (fork), each timed from the request sent to its answer.
//!
//! One round, one operation at a time:
//!
//! 1. Sandbox S from the template (untimed): a fresh sandbox, the seed's "small state".
//!    Pause S (`POST /sandboxes/{id}/pause`, a freeze), then resume it (`POST
//!    /v2/sandboxes/{id}/connect`). Snapshot S (`POST /sandboxes/{id}/snapshots`), create
//!    a sandbox from that snapshot (`POST /v2/sandboxes {templateID: snapshotID}`, timed
//!    to 201; killed at once, untimed), roll S back to it (`POST
//!    /sandboxes/{id}/rollback`). Hibernate S (pause with `{"hibernate": true}`: its
//!    memory checkpointed to disk, the seed's kind of pause) and resume it (connect,
//!    which restores it). S and its snapshot are then killed and deleted.
//! 2. Sandbox D from the template (untimed), with M MiB of memory made dirty inside: a
//!    background Python process fills a `bytearray` with random bytes, and the command
//!    that starts it (through envd, as `cubicle sandbox exec`) returns once the
//!    process's `VmRSS` has reached M MiB. Snapshot D, create from that snapshot, clone
//!    D once (`POST /sandboxes/{id}/fork {count: 1}`) and five times (`{count: 5}`,
//!    reported per clone: the call's time / 5), all clones killed at once; roll D back to
//!    its snapshot. D and its snapshot are then killed and deleted.
//!
//! W warm-up rounds run first and are not counted. A failed operation is counted and
//! its message kept; what depends on it is skipped. Every sandbox and snapshot stays
//! registered in a [`Live`] until its kill or delete was tried, so a caller interrupted
//! mid-run can remove what is left.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use cubicle_client::{ApiClient, ClientError, CreateSandbox, ForkResult};
use cubicle_envd::client::EnvdClient;
use serde::Serialize;
use tokio::time::Instant;

use crate::api_create::group_errors;
use crate::api_create::ErrorCount;
use crate::stats::{percentile, Summary};

/// Clones of the second fork (reported per clone).
pub const FORK_MANY: u32 = 5;
/// Longest wait for the dirtying command (filling M MiB and reaching that RSS).
const DIRTY_TIMEOUT: Duration = Duration::from_secs(120);

// --- the seed's figures -------------------------------------------------------------

/// One row of the seed's §4.2 table (snapshot time against pages dirtied), averages.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SeedDirtyRow {
    /// Bytes written to /dev/shm before the snapshot, MB.
    pub write_mb: f64,
    /// Dirty pages the seed's VMM saved, MB.
    pub dirty_mb: f64,
    /// Snapshot, avg ms.
    pub snapshot_ms: f64,
    /// Create from that snapshot, avg ms.
    pub create_ms: f64,
}

/// The seed's §4.2 rows (3 runs each, serial).
pub const SEED_DIRTY: [SeedDirtyRow; 8] = [
    SeedDirtyRow {
        write_mb: 0.0,
        dirty_mb: 8.3,
        snapshot_ms: 42.1,
        create_ms: 71.6,
    },
    SeedDirtyRow {
        write_mb: 10.0,
        dirty_mb: 41.2,
        snapshot_ms: 55.3,
        create_ms: 73.1,
    },
    SeedDirtyRow {
        write_mb: 50.0,
        dirty_mb: 122.6,
        snapshot_ms: 67.7,
        create_ms: 70.3,
    },
    SeedDirtyRow {
        write_mb: 100.0,
        dirty_mb: 195.2,
        snapshot_ms: 85.7,
        create_ms: 68.3,
    },
    SeedDirtyRow {
        write_mb: 200.0,
        dirty_mb: 296.8,
        snapshot_ms: 100.9,
        create_ms: 65.9,
    },
    SeedDirtyRow {
        write_mb: 500.0,
        dirty_mb: 602.6,
        snapshot_ms: 168.6,
        create_ms: 68.1,
    },
    SeedDirtyRow {
        write_mb: 800.0,
        dirty_mb: 908.3,
        snapshot_ms: 215.8,
        create_ms: 68.1,
    },
    SeedDirtyRow {
        write_mb: 1024.0,
        dirty_mb: 1136.3,
        snapshot_ms: 257.5,
        create_ms: 62.3,
    },
];

/// The §4.2 row whose write size is nearest to `mib` (the first of two equally near).
pub fn seed_dirty_row(mib: u64) -> SeedDirtyRow {
    let d = |r: &SeedDirtyRow| (r.write_mb - mib as f64).abs();
    *SEED_DIRTY
        .iter()
        .min_by(|a, b| d(a).total_cmp(&d(b)))
        .expect("rows")
}

/// A figure of the seed report for one operation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SeedFigure {
    /// The figure, ms (the seed reports the average of its c=1 rounds).
    pub avg_ms: f64,
    /// Where it comes from and what it measured.
    pub source: String,
}

// --- the plan -----------------------------------------------------------------------

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// Measured rounds (N).
    pub rounds: usize,
    /// Warm-up rounds, not counted.
    pub warmup: usize,
    /// Template of S and D.
    pub template: String,
    /// Memory made dirty in D before its snapshot, MiB.
    pub dirty_mib: u64,
    /// The lifetime asked for each sandbox, seconds: the daemon kills it then if this
    /// process could not.
    pub sandbox_timeout_s: u64,
}

/// Why a plan cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// N = 0.
    #[error("the number of rounds (-n) must be at least 1")]
    NoRounds,
    /// An empty template name.
    #[error("the template (-t) must not be empty")]
    NoTemplate,
    /// No dirty memory.
    #[error("--dirty-mib must be at least 1")]
    NoDirty,
}

impl Plan {
    /// A checked plan.
    pub fn new(
        rounds: usize,
        warmup: usize,
        template: &str,
        dirty_mib: u64,
    ) -> Result<Plan, PlanError> {
        if rounds == 0 {
            return Err(PlanError::NoRounds);
        }
        if template.trim().is_empty() {
            return Err(PlanError::NoTemplate);
        }
        if dirty_mib == 0 {
            return Err(PlanError::NoDirty);
        }
        Ok(Plan {
            rounds,
            warmup,
            template: template.to_owned(),
            dirty_mib,
            // A round lives a few seconds; 1 GiB dirty, cloned 6 times, some more.
            sandbox_timeout_s: 300 + dirty_mib / 4,
        })
    }
}

// --- operations -----------------------------------------------------------------------

/// A measured operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Pause of S (freeze).
    Pause,
    /// Resume of S (connect).
    Resume,
    /// Hibernation of S (pause with `hibernate`: checkpointed to disk, processes ended).
    Hibernate,
    /// Resume of hibernated S (connect: restored from its checkpoint).
    ResumeHibernated,
    /// Snapshot of S.
    Snapshot,
    /// Create from S's snapshot.
    CreateFromSnapshot,
    /// Rollback of S to its snapshot.
    Rollback,
    /// Snapshot of D (M MiB dirty).
    SnapshotDirty,
    /// Create from D's snapshot.
    CreateFromDirty,
    /// Fork of D, one clone.
    Clone,
    /// Fork of D, [`FORK_MANY`] clones: the call's time divided by their number.
    #[serde(rename = "clone_x5_per_sandbox")]
    CloneManyPerSandbox,
    /// Rollback of D to its snapshot.
    RollbackDirty,
}

impl Op {
    /// Every operation, in the order of the report.
    pub const ALL: [Op; 12] = [
        Op::Pause,
        Op::Resume,
        Op::Hibernate,
        Op::ResumeHibernated,
        Op::Snapshot,
        Op::CreateFromSnapshot,
        Op::Rollback,
        Op::SnapshotDirty,
        Op::CreateFromDirty,
        Op::Clone,
        Op::CloneManyPerSandbox,
        Op::RollbackDirty,
    ];

    /// The key in JSON (and in error messages).
    pub fn key(self) -> &'static str {
        match self {
            Op::Pause => "pause",
            Op::Resume => "resume",
            Op::Hibernate => "hibernate",
            Op::ResumeHibernated => "resume_hibernated",
            Op::Snapshot => "snapshot",
            Op::CreateFromSnapshot => "create_from_snapshot",
            Op::Rollback => "rollback",
            Op::SnapshotDirty => "snapshot_dirty",
            Op::CreateFromDirty => "create_from_dirty",
            Op::Clone => "clone",
            Op::CloneManyPerSandbox => "clone_x5_per_sandbox",
            Op::RollbackDirty => "rollback_dirty",
        }
    }

    /// The seed's figure for it, for a plan dirtying `dirty_mib`.
    pub fn seed(self, dirty_mib: u64) -> Option<SeedFigure> {
        let row = seed_dirty_row(dirty_mib);
        let fig = |avg_ms: f64, source: String| Some(SeedFigure { avg_ms, source });
        match self {
            Op::Pause => fig(
                370.8,
                "§4.6 pause, c=1 (full memory copy to disk: compare with hibernate)".into(),
            ),
            Op::Resume => fig(18.9, "§4.6 resume, c=1".into()),
            Op::Hibernate => fig(370.8, "§4.6 pause, c=1 (full memory copy to disk)".into()),
            Op::ResumeHibernated => fig(18.9, "§4.6 resume, c=1".into()),
            Op::Snapshot => fig(41.4, "§4.1 snapshot of a fresh sandbox, c=1".into()),
            Op::CreateFromSnapshot => fig(66.7, "§4.3 create from a snapshot, c=1".into()),
            Op::Rollback => fig(90.0, "§4.4 rollback, c=1".into()),
            Op::SnapshotDirty => fig(
                row.snapshot_ms,
                format!("§4.2 snapshot after writing {} MB", row.write_mb),
            ),
            Op::CreateFromDirty => fig(
                row.create_ms,
                format!("§4.2 create from the {} MB snapshot", row.write_mb),
            ),
            Op::Clone => fig(270.6, "§4.5 clone of 1 sandbox, c=1 (~10 MB dirty)".into()),
            Op::CloneManyPerSandbox => fig(
                54.2,
                "§4.5 10 clones at c=5, per clone (not the same shape)".into(),
            ),
            Op::RollbackDirty => None,
        }
    }
}

// --- the report -------------------------------------------------------------------------

/// Statistics of sizes, MiB.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SizeSummary {
    /// Samples.
    pub n: usize,
    /// Smallest.
    pub min: f64,
    /// Median.
    pub p50: f64,
    /// Largest.
    pub max: f64,
}

impl SizeSummary {
    /// Summarises sizes in bytes; `None` for none.
    pub fn of(bytes: &[u64]) -> Option<SizeSummary> {
        if bytes.is_empty() {
            return None;
        }
        let mut mib: Vec<f64> = bytes.iter().map(|b| *b as f64 / 1048576.0).collect();
        mib.sort_by(|a, b| a.total_cmp(b));
        Some(SizeSummary {
            n: mib.len(),
            min: mib[0],
            p50: percentile(&mib, 50.0),
            max: mib[mib.len() - 1],
        })
    }
}

/// One operation's results.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OpReport {
    /// Which ([`Op::key`]).
    pub op: Op,
    /// Latency of the successful ones, ms (request sent → answer).
    pub ms: Option<Summary>,
    /// Attempts that failed.
    pub failed: usize,
    /// Rounds where it did not run because something it needs failed.
    pub skipped: usize,
    /// The seed's figure.
    pub seed: Option<SeedFigure>,
    /// `p50 / seed avg`.
    pub p50_over_seed: Option<f64>,
}

/// The result of a run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// The plan.
    pub plan: Plan,
    /// Every operation, in [`Op::ALL`]'s order.
    pub operations: Vec<OpReport>,
    /// Image size of S's snapshots (`sizeBytes`).
    pub snapshot_size_mib: Option<SizeSummary>,
    /// Image size of D's snapshots.
    pub snapshot_dirty_size_mib: Option<SizeSummary>,
    /// RSS of the dirtying process once it held its M MiB.
    pub dirty_rss_mib: Option<SizeSummary>,
    /// How long making M MiB dirty took (untimed set-up), ms.
    pub dirty_setup_ms: Option<Summary>,
    /// Failures by message (`<op>: <message>`; `setup: ...` for untimed steps).
    pub errors: Vec<ErrorCount>,
    /// Warm-up rounds with a failure.
    pub warmup_failures: usize,
    /// Kills and deletes that failed (those sandboxes live until their timeout, those
    /// snapshots stay).
    pub cleanup_errors: Vec<ErrorCount>,
}

impl Report {
    /// Failed operations and set-up steps, and failed kills or deletes.
    pub fn failures(&self) -> usize {
        self.errors.iter().map(|e| e.count).sum::<usize>()
            + self.cleanup_errors.iter().map(|e| e.count).sum::<usize>()
    }

    /// The report of `op`.
    pub fn op(&self, op: Op) -> &OpReport {
        self.operations
            .iter()
            .find(|r| r.op == op)
            .expect("every operation is reported")
    }
}

// --- the run ----------------------------------------------------------------------------

/// Sandboxes and snapshots created and not yet removed: what to remove if the run is
/// cut short.
#[derive(Debug, Default)]
pub struct Live {
    sandboxes: Mutex<Vec<String>>,
    snapshots: Mutex<Vec<String>>,
}

impl Live {
    pub(crate) fn add_sandbox(&self, id: &str) {
        self.sandboxes.lock().expect("live").push(id.to_owned());
    }

    pub(crate) fn add_snapshot(&self, id: &str) {
        self.snapshots.lock().expect("live").push(id.to_owned());
    }

    /// Sandboxes not yet killed.
    pub fn sandboxes(&self) -> Vec<String> {
        self.sandboxes.lock().expect("live").clone()
    }

    /// Snapshots not yet deleted.
    pub fn snapshots(&self) -> Vec<String> {
        self.snapshots.lock().expect("live").clone()
    }

    /// Kills sandbox `id` and forgets it; the failure, if any.
    pub(crate) async fn kill(&self, client: &ApiClient, id: &str) -> Option<String> {
        let outcome = match client.kill(id).await {
            Ok(true) => None,
            Ok(false) => Some(format!("kill: sandbox {id} was already gone")),
            Err(e) => Some(format!("kill: {}", error_message(&e))),
        };
        self.sandboxes.lock().expect("live").retain(|x| x != id);
        outcome
    }

    /// Deletes snapshot `id` and forgets it; the failure, if any.
    pub(crate) async fn delete(&self, client: &ApiClient, id: &str) -> Option<String> {
        let outcome = match client.delete_snapshot(id).await {
            Ok(true) => None,
            Ok(false) => Some(format!("delete: snapshot {id} was already gone")),
            Err(e) => Some(format!("delete: {}", error_message(&e))),
        };
        self.snapshots.lock().expect("live").retain(|x| x != id);
        outcome
    }
}

/// Kills every sandbox in `live`, then deletes every snapshot; each leaves `live` once
/// tried. Returns the failures.
pub async fn remove_all(client: &ApiClient, live: &Live) -> Vec<ErrorCount> {
    let mut errors = Vec::new();
    for id in live.sandboxes() {
        errors.extend(live.kill(client, &id).await);
    }
    for id in live.snapshots() {
        errors.extend(live.delete(client, &id).await);
    }
    group_errors(errors.iter().map(String::as_str))
}

/// Progress of a run, for a status line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Warm-up round `done` of `total` is done.
    Warmup {
        /// Done so far.
        done: usize,
        /// W.
        total: usize,
    },
    /// Measured round `done` of `total` is done.
    Round {
        /// Done so far.
        done: usize,
        /// N.
        total: usize,
        /// Failures so far.
        failed: usize,
    },
}

/// What one or more rounds measured.
#[derive(Debug, Default)]
struct Recorder {
    samples: BTreeMap<Op, Vec<Duration>>,
    failed: BTreeMap<Op, usize>,
    skipped: BTreeMap<Op, usize>,
    errors: Vec<String>,
    cleanup: Vec<String>,
    sizes: Vec<u64>,
    dirty_sizes: Vec<u64>,
    dirty_rss_kib: Vec<u64>,
    dirty_setup: Vec<Duration>,
}

impl Recorder {
    fn ok(&mut self, op: Op, took: Duration) {
        self.samples.entry(op).or_default().push(took);
    }

    fn fail(&mut self, op: Op, message: &str) {
        *self.failed.entry(op).or_default() += 1;
        self.errors.push(format!("{}: {message}", op.key()));
    }

    fn skip(&mut self, ops: &[Op]) {
        for op in ops {
            *self.skipped.entry(*op).or_default() += 1;
        }
    }

    fn setup_failed(&mut self, step: &str, message: &str) {
        self.errors.push(format!("setup: {step}: {message}"));
    }

    fn cleanup(&mut self, failure: Option<String>) {
        self.cleanup.extend(failure);
    }

    /// Failures so far (operations, set-up, clean-up).
    fn failures(&self) -> usize {
        self.errors.len() + self.cleanup.len()
    }
}

/// A failure as it is grouped: the status and the server's message, or the error and
/// its causes.
pub(crate) fn error_message(e: &ClientError) -> String {
    if let Some(status) = e.status() {
        return format!("{}: {e}", status.as_u16());
    }
    chain(e)
}

/// An error and its causes, `: `-separated.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Runs `call` and times it from the request sent to the answer.
async fn timed<T>(
    call: impl Future<Output = Result<T, ClientError>>,
) -> (Duration, Result<T, String>) {
    let started = Instant::now();
    let result = call.await;
    (started.elapsed(), result.map_err(|e| error_message(&e)))
}

/// The shell command that makes `mib` MiB dirty in a background Python process and
/// returns once its RSS is there, printing `<pid> <VmRSS KiB>`.
pub fn dirty_command(mib: u64) -> String {
    // Filled 1 MiB at a time (no second copy of the whole buffer), with random bytes
    // (no zero or same-filled pages for anything to skip).
    format!(
        r#"nohup python3 -c 'import os, time
n = {mib} << 20
b = bytearray(n)
v = memoryview(b)
for i in range(0, n, 1 << 20): v[i:i + (1 << 20)] = os.urandom(min(1 << 20, n - i))
time.sleep(1e9)' >/dev/null 2>&1 &
pid=$!
want=$(({mib} * 1024))
rss=0
for ((i = 0; i < 2400; i++)); do
  state=Z
  while read -r key value _; do
    case $key in VmRSS:) rss=$value ;; State:) state=$value ;; esac
  done < /proc/$pid/status
  if [ "$state" = Z ]; then
    echo "the python process filling {mib} MiB exited (out of memory?) at RSS $rss KiB" >&2
    exit 1
  fi
  if [ "${{rss:-0}}" -ge "$want" ]; then echo "$pid $rss"; exit 0; fi
  sleep 0.05
done
echo "RSS of the python process still $rss KiB after 120 s" >&2
exit 1"#
    )
}

/// Makes `plan.dirty_mib` dirty in sandbox `id`: the RSS reached, KiB.
async fn make_dirty(
    client: &ApiClient,
    id: &str,
    token: Option<&str>,
    mib: u64,
) -> Result<u64, String> {
    let envd = EnvdClient::via_proxy(client.sandbox_url(), id, token).map_err(|e| chain(&e))?;
    let command = dirty_command(mib);
    let out = tokio::time::timeout(DIRTY_TIMEOUT + Duration::from_secs(10), async {
        envd.run(&command, None).await
    })
    .await
    .map_err(|_| format!("no answer within {} s", DIRTY_TIMEOUT.as_secs()))?
    .map_err(|e| chain(&e))?;
    if !out.end.exited || out.end.exit_code != 0 {
        let stderr = out.stderr_text();
        return Err(format!(
            "{}: {}",
            out.end.status,
            stderr.trim().lines().last().unwrap_or("no output")
        ));
    }
    let stdout = out.stdout_text();
    stdout
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("unexpected output {:?}", stdout.trim()))
}

/// The clones of a fork answer that started, and the first error of those that did
/// not.
fn fork_outcome(results: &[ForkResult]) -> (Vec<String>, Option<String>) {
    let ids = results
        .iter()
        .filter_map(|r| r.sandbox.as_ref().map(|s| s.sandbox_id.clone()))
        .collect();
    let error = results.iter().find_map(|r| {
        r.error.as_ref().map(|e| {
            e.get("message")
                .and_then(|m| m.as_str())
                .map(str::to_owned)
                .unwrap_or_else(|| e.to_string())
        })
    });
    (ids, error)
}

/// A sandbox of the round.
struct Created {
    id: String,
    token: Option<String>,
}

async fn create(
    client: &ApiClient,
    live: &Live,
    plan: &Plan,
    template: &str,
) -> (Duration, Result<Created, String>) {
    let mut request = CreateSandbox::new(template);
    request.timeout = Some(plan.sandbox_timeout_s);
    let (took, result) = timed(client.create(&request)).await;
    let result = result.map(|s| {
        live.add_sandbox(&s.sandbox_id);
        Created {
            id: s.sandbox_id,
            token: s.envd_access_token,
        }
    });
    (took, result)
}

/// Forks `id` into `count` clones, killed at once; the call's time if all started.
async fn fork(
    client: &ApiClient,
    live: &Live,
    plan: &Plan,
    rec: &mut Recorder,
    id: &str,
    count: u32,
    op: Op,
) {
    let (took, result) = timed(client.fork(id, count, Some(plan.sandbox_timeout_s))).await;
    match result {
        Ok(results) => {
            let (ids, error) = fork_outcome(&results);
            for clone in &ids {
                live.add_sandbox(clone);
            }
            match error {
                None if ids.len() == count as usize => rec.ok(op, took / count),
                None => rec.fail(
                    op,
                    &format!("{} clones in the answer instead of {count}", ids.len()),
                ),
                Some(e) => rec.fail(op, &e),
            }
            for clone in &ids {
                let failure = live.kill(client, clone).await;
                rec.cleanup(failure);
            }
        }
        Err(e) => rec.fail(op, &e),
    }
}

/// Snapshots `id` as `op`: the snapshot's id (registered in `live`).
async fn snapshot(
    client: &ApiClient,
    live: &Live,
    rec: &mut Recorder,
    id: &str,
    op: Op,
) -> Option<String> {
    let (took, result) = timed(client.snapshot(id, None)).await;
    match result {
        Ok(s) => {
            live.add_snapshot(&s.snapshot_id);
            rec.ok(op, took);
            if let Some(size) = s.size_bytes {
                match op {
                    Op::SnapshotDirty => rec.dirty_sizes.push(size),
                    _ => rec.sizes.push(size),
                }
            }
            Some(s.snapshot_id)
        }
        Err(e) => {
            rec.fail(op, &e);
            None
        }
    }
}

/// Creates a sandbox from `snap` as `op` and kills it.
async fn create_from(
    client: &ApiClient,
    live: &Live,
    plan: &Plan,
    rec: &mut Recorder,
    snap: &str,
    op: Op,
) {
    match create(client, live, plan, snap).await {
        (took, Ok(s)) => {
            rec.ok(op, took);
            let failure = live.kill(client, &s.id).await;
            rec.cleanup(failure);
        }
        (_, Err(e)) => rec.fail(op, &e),
    }
}

/// Rolls `id` back to `snap` as `op`.
async fn rollback(client: &ApiClient, rec: &mut Recorder, id: &str, snap: &str, op: Op) {
    match timed(client.rollback(id, snap)).await {
        (took, Ok(_)) => rec.ok(op, took),
        (_, Err(e)) => rec.fail(op, &e),
    }
}

/// Hibernates `id` and resumes it.
async fn hibernate(client: &ApiClient, plan: &Plan, rec: &mut Recorder, id: &str) {
    match timed(client.hibernate(id)).await {
        (took, Ok(true)) => rec.ok(Op::Hibernate, took),
        (_, Ok(false)) => {
            rec.fail(Op::Hibernate, "the sandbox was already paused");
            rec.skip(&[Op::ResumeHibernated]);
            return;
        }
        (_, Err(e)) => {
            rec.fail(Op::Hibernate, &e);
            rec.skip(&[Op::ResumeHibernated]);
            return;
        }
    }
    match timed(client.connect(id, Some(plan.sandbox_timeout_s))).await {
        (took, Ok(_)) => rec.ok(Op::ResumeHibernated, took),
        (_, Err(e)) => rec.fail(Op::ResumeHibernated, &e),
    }
}

/// One round (see the module's documentation).
async fn round(client: &ApiClient, plan: &Plan, live: &Live, rec: &mut Recorder) {
    // S: pause, resume, snapshot, create from it, rollback.
    match create(client, live, plan, &plan.template).await {
        (_, Err(e)) => {
            rec.setup_failed("create", &e);
            rec.skip(&[
                Op::Pause,
                Op::Resume,
                Op::Hibernate,
                Op::ResumeHibernated,
                Op::Snapshot,
                Op::CreateFromSnapshot,
                Op::Rollback,
            ]);
        }
        (_, Ok(s)) => {
            match timed(client.pause(&s.id)).await {
                (took, Ok(true)) => {
                    rec.ok(Op::Pause, took);
                    match timed(client.connect(&s.id, Some(plan.sandbox_timeout_s))).await {
                        (took, Ok(_)) => rec.ok(Op::Resume, took),
                        (_, Err(e)) => rec.fail(Op::Resume, &e),
                    }
                }
                (_, Ok(false)) => {
                    rec.fail(Op::Pause, "the sandbox was already paused");
                    rec.skip(&[Op::Resume]);
                }
                (_, Err(e)) => {
                    rec.fail(Op::Pause, &e);
                    rec.skip(&[Op::Resume]);
                }
            }
            match snapshot(client, live, rec, &s.id, Op::Snapshot).await {
                Some(snap) => {
                    create_from(client, live, plan, rec, &snap, Op::CreateFromSnapshot).await;
                    rollback(client, rec, &s.id, &snap, Op::Rollback).await;
                    hibernate(client, plan, rec, &s.id).await;
                    let failure = live.kill(client, &s.id).await;
                    rec.cleanup(failure);
                    let failure = live.delete(client, &snap).await;
                    rec.cleanup(failure);
                }
                None => {
                    rec.skip(&[Op::CreateFromSnapshot, Op::Rollback]);
                    hibernate(client, plan, rec, &s.id).await;
                    let failure = live.kill(client, &s.id).await;
                    rec.cleanup(failure);
                }
            }
        }
    }

    // D: M MiB dirty; snapshot, create from it, clones, rollback.
    let dirty_ops = [
        Op::SnapshotDirty,
        Op::CreateFromDirty,
        Op::Clone,
        Op::CloneManyPerSandbox,
        Op::RollbackDirty,
    ];
    let d = match create(client, live, plan, &plan.template).await {
        (_, Ok(d)) => d,
        (_, Err(e)) => {
            rec.setup_failed("create", &e);
            rec.skip(&dirty_ops);
            return;
        }
    };
    let started = Instant::now();
    match make_dirty(client, &d.id, d.token.as_deref(), plan.dirty_mib).await {
        Ok(rss) => {
            rec.dirty_setup.push(started.elapsed());
            rec.dirty_rss_kib.push(rss);
        }
        Err(e) => {
            rec.setup_failed(&format!("making {} MiB dirty", plan.dirty_mib), &e);
            rec.skip(&dirty_ops);
            let failure = live.kill(client, &d.id).await;
            rec.cleanup(failure);
            return;
        }
    }
    let snap = snapshot(client, live, rec, &d.id, Op::SnapshotDirty).await;
    match &snap {
        Some(snap) => create_from(client, live, plan, rec, snap, Op::CreateFromDirty).await,
        None => rec.skip(&[Op::CreateFromDirty, Op::RollbackDirty]),
    }
    // Clones do not need the snapshot.
    fork(client, live, plan, rec, &d.id, 1, Op::Clone).await;
    fork(
        client,
        live,
        plan,
        rec,
        &d.id,
        FORK_MANY,
        Op::CloneManyPerSandbox,
    )
    .await;
    if let Some(snap) = &snap {
        rollback(client, rec, &d.id, snap, Op::RollbackDirty).await;
    }
    let failure = live.kill(client, &d.id).await;
    rec.cleanup(failure);
    if let Some(snap) = &snap {
        let failure = live.delete(client, snap).await;
        rec.cleanup(failure);
    }
}

/// Runs the plan against the daemon behind `client`. Every sandbox and snapshot
/// created is in `live` until its kill or delete was tried.
pub async fn run(
    client: &ApiClient,
    plan: &Plan,
    live: &Live,
    progress: &dyn Fn(Progress),
) -> Report {
    let mut warmup_failures = 0;
    let mut cleanup = Vec::new();
    for i in 0..plan.warmup {
        let mut rec = Recorder::default();
        round(client, plan, live, &mut rec).await;
        if rec.failures() > 0 {
            warmup_failures += 1;
        }
        cleanup.append(&mut rec.cleanup);
        progress(Progress::Warmup {
            done: i + 1,
            total: plan.warmup,
        });
    }

    let mut rec = Recorder::default();
    for i in 0..plan.rounds {
        round(client, plan, live, &mut rec).await;
        progress(Progress::Round {
            done: i + 1,
            total: plan.rounds,
            failed: rec.failures(),
        });
    }
    cleanup.append(&mut rec.cleanup);
    // Nothing should be left; if something is (a failure in between), remove it.
    let mut cleanup_errors = group_errors(cleanup.iter().map(String::as_str));
    cleanup_errors.extend(remove_all(client, live).await);

    let operations = Op::ALL
        .iter()
        .map(|&op| {
            let ms = Summary::of(rec.samples.get(&op).map_or(&[][..], Vec::as_slice));
            let seed = op.seed(plan.dirty_mib);
            let p50_over_seed = match (&ms, &seed) {
                (Some(s), Some(f)) => Some(s.p50 / f.avg_ms),
                _ => None,
            };
            OpReport {
                op,
                ms,
                failed: rec.failed.get(&op).copied().unwrap_or(0),
                skipped: rec.skipped.get(&op).copied().unwrap_or(0),
                seed,
                p50_over_seed,
            }
        })
        .collect();
    let rss_bytes: Vec<u64> = rec.dirty_rss_kib.iter().map(|k| k * 1024).collect();
    Report {
        plan: plan.clone(),
        operations,
        snapshot_size_mib: SizeSummary::of(&rec.sizes),
        snapshot_dirty_size_mib: SizeSummary::of(&rec.dirty_sizes),
        dirty_rss_mib: SizeSummary::of(&rss_bytes),
        dirty_setup_ms: Summary::of(&rec.dirty_setup),
        errors: group_errors(rec.errors.iter().map(String::as_str)),
        warmup_failures,
        cleanup_errors,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_are_checked() {
        assert_eq!(Plan::new(0, 1, "base", 8), Err(PlanError::NoRounds));
        assert_eq!(Plan::new(1, 1, " ", 8), Err(PlanError::NoTemplate));
        assert_eq!(Plan::new(1, 1, "base", 0), Err(PlanError::NoDirty));
        let p = Plan::new(10, 1, "base", 1024).unwrap();
        assert_eq!((p.rounds, p.warmup, p.sandbox_timeout_s), (10, 1, 556));
    }

    #[test]
    fn the_nearest_seed_row_is_used() {
        assert_eq!(seed_dirty_row(8).write_mb, 10.0);
        assert_eq!(seed_dirty_row(1).write_mb, 0.0);
        assert_eq!(seed_dirty_row(1024).snapshot_ms, 257.5);
        assert_eq!(seed_dirty_row(4096).write_mb, 1024.0);
        assert_eq!(seed_dirty_row(75).write_mb, 50.0);
        assert_eq!(Op::SnapshotDirty.seed(8).unwrap().avg_ms, 55.3);
        assert_eq!(Op::CreateFromDirty.seed(1024).unwrap().avg_ms, 62.3);
        assert!(Op::RollbackDirty.seed(8).is_none());
        // Every operation has a distinct key.
        let mut keys: Vec<&str> = Op::ALL.iter().map(|o| o.key()).collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), Op::ALL.len());
    }

    #[test]
    fn fork_answers_give_clones_and_errors() {
        let ok: ForkResult = serde_json::from_value(serde_json::json!({"sandbox": {
            "templateID": "base", "sandboxID": "abc", "clientID": "x", "envdVersion": "0.6.4"
        }}))
        .unwrap();
        let bad: ForkResult = serde_json::from_value(serde_json::json!({
            "error": {"code": 500, "message": "restore failed"}
        }))
        .unwrap();
        assert_eq!(
            fork_outcome(&[ok.clone(), bad]),
            (vec!["abc".to_owned()], Some("restore failed".to_owned()))
        );
        assert_eq!(fork_outcome(&[ok]), (vec!["abc".to_owned()], None));
    }

    #[test]
    fn sizes_are_summarised_in_mib() {
        let s = SizeSummary::of(&[1 << 20, 3 << 20, 2 << 20]).unwrap();
        assert_eq!((s.n, s.min, s.p50, s.max), (3, 1.0, 2.0, 3.0));
        assert!(SizeSummary::of(&[]).is_none());
    }

    #[test]
    fn the_dirty_command_waits_for_the_rss() {
        let c = dirty_command(8);
        assert!(c.contains("n = 8 << 20"), "{c}");
        assert!(c.contains("want=$((8 * 1024))"), "{c}");
        assert!(c.contains("${rss:-0}"), "{c}");
        assert_eq!(
            serde_json::to_value(Op::CloneManyPerSandbox).unwrap(),
            Op::CloneManyPerSandbox.key()
        );
        for op in Op::ALL {
            assert_eq!(serde_json::to_value(op).unwrap(), op.key());
        }
    }
}
