//! `density` (seed §3.3): idle sandboxes launched in batches and kept alive; after each
//! batch this host's `MemAvailable` and each sandbox's PSS are read, the per-sandbox
//! overhead is `(baseline available − available now) / live sandboxes`, and the host's
//! capacity is projected as the seed does (10 % headroom; idle, and with every sandbox
//! using its whole memory limit).
//!
//! Safety (the seed's warning, automated): before each batch, the memory it would take
//! is estimated from the overhead measured so far (at least [`MIN_ESTIMATE_MIB`], and
//! [`FIRST_ESTIMATE_MIB`] before anything was measured); a batch that would leave less
//! than the headroom available is not launched, and the run stops there and says so.
//! Every sandbox of the run is killed at the end.

use std::time::Duration;

use cubicle_client::{ApiClient, CreateSandbox};
use futures_util::future::join_all;
use serde::Serialize;
use tokio::time::Instant;

use crate::api_create::{group_errors, ErrorCount};
use crate::code_interpreter::{kib_field, Host};
use crate::snapshot::{error_message, Live};
use crate::stats::Summary;

/// The overhead assumed for a sandbox before any was measured, MiB.
pub const FIRST_ESTIMATE_MIB: f64 = 256.0;
/// The smallest overhead assumed for a sandbox when estimating a batch, MiB.
pub const MIN_ESTIMATE_MIB: f64 = 32.0;
/// Memory kept free for the host, percent of MemTotal (the seed's headroom).
pub const HEADROOM_PCT: f64 = 10.0;

/// Why density cannot run.
#[derive(Debug, thiserror::Error)]
pub enum DensityError {
    /// No batches, or an empty one.
    #[error("density needs batches of at least 1 sandbox (got {0:?})")]
    BadBatches(Vec<usize>),
    /// /proc/meminfo could not be read.
    #[error("reading /proc/meminfo: {0}")]
    Meminfo(String),
}

/// The projected capacity of a host, as the seed computes it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Capacity {
    /// MemTotal, MiB.
    pub total_mib: f64,
    /// MemTotal − baseline MemAvailable, MiB.
    pub baseline_used_mib: f64,
    /// [`HEADROOM_PCT`] of MemTotal, MiB.
    pub headroom_mib: f64,
    /// Left for sandboxes, MiB.
    pub for_sandboxes_mib: f64,
    /// Per-sandbox overhead used, MiB.
    pub per_sandbox_mib: f64,
    /// Sandboxes that fit idle.
    pub idle: u64,
    /// Memory limit of a sandbox, MiB.
    pub sandbox_limit_mib: f64,
    /// Sandboxes that fit if each uses its whole limit.
    pub full_load: u64,
}

impl Capacity {
    /// The seed's arithmetic (§3.3). `None` without a positive overhead.
    pub fn project(
        total_mib: f64,
        baseline_available_mib: f64,
        per_sandbox_mib: f64,
        sandbox_limit_mib: f64,
    ) -> Option<Capacity> {
        if per_sandbox_mib <= 0.0 {
            return None;
        }
        let baseline_used_mib = total_mib - baseline_available_mib;
        let headroom_mib = (total_mib * HEADROOM_PCT / 100.0).floor();
        let for_sandboxes_mib = (total_mib - baseline_used_mib - headroom_mib).max(0.0);
        Some(Capacity {
            total_mib,
            baseline_used_mib,
            headroom_mib,
            for_sandboxes_mib,
            per_sandbox_mib,
            idle: (for_sandboxes_mib / per_sandbox_mib) as u64,
            sandbox_limit_mib,
            full_load: (for_sandboxes_mib / (sandbox_limit_mib + per_sandbox_mib)) as u64,
        })
    }
}

/// The state after one batch.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Step {
    /// Sandboxes alive.
    pub live: usize,
    /// MemAvailable, MiB.
    pub available_mib: f64,
    /// (baseline − available) / live, MiB.
    pub per_sandbox_mib: f64,
    /// PSS per sandbox (sum over its processes), MiB; `None` if not readable.
    pub pss_mib: Option<PssSummary>,
    /// Create latency of this batch's sandboxes (all at once), ms.
    pub create_ms: Option<Summary>,
    /// Creates of this batch that failed.
    pub failed: usize,
}

