//! Summary statistics of latency samples (the seed report's metric set).

use std::time::Duration;

use serde::Serialize;

/// Statistics of one set of samples, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// Number of samples.
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

impl Summary {
    /// Summarises samples; `None` for no samples.
    pub fn of(samples: &[Duration]) -> Option<Summary> {
        if samples.is_empty() {
            return None;
        }
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(|a, b| a.total_cmp(b));
        Some(Summary {
            n: ms.len(),
            avg: ms.iter().sum::<f64>() / ms.len() as f64,
            min: ms[0],
            p50: percentile(&ms, 50.0),
            p90: percentile(&ms, 90.0),
            p95: percentile(&ms, 95.0),
            p99: percentile(&ms, 99.0),
            max: ms[ms.len() - 1],
        })
    }
}

/// Nearest-rank percentile of sorted values: the smallest value with at least `p`% of
/// the samples at or below it.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&[7.0], 95.0), 7.0);
        let odd = [1.0, 2.0, 3.0];
        assert_eq!(percentile(&odd, 50.0), 2.0);
    }

    #[test]
    fn summary_of_synthetic_samples() {
        let samples: Vec<Duration> = [4, 1, 3, 2, 10]
            .iter()
            .map(|ms| Duration::from_millis(*ms))
            .collect();
        let s = Summary::of(&samples).unwrap();
        assert_eq!((s.n, s.min, s.p50, s.max), (5, 1.0, 3.0, 10.0));
        assert_eq!(s.avg, 4.0);
        assert_eq!(s.p99, 10.0);
        assert!(Summary::of(&[]).is_none());
    }
}
