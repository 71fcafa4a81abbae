//! Pulling container images from registries (`host[:port]/repo[:tag]` or
//! `host[:port]/repo@sha256:<hex>`) into the blob cache shared by all templates.
//!
//! The registry protocol (auth challenges, basic and token auth, TLS) is the
//! `oci-client` crate's; manifests, indexes and configs are parsed with `oci-spec`, and
//! the [`PLATFORM`] manifest is picked by the same code as for images on disk
//! ([`crate::oci`]). Plain HTTP is used for loopback registries only (127.0.0.0/8,
//! `::1`, `localhost`), HTTPS otherwise. Layers are fetched from the registry only,
//! never from the foreign URLs a manifest may list.
//!
//! Every blob (manifests, configs, layers) lands in `<data>/cache/blobs/sha256/<hex>`
//! ([`BlobCache`]): written to a temporary `.part-*` file next to it while its sha256 is
//! computed, checked against the digest and size the manifest names, then renamed into
//! place. A blob already there is not downloaded again, so a rebuild, or a second
//! template from an image sharing layers, fetches nothing but the manifest. [`pull`]
//! then writes an OCI layout of hard links to the cached blobs (one manifest, for
//! [`PLATFORM`]), which [`crate::oci::unpack_image`] verifies again and unpacks like
//! any layout on disk: there is one unpack path.
//!
//! The OCI client is async; [`pull`] drives it on a current-thread Tokio runtime of its
//! own, so callers stay synchronous (the daemon calls builds from `spawn_blocking`).

use std::fs;
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime};

use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth as OciAuth;
use oci_client::{Client, Reference};
use oci_spec::image::ImageIndex;
use serde_json::json;
use sha2::{Digest as _, Sha256};

use crate::build::{BuildEvent, LayerProgress, LayerStage, Throttle};
use crate::from_image::RegistryAuth;
use crate::oci::{
    check_digest, check_layers, hex, human_bytes, invalid, layer_name, pick_in_index,
    pick_manifest, sha256_hex, wrong_platform, Documents, ImageError, PLATFORM,
};

/// Manifest media types asked for (OCI and Docker schema 2, images and indexes).
const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
const INDEX_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
/// Manifests and indexes are small; a bigger one is refused before it is read whole.
const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// A `.part-*` file untouched for this long belongs to a pull that died.
const STALE_PART: Duration = Duration::from_secs(3600);
const PART_PREFIX: &str = ".part-";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// What went wrong talking to a registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The image is neither a path on disk nor a registry reference that parses.
    #[error("invalid image reference {reference:?}: {reason}; expected host[:port]/repository[:tag] or host[:port]/repository@sha256:<64 hex digits>")]
    InvalidReference {
        /// What was given.
        reference: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No connection to the registry (refused, unknown host, timeout, TLS failure).
    #[error("cannot reach the registry {registry}: {reason}")]
    Unreachable {
        /// `host[:port]`.
        registry: String,
        /// The cause, e.g. "Connection refused (os error 111)".
        reason: String,
    },
    /// The registry has no such repository, tag, digest or blob.
    #[error("{what} not found in the registry {registry}: {reason}")]
    NotFound {
        /// e.g. `image 127.0.0.1:5000/app:v2`.
        what: String,
        /// `host[:port]`.
        registry: String,
        /// The registry's answer.
        reason: String,
    },
    /// The registry wants credentials, or refused the ones given.
    #[error("{}", unauthorized_message(.registry, .user.as_deref(), .reason))]
    Unauthorized {
        /// `host[:port]`.
        registry: String,
        /// The user name given, if any.
        user: Option<String>,
        /// The registry's answer.
        reason: String,
    },
    /// A blob the registry sent is not what its digest says.
    #[error(
        "{what}: the registry {registry} sent corrupted data: expected {expected}, got {actual}"
    )]
    Corrupt {
        /// The blob, e.g. `layer 2/3 (sha256:0123456789ab)`.
        what: String,
        /// `host[:port]`.
        registry: String,
        /// The digest the manifest (or reference) names.
        expected: String,
        /// What was received: `sha256:<hex>`, or a size.
        actual: String,
    },
    /// Any other failure of the registry or of the protocol.
    #[error("{what}: the registry {registry} failed: {reason}")]
    Protocol {
        /// What was being fetched.
        what: String,
        /// `host[:port]`.
        registry: String,
        /// The error.
        reason: String,
    },
}

