//! The seed report's chapter-4 scenarios under concurrency, through the public API of a
//! running daemon (`cubicle bench snapshot | snapshot-dirty | create-from-snapshot |
//! rollback | clone | pause-resume`).
//!
//! Every scenario runs rounds serially (never two rounds at once); its warm-up rounds
//! run the same way first and are discarded. A round sets up what it needs untimed
//! (fresh sandboxes from the template, a snapshot), then sends its batch of operations
//! at once and times each operation (request sent → answer) and the batch (`wall`: first
//! request sent → last answer); `per` = average wall / operations in the batch, as in the
//! seed. Everything a round created is removed before the next one starts. A round with
//! a failed operation is not counted in `wall` (its operations that succeeded are), and
//! the failure is counted and its message kept.

use std::future::Future;
use std::time::Duration;

use cubicle_client::{ApiClient, ClientError, CreateSandbox};
use cubicle_envd::client::EnvdClient;
use futures_util::future::join_all;
use serde::Serialize;
use tokio::time::Instant;

use crate::api_create::{group_errors, ErrorCount};
use crate::peers::PeerResult;
use crate::snapshot::{chain, error_message, Live, SizeSummary};
use crate::stats::{BatchStats, Summary};

/// MiB the clone scenario's source sandbox holds in /dev/shm (the seed's ~10 MB dirty).
pub const CLONE_SOURCE_DIRTY_MIB: u64 = 10;

/// Why parameters cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    /// A count that must be at least 1 is 0.
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    /// More concurrency than operations.
    #[error("concurrency (-c {concurrency}) must not exceed the number of {what} (-n {n})")]
    ConcurrencyAboveN {
        /// C.
        concurrency: usize,
        /// N.
        n: usize,
        /// What N counts.
        what: &'static str,
    },
    /// An empty template name.
    #[error("the template (-t) must not be empty")]
    NoTemplate,
}

/// One level of a scenario: N operations per batch sent by C at once, R rounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Shape {
    /// Operations per batch (N).
    pub n: usize,
    /// Requests in flight at once (C).
    pub concurrency: usize,
    /// Measured rounds (R).
    pub rounds: usize,
    /// Warm-up rounds, discarded.
    pub warmup: usize,
}

impl Shape {
    /// A checked shape; `what` names N in messages.
    pub fn new(
        n: usize,
        concurrency: usize,
        rounds: usize,
        warmup: usize,
        what: &'static str,
    ) -> Result<Shape, ParamError> {
        if concurrency == 0 {
            return Err(ParamError::Zero("concurrency (-c)"));
        }
        if n == 0 {
            return Err(ParamError::Zero("-n"));
        }
        if rounds == 0 {
            return Err(ParamError::Zero("the number of rounds"));
        }
        if concurrency > n {
            return Err(ParamError::ConcurrencyAboveN {
                concurrency,
                n,
                what,
            });
        }
        Ok(Shape {
            n,
            concurrency,
            rounds,
            warmup,
        })
    }

    /// N = C: one operation per sandbox, all at once (snapshot, create from snapshot,
    /// rollback, pause/resume).
    pub fn square(concurrency: usize, rounds: usize, warmup: usize) -> Result<Shape, ParamError> {
        Shape::new(
            concurrency.max(1),
            concurrency,
            rounds,
            warmup,
            "operations",
        )
    }
}

/// Where a scenario is, for a progress bar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Scenario and level, e.g. `snapshot c=5`.
    pub label: String,
    /// Rounds done (warm-up included).
    pub done: usize,
    /// Rounds in all.
    pub total: usize,
}

/// What the scenarios need: the daemon, the template, where to register what they
/// create, and a progress callback.
pub struct Ctx<'a> {
    /// The daemon.
    pub client: &'a ApiClient,
    /// Template of the sandboxes.
    pub template: String,
    /// Everything created and not yet removed.
    pub live: &'a Live,
    /// Lifetime asked for each sandbox, seconds (the daemon kills it then should this
    /// process not).
    pub sandbox_timeout_s: u64,
    /// Called after each round.
    pub progress: &'a (dyn Fn(Step) + Sync),
}

