//! `api-create`: sandbox creation through the public E2B API under concurrency, the
//! scenario of the seed report's cube-bench (§3.2).
//!
//! C workers share one queue of N creates. Each worker takes the next one, creates a
//! sandbox (timed: request sent → `201`, which the daemon sends only once the sandbox's
//! envd answers), kills it at once (untimed) and takes the next, until the queue is
//! empty. Before that, W warm-up rounds run one create+kill per worker, all workers at
//! once, and are not counted.
//!
//! Reported, in milliseconds: the statistics of the successful creates, `wall` (first
//! create sent → last sandbox created and killed) and `per` (= wall / N), plus every
//! failure, grouped by message.
//!
//! Workers are futures polled by one task: client-side work (a JSON body each way) is
//! microseconds, and one task keeps the scheduling simple and the timings comparable.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::stats::Summary;

/// What to run: C workers, N measured creates, W warm-up rounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// Workers creating at the same time (C).
    pub concurrency: usize,
    /// Measured creates (N).
    pub requests: usize,
    /// Warm-up rounds of C creates each (W).
    pub warmup_rounds: usize,
}

/// Why a plan cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// C = 0.
    #[error("concurrency (-c) must be at least 1")]
    NoWorkers,
    /// N = 0.
    #[error("the number of requests (-n) must be at least 1")]
    NoRequests,
    /// C > N: some workers would never run.
    #[error(
        "concurrency (-c {concurrency}) must not exceed the number of requests (-n {requests})"
    )]
    MoreWorkersThanRequests {
        /// C.
        concurrency: usize,
        /// N.
        requests: usize,
    },
}

impl Plan {
    /// A checked plan.
    pub fn new(
        concurrency: usize,
        requests: usize,
        warmup_rounds: usize,
    ) -> Result<Self, PlanError> {
        if concurrency == 0 {
            return Err(PlanError::NoWorkers);
        }
        if requests == 0 {
            return Err(PlanError::NoRequests);
        }
        if concurrency > requests {
            return Err(PlanError::MoreWorkersThanRequests {
                concurrency,
                requests,
            });
        }
        Ok(Plan {
            concurrency,
            requests,
            warmup_rounds,
        })
    }
}

/// What the benchmark creates and kills. Errors are messages, grouped in the report.
pub trait Target {
    /// What `kill` needs (the sandbox id).
    type Handle;
    /// Creates one sandbox; resolves once it is usable.
    fn create(&self) -> impl Future<Output = Result<Self::Handle, String>>;
    /// Kills it.
    fn kill(&self, handle: Self::Handle) -> impl Future<Output = Result<(), String>>;
}

/// How one measured create went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The create's latency, or why it failed.
    pub create: Result<Duration, String>,
    /// Why the kill after a successful create failed, if it did.
    pub kill_error: Option<String>,
}

/// A failure message and how often it happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErrorCount {
    /// The message.
    pub message: String,
    /// How often.
    pub count: usize,
}

/// The result of a run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// The plan.
    pub plan: Plan,
    /// Successful creates.
    pub ok: usize,
    /// Failed creates.
    pub failed: usize,
    /// `ok / requests`, in percent.
    pub success_pct: f64,
    /// Latency of the successful creates, ms (`None` if none succeeded).
    pub create_ms: Option<Summary>,
    /// First create sent → last sandbox created and killed, ms.
    pub wall_ms: f64,
    /// `wall_ms / requests`.
    pub per_ms: f64,
    /// Failed creates by message, most frequent first.
    pub errors: Vec<ErrorCount>,
    /// Failed kills (sandboxes left for their timeout) by message.
    pub kill_errors: Vec<ErrorCount>,
    /// Failed creates during warm-up (not counted above).
    pub warmup_failures: usize,
}

