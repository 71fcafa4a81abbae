//! Reading container images from disk and unpacking them into a root filesystem.
//!
//! Three sources are understood:
//!
//! - an **OCI image layout** directory (`oci-layout`, `index.json`, `blobs/sha256/...`);
//! - an **OCI archive**: a tar (optionally gzipped) of such a layout;
//! - a **`docker save` archive**: `manifest.json`, the image config and one tar per
//!   layer (newer Docker writes both `manifest.json` and an OCI layout; the OCI index
//!   is preferred then).
//!
//! Archives are first extracted into a scratch directory (regular files only, every
//! path checked). The manifest for linux/amd64 is picked (nested indexes are followed),
//! every blob is checked against its sha256 digest before anything is unpacked (for
//! `docker save`, whose layer files are not named by digest, each layer's uncompressed
//! content against the config's `rootfs.diff_ids`), and the layers are applied in
//! order: gzip or plain tars, OCI whiteouts (`.wh.<name>` deletes `<name>` of the lower
//! layers, `.wh..wh..opq` empties its directory of what the lower layers put there).
//!
//! No entry can write outside the root filesystem: absolute paths and `..` are refused,
//! symlinks met on the way to an entry are resolved *inside* the root filesystem (like
//! a `chroot` would), an existing file is replaced, never written through, and hard
//! links are resolved the same way. Ownership, modes, mtimes and extended attributes
//! are kept as the tar says (the build runs as root), except `*.overlay.*` attributes,
//! which would change how overlayfs reads the template and are refused.

use std::collections::{HashSet, VecDeque};
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::Instant;

use oci_spec::image::{Arch, ImageConfiguration, ImageIndex, ImageManifest, MediaType, Os};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::build::{BuildEvent, LayerProgress, LayerStage, Throttle};

/// The platform templates are built for (sandboxes run on this host's kernel).
pub const PLATFORM: &str = "linux/amd64";

/// How deep nested image indexes are followed.
const MAX_INDEX_DEPTH: usize = 4;
/// How many symlinks are followed while resolving one path (as Linux' `MAXSYMLINKS`).
const MAX_SYMLINKS: usize = 40;

/// Something wrong with an image, or with reading it.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The path is neither an OCI layout, nor an OCI or `docker save` archive.
    #[error("{path} is not an image: {reason}")]
    NotAnImage {
        /// The path given.
        path: PathBuf,
        /// What is missing.
        reason: String,
    },
    /// A manifest, index or config does not parse.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// Which document.
        what: String,
        /// The parser's complaint.
        reason: String,
    },
    /// The image has no variant for [`PLATFORM`].
    #[error(
        "the image is for {found}, not {PLATFORM}; sandboxes run on this host's {PLATFORM} kernel"
    )]
    WrongPlatform {
        /// The platforms the image has, comma separated.
        found: String,
    },
    /// A blob is not what its digest says: corrupted or tampered with.
    #[error("{what}: digest mismatch: expected {expected}, the file has sha256:{actual}")]
    DigestMismatch {
        /// The blob (e.g. `layer 2/3`).
        what: String,
        /// The digest the manifest (or config) names.
        expected: String,
        /// The sha256 of what is on disk.
        actual: String,
    },
    /// A blob the manifest names is not there.
    #[error("{what}: blob {digest} is missing from the image")]
    MissingBlob {
        /// The blob.
        what: String,
        /// Its digest.
        digest: String,
    },
    /// Something the image uses that this reader does not handle.
    #[error("{what}: {reason}")]
    Unsupported {
        /// Where.
        what: String,
        /// What.
        reason: String,
    },
    /// An entry of a layer or archive that would escape the root or is otherwise unsafe.
    #[error("{what}: refusing entry {entry:?}: {reason}")]
    UnsafeEntry {
        /// The layer or archive.
        what: String,
        /// The entry's path as the tar has it.
        entry: String,
        /// Why it is refused.
        reason: String,
    },
    /// An entry owned by an id that sandboxes do not have: it would belong to `nobody`
    /// inside, unwritable even by the sandbox's root.
    #[error(
        "{what}: entry {entry:?} is owned by {kind} {id}; sandboxes have the ids 0 to {max} \
         only, so change its owner in the image (rootless Podman refuses such images too)",
        max = cubicle_core::uid_map::RANGE - 1
    )]
    IdOutOfRange {
        /// The layer.
        what: String,
        /// The entry's path as the tar has it.
        entry: String,
        /// `uid` or `gid`.
        kind: &'static str,
        /// The id.
        id: u64,
    },
    /// Pulling the image from its registry failed.
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    /// Sandboxes need `/bin/sh` (the agent is injected, the userland is the image's).
    #[error("the image has no executable /bin/sh; sandboxes need a POSIX userland in the image")]
    NoShell,
    /// Reading the image or writing the root filesystem failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// To what.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl ImageError {
    /// Whether the error is the image's (or the caller's) fault rather than the host's.
    pub fn is_input_error(&self) -> bool {
        match self {
            ImageError::Io { .. } => false,
            ImageError::Registry(e) => e.is_input_error(),
            _ => true,
        }
    }
}

fn io_err(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> ImageError {
    let path = path.into();
    move |source| ImageError::Io { op, path, source }
}

/// The run-time defaults of an image's config, recorded in the template's metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// `Entrypoint`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entrypoint: Vec<String>,
    /// `Cmd`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cmd: Vec<String>,
    /// `Env`, `K=V` each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// `WorkingDir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// `User`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// `ExposedPorts`, e.g. `8080/tcp`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exposed_ports: Vec<String>,
}

/// Where a template's root filesystem came from, when it came from an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// The path given (absolute), or the registry reference as given.
    pub source: String,
    /// `oci-layout`, `oci-archive`, `docker-archive` or `registry`.
    pub format: String,
    /// The digest of the manifest used (OCI, registry), or of the config (`docker save`).
    pub digest: String,
    /// For a registry image, the reference pinned to the digest the tag pointed to when
    /// pulled (the index of a multi-arch image, else the manifest):
    /// `host[:port]/repo@sha256:...`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned: Option<String>,
    /// The platform unpacked, e.g. `linux/amd64`.
    pub platform: String,
    /// How many layers were applied.
    pub layers: usize,
    /// The image config's run-time defaults.
    pub config: ImageConfig,
}

/// A layer to apply, with what its file must hash to.
#[derive(Debug)]
struct LayerRef {
    path: PathBuf,
    /// `sha256:<hex>`.
    digest: String,
    /// Whether `digest` is of the decompressed tar (`docker save`'s diff ids) rather
    /// than of the file.
    of_uncompressed: bool,
    size: Option<u64>,
}

/// An image resolved to one platform, all of its documents read and verified.
#[derive(Debug)]
struct Resolved {
    format: &'static str,
    digest: String,
    config: ImageConfiguration,
    layers: Vec<LayerRef>,
}