impl std::fmt::Debug for Ctx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("api", &self.client.base_url())
            .field("template", &self.template)
            .finish()
    }
}

/// A secondary figure of a level (e.g. the rollback alone inside the rollback flow).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Part {
    /// What it is.
    pub name: String,
    /// Its statistics, ms.
    pub ms: Summary,
}

/// One level's results.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Level {
    /// The shape.
    pub shape: Shape,
    /// Wall and per of the rounds without failures.
    pub batch: Option<BatchStats>,
    /// Each successful operation, ms.
    pub latency_ms: Option<Summary>,
    /// Secondary figures.
    pub parts: Vec<Part>,
    /// Failed operations (warm-up excluded).
    pub failed: usize,
    /// Failures by message (set-up and clean-up included).
    pub errors: Vec<ErrorCount>,
    /// Snapshot image sizes, if the level took snapshots.
    pub image_mib: Option<SizeSummary>,
    /// Peers measured at the same level.
    pub peers: Vec<PeerResult>,
}

/// Records one level's rounds.
#[derive(Debug, Default)]
struct Rec {
    walls: Vec<Duration>,
    ops: Vec<Duration>,
    parts: Vec<(String, Vec<Duration>)>,
    failed: usize,
    errors: Vec<String>,
    sizes: Vec<u64>,
}

impl Rec {
    /// Counts a failed operation and keeps its message.
    fn fail(&mut self, message: String) {
        self.failed += 1;
        self.errors.push(message);
    }

    fn part(&mut self, name: &str, d: Duration) {
        match self.parts.iter_mut().find(|(n, _)| n == name) {
            Some((_, v)) => v.push(d),
            None => self.parts.push((name.to_owned(), vec![d])),
        }
    }

    fn level(self, shape: Shape) -> Level {
        Level {
            shape,
            batch: BatchStats::of(&self.walls, shape.n),
            latency_ms: Summary::of(&self.ops),
            parts: self
                .parts
                .iter()
                .filter_map(|(name, v)| {
                    Some(Part {
                        name: name.clone(),
                        ms: Summary::of(v)?,
                    })
                })
                .collect(),
            failed: self.failed,
            errors: group_errors(self.errors.iter().map(String::as_str)),
            image_mib: SizeSummary::of(&self.sizes),
            peers: Vec::new(),
        }
    }
}

/// Runs `call` and times it from the request sent to the answer.
async fn timed<T>(
    call: impl Future<Output = Result<T, ClientError>>,
) -> (Duration, Result<T, String>) {
    let started = Instant::now();
    let result = call.await;
    (started.elapsed(), result.map_err(|e| error_message(&e)))
}

/// Runs all `calls` at once: the batch's wall and each call's time and result.
async fn batch<T, F: Future<Output = Result<T, ClientError>>>(
    calls: impl IntoIterator<Item = F>,
) -> (Duration, Vec<(Duration, Result<T, String>)>) {
    let started = Instant::now();
    let results = join_all(calls.into_iter().map(timed)).await;
    (started.elapsed(), results)
}

/// A sandbox of a round.
#[derive(Debug, Clone)]
struct Created {
    id: String,
    token: Option<String>,
}