fn unauthorized_message(registry: &str, user: Option<&str>, reason: &str) -> String {
    match user {
        Some(user) => format!(
            "the registry {registry} refused the credentials of user '{user}' ({reason}); check the user name and password"
        ),
        None => format!(
            "the registry {registry} requires credentials ({reason}); pass --registry-username and --registry-password"
        ),
    }
}

impl RegistryError {
    /// Whether the error is the caller's (a bad reference or credentials) or its
    /// registry's, rather than this host's. All of them are: a registry is something the
    /// caller names.
    pub fn is_input_error(&self) -> bool {
        true
    }
}

/// What an `--image` argument names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// A file or directory on disk (OCI layout, OCI archive, `docker save` archive).
    Path(PathBuf),
    /// An image in a registry.
    Registry(Reference),
}

/// Tells a path from a registry reference.
///
/// It is a **path** if something exists at it (relative to the current directory), or
/// if it starts with `/`, `./`, `../` or `~` or is `.` or `..` (then a missing one is an
/// [`ImageError::NotAnImage`]). Otherwise it is a **registry reference** if the part
/// before its first `/` is a registry host: it contains a `.` or a `:` (a domain, an IP
/// address, a port) or is `localhost`. Docker Hub short names (`debian:12`) are not
/// references by this rule: spell them out (`docker.io/library/debian:12`). Anything
/// else is a path that does not exist, an [`ImageError::NotAnImage`] too.
pub fn image_source(image: &str) -> Result<ImageSource, ImageError> {
    let explicit_path = image.starts_with('/')
        || image.starts_with("./")
        || image.starts_with("../")
        || image.starts_with('~')
        || image == "."
        || image == "..";
    let exists = fs::symlink_metadata(image).is_ok();
    if exists {
        return Ok(ImageSource::Path(PathBuf::from(image)));
    }
    if explicit_path {
        return Err(ImageError::NotAnImage {
            path: PathBuf::from(image),
            reason: "no such file or directory".into(),
        });
    }
    let host = image.split_once('/').map(|(host, _)| host);
    match host {
        Some(host) if host.contains('.') || host.contains(':') || host == "localhost" => {
            parse_reference(image).map(ImageSource::Registry)
        }
        _ => Err(ImageError::NotAnImage {
            path: PathBuf::from(image),
            reason: "no such file or directory, and not a registry reference \
                     (host[:port]/repository[:tag], e.g. docker.io/library/debian:12)"
                .into(),
        }),
    }
}

/// Parses `host[:port]/repo[:tag][@sha256:<hex>]`.
fn parse_reference(image: &str) -> Result<Reference, ImageError> {
    let bad = |reason: String| {
        ImageError::Registry(RegistryError::InvalidReference {
            reference: image.to_owned(),
            reason,
        })
    };
    let reference = Reference::from_str(image).map_err(|e| bad(e.to_string()))?;
    if let Some(digest) = reference.digest() {
        sha256_hex(digest, "digest").map_err(|_| {
            bad(format!(
                "digest {digest:?} is not sha256:<64 lowercase hex digits>"
            ))
        })?;
    }
    Ok(reference)
}

/// Whether `registry` (`host[:port]`) is on the loopback interface, where plain HTTP is
/// used.
pub fn is_loopback(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split_once(']').map_or(rest, |(h, _)| h)
    } else {
        registry.rsplit_once(':').map_or(registry, |(h, _)| h)
    };
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The content-addressed store of pulled blobs, `<dir>/sha256/<hex>`.
#[derive(Debug, Clone)]
pub struct BlobCache {
    dir: PathBuf,
}

