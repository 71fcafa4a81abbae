//! Building a template from a container image on disk (see [`crate::oci`]), through the
//! same store, uid shift and metadata as the built-in recipes.

use std::time::Instant;

use cubicle_core::TemplateName;
use sha2::{Digest as _, Sha256};

use crate::build::{BuildEvent, BuildOutcome, BuildPhase};
use crate::error::{IoContext, TemplateError};
use crate::meta::SandboxDefaults;
use crate::meta::{now_unix, rfc3339_utc, Template, TemplateMeta};
use crate::oci::{prepare_userland, unpack_image, ImageConfig, ImageError};
use crate::recipe::Recipe;
use crate::registry::{image_source, pull, BlobCache, ImageSource};
use crate::run_config;
use crate::shift::shift_ownership;
use crate::store::{remove_tree, TemplateStore, ROOTFS_DIR};

/// What [`TemplateMeta::recipe`] says of a template built from an image.
pub const IMAGE_RECIPE: &str = "image";

/// What `cubicle tpl create-from-image` (or the API) asks to build.
///
/// Serializable so that a build job can record it (and a rebuild repeat it); the
/// registry credentials are never serialized.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ImageBuildRequest {
    /// The image: a path on disk (OCI layout directory, OCI archive, `docker save`
    /// archive) or a registry reference (`host[:port]/repo[:tag]`,
    /// `host[:port]/repo@sha256:<hex>`); [`crate::registry::image_source`] tells which.
    pub image: String,
    /// Credentials for the registry, if it needs them (registry images only; never
    /// serialized).
    #[serde(skip)]
    pub registry_auth: Option<RegistryAuth>,
    /// What replaces the image config's run-time defaults.
    pub overrides: RunOverrides,
    /// The template's sandbox defaults asked for (CPU, memory, writable-layer size,
    /// exposed ports, probe). Its `env` and `service` are derived from the image and
    /// `overrides` by the build.
    pub defaults: crate::SandboxDefaults,
}

/// A registry user name and password (`--registry-username`, `--registry-password`).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RegistryAuth {
    /// User name.
    pub username: String,
    /// Password or token.
    pub password: String,
}

impl std::fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryAuth")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Overrides of the image config (`--cmd`, `--arg`, `--env`, `--workdir`, `--user`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct RunOverrides {
    /// Replaces the image's `Entrypoint` (and drops its `Cmd` unless `args` is given).
    pub cmd: Option<String>,
    /// Replace the image's `Cmd`, when not empty.
    pub args: Vec<String>,
    /// Added to (or replacing entries of) the image's `Env`, in order.
    pub env: Vec<(String, String)>,
    /// Replaces the image's `WorkingDir`.
    pub workdir: Option<String>,
    /// Replaces the image's `User`.
    pub user: Option<String>,
}

/// Builds the template `name` from the image `request.image` names (an OCI layout
/// directory, an OCI archive, a `docker save` archive, or an image in a registry, pulled
/// through the blob cache `<data>/cache/blobs`) and installs it atomically.
///
/// Reports [`BuildPhase::Pulling`] (registry images), [`BuildPhase::Unpacking`] and
/// [`BuildPhase::Building`], and per-layer [`BuildEvent::LayerProgress`] while downloading, verifying and
/// unpacking.
///
/// Refuses a name that is taken, or that of a built-in template. The image must have an
/// executable `/bin/sh`; the account `user` (uid 1000) is added if it lacks one. Needs
/// root (ownership is kept from the layers, then shifted by `uid_shift`).
pub fn build_from_image(
    store: &TemplateStore,
    request: &ImageBuildRequest,
    name: &TemplateName,
    uid_shift: u32,
    on_event: &mut dyn FnMut(BuildEvent),
) -> Result<Template, TemplateError> {
    build_image(store, request, name, uid_shift, false, on_event).map(|o| match o {
        BuildOutcome::Built(t) | BuildOutcome::UpToDate(t) => t,
    })
}