impl Ctx<'_> {
    fn request(&self, template: &str) -> CreateSandbox {
        let mut r = CreateSandbox::new(template);
        r.timeout = Some(self.sandbox_timeout_s);
        r
    }

    /// Creates `count` sandboxes of `template` at once (set-up, untimed); failures go to
    /// `rec`.
    async fn create_many(&self, template: &str, count: usize, rec: &mut Rec) -> Vec<Created> {
        let request = self.request(template);
        let results = join_all((0..count).map(|_| self.client.create(&request))).await;
        let mut out = Vec::new();
        for r in results {
            match r {
                Ok(s) => {
                    self.live.add_sandbox(&s.sandbox_id);
                    out.push(Created {
                        id: s.sandbox_id,
                        token: s.envd_access_token,
                    });
                }
                Err(e) => rec
                    .errors
                    .push(format!("setup: create: {}", error_message(&e))),
            }
        }
        out
    }

    /// Kills sandboxes and deletes snapshots at once (clean-up, untimed).
    async fn remove(&self, sandboxes: &[String], snapshots: &[String], rec: &mut Rec) {
        let kills = join_all(sandboxes.iter().map(|id| self.live.kill(self.client, id))).await;
        let deletes = join_all(snapshots.iter().map(|id| self.live.delete(self.client, id))).await;
        rec.errors.extend(kills.into_iter().flatten());
        rec.errors.extend(deletes.into_iter().flatten());
    }

    /// Writes `mib` MiB of random bytes to /dev/shm in sandbox `s` (set-up, untimed).
    async fn fill_shm(&self, s: &Created, mib: u64) -> Result<(), String> {
        if mib == 0 {
            return Ok(());
        }
        let envd = EnvdClient::via_proxy(self.client.sandbox_url(), &s.id, s.token.as_deref())
            .map_err(|e| chain(&e))?;
        let cmd = format!(
            "head -c {} /dev/urandom > /dev/shm/cubicle-bench-fill && sync",
            mib << 20
        );
        let out = envd.run(&cmd, None).await.map_err(|e| chain(&e))?;
        if !out.end.exited || out.end.exit_code != 0 {
            return Err(format!(
                "writing {mib} MiB to /dev/shm: {}: {}",
                out.end.status,
                out.stderr_text().trim()
            ));
        }
        Ok(())
    }

    fn step(&self, label: &str, done: usize, total: usize) {
        (self.progress)(Step {
            label: label.to_owned(),
            done,
            total,
        });
    }
}

/// §4.1: each round snapshots C fresh sandboxes at once.
pub async fn snapshot(ctx: &Ctx<'_>, shape: Shape) -> Level {
    let label = format!("snapshot c={}", shape.concurrency);
    let mut rec = Rec::default();
    let total = shape.warmup + shape.rounds;
    for round in 0..total {
        let counted = round >= shape.warmup;
        let mut r = Rec::default();
        let sandboxes = ctx.create_many(&ctx.template, shape.n, &mut r).await;
        let (wall, results) =
            batch(sandboxes.iter().map(|s| ctx.client.snapshot(&s.id, None))).await;
        let mut snaps = Vec::new();
        let mut clean = sandboxes.len() == shape.n;
        for (took, result) in results {
            match result {
                Ok(snap) => {
                    ctx.live.add_snapshot(&snap.snapshot_id);
                    r.ops.push(took);
                    r.sizes.extend(snap.size_bytes);
                    snaps.push(snap.snapshot_id);
                }
                Err(e) => {
                    clean = false;
                    r.fail(format!("snapshot: {e}"));
                }
            }
        }
        if clean {
            r.walls.push(wall);
        }
        let ids: Vec<String> = sandboxes.into_iter().map(|s| s.id).collect();
        ctx.remove(&ids, &snaps, &mut r).await;
        if counted {
            merge(&mut rec, r);
        }
        ctx.step(&label, round + 1, total);
    }
    rec.level(shape)
}

/// What §4.2 measured at one write size.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DirtyLevel {
    /// MiB written to /dev/shm before the snapshot.
    pub write_mib: u64,
    /// Rounds and warm-up.
    pub shape: Shape,
    /// Snapshot, ms.
    pub snapshot_ms: Option<Summary>,
    /// Create from that snapshot, ms.
    pub create_ms: Option<Summary>,
    /// The snapshots' image sizes (the seed's "dirty page" column is its VMM's count).
    pub image_mib: Option<SizeSummary>,
    /// Failed operations.
    pub failed: usize,
    /// Failures by message.
    pub errors: Vec<ErrorCount>,
    /// CRIU dump and restore of a tree holding as much.
    pub peers: Vec<PeerResult>,
}

