//! What is recorded about a built template (`template.json`) and the handle to one.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use cubicle_core::TemplateName;
use serde::{Deserialize, Serialize};

/// The contents of `templates/<name>/template.json`, written last by a build.
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
}

impl TemplateMeta {
    /// The only format this crate reads and writes.
    pub const FORMAT_VERSION: u32 = 1;

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
    /// `templates/<name>/rootfs/`: the read-only lower layer of its sandboxes.
    pub rootfs: PathBuf,
    /// What `template.json` says.
    #[serde(flatten)]
    pub meta: TemplateMeta,
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
            format_version: TemplateMeta::FORMAT_VERSION,
            recipe: "base".into(),
            recipe_hash: "ab".repeat(32),
            uid_shift: 1_000_000_000,
            built_at: "2026-05-20T14:31:02Z".into(),
            size_bytes: 123_456_789,
            file_count: 8241,
            build_seconds: 41.5,
            mirror: "http://deb.debian.org/debian".into(),
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
