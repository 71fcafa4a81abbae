//! Built-in template recipes: data (suite, packages) plus shell scripts run in the
//! new root filesystem. A recipe's SHA-256 decides whether a built template is current.

use cubicle_core::TemplateName;
use sha2::{Digest, Sha256};

use crate::error::TemplateError;

/// How to build one template from Debian packages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recipe {
    /// The template's name.
    pub name: &'static str,
    /// One line for humans.
    pub description: &'static str,
    /// Bumped whenever the build code (not only this data) changes what gets built.
    pub version: u32,
    /// The Debian suite to bootstrap.
    pub suite: &'static str,
    /// debootstrap's `--variant`.
    pub variant: &'static str,
    /// Packages passed to debootstrap's `--include` (their dependencies come along,
    /// recommendations do not).
    pub packages: &'static [&'static str],
    /// Shell script (`sh -eu`) run in the root filesystem after bootstrapping.
    pub configure_script: &'static str,
    /// Shell script (`sh -eu`) run in the root filesystem to remove what is not needed.
    pub trim_script: &'static str,
}

/// The `base` template: Debian bookworm minbase with bash, coreutils, procps, python3,
/// ca-certificates and sudo, a user `user` (uid 1000) with passwordless sudo, and no
/// documentation, manuals, translations or apt lists.
pub const BASE: Recipe = Recipe {
    name: "base",
    description: "Debian 12 (bookworm) minbase with python3, sudo and the user `user`",
    version: 1,
    suite: "bookworm",
    variant: "minbase",
    packages: &[
        "bash",
        "coreutils",
        "procps",
        "python3",
        "ca-certificates",
        "sudo",
    ],
    configure_script: include_str!("../recipes/base/configure.sh"),
    trim_script: include_str!("../recipes/base/trim.sh"),
};

/// Every built-in recipe.
pub const BUILTIN: &[&Recipe] = &[&BASE];

impl Recipe {
    /// The built-in recipe called `name`.
    pub fn builtin(name: &str) -> Result<&'static Recipe, TemplateError> {
        BUILTIN
            .iter()
            .copied()
            .find(|r| r.name == name)
            .ok_or_else(|| TemplateError::UnknownRecipe {
                name: name.to_owned(),
                known: BUILTIN
                    .iter()
                    .map(|r| r.name)
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// The recipe's name as a [`TemplateName`].
    pub fn template_name(&self) -> Result<TemplateName, TemplateError> {
        Ok(self.name.parse()?)
    }

    /// Hex SHA-256 over everything that determines the built root filesystem: the
    /// recipe's name, version, suite, variant, packages, scripts, and the uid shift.
    /// The mirror is not included: any mirror serves the same packages.
    pub fn hash(&self, uid_shift: u32) -> String {
        let mut h = Sha256::new();
        let mut field = |key: &str, value: &[u8]| {
            // Length-prefixed, so no two different recipes serialize the same way.
            h.update(key.as_bytes());
            h.update((value.len() as u64).to_le_bytes());
            h.update(value);
        };
        field("cubicle-recipe", b"1");
        field("name", self.name.as_bytes());
        field("version", self.version.to_string().as_bytes());
        field("suite", self.suite.as_bytes());
        field("variant", self.variant.as_bytes());
        field("packages", self.packages.join(",").as_bytes());
        field("configure", self.configure_script.as_bytes());
        field("trim", self.trim_script.as_bytes());
        field("uid_shift", uid_shift.to_string().as_bytes());
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_stable_hex() {
        let a = BASE.hash(1_000_000_000);
        assert_eq!(a, BASE.hash(1_000_000_000));
        assert_eq!(a.len(), 64);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    }

    #[test]
    fn hash_changes_with_every_input() {
        let base = BASE.hash(1_000_000_000);
        let variants = [
            Recipe { version: 2, ..BASE },
            Recipe {
                suite: "trixie",
                ..BASE
            },
            Recipe {
                variant: "buildd",
                ..BASE
            },
            Recipe {
                packages: &["bash"],
                ..BASE
            },
            Recipe {
                configure_script: "true\n",
                ..BASE
            },
            Recipe {
                trim_script: "true\n",
                ..BASE
            },
            Recipe {
                name: "other",
                ..BASE
            },
        ];
        for v in &variants {
            assert_ne!(v.hash(1_000_000_000), base, "{v:?}");
        }
        assert_ne!(BASE.hash(0), base);
        // Moving text between fields must not collide either.
        let a = Recipe {
            configure_script: "ab",
            trim_script: "c",
            ..BASE
        };
        let b = Recipe {
            configure_script: "a",
            trim_script: "bc",
            ..BASE
        };
        assert_ne!(a.hash(0), b.hash(0));
    }

    #[test]
    fn builtin_lookup() {
        assert_eq!(Recipe::builtin("base").unwrap().name, "base");
        let err = Recipe::builtin("ubuntu").unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown template 'ubuntu'; built-in templates: base"
        );
        assert_eq!(err.kind(), cubicle_core::ErrorKind::InvalidInput);
        for r in BUILTIN {
            r.template_name().unwrap();
        }
    }

    #[test]
    fn base_recipe_contents() {
        for p in [
            "bash",
            "coreutils",
            "procps",
            "python3",
            "ca-certificates",
            "sudo",
        ] {
            assert!(BASE.packages.contains(&p), "{p}");
        }
        assert!(BASE.configure_script.contains("NOPASSWD"));
        assert!(BASE.trim_script.contains("path-exclude /usr/share/doc/*"));
    }
}