/// §4.2: each round writes `write_mib` into /dev/shm of a fresh sandbox (untimed),
/// snapshots it and creates a sandbox from the snapshot (both timed), serially.
pub async fn snapshot_dirty(ctx: &Ctx<'_>, write_mib: u64, shape: Shape) -> DirtyLevel {
    let label = format!("snapshot-dirty {write_mib} MB");
    let mut snaps_ms = Vec::new();
    let mut creates_ms = Vec::new();
    let mut rec = Rec::default();
    let total = shape.warmup + shape.rounds;
    for round in 0..total {
        let counted = round >= shape.warmup;
        let mut r = Rec::default();
        let mut sandboxes = Vec::new();
        let mut snapshots = Vec::new();
        let mut snap_ms = None;
        let mut create_ms = None;
        if let Some(s) = ctx.create_many(&ctx.template, 1, &mut r).await.pop() {
            sandboxes.push(s.id.clone());
            match ctx.fill_shm(&s, write_mib).await {
                Err(e) => r.errors.push(format!("setup: {e}")),
                Ok(()) => match timed(ctx.client.snapshot(&s.id, None)).await {
                    (_, Err(e)) => {
                        r.fail(format!("snapshot: {e}"));
                    }
                    (took, Ok(snap)) => {
                        ctx.live.add_snapshot(&snap.snapshot_id);
                        snap_ms = Some(took);
                        r.sizes.extend(snap.size_bytes);
                        snapshots.push(snap.snapshot_id.clone());
                        let request = ctx.request(&snap.snapshot_id);
                        match timed(ctx.client.create(&request)).await {
                            (took, Ok(c)) => {
                                ctx.live.add_sandbox(&c.sandbox_id);
                                create_ms = Some(took);
                                sandboxes.push(c.sandbox_id);
                            }
                            (_, Err(e)) => {
                                r.fail(format!("create from snapshot: {e}"));
                            }
                        }
                    }
                },
            }
        }
        ctx.remove(&sandboxes, &snapshots, &mut r).await;
        if counted {
            snaps_ms.extend(snap_ms);
            creates_ms.extend(create_ms);
            merge(&mut rec, r);
        }
        ctx.step(&label, round + 1, total);
    }
    DirtyLevel {
        write_mib,
        shape,
        snapshot_ms: Summary::of(&snaps_ms),
        create_ms: Summary::of(&creates_ms),
        image_mib: SizeSummary::of(&rec.sizes),
        failed: rec.failed,
        errors: group_errors(rec.errors.iter().map(String::as_str)),
        peers: Vec::new(),
    }
}

/// §4.3: one snapshot of a fresh sandbox (untimed); each round creates C sandboxes from
/// it at once.
pub async fn create_from_snapshot(ctx: &Ctx<'_>, shape: Shape) -> Level {
    let label = format!("create-from-snapshot c={}", shape.concurrency);
    let mut rec = Rec::default();
    let total = shape.warmup + shape.rounds;
    let mut setup = Rec::default();
    let source = ctx.create_many(&ctx.template, 1, &mut setup).await.pop();
    let snap = match &source {
        None => None,
        Some(s) => match ctx.client.snapshot(&s.id, None).await {
            Ok(snap) => {
                ctx.live.add_snapshot(&snap.snapshot_id);
                Some(snap.snapshot_id)
            }
            Err(e) => {
                setup
                    .errors
                    .push(format!("setup: snapshot: {}", error_message(&e)));
                None
            }
        },
    };
    if let Some(snap) = &snap {
        let request = ctx.request(snap);
        for round in 0..total {
            let counted = round >= shape.warmup;
            let mut r = Rec::default();
            let (wall, results) = batch((0..shape.n).map(|_| ctx.client.create(&request))).await;
            let mut ids = Vec::new();
            let mut clean = true;
            for (took, result) in results {
                match result {
                    Ok(s) => {
                        ctx.live.add_sandbox(&s.sandbox_id);
                        r.ops.push(took);
                        ids.push(s.sandbox_id);
                    }
                    Err(e) => {
                        clean = false;
                        r.fail(format!("create from snapshot: {e}"));
                    }
                }
            }
            if clean {
                r.walls.push(wall);
            }
            ctx.remove(&ids, &[], &mut r).await;
            if counted {
                merge(&mut rec, r);
            }
            ctx.step(&label, round + 1, total);
        }
    }
    let sources: Vec<String> = source.into_iter().map(|s| s.id).collect();
    let snaps: Vec<String> = snap.into_iter().collect();
    ctx.remove(&sources, &snaps, &mut setup).await;
    rec.errors.extend(setup.errors);
    rec.level(shape)
}

