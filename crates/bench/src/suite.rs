//! The seed report's tables, reproduced: scenarios with their parameters, their runs
//! (Cubicle through the API, peers in the same run), and the tables, Markdown report
//! and charts made of them.

use std::fmt::Write as _;
use std::path::PathBuf;

use cubicle_client::ApiClient;
use serde::Serialize;

use crate::api_create::{self, ApiTarget};
use crate::code_interpreter::Host;
use crate::density;
use crate::peers::{self, Criu, PeerOutcome, PeerResult, Workload, CONTAINER_PEERS};
use crate::scenarios::{self, Ctx, DirtyLevel, Level, PauseResumeLevel, Shape};
use crate::seed;
use crate::snapshot::Live;
use crate::stats::{BatchStats, Summary};
use crate::svg::{Chart, Series};

/// A scenario with its parameters (one or more levels).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "scenario", rename_all = "kebab-case")]
pub enum Scenario {
    /// §3.2: `(concurrency, requests, warm-up rounds)` per level.
    Create {
        /// Levels.
        levels: Vec<(usize, usize, usize)>,
        /// Keep the sandboxes (`-m create-only`).
        create_only: bool,
    },
    /// §3.3: batch sizes.
    Density {
        /// Batches.
        batches: Vec<usize>,
    },
    /// §4.1.
    Snapshot {
        /// Levels.
        levels: Vec<Shape>,
    },
    /// §4.2: `(MiB written, shape)`.
    SnapshotDirty {
        /// Levels.
        levels: Vec<(u64, Shape)>,
    },
    /// §4.3.
    CreateFromSnapshot {
        /// Levels.
        levels: Vec<Shape>,
    },
    /// §4.4.
    Rollback {
        /// Levels.
        levels: Vec<Shape>,
    },
    /// §4.5.
    Clone {
        /// Levels.
        levels: Vec<Shape>,
    },
    /// §4.6.
    PauseResume {
        /// Levels.
        levels: Vec<Shape>,
    },
}

/// Warm-up rounds of the chapter-4 scenarios (the seed: "a warm-up round is run before
/// each scenario").
pub const WARMUP: usize = 1;

/// Every scenario with the seed's parameter sets (the machine holds them all: 24 GiB
/// covers §3.3's 20 sandboxes and §4.2's 1 GiB; nothing is scaled down).
pub fn all() -> Vec<Scenario> {
    let square = |rows: &[seed::BatchRow]| -> Vec<Shape> {
        rows.iter()
            .map(|r| Shape::square(r.concurrency, r.rounds, WARMUP).expect("seed shapes"))
            .collect()
    };
    vec![
        Scenario::Create {
            levels: seed::CREATE
                .iter()
                .map(|r| (r.concurrency, r.requests, 3))
                .collect(),
            create_only: false,
        },
        Scenario::Density {
            batches: seed::DENSITY_BATCHES.to_vec(),
        },
        Scenario::Snapshot {
            levels: square(&seed::SNAPSHOT),
        },
        Scenario::SnapshotDirty {
            levels: seed::DIRTY
                .iter()
                .map(|r| {
                    (
                        r.write_mb,
                        Shape::square(1, 3, WARMUP).expect("seed shapes"),
                    )
                })
                .collect(),
        },
        Scenario::CreateFromSnapshot {
            levels: square(&seed::CREATE_FROM_SNAPSHOT),
        },
        Scenario::Rollback {
            levels: square(&seed::ROLLBACK),
        },
        Scenario::Clone {
            levels: seed::CLONE
                .iter()
                .map(|r| {
                    Shape::new(r.n, r.concurrency, r.rounds, WARMUP, "clones").expect("seed shapes")
                })
                .collect(),
        },
        Scenario::PauseResume {
            levels: square(&seed::PAUSE),
        },
    ]
}

/// One level of `create`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CreateLevel {
    /// Cubicle.
    pub report: api_create::Report,
    /// Sandboxes kept alive (create-only).
    pub kept: Vec<String>,
    /// Peers at the same concurrency.
    pub peers: Vec<PeerResult>,
}

/// What a scenario measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "scenario", rename_all = "kebab-case")]
pub enum Outcome {
    /// §3.2.
    Create {
        /// Levels.
        levels: Vec<CreateLevel>,
        /// Whether sandboxes were kept.
        create_only: bool,
    },
    /// §3.3.
    Density {
        /// The run.
        report: density::Report,
    },
    /// §4.1.
    Snapshot {
        /// Levels.
        levels: Vec<Level>,
    },
    /// §4.2.
    SnapshotDirty {
        /// Levels.
        levels: Vec<DirtyLevel>,
    },
    /// §4.3.
    CreateFromSnapshot {
        /// Levels.
        levels: Vec<Level>,
    },
    /// §4.4.
    Rollback {
        /// Levels.
        levels: Vec<Level>,
    },
    /// §4.5.
    Clone {
        /// Levels.
        levels: Vec<Level>,
    },
    /// §4.6.
    PauseResume {
        /// Levels.
        levels: Vec<PauseResumeLevel>,
    },
    /// A scenario this daemon or host cannot run.
    NotSupported {
        /// Which.
        name: String,
        /// Why.
        reason: String,
    },
}

