//! Requests to the controller and their validation (limits on everything a caller can
//! send, so no request can make the daemon store or forward unbounded data).

use std::collections::BTreeMap;

use cubicle_core::{SandboxState, TemplateName};
use cubicle_store::Order;

use crate::ControlError;

/// Most metadata pairs per sandbox.
pub const MAX_METADATA: usize = 100;
/// Longest metadata key.
pub const MAX_METADATA_KEY: usize = 256;
/// Longest metadata value.
pub const MAX_METADATA_VALUE: usize = 4096;
/// Most environment variables per sandbox.
pub const MAX_ENV_VARS: usize = 1000;
/// Most bytes of environment variables per sandbox (names and values).
pub const MAX_ENV_BYTES: usize = 1 << 20;
/// Longest single `NAME=value` (Linux refuses longer strings at `execve`: MAX_ARG_STRLEN
/// is 32 pages, including the terminating NUL).
pub const MAX_ENV_ENTRY: usize = 32 * 4096 - 1;

/// `POST /sandboxes`, already decoded from JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateRequest {
    /// Template name or alias, or a snapshot id (`my-snap:default`, `ns/my-snap`).
    pub template: String,
    /// Seconds until the sandbox is killed; `None` for the default.
    pub timeout_secs: Option<u64>,
    /// Free-form labels, filterable in list.
    pub metadata: BTreeMap<String, String>,
    /// Exported into every process of the sandbox.
    pub env_vars: BTreeMap<String, String>,
    /// Require an envd access token (always on for the v2 API).
    pub secure: bool,
    /// Accepted; sandboxes have loopback networking only for now.
    pub allow_internet_access: bool,
    /// Pause instead of kill on timeout.
    pub auto_pause: bool,
    /// The client's `Idempotency-Key`: a retry with the same key gets the same sandbox.
    pub idempotency_key: Option<String>,
}

impl CreateRequest {
    /// Checks sizes and characters; returns the template name, or `None` when
    /// `template` can only be a snapshot id (it has a `:` tag or a `/` namespace).
    pub fn validate(&self, max_timeout_secs: u64) -> Result<Option<TemplateName>, ControlError> {
        let template = if self.template.contains([':', '/']) {
            check_snapshot_ref(&self.template)
                .map_err(|e| ControlError::InvalidInput(format!("templateID: {e}")))?;
            None
        } else {
            Some(
                self.template
                    .parse::<TemplateName>()
                    .map_err(|e| ControlError::InvalidInput(format!("templateID: {e}")))?,
            )
        };
        if let Some(t) = self.timeout_secs {
            if t == 0 || t > max_timeout_secs {
                return Err(ControlError::InvalidInput(format!(
                    "timeout must be between 1 and {max_timeout_secs} seconds, got {t}"
                )));
            }
        }
        if self.metadata.len() > MAX_METADATA {
            return Err(ControlError::InvalidInput(format!(
                "at most {MAX_METADATA} metadata entries are allowed, got {}",
                self.metadata.len()
            )));
        }
        for (k, v) in &self.metadata {
            if k.is_empty() || k.len() > MAX_METADATA_KEY || v.len() > MAX_METADATA_VALUE {
                return Err(ControlError::InvalidInput(format!(
                    "metadata keys must be 1..={MAX_METADATA_KEY} bytes and values at most \
                     {MAX_METADATA_VALUE} bytes (key {:?})",
                    truncate(k)
                )));
            }
        }
        if self.env_vars.len() > MAX_ENV_VARS {
            return Err(ControlError::InvalidInput(format!(
                "at most {MAX_ENV_VARS} envVars are allowed, got {}",
                self.env_vars.len()
            )));
        }
        let mut bytes = 0;
        for (k, v) in &self.env_vars {
            if k.is_empty() || k.contains(['=', '\0']) || v.contains('\0') {
                return Err(ControlError::InvalidInput(format!(
                    "envVars name {:?} is invalid: names are non-empty without '=' or NUL, \
                     values without NUL",
                    truncate(k)
                )));
            }
            if k.len() + 1 + v.len() > MAX_ENV_ENTRY {
                return Err(ControlError::InvalidInput(format!(
                    "envVars {:?} is {} bytes as NAME=value; Linux runs no program with an \
                     environment entry over {MAX_ENV_ENTRY} bytes",
                    truncate(k),
                    k.len() + 1 + v.len()
                )));
            }
            bytes += k.len() + v.len();
        }
        if bytes > MAX_ENV_BYTES {
            return Err(ControlError::InvalidInput(format!(
                "envVars total {bytes} bytes, at most {MAX_ENV_BYTES} are allowed"
            )));
        }
        if let Some(key) = &self.idempotency_key {
            if key.is_empty()
                || key.len() > 255
                || !key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(ControlError::InvalidInput(
                    "Idempotency-Key must be 1-255 characters of [A-Za-z0-9_-]".into(),
                ));
            }
        }
        Ok(template)
    }
}

/// Longest snapshot reference (`namespace/name:tag`).
pub const MAX_SNAPSHOT_REF: usize = 256;