/// §4.4: each round, C fresh sandboxes each snapshot themselves and roll back to that
/// snapshot, all at once (the seed's flow: a sandbox may only roll back to its own
/// snapshot). The latency is the flow's; the rollback alone is a part.
pub async fn rollback(ctx: &Ctx<'_>, shape: Shape) -> Level {
    let label = format!("rollback c={}", shape.concurrency);
    let mut rec = Rec::default();
    let total = shape.warmup + shape.rounds;
    for round in 0..total {
        let counted = round >= shape.warmup;
        let mut r = Rec::default();
        let sandboxes = ctx.create_many(&ctx.template, shape.n, &mut r).await;
        let flow = |id: String| async move {
            let (snap_took, snap) = timed(ctx.client.snapshot(&id, None)).await;
            let snap = snap.map_err(|e| (None, format!("snapshot: {e}")))?;
            ctx.live.add_snapshot(&snap.snapshot_id);
            let (rb_took, rb) = timed(ctx.client.rollback(&id, &snap.snapshot_id)).await;
            match rb {
                Ok(_) => Ok((snap.snapshot_id, snap_took, rb_took)),
                Err(e) => Err((Some(snap.snapshot_id), format!("rollback: {e}"))),
            }
        };
        let started = Instant::now();
        let results = join_all(sandboxes.iter().map(|s| flow(s.id.clone()))).await;
        let wall = started.elapsed();
        let mut snaps = Vec::new();
        let mut clean = sandboxes.len() == shape.n;
        for result in results {
            match result {
                Ok((snap, snap_took, rb_took)) => {
                    snaps.push(snap);
                    r.ops.push(snap_took + rb_took);
                    r.part("snapshot", snap_took);
                    r.part("rollback alone", rb_took);
                }
                Err((snap, e)) => {
                    snaps.extend(snap);
                    clean = false;
                    r.fail(e);
                }
            }
        }
        if clean {
            r.walls.push(wall);
        }
        let ids: Vec<String> = sandboxes.into_iter().map(|s| s.id).collect();
        ctx.remove(&ids, &snaps, &mut r).await;
        if counted {
            merge(&mut rec, r);
        }
        ctx.step(&label, round + 1, total);
    }
    rec.level(shape)
}

/// How N clones are split over C concurrent fork requests: as evenly as possible.
pub fn split(n: usize, concurrency: usize) -> Vec<u32> {
    let c = concurrency.clamp(1, n.max(1));
    (0..c)
        .map(|i| (n / c + usize::from(i < n % c)) as u32)
        .collect()
}