/// Reads the image at `source` (a layout directory or an archive), verifies it and
/// unpacks its layers into `rootfs` (which must exist). Archives are extracted into
/// `scratch` (created; the caller removes it). `on_event` receives log lines (one per
/// layer as it is verified, and as it is unpacked) and each layer's
/// [`BuildEvent::LayerProgress`] while it is verified and unpacked (bytes of its blob
/// read).
pub fn unpack_image(
    source: &Path,
    scratch: &Path,
    rootfs: &Path,
    on_event: &mut dyn FnMut(BuildEvent),
) -> Result<ImageInfo, ImageError> {
    let mut log = |line: String| on_event(BuildEvent::Log(line));
    let meta = fs::metadata(source).map_err(io_err("read", source))?;
    let (dir, archive) = if meta.is_dir() {
        (source.to_path_buf(), false)
    } else {
        log(format!(
            "extracting {} ({})",
            source.display(),
            human_bytes(meta.len())
        ));
        extract_archive(source, scratch)?;
        (scratch.to_path_buf(), true)
    };
    let resolved = if dir.join("index.json").is_file() {
        let mut r = resolve_oci(&dir)?;
        if archive {
            r.format = if dir.join("manifest.json").is_file() {
                "docker-archive"
            } else {
                "oci-archive"
            };
        }
        r
    } else if dir.join("manifest.json").is_file() {
        resolve_docker(&dir)?
    } else {
        return Err(ImageError::NotAnImage {
            path: source.to_path_buf(),
            reason: "no index.json (OCI layout) nor manifest.json (docker save)".into(),
        });
    };
    let total = resolved.layers.len();
    let sizes: Vec<u64> = resolved
        .layers
        .iter()
        .map(|l| {
            fs::metadata(&l.path)
                .map(|m| m.len())
                .map_err(io_err("read", &l.path))
        })
        .collect::<Result<_, _>>()?;
    for stage in [LayerStage::Verifying, LayerStage::Unpacking] {
        for (i, layer) in resolved.layers.iter().enumerate() {
            let what = layer_name(i, total, &layer.digest);
            let size = sizes[i];
            let progress = |done: u64| {
                BuildEvent::LayerProgress(LayerProgress {
                    index: i + 1,
                    count: total,
                    digest: layer.digest.clone(),
                    stage,
                    done,
                    total: size,
                    cached: false,
                })
            };
            on_event(progress(0));
            let started = Instant::now();
            let mut report = |done: u64| on_event(progress(done));
            let tap = Tap::new(size, &mut report);
            match stage {
                LayerStage::Unpacking => apply_layer(rootfs, &layer.path, &what, tap)?,
                _ => verify_layer(layer, &what, tap)?,
            }
            on_event(progress(size));
            on_event(BuildEvent::Log(format!(
                "{what}: {} {} in {:.1} s",
                match stage {
                    LayerStage::Unpacking => "unpacked",
                    _ => "verified",
                },
                human_bytes(size),
                started.elapsed().as_secs_f64()
            )));
        }
    }
    let config = resolved
        .config
        .config()
        .as_ref()
        .map(|c| ImageConfig {
            entrypoint: c.entrypoint().clone().unwrap_or_default(),
            cmd: c.cmd().clone().unwrap_or_default(),
            env: c.env().clone().unwrap_or_default(),
            working_dir: c.working_dir().clone().filter(|s| !s.is_empty()),
            user: c.user().clone().filter(|s| !s.is_empty()),
            exposed_ports: c.exposed_ports().clone().unwrap_or_default(),
        })
        .unwrap_or_default();
    Ok(ImageInfo {
        source: source.display().to_string(),
        format: resolved.format.to_owned(),
        digest: resolved.digest,
        pinned: None,
        platform: PLATFORM.to_owned(),
        layers: total,
        config,
    })
}

pub(crate) fn layer_name(i: usize, total: usize, digest: &str) -> String {
    let short: String = digest.chars().take(7 + 12).collect();
    format!("layer {}/{total} ({short})", i + 1)
}

/// The hex part of a `sha256:<64 hex>` digest, which is safe to use as a file name.
pub(crate) fn sha256_hex<'a>(digest: &'a str, what: &str) -> Result<&'a str, ImageError> {
    match digest.strip_prefix("sha256:") {
        Some(hex)
            if hex.len() == 64
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) =>
        {
            Ok(hex)
        }
        _ => Err(ImageError::Unsupported {
            what: what.to_owned(),
            reason: format!("digest {digest:?} is not sha256:<64 hex digits>"),
        }),
    }
}

fn blob_path(dir: &Path, digest: &str, what: &str) -> Result<PathBuf, ImageError> {
    let hex = sha256_hex(digest, what)?;
    let path = dir.join("blobs/sha256").join(hex);
    if !path.is_file() {
        return Err(ImageError::MissingBlob {
            what: what.to_owned(),
            digest: digest.to_owned(),
        });
    }
    Ok(path)
}

/// Reads a (small) blob and checks its digest and size.
fn read_blob(dir: &Path, digest: &str, size: u64, what: &str) -> Result<Vec<u8>, ImageError> {
    let path = blob_path(dir, digest, what)?;
    let data = fs::read(&path).map_err(io_err("read", &path))?;
    check_digest(&data, digest, what)?;
    if data.len() as u64 != size {
        return Err(ImageError::DigestMismatch {
            what: format!("{what} (size {} instead of {size})", data.len()),
            expected: digest.to_owned(),
            actual: hex(&Sha256::digest(&data)),
        });
    }
    Ok(data)
}

pub(crate) fn check_digest(data: &[u8], digest: &str, what: &str) -> Result<(), ImageError> {
    let expected = sha256_hex(digest, what)?;
    let actual = hex(&Sha256::digest(data));
    if actual != expected {
        return Err(ImageError::DigestMismatch {
            what: what.to_owned(),
            expected: digest.to_owned(),
            actual,
        });
    }
    Ok(())
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn invalid(
    what: impl Into<String>,
) -> impl FnOnce(oci_spec::OciSpecError) -> ImageError {
    let what = what.into();
    move |e| ImageError::Invalid {
        what,
        reason: e.to_string(),
    }
}

fn platform_of(config: &ImageConfiguration) -> (Os, Arch) {
    (config.os().clone(), config.architecture().clone())
}

fn is_ours(os: &Os, arch: &Arch) -> bool {
    *os == Os::Linux && *arch == Arch::Amd64
}

pub(crate) fn is_index(mt: &MediaType) -> bool {
    match mt {
        MediaType::ImageIndex => true,
        MediaType::Other(s) => s == "application/vnd.docker.distribution.manifest.list.v2+json",
        _ => false,
    }
}

/// Where an image's manifests, indexes and configs are read from: an OCI layout on disk
/// or a registry ([`crate::registry`]). Every document returned is verified against its
/// digest and size.
pub(crate) trait Documents {
    /// The manifest or index `digest`.
    fn manifest(&mut self, digest: &str, size: u64, what: &str) -> Result<Vec<u8>, ImageError>;
    /// The blob `digest` (an image config).
    fn blob(&mut self, digest: &str, size: u64, what: &str) -> Result<Vec<u8>, ImageError>;
}

/// The documents of an OCI layout directory.
struct Layout<'a>(&'a Path);

impl Documents for Layout<'_> {
    fn manifest(&mut self, digest: &str, size: u64, what: &str) -> Result<Vec<u8>, ImageError> {
        read_blob(self.0, digest, size, what)
    }

    fn blob(&mut self, digest: &str, size: u64, what: &str) -> Result<Vec<u8>, ImageError> {
        read_blob(self.0, digest, size, what)
    }
}

/// Picks the linux/amd64 manifest of an OCI layout and reads its config.
fn resolve_oci(dir: &Path) -> Result<Resolved, ImageError> {
    let path = dir.join("index.json");
    let data = fs::read(&path).map_err(io_err("read", &path))?;
    let index = ImageIndex::from_reader(&data[..]).map_err(invalid("index.json"))?;
    let mut found = Vec::new();
    let picked = pick_in_index(&mut Layout(dir), &index, 0, &mut found)?;
    let Some((digest, manifest, config)) = picked else {
        return Err(if found.is_empty() {
            ImageError::NotAnImage {
                path: dir.to_path_buf(),
                reason: "index.json lists no image manifest".into(),
            }
        } else {
            wrong_platform(found)
        });
    };
    let total = manifest.layers().len();
    check_layers(&manifest, &config)?;
    let mut layers = Vec::with_capacity(total);
    for (i, l) in manifest.layers().iter().enumerate() {
        let digest = l.digest().to_string();
        let what = layer_name(i, total, &digest);
        layers.push(LayerRef {
            path: blob_path(dir, &digest, &what)?,
            digest,
            of_uncompressed: false,
            size: Some(l.size()),
        });
    }
    Ok(Resolved {
        format: "oci-layout",
        digest,
        config,
        layers,
    })
}

/// The error for an image none of whose variants is for [`PLATFORM`]; `found` lists
/// the platforms seen.
pub(crate) fn wrong_platform(mut found: Vec<String>) -> ImageError {
    found.dedup();
    ImageError::WrongPlatform {
        found: found.join(", "),
    }
}

/// Checks that a manifest's layers match its config's diff ids and are of a media type
/// [`unpack_image`] reads, before anything is fetched or unpacked.
pub(crate) fn check_layers(
    manifest: &ImageManifest,
    config: &ImageConfiguration,
) -> Result<(), ImageError> {
    let diff_ids = config.rootfs().diff_ids().len();
    if diff_ids != manifest.layers().len() {
        return Err(ImageError::Invalid {
            what: "image config".into(),
            reason: format!("{diff_ids} diff ids for {} layers", manifest.layers().len()),
        });
    }
    let total = manifest.layers().len();
    for (i, l) in manifest.layers().iter().enumerate() {
        if let MediaType::Other(mt) = l.media_type() {
            if mt.contains("zstd") {
                return Err(ImageError::Unsupported {
                    what: layer_name(i, total, l.digest().as_ref()),
                    reason: format!("media type {mt} (only plain and gzip tars are read)"),
                });
            }
        }
    }
    Ok(())
}