impl Outcome {
    /// Failed operations (and failed creates of `create`/`density`).
    pub fn failures(&self) -> usize {
        let levels = |l: &[Level]| l.iter().map(|l| l.failed).sum::<usize>();
        match self {
            Outcome::Create { levels, .. } => levels.iter().map(|l| l.report.failed).sum(),
            Outcome::Density { report } => report.steps.iter().map(|s| s.failed).sum(),
            Outcome::Snapshot { levels: l }
            | Outcome::CreateFromSnapshot { levels: l }
            | Outcome::Rollback { levels: l }
            | Outcome::Clone { levels: l } => levels(l),
            Outcome::SnapshotDirty { levels } => levels.iter().map(|l| l.failed).sum(),
            Outcome::PauseResume { levels: l } => l
                .iter()
                .map(|l| {
                    l.pause.failed
                        + l.resume.failed
                        + l.hibernate.failed
                        + l.resume_hibernated.failed
                })
                .sum(),
            Outcome::NotSupported { .. } => 0,
        }
    }
}

/// Where peers run: the template's rootfs (for the container runtimes) and whether to
/// run them at all.
#[derive(Debug, Clone)]
pub struct PeerSet {
    /// The template's rootfs, as Cubicle's sandboxes see it.
    pub rootfs: PathBuf,
}

/// What the density scenario needs from this host.
#[derive(Debug)]
pub struct DensityEnv {
    /// The sandboxes' cgroups and /proc (`Err`: why PSS cannot be read).
    pub host: Result<Host, String>,
    /// Memory limit of a sandbox, MiB.
    pub sandbox_limit_mib: f64,
}

fn peer_err(name: &str, what: &str, outcome: PeerOutcome) -> PeerResult {
    PeerResult {
        name: name.into(),
        what: what.into(),
        outcome,
    }
}

/// The CRIU to measure with, or the row saying why it could not be set up.
fn criu_or_row<'a>(
    criu: &'a Result<Criu, peers::PeerError>,
    what: &str,
) -> Result<&'a Criu, Box<PeerResult>> {
    criu.as_ref()
        .map_err(|e| Box::new(peer_err("criu", what, PeerOutcome::from_error(e))))
}