/// §4.5: each round, a fresh source sandbox with [`CLONE_SOURCE_DIRTY_MIB`] MiB in
/// /dev/shm (untimed) is cloned N times by C fork requests at once (`POST
/// /sandboxes/{id}/fork` with the clones split evenly between them); wall = first
/// request → last clone running; per = wall / N; the latency is each request's.
pub async fn clone(ctx: &Ctx<'_>, shape: Shape) -> Level {
    let label = format!("clone n={} c={}", shape.n, shape.concurrency);
    let mut rec = Rec::default();
    let total = shape.warmup + shape.rounds;
    let counts = split(shape.n, shape.concurrency);
    for round in 0..total {
        let counted = round >= shape.warmup;
        let mut r = Rec::default();
        let mut ids = Vec::new();
        if let Some(source) = ctx.create_many(&ctx.template, 1, &mut r).await.pop() {
            ids.push(source.id.clone());
            match ctx.fill_shm(&source, CLONE_SOURCE_DIRTY_MIB).await {
                Err(e) => r.errors.push(format!("setup: {e}")),
                Ok(()) => {
                    let (wall, results) = batch(counts.iter().map(|count| {
                        ctx.client
                            .fork(&source.id, *count, Some(ctx.sandbox_timeout_s))
                    }))
                    .await;
                    let mut clean = true;
                    for ((took, result), count) in results.into_iter().zip(&counts) {
                        match result {
                            Ok(forks) => {
                                let mut started = 0;
                                for f in &forks {
                                    if let Some(s) = &f.sandbox {
                                        ctx.live.add_sandbox(&s.sandbox_id);
                                        ids.push(s.sandbox_id.clone());
                                        started += 1;
                                    }
                                }
                                if started == *count as usize {
                                    r.ops.push(took);
                                } else {
                                    clean = false;
                                    let why = forks
                                        .iter()
                                        .find_map(|f| f.error.as_ref().map(|e| e.to_string()))
                                        .unwrap_or_default();
                                    r.fail(format!("clone: {started} of {count} started {why}"));
                                }
                            }
                            Err(e) => {
                                clean = false;
                                r.fail(format!("clone: {e}"));
                            }
                        }
                    }
                    if clean {
                        r.walls.push(wall);
                    }
                }
            }
        }
        ctx.remove(&ids, &[], &mut r).await;
        if counted {
            merge(&mut rec, r);
        }
        ctx.step(&label, round + 1, total);
    }
    rec.level(shape)
}

/// What §4.6 measured at one concurrency: the freeze (Cubicle's pause) and the
/// hibernation (memory checkpointed to disk: the seed's kind of pause), each followed by
/// its resume.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PauseResumeLevel {
    /// Pause (freeze).
    pub pause: Level,
    /// Resume after the freeze.
    pub resume: Level,
    /// Pause with hibernation.
    pub hibernate: Level,
    /// Resume (restore) after hibernation.
    pub resume_hibernated: Level,
}

/// §4.6: each round, C fresh sandboxes are paused at once (`POST
/// /sandboxes/{id}/pause`), resumed at once (`POST /sandboxes/{id}/connect`), then
/// hibernated at once and resumed at once.
pub async fn pause_resume(ctx: &Ctx<'_>, shape: Shape) -> PauseResumeLevel {
    let label = format!("pause-resume c={}", shape.concurrency);
    let mut recs: [Rec; 4] = Default::default();
    let total = shape.warmup + shape.rounds;
    for round in 0..total {
        let counted = round >= shape.warmup;
        let mut rs: [Rec; 4] = Default::default();
        let sandboxes = ctx.create_many(&ctx.template, shape.n, &mut rs[0]).await;
        let full = sandboxes.len() == shape.n;
        for (step, hibernate) in [(0, false), (2, true)] {
            let (wall, results) = batch(sandboxes.iter().map(|s| async move {
                if hibernate {
                    ctx.client.hibernate(&s.id).await
                } else {
                    ctx.client.pause(&s.id).await
                }
            }))
            .await;
            let mut clean = full;
            for (took, result) in results {
                match result {
                    Ok(true) => rs[step].ops.push(took),
                    Ok(false) => {
                        clean = false;
                        rs[step].fail("pause: already paused".into());
                    }
                    Err(e) => {
                        clean = false;
                        rs[step].fail(format!("pause: {e}"));
                    }
                }
            }
            if clean {
                rs[step].walls.push(wall);
            }
            let (wall, results) = batch(
                sandboxes
                    .iter()
                    .map(|s| ctx.client.connect(&s.id, Some(ctx.sandbox_timeout_s))),
            )
            .await;
            let mut clean = full;
            for (took, result) in results {
                match result {
                    Ok(_) => rs[step + 1].ops.push(took),
                    Err(e) => {
                        clean = false;
                        rs[step + 1].fail(format!("resume: {e}"));
                    }
                }
            }
            if clean {
                rs[step + 1].walls.push(wall);
            }
        }
        let ids: Vec<String> = sandboxes.into_iter().map(|s| s.id).collect();
        ctx.remove(&ids, &[], &mut rs[0]).await;
        if counted {
            for (rec, r) in recs.iter_mut().zip(rs) {
                merge(rec, r);
            }
        }
        ctx.step(&label, round + 1, total);
    }
    let [a, b, c, d] = recs;
    PauseResumeLevel {
        pause: a.level(shape),
        resume: b.level(shape),
        hibernate: c.level(shape),
        resume_hibernated: d.level(shape),
    }
}