/// PSS of the live sandboxes, MiB.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PssSummary {
    /// Sandboxes read.
    pub n: usize,
    /// Average.
    pub avg: f64,
    /// Median.
    pub p50: f64,
    /// Largest.
    pub max: f64,
}

impl PssSummary {
    /// Of per-sandbox PSS in KiB.
    pub fn of(kib: &[u64]) -> Option<PssSummary> {
        let mut mib: Vec<f64> = kib.iter().map(|k| *k as f64 / 1024.0).collect();
        if mib.is_empty() {
            return None;
        }
        mib.sort_by(|a, b| a.total_cmp(b));
        Some(PssSummary {
            n: mib.len(),
            avg: mib.iter().sum::<f64>() / mib.len() as f64,
            p50: crate::stats::percentile(&mib, 50.0),
            max: mib[mib.len() - 1],
        })
    }
}

/// The result of a density run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// Batch sizes asked for.
    pub batches: Vec<usize>,
    /// MemTotal, MiB.
    pub total_mib: f64,
    /// MemAvailable before the first batch, MiB.
    pub baseline_available_mib: f64,
    /// One per batch launched.
    pub steps: Vec<Step>,
    /// Why the run stopped before its last batch, if it did.
    pub stopped: Option<String>,
    /// Projected from the last step, with the larger of its MemAvailable overhead and
    /// its average PSS per sandbox.
    pub capacity: Option<Capacity>,
    /// Why PSS is missing, if it is.
    pub pss_unavailable: Option<String>,
    /// Failures by message.
    pub errors: Vec<ErrorCount>,
}

/// Whether a batch of `batch` sandboxes may be launched with `available_mib` left:
/// `Err(reason)` if it would eat into the headroom.
pub fn safe_to_launch(
    batch: usize,
    available_mib: f64,
    total_mib: f64,
    measured_per_sandbox_mib: Option<f64>,
) -> Result<(), String> {
    let estimate = measured_per_sandbox_mib
        .map(|m| m.max(MIN_ESTIMATE_MIB))
        .unwrap_or(FIRST_ESTIMATE_MIB);
    let need = batch as f64 * estimate;
    let floor = total_mib * HEADROOM_PCT / 100.0;
    if available_mib - need < floor {
        return Err(format!(
            "stopped before a batch of {batch}: it would take ~{need:.0} MiB \
             ({estimate:.0} MiB each) of the {available_mib:.0} MiB available, leaving less \
             than the {floor:.0} MiB headroom ({HEADROOM_PCT}% of MemTotal)"
        ));
    }
    Ok(())
}

fn meminfo() -> Result<(f64, f64), DensityError> {
    let text = std::fs::read_to_string("/proc/meminfo")
        .map_err(|e| DensityError::Meminfo(e.to_string()))?;
    let field = |k| {
        kib_field(&text, k)
            .map(|v| v as f64 / 1024.0)
            .ok_or_else(|| DensityError::Meminfo(format!("no {k}")))
    };
    Ok((field("MemTotal")?, field("MemAvailable")?))
}