/// Runs blocking peer code without stalling the runtime's other tasks.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// Runs one scenario (Cubicle, then each peer at each level).
pub async fn run(
    ctx: &Ctx<'_>,
    scenario: &Scenario,
    peer_set: Option<&PeerSet>,
    density_env: &DensityEnv,
) -> Outcome {
    let criu = || peer_set.map(|_| Criu::new());
    match scenario {
        Scenario::Create {
            levels,
            create_only,
        } => {
            let mut out = Vec::new();
            for &(c, n, w) in levels {
                let plan = match api_create::Plan::new(c, n, w) {
                    Ok(p) => p,
                    Err(e) => {
                        return Outcome::NotSupported {
                            name: "create".into(),
                            reason: e.to_string(),
                        }
                    }
                };
                let mut target =
                    ApiTarget::new(ctx.client.clone(), &ctx.template, ctx.sandbox_timeout_s);
                if *create_only {
                    target = target.create_only();
                }
                let label = format!("create c={c} n={n}");
                let progress = |p: api_create::Progress| {
                    let (done, total) = match p {
                        api_create::Progress::Warmup { round, rounds } => (round, rounds + n),
                        api_create::Progress::Measured { done, total } => (w + done, w + total),
                    };
                    (ctx.progress)(scenarios::Step {
                        label: label.clone(),
                        done,
                        total,
                    });
                };
                let report = api_create::run(plan, &target, &progress).await;
                // Create-only: kept alive on purpose, not registered for clean-up.
                let kept = target.kept();
                let mut peers_out = Vec::new();
                if let Some(ps) = peer_set {
                    for name in CONTAINER_PEERS {
                        let what = "start the rootfs's /bin/sh → `ready` line";
                        let outcome = match peers::make_with(name, &ps.rootfs, Workload::Ready) {
                            Ok(p) => blocking(|| peers::run_queue(p.as_ref(), c, n, w)),
                            Err(e) => PeerOutcome::from_error(&e),
                        };
                        peers_out.push(peer_err(name, what, outcome));
                    }
                }
                out.push(CreateLevel {
                    report,
                    kept,
                    peers: peers_out,
                });
            }
            Outcome::Create {
                levels: out,
                create_only: *create_only,
            }
        }
        Scenario::Density { batches } => {
            let progress = |done: usize, total: usize| {
                (ctx.progress)(scenarios::Step {
                    label: "density".into(),
                    done,
                    total,
                })
            };
            let host = density_env.host.as_ref().map_err(Clone::clone);
            match density::run(
                ctx.client,
                &ctx.template,
                batches,
                density_env.sandbox_limit_mib,
                ctx.sandbox_timeout_s,
                host,
                ctx.live,
                &progress,
            )
            .await
            {
                Ok(report) => Outcome::Density { report },
                Err(e) => Outcome::NotSupported {
                    name: "density".into(),
                    reason: e.to_string(),
                },
            }
        }
        Scenario::Snapshot { levels } => {
            let criu = criu();
            let mut out = Vec::new();
            for &shape in levels {
                let mut level = scenarios::snapshot(ctx, shape).await;
                if let Some(criu) = &criu {
                    let what = "criu dump of a 2-process tree";
                    level.peers.push(match criu_or_row(criu, what) {
                        Err(r) => *r,
                        Ok(c) => {
                            let b = blocking(|| {
                                c.batch(shape.concurrency, shape.rounds, shape.warmup, 0)
                            });
                            peer_err("criu", what, b.dump_outcome(shape.n))
                        }
                    });
                }
                out.push(level);
            }
            not_supported_or(
                "snapshot",
                &out,
                Outcome::Snapshot {
                    levels: out.clone(),
                },
            )
        }
        Scenario::SnapshotDirty { levels } => {
            let criu = criu();
            let mut out = Vec::new();
            for &(mib, shape) in levels {
                let mut level = scenarios::snapshot_dirty(ctx, mib, shape).await;
                if let Some(criu) = &criu {
                    match criu_or_row(criu, "criu dump / restore") {
                        Err(r) => level.peers.push(*r),
                        Ok(c) => {
                            let b = blocking(|| c.batch(1, shape.rounds, shape.warmup, mib));
                            level.peers.push(peer_err(
                                "criu",
                                &format!("criu dump, tree holding {mib} MiB"),
                                b.dump_outcome(1),
                            ));
                            level.peers.push(peer_err(
                                "criu",
                                &format!("criu restore, tree holding {mib} MiB"),
                                b.restore_outcome(1),
                            ));
                        }
                    }
                }
                out.push(level);
            }
            Outcome::SnapshotDirty { levels: out }
        }
        Scenario::CreateFromSnapshot { levels } | Scenario::Rollback { levels } => {
            let rollback = matches!(scenario, Scenario::Rollback { .. });
            let criu = criu();
            let mut out = Vec::new();
            for &shape in levels {
                let mut level = if rollback {
                    scenarios::rollback(ctx, shape).await
                } else {
                    scenarios::create_from_snapshot(ctx, shape).await
                };
                if let Some(criu) = &criu {
                    let what = if rollback {
                        "criu dump + restore of a 2-process tree"
                    } else {
                        "criu restore of a 2-process tree"
                    };
                    level.peers.push(match criu_or_row(criu, what) {
                        Err(r) => *r,
                        Ok(c) => {
                            let b = blocking(|| {
                                c.batch(shape.concurrency, shape.rounds, shape.warmup, 0)
                            });
                            let o = if rollback {
                                b.flow_outcome(shape.n)
                            } else {
                                b.restore_outcome(shape.n)
                            };
                            peer_err("criu", what, o)
                        }
                    });
                }
                out.push(level);
            }
            if rollback {
                not_supported_or(
                    "rollback",
                    &out,
                    Outcome::Rollback {
                        levels: out.clone(),
                    },
                )
            } else {
                not_supported_or(
                    "create-from-snapshot",
                    &out,
                    Outcome::CreateFromSnapshot {
                        levels: out.clone(),
                    },
                )
            }
        }
        Scenario::Clone { levels } => {
            let criu = criu();
            let mut out = Vec::new();
            for &shape in levels {
                let mut level = scenarios::clone(ctx, shape).await;
                if let Some(criu) = &criu {
                    let what = "criu dump --leave-running + n restores of a tree holding 10 MiB";
                    level.peers.push(match criu_or_row(criu, what) {
                        Err(r) => *r,
                        Ok(c) => {
                            let o = blocking(|| {
                                c.clone_batch(
                                    shape.n,
                                    shape.concurrency,
                                    shape.rounds,
                                    shape.warmup,
                                    scenarios::CLONE_SOURCE_DIRTY_MIB,
                                )
                            });
                            peer_err("criu", what, o)
                        }
                    });
                }
                out.push(level);
            }
            not_supported_or(
                "clone",
                &out,
                Outcome::Clone {
                    levels: out.clone(),
                },
            )
        }
        Scenario::PauseResume { levels } => {
            let criu = criu();
            let mut out = Vec::new();
            for &shape in levels {
                let mut level = scenarios::pause_resume(ctx, shape).await;
                if let Some(criu) = &criu {
                    match criu_or_row(criu, "criu dump / restore") {
                        Err(r) => level.hibernate.peers.push(*r),
                        Ok(c) => {
                            let b = blocking(|| {
                                c.batch(shape.concurrency, shape.rounds, shape.warmup, 0)
                            });
                            level.hibernate.peers.push(peer_err(
                                "criu",
                                "criu dump (pause to disk)",
                                b.dump_outcome(shape.n),
                            ));
                            level.resume_hibernated.peers.push(peer_err(
                                "criu",
                                "criu restore (resume from disk)",
                                b.restore_outcome(shape.n),
                            ));
                        }
                    }
                }
                out.push(level);
            }
            Outcome::PauseResume { levels: out }
        }
    }
}

fn not_supported_or(name: &str, levels: &[Level], outcome: Outcome) -> Outcome {
    let reasons: Vec<String> = levels
        .iter()
        .filter_map(|l| scenarios::unsupported(&l.errors, l.failed))
        .collect();
    if !levels.is_empty() && reasons.len() == levels.len() {
        return Outcome::NotSupported {
            name: name.into(),
            reason: format!("the daemon answered {}", reasons[0]),
        };
    }
    outcome
}

// --- tables ------------------------------------------------------------------------------

/// A table of the report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Table {
    /// Title (with the seed's section).
    pub title: String,
    /// Column names.
    pub columns: Vec<String>,
    /// Rows, cells already formatted.
    pub rows: Vec<Vec<String>>,
    /// Notes under it.
    pub notes: Vec<String>,
}

fn f1(v: f64) -> String {
    format!("{v:.1}")
}

fn dash() -> String {
    "-".into()
}

/// wall avg, min, p95, max, per.
fn batch_cells(b: Option<&BatchStats>) -> Vec<String> {
    match b {
        Some(b) => vec![
            f1(b.wall.avg),
            f1(b.wall.min),
            f1(b.wall.p95),
            f1(b.wall.max),
            f1(b.per_avg),
        ],
        None => vec![dash(); 5],
    }
}

fn latency_cells(s: Option<&Summary>) -> Vec<String> {
    match s {
        Some(s) => [s.avg, s.min, s.p50, s.p90, s.p95, s.p99, s.max]
            .iter()
            .map(|v| f1(*v))
            .collect(),
        None => vec![dash(); 7],
    }
}