impl Report {
    /// Aggregates the outcomes of a run that took `wall`.
    pub fn aggregate(
        plan: Plan,
        outcomes: &[Outcome],
        wall: Duration,
        warmup_failures: usize,
    ) -> Report {
        let samples: Vec<Duration> = outcomes
            .iter()
            .filter_map(|o| o.create.as_ref().ok().copied())
            .collect();
        let ok = samples.len();
        let wall_ms = wall.as_secs_f64() * 1e3;
        Report {
            plan,
            ok,
            failed: outcomes.len() - ok,
            success_pct: if outcomes.is_empty() {
                0.0
            } else {
                ok as f64 * 100.0 / outcomes.len() as f64
            },
            create_ms: Summary::of(&samples),
            wall_ms,
            per_ms: wall_ms / plan.requests as f64,
            errors: group_errors(
                outcomes
                    .iter()
                    .filter_map(|o| o.create.as_ref().err())
                    .map(String::as_str),
            ),
            kill_errors: group_errors(outcomes.iter().filter_map(|o| o.kill_error.as_deref())),
            warmup_failures,
        }
    }
}

/// Groups failure messages, most frequent first.
pub fn group_errors<'a>(messages: impl IntoIterator<Item = &'a str>) -> Vec<ErrorCount> {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for m in messages {
        *counts.entry(m).or_default() += 1;
    }
    let mut out: Vec<ErrorCount> = counts
        .into_iter()
        .map(|(message, count)| ErrorCount {
            message: message.to_owned(),
            count,
        })
        .collect();
    out.sort_by_key(|e| std::cmp::Reverse(e.count));
    out
}

/// Progress of a run, for a status line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Warm-up round `round` of `rounds` is starting.
    Warmup {
        /// 1-based.
        round: usize,
        /// W.
        rounds: usize,
    },
    /// `done` of `total` measured creates have finished.
    Measured {
        /// Finished so far.
        done: usize,
        /// N.
        total: usize,
    },
}

/// Runs the plan against `target`.
pub async fn run<T: Target>(plan: Plan, target: &T, progress: &dyn Fn(Progress)) -> Report {
    let mut warmup_failures = 0;
    for round in 0..plan.warmup_rounds {
        progress(Progress::Warmup {
            round: round + 1,
            rounds: plan.warmup_rounds,
        });
        let outcomes =
            futures_util::future::join_all((0..plan.concurrency).map(|_| once(target))).await;
        warmup_failures += outcomes.iter().filter(|o| o.create.is_err()).count();
    }

    let next = Cell::new(0);
    let outcomes = RefCell::new(Vec::with_capacity(plan.requests));
    let worker = || async {
        loop {
            let i = next.get();
            if i >= plan.requests {
                return;
            }
            next.set(i + 1);
            let outcome = once(target).await;
            let done = {
                let mut all = outcomes.borrow_mut();
                all.push(outcome);
                all.len()
            };
            progress(Progress::Measured {
                done,
                total: plan.requests,
            });
        }
    };
    let started = Instant::now();
    futures_util::future::join_all((0..plan.concurrency).map(|_| worker())).await;
    let wall = started.elapsed();
    Report::aggregate(plan, &outcomes.into_inner(), wall, warmup_failures)
}

/// One create (timed) and kill (untimed).
async fn once<T: Target>(target: &T) -> Outcome {
    let started = Instant::now();
    let created = target.create().await;
    let took = started.elapsed();
    match created {
        Ok(handle) => Outcome {
            create: Ok(took),
            kill_error: target.kill(handle).await.err(),
        },
        Err(e) => Outcome {
            create: Err(e),
            kill_error: None,
        },
    }
}

/// The real target: `POST /v2/sandboxes` and `DELETE /sandboxes/{id}` on a daemon.
#[derive(Debug)]
pub struct ApiTarget {
    client: cubicle_client::ApiClient,
    request: cubicle_client::CreateSandbox,
    /// Create-only: sandboxes are kept (listed here) instead of killed.
    kept: Option<std::sync::Mutex<Vec<String>>>,
}

