//! What is recorded about a built template (`template.json`) and the handle to one.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use cubicle_core::TemplateName;
use serde::{Deserialize, Serialize};

use crate::error::TemplateError;
use crate::recipe::MAX_LAYERS;
use crate::store::TemplateStore;

/// The contents of `templates/<name>/template.json`, written last by a build.
///
/// Fields added after format 1 (`parent`, `parent_built_at`, `aliases`,
/// `code_interpreter`) default when absent, so every format-1 file still loads, and are
/// left out when they have their default value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplateMeta {
    /// Version of this file's format; see [`TemplateMeta::FORMAT_VERSION`].
    pub format_version: u32,
    /// The recipe it was built from, e.g. `base`.
    pub recipe: String,
    /// Hex SHA-256 of the recipe and the uid shift (see [`crate::Recipe::hash`]).
    pub recipe_hash: String,
    /// Every uid/gid in the root filesystem is the sandbox id plus this.
    pub uid_shift: u32,
    /// When the build finished, RFC 3339 in UTC (`2026-05-20T14:31:02Z`).
    pub built_at: String,
    /// Disk usage of the root filesystem (allocated blocks, hard links counted once).
    pub size_bytes: u64,
    /// Number of entries (files, directories, symlinks, ...) in the root filesystem.
    pub file_count: u64,
    /// Wall-clock duration of the build.
    pub build_seconds: f64,
    /// The Debian mirror the packages came from.
    pub mirror: String,
    /// The template this one is a layer on (by name), if any: then `rootfs/` holds only
    /// the difference to the parent's layers, and sandboxes mount them all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// The parent's [`TemplateMeta::built_at`] when this layer was built on it. A parent
    /// rebuilt since then is another file system; this layer no longer fits it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_built_at: Option<String>,
    /// Other names [`TemplateStore::get`] finds this template by (e.g.
    /// `code-interpreter-v1`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// Whether sandboxes of this template run the code interpreter.
    #[serde(default, skip_serializing_if = "is_false")]
    pub code_interpreter: bool,
    /// The container image the root filesystem was unpacked from, and its config's
    /// run-time defaults (entrypoint, cmd, env, ...), for templates built by
    /// `cubicle tpl create-from-image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<crate::oci::ImageInfo>,
    /// What its sandboxes get unless their create request says otherwise, and the
    /// service they run (templates from images; see [`SandboxDefaults`]).
    #[serde(default, skip_serializing_if = "SandboxDefaults::is_empty")]
    pub sandbox: SandboxDefaults,
}

/// A template's defaults for its sandboxes (`tpl create-from-image --cpu --memory
/// --writable-layer-size --expose-port --probe ...`). Every field is optional; an empty
/// value means "the daemon's defaults, no service".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxDefaults {
    /// CPUs of each sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_count: Option<u32>,
    /// Memory limit of each sandbox, MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    /// Size limit of each sandbox's writable layer, MiB: writes past it fail with
    /// ENOSPC inside the sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writable_layer_mib: Option<u64>,
    /// Environment of every process in the sandbox (the image's `Env` with the
    /// overrides applied), under the create request's `envVars`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// TCP ports the template's service listens on (`--expose-port`), reachable through
    /// the proxy as `{port}-{sandbox id}.{domain}`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expose_ports: Vec<u16>,
    /// The program every sandbox runs next to the agent (the image's entrypoint and
    /// cmd, with the overrides applied).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<Service>,
    /// When the service is ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<Probe>,
}

impl SandboxDefaults {
    /// Whether nothing is set.
    pub fn is_empty(&self) -> bool {
        *self == SandboxDefaults::default()
    }
}

/// A template's main service: started by the agent in every sandbox of the template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// Program and arguments (the image's `Entrypoint` + `Cmd`).
    pub argv: Vec<String>,
    /// Working directory (the image's `WorkingDir`, default `/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// User (name or uid[:gid]) it runs as (the image's `User`, default root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// An HTTP readiness probe: the service is ready when `GET http://127.0.0.1:{port}{path}`