/// Checks the characters of a snapshot reference: `[namespace/]name[:tag]`, each part
/// of ASCII letters, digits, `.`, `_` and `-`, starting with a letter or digit.
pub fn check_snapshot_ref(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > MAX_SNAPSHOT_REF {
        return Err(format!(
            "a snapshot id is 1 to {MAX_SNAPSHOT_REF} characters long"
        ));
    }
    let (ns, rest) = match s.split_once('/') {
        Some((ns, rest)) => (Some(ns), rest),
        None => (None, s),
    };
    let (name, tag) = match rest.split_once(':') {
        Some((name, tag)) => (name, Some(tag)),
        None => (rest, None),
    };
    let part_ok = |p: &str| {
        p.starts_with(|c: char| c.is_ascii_alphanumeric())
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    };
    if ns.is_some_and(|n| !part_ok(n)) || !part_ok(name) || tag.is_some_and(|t| !part_ok(t)) {
        return Err(format!(
            "{:?} is not a template name or snapshot id ([namespace/]name[:tag] of letters, \
             digits, '.', '_' and '-')",
            truncate(s)
        ));
    }
    Ok(())
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(40) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// `GET /v2/sandboxes`, already decoded from the query string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListRequest {
    /// States to include (empty: every live state).
    pub states: Vec<SandboxState>,
    /// Every pair must match.
    pub metadata: Vec<(String, String)>,
    /// Template name or alias.
    pub template: Option<String>,
    /// Only sandboxes started after this instant.
    pub started_after_ms: Option<i64>,
    /// Oldest or newest first.
    pub order: Order,
    /// Page size (1..=1000).
    pub limit: u32,
    /// Cursor from the previous page.
    pub cursor: Option<String>,
}

impl Default for ListRequest {
    fn default() -> Self {
        ListRequest {
            states: Vec::new(),
            metadata: Vec::new(),
            template: None,
            started_after_ms: None,
            order: Order::Desc,
            limit: 100,
            cursor: None,
        }
    }
}

impl ListRequest {
    /// Largest page.
    pub const MAX_LIMIT: u32 = 1000;

    /// Checks the page size and states.
    pub fn validate(&self) -> Result<(), ControlError> {
        if self.limit == 0 || self.limit > Self::MAX_LIMIT {
            return Err(ControlError::InvalidInput(format!(
                "limit must be between 1 and {}, got {}",
                Self::MAX_LIMIT,
                self.limit
            )));
        }
        if self.metadata.len() > MAX_METADATA {
            return Err(ControlError::InvalidInput(format!(
                "at most {MAX_METADATA} metadata pairs can be filtered on, got {}",
                self.metadata.len()
            )));
        }
        if self.states.contains(&SandboxState::Killed)
            || self.states.contains(&SandboxState::Creating)
        {
            return Err(ControlError::InvalidInput(
                "state may only be running or paused".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> CreateRequest {
        CreateRequest {
            template: "base".into(),
            ..Default::default()
        }
    }

    #[test]
    fn valid_requests_pass() {
        let mut r = req();
        r.timeout_secs = Some(300);
        r.metadata.insert("user".into(), "abc".into());
        r.env_vars.insert("FOO".into(), "bar=baz".into());
        r.idempotency_key = Some("abc-123".into());
        assert_eq!(r.validate(3600).unwrap().unwrap().as_str(), "base");
        r.template = "team/my-snap:default".into();
        assert_eq!(r.validate(3600).unwrap(), None);
        for bad in ["a:b:c", "/x", "x/", "a/b/c", "x:", ":x", "a b:c", "é:x"] {
            r.template = bad.into();
            assert!(r.validate(3600).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_limit_is_enforced() {
        let bad = |f: &dyn Fn(&mut CreateRequest)| {
            let mut r = req();
            f(&mut r);
            r.validate(3600).unwrap_err()
        };
        assert!(matches!(
            bad(&|r| r.template = "../etc".into()),
            ControlError::InvalidInput(_)
        ));
        assert!(matches!(
            bad(&|r| r.template = String::new()),
            ControlError::InvalidInput(_)
        ));
        assert!(bad(&|r| r.timeout_secs = Some(0))
            .to_string()
            .contains("between 1 and 3600"));
        assert!(matches!(
            bad(&|r| r.timeout_secs = Some(3601)),
            ControlError::InvalidInput(_)
        ));
        assert!(matches!(
            bad(&|r| r
                .metadata
                .insert("k".repeat(300), "v".into())
                .map(drop)
                .unwrap_or(())),
            ControlError::InvalidInput(_)
        ));
        assert!(matches!(
            bad(&|r| {
                for i in 0..=MAX_METADATA {
                    r.metadata.insert(i.to_string(), String::new());
                }
            }),
            ControlError::InvalidInput(_)
        ));
        assert!(matches!(
            bad(&|r| r
                .env_vars
                .insert("A=B".into(), "x".into())
                .map(drop)
                .unwrap_or(())),
            ControlError::InvalidInput(_)
        ));
        assert!(matches!(
            bad(&|r| r
                .env_vars
                .insert("A".into(), "x".repeat(MAX_ENV_BYTES))
                .map(drop)
                .unwrap_or(())),
            ControlError::InvalidInput(_)
        ));
        assert!(matches!(
            bad(&|r| r.idempotency_key = Some("bad key".into())),
            ControlError::InvalidInput(_)
        ));
    }

    #[test]
    fn single_env_entries_fit_execve() {
        let mut big = req();
        big.env_vars.insert("BIG".into(), "x".repeat(140_000));
        assert!(matches!(
            big.validate(3600),
            Err(ControlError::InvalidInput(_))
        ));
        let mut at_limit = req();
        at_limit
            .env_vars
            .insert("B".into(), "x".repeat(MAX_ENV_ENTRY - 2));
        at_limit.validate(3600).unwrap();
    }

    #[test]
    fn list_limits() {
        let mut l = ListRequest::default();
        l.validate().unwrap();
        l.limit = 0;
        assert!(l.validate().is_err());
        l.limit = 1001;
        assert!(l.validate().is_err());
        l.limit = 5;
        l.states = vec![SandboxState::Killed];
        assert!(l.validate().is_err());
        l.states = Vec::new();
        l.metadata = (0..=MAX_METADATA)
            .map(|i| (i.to_string(), String::new()))
            .collect();
        assert!(l.validate().is_err());
    }
}
