//! Resource samples of running sandboxes, kept in memory (E2B's `get_metrics`).

use std::collections::VecDeque;

use cubicle_runtime::SandboxStats;

/// Samples kept per sandbox (10 minutes at the default 5 s interval).
pub const MAX_SAMPLES: usize = 120;

/// One point of a sandbox's metrics, as the E2B API reports it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MetricSample {
    /// When, in ms since the epoch.
    pub timestamp_ms: i64,
    /// CPUs the sandbox may use.
    pub cpu_count: u32,
    /// CPU use since the previous sample, percent of `cpu_count` CPUs.
    pub cpu_used_pct: f64,
    /// Memory in use, bytes.
    pub mem_used: u64,
    /// Memory limit, bytes.
    pub mem_total: u64,
    /// Page cache, bytes.
    pub mem_cache: u64,
    /// Bytes written to the sandbox's own filesystem layer.
    pub disk_used: u64,
    /// The sandbox's disk size, bytes.
    pub disk_total: u64,
}

/// The recent samples of one sandbox.
#[derive(Debug, Clone)]
pub(crate) struct Series {
    samples: VecDeque<MetricSample>,
    last_cpu_ns: u64,
    last_at_ms: i64,
}

impl Series {
    /// A series for a sandbox started at `started_at_ms` (CPU use is measured from then
    /// for the first sample).
    pub fn new(started_at_ms: i64) -> Self {
        Series {
            samples: VecDeque::new(),
            last_cpu_ns: 0,
            last_at_ms: started_at_ms,
        }
    }

    /// Adds a sample computed from cumulative stats.
    pub fn push(&mut self, stats: &SandboxStats, at_ms: i64, cpu_count: u32, disk_total: u64) {
        let wall_ns = (at_ms - self.last_at_ms).max(1) as f64 * 1e6;
        let used_ns = stats.cpu_usage_ns.saturating_sub(self.last_cpu_ns) as f64;
        let pct = (used_ns / (wall_ns * f64::from(cpu_count.max(1))) * 100.0).clamp(0.0, 100.0);
        self.last_cpu_ns = stats.cpu_usage_ns;
        self.last_at_ms = at_ms;
        if self.samples.len() == MAX_SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back(MetricSample {
            timestamp_ms: at_ms,
            cpu_count,
            cpu_used_pct: (pct * 100.0).round() / 100.0,
            mem_used: stats.memory_bytes,
            mem_total: stats.memory_limit_bytes,
            mem_cache: stats.memory_cache_bytes,
            disk_used: stats.disk_used_bytes,
            disk_total,
        });
    }

    /// Samples in `[start, end]` (either bound open when `None`), oldest first.
    pub fn range(&self, start_ms: Option<i64>, end_ms: Option<i64>) -> Vec<MetricSample> {
        self.samples
            .iter()
            .filter(|s| start_ms.is_none_or(|t| s.timestamp_ms >= t))
            .filter(|s| end_ms.is_none_or(|t| s.timestamp_ms <= t))
            .copied()
            .collect()
    }

    /// Whether nothing was sampled yet.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(cpu_ns: u64) -> SandboxStats {
        SandboxStats {
            cpu_usage_ns: cpu_ns,
            memory_bytes: 10,
            memory_limit_bytes: 100,
            memory_cache_bytes: 1,
            disk_used_bytes: 5,
            pids: 1,
        }
    }

    #[test]
    fn cpu_percent_is_relative_to_the_previous_sample_and_the_cpu_count() {
        let mut s = Series::new(0);
        // 1 s of CPU over 1 s on 2 CPUs = 50 %.
        s.push(&stats(1_000_000_000), 1000, 2, 50);
        // Another 0.5 s over the next 1 s = 25 %.
        s.push(&stats(1_500_000_000), 2000, 2, 50);
        let all = s.range(None, None);
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].cpu_used_pct, 50.0);
        assert_eq!(all[1].cpu_used_pct, 25.0);
        assert_eq!(
            (all[1].mem_used, all[1].mem_total, all[1].disk_total),
            (10, 100, 50)
        );
        assert_eq!(s.range(Some(1500), None).len(), 1);
        assert_eq!(s.range(None, Some(1500)).len(), 1);
    }

    #[test]
    fn series_is_bounded() {
        let mut s = Series::new(0);
        for i in 1..=(MAX_SAMPLES as i64 + 10) {
            s.push(&stats(0), i * 1000, 1, 0);
        }
        let all = s.range(None, None);
        assert_eq!(all.len(), MAX_SAMPLES);
        assert_eq!(all[0].timestamp_ms, 11_000);
    }
}