/// A peer's row: its name, then either its cells or its status in the first one.
fn peer_row(
    p: &PeerResult,
    lead: Vec<String>,
    width: usize,
    cells: impl Fn(&Summary, Option<&BatchStats>) -> Vec<String>,
) -> Vec<String> {
    let mut row = vec![p.name.clone()];
    row.extend(lead);
    match &p.outcome {
        PeerOutcome::Measured {
            latency_ms,
            batch,
            failed,
            ..
        } => {
            row.extend(cells(latency_ms, batch.as_ref()));
            if *failed > 0 {
                if let Some(last) = row.last_mut() {
                    last.push_str(&format!(" ({failed} failed)"));
                }
            }
        }
        PeerOutcome::NotInstalled { .. } => row.push("not installed".into()),
        PeerOutcome::Failed { message } => row.push(format!("failed: {message}")),
        PeerOutcome::NotComparable { .. } => row.push("n/a".into()),
    }
    row.resize(width, String::new());
    row
}

fn peer_notes(peers: &[PeerResult], notes: &mut Vec<String>) {
    for p in peers {
        let note = match &p.outcome {
            PeerOutcome::NotInstalled { message } => format!("{}: {message}", p.name),
            PeerOutcome::NotComparable { reason } => format!("{}: n/a: {reason}", p.name),
            PeerOutcome::Measured {
                first_error: Some(e),
                ..
            } => format!("{} ({}): {e}", p.name, p.what),
            _ => format!("peers: {}", p.what),
        };
        if !notes.contains(&note) {
            notes.push(note);
        }
    }
}

fn error_notes(errors: &[api_create::ErrorCount], notes: &mut Vec<String>) {
    for e in errors {
        notes.push(format!("failed {}x: {}", e.count, e.message));
    }
}

const SEED: &str = "seed (16-core host)";

/// A chapter-4 batch table: who, [n,] concurrency, rounds, wall avg/min/p95/max, per.
fn batch_table(
    title: &str,
    per: &str,
    with_n: bool,
    levels: &[Level],
    seed_rows: &[seed::BatchRow],
) -> Table {
    let mut columns: Vec<String> = vec!["who".into()];
    if with_n {
        columns.push("n".into());
    }
    columns.extend(
        [
            "concurrency",
            "rounds",
            "wall avg",
            "wall min",
            "wall p95",
            "wall max",
            per,
        ]
        .map(String::from),
    );
    columns.push("op p50".into());
    let width = columns.len();
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let lead = |n: usize, c: usize, r: usize| -> Vec<String> {
        let mut v = Vec::new();
        if with_n {
            v.push(n.to_string());
        }
        v.push(c.to_string());
        v.push(r.to_string());
        v
    };
    for l in levels {
        let s = l.shape;
        let mut row = vec!["cubicle".to_owned()];
        row.extend(lead(
            s.n,
            s.concurrency,
            l.batch.as_ref().map_or(0, |b| b.wall.n),
        ));
        row.extend(batch_cells(l.batch.as_ref()));
        row.push(l.latency_ms.as_ref().map_or(dash(), |m| f1(m.p50)));
        if l.failed > 0 {
            row[0].push_str(&format!(" ({} failed)", l.failed));
        }
        rows.push(row);
        for part in &l.parts {
            notes.push(format!(
                "cubicle c={}: {} p50 {:.1} ms (avg {:.1})",
                s.concurrency, part.name, part.ms.p50, part.ms.avg
            ));
        }
        if let Some(img) = &l.image_mib {
            let note = format!("cubicle snapshot image: p50 {:.1} MiB", img.p50);
            if !notes.contains(&note) {
                notes.push(note);
            }
        }
        for p in &l.peers {
            rows.push(peer_row(
                p,
                lead(s.n, s.concurrency, s.rounds),
                width,
                |lat, b| {
                    let mut v = batch_cells(b);
                    v.push(f1(lat.p50));
                    v
                },
            ));
        }
        peer_notes(&l.peers, &mut notes);
        error_notes(&l.errors, &mut notes);
        if let Some(r) = seed::batch_row(seed_rows, s.n, s.concurrency) {
            let mut row = vec![SEED.to_owned()];
            row.extend(lead(r.n, r.concurrency, r.rounds));
            row.extend(r.wall.iter().map(|v| f1(*v)));
            row.push(f1(r.per_avg));
            row.push(dash());
            rows.push(row);
        }
    }
    notes.push(format!(
        "ms; wall = first request sent → last answer, per = wall avg / n; op p50 = median of \
         each operation; {} warm-up round(s) discarded",
        levels.first().map_or(WARMUP, |l| l.shape.warmup)
    ));
    Table {
        title: title.into(),
        columns,
        rows,
        notes,
    }
}

