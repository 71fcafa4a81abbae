//! Validated identifiers. Both kinds end up in file paths, cgroup names, host names and
//! URL segments, so their alphabets are strict.

use std::fmt;
use std::str::FromStr;

use rand::Rng;
use serde::{Deserialize, Serialize};

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// An empty string.
    #[error("{what} must not be empty")]
    Empty {
        /// Which kind of identifier was being parsed.
        what: &'static str,
    },
    /// A string longer than the kind allows.
    #[error("{what} is {len} characters long, at most {max} are allowed")]
    TooLong {
        /// Which kind of identifier was being parsed.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// The first character may not start an identifier of this kind.
    #[error("{what} {value:?} must start with a lowercase letter or digit")]
    BadStart {
        /// Which kind of identifier was being parsed.
        what: &'static str,
        /// The whole offending value.
        value: String,
    },
    /// A character outside the kind's alphabet.
    #[error("{what} {value:?} has the character {ch:?}; allowed are {allowed}")]
    BadChar {
        /// Which kind of identifier was being parsed.
        what: &'static str,
        /// The whole offending value.
        value: String,
        /// The first character that is not allowed.
        ch: char,
        /// The alphabet, in words.
        allowed: &'static str,
    },
}

/// A sandbox identifier: 1–40 characters of `[a-z0-9]`.
///
/// The E2B SDK puts sandbox ids unencoded into URL paths and DNS labels
/// (`{port}-{id}.{domain}`), and Cubicle uses them as host names, cgroup and directory
/// names, so nothing else is accepted.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SandboxId(String);

impl SandboxId {
    /// The longest accepted id.
    pub const MAX_LEN: usize = 40;
    const GENERATED_LEN: usize = 20;

    /// A fresh random id: a letter followed by 19 letters or digits (~98 bits).
    pub fn generate() -> Self {
        const LETTERS: &[u8] = b"abcdefghijklmnopqrstuvwxyz";
        const ALNUM: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        let mut rng = rand::thread_rng();
        let mut s = String::with_capacity(Self::GENERATED_LEN);
        s.push(LETTERS[rng.gen_range(0..LETTERS.len())] as char);
        for _ in 1..Self::GENERATED_LEN {
            s.push(ALNUM[rng.gen_range(0..ALNUM.len())] as char);
        }
        SandboxId(s)
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for SandboxId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        const WHAT: &str = "sandbox id";
        check_len(WHAT, s, Self::MAX_LEN)?;
        if let Some(ch) = s
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit()))
        {
            return Err(IdError::BadChar {
                what: WHAT,
                value: s.to_owned(),
                ch,
                allowed: "lowercase ASCII letters and digits",
            });
        }
        Ok(SandboxId(s.to_owned()))
    }
}

/// A template name such as `base` or `code-interpreter-v1`: 1–63 characters of
/// `[a-z0-9._-]`, starting with a letter or digit.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TemplateName(String);

impl TemplateName {
    /// The longest accepted name (one DNS label).
    pub const MAX_LEN: usize = 63;

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for TemplateName {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        const WHAT: &str = "template name";
        check_len(WHAT, s, Self::MAX_LEN)?;
        let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c);
        if let Some(ch) = s.chars().find(|c| !allowed(*c)) {
            return Err(IdError::BadChar {
                what: WHAT,
                value: s.to_owned(),
                ch,
                allowed: "lowercase ASCII letters, digits, '.', '_' and '-'",
            });
        }
        if !s.starts_with(|c: char| c.is_ascii_alphanumeric()) {
            return Err(IdError::BadStart {
                what: WHAT,
                value: s.to_owned(),
            });
        }
        Ok(TemplateName(s.to_owned()))
    }
}

fn check_len(what: &'static str, s: &str, max: usize) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty { what });
    }
    if s.len() > max {
        return Err(IdError::TooLong {
            what,
            len: s.len(),
            max,
        });
    }
    Ok(())
}

macro_rules! string_newtype_impls {
    ($t:ty) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl TryFrom<String> for $t {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                s.parse()
            }
        }
        impl From<$t> for String {
            fn from(v: $t) -> String {
                v.0
            }
        }
        impl AsRef<str> for $t {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}
string_newtype_impls!(SandboxId);
string_newtype_impls!(TemplateName);

/// `hex`'s hex digits in a UUID's 8-4-4-4-12 groups: other characters are skipped, and
/// fewer than 32 digits are padded with `0`s (E2B's build ids are UUID-shaped).
pub fn uuid_shaped(hex: &str) -> String {
    let h: String = hex
        .chars()
        .filter(char::is_ascii_hexdigit)
        .chain(std::iter::repeat('0'))
        .take(32)
        .collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A random UUID (version 4).
pub fn random_uuid() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    uuid_shaped(&hex)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids() {
        assert_eq!(
            uuid_shaped("abcdef0123456789abcdef0123456789ff"),
            "abcdef01-2345-6789-abcd-ef0123456789"
        );
        assert_eq!(uuid_shaped("ab"), "ab000000-0000-0000-0000-000000000000");
        let id = random_uuid();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"), "{id}");
        assert_ne!(id, random_uuid());
    }

    #[test]
    fn generated_ids_are_valid_and_distinct() {
        let a = SandboxId::generate();
        let b = SandboxId::generate();
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), 20);
        assert_eq!(a.as_str().parse::<SandboxId>().unwrap(), a);
        assert!(a.as_str().chars().next().unwrap().is_ascii_lowercase());
    }

    #[test]
    fn sandbox_id_rejects_bad_input() {
        assert_eq!(
            "".parse::<SandboxId>(),
            Err(IdError::Empty { what: "sandbox id" })
        );
        assert!(matches!(
            "A1".parse::<SandboxId>(),
            Err(IdError::BadChar { ch: 'A', .. })
        ));
        assert!(matches!(
            "../etc".parse::<SandboxId>(),
            Err(IdError::BadChar { ch: '.', .. })
        ));
        assert!(matches!(
            "a".repeat(41).parse::<SandboxId>(),
            Err(IdError::TooLong { len: 41, .. })
        ));
        assert!("a".repeat(40).parse::<SandboxId>().is_ok());
    }

    #[test]
    fn template_name_rules() {
        assert!("base".parse::<TemplateName>().is_ok());
        assert!("code-interpreter-v1".parse::<TemplateName>().is_ok());
        assert!("my_tpl.2".parse::<TemplateName>().is_ok());
        assert_eq!(
            "-x".parse::<TemplateName>().unwrap_err().to_string(),
            "template name \"-x\" must start with a lowercase letter or digit"
        );
        assert!(matches!(
            "a/b".parse::<TemplateName>(),
            Err(IdError::BadChar { ch: '/', .. })
        ));
        assert!(matches!(
            "..".parse::<TemplateName>(),
            Err(IdError::BadStart { .. })
        ));
    }

    #[test]
    fn serde_validates() {
        let ok: SandboxId = serde_json::from_str("\"abc123\"").unwrap();
        assert_eq!(ok.as_str(), "abc123");
        assert!(serde_json::from_str::<SandboxId>("\"ABC\"").is_err());
    }
}
