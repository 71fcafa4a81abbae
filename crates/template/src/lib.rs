//! Templates: the read-only root filesystems sandboxes start from.
//!
//! This crate owns two things:
//!
//! - **Building** a template from a built-in [`Recipe`] ([`recipe::BASE`],
//!   [`recipe::CODE_INTERPRETER`]): `debootstrap` a Debian root filesystem from the host's
//!   mirror, configure and trim it in a chroot, shift every owner into the sandboxes'
//!   user-namespace range ([`shift_ownership`]), and install it atomically ([`build`],
//!   [`build_base`]).
//! - **Layers**: a recipe with a parent is built as a delta on the parent's template
//!   (`apt-get install` in an overlay of the parent's layers; see the `layer` module and
//!   [`shift_layer_ownership`]). Sandboxes mount all layers of a template, top first
//!   ([`Template::layers`]).
//! - **Images**: a template can also come from a container image on disk (an OCI
//!   layout, an OCI archive or a `docker save` archive; see [`oci`] and
//!   [`build_from_image`]) or in a registry (pulled into a blob cache shared by all
//!   templates; see [`registry`]): its layers are verified and unpacked into `rootfs/`,
//!   then shifted and installed like a recipe's.
//! - **One pipeline**: [`build_template`] builds either kind of [`TemplateSource`]
//!   (recipe or image), reporting the job phases of [`BuildPhase`]; the CLI and the
//!   daemon's build jobs both go through it.
//! - **Services**: the image config's entrypoint, cmd, env, working directory and user,
//!   with the build's overrides, become the template's service and environment
//!   ([`run_config`], [`SandboxDefaults`]).
//! - **Storing** templates on disk and finding them again, by name or alias
//!   ([`TemplateStore`]).
//!
//! On-disk layout, inside the data directory (see [`cubicle_core::DataDir`]):
//!
//! ```text
//! <data>/templates/
//!   .lock                          flock(2)ed by builds and removals (one at a time)
//!   <name>/                        an installed template (renamed into place whole)
//!     template.json                TemplateMeta; written last, its absence means "not a template"
//!     rootfs/                      the root filesystem, every uid/gid shifted by uid_shift;
//!                                  for a layered template only its delta (with whiteouts
//!                                  and user.overlay.* attributes) on its parent's layers
//!   .build-<name>-<random>/        a build in progress; removed on failure, or by the
//!     rootfs/                      next build if the process died
//!     work/ merged/                (layers) the overlay's work dir and mount point
//!   .old-<name>-<random>/          a replaced or removed template being deleted (by the
//!                                  daemon on a thread of its own; a leftover goes with
//!                                  the next build or daemon start)
//! <data>/cache/debootstrap/        downloaded .debs, reused by later builds
//! <data>/cache/apt/<suite>/        .debs downloaded by layer builds, reused likewise
//! <data>/cache/blobs/sha256/<hex>  image blobs pulled from registries, by digest (mode
//!                                  0700; `.part-*` files are downloads in progress)
//! ```
//!
//! A template is current when its `template.json` has the recipe's
//! [`hash`](Recipe::hash) and the uid shift asked for, and, for a layer, its parent is
//! still the build it was made on; building a current template returns
//! [`BuildOutcome::UpToDate`] at once. A layered recipe's hash includes its parent's, so
//! a changed parent recipe makes its children outdated too.

mod build;
mod error;
mod from_image;
mod layer;
mod meta;
pub mod mirror;
pub mod oci;
pub mod pipeline;
pub mod recipe;
pub mod registry;
pub mod run_config;
mod shift;
mod store;

pub use build::{
    build, build_base, BuildEvent, BuildOptions, BuildOutcome, BuildPhase, LayerProgress,
    LayerStage, BUILD_STEPS, PROGRESS_EVERY,
};
pub use error::TemplateError;
pub use from_image::{
    build_from_image, ImageBuildRequest, RegistryAuth, RunOverrides, IMAGE_BUILD_STEPS,
    IMAGE_RECIPE,
};
pub use meta::{
    parse_rfc3339_utc, rfc3339_utc, Probe, SandboxDefaults, Service, Template, TemplateMeta,
};
pub use pipeline::{build_template, TemplateSource};
pub use recipe::Recipe;
pub use shift::{
    is_opaque, layer_id, measure, shift_layer_ownership, shift_ownership, LayerStats, TreeStats,
};
pub use store::{TemplateStore, META_FILE, ROOTFS_DIR};