/// A manifest picked for [`PLATFORM`]: its digest, itself and its config.
pub(crate) type Picked = (String, ImageManifest, ImageConfiguration);

/// Finds the [`PLATFORM`] manifest in `index` (following nested indexes); platforms
/// passed over are added to `found`.
pub(crate) fn pick_in_index(
    docs: &mut dyn Documents,
    index: &ImageIndex,
    depth: usize,
    found: &mut Vec<String>,
) -> Result<Option<Picked>, ImageError> {
    for desc in index.manifests() {
        let digest = desc.digest().to_string();
        if is_index(desc.media_type()) {
            if depth >= MAX_INDEX_DEPTH {
                return Err(ImageError::Unsupported {
                    what: "image index".into(),
                    reason: format!("indexes nested deeper than {MAX_INDEX_DEPTH}"),
                });
            }
            let what = format!("image index {digest}");
            let data = docs.manifest(&digest, desc.size(), &what)?;
            let nested = ImageIndex::from_reader(&data[..]).map_err(invalid(what))?;
            if let Some(p) = pick_in_index(docs, &nested, depth + 1, found)? {
                return Ok(Some(p));
            }
            continue;
        }
        if let Some(p) = desc.platform() {
            if !is_ours(p.os(), p.architecture()) {
                found.push(format!("{}/{}", p.os(), p.architecture()));
                continue;
            }
        }
        let what = format!("manifest {digest}");
        let data = docs.manifest(&digest, desc.size(), &what)?;
        if let Some(p) = pick_manifest(docs, &digest, &data, found)? {
            return Ok(Some(p));
        }
    }
    Ok(None)
}

/// Reads the manifest `digest` (its bytes `data`, verified) and its config; `None` (and
/// the platform added to `found`) if the config is for another platform.
pub(crate) fn pick_manifest(
    docs: &mut dyn Documents,
    digest: &str,
    data: &[u8],
    found: &mut Vec<String>,
) -> Result<Option<Picked>, ImageError> {
    let manifest =
        ImageManifest::from_reader(data).map_err(invalid(format!("manifest {digest}")))?;
    let cdesc = manifest.config();
    let cdigest = cdesc.digest().to_string();
    let what = format!("image config {cdigest}");
    let data = docs.blob(&cdigest, cdesc.size(), &what)?;
    let config = ImageConfiguration::from_reader(&data[..]).map_err(invalid(what))?;
    let (os, arch) = platform_of(&config);
    if !is_ours(&os, &arch) {
        found.push(format!("{os}/{arch}"));
        return Ok(None);
    }
    Ok(Some((digest.to_owned(), manifest, config)))
}

/// One image of a `docker save` `manifest.json`.
#[derive(Debug, Deserialize)]
struct DockerManifest {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "Layers", default)]
    layers: Vec<String>,
}

/// Reads a `docker save` directory: the first linux/amd64 image of `manifest.json`.
fn resolve_docker(dir: &Path) -> Result<Resolved, ImageError> {
    let path = dir.join("manifest.json");
    let data = fs::read(&path).map_err(io_err("read", &path))?;
    let images: Vec<DockerManifest> =
        serde_json::from_slice(&data).map_err(|e| ImageError::Invalid {
            what: "manifest.json".into(),
            reason: e.to_string(),
        })?;
    let mut found = Vec::new();
    for image in images {
        let what = format!("image config {}", image.config);
        let rel =
            clean_relative(Path::new(&image.config)).map_err(|reason| ImageError::UnsafeEntry {
                what: "manifest.json".into(),
                entry: image.config.clone(),
                reason,
            })?;
        let cpath = dir.join(&rel);
        let data = fs::read(&cpath).map_err(io_err("read", &cpath))?;
        // Config files are named by their digest: `<hex>.json` or `blobs/sha256/<hex>`.
        let stem = rel
            .file_name()
            .and_then(|n| n.to_str())
            .map(|n| n.trim_end_matches(".json"))
            .unwrap_or("");
        let digest = format!("sha256:{stem}");
        if sha256_hex(&digest, &what).is_err() {
            return Err(ImageError::Unsupported {
                what,
                reason:
                    "the config file is not named by its sha256 digest, so it cannot be verified"
                        .into(),
            });
        }
        check_digest(&data, &digest, &what)?;
        let config = ImageConfiguration::from_reader(&data[..]).map_err(invalid(what))?;
        let (os, arch) = platform_of(&config);
        if !is_ours(&os, &arch) {
            found.push(format!("{os}/{arch}"));
            continue;
        }
        let diff_ids = config.rootfs().diff_ids().clone();
        if diff_ids.len() != image.layers.len() {
            return Err(ImageError::Invalid {
                what: "image config".into(),
                reason: format!(
                    "{} diff ids for {} layers",
                    diff_ids.len(),
                    image.layers.len()
                ),
            });
        }
        let mut layers = Vec::new();
        for (layer, diff_id) in image.layers.iter().zip(diff_ids) {
            let rel =
                clean_relative(Path::new(layer)).map_err(|reason| ImageError::UnsafeEntry {
                    what: "manifest.json".into(),
                    entry: layer.clone(),
                    reason,
                })?;
            let path = dir.join(rel);
            if !path.is_file() {
                return Err(ImageError::MissingBlob {
                    what: format!("layer {layer}"),
                    digest: diff_id,
                });
            }
            layers.push(LayerRef {
                path,
                digest: diff_id,
                of_uncompressed: true,
                size: None,
            });
        }
        return Ok(Resolved {
            format: "docker-archive",
            digest,
            config,
            layers,
        });
    }
    if found.is_empty() {
        return Err(ImageError::NotAnImage {
            path: dir.to_path_buf(),
            reason: "manifest.json lists no image".into(),
        });
    }
    Err(wrong_platform(found))
}

/// A reader that hashes what passes through it.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

/// Reports how many bytes of a layer's file were read so far, at most every
/// [`crate::build::PROGRESS_EVERY`] (the first and last reports are the caller's).
struct Tap<'a> {
    done: u64,
    total: u64,
    throttle: Throttle,
    report: &'a mut dyn FnMut(u64),
}

impl<'a> Tap<'a> {
    fn new(total: u64, report: &'a mut dyn FnMut(u64)) -> Self {
        Tap {
            done: 0,
            total,
            throttle: Throttle::new(),
            report,
        }
    }

    /// Counts `n` more bytes read.
    fn read(&mut self, n: usize) {
        self.done += n as u64;
        if self.done < self.total && self.throttle.due() {
            (self.report)(self.done);
        }
    }
}

/// A layer file's reader (buffered), counting what is read from it into a [`Tap`].
struct Tapped<'a> {
    inner: BufReader<File>,
    tap: Tap<'a>,
}

impl Read for Tapped<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.tap.read(n);
        Ok(n)
    }
}

/// Opens a layer file, decompressing it if it is gzipped (by its magic number) and
/// `decompress`; the bytes read from the file go to `tap`.
fn open_layer<'a>(
    path: &Path,
    what: &str,
    decompress: bool,
    tap: Tap<'a>,
) -> Result<Box<dyn Read + 'a>, ImageError> {
    let mut file = File::open(path).map_err(io_err("open", path))?;
    let mut magic = [0u8; 4];
    let n = read_fully(&mut file, &mut magic).map_err(io_err("read", path))?;
    let file = Tapped {
        inner: BufReader::new(File::open(path).map_err(io_err("open", path))?),
        tap,
    };
    if !decompress {
        return Ok(Box::new(file));
    }
    match &magic[..n] {
        [0x1f, 0x8b, ..] => Ok(Box::new(flate2::read::MultiGzDecoder::new(file))),
        [0x28, 0xb5, 0x2f, 0xfd] => Err(ImageError::Unsupported {
            what: what.to_owned(),
            reason: "zstd-compressed layers are not supported (only plain and gzip tars)".into(),
        }),
        _ => Ok(Box::new(file)),
    }
}

