//! Cubicle's benchmarks, shaped like Cloud Hypervisor's `performance-metrics`: each
//! scenario measures Cubicle and, in the same run and on the same rootfs, the peers a
//! user could pick instead, and reports the same statistics for all.
//!
//! Timings are wall-clock and noisy on shared machines: compare medians and ratios
//! within one run, never against numbers from another machine.

#![warn(missing_docs)]

pub mod api_create;
pub mod code_interpreter;
pub mod density;
pub mod ns_create;
pub mod peers;
pub mod scenarios;
pub mod seed;
pub mod snapshot;
pub mod stats;
pub mod suite;
pub mod svg;