/// [`build_from_image`], or with `replace` a rebuild of the image template `name`: the
/// new build replaces it atomically (a failed one leaves it as it was).
pub(crate) fn build_image(
    store: &TemplateStore,
    request: &ImageBuildRequest,
    name: &TemplateName,
    uid_shift: u32,
    replace: bool,
    on_event: &mut dyn FnMut(BuildEvent),
) -> Result<BuildOutcome, TemplateError> {
    if Recipe::builtin(name.as_str()).is_ok() {
        return Err(TemplateError::Exists {
            name: name.to_string(),
            reason: "is the name of a built-in template".into(),
        });
    }
    if let Some(mib) = request.defaults.writable_layer_mib {
        cubicle_core::Limits::check_writable_layer_mib(mib)
            .map_err(TemplateError::InvalidDefaults)?;
    }
    // Checked again under the store lock; this is to fail before reading the image.
    if !replace && store.data_dir().template(name).exists() {
        return Err(TemplateError::Exists {
            name: name.to_string(),
            reason: format!("exists already; remove it first with `cubicle tpl rm {name}`"),
        });
    }
    let uid = nix::unistd::geteuid();
    if !uid.is_root() {
        return Err(TemplateError::NotRoot { uid: uid.as_raw() });
    }
    let source = match image_source(&request.image)? {
        ImageSource::Path(p) => ImageSource::Path(std::path::absolute(&p).ctx("resolve", &p)?),
        registry => registry,
    };
    let started = Instant::now();
    // The hash only has to differ from every recipe's; images are never "up to date".
    let hash = {
        let mut h = Sha256::new();
        h.update(b"image\0");
        match &source {
            ImageSource::Path(p) => h.update(p.as_os_str().as_encoded_bytes()),
            ImageSource::Registry(r) => h.update(r.whole().as_bytes()),
        }
        h.update(uid_shift.to_le_bytes());
        h.update(now_unix().to_le_bytes());
        h.finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let cache = BlobCache::new(store.data_dir().blob_cache());
    let mut build = |dir: &std::path::Path, on_event: &mut dyn FnMut(BuildEvent)| {
        let rootfs = dir.join(ROOTFS_DIR);
        std::fs::create_dir(&rootfs).ctx("create directory", &rootfs)?;
        std::fs::set_permissions(&rootfs, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .ctx("chmod", &rootfs)?;
        let scratch = dir.join("image");
        let info = match &source {
            ImageSource::Path(image) => {
                on_event(BuildEvent::Phase(BuildPhase::Unpacking));
                step(on_event, 1, &format!("reading image {}", image.display()));
                let info = unpack_image(image, &scratch, &rootfs, on_event);
                if scratch.exists() {
                    remove_tree(&scratch)?;
                }
                info?
            }
            ImageSource::Registry(reference) => {
                on_event(BuildEvent::Phase(BuildPhase::Pulling));
                step(on_event, 1, &format!("pulling image {}", request.image));
                let layout = dir.join("pulled");
                let pulled = pull(
                    reference,
                    request.registry_auth.as_ref(),
                    &cache,
                    &layout,
                    on_event,
                )?;
                on_event(BuildEvent::Phase(BuildPhase::Unpacking));
                let info = unpack_image(&layout, &scratch, &rootfs, on_event);
                remove_tree(&layout)?;
                if let Err(ImageError::DigestMismatch { expected, .. }) = &info {
                    // Verified when downloaded, so the cached copy went bad since.
                    cache.forget(expected);
                }
                let mut info = info?;
                info.source = request.image.clone();
                info.format = "registry".to_owned();
                info.pinned = Some(pulled.pinned);
                info
            }
        };
        on_event(BuildEvent::Phase(BuildPhase::Building));
        step(on_event, 2, "checking the userland and the service");
        for line in prepare_userland(&rootfs)? {
            on_event(BuildEvent::Log(line));
        }
        let sandbox = sandbox_defaults(&info.config, request);
        run_config::check(&sandbox, false)?;
        for line in run_config::validate(&rootfs, &sandbox)? {
            on_event(BuildEvent::Log(line));
        }
        step(on_event, 3, &format!("shifting owners by {uid_shift}"));
        let stats = shift_ownership(&rootfs, uid_shift)?;
        step(on_event, 4, "installing");
        Ok(TemplateMeta {
            format_version: TemplateMeta::format_version_for(None),
            recipe: IMAGE_RECIPE.to_owned(),
            recipe_hash: hash.clone(),
            uid_shift,
            built_at: rfc3339_utc(now_unix()),
            size_bytes: stats.bytes,
            file_count: stats.entries,
            build_seconds: crate::build::build_seconds(started),
            mirror: String::new(),
            parent: None,
            parent_built_at: None,
            aliases: Vec::new(),
            code_interpreter: false,
            image: Some(info),
            sandbox,
        })
    };
    if replace {
        store.install(name, &hash, uid_shift, true, on_event, &mut build)
    } else {
        store
            .install_new(name, on_event, &mut build)
            .map(BuildOutcome::Built)
    }
}

/// The template's sandbox defaults: what `request` asks for, with the env and service
/// of the image config under the overrides, and the image's `ExposedPorts` when the
/// request names no port.
fn sandbox_defaults(config: &ImageConfig, request: &ImageBuildRequest) -> SandboxDefaults {
    let (env, service) = run_config::resolve(config, &request.overrides);
    let mut expose_ports = if request.defaults.expose_ports.is_empty() {
        run_config::image_ports(config, false)
    } else {
        request.defaults.expose_ports.clone()
    };
    expose_ports.sort_unstable();
    expose_ports.dedup();
    SandboxDefaults {
        env,
        service,
        expose_ports,
        ..request.defaults.clone()
    }
}

/// How many [`BuildEvent::Step`]s an image build goes through.
pub const IMAGE_BUILD_STEPS: usize = 4;

fn step(on_event: &mut dyn FnMut(BuildEvent), index: usize, title: &str) {
    crate::build::report_step(on_event, index, IMAGE_BUILD_STEPS, title);
}

#[cfg(test)]
mod tests {
    use super::*;
    use cubicle_core::DataDir;

    #[test]
    fn taken_and_builtin_names_are_refused_before_anything_is_read() {
        let tmp = tempfile::tempdir().unwrap();
        let store = TemplateStore::new(DataDir::new(tmp.path()));
        let missing = ImageBuildRequest {
            image: tmp.path().join("no-such-image").display().to_string(),
            ..Default::default()
        };
        for builtin in ["base", "code-interpreter", "code-interpreter-v1"] {
            let err = build_from_image(&store, &missing, &builtin.parse().unwrap(), 0, &mut |_| {})
                .unwrap_err();
            assert!(
                err.to_string()
                    .contains("is the name of a built-in template"),
                "{err}"
            );
            assert_eq!(err.kind(), cubicle_core::ErrorKind::Conflict);
        }
        let dir = tmp.path().join("templates/mine");
        std::fs::create_dir_all(dir.join("rootfs")).unwrap();
        let meta = serde_json::json!({
            "format_version": 1, "recipe": "image", "recipe_hash": "x", "uid_shift": 0,
            "built_at": "2026-01-01T00:00:00Z", "size_bytes": 1, "file_count": 1,
            "build_seconds": 0.1, "mirror": ""
        });
        std::fs::write(dir.join("template.json"), meta.to_string()).unwrap();
        let err = build_from_image(&store, &missing, &"mine".parse().unwrap(), 0, &mut |_| {})
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "template 'mine' exists already; remove it first with `cubicle tpl rm mine`"
        );
    }

    #[test]
    fn a_writable_layer_too_small_is_refused_before_anything_is_read() {
        let tmp = tempfile::tempdir().unwrap();
        let store = TemplateStore::new(DataDir::new(tmp.path()));
        let mut request = ImageBuildRequest {
            image: tmp.path().join("no-such-image").display().to_string(),
            ..Default::default()
        };
        request.defaults.writable_layer_mib = Some(1);
        let err = build_from_image(&store, &request, &"tiny".parse().unwrap(), 0, &mut |_| {})
            .unwrap_err();
        assert_eq!(err.kind(), cubicle_core::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("writableLayerMiB = 1"), "{err}");
    }
}