impl BlobCache {
    /// The cache in `dir` (normally [`cubicle_core::DataDir::blob_cache`]); created when
    /// first written.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        BlobCache { dir: dir.into() }
    }

    /// Where the blob `digest` is (or would be).
    pub fn path(&self, digest: &str) -> Result<PathBuf, ImageError> {
        let hex = sha256_hex(digest, "blob")?;
        Ok(self.dir.join("sha256").join(hex))
    }

    /// Whether the blob is there with the size `size`. (Its content is checked against
    /// the digest again when unpacked.)
    pub fn has(&self, digest: &str, size: u64) -> bool {
        self.path(digest)
            .ok()
            .and_then(|p| fs::metadata(p).ok())
            .is_some_and(|m| m.is_file() && m.len() == size)
    }

    /// The small blob `digest` (a manifest or config) read from the cache, if it is there
    /// with the size `size` and its digest checks out; one that does not is forgotten.
    fn read_verified(
        &self,
        digest: &str,
        size: u64,
        what: &str,
    ) -> Result<Option<Vec<u8>>, ImageError> {
        if !self.has(digest, size) {
            return Ok(None);
        }
        let path = self.path(digest)?;
        let data = fs::read(&path).map_err(io_err("read", &path))?;
        if check_digest(&data, digest, what).is_ok() {
            return Ok(Some(data));
        }
        self.forget(digest);
        Ok(None)
    }

    /// Deletes the blob `digest` (found corrupted), so that it is fetched again.
    pub fn forget(&self, digest: &str) {
        if let Ok(path) = self.path(digest) {
            match fs::remove_file(&path) {
                Ok(()) => tracing::warn!("removed {} from the blob cache", path.display()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!("cannot remove {}: {e}", path.display()),
            }
        }
    }

    /// Creates `<dir>/sha256` (`<dir>` mode 0700: private images' layers stay private;
    /// its parents as usual) and deletes `.part-*` files of pulls that died.
    fn prepare(&self) -> Result<PathBuf, ImageError> {
        if let Some(parent) = self.dir.parent() {
            fs::create_dir_all(parent).map_err(io_err("create directory", parent))?;
        }
        let dir = self.dir.join("sha256");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err("create directory", &dir))?;
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700))
            .map_err(io_err("chmod", &self.dir))?;
        let entries = fs::read_dir(&dir).map_err(io_err("read directory", &dir))?;
        for entry in entries.flatten() {
            let stale = entry.file_name().to_string_lossy().starts_with(PART_PREFIX)
                && entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| SystemTime::now().duration_since(t).ok())
                    .is_some_and(|age| age > STALE_PART);
            if stale {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(dir)
    }

    /// Stores `data` (already verified) as the blob `digest`.
    fn put(&self, digest: &str, data: &[u8]) -> Result<(), ImageError> {
        let path = self.path(digest)?;
        if fs::metadata(&path).is_ok_and(|m| m.len() == data.len() as u64) {
            return Ok(());
        }
        let mut tmp = self.temp_file()?;
        tmp.write_all(data).map_err(io_err("write", tmp.path()))?;
        self.persist(tmp, &path)
    }

    fn temp_file(&self) -> Result<tempfile::NamedTempFile, ImageError> {
        let dir = self.dir.join("sha256");
        tempfile::Builder::new()
            .prefix(PART_PREFIX)
            .tempfile_in(&dir)
            .map_err(io_err("create a file in", &dir))
    }

    fn persist(&self, tmp: tempfile::NamedTempFile, path: &Path) -> Result<(), ImageError> {
        tmp.as_file()
            .sync_all()
            .map_err(io_err("sync", tmp.path()))?;
        tmp.persist(path)
            .map_err(|e| ImageError::Io {
                op: "rename",
                path: e.file.path().to_path_buf(),
                source: e.error,
            })
            .map(drop)
    }
}

fn io_err(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> ImageError {
    let path = path.into();
    move |source| ImageError::Io { op, path, source }
}

/// What [`pull`] fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pulled {
    /// The digest of the [`PLATFORM`] manifest.
    pub digest: String,
    /// The reference pinned to what the tag pointed to: `host[:port]/repo@sha256:...`.
    pub pinned: String,
    /// How many layers the image has.
    pub layers: usize,
    /// How many of them were already in the cache.
    pub cached_layers: usize,
    /// Bytes downloaded (layers and configs; manifests not counted).
    pub downloaded_bytes: u64,
}