/// The tables of an outcome.
pub fn tables(o: &Outcome) -> Vec<Table> {
    match o {
        Outcome::NotSupported { name, reason } => vec![Table {
            title: format!("{name}: not supported"),
            columns: vec!["scenario".into(), "status".into()],
            rows: vec![vec![name.clone(), format!("not supported: {reason}")]],
            notes: vec![],
        }],
        Outcome::Create {
            levels,
            create_only,
        } => {
            let columns: Vec<String> = [
                "who",
                "concurrency",
                "requests",
                "avg",
                "min",
                "p50",
                "p90",
                "p95",
                "p99",
                "max",
                "wall",
                "per",
                "success",
            ]
            .map(String::from)
            .to_vec();
            let width = columns.len();
            let mut rows = Vec::new();
            let mut notes = Vec::new();
            for l in levels {
                let r = &l.report;
                let p = r.plan;
                let mut row = vec![
                    "cubicle".into(),
                    p.concurrency.to_string(),
                    p.requests.to_string(),
                ];
                row.extend(latency_cells(r.create_ms.as_ref()));
                row.extend([
                    f1(r.wall_ms),
                    format!("{:.2}", r.per_ms),
                    format!("{:.0}%", r.success_pct),
                ]);
                rows.push(row);
                for peer in &l.peers {
                    rows.push(peer_row(
                        peer,
                        vec![p.concurrency.to_string(), p.requests.to_string()],
                        width,
                        |lat, b| {
                            let mut v = latency_cells(Some(lat));
                            match b {
                                Some(b) => {
                                    v.push(f1(b.wall.avg));
                                    v.push(format!("{:.2}", b.per_avg));
                                }
                                None => v.extend([dash(), dash()]),
                            }
                            v.push(dash());
                            v
                        },
                    ));
                }
                peer_notes(&l.peers, &mut notes);
                error_notes(&r.errors, &mut notes);
                if let Some(s) = seed::create_row(p.concurrency) {
                    let mut row = vec![
                        SEED.to_owned(),
                        s.concurrency.to_string(),
                        s.requests.to_string(),
                    ];
                    row.extend(s.ms.iter().map(|v| f1(*v)));
                    row.extend([dash(), dash(), "100%".into()]);
                    rows.push(row);
                }
                if *create_only {
                    notes.push(format!(
                        "create-only: {} sandbox(es) left running: {}",
                        l.kept.len(),
                        l.kept.join(" ")
                    ));
                }
            }
            notes.push(
                "ms; create = POST /sandboxes sent → 201 (sent once the sandbox's agent \
                 answers); wall = first create → last done; per = wall / requests; peers: \
                 spawn → `ready` read from the container's /bin/sh"
                    .into(),
            );
            vec![Table {
                title: "§3.2 Create sandbox from template: latency vs concurrency".into(),
                columns,
                rows,
                notes,
            }]
        }
        Outcome::Density { report } => density_tables(report),
        Outcome::Snapshot { levels } => vec![batch_table(
            "§4.1 Snapshot creation vs concurrency",
            "per-snapshot avg",
            false,
            levels,
            &seed::SNAPSHOT,
        )],
        Outcome::CreateFromSnapshot { levels } => vec![batch_table(
            "§4.3 Create sandbox from snapshot",
            "per-sandbox avg",
            true,
            levels,
            &seed::CREATE_FROM_SNAPSHOT,
        )],
        Outcome::Rollback { levels } => vec![batch_table(
            "§4.4 Rollback (each sandbox: snapshot + rollback)",
            "per-rollback avg",
            false,
            levels,
            &seed::ROLLBACK,
        )],
        Outcome::Clone { levels } => vec![batch_table(
            "§4.5 Clone",
            "per-clone avg",
            true,
            levels,
            &seed::CLONE,
        )],
        Outcome::PauseResume { levels } => {
            let pick = |f: fn(&PauseResumeLevel) -> &Level| -> Vec<Level> {
                levels.iter().map(|l| f(l).clone()).collect()
            };
            let mut pause = batch_table(
                "§4.6 Pause: freeze (memory kept in RAM)",
                "per-pause avg",
                false,
                &pick(|l| &l.pause),
                &seed::PAUSE,
            );
            pause.notes.insert(
                0,
                "the seed's pause copies all memory to disk: compare it with the hibernation table"
                    .into(),
            );
            vec![
                pause,
                batch_table(
                    "§4.6 Resume after freeze",
                    "per-resume avg",
                    false,
                    &pick(|l| &l.resume),
                    &seed::RESUME,
                ),
                batch_table(
                    "§4.6 Pause: hibernate (memory checkpointed to disk, the seed's kind)",
                    "per-pause avg",
                    false,
                    &pick(|l| &l.hibernate),
                    &seed::PAUSE,
                ),
                batch_table(
                    "§4.6 Resume after hibernation (restore)",
                    "per-resume avg",
                    false,
                    &pick(|l| &l.resume_hibernated),
                    &seed::RESUME,
                ),
            ]
        }
        Outcome::SnapshotDirty { levels } => {
            let columns: Vec<String> = [
                "who",
                "write MB",
                "image MiB",
                "snapshot avg",
                "snapshot min",
                "snapshot p95",
                "snapshot max",
                "create avg",
                "create min",
                "create p95",
                "create max",
            ]
            .map(String::from)
            .to_vec();
            let width = columns.len();
            let mut rows = Vec::new();
            let mut notes = Vec::new();
            let four = |s: Option<&Summary>| match s {
                Some(s) => vec![f1(s.avg), f1(s.min), f1(s.p95), f1(s.max)],
                None => vec![dash(); 4],
            };
            for l in levels {
                let mut row = vec!["cubicle".to_owned(), l.write_mib.to_string()];
                row.push(l.image_mib.as_ref().map_or(dash(), |i| f1(i.p50)));
                row.extend(four(l.snapshot_ms.as_ref()));
                row.extend(four(l.create_ms.as_ref()));
                if l.failed > 0 {
                    row[0].push_str(&format!(" ({} failed)", l.failed));
                }
                rows.push(row);
                // CRIU: dump in the snapshot columns, restore in the create columns.
                let dump = l.peers.iter().find(|p| p.what.starts_with("criu dump"));
                let restore = l.peers.iter().find(|p| p.what.starts_with("criu restore"));
                if let Some(d) = dump {
                    let mut row =
                        peer_row(d, vec![l.write_mib.to_string(), dash()], width, |lat, _| {
                            four(Some(lat))
                        });
                    if let Some(PeerOutcome::Measured { latency_ms, .. }) =
                        restore.map(|r| &r.outcome)
                    {
                        row.truncate(7);
                        row.extend(four(Some(latency_ms)));
                    }
                    rows.push(row);
                } else {
                    for p in &l.peers {
                        rows.push(peer_row(
                            p,
                            vec![l.write_mib.to_string()],
                            width,
                            |_, _| vec![],
                        ));
                    }
                }
                error_notes(&l.errors, &mut notes);
                if let Some(s) = seed::dirty_row(l.write_mib) {
                    let mut row = vec![
                        SEED.to_owned(),
                        s.write_mb.to_string(),
                        format!("{:.1} (dirty)", s.dirty_mb),
                    ];
                    row.extend(s.snapshot.iter().map(|v| f1(*v)));
                    row.extend(s.create.iter().map(|v| f1(*v)));
                    rows.push(row);
                }
            }
            if levels.iter().any(|l| !l.peers.is_empty()) {
                notes.push("criu: a 2-process tree holding as many MiB of random bytes; dump in the snapshot columns, restore in the create columns".into());
            }
            notes.push(
                "ms; serial; the write is `head -c` of /dev/urandom into /dev/shm (tmpfs) \
                 inside the sandbox, untimed; image MiB = the snapshot's size on disk (the \
                 seed's column is its VMM's dirty-page count)"
                    .into(),
            );
            vec![Table {
                title: "§4.2 Snapshot creation vs dirty memory, and create from that snapshot"
                    .into(),
                columns,
                rows,
                notes,
            }]
        }
    }
}

