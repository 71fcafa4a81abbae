//! Cubicle's shared vocabulary, used by every other crate: validated identifiers
//! ([`SandboxId`], [`TemplateName`]), resource [`Limits`], the coarse [`ErrorKind`]
//! every module error reports, the on-disk [`DataDir`] layout and the sandbox lifecycle
//! ([`SandboxState`]).
//!
//! This crate has no I/O and no heavy dependencies on purpose.

mod error;
mod id;
mod layout;
mod limits;
mod state;

pub use error::ErrorKind;
pub use id::{random_uuid, uuid_shaped, IdError, SandboxId, TemplateName};
pub use layout::DataDir;
pub use limits::{Limits, LimitsError};
pub use state::{SandboxState, UnknownState};

/// How sandbox user ids map onto host user ids.
///
/// Every sandbox runs in its own user namespace in which uids/gids `0..RANGE` map to host
/// ids `HOST_BASE..HOST_BASE+RANGE`, so root inside a sandbox is an unprivileged user on
/// the host. Template root filesystems are stored already shifted by `HOST_BASE` (as
/// Docker's userns-remap does), so no per-sandbox copy or id-mapped mount is needed.
pub mod uid_map {
    /// The host uid/gid that sandbox uid/gid 0 maps to.
    pub const HOST_BASE: u32 = 1_000_000_000;
    /// How many consecutive ids are mapped.
    pub const RANGE: u32 = 65_536;
}