fn read_fully(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Checks a layer file against its digest before anything of it is unpacked.
fn verify_layer(layer: &LayerRef, what: &str, tap: Tap<'_>) -> Result<(), ImageError> {
    let reader = open_layer(&layer.path, what, layer.of_uncompressed, tap)?;
    let mut hashing = Hashing {
        inner: reader,
        hasher: Sha256::new(),
        bytes: 0,
    };
    io::copy(&mut hashing, &mut io::sink()).map_err(io_err("read", &layer.path))?;
    let actual = hex(&hashing.hasher.finalize());
    let expected = sha256_hex(&layer.digest, what)?;
    if actual != expected {
        return Err(ImageError::DigestMismatch {
            what: what.to_owned(),
            expected: layer.digest.clone(),
            actual,
        });
    }
    if let Some(size) = layer.size {
        if size != hashing.bytes {
            return Err(ImageError::DigestMismatch {
                what: format!("{what} (size {} instead of {size})", hashing.bytes),
                expected: layer.digest.clone(),
                actual,
            });
        }
    }
    Ok(())
}

/// `path` as plain relative components: `.` dropped, absolute paths and `..` refused.
fn clean_relative(path: &Path) -> Result<PathBuf, String> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => return Err("'..' would escape the root".into()),
            Component::RootDir | Component::Prefix(_) => {
                return Err("absolute paths are not allowed".into())
            }
        }
    }
    Ok(out)
}

/// Resolves `rel` (relative; `..` stops at `root`) inside `root` as if `root` were `/`: every symlink
/// met is followed within `root` (an absolute target starts again at `root`, `..` stops
/// at it). Missing directories are created (mode 0755) when `create`; otherwise a
/// missing component gives `Ok(None)`. Returns a host path inside `root` whose every
/// component is a real directory (or, for the last one, whatever is there).
pub(crate) fn resolve_in_root(
    root: &Path,
    rel: &Path,
    create: bool,
) -> Result<Option<PathBuf>, String> {
    let mut pending: VecDeque<OsString> = rel
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_owned()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    let mut stack: Vec<OsString> = Vec::new();
    let mut hops = 0;
    while let Some(c) = pending.pop_front() {
        if c == ".." {
            stack.pop();
            continue;
        }
        if c == "." || c.is_empty() {
            continue;
        }
        let mut here = root.to_path_buf();
        here.extend(&stack);
        here.push(&c);
        match fs::symlink_metadata(&here) {
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                if hops > MAX_SYMLINKS {
                    return Err(format!("too many levels of symlinks at {}", here.display()));
                }
                let target = fs::read_link(&here).map_err(|e| format!("readlink: {e}"))?;
                if target.is_absolute() {
                    stack.clear();
                }
                for t in target.components().rev() {
                    if let Component::Normal(n) = t {
                        pending.push_front(n.to_owned());
                    } else if t == Component::ParentDir {
                        pending.push_front("..".into());
                    }
                }
            }
            Ok(m) if m.is_dir() => stack.push(c),
            Ok(_) if pending.is_empty() => stack.push(c),
            Ok(_) => return Err(format!("{} is not a directory", here.display())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if !create {
                    return Ok(None);
                }
                fs::DirBuilder::new()
                    .mode(0o755)
                    .create(&here)
                    .map_err(|e| format!("mkdir {}: {e}", here.display()))?;
                stack.push(c);
            }
            Err(e) => return Err(format!("stat {}: {e}", here.display())),
        }
    }
    let mut out = root.to_path_buf();
    out.extend(&stack);
    Ok(Some(out))
}

/// Removes whatever is at `path` (a directory recursively), never following symlinks.
fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes everything below `host_dir` that this layer did not write (`written`, paths
/// relative to the root as `rel_dir` is).
fn prune_lower(host_dir: &Path, rel_dir: &Path, written: &HashSet<PathBuf>) -> io::Result<()> {
    for entry in fs::read_dir(host_dir)? {
        let entry = entry?;
        let rel = rel_dir.join(entry.file_name());
        if !written.contains(&rel) {
            remove_any(&entry.path())?;
        } else if entry.file_type()?.is_dir() {
            prune_lower(&entry.path(), &rel, written)?;
        }
    }
    Ok(())
}

const OPAQUE: &str = ".wh..wh..opq";
const WHITEOUT_PREFIX: &str = ".wh.";

/// Applies one layer tar onto `root`.
fn apply_layer(root: &Path, path: &Path, what: &str, tap: Tap<'_>) -> Result<(), ImageError> {
    let mut archive = tar::Archive::new(open_layer(path, what, true, tap)?);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(true);
    archive.set_overwrite(true);
    let mut written: HashSet<PathBuf> = HashSet::new();
    let entries = archive.entries().map_err(io_err("read", path))?;
    for entry in entries {
        let mut entry = entry.map_err(io_err("read", path))?;
        let raw = entry.path().map_err(io_err("read", path))?.into_owned();
        let unsafe_entry = |reason: String| ImageError::UnsafeEntry {
            what: what.to_owned(),
            entry: raw.display().to_string(),
            reason,
        };
        let rel = clean_relative(&raw).map_err(unsafe_entry)?;
        let Some(name) = rel.file_name().map(|n| n.to_owned()) else {
            continue; // the root itself: keep the root filesystem's own mode
        };
        let parent_rel = rel.parent().unwrap_or(Path::new("")).to_path_buf();
        let name_str = name.to_string_lossy();
        if name_str == OPAQUE {
            if let Some(dir) = resolve_in_root(root, &parent_rel, false).map_err(unsafe_entry)? {
                prune_lower(&dir, &parent_rel, &written).map_err(io_err("clear", &dir))?;
            }
            continue;
        }
        if let Some(hidden) = name_str.strip_prefix(WHITEOUT_PREFIX) {
            if hidden.is_empty() || hidden == "." || hidden == ".." {
                return Err(unsafe_entry("a whiteout of nothing".into()));
            }
            if let Some(dir) = resolve_in_root(root, &parent_rel, false).map_err(unsafe_entry)? {
                let victim = dir.join(hidden);
                remove_any(&victim).map_err(io_err("delete", &victim))?;
            }
            continue;
        }
        if let Some(exts) = entry.pax_extensions().map_err(io_err("read", path))? {
            for ext in exts {
                let ext = ext.map_err(io_err("read", path))?;
                let key = ext.key().unwrap_or("");
                if key.starts_with("SCHILY.xattr.") && key.contains(".overlay.") {
                    return Err(unsafe_entry(format!(
                        "extended attribute {} would change how overlayfs reads the template",
                        key.trim_start_matches("SCHILY.xattr.")
                    )));
                }
            }
        }
        let header = entry.header();
        for (kind, id) in [("uid", header.uid()), ("gid", header.gid())] {
            let id = id.map_err(io_err("read", path))?;
            if id >= u64::from(cubicle_core::uid_map::RANGE) {
                return Err(ImageError::IdOutOfRange {
                    what: what.to_owned(),
                    entry: raw.display().to_string(),
                    kind,
                    id,
                });
            }
        }
        let parent = resolve_in_root(root, &parent_rel, true)
            .map_err(unsafe_entry)?
            .unwrap_or_else(|| root.to_path_buf());
        let target = parent.join(&name);
        let kind = entry.header().entry_type();
        let existing = fs::symlink_metadata(&target).ok();
        if let Some(m) = existing {
            if !(m.is_dir() && kind.is_dir()) {
                remove_any(&target).map_err(io_err("replace", &target))?;
            }
        }
        if kind.is_hard_link() {
            let link = entry
                .link_name()
                .map_err(io_err("read", path))?
                .ok_or_else(|| unsafe_entry("a hard link without a target".into()))?
                .into_owned();
            let link_rel = clean_relative(&link).map_err(unsafe_entry)?;
            let link_parent = link_rel.parent().unwrap_or(Path::new(""));
            let src = resolve_in_root(root, link_parent, false)
                .map_err(unsafe_entry)?
                .zip(link_rel.file_name())
                .map(|(d, n)| d.join(n))
                .ok_or_else(|| unsafe_entry(format!("its target {link:?} does not exist")))?;
            fs::hard_link(&src, &target).map_err(io_err("link", &target))?;
        } else if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
            // The tar crate would write these as empty regular files.
            make_node(&entry, &target).map_err(io_err("mknod", &target))?;
        } else {
            entry.unpack(&target).map_err(io_err("unpack", &target))?;
        }
        written.insert(rel);
    }
    Ok(())
}

