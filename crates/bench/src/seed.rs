//! The seed report's published figures (CubeSandbox on a 16-core AMD EPYC 9K65 CVM with
//! 32 GiB, 2 vCPU / 2 GiB microVM sandboxes), shown as a reference column next to what
//! this machine measures. They come from another machine and another kind of sandbox:
//! read them as orientation, not as a like-for-like comparison.

use serde::Serialize;

/// Where the seed's numbers were measured, for labels.
pub const HOST: &str = "seed: 16-core EPYC CVM, microVMs";

/// One §3.2 row: create latency at a concurrency level, ms.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CreateRow {
    /// Concurrency.
    pub concurrency: usize,
    /// Requests.
    pub requests: usize,
    /// avg, min, p50, p90, p95, p99, max.
    pub ms: [f64; 7],
}

/// §3.2.
pub const CREATE: [CreateRow; 3] = [
    CreateRow {
        concurrency: 1,
        requests: 20,
        ms: [66.7, 55.9, 64.5, 77.5, 78.2, 80.2, 80.2],
    },
    CreateRow {
        concurrency: 10,
        requests: 200,
        ms: [170.9, 85.4, 168.5, 206.4, 216.7, 286.1, 323.5],
    },
    CreateRow {
        concurrency: 20,
        requests: 300,
        ms: [364.6, 116.5, 356.2, 459.0, 521.4, 673.8, 744.0],
    },
];

/// One §3.3 row: live sandboxes, MemAvailable (MB) and the amortised overhead (MB).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct DensityRow {
    /// Live sandboxes.
    pub live: usize,
    /// System available memory, MB.
    pub available_mb: f64,
    /// Per-sandbox amortised overhead, MB (`None` for the baseline).
    pub per_sandbox_mb: Option<f64>,
}

/// §3.3 (batches of 1, 4, 5 and 10 on a 32 GiB host).
pub const DENSITY: [DensityRow; 5] = [
    DensityRow {
        live: 0,
        available_mb: 25570.0,
        per_sandbox_mb: None,
    },
    DensityRow {
        live: 1,
        available_mb: 25536.0,
        per_sandbox_mb: Some(34.0),
    },
    DensityRow {
        live: 5,
        available_mb: 25436.0,
        per_sandbox_mb: Some(27.0),
    },
    DensityRow {
        live: 10,
        available_mb: 25252.0,
        per_sandbox_mb: Some(32.0),
    },
    DensityRow {
        live: 20,
        available_mb: 24990.0,
        per_sandbox_mb: Some(29.0),
    },
];

/// The seed's §3.3 batch sizes (cumulative 1, 5, 10, 20).
pub const DENSITY_BATCHES: [usize; 4] = [1, 4, 5, 10];

/// The seed's projected capacity (§3.3): idle, and with every sandbox writing 2 GiB.
pub const DENSITY_CAPACITY: (u64, u64) = (743, 10);

/// One row of a chapter-4 concurrency table, ms.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BatchRow {
    /// Operations per batch (n; = concurrency except for clones).
    pub n: usize,
    /// Concurrency.
    pub concurrency: usize,
    /// Rounds.
    pub rounds: usize,
    /// wall avg, min, p95, max.
    pub wall: [f64; 4],
    /// Amortised per operation.
    pub per_avg: f64,
}

const fn row(n: usize, concurrency: usize, rounds: usize, wall: [f64; 4], per: f64) -> BatchRow {
    BatchRow {
        n,
        concurrency,
        rounds,
        wall,
        per_avg: per,
    }
}

/// §4.1 snapshot creation vs concurrency.
pub const SNAPSHOT: [BatchRow; 3] = [
    row(1, 1, 5, [41.4, 37.6, 48.7, 48.7], 41.4),
    row(5, 5, 5, [58.2, 51.0, 66.1, 66.1], 11.6),
    row(10, 10, 5, [114.1, 66.2, 285.2, 285.2], 11.4),
];

/// §4.3 create from a snapshot.
pub const CREATE_FROM_SNAPSHOT: [BatchRow; 3] = [
    row(1, 1, 3, [66.7, 65.8, 68.3, 68.3], 66.7),
    row(10, 10, 3, [387.9, 364.4, 420.3, 420.3], 38.8),
    row(20, 20, 3, [701.3, 660.5, 742.4, 742.4], 35.1),
];

/// §4.4 rollback (each sandbox: snapshot + rollback).
pub const ROLLBACK: [BatchRow; 3] = [
    row(1, 1, 5, [90.0, 82.0, 98.3, 98.3], 90.0),
    row(5, 5, 5, [325.5, 322.9, 329.4, 329.4], 65.1),
    row(10, 10, 5, [821.4, 778.7, 858.1, 858.1], 82.1),
];

