//! The control plane without HTTP: the life of every sandbox from create to kill.
//!
//! [`Controller`] is the one place that decides what happens to a sandbox. The REST
//! API, the proxy and the CLI are thin adapters over it. It owns:
//!
//! - **the lifecycle** ([`cubicle_core::SandboxState`]): every transition is written to
//!   the store before it is acknowledged; a create is recorded as `creating` before the
//!   runtime is asked, so a crash mid-create is found and cleaned up on restart;
//! - **the live index**: running sandboxes by id, with owner, agent socket and deadline,
//!   so the proxy routes a request without touching the database;
//! - **timeouts**: one task sleeps until the earliest deadline and kills what expired;
//! - **reconcile** at start: the store is compared with what the runtime really runs;
//!   running sandboxes survive a daemon restart and are adopted again, dead ones are
//!   marked killed with the reason, and strays the store does not know are destroyed;
//! - **snapshots, fork and rollback**: checkpoints of a sandbox (under its operation
//!   lock) recorded `creating` then `ready`, sandboxes restored from them (a create
//!   naming a snapshot, a fork), and a sandbox put back to one of its own snapshots;
//! - **template builds**: jobs that build templates (from images, or rebuilds) one at a
//!   time, recorded with their phase and log, and the deletion of templates nobody
//!   uses;
//! - **templates with a service** (`template_ready`): the service started once,
//!   probed and checkpointed at build time; their sandboxes are restored from it;
//! - **metrics**: a sampler records CPU, memory and disk of every running sandbox every
//!   few seconds, kept for a while in memory.
//!
//! Ownership: every sandbox belongs to the API key that created it; a key never sees,
//! reaches or kills another key's sandboxes (they are reported as not found).

#![warn(missing_docs)]

mod controller;
mod error;
mod metrics;
mod request;
#[cfg(feature = "testing")]
pub mod testing;

pub use controller::{
    prepare_template, template_checkpoint, ControlConfig, Controller, PreparedTemplate, Route,
    SnapshotListRequest, TemplateSummary, FORK_DEFAULT_TIMEOUT, MAX_FORKS, RESTARTED,
};
pub use error::ControlError;
pub use metrics::MetricSample;
pub use request::{CreateRequest, ListRequest};

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