/// inside the sandbox answers (any HTTP status).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    /// Port inside the sandbox.
    pub port: u16,
    /// Path of the request, starting with `/`.
    pub path: String,
    /// How long to wait for an answer before the build fails, seconds.
    pub timeout_secs: u64,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl TemplateMeta {
    /// The newest format this crate reads and writes. Format 1: a single root
    /// filesystem. Format 2: may be a layer on a parent ([`TemplateMeta::parent`]).
    pub const FORMAT_VERSION: u32 = 2;
    /// The oldest format this crate reads.
    pub const MIN_FORMAT_VERSION: u32 = 1;

    /// The format a build writes: 1 for a template without a parent, which every
    /// version of cubicle reads; 2 for a layer, so that a cubicle that does not know
    /// layers refuses it instead of starting sandboxes on a bare delta.
    pub fn format_version_for(parent: Option<&str>) -> u32 {
        if parent.is_some() {
            2
        } else {
            1
        }
    }

    /// Why this metadata cannot be used by this crate, if it cannot.
    pub(crate) fn unsupported(&self) -> Option<String> {
        if !(Self::MIN_FORMAT_VERSION..=Self::FORMAT_VERSION).contains(&self.format_version) {
            return Some(format!(
                "has format version {}, this build of cubicle reads versions {} to {}",
                self.format_version,
                Self::MIN_FORMAT_VERSION,
                Self::FORMAT_VERSION
            ));
        }
        if self.format_version < 2 && self.parent.is_some() {
            return Some("names a parent, which format version 1 cannot".into());
        }
        None
    }

    /// [`TemplateMeta::built_at`] as Unix seconds, if it is in the format this crate
    /// writes.
    pub fn built_at_unix(&self) -> Option<u64> {
        parse_rfc3339_utc(&self.built_at)
    }
}

/// An installed template.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Template {
    /// Its name, which is also its directory name.
    pub name: TemplateName,
    /// `templates/<name>/`.
    pub dir: PathBuf,
    /// `templates/<name>/rootfs/`: its own layer, the topmost read-only layer of its
    /// sandboxes (the only one unless it has a parent; see [`Template::layers`]).
    pub rootfs: PathBuf,
    /// What `template.json` says.
    #[serde(flatten)]
    pub meta: TemplateMeta,
}

impl Template {
    /// The template it is a layer on, by name.
    pub fn parent(&self) -> Option<&str> {
        self.meta.parent.as_deref()
    }

    /// Every layer a sandbox of this template mounts, top first: its own `rootfs/`, then
    /// its parent's layers, down to a template without parent. This is overlayfs'
    /// `lowerdir` order.
    ///
    /// Parents are looked up by name in `store` (never by alias). Fails with
    /// [`TemplateError::BrokenParent`] if a parent is missing or corrupt, was rebuilt
    /// after the layer above it, has another uid shift, or the chain loops or is deeper
    /// than [`MAX_LAYERS`].
    pub fn layers(&self, store: &TemplateStore) -> Result<Vec<PathBuf>, TemplateError> {
        let broken = |parent: &str, reason: String| TemplateError::BrokenParent {
            name: self.name.to_string(),
            parent: parent.to_owned(),
            reason,
        };
        let mut layers = vec![self.rootfs.clone()];
        let mut chain = vec![self.name.to_string()];
        let mut child = self.clone();
        while let Some(parent_name) = child.meta.parent.clone() {
            if chain.contains(&parent_name) {
                chain.push(parent_name.clone());
                return Err(broken(
                    &parent_name,
                    format!("the parent chain loops: {}", chain.join(" -> ")),
                ));
            }
            if layers.len() >= MAX_LAYERS {
                return Err(broken(
                    &parent_name,
                    format!("more than {MAX_LAYERS} layers: {}", chain.join(" -> ")),
                ));
            }
            let name: TemplateName = parent_name
                .parse()
                .map_err(|e| broken(&parent_name, format!("invalid name: {e}")))?;
            let parent = store.get_by_name(&name).map_err(|e| match e {
                TemplateError::NotFound { .. } => broken(&parent_name, "it is not built".into()),
                other => broken(&parent_name, other.to_string()),
            })?;
            if parent.meta.uid_shift != child.meta.uid_shift {
                return Err(broken(
                    &parent_name,
                    format!(
                        "its uid shift is {}, '{}' was built with {}",
                        parent.meta.uid_shift, child.name, child.meta.uid_shift
                    ),
                ));
            }
            if child.meta.parent_built_at.as_deref() != Some(parent.meta.built_at.as_str()) {
                return Err(broken(
                    &parent_name,
                    format!(
                        "'{}' was built on the '{parent_name}' of {}, which has been rebuilt since ({})",
                        child.name,
                        child.meta.parent_built_at.as_deref().unwrap_or("an unknown time"),
                        parent.meta.built_at
                    ),
                ));
            }
            layers.push(parent.rootfs.clone());
            chain.push(parent_name);
            child = parent;
        }
        Ok(layers)
    }
}