/// Pulls `reference` (see [`image_source`]) into `cache` and writes an OCI layout of
/// its [`PLATFORM`] manifest at `layout` (created; hard links to the cached blobs,
/// copies if the cache is on another file system), ready for
/// [`crate::oci::unpack_image`]. Reports [`BuildEvent::LayerProgress`] and log lines.
///
/// Refuses images without a [`PLATFORM`] variant before downloading any layer.
pub fn pull(
    reference: &Reference,
    auth: Option<&RegistryAuth>,
    cache: &BlobCache,
    layout: &Path,
    on_event: &mut dyn FnMut(BuildEvent),
) -> Result<Pulled, ImageError> {
    let mut registry = Remote::new(reference, auth, cache)?;
    cache.prepare()?;
    on_event(BuildEvent::Log(format!(
        "pulling {} from {}://{}",
        reference.whole(),
        registry.scheme(),
        reference.resolve_registry()
    )));
    let (top, top_digest) = registry.top_manifest()?;
    let mut found = Vec::new();
    let picked = if is_index_document(&top) {
        let what = format!("image index {top_digest}");
        let index = ImageIndex::from_reader(&top[..]).map_err(invalid(what))?;
        pick_in_index(&mut registry, &index, 0, &mut found)?
    } else {
        pick_manifest(&mut registry, &top_digest, &top, &mut found)?
    };
    let Some((digest, manifest, config)) = picked else {
        return Err(if found.is_empty() {
            registry.protocol("image index", "lists no image manifest".into())
        } else {
            wrong_platform(found)
        });
    };
    check_layers(&manifest, &config)?;
    if digest != top_digest {
        on_event(BuildEvent::Log(format!(
            "{} is a multi-platform index; using its {PLATFORM} manifest {digest}",
            reference.whole()
        )));
    }
    let total = manifest.layers().len();
    let mut cached_layers = 0;
    for (i, layer) in manifest.layers().iter().enumerate() {
        let ldigest = layer.digest().to_string();
        let what = layer_name(i, total, &ldigest);
        if cache.has(&ldigest, layer.size()) {
            cached_layers += 1;
            on_event(BuildEvent::LayerProgress(LayerProgress {
                index: i + 1,
                count: total,
                digest: ldigest.clone(),
                stage: LayerStage::Downloading,
                done: layer.size(),
                total: layer.size(),
                cached: true,
            }));
            on_event(BuildEvent::Log(format!(
                "{what}: cached ({})",
                human_bytes(layer.size())
            )));
            continue;
        }
        let started = Instant::now();
        registry.download(
            &ldigest,
            layer.size(),
            &what,
            Some((i + 1, total)),
            on_event,
        )?;
        let secs = started.elapsed().as_secs_f64();
        on_event(BuildEvent::Log(format!(
            "{what}: downloaded {} in {secs:.1} s",
            human_bytes(layer.size())
        )));
    }

    // The layout: index.json naming the one manifest, blobs linked from the cache.
    let blobs = layout.join("blobs/sha256");
    fs::create_dir_all(&blobs).map_err(io_err("create directory", &blobs))?;
    let manifest_size = fs::metadata(cache.path(&digest)?)
        .map_err(io_err("read", cache.path(&digest)?))?
        .len();
    let mut digests = vec![digest.clone(), manifest.config().digest().to_string()];
    digests.extend(manifest.layers().iter().map(|l| l.digest().to_string()));
    for d in &digests {
        link_or_copy(&cache.path(d)?, &blobs.join(sha256_hex(d, "blob")?))?;
    }
    let media_type = manifest
        .media_type()
        .as_ref()
        .map(|m| m.to_string())
        .unwrap_or_else(|| MANIFEST_TYPES[0].to_owned());
    let index = json!({
        "schemaVersion": 2,
        "mediaType": INDEX_TYPES[0],
        "manifests": [{
            "mediaType": media_type,
            "digest": digest,
            "size": manifest_size,
            "platform": {"os": "linux", "architecture": "amd64"},
        }],
    });
    write_file(&layout.join("index.json"), index.to_string().as_bytes())?;
    write_file(
        &layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let pinned = format!(
        "{}/{}@{top_digest}",
        reference.registry(),
        reference.repository()
    );
    Ok(Pulled {
        digest,
        pinned,
        layers: total,
        cached_layers,
        downloaded_bytes: registry.downloaded,
    })
}

fn write_file(path: &Path, data: &[u8]) -> Result<(), ImageError> {
    fs::write(path, data).map_err(io_err("write", path))
}

fn link_or_copy(from: &Path, to: &Path) -> Result<(), ImageError> {
    match fs::hard_link(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            fs::copy(from, to).map(drop).map_err(io_err("copy", from))
        }
        Err(e) => Err(ImageError::Io {
            op: "link",
            path: from.to_path_buf(),
            source: e,
        }),
    }
}

/// Whether a manifest document is an index (by its `mediaType`, or, lacking one, by
/// having `manifests` rather than `layers`).
fn is_index_document(data: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Peek {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
    }
    match serde_json::from_slice::<Peek>(data) {
        Ok(Peek {
            media_type: Some(mt),
            ..
        }) => INDEX_TYPES.contains(&mt.as_str()),
        Ok(Peek { manifests, .. }) => manifests.is_some(),
        Err(_) => false,
    }
}