/// §4.5 clone.
pub const CLONE: [BatchRow; 3] = [
    row(1, 1, 5, [270.6, 260.8, 280.5, 280.5], 270.6),
    row(10, 5, 3, [541.6, 522.9, 557.7, 557.7], 54.2),
    row(20, 10, 3, [789.7, 757.2, 815.3, 815.3], 39.5),
];

/// §4.6 pause (full memory copy to disk).
pub const PAUSE: [BatchRow; 2] = [
    row(1, 1, 5, [370.8, 351.0, 384.0, 384.0], 370.8),
    row(10, 10, 5, [1586.0, 1529.5, 1679.8, 1679.8], 158.6),
];

/// §4.6 resume.
pub const RESUME: [BatchRow; 2] = [
    row(1, 1, 5, [18.9, 9.5, 32.8, 32.8], 18.9),
    row(10, 10, 5, [26.6, 19.3, 39.9, 39.9], 2.7),
];

/// One §4.2 row: write size, dirty pages, snapshot and create-from-it (avg, min, p95,
/// max), ms.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct DirtyRow {
    /// MB written to /dev/shm.
    pub write_mb: u64,
    /// Dirty pages the seed's VMM saved, MB.
    pub dirty_mb: f64,
    /// Snapshot avg, min, p95, max.
    pub snapshot: [f64; 4],
    /// Create from that snapshot avg, min, p95, max.
    pub create: [f64; 4],
}

const fn dirty(write_mb: u64, dirty_mb: f64, snapshot: [f64; 4], create: [f64; 4]) -> DirtyRow {
    DirtyRow {
        write_mb,
        dirty_mb,
        snapshot,
        create,
    }
}

/// §4.2 (3 runs each, serial, one warm-up).
pub const DIRTY: [DirtyRow; 8] = [
    dirty(0, 8.3, [42.1, 37.6, 45.9, 45.9], [71.6, 65.4, 77.7, 77.7]),
    dirty(10, 41.2, [55.3, 54.1, 56.6, 56.6], [73.1, 60.4, 82.5, 82.5]),
    dirty(
        50,
        122.6,
        [67.7, 66.5, 69.6, 69.6],
        [70.3, 63.9, 81.4, 81.4],
    ),
    dirty(
        100,
        195.2,
        [85.7, 82.5, 88.7, 88.7],
        [68.3, 62.3, 71.6, 71.6],
    ),
    dirty(
        200,
        296.8,
        [100.9, 98.5, 102.6, 102.6],
        [65.9, 62.7, 71.2, 71.2],
    ),
    dirty(
        500,
        602.6,
        [168.6, 165.4, 172.9, 172.9],
        [68.1, 54.5, 75.7, 75.7],
    ),
    dirty(
        800,
        908.3,
        [215.8, 212.1, 217.6, 217.6],
        [68.1, 60.9, 79.1, 79.1],
    ),
    dirty(
        1024,
        1136.3,
        [257.5, 251.2, 267.6, 267.6],
        [62.3, 56.5, 69.6, 69.6],
    ),
];

/// The seed's row of `table` with the same shape (n and concurrency), if any.
pub fn batch_row(table: &[BatchRow], n: usize, concurrency: usize) -> Option<BatchRow> {
    table
        .iter()
        .find(|r| r.n == n && r.concurrency == concurrency)
        .copied()
}

/// The seed's §3.2 row at `concurrency`, if it measured that level.
pub fn create_row(concurrency: usize) -> Option<CreateRow> {
    CREATE
        .iter()
        .find(|r| r.concurrency == concurrency)
        .copied()
}

/// The seed's §4.2 row for exactly `write_mb`, if it measured that size.
pub fn dirty_row(write_mb: u64) -> Option<DirtyRow> {
    DIRTY.iter().find(|r| r.write_mb == write_mb).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_is_wall_avg_over_n_in_the_seed_too() {
        // The seed's own tables follow the definition we compute: per = wall avg / n.
        for table in [
            &SNAPSHOT[..],
            &CREATE_FROM_SNAPSHOT,
            &ROLLBACK,
            &CLONE,
            &PAUSE,
            &RESUME,
        ] {
            for r in table {
                let per = r.wall[0] / r.n as f64;
                assert!((per - r.per_avg).abs() < 0.15, "{r:?}");
            }
        }
    }

    #[test]
    fn rows_are_found_by_shape() {
        assert_eq!(batch_row(&CLONE, 10, 5).unwrap().per_avg, 54.2);
        assert!(batch_row(&CLONE, 10, 10).is_none());
        assert_eq!(create_row(20).unwrap().requests, 300);
        assert_eq!(dirty_row(1024).unwrap().snapshot[0], 257.5);
        assert!(dirty_row(5).is_none());
        let live: Vec<usize> = DENSITY.iter().map(|r| r.live).collect();
        let cumulative: Vec<usize> = DENSITY_BATCHES
            .iter()
            .scan(0, |sum, b| {
                *sum += b;
                Some(*sum)
            })
            .collect();
        assert_eq!(live[1..], cumulative[..]);
    }
}