/// The current time as Unix seconds.
pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

const SECS_PER_DAY: u64 = 86_400;

fn is_leap(year: u64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn month_lengths(year: u64) -> [u64; 12] {
    let feb = if is_leap(year) { 29 } else { 28 };
    [31, feb, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
}

/// Formats Unix seconds as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn rfc3339_utc(unix: u64) -> String {
    let mut days = unix / SECS_PER_DAY;
    let secs = unix % SECS_PER_DAY;
    let mut year = 1970;
    loop {
        let len = if is_leap(year) { 366 } else { 365 };
        if days < len {
            break;
        }
        days -= len;
        year += 1;
    }
    let mut month = 1;
    for len in month_lengths(year) {
        if days < len {
            break;
        }
        days -= len;
        month += 1;
    }
    format!(
        "{year:04}-{month:02}-{:02}T{:02}:{:02}:{:02}Z",
        days + 1,
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Parses what [`rfc3339_utc`] writes (`YYYY-MM-DDTHH:MM:SSZ`, years from 1970).
pub fn parse_rfc3339_utc(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() != 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[19] != b'Z'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u64> {
        let part = s.get(r)?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, min, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let lengths = month_lengths(year);
    if year < 1970
        || !(1..=12).contains(&month)
        || day == 0
        || day > lengths[(month - 1) as usize]
        || hour > 23
        || min > 59
        || sec > 59
    {
        return None;
    }
    let mut days: u64 = (1970..year)
        .map(|y| if is_leap(y) { 366 } else { 365 })
        .sum();
    days += lengths[..(month - 1) as usize].iter().sum::<u64>();
    days += day - 1;
    Some(days * SECS_PER_DAY + hour * 3600 + min * 60 + sec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> TemplateMeta {
        TemplateMeta {
            format_version: 1,
            recipe: "base".into(),
            recipe_hash: "ab".repeat(32),
            uid_shift: 1_000_000_000,
            built_at: "2026-05-20T14:31:02Z".into(),
            size_bytes: 123_456_789,
            file_count: 8241,
            build_seconds: 41.5,
            mirror: "http://deb.debian.org/debian".into(),
            parent: None,
            parent_built_at: None,
            aliases: Vec::new(),
            code_interpreter: false,
            image: None,
            sandbox: Default::default(),
        }
    }

    #[test]
    fn meta_round_trips_through_json() {
        let meta = sample();
        let json = serde_json::to_string_pretty(&meta).unwrap();
        assert!(json.contains("\"recipe_hash\""));
        let back: TemplateMeta = serde_json::from_str(&json).unwrap();
        assert_eq!(back, meta);
    }

    /// A `template.json` exactly as cubicle wrote it before layers existed.
    const FORMAT_1: &str = r#"{
  "format_version": 1,
  "recipe": "base",
  "recipe_hash": "e4bc29c3ec0f1b5e2998c3f1541daddc7bd1f77d3747bd15509cff0b9e6886b2",
  "uid_shift": 1000000000,
  "built_at": "2026-11-25T14:58:27Z",
  "size_bytes": 137392128,
  "file_count": 6263,
  "build_seconds": 39.6,
  "mirror": "http://deb.debian.org/debian"
}"#;

    #[test]
    fn format_1_metas_still_load_and_single_layers_still_write_format_1() {
        let old: TemplateMeta = serde_json::from_str(FORMAT_1).unwrap();
        assert_eq!(old.format_version, 1);
        assert_eq!(old.parent, None);
        assert_eq!(old.parent_built_at, None);
        assert!(old.aliases.is_empty());
        assert!(!old.code_interpreter);
        assert_eq!(old.unsupported(), None);
        // Written back, a single-layer meta has exactly the old fields: a cubicle that
        // predates layers reads it as before.
        let again: serde_json::Value = serde_json::to_value(&old).unwrap();
        let before: serde_json::Value = serde_json::from_str(FORMAT_1).unwrap();
        assert_eq!(again, before);
        assert_eq!(TemplateMeta::format_version_for(None), 1);
    }

    #[test]
    fn layered_metas_are_format_2_and_round_trip() {
        let meta = TemplateMeta {
            format_version: TemplateMeta::format_version_for(Some("base")),
            recipe: "code-interpreter".into(),
            parent: Some("base".into()),
            parent_built_at: Some("2026-11-25T14:58:27Z".into()),
            aliases: vec!["code-interpreter-v1".into()],
            code_interpreter: true,
            ..sample()
        };
        assert_eq!(meta.format_version, 2);
        assert_eq!(meta.unsupported(), None);
        let v = serde_json::to_value(&meta).unwrap();
        assert_eq!(v["parent"], "base");
        assert_eq!(v["aliases"][0], "code-interpreter-v1");
        assert_eq!(v["code_interpreter"], true);
        let back: TemplateMeta = serde_json::from_value(v).unwrap();
        assert_eq!(back, meta);
    }

    #[test]
    fn unsupported_formats_are_named() {
        for version in [0, 3, 99] {
            let m = TemplateMeta {
                format_version: version,
                ..sample()
            };
            let why = m.unsupported().unwrap();
            assert!(why.contains(&format!("format version {version}")), "{why}");
            assert!(why.contains("versions 1 to 2"), "{why}");
        }
        // Format 1 cannot describe a layer: such a file did not come from any cubicle.
        let m = TemplateMeta {
            format_version: 1,
            parent: Some("base".into()),
            ..sample()
        };
        assert!(m.unsupported().unwrap().contains("parent"));
        let m = TemplateMeta {
            format_version: 2,
            ..sample()
        };
        assert_eq!(m.unsupported(), None);
    }

    #[test]
    fn meta_rejects_missing_fields() {
        let mut v = serde_json::to_value(sample()).unwrap();
        v.as_object_mut().unwrap().remove("uid_shift");
        assert!(serde_json::from_value::<TemplateMeta>(v).is_err());
    }

    #[test]
    fn template_json_flattens_meta() {
        let t = Template {
            name: "base".parse().unwrap(),
            dir: "/d/templates/base".into(),
            rootfs: "/d/templates/base/rootfs".into(),
            meta: sample(),
        };
        let v = serde_json::to_value(&t).unwrap();
        assert_eq!(v["name"], "base");
        assert_eq!(v["file_count"], 8241);
        assert_eq!(v["rootfs"], "/d/templates/base/rootfs");
    }

    #[test]
    fn time_formatting() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_utc(1_779_287_462), "2026-05-20T14:31:02Z");
        assert_eq!(rfc3339_utc(4_107_542_399), "2100-02-28T23:59:59Z");
        for t in [
            0,
            59,
            86_399,
            951_782_400,
            1_709_251_199,
            1_779_287_462,
            4_107_542_400,
        ] {
            assert_eq!(parse_rfc3339_utc(&rfc3339_utc(t)), Some(t), "{t}");
        }
        assert_eq!(sample().built_at_unix(), Some(1_779_287_462));
        for bad in [
            "",
            "2026-05-20 14:31:02Z",
            "2026-02-30T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "1969-12-31T23:59:59Z",
            "2026-05-20T24:00:00Z",
            "2026-05-20T14:31:02+00:00",
            "+026-05-20T14:31:02Z",
        ] {
            assert_eq!(parse_rfc3339_utc(bad), None, "{bad}");
        }
    }
}