/// One pull's connection to a registry.
struct Remote<'a> {
    runtime: tokio::runtime::Runtime,
    client: Client,
    auth: OciAuth,
    user: Option<String>,
    reference: &'a Reference,
    cache: &'a BlobCache,
    downloaded: u64,
}

impl<'a> Remote<'a> {
    fn new(
        reference: &'a Reference,
        auth: Option<&RegistryAuth>,
        cache: &'a BlobCache,
    ) -> Result<Self, ImageError> {
        let registry = reference.resolve_registry().to_owned();
        let protocol = if is_loopback(&registry) {
            ClientProtocol::HttpsExcept(vec![registry.clone()])
        } else {
            ClientProtocol::Https
        };
        let config = ClientConfig {
            protocol,
            connect_timeout: Some(CONNECT_TIMEOUT),
            read_timeout: Some(READ_TIMEOUT),
            ..Default::default()
        };
        let client = Client::try_from(config).map_err(|e| ImageError::Io {
            op: "create the registry client for",
            path: PathBuf::from(&registry),
            source: io::Error::other(e.to_string()),
        })?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(io_err("start a runtime for", &registry))?;
        let (auth, user) = match auth {
            Some(a) => (
                OciAuth::Basic(a.username.clone(), a.password.clone()),
                Some(a.username.clone()),
            ),
            None => (OciAuth::Anonymous, None),
        };
        Ok(Remote {
            runtime,
            client,
            auth,
            user,
            reference,
            cache,
            downloaded: 0,
        })
    }

    fn registry(&self) -> String {
        self.reference.resolve_registry().to_owned()
    }