/// Creates the device node or fifo `entry` describes at `target`, with its owner and mode.
fn make_node<R: Read>(entry: &tar::Entry<'_, R>, target: &Path) -> io::Result<()> {
    use nix::sys::stat::{makedev, mknod, Mode, SFlag};
    let h = entry.header();
    let kind = h.entry_type();
    let sflag = if kind.is_character_special() {
        SFlag::S_IFCHR
    } else if kind.is_block_special() {
        SFlag::S_IFBLK
    } else {
        SFlag::S_IFIFO
    };
    // A fifo has no device numbers (some writers leave the fields empty).
    let dev = if sflag == SFlag::S_IFIFO {
        0
    } else {
        makedev(
            h.device_major()?.unwrap_or(0).into(),
            h.device_minor()?.unwrap_or(0).into(),
        )
    };
    let mode = h.mode()? & 0o7777;
    mknod(target, sflag, Mode::from_bits_truncate(0o600), dev)?;
    let id = |v: u64| u32::try_from(v).map_err(|_| io::Error::other("owner id out of range"));
    std::os::unix::fs::lchown(target, Some(id(h.uid()?)?), Some(id(h.gid()?)?))?;
    fs::set_permissions(target, fs::Permissions::from_mode(mode))?;
    let mtime = nix::sys::time::TimeSpec::new(i64::try_from(h.mtime()?).unwrap_or(0), 0);
    nix::sys::stat::utimensat(
        None,
        target,
        &mtime,
        &mtime,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )?;
    Ok(())
}

/// Extracts an (optionally gzipped) archive's directories and regular files into
/// `dest`; symlinks to files inside it become hard links. Nothing is written outside.
fn extract_archive(archive_path: &Path, dest: &Path) -> Result<(), ImageError> {
    let what = format!("archive {}", archive_path.display());
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dest)
        .map_err(io_err("create directory", dest))?;
    let mut unreported = |_| {};
    let tap = Tap::new(0, &mut unreported);
    let mut archive = tar::Archive::new(open_layer(archive_path, &what, true, tap)?);
    let mut links = Vec::new();
    for entry in archive.entries().map_err(io_err("read", archive_path))? {
        let mut entry = entry.map_err(io_err("read", archive_path))?;
        let raw = entry
            .path()
            .map_err(io_err("read", archive_path))?
            .into_owned();
        let unsafe_entry = |reason: String| ImageError::UnsafeEntry {
            what: what.clone(),
            entry: raw.display().to_string(),
            reason,
        };
        let rel = clean_relative(&raw).map_err(unsafe_entry)?;
        let Some(name) = rel.file_name() else {
            continue;
        };
        let kind = entry.header().entry_type();
        let parent = rel.parent().unwrap_or(Path::new(""));
        let dir = resolve_in_root(dest, parent, true)
            .map_err(unsafe_entry)?
            .unwrap_or_else(|| dest.to_path_buf());
        let target = dir.join(name);
        if kind.is_dir() {
            resolve_in_root(dest, &rel, true).map_err(unsafe_entry)?;
        } else if kind.is_file() {
            remove_any(&target).map_err(io_err("replace", &target))?;
            let mut out = File::create_new(&target).map_err(io_err("create", &target))?;
            io::copy(&mut entry, &mut out).map_err(io_err("write", &target))?;
            fs::set_permissions(&target, fs::Permissions::from_mode(0o600))
                .map_err(io_err("chmod", &target))?;
        } else if kind.is_symlink() || kind.is_hard_link() {
            let link = entry
                .link_name()
                .map_err(io_err("read", archive_path))?
                .ok_or_else(|| unsafe_entry("a link without a target".into()))?
                .into_owned();
            // A symlink's target is relative to its directory, a hard link's to the root.
            let base = if kind.is_symlink() {
                parent.to_path_buf()
            } else {
                PathBuf::new()
            };
            if link.is_absolute() {
                return Err(unsafe_entry("an absolute link target".into()));
            }
            links.push((target, base.join(link), raw.display().to_string()));
        }
        // Devices, fifos and the like have no place in an image archive: skipped.
    }
    for (target, link, entry) in links {
        let src = resolve_in_root(dest, &link, false)
            .ok()
            .flatten()
            .filter(|p| p.is_file())
            .ok_or_else(|| ImageError::UnsafeEntry {
                what: what.clone(),
                entry: entry.clone(),
                reason: format!("its target {} is not a file in the archive", link.display()),
            })?;
        remove_any(&target).map_err(io_err("replace", &target))?;
        fs::hard_link(&src, &target).map_err(io_err("link", &target))?;
    }
    Ok(())
}

/// Directories of the root every sandbox mounts something on, with the mode they get
/// when an image lacks them.
const MOUNT_POINTS: &[(&str, u32)] = &[
    ("proc", 0o555),
    ("sys", 0o555),
    ("dev", 0o755),
    ("run", 0o755),
    ("tmp", 0o1777),
];

/// Checks that `rootfs` has an executable `/bin/sh`, creates the directories the
/// runtime mounts on ([`MOUNT_POINTS`]) and adds the account `user` (uid
/// and gid 1000, home `/home/user`) that sandboxes run commands as, if the image lacks
/// it. Ids are the sandbox's (before the uid shift). Returns what it did, for the log.
pub fn prepare_userland(rootfs: &Path) -> Result<Vec<String>, ImageError> {
    let mut done = Vec::new();
    let sh = resolve_in_root(rootfs, Path::new("bin/sh"), false)
        .ok()
        .flatten()
        .filter(|p| {
            fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        });
    if sh.is_none() {
        return Err(ImageError::NoShell);
    }
    // The runtime mounts /proc, /sys, /dev and /run on these and the sandbox (or a
    // template zygote, whose root is read-only) cannot create them itself.
    let mut created = Vec::new();
    for (dir, mode) in MOUNT_POINTS {
        if fs::symlink_metadata(rootfs.join(dir)).is_err() {
            let path = rootfs.join(dir);
            fs::DirBuilder::new()
                .mode(*mode)
                .create(&path)
                .map_err(io_err("create directory", &path))?;
            fs::set_permissions(&path, fs::Permissions::from_mode(*mode))
                .map_err(io_err("chmod", &path))?;
            created.push(format!("/{dir}"));
        }
    }
    if !created.is_empty() {
        done.push(format!("created the directories {}", created.join(" ")));
    }
    let etc = resolve_in_root(rootfs, Path::new("etc"), true)
        .map_err(|reason| ImageError::Unsupported {
            what: "/etc".into(),
            reason,
        })?
        .unwrap_or_else(|| rootfs.join("etc"));
    let shell = if resolve_in_root(rootfs, Path::new("bin/bash"), false)
        .ok()
        .flatten()
        .is_some_and(|p| p.is_file())
    {
        "/bin/bash"
    } else {
        "/bin/sh"
    };
    let passwd = etc.join("passwd");
    let mut text = read_or_empty(&passwd)?;
    if !text.lines().any(|l| l.starts_with("root:")) {
        append_line(&mut text, &format!("root:x:0:0:root:/root:{shell}"));
        done.push("added the account root to /etc/passwd".to_owned());
    }
    if !text.lines().any(|l| l.starts_with("user:")) {
        append_line(
            &mut text,
            &format!("user:x:1000:1000:user:/home/user:{shell}"),
        );
        done.push("added the account user (uid 1000), which sandboxes run commands as".to_owned());
    }
    write_replacing(&passwd, &text, 0o644)?;
    let group = etc.join("group");
    let mut text = read_or_empty(&group)?;
    if !text.lines().any(|l| l.starts_with("root:")) {
        append_line(&mut text, "root:x:0:");
    }
    if !text.lines().any(|l| l.starts_with("user:")) {
        append_line(&mut text, "user:x:1000:");
    }
    write_replacing(&group, &text, 0o644)?;
    if resolve_in_root(rootfs, Path::new("home/user"), false)
        .ok()
        .flatten()
        .is_none()
    {
        let home = resolve_in_root(rootfs, Path::new("home/user"), true)
            .map_err(|reason| ImageError::Unsupported {
                what: "/home/user".into(),
                reason,
            })?
            .unwrap_or_else(|| rootfs.join("home/user"));
        std::os::unix::fs::lchown(&home, Some(1000), Some(1000)).map_err(io_err("chown", &home))?;
        done.push("created /home/user".to_owned());
    }
    Ok(done)
}