impl ApiTarget {
    /// Creates sandboxes of `template` that the daemon kills after `timeout` seconds
    /// should a kill fail.
    pub fn new(client: cubicle_client::ApiClient, template: &str, timeout: u64) -> Self {
        let mut request = cubicle_client::CreateSandbox::new(template);
        request.timeout = Some(timeout);
        ApiTarget {
            client,
            request,
            kept: None,
        }
    }

    /// The seed's `-m create-only`: sandboxes are kept alive (until `timeout`), not
    /// killed; [`ApiTarget::kept`] lists them.
    pub fn create_only(mut self) -> Self {
        self.kept = Some(std::sync::Mutex::new(Vec::new()));
        self
    }

    /// The sandboxes kept by a create-only run.
    pub fn kept(&self) -> Vec<String> {
        self.kept
            .as_ref()
            .map(|k| k.lock().expect("kept").clone())
            .unwrap_or_default()
    }
}

impl Target for ApiTarget {
    type Handle = String;

    async fn create(&self) -> Result<String, String> {
        self.client
            .create(&self.request)
            .await
            .map(|s| s.sandbox_id)
            .map_err(|e| error_message(&e))
    }

    async fn kill(&self, id: String) -> Result<(), String> {
        if let Some(kept) = &self.kept {
            kept.lock().expect("kept").push(id);
            return Ok(());
        }
        match self.client.kill(&id).await {
            Ok(true) => Ok(()),
            Ok(false) => Err("sandbox was already gone".into()),
            Err(e) => Err(error_message(&e)),
        }
    }
}