/// Runs the batches against the daemon behind `client`, which must run on this host.
/// `host` reads the sandboxes' PSS (`None`: not readable here, with the reason).
#[allow(clippy::too_many_arguments)]
pub async fn run(
    client: &ApiClient,
    template: &str,
    batches: &[usize],
    sandbox_limit_mib: f64,
    sandbox_timeout_s: u64,
    host: Result<&Host, String>,
    live: &Live,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<Report, DensityError> {
    if batches.is_empty() || batches.contains(&0) {
        return Err(DensityError::BadBatches(batches.to_vec()));
    }
    let (total_mib, baseline) = meminfo()?;
    let mut request = CreateSandbox::new(template);
    request.timeout = Some(sandbox_timeout_s);
    let mut ids: Vec<String> = Vec::new();
    let mut steps: Vec<Step> = Vec::new();
    let mut errors = Vec::new();
    let mut stopped = None;
    let pss_unavailable = host.as_ref().err().cloned();
    for (i, &batch) in batches.iter().enumerate() {
        let (_, available) = meminfo()?;
        let measured = steps.last().map(|s| s.per_sandbox_mib);
        if let Err(why) = safe_to_launch(batch, available, total_mib, measured) {
            stopped = Some(why);
            break;
        }
        let results = join_all((0..batch).map(|_| async {
            let started = Instant::now();
            let r = client.create(&request).await;
            (started.elapsed(), r)
        }))
        .await;
        let mut took: Vec<Duration> = Vec::new();
        let mut failed = 0;
        for (t, r) in results {
            match r {
                Ok(s) => {
                    live.add_sandbox(&s.sandbox_id);
                    ids.push(s.sandbox_id);
                    took.push(t);
                }
                Err(e) => {
                    failed += 1;
                    errors.push(format!("create: {}", error_message(&e)));
                }
            }
        }
        let (_, available) = meminfo()?;
        let pss_mib = match &host {
            Ok(h) => {
                let kib: Vec<u64> = ids
                    .iter()
                    .filter_map(|id| h.sandbox_memory(id).ok())
                    .filter(|m| m.processes > 0)
                    .map(|m| m.total.pss_kib)
                    .collect();
                PssSummary::of(&kib)
            }
            Err(_) => None,
        };
        let n = ids.len();
        steps.push(Step {
            live: n,
            available_mib: available,
            per_sandbox_mib: if n == 0 {
                0.0
            } else {
                (baseline - available) / n as f64
            },
            pss_mib,
            create_ms: Summary::of(&took),
            failed,
        });
        progress(i + 1, batches.len());
    }
    // Clean up.
    let kills = join_all(ids.iter().map(|id| live.kill(client, id))).await;
    errors.extend(kills.into_iter().flatten());
    // The seed divides by the MemAvailable overhead; when that is within the noise of a
    // shared host (a sandbox of a few MiB), the sandboxes' own PSS is the firmer figure:
    // the larger of the two is used.
    let capacity = steps.last().and_then(|s| {
        let per = s
            .pss_mib
            .as_ref()
            .map_or(s.per_sandbox_mib, |p| p.avg.max(s.per_sandbox_mib));
        Capacity::project(total_mib, baseline, per, sandbox_limit_mib)
    });
    Ok(Report {
        batches: batches.to_vec(),
        total_mib,
        baseline_available_mib: baseline,
        steps,
        stopped,
        capacity,
        pss_unavailable,
        errors: group_errors(errors.iter().map(String::as_str)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seeds_capacity_arithmetic() {
        // §3.3: 32768 MB total, 25570 available empty, ~30 MB per sandbox, 2 GiB each.
        let c = Capacity::project(32768.0, 25570.0, 30.0, 2048.0).unwrap();
        assert_eq!(c.baseline_used_mib, 7198.0);
        assert_eq!(c.headroom_mib, 3276.0);
        assert_eq!(c.for_sandboxes_mib, 22294.0);
        assert_eq!(c.idle, 743);
        assert_eq!(c.full_load, 10);
        assert!(Capacity::project(32768.0, 25570.0, 0.0, 2048.0).is_none());
    }

    #[test]
    fn batches_that_would_eat_the_headroom_are_not_launched() {
        // 24 GiB host, 2.4 GiB headroom.
        let total = 24576.0;
        assert!(safe_to_launch(10, 20000.0, total, None).is_ok());
        // 10 × 256 MiB first estimate from 4000 MiB leaves 1440 < 2457.
        let e = safe_to_launch(10, 4000.0, total, None).unwrap_err();
        assert!(e.contains("stopped before a batch of 10"), "{e}");
        // Once measured: 10 × max(1, 32) = 320 MiB.
        assert!(safe_to_launch(10, 4000.0, total, Some(1.0)).is_ok());
        assert!(safe_to_launch(100, 4000.0, total, Some(40.0)).is_err());
    }

    #[test]
    fn pss_is_summarised_in_mib() {
        let p = PssSummary::of(&[1024, 3072, 2048]).unwrap();
        assert_eq!((p.n, p.avg, p.p50, p.max), (3, 2.0, 2.0, 3.0));
        assert!(PssSummary::of(&[]).is_none());
    }
}