fn read_or_empty(path: &Path) -> Result<String, ImageError> {
    match fs::read(path) {
        Ok(b) => Ok(String::from_utf8_lossy(&b).into_owned()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(ImageError::Io {
            op: "read",
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

fn append_line(text: &mut String, line: &str) {
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(line);
    text.push('\n');
}

/// Replaces `path` (never writing through a symlink) with `text`, keeping the mode and
/// owner of a regular file that was there.
fn write_replacing(path: &Path, text: &str, mode: u32) -> Result<(), ImageError> {
    use std::os::unix::fs::MetadataExt;
    let old = fs::symlink_metadata(path).ok();
    remove_any(path).map_err(io_err("replace", path))?;
    fs::write(path, text).map_err(io_err("write", path))?;
    let (mode, owner) = match old {
        Some(m) if m.is_file() => (m.mode() & 0o7777, Some((m.uid(), m.gid()))),
        _ => (mode, None),
    };
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err("chmod", path))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(io_err("chown", path))?;
    }
    Ok(())
}

/// `12.3 MiB`.
pub(crate) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// A fresh template name for an image: `tpl-` and 12 hex digits.
pub fn generated_template_name() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    if let Ok(d) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(d.as_nanos());
    }
    format!("tpl-{:012x}", h.finish() & 0xffff_ffff_ffff)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;
    use std::io::Write;

    /// One entry of a test tar.
    pub(crate) enum E<'a> {
        File(&'a str, &'a [u8], u32),
        Dir(&'a str),
        Symlink(&'a str, &'a str),
        HardLink(&'a str, &'a str),
        Fifo(&'a str),
    }

    fn header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        let id = nix::unistd::geteuid().as_raw();
        h.set_uid(id.into());
        h.set_gid(id.into());
        h.set_mtime(1_700_000_000);
        h
    }

    /// Sets the header's name byte for byte: the `tar` crate's builder refuses `..` and
    /// absolute paths, which is what the traversal tests need to write.
    fn set_raw_name(h: &mut tar::Header, name: &str) {
        let field = &mut h.as_old_mut().name;
        field.fill(0);
        field[..name.len()].copy_from_slice(name.as_bytes());
        h.set_cksum();
    }

    /// A tar of `entries`, with names written verbatim.
    pub(crate) fn tar_of(entries: &[E<'_>]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            match e {
                E::File(path, data, mode) => {
                    let mut h = header(tar::EntryType::Regular, data.len() as u64, *mode);
                    set_raw_name(&mut h, path);
                    b.append(&h, *data).unwrap();
                }
                E::Fifo(path) => {
                    let mut h = header(tar::EntryType::Fifo, 0, 0o620);
                    set_raw_name(&mut h, path);
                    b.append(&h, io::empty()).unwrap();
                }
                E::Dir(path) => {
                    let mut h = header(tar::EntryType::Directory, 0, 0o755);
                    set_raw_name(&mut h, path);
                    b.append(&h, io::empty()).unwrap();
                }
                E::Symlink(path, target) | E::HardLink(path, target) => {
                    let kind = if matches!(e, E::Symlink(..)) {
                        tar::EntryType::Symlink
                    } else {
                        tar::EntryType::Link
                    };
                    let mut h = header(kind, 0, 0o777);
                    h.set_link_name(target).unwrap();
                    set_raw_name(&mut h, path);
                    b.append(&h, io::empty()).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    pub(crate) fn gzip(data: &[u8]) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(data).unwrap();
        gz.finish().unwrap()
    }

    fn sha(data: &[u8]) -> String {
        format!("sha256:{}", hex(&Sha256::digest(data)))
    }

    /// Writes a blob into an OCI layout and returns its descriptor.
    fn blob(dir: &Path, media_type: &str, data: &[u8]) -> serde_json::Value {
        let digest = sha(data);
        let blobs = dir.join("blobs/sha256");
        fs::create_dir_all(&blobs).unwrap();
        fs::write(blobs.join(&digest[7..]), data).unwrap();
        json!({"mediaType": media_type, "digest": digest, "size": data.len()})
    }

    pub(crate) fn config_json(arch: &str, layers: &[&[u8]]) -> Vec<u8> {
        let diff_ids: Vec<String> = layers.iter().map(|l| sha(l)).collect();
        serde_json::to_vec(&json!({
            "architecture": arch,
            "os": "linux",
            "config": {
                "Entrypoint": ["/bin/sh", "-c"],
                "Cmd": ["cat /marker"],
                "Env": ["PATH=/usr/bin:/bin", "GREETING=hi"],
                "WorkingDir": "/srv",
                "User": "1000",
                "ExposedPorts": {"8080/tcp": {}}
            },
            "rootfs": {"type": "layers", "diff_ids": diff_ids}
        }))
        .unwrap()
    }

    /// Writes a manifest for `layers` (uncompressed tars; `gzipped` says which to store
    /// gzipped) with a config for `arch`, returns its descriptor with the platform.
    fn manifest(dir: &Path, arch: &str, layers: &[(&[u8], bool)]) -> serde_json::Value {
        let tars: Vec<&[u8]> = layers.iter().map(|(l, _)| *l).collect();
        let config = blob(
            dir,
            "application/vnd.oci.image.config.v1+json",
            &config_json(arch, &tars),
        );
        let layer_descs: Vec<serde_json::Value> = layers
            .iter()
            .map(|(l, gz)| {
                if *gz {
                    blob(dir, "application/vnd.oci.image.layer.v1.tar+gzip", &gzip(l))
                } else {
                    blob(dir, "application/vnd.oci.image.layer.v1.tar", l)
                }
            })
            .collect();
        let m = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config,
            "layers": layer_descs,
        }))
        .unwrap();
        let mut d = blob(dir, "application/vnd.oci.image.manifest.v1+json", &m);
        d["platform"] = json!({"architecture": arch, "os": "linux"});
        d
    }

    fn write_index(dir: &Path, manifests: Vec<serde_json::Value>) {
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        let index = json!({"schemaVersion": 2, "manifests": manifests});
        fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    }

    /// An OCI layout of `layers` for linux/amd64 in `dir`.
    pub(crate) fn oci_layout(dir: &Path, layers: &[(&[u8], bool)]) {
        let m = manifest(dir, "amd64", layers);
        write_index(dir, vec![m]);
    }

    /// A tar of the directory `dir` (regular files and directories).
    pub(crate) fn tar_dir(dir: &Path) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        b.follow_symlinks(false);
        b.append_dir_all(".", dir).unwrap();
        b.into_inner().unwrap()
    }

    fn lower() -> Vec<u8> {
        tar_of(&[
            E::Dir("./bin/"),
            E::File("./bin/sh", b"#!shell", 0o755),
            E::Dir("etc/"),
            E::File("etc/keep", b"kept", 0o644),
            E::File("etc/gone", b"deleted by a whiteout", 0o600),
            E::Dir("data/"),
            E::File("data/old1", b"hidden by opaque", 0o644),
            E::Dir("data/sub/"),
            E::File("data/sub/old2", b"hidden by opaque", 0o644),
            E::File("suid", b"x", 0o4755),
            E::Symlink("root-link", "/"),
            E::Symlink("up", "../../../.."),
            E::Symlink("etc/keep-link", "keep"),
        ])
    }

    fn upper() -> Vec<u8> {
        tar_of(&[
            E::File("etc/.wh.gone", b"", 0o644),
            E::Dir("data/"),
            E::File("data/new", b"new before the marker", 0o644),
            E::File("data/.wh..wh..opq", b"", 0o644),
            E::File("data/after", b"new after the marker", 0o644),
            // Through symlinks pointing out of the root: resolved inside it.
            E::File("root-link/etc/via-root", b"inside", 0o644),
            E::File("up/escaped", b"inside too", 0o644),
            // Replacing a symlink must not write through it.
            E::File("etc/keep-link", b"replaced", 0o644),
            E::HardLink("etc/hard", "etc/keep"),
            E::File("marker", b"from the image\n", 0o644),
            E::Fifo("fifo"),
        ])
    }

    fn unpack(src: &Path, tmp: &Path) -> (Result<ImageInfo, ImageError>, PathBuf, Vec<String>) {
        let (r, rootfs, events) = unpack_events(src, tmp);
        let lines = events
            .into_iter()
            .filter_map(|e| match e {
                BuildEvent::Log(l) => Some(l),
                _ => None,
            })
            .collect();
        (r, rootfs, lines)
    }

    fn unpack_events(
        src: &Path,
        tmp: &Path,
    ) -> (Result<ImageInfo, ImageError>, PathBuf, Vec<BuildEvent>) {
        let rootfs = tmp.join("rootfs");
        fs::create_dir_all(&rootfs).unwrap();
        let mut events = Vec::new();
        let r = unpack_image(src, &tmp.join("scratch"), &rootfs, &mut |e| events.push(e));
        (r, rootfs, events)
    }

    fn read(p: &Path) -> String {
        fs::read_to_string(p).unwrap()
    }

    fn assert_layers_applied(rootfs: &Path) {
        use std::os::unix::fs::MetadataExt;
        assert_eq!(read(&rootfs.join("etc/keep")), "kept");
        assert!(!rootfs.join("etc/gone").exists(), "whiteout applied");
        assert!(!rootfs.join("data/old1").exists(), "opaque dir");
        assert!(!rootfs.join("data/sub").exists(), "opaque dir");
        assert_eq!(read(&rootfs.join("data/new")), "new before the marker");
        assert_eq!(read(&rootfs.join("data/after")), "new after the marker");
        assert_eq!(read(&rootfs.join("etc/via-root")), "inside");
        assert_eq!(read(&rootfs.join("escaped")), "inside too");
        assert_eq!(read(&rootfs.join("etc/keep-link")), "replaced");
        assert!(!fs::symlink_metadata(rootfs.join("etc/keep-link"))
            .unwrap()
            .file_type()
            .is_symlink());
        let keep = fs::metadata(rootfs.join("etc/keep")).unwrap();
        let hard = fs::metadata(rootfs.join("etc/hard")).unwrap();
        assert_eq!(keep.ino(), hard.ino());
        assert_eq!(
            fs::metadata(rootfs.join("suid")).unwrap().mode() & 0o7777,
            0o4755
        );
        assert_eq!(
            fs::metadata(rootfs.join("bin/sh")).unwrap().mode() & 0o777,
            0o755
        );
        assert_eq!(
            fs::metadata(rootfs.join("marker")).unwrap().mtime(),
            1_700_000_000
        );
        let fifo = fs::symlink_metadata(rootfs.join("fifo")).unwrap();
        assert!(std::os::unix::fs::FileTypeExt::is_fifo(&fifo.file_type()));
        assert_eq!(fifo.mode() & 0o7777, 0o620);
        assert_eq!(fifo.mtime(), 1_700_000_000);
    }

    /// Nothing but `allowed` was created next to the root filesystem.
    fn assert_nothing_outside(tmp: &Path, allowed: &[&str]) {
        let mut names: Vec<String> = fs::read_dir(tmp)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names.retain(|n| !allowed.contains(&n.as_str()));
        assert!(names.is_empty(), "written outside the root: {names:?}");
    }

    #[test]
    fn multi_layer_oci_layout_with_whiteouts() {
        let tmp = tempfile::tempdir().unwrap();
        let image = tmp.path().join("image");
        fs::create_dir(&image).unwrap();
        let (l1, l2) = (lower(), upper());
        oci_layout(&image, &[(&l1, false), (&l2, true)]);
        let work = tmp.path().join("work");
        let (r, rootfs, lines) = unpack(&image, &work);
        let info = r.unwrap();
        assert_layers_applied(&rootfs);
        assert_nothing_outside(&work, &["rootfs"]);
        assert_eq!(info.format, "oci-layout");
        assert_eq!(info.layers, 2);
        assert_eq!(info.platform, "linux/amd64");
        assert_eq!(info.config.entrypoint, ["/bin/sh", "-c"]);
        assert_eq!(info.config.cmd, ["cat /marker"]);
        assert_eq!(info.config.env, ["PATH=/usr/bin:/bin", "GREETING=hi"]);
        assert_eq!(info.config.working_dir.as_deref(), Some("/srv"));
        assert_eq!(info.config.user.as_deref(), Some("1000"));
        assert_eq!(info.config.exposed_ports, ["8080/tcp"]);
        for stage in ["verified", "unpacked"] {
            assert!(
                lines
                    .iter()
                    .any(|l| l.starts_with("layer 2/2 (sha256:") && l.contains(stage)),
                "{lines:?}"
            );
        }
    }

    #[test]
    fn every_layer_reports_verifying_then_unpacking_up_to_its_size() {
        let tmp = tempfile::tempdir().unwrap();
        let image = tmp.path().join("image");
        fs::create_dir(&image).unwrap();
        // A big plain layer between two small ones, the last gzipped.
        let big = tar_of(&[E::File("big", &vec![7u8; 48 << 20], 0o644)]);
        let (l1, l3) = (lower(), upper());
        oci_layout(&image, &[(&l1, false), (&big, false), (&l3, true)]);
        let started = std::time::Instant::now();
        let (r, rootfs, events) = unpack_events(&image, &tmp.path().join("w"));
        let elapsed = started.elapsed();
        r.unwrap();
        assert_eq!(fs::metadata(rootfs.join("big")).unwrap().len(), 48 << 20);
        let progress: Vec<&LayerProgress> = events
            .iter()
            .filter_map(|e| match e {
                BuildEvent::LayerProgress(p) => Some(p),
                _ => None,
            })
            .collect();
        // Every layer is verified before any is unpacked.
        let order: Vec<(LayerStage, usize)> = progress.iter().map(|p| (p.stage, p.index)).collect();
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(order, sorted);
        let sizes = [l1.len() as u64, big.len() as u64, gzip(&l3).len() as u64];
        for stage in [LayerStage::Verifying, LayerStage::Unpacking] {
            for (i, size) in sizes.iter().enumerate() {
                let of: Vec<u64> = progress
                    .iter()
                    .filter(|p| p.stage == stage && p.index == i + 1)
                    .inspect(|p| assert_eq!((p.count, p.total, p.cached), (3, *size, false)))
                    .map(|p| p.done)
                    .collect();
                assert_eq!(of.first(), Some(&0), "{stage} {i}: {of:?}");
                assert_eq!(of.last(), Some(size), "{stage} {i}: {of:?}");
                assert!(of.windows(2).all(|w| w[0] <= w[1]), "{of:?}");
                // Throttled: start, end, and at most one per 100 ms in between.
                let most = 2 + (elapsed.as_millis() / 100) as usize;
                assert!(
                    of.len() <= most,
                    "{stage} {i}: {} events in {elapsed:?}",
                    of.len()
                );
            }
        }
    }

    #[test]
    fn oci_archive_and_docker_save_archive() {
        let tmp = tempfile::tempdir().unwrap();
        let (l1, l2) = (lower(), upper());
        // An OCI archive: a (gzipped) tar of a layout.
        let layout = tmp.path().join("layout");
        fs::create_dir(&layout).unwrap();
        oci_layout(&layout, &[(&l1, true), (&l2, false)]);
        let archive = tmp.path().join("image.oci.tar.gz");
        fs::write(&archive, gzip(&tar_dir(&layout))).unwrap();
        let (r, rootfs, _) = unpack(&archive, &tmp.path().join("w1"));
        assert_eq!(r.unwrap().format, "oci-archive");
        assert_layers_applied(&rootfs);

        // docker save (the classic format): manifest.json, <hex>.json, <id>/layer.tar.
        let save = tmp.path().join("save");
        fs::create_dir_all(save.join("aaa")).unwrap();
        fs::create_dir_all(save.join("bbb")).unwrap();
        fs::write(save.join("aaa/layer.tar"), &l1).unwrap();
        // The second layer's file is a symlink in the archive, as docker save writes
        // for a layer shared by several images.
        fs::create_dir_all(save.join("real")).unwrap();
        fs::write(save.join("real/layer.tar"), &l2).unwrap();
        std::os::unix::fs::symlink("../real/layer.tar", save.join("bbb/layer.tar")).unwrap();
        let config = config_json("amd64", &[&l1, &l2]);
        let config_name = format!("{}.json", &sha(&config)[7..]);
        fs::write(save.join(&config_name), &config).unwrap();
        let manifest = json!([{
            "Config": config_name,
            "RepoTags": ["test:latest"],
            "Layers": ["aaa/layer.tar", "bbb/layer.tar"]
        }]);
        fs::write(
            save.join("manifest.json"),
            serde_json::to_vec(&manifest).unwrap(),
        )
        .unwrap();
        let archive = tmp.path().join("saved.tar");
        fs::write(&archive, tar_dir(&save)).unwrap();
        let (r, rootfs, _) = unpack(&archive, &tmp.path().join("w2"));
        let info = r.unwrap();
        assert_eq!(info.format, "docker-archive");
        assert_eq!(info.digest, sha(&config));
        assert_layers_applied(&rootfs);

        // A corrupted docker layer is caught by the config's diff ids.
        fs::write(save.join("real/layer.tar"), &l1).unwrap();
        let archive = tmp.path().join("corrupt.tar");
        fs::write(&archive, tar_dir(&save)).unwrap();
        let (r, _, _) = unpack(&archive, &tmp.path().join("w3"));
        let err = r.unwrap_err();
        assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
        assert!(err.to_string().starts_with("layer 2/2 (sha256:"), "{err}");
    }

    #[test]
    fn digest_mismatch_names_the_layer_and_unpacks_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let image = tmp.path().join("image");
        fs::create_dir(&image).unwrap();
        let (l1, l2) = (lower(), upper());
        oci_layout(&image, &[(&l1, false), (&l2, false)]);
        let digest = sha(&l2);
        let path = image.join("blobs/sha256").join(&digest[7..]);
        let mut bad = l2.clone();
        bad[600] ^= 1;
        fs::write(&path, &bad).unwrap();
        let (r, rootfs, _) = unpack(&image, &tmp.path().join("w"));
        let err = r.unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ImageError::DigestMismatch { .. }), "{msg}");
        assert!(msg.starts_with("layer 2/2 (sha256:"), "{msg}");
        assert!(msg.contains(&digest), "{msg}");
        assert_eq!(fs::read_dir(&rootfs).unwrap().count(), 0, "verified first");
        // A missing blob is named too.
        fs::remove_file(&path).unwrap();
        let (r, _, _) = unpack(&image, &tmp.path().join("w2"));
        let err = r.unwrap_err();
        assert!(matches!(err, ImageError::MissingBlob { .. }), "{err}");
    }

    #[test]
    fn arm64_only_image_is_refused_and_a_multi_arch_index_picks_amd64() {
        let tmp = tempfile::tempdir().unwrap();
        let l1 = lower();
        let image = tmp.path().join("arm");
        fs::create_dir(&image).unwrap();
        let m = manifest(&image, "arm64", &[(&l1, true)]);
        write_index(&image, vec![m]);
        let (r, _, _) = unpack(&image, &tmp.path().join("w1"));
        let err = r.unwrap_err();
        assert!(matches!(err, ImageError::WrongPlatform { .. }), "{err}");
        assert!(err.to_string().contains("linux/arm64"), "{err}");
        assert!(err.to_string().contains("linux/amd64"), "{err}");

        // Without platform in the index, the config's architecture decides.
        let mut m = manifest(&image, "arm64", &[(&l1, true)]);
        m.as_object_mut().unwrap().remove("platform");
        write_index(&image, vec![m]);
        let (r, _, _) = unpack(&image, &tmp.path().join("w2"));
        assert!(r.unwrap_err().to_string().contains("linux/arm64"));

        let multi = tmp.path().join("multi");
        fs::create_dir(&multi).unwrap();
        let marker = tar_of(&[E::File("arch", b"amd64", 0o644)]);
        let arm = manifest(&multi, "arm64", &[(&l1, true)]);
        let amd = manifest(&multi, "amd64", &[(&marker, true)]);
        write_index(&multi, vec![arm, amd]);
        let (r, rootfs, _) = unpack(&multi, &tmp.path().join("w3"));
        r.unwrap();
        assert_eq!(read(&rootfs.join("arch")), "amd64");
        assert!(!rootfs.join("etc").exists());
    }

    #[test]
    fn traversal_entries_are_refused_and_nothing_is_written_outside() {
        let tmp = tempfile::tempdir().unwrap();
        for (i, bad) in [
            E::File("../evil", b"x", 0o644),
            E::File("ok/../../evil", b"x", 0o644),
            E::File("/evil", b"x", 0o644),
            E::HardLink("link", "../evil"),
            E::HardLink("link", "/etc/passwd"),
        ]
        .into_iter()
        .enumerate()
        {
            let image = tmp.path().join(format!("image{i}"));
            fs::create_dir(&image).unwrap();
            let layer = tar_of(&[E::File("fine", b"ok", 0o644), bad]);
            oci_layout(&image, &[(&layer, false)]);
            let work = tmp.path().join(format!("w{i}"));
            let (r, _, _) = unpack(&image, &work);
            let err = r.unwrap_err();
            assert!(matches!(err, ImageError::UnsafeEntry { .. }), "{i}: {err}");
            assert!(err.to_string().contains("layer 1/1"), "{err}");
            assert_nothing_outside(&work, &["rootfs"]);
        }
        assert!(!tmp.path().join("evil").exists());

        // The same in the archive around the image.
        let archive = tmp.path().join("bad.tar");
        fs::write(
            &archive,
            tar_of(&[
                E::File("index.json", b"{}", 0o644),
                E::File("../evil", b"x", 0o644),
            ]),
        )
        .unwrap();
        let work = tmp.path().join("wa");
        let (r, _, _) = unpack(&archive, &work);
        let err = r.unwrap_err();
        assert!(matches!(err, ImageError::UnsafeEntry { .. }), "{err}");
        assert!(err.to_string().contains("bad.tar"), "{err}");
        assert_nothing_outside(&work, &["rootfs", "scratch"]);
        assert!(!tmp.path().join("evil").exists());
    }

    #[test]
    fn entries_owned_by_ids_sandboxes_lack_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let range = u64::from(cubicle_core::uid_map::RANGE);
        for (i, (uid, gid, refused)) in [
            (range - 1, 0, None),
            (range, 0, Some("uid 65536")),
            (0, 1_000_000_000, Some("gid 1000000000")),
        ]
        .into_iter()
        .enumerate()
        {
            let image = tmp.path().join(format!("image{i}"));
            fs::create_dir(&image).unwrap();
            let mut layer = tar::Builder::new(Vec::new());
            let mut h = header(tar::EntryType::Regular, 2, 0o644);
            h.set_uid(uid);
            h.set_gid(gid);
            set_raw_name(&mut h, "etc/owned");
            layer.append(&h, &b"ok"[..]).unwrap();
            oci_layout(&image, &[(&layer.into_inner().unwrap(), false)]);
            let work = tmp.path().join(format!("w{i}"));
            let (r, rootfs, _) = unpack(&image, &work);
            match refused {
                None => {
                    r.unwrap();
                    use std::os::unix::fs::MetadataExt;
                    let meta = fs::metadata(rootfs.join("etc/owned")).unwrap();
                    assert_eq!(u64::from(meta.uid()), uid);
                }
                Some(what) => {
                    let err = r.unwrap_err();
                    assert!(matches!(err, ImageError::IdOutOfRange { .. }), "{err}");
                    assert!(err.is_input_error());
                    let msg = err.to_string();
                    assert!(
                        msg.contains("layer 1/1") && msg.contains("etc/owned"),
                        "{msg}"
                    );
                    assert!(msg.contains(what) && msg.contains("0 to 65535"), "{msg}");
                }
            }
        }
    }

    #[test]
    fn not_an_image_and_overlay_xattrs_are_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let empty = tmp.path().join("empty");
        fs::create_dir(&empty).unwrap();
        let (r, _, _) = unpack(&empty, &tmp.path().join("w"));
        assert!(matches!(r.unwrap_err(), ImageError::NotAnImage { .. }));
        let (r, _, _) = unpack(&tmp.path().join("missing"), &tmp.path().join("w2"));
        assert!(matches!(r.unwrap_err(), ImageError::Io { .. }));

        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([("SCHILY.xattr.trusted.overlay.opaque", &b"y"[..])])
            .unwrap();
        let h = header(tar::EntryType::Directory, 0, 0o755);
        b.append_data(&mut h.clone(), "dir", io::empty()).unwrap();
        let layer = b.into_inner().unwrap();
        let image = tmp.path().join("x");
        fs::create_dir(&image).unwrap();
        oci_layout(&image, &[(&layer, false)]);
        let (r, _, _) = unpack(&image, &tmp.path().join("w3"));
        let err = r.unwrap_err();
        assert!(err.to_string().contains("trusted.overlay.opaque"), "{err}");
    }

    #[test]
    fn userland_gets_the_user_account_or_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        assert!(matches!(prepare_userland(root), Err(ImageError::NoShell)));
        fs::create_dir_all(root.join("bin")).unwrap();
        fs::write(root.join("bin/busybox"), b"x").unwrap();
        fs::set_permissions(root.join("bin/busybox"), fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("/bin/busybox", root.join("bin/sh")).unwrap();
        fs::create_dir(root.join("etc")).unwrap();
        fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/ash").unwrap();
        let done = prepare_userland(root).unwrap();
        assert_eq!(done.len(), 3, "{done:?}");
        assert_eq!(done[0], "created the directories /proc /sys /dev /run /tmp");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            fs::metadata(root.join("tmp")).unwrap().mode() & 0o7777,
            0o1777
        );
        let passwd = read(&root.join("etc/passwd"));
        assert_eq!(
            passwd,
            "root:x:0:0:root:/root:/bin/ash\nuser:x:1000:1000:user:/home/user:/bin/sh\n"
        );
        assert!(read(&root.join("etc/group")).contains("user:x:1000:\n"));
        assert!(root.join("home/user").is_dir());
        // A second time there is nothing to do.
        assert!(prepare_userland(root).unwrap().is_empty());
        assert!(generated_template_name()
            .parse::<cubicle_core::TemplateName>()
            .is_ok());
    }
}
