//! Templates: the read-only root filesystems sandboxes start from.
//!
//! This crate owns two things:
//!
//! - **Building** a template from a built-in [`Recipe`] (for now only [`recipe::BASE`]):
//!   `debootstrap` a Debian root filesystem from the host's mirror, configure and trim
//!   it in a chroot, shift every owner into the sandboxes' user-namespace range
//!   ([`shift_ownership`]), and install it atomically ([`build`], [`build_base`]).
//! - **Storing** templates on disk and finding them again ([`TemplateStore`]).
//!
//! On-disk layout, inside the data directory (see [`cubicle_core::DataDir`]):
//!
//! ```text
//! <data>/templates/
//!   .lock                          flock(2)ed by builds and removals (one at a time)
//!   <name>/                        an installed template (renamed into place whole)
//!     template.json                TemplateMeta; written last, its absence means "not a template"
//!     rootfs/                      the root filesystem, every uid/gid shifted by uid_shift
//!   .build-<name>-<random>/        a build in progress; removed on failure, or by the
//!     rootfs/                      next build if the process died
//!   .old-<name>-<random>/          a replaced or removed template being deleted
//! <data>/cache/debootstrap/        downloaded .debs, reused by later builds
//! ```
//!
//! A template is current when its `template.json` has the recipe's
//! [`hash`](Recipe::hash) and the uid shift asked for; building a current template
//! returns [`BuildOutcome::UpToDate`] at once.

mod build;
mod error;
mod meta;
pub mod mirror;
pub mod recipe;
mod shift;
mod store;

pub use build::{build, build_base, BuildEvent, BuildOptions, BuildOutcome, BUILD_STEPS};
pub use error::TemplateError;
pub use meta::{parse_rfc3339_utc, rfc3339_utc, Template, TemplateMeta};
pub use recipe::Recipe;
pub use shift::{measure, shift_ownership, TreeStats};
pub use store::{TemplateStore, META_FILE, ROOTFS_DIR};