    fn scheme(&self) -> &'static str {
        if is_loopback(self.reference.resolve_registry()) {
            "http"
        } else {
            "https"
        }
    }

    fn protocol(&self, what: &str, reason: String) -> ImageError {
        ImageError::Registry(RegistryError::Protocol {
            what: what.to_owned(),
            registry: self.registry(),
            reason,
        })
    }

    /// The manifest or index the reference names, and its digest (verified against the
    /// reference's digest if it has one).
    fn top_manifest(&mut self) -> Result<(Vec<u8>, String), ImageError> {
        let what = format!("image {}", self.reference.whole());
        let data = self.fetch_manifest(self.reference, &what)?;
        let digest = format!("sha256:{}", hex(&Sha256::digest(&data)));
        if let Some(expected) = self.reference.digest() {
            if expected != digest {
                return Err(self.corrupt(&what, expected, &digest));
            }
        }
        self.cache.put(&digest, &data)?;
        Ok((data, digest))
    }

    fn fetch_manifest(&mut self, at: &Reference, what: &str) -> Result<Vec<u8>, ImageError> {
        let fetched = self.runtime.block_on(self.client.pull_manifest_raw(
            at,
            &self.auth,
            MANIFEST_TYPES,
        ));
        let (data, _) = fetched.map_err(|e| match e {
            // The body does not hash to the digest asked for or the one the registry
            // announced.
            OciDistributionError::DigestError(d) => self.corrupt(
                what,
                at.digest()
                    .unwrap_or("the Docker-Content-Digest it announced"),
                &d.to_string(),
            ),
            e => self.error(e, what),
        })?;
        if data.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(self.protocol(
                what,
                format!("the manifest is {} bytes, more than allowed", data.len()),
            ));
        }
        Ok(data.to_vec())
    }

    fn corrupt(&self, what: &str, expected: &str, actual: &str) -> ImageError {
        ImageError::Registry(RegistryError::Corrupt {
            what: what.to_owned(),
            registry: self.registry(),
            expected: expected.to_owned(),
            actual: actual.to_owned(),
        })
    }

    /// Downloads the blob `digest` into the cache, verifying it on the way. `layer`:
    /// its number and the layer count, to report progress.
    fn download(
        &mut self,
        digest: &str,
        size: u64,
        what: &str,
        layer: Option<(usize, usize)>,
        on_event: &mut dyn FnMut(BuildEvent),
    ) -> Result<(), ImageError> {
        let path = self.cache.path(digest)?;
        let mut tmp = self.cache.temp_file()?;
        let progress = |done: u64| {
            BuildEvent::LayerProgress(LayerProgress {
                index: layer.map_or(0, |l| l.0),
                count: layer.map_or(0, |l| l.1),
                digest: digest.to_owned(),
                stage: LayerStage::Downloading,
                done,
                total: size,
                cached: false,
            })
        };
        if layer.is_some() {
            on_event(progress(0));
        }
        let mut hasher = Sha256::new();
        let mut done = 0u64;
        let mut throttle = Throttle::new();
        let client = &self.client;
        let reference = self.reference;
        let result: Result<(), Result<OciDistributionError, ImageError>> =
            self.runtime.block_on(async {
                let mut stream = client
                    .pull_blob_stream(reference, digest)
                    .await
                    .map_err(Ok)?;
                while let Some(chunk) = stream.next().await {
                    let chunk = match chunk {
                        Ok(c) => c,
                        // All bytes arrived and do not hash right: our own check below
                        // says so more precisely than the client's error.
                        Err(_) if done == size => break,
                        Err(e) => return Err(Err(broken_transfer(reference, what, e))),
                    };
                    done += chunk.len() as u64;
                    if done > size {
                        break;
                    }
                    hasher.update(&chunk);
                    tmp.write_all(&chunk)
                        .map_err(|e| Err(io_err("write", tmp.path())(e)))?;
                    if layer.is_some() && done < size && throttle.due() {
                        on_event(progress(done));
                    }
                }
                Ok(())
            });
        match result {
            Ok(()) => {}
            Err(Ok(e)) => return Err(self.error(e, what)),
            Err(Err(e)) => return Err(e),
        }
        if done != size {
            return Err(self.corrupt(
                what,
                digest,
                &format!(
                    "{}{done} bytes instead of {size}",
                    if done > size { "more than " } else { "" }
                ),
            ));
        }
        let actual = format!("sha256:{}", hex(&hasher.finalize()));
        if actual != digest {
            return Err(self.corrupt(what, digest, &actual));
        }
        self.cache.persist(tmp, &path)?;
        self.downloaded += size;
        if layer.is_some() {
            on_event(progress(size));
        }
        Ok(())
    }

    /// Turns the client's error into a [`RegistryError`] saying what it means.
    fn error(&self, e: OciDistributionError, what: &str) -> ImageError {
        let registry = self.registry();
        let unauthorized = |reason: String| RegistryError::Unauthorized {
            registry: registry.clone(),
            user: self.user.clone(),
            reason,
        };
        let not_found = |reason: String| RegistryError::NotFound {
            what: what.to_owned(),
            registry: registry.clone(),
            reason,
        };
        let err = match e {
            OciDistributionError::UnauthorizedError { .. } => {
                unauthorized("HTTP 401 Unauthorized".into())
            }
            OciDistributionError::AuthenticationFailure(reason) => unauthorized(reason),
            OciDistributionError::RegistryError { envelope, .. } => {
                let reason = envelope
                    .errors
                    .iter()
                    .map(|e| format!("{}: {}", code_name(&e.code), e.message))
                    .collect::<Vec<_>>()
                    .join("; ");
                let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
                if codes
                    .iter()
                    .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
                {
                    unauthorized(reason)
                } else if codes.iter().any(|c| {
                    matches!(
                        c,
                        OciErrorCode::ManifestUnknown
                            | OciErrorCode::NameUnknown
                            | OciErrorCode::BlobUnknown
                            | OciErrorCode::NotFound
                    )
                }) {
                    not_found(reason)
                } else {
                    RegistryError::Protocol {
                        what: what.to_owned(),
                        registry,
                        reason,
                    }
                }
            }
            OciDistributionError::ServerError { code, message, .. } => {
                let reason = format!("HTTP {code}: {}", message.trim());
                match code {
                    401 | 403 => unauthorized(reason),
                    404 => not_found(reason),
                    _ => RegistryError::Protocol {
                        what: what.to_owned(),
                        registry,
                        reason,
                    },
                }
            }
            OciDistributionError::RequestError(e) if e.is_connect() || e.is_timeout() => {
                RegistryError::Unreachable {
                    registry,
                    reason: root_cause(&e),
                }
            }
            other => RegistryError::Protocol {
                what: what.to_owned(),
                registry,
                reason: root_cause(&other),
            },
        };
        ImageError::Registry(err)
    }
}