fn merge(into: &mut Rec, r: Rec) {
    into.walls.extend(r.walls);
    into.ops.extend(r.ops);
    for (name, v) in r.parts {
        for d in v {
            into.part(&name, d);
        }
    }
    into.failed += r.failed;
    into.errors.extend(r.errors);
    into.sizes.extend(r.sizes);
}

/// Whether every failure of a level says the daemon lacks the endpoint (405, 501): the
/// scenario is then "not supported" rather than failed.
pub fn unsupported(errors: &[ErrorCount], failed: usize) -> Option<String> {
    if failed == 0 || errors.is_empty() {
        return None;
    }
    let missing = |m: &str| m.contains("405") || m.contains("501");
    errors
        .iter()
        .all(|e| missing(&e.message))
        .then(|| errors[0].message.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_are_checked() {
        assert_eq!(
            Shape::new(10, 20, 3, 1, "clones").unwrap_err().to_string(),
            "concurrency (-c 20) must not exceed the number of clones (-n 10)"
        );
        assert_eq!(
            Shape::new(1, 0, 3, 1, "clones"),
            Err(ParamError::Zero("concurrency (-c)"))
        );
        assert!(Shape::new(5, 5, 0, 1, "x").is_err());
        assert!(Shape::square(0, 5, 1).is_err());
        let s = Shape::square(10, 5, 1).unwrap();
        assert_eq!((s.n, s.concurrency, s.rounds, s.warmup), (10, 10, 5, 1));
    }

    #[test]
    fn clones_are_split_evenly() {
        assert_eq!(split(10, 5), vec![2; 5]);
        assert_eq!(split(20, 10), vec![2; 10]);
        assert_eq!(split(1, 1), vec![1]);
        assert_eq!(split(7, 3), vec![3, 2, 2]);
        assert_eq!(split(7, 3).iter().sum::<u32>(), 7);
    }

    #[test]
    fn a_level_gives_wall_per_and_latencies() {
        let ms = Duration::from_millis;
        let mut rec = Rec::default();
        let mut a = Rec::default();
        a.walls.push(ms(100));
        a.ops.extend([ms(40), ms(60), ms(90), ms(100), ms(80)]);
        a.part("rollback alone", ms(30));
        a.sizes.push(2 << 20);
        let mut b = Rec::default();
        b.walls.push(ms(50));
        b.ops.extend([ms(10), ms(20), ms(30), ms(40), ms(50)]);
        b.part("rollback alone", ms(10));
        b.failed = 1;
        b.errors.push("snapshot: 500: boom".into());
        merge(&mut rec, a);
        merge(&mut rec, b);
        let level = rec.level(Shape::square(5, 2, 0).unwrap());
        let batch = level.batch.unwrap();
        assert_eq!(
            (batch.wall.n, batch.wall.avg, batch.wall.min),
            (2, 75.0, 50.0)
        );
        assert_eq!(batch.wall.p95, 100.0);
        assert_eq!(batch.per_avg, 15.0);
        let lat = level.latency_ms.unwrap();
        assert_eq!((lat.n, lat.min, lat.p50, lat.max), (10, 10.0, 40.0, 100.0));
        assert_eq!(lat.avg, 52.0);
        assert_eq!(level.parts[0].ms.avg, 20.0);
        assert_eq!(level.failed, 1);
        assert_eq!(level.errors[0].message, "snapshot: 500: boom");
        assert_eq!(level.image_mib.unwrap().p50, 2.0);
    }

    #[test]
    fn missing_endpoints_are_not_supported() {
        let e = |m: &str| ErrorCount {
            message: m.into(),
            count: 1,
        };
        assert!(unsupported(&[e("snapshot: 501: not implemented")], 1).is_some());
        assert!(unsupported(&[e("snapshot: 500: boom")], 1).is_none());
        assert!(unsupported(&[], 0).is_none());
    }
}
