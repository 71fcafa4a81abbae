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

/// Statistics of batches (the seed's concurrency tables): each round sends a batch of
/// operations at once and is timed from the first request sent to the last answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BatchStats {
    /// Operations in one batch (the divisor of `per`).
    pub ops_per_batch: usize,
    /// Wall time of the batches, ms (`n` = rounds).
    pub wall: Summary,
    /// Amortised time per operation: the average wall divided by the operations in a
    /// batch, ms (the seed's "per-snapshot avg", "per-clone avg", ...).
    pub per_avg: f64,
}

impl BatchStats {
    /// Summarises the wall times of batches of `ops_per_batch` operations; `None` for no
    /// batches or empty batches.
    pub fn of(walls: &[Duration], ops_per_batch: usize) -> Option<BatchStats> {
        if ops_per_batch == 0 {
            return None;
        }
        let wall = Summary::of(walls)?;
        Some(BatchStats {
            ops_per_batch,
            per_avg: wall.avg / ops_per_batch as f64,
            wall,
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

    #[test]
    fn batches_give_wall_and_per() {
        let walls: Vec<Duration> = [60, 50, 70, 40, 80]
            .iter()
            .map(|ms| Duration::from_millis(*ms))
            .collect();
        let b = BatchStats::of(&walls, 5).unwrap();
        assert_eq!(b.wall.n, 5);
        assert_eq!((b.wall.avg, b.wall.min, b.wall.max), (60.0, 40.0, 80.0));
        // Nearest rank: 95% of 5 rounds is the 5th value, as the seed's p95 = max.
        assert_eq!(b.wall.p95, 80.0);
        assert_eq!(b.wall.p50, 60.0);
        assert_eq!(b.per_avg, 12.0);
        assert_eq!(BatchStats::of(&walls, 1).unwrap().per_avg, 60.0);
        assert!(BatchStats::of(&[], 5).is_none());
        assert!(BatchStats::of(&walls, 0).is_none());
    }

    #[test]
    fn p99_of_many_samples_is_not_the_max() {
        let samples: Vec<Duration> = (1..=300).map(Duration::from_millis).collect();
        let s = Summary::of(&samples).unwrap();
        assert_eq!((s.p90, s.p95, s.p99, s.max), (270.0, 285.0, 297.0, 300.0));
        assert_eq!(s.avg, 150.5);
    }
}