/// A transfer broken off in the middle.
fn broken_transfer(reference: &Reference, what: &str, e: io::Error) -> ImageError {
    ImageError::Registry(RegistryError::Unreachable {
        registry: reference.resolve_registry().to_owned(),
        reason: format!("the transfer of {what} broke off: {}", root_cause(&e)),
    })
}

/// `MANIFEST_UNKNOWN` for [`OciErrorCode::ManifestUnknown`].
fn code_name(code: &OciErrorCode) -> String {
    serde_json::to_value(code)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{code:?}"))
}

/// The error and its sources, innermost last: "error sending request: ...: Connection
/// refused (os error 111)".
fn root_cause(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}

impl Documents for Remote<'_> {
    fn manifest(&mut self, digest: &str, size: u64, what: &str) -> Result<Vec<u8>, ImageError> {
        if let Some(data) = self.cache.read_verified(digest, size, what)? {
            return Ok(data);
        }
        if size > MAX_MANIFEST_BYTES {
            return Err(self.protocol(what, format!("the manifest is {size} bytes")));
        }
        let at = self.reference.clone_with_digest(digest.to_owned());
        let data = self.fetch_manifest(&at, what)?;
        let actual = format!("sha256:{}", hex(&Sha256::digest(&data)));
        if actual != digest {
            return Err(self.corrupt(what, digest, &actual));
        }
        if data.len() as u64 != size {
            return Err(self.corrupt(
                what,
                digest,
                &format!("{} bytes instead of {size}", data.len()),
            ));
        }
        self.cache.put(digest, &data)?;
        Ok(data)
    }

    fn blob(&mut self, digest: &str, size: u64, what: &str) -> Result<Vec<u8>, ImageError> {
        if let Some(data) = self.cache.read_verified(digest, size, what)? {
            return Ok(data);
        }
        let path = self.cache.path(digest)?;
        if size > MAX_MANIFEST_BYTES {
            return Err(self.protocol(what, format!("the config is {size} bytes")));
        }
        self.download(digest, size, what, None, &mut |_| {})?;
        fs::read(&path).map_err(io_err("read", &path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_references_are_told_apart() {
        let tmp = tempfile::tempdir().unwrap();
        let existing = tmp.path().join("registry.example:5000");
        fs::create_dir(&existing).unwrap();
        for path in [".", "..", "/"] {
            assert_eq!(
                image_source(path).unwrap(),
                ImageSource::Path(path.into()),
                "{path}"
            );
        }
        for missing in ["/no/image.tar", "./no-image", "../no/y", "~/no-img"] {
            let err = image_source(missing).unwrap_err();
            assert!(
                err.to_string()
                    .ends_with("is not an image: no such file or directory"),
                "{missing}: {err}"
            );
            assert!(err.is_input_error());
        }
        let existing = existing.to_str().unwrap();
        assert_eq!(
            image_source(existing).unwrap(),
            ImageSource::Path(existing.into())
        );
        let r = |s: &str| match image_source(s) {
            Ok(ImageSource::Registry(r)) => r,
            other => panic!("{s}: {other:?}"),
        };
        let a = r("127.0.0.1:5000/team/app:v1");
        assert_eq!(
            (a.registry(), a.repository(), a.tag()),
            ("127.0.0.1:5000", "team/app", Some("v1"))
        );
        let hexd = "a".repeat(64);
        let b = r(&format!("localhost/app@sha256:{hexd}"));
        assert_eq!(b.digest(), Some(format!("sha256:{hexd}").as_str()));
        let c = r("registry.example.com/app");
        assert_eq!(c.tag(), Some("latest"));
        assert_eq!(
            r("docker.io/library/debian:12").repository(),
            "library/debian"
        );

        // Short names and missing files are neither.
        for s in ["debian:12", "image.tar", "dir/image.tar"] {
            let err = image_source(s).unwrap_err();
            assert!(matches!(err, ImageError::NotAnImage { .. }), "{s}: {err}");
            assert!(err.is_input_error());
            assert!(
                err.to_string().contains("not a registry reference"),
                "{err}"
            );
        }
        // Malformed references.
        for s in [
            "127.0.0.1:5000/Upper:tag",
            "127.0.0.1:5000/app@sha256:abc",
            "127.0.0.1:5000/app@md5:0123",
            "localhost/app:bad tag",
        ] {
            let err = image_source(s).unwrap_err();
            assert!(
                matches!(
                    err,
                    ImageError::Registry(RegistryError::InvalidReference { .. })
                ),
                "{s}: {err}"
            );
            assert!(err.is_input_error());
            assert!(
                err.to_string().starts_with("invalid image reference"),
                "{err}"
            );
        }
    }

    #[test]
    fn only_loopback_registries_get_plain_http() {
        for r in [
            "127.0.0.1:5000",
            "127.1.2.3",
            "localhost:5000",
            "LOCALHOST",
            "[::1]:5000",
            "[::1]",
        ] {
            assert!(is_loopback(r), "{r}");
        }
        for r in [
            "10.0.0.1:5000",
            "registry.example.com",
            "localhost.example.com:5000",
            "[::2]:5000",
            "128.0.0.1",
        ] {
            assert!(!is_loopback(r), "{r}");
        }
    }

    #[test]
    fn messages() {
        let e = RegistryError::Unauthorized {
            registry: "r:1".into(),
            user: Some("alice".into()),
            reason: "HTTP 401 Unauthorized".into(),
        };
        assert_eq!(
            e.to_string(),
            "the registry r:1 refused the credentials of user 'alice' (HTTP 401 Unauthorized); check the user name and password"
        );
        let e = RegistryError::Unauthorized {
            registry: "r:1".into(),
            user: None,
            reason: "HTTP 401 Unauthorized".into(),
        };
        assert!(e
            .to_string()
            .ends_with("pass --registry-username and --registry-password"));
        assert_eq!(
            code_name(&OciErrorCode::ManifestUnknown),
            "MANIFEST_UNKNOWN"
        );
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[test]
    fn a_closed_port_is_unreachable_even_from_spawn_blocking() {
        let tmp = tempfile::tempdir().unwrap();
        let port = free_port();
        let image = format!("127.0.0.1:{port}/app:v1");
        let run = move |dir: PathBuf| {
            let ImageSource::Registry(r) = image_source(&image).unwrap() else {
                panic!()
            };
            let cache = BlobCache::new(dir.join("cache"));
            pull(&r, None, &cache, &dir.join("layout"), &mut |_| {}).unwrap_err()
        };
        let err = run(tmp.path().to_path_buf());
        let msg = err.to_string();
        assert!(
            matches!(err, ImageError::Registry(RegistryError::Unreachable { .. })),
            "{msg}"
        );
        assert!(
            msg.starts_with(&format!("cannot reach the registry 127.0.0.1:{port}: ")),
            "{msg}"
        );
        assert!(msg.contains("Connection refused"), "{msg}");
        assert!(err.is_input_error());
        // From the blocking pool of a multi-threaded runtime, as the daemon calls it.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let dir = tmp.path().join("blocking");
        let err = rt
            .block_on(async move { tokio::task::spawn_blocking(move || run(dir)).await })
            .unwrap();
        assert!(
            matches!(err, ImageError::Registry(RegistryError::Unreachable { .. })),
            "{err}"
        );
    }

    #[test]
    fn the_cache_is_private_and_drops_stale_downloads() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        let cache = BlobCache::new(tmp.path().join("cache/blobs"));
        let dir = cache.prepare().unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(&tmp.path().join("cache/blobs")), 0o700);
        assert_ne!(mode(&tmp.path().join("cache")), 0o700);
        let digest = format!("sha256:{}", hex(&Sha256::digest(b"hello")));
        cache.put(&digest, b"hello").unwrap();
        assert!(cache.has(&digest, 5));
        assert!(!cache.has(&digest, 6));
        let stale = dir.join(".part-old");
        let fresh = dir.join(".part-new");
        fs::write(&fresh, b"x").unwrap();
        let old = fs::File::create(&stale).unwrap();
        old.set_modified(SystemTime::now() - 2 * STALE_PART)
            .unwrap();
        cache.prepare().unwrap();
        assert!(!stale.exists() && fresh.exists());
        cache.forget(&digest);
        assert!(!cache.has(&digest, 5));
    }

    #[test]
    fn cache_paths_need_sha256() {
        let cache = BlobCache::new("/c");
        let d = format!("sha256:{}", "0".repeat(64));
        assert_eq!(
            cache.path(&d).unwrap(),
            Path::new("/c/sha256").join("0".repeat(64))
        );
        assert!(cache.path("sha256:../../etc").is_err());
        assert!(cache.path("sha512:00").is_err());
        assert!(!cache.has(&d, 0));
    }
}