fn density_tables(r: &density::Report) -> Vec<Table> {
    let columns: Vec<String> = [
        "who",
        "live sandboxes",
        "available MiB",
        "per-sandbox overhead MiB",
        "PSS p50 MiB",
        "PSS avg MiB",
    ]
    .map(String::from)
    .to_vec();
    let mut rows = vec![vec![
        "cubicle".into(),
        "0 (baseline)".into(),
        format!("{:.0}", r.baseline_available_mib),
        dash(),
        dash(),
        dash(),
    ]];
    for s in &r.steps {
        rows.push(vec![
            "cubicle".into(),
            s.live.to_string(),
            format!("{:.0}", s.available_mib),
            format!("{:.2}", s.per_sandbox_mib),
            s.pss_mib
                .as_ref()
                .map_or(dash(), |p| format!("{:.2}", p.p50)),
            s.pss_mib
                .as_ref()
                .map_or(dash(), |p| format!("{:.2}", p.avg)),
        ]);
    }
    for s in &seed::DENSITY {
        rows.push(vec![
            SEED.into(),
            s.live.to_string(),
            format!("{:.0}", s.available_mb),
            s.per_sandbox_mb.map_or(dash(), |v| format!("~{v:.0}")),
            dash(),
            dash(),
        ]);
    }
    let mut notes = vec![format!(
        "batches {:?}, each created at once and kept alive; overhead = (baseline − available) \
         / live; PSS = sum over a sandbox's processes (/proc/<pid>/smaps_rollup); MemAvailable \
         is host-wide, so anything else running on the host moves it",
        r.batches
    )];
    if let Some(s) = &r.stopped {
        notes.push(format!("safety stop: {s}"));
    }
    if let Some(p) = &r.pss_unavailable {
        notes.push(format!("PSS not read: {p}"));
    }
    error_notes(&r.errors, &mut notes);
    let mut tables = vec![Table {
        title: "§3.3 Single-host density: memory per idle sandbox".into(),
        columns,
        rows,
        notes,
    }];
    if let Some(c) = &r.capacity {
        let (seed_idle, seed_full) = seed::DENSITY_CAPACITY;
        tables.push(Table {
            title: "§3.3 Projected capacity of this host".into(),
            columns: vec!["figure".into(), "cubicle (this host)".into(), SEED.into()],
            rows: vec![
                vec![
                    "total memory MiB".into(),
                    format!("{:.0}", c.total_mib),
                    "32768".into(),
                ],
                vec![
                    "baseline used MiB".into(),
                    format!("{:.0}", c.baseline_used_mib),
                    "7198".into(),
                ],
                vec![
                    "headroom (10%) MiB".into(),
                    format!("{:.0}", c.headroom_mib),
                    "3276".into(),
                ],
                vec![
                    "for sandboxes MiB".into(),
                    format!("{:.0}", c.for_sandboxes_mib),
                    "22294".into(),
                ],
                vec![
                    "per-sandbox overhead MiB".into(),
                    format!("{:.2}", c.per_sandbox_mib),
                    "~30".into(),
                ],
                vec![
                    "idle sandboxes".into(),
                    c.idle.to_string(),
                    seed_idle.to_string(),
                ],
                vec![
                    format!("sandboxes each using {:.0} MiB", c.sandbox_limit_mib),
                    c.full_load.to_string(),
                    seed_full.to_string(),
                ],
            ],
            notes: vec![
                "the seed's arithmetic: (total − baseline used − 10%) ÷ per-sandbox cost; \
                 Cubicle's cost is the larger of its MemAvailable overhead and its average \
                 PSS at the last step"
                    .into(),
            ],
        });
    }
    tables
}

// --- rendering -----------------------------------------------------------------------------

/// A table as aligned text.
pub fn text_table(t: &Table) -> String {
    let mut widths: Vec<usize> = t.columns.iter().map(|c| c.chars().count()).collect();
    for r in &t.rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: &[String]| -> String {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            let w = widths.get(i).copied().unwrap_or(0);
            if i == 0 {
                let _ = write!(s, "{c:<w$}");
            } else {
                let _ = write!(s, "  {c:>w$}");
            }
        }
        s.trim_end().to_owned()
    };
    let mut out = format!("{}\n", t.title);
    out.push_str(&line(&t.columns));
    out.push('\n');
    for r in &t.rows {
        out.push_str(&line(r));
        out.push('\n');
    }
    for n in &t.notes {
        let _ = writeln!(out, "  {n}");
    }
    out
}