/// A failure as it is grouped: the status and the server's message.
fn error_message(e: &cubicle_client::ClientError) -> String {
    match e.status() {
        Some(status) => format!("{}: {e}", status.as_u16()),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A target whose creates take `latency(i)` of (paused, virtual) time for the i-th
    /// create and fail where `fail(i)`; it records the order of events.
    struct Fake {
        created: Cell<usize>,
        live: Cell<usize>,
        peak: Cell<usize>,
        kills: Cell<usize>,
        latency: fn(usize) -> u64,
        fail: fn(usize) -> bool,
    }

    impl Fake {
        fn new(latency: fn(usize) -> u64, fail: fn(usize) -> bool) -> Fake {
            Fake {
                created: Cell::new(0),
                live: Cell::new(0),
                peak: Cell::new(0),
                kills: Cell::new(0),
                latency,
                fail,
            }
        }
    }

    impl Target for Fake {
        type Handle = usize;

        async fn create(&self) -> Result<usize, String> {
            let i = self.created.get();
            self.created.set(i + 1);
            self.live.set(self.live.get() + 1);
            self.peak.set(self.peak.get().max(self.live.get()));
            tokio::time::sleep(Duration::from_millis((self.latency)(i))).await;
            self.live.set(self.live.get() - 1);
            if (self.fail)(i) {
                return Err(format!("429: too many sandboxes (#{})", i % 2));
            }
            Ok(i)
        }

        async fn kill(&self, _: usize) -> Result<(), String> {
            self.kills.set(self.kills.get() + 1);
            tokio::time::sleep(Duration::from_millis(1)).await;
            Ok(())
        }
    }

    #[test]
    fn plans_are_checked() {
        assert_eq!(Plan::new(0, 5, 0), Err(PlanError::NoWorkers));
        assert_eq!(Plan::new(1, 0, 0), Err(PlanError::NoRequests));
        let e = Plan::new(20, 10, 3).unwrap_err();
        assert_eq!(
            e.to_string(),
            "concurrency (-c 20) must not exceed the number of requests (-n 10)"
        );
        assert!(Plan::new(10, 10, 0).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn workers_share_the_queue_and_warmup_is_not_counted() {
        let fake = Fake::new(|_| 10, |_| false);
        let plan = Plan::new(4, 10, 2).unwrap();
        let seen = RefCell::new(Vec::new());
        let report = run(plan, &fake, &|p| seen.borrow_mut().push(p)).await;
        // 2 warm-up rounds of 4, then 10 measured; never more than 4 at once.
        assert_eq!(fake.created.get(), 18);
        assert_eq!(fake.kills.get(), 18);
        assert_eq!(fake.peak.get(), 4);
        assert_eq!(
            (report.ok, report.failed, report.success_pct),
            (10, 0, 100.0)
        );
        let s = report.create_ms.clone().unwrap();
        assert_eq!((s.n, s.min, s.p50, s.max), (10, 10.0, 10.0, 10.0));
        // 10 creates of 10 ms (+1 ms kill) on 4 workers: 3 waves of 11 ms.
        assert_eq!(report.wall_ms, 33.0);
        assert_eq!(report.per_ms, 3.3);
        let seen = seen.into_inner();
        assert_eq!(
            seen[0],
            Progress::Warmup {
                round: 1,
                rounds: 2
            }
        );
        assert_eq!(
            seen[1],
            Progress::Warmup {
                round: 2,
                rounds: 2
            }
        );
        assert_eq!(
            seen.last(),
            Some(&Progress::Measured {
                done: 10,
                total: 10
            })
        );
        assert_eq!(seen.len(), 12);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_counted_and_grouped() {
        // Warm-up: creates 0..2; measured: 2..12. Every third create fails.
        let fake = Fake::new(|i| 5 + i as u64, |i| i % 3 == 0);
        let report = run(Plan::new(2, 10, 1).unwrap(), &fake, &|_| {}).await;
        assert_eq!(report.warmup_failures, 1); // create 0
                                               // Measured failures: 3, 6, 9 → #1, #0, #1.
        assert_eq!((report.ok, report.failed), (7, 3));
        assert_eq!(report.success_pct, 70.0);
        assert_eq!(
            report.errors,
            vec![
                ErrorCount {
                    message: "429: too many sandboxes (#1)".into(),
                    count: 2
                },
                ErrorCount {
                    message: "429: too many sandboxes (#0)".into(),
                    count: 1
                },
            ]
        );
        assert_eq!(fake.kills.get(), 1 + 7);
        assert_eq!(report.create_ms.unwrap().n, 7);
    }

    #[test]
    fn aggregation_of_synthetic_outcomes() {
        let ms = |m: u64| Duration::from_millis(m);
        let mut outcomes: Vec<Outcome> = (1..=100)
            .map(|m| Outcome {
                create: Ok(ms(m)),
                kill_error: None,
            })
            .collect();
        outcomes[0].kill_error = Some("500: destroy failed".into());
        outcomes.push(Outcome {
            create: Err("cannot reach the API".into()),
            kill_error: None,
        });
        let plan = Plan::new(10, 101, 0).unwrap();
        let r = Report::aggregate(plan, &outcomes, ms(1010), 0);
        let s = r.create_ms.clone().unwrap();
        assert_eq!(
            (s.n, s.min, s.p50, s.p90, s.p95, s.p99, s.max, s.avg),
            (100, 1.0, 50.0, 90.0, 95.0, 99.0, 100.0, 50.5)
        );
        assert_eq!((r.wall_ms, r.per_ms), (1010.0, 10.0));
        assert_eq!((r.ok, r.failed), (100, 1));
        assert!((r.success_pct - 99.0099).abs() < 1e-3);
        assert_eq!(r.kill_errors[0].message, "500: destroy failed");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["plan"]["concurrency"], 10);
        assert_eq!(json["create_ms"]["p95"], 95.0);

        let all_failed = Report::aggregate(
            plan,
            &[Outcome {
                create: Err("x".into()),
                kill_error: None,
            }],
            ms(5),
            0,
        );
        assert_eq!(all_failed.create_ms, None);
        assert_eq!(all_failed.success_pct, 0.0);
    }
}