/// A table as Markdown.
pub fn markdown_table(t: &Table) -> String {
    let cell = |c: &str| c.replace('|', "\\|");
    let mut out = format!("### {}\n\n", t.title);
    let _ = writeln!(
        out,
        "| {} |",
        t.columns
            .iter()
            .map(|c| cell(c))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    let _ = writeln!(out, "|{}", "---|".repeat(t.columns.len()));
    for r in &t.rows {
        let _ = writeln!(
            out,
            "| {} |",
            r.iter().map(|c| cell(c)).collect::<Vec<_>>().join(" | ")
        );
    }
    out.push('\n');
    for n in &t.notes {
        let _ = writeln!(out, "- {n}");
    }
    out.push('\n');
    out
}

/// The charts of a run: `(file name, chart)`.
pub fn charts(outcomes: &[Outcome]) -> Vec<(String, Chart)> {
    let mut out = Vec::new();
    for o in outcomes {
        match o {
            Outcome::Create { levels, .. } if !levels.is_empty() => {
                let mut series = Vec::new();
                for (name, pick) in [
                    ("p50", (|s: &Summary| s.p50) as fn(&Summary) -> f64),
                    ("p95", |s: &Summary| s.p95),
                    ("p99", |s: &Summary| s.p99),
                ] {
                    series.push(Series {
                        name: format!("cubicle {name}"),
                        points: levels
                            .iter()
                            .filter_map(|l| {
                                Some((
                                    l.report.plan.concurrency as f64,
                                    pick(l.report.create_ms.as_ref()?),
                                ))
                            })
                            .collect(),
                        dashed: false,
                    });
                }
                let names: Vec<String> = levels[0].peers.iter().map(|p| p.name.clone()).collect();
                for name in names {
                    let points: Vec<(f64, f64)> = levels
                        .iter()
                        .filter_map(|l| {
                            let p = l.peers.iter().find(|p| p.name == name)?;
                            match &p.outcome {
                                PeerOutcome::Measured { latency_ms, .. } => {
                                    Some((l.report.plan.concurrency as f64, latency_ms.p50))
                                }
                                _ => None,
                            }
                        })
                        .collect();
                    if !points.is_empty() {
                        series.push(Series {
                            name: format!("{name} p50"),
                            points,
                            dashed: false,
                        });
                    }
                }
                for (name, i) in [("p50", 2), ("p99", 5)] {
                    series.push(Series {
                        name: format!("seed {name}"),
                        points: seed::CREATE
                            .iter()
                            .map(|r| (r.concurrency as f64, r.ms[i]))
                            .collect(),
                        dashed: true,
                    });
                }
                out.push((
                    "create-latency.svg".to_owned(),
                    Chart {
                        title: "Create latency percentiles per concurrency level".into(),
                        x_label: "concurrent creates".into(),
                        y_label: "ms (log scale)".into(),
                        log_y: true,
                        series,
                    },
                ));
            }
            Outcome::SnapshotDirty { levels } if !levels.is_empty() => {
                let pts = |f: &dyn Fn(&DirtyLevel) -> Option<f64>| -> Vec<(f64, f64)> {
                    levels
                        .iter()
                        .filter_map(|l| Some((l.write_mib as f64, f(l)?)))
                        .collect()
                };
                let peer = |what: &str| {
                    pts(&|l: &DirtyLevel| {
                        l.peers
                            .iter()
                            .find(|p| p.what.starts_with(what))
                            .and_then(|p| match &p.outcome {
                                PeerOutcome::Measured { latency_ms, .. } => Some(latency_ms.avg),
                                _ => None,
                            })
                    })
                };
                let mut series = vec![
                    Series {
                        name: "cubicle snapshot".into(),
                        points: pts(&|l| l.snapshot_ms.as_ref().map(|s| s.avg)),
                        dashed: false,
                    },
                    Series {
                        name: "cubicle create from it".into(),
                        points: pts(&|l| l.create_ms.as_ref().map(|s| s.avg)),
                        dashed: false,
                    },
                ];
                for (name, what) in [("criu dump", "criu dump"), ("criu restore", "criu restore")] {
                    let points = peer(what);
                    if !points.is_empty() {
                        series.push(Series {
                            name: name.into(),
                            points,
                            dashed: false,
                        });
                    }
                }
                series.push(Series {
                    name: "seed snapshot".into(),
                    points: seed::DIRTY
                        .iter()
                        .map(|r| (r.write_mb as f64, r.snapshot[0]))
                        .collect(),
                    dashed: true,
                });
                series.push(Series {
                    name: "seed create".into(),
                    points: seed::DIRTY
                        .iter()
                        .map(|r| (r.write_mb as f64, r.create[0]))
                        .collect(),
                    dashed: true,
                });
                out.push((
                    "snapshot-vs-dirty.svg".to_owned(),
                    Chart {
                        title: "Snapshot time vs memory written (avg)".into(),
                        x_label: "MB written to /dev/shm".into(),
                        y_label: "ms (log scale)".into(),
                        log_y: true,
                        series,
                    },
                ));
            }
            Outcome::Density { report } if !report.steps.is_empty() => {
                let mut cubicle = vec![(0.0, 0.0)];
                cubicle.extend(report.steps.iter().map(|s| {
                    (
                        s.live as f64,
                        report.baseline_available_mib - s.available_mib,
                    )
                }));
                let base = seed::DENSITY[0].available_mb;
                out.push((
                    "density.svg".to_owned(),
                    Chart {
                        title: "Memory taken by idle sandboxes (MemAvailable drop)".into(),
                        x_label: "live sandboxes".into(),
                        y_label: "MiB".into(),
                        log_y: false,
                        series: vec![
                            Series {
                                name: "cubicle".into(),
                                points: cubicle,
                                dashed: false,
                            },
                            Series {
                                name: "seed (microVMs)".into(),
                                points: seed::DENSITY
                                    .iter()
                                    .map(|r| (r.live as f64, base - r.available_mb))
                                    .collect(),
                                dashed: true,
                            },
                        ],
                    },
                ));
            }
            _ => {}
        }
    }
    out
}

/// The whole run as Markdown: header, every table, the charts.
pub fn markdown(header: &[String], outcomes: &[Outcome], chart_files: &[String]) -> String {
    let mut out = String::from("# Cubicle benchmark report\n\n");
    for h in header {
        let _ = writeln!(out, "- {h}");
    }
    out.push('\n');
    for o in outcomes {
        for t in tables(o) {
            out.push_str(&markdown_table(&t));
        }
    }
    if !chart_files.is_empty() {
        out.push_str("## Charts\n\n");
        for f in chart_files {
            let _ = writeln!(out, "![{f}]({f})\n");
        }
    }
    out
}

/// Kills and deletes what a run left (create-only excepted by the caller).
pub async fn cleanup(client: &ApiClient, live: &Live) -> Vec<api_create::ErrorCount> {
    crate::snapshot::remove_all(client, live).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ms(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|m| Duration::from_millis(*m)).collect()
    }

    fn level(shape: Shape, walls: &[u64], ops: &[u64]) -> Level {
        Level {
            shape,
            batch: BatchStats::of(&ms(walls), shape.n),
            latency_ms: Summary::of(&ms(ops)),
            parts: vec![],
            failed: 0,
            errors: vec![],
            image_mib: None,
            peers: vec![PeerResult {
                name: "runsc".into(),
                what: "x".into(),
                outcome: PeerOutcome::NotInstalled {
                    message: "runsc is not installed".into(),
                },
            }],
        }
    }

    #[test]
    fn all_uses_the_seeds_parameters() {
        let all = all();
        assert_eq!(all.len(), 8);
        match &all[0] {
            Scenario::Create { levels, .. } => {
                assert_eq!(levels, &vec![(1, 20, 3), (10, 200, 3), (20, 300, 3)])
            }
            other => panic!("{other:?}"),
        }
        match &all[6] {
            Scenario::Clone { levels } => {
                let s: Vec<(usize, usize, usize)> = levels
                    .iter()
                    .map(|s| (s.n, s.concurrency, s.rounds))
                    .collect();
                assert_eq!(s, vec![(1, 1, 5), (10, 5, 3), (20, 10, 3)]);
            }
            other => panic!("{other:?}"),
        }
        match &all[3] {
            Scenario::SnapshotDirty { levels } => {
                assert_eq!(levels.len(), 8);
                assert_eq!(levels[7].0, 1024);
                assert_eq!(levels[7].1.rounds, 3);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn batch_tables_show_cubicle_peers_and_seed() {
        let l = level(Shape::square(5, 2, 1).unwrap(), &[100, 50], &[10, 20, 30]);
        let t = &tables(&Outcome::Snapshot { levels: vec![l] })[0];
        assert_eq!(
            t.columns[..8],
            [
                "who",
                "concurrency",
                "rounds",
                "wall avg",
                "wall min",
                "wall p95",
                "wall max",
                "per-snapshot avg"
            ]
        );
        assert_eq!(
            t.rows[0][..8],
            ["cubicle", "5", "2", "75.0", "50.0", "100.0", "100.0", "15.0"]
        );
        assert_eq!(t.rows[0][8], "20.0");
        assert_eq!(t.rows[1][0], "runsc");
        assert_eq!(t.rows[1][3], "not installed");
        assert_eq!(t.rows[2][0], SEED);
        assert_eq!(t.rows[2][3], "58.2");
        let text = text_table(t);
        assert!(text.contains("not installed"), "{text}");
        let md = markdown_table(t);
        assert!(md.starts_with("### §4.1"), "{md}");
        assert_eq!(md.lines().filter(|l| l.starts_with("| ")).count(), 4);
    }

    #[test]
    fn charts_are_made_from_outcomes() {
        let report = api_create::Report::aggregate(
            api_create::Plan::new(1, 3, 0).unwrap(),
            &ms(&[5, 6, 7])
                .into_iter()
                .map(|d| api_create::Outcome {
                    create: Ok(d),
                    kill_error: None,
                })
                .collect::<Vec<_>>(),
            Duration::from_millis(20),
            0,
        );
        let o = Outcome::Create {
            levels: vec![CreateLevel {
                report,
                kept: vec![],
                peers: vec![],
            }],
            create_only: false,
        };
        let c = charts(std::slice::from_ref(&o));
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].0, "create-latency.svg");
        assert!(c[0].1.render().contains("cubicle p50"));
        let t = &tables(&o)[0];
        assert_eq!(t.rows[0][..6], ["cubicle", "1", "3", "6.0", "5.0", "6.0"]);
        assert_eq!(t.rows[0][10], "20.0");
        assert_eq!(t.rows[0][11], "6.67");
        assert_eq!(t.rows[1][0], SEED);
        let md = markdown(
            &["machine: test".into()],
            &[o],
            &["create-latency.svg".into()],
        );
        assert!(md.contains("![create-latency.svg](create-latency.svg)"));
    }
}
