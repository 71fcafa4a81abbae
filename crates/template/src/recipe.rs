//! Built-in template recipes: data (suite, packages) plus shell scripts run in the
//! new root filesystem. A recipe's SHA-256 decides whether a built template is current.
//!
//! A recipe either bootstraps a whole root filesystem (`parent: None`, debootstrap) or
//! builds a *layer* on top of its parent's template (`parent: Some(..)`): `apt-get
//! install` in an overlay of the parent's layers, keeping only the difference.

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
    /// The Debian suite to bootstrap; a layered recipe must name its parent's.
    pub suite: &'static str,
    /// debootstrap's `--variant`; empty for a layered recipe.
    pub variant: &'static str,
    /// The recipe whose template this one is a layer on; `None` for a root filesystem
    /// of its own.
    pub parent: Option<&'static Recipe>,
    /// Other names the template is found by (`TemplateStore::get`), recorded in its
    /// `template.json`.
    pub aliases: &'static [&'static str],
    /// Whether sandboxes of this template run the code interpreter.
    pub code_interpreter: bool,
    /// Without a parent: packages passed to debootstrap's `--include`. With a parent:
    /// packages given to `apt-get install --no-install-recommends`. Either way their
    /// dependencies come along, recommendations do not.
    pub packages: &'static [&'static str],
    /// Layered recipes only: packages replaced by empty stand-ins (same name, a version
    /// just above the mirror's) before installing, because Debian declares them as
    /// dependencies that the template does not need at run time (bookworm's
    /// python3-scipy depends on the pythran compiler, which pulls in g++, Boost and the
    /// Python headers: some 300 MB).
    pub stub_packages: &'static [&'static str],
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
    parent: None,
    aliases: &[],
    code_interpreter: false,
    stub_packages: &[],
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

/// The `code-interpreter` template: a layer on [`BASE`] with Debian's scientific Python
/// stack (numpy, pandas, matplotlib, scipy, scikit-learn, seaborn, IPython, ...) and
/// Node.js 18, byte-compiled, with matplotlib's font cache built for `user` and root.
/// sympy comes along as a dependency of fonttools (matplotlib's). About 470 MiB on top
/// of base's 131 MiB, a third of it `.pyc` files.
pub const CODE_INTERPRETER: Recipe = Recipe {
    name: "code-interpreter",
    description:
        "base plus Python's data stack (numpy, pandas, matplotlib, scipy, IPython) and Node.js",
    version: 1,
    suite: BASE.suite,
    variant: "",
    parent: Some(&BASE),
    aliases: &["code-interpreter-v1"],
    code_interpreter: true,
    packages: &[
        "python3-numpy",
        "python3-pandas",
        "python3-matplotlib",
        "python3-matplotlib-inline",
        "python3-scipy",
        "python3-sklearn",
        "python3-seaborn",
        "python3-ipython",
        "python3-requests",
        "python3-pil",
        "python3-openpyxl",
        "python3-xlrd",
        "python3-bs4",
        "python3-tabulate",
        "python3-yaml",
        "nodejs",
        "fonts-dejavu-core",
    ],
    // pythran is scipy's compiler (it pulls in g++, Boost and the Python headers);
    // unicode-data is the raw Unicode database fonttools' packaging asks for, which no
    // installed module reads.
    stub_packages: &["python3-pythran", "unicode-data"],
    configure_script: include_str!("../recipes/code-interpreter/configure.sh"),
    trim_script: include_str!("../recipes/code-interpreter/trim.sh"),
};

/// Every built-in recipe.
pub const BUILTIN: &[&Recipe] = &[&BASE, &CODE_INTERPRETER];

/// Shell script (`sh -eu`) that installs a layered recipe's packages, run in the
/// overlay of its parent's layers with `CUBICLE_MIRROR`, `CUBICLE_SUITE`,
/// `CUBICLE_STUBS` and `CUBICLE_PACKAGES` set. Part of every layered recipe's hash.
pub const LAYER_INSTALL_SCRIPT: &str = include_str!("../recipes/layer-install.sh");

/// How deep parent chains may go (recipes and installed templates alike).
pub const MAX_LAYERS: usize = 8;

impl Recipe {
    /// The built-in recipe called `name` or having `name` among its aliases.
    pub fn builtin(name: &str) -> Result<&'static Recipe, TemplateError> {
        BUILTIN
            .iter()
            .copied()
            .find(|r| r.name == name)
            .or_else(|| BUILTIN.iter().copied().find(|r| r.aliases.contains(&name)))
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

    /// The recipes this one builds on, nearest first (empty without a parent).
    pub fn ancestors(&self) -> Vec<&'static Recipe> {
        let mut out: Vec<&'static Recipe> = Vec::new();
        let mut next = self.parent;
        while let Some(p) = next {
            if out.len() == MAX_LAYERS || out.iter().any(|a| a.name == p.name) {
                break; // cannot happen with built-in recipes; never loop
            }
            out.push(p);
            next = p.parent;
        }
        out
    }

    /// Hex SHA-256 over everything that determines the built root filesystem: the
    /// recipe's name, version, suite, variant, packages, scripts, and the uid shift;
    /// for a layered recipe also its parent's hash (so a changed parent makes its
    /// children outdated), the layer install script, aliases and the code-interpreter
    /// flag. The mirror is not included: any mirror serves the same packages.
    ///
    /// A recipe without parent, aliases or code interpreter hashes exactly as before
    /// layers existed, so installed `base` templates stay current.
    pub fn hash(&self, uid_shift: u32) -> String {
        self.hash_at_depth(uid_shift, 0)
    }

    fn hash_at_depth(&self, uid_shift: u32, depth: usize) -> String {
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
        if let Some(parent) = self.parent {
            let parent_hash = if depth < MAX_LAYERS {
                parent.hash_at_depth(uid_shift, depth + 1)
            } else {
                String::from("too deep")
            };
            field("parent", parent_hash.as_bytes());
            field("layer_install", LAYER_INSTALL_SCRIPT.as_bytes());
        }
        if !self.aliases.is_empty() {
            field("aliases", self.aliases.join(",").as_bytes());
        }
        if !self.stub_packages.is_empty() {
            field("stub_packages", self.stub_packages.join(",").as_bytes());
        }
        if self.code_interpreter {
            field("code_interpreter", b"1");
        }
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
    fn base_hash_did_not_change_with_layers() {
        // What the installed `base` templates record: adding layers must not make them
        // outdated. Changing the base recipe on purpose changes this value.
        assert_eq!(
            BASE.hash(1_000_000_000),
            "e4bc29c3ec0f1b5e2998c3f1541daddc7bd1f77d3747bd15509cff0b9e6886b2"
        );
    }

    #[test]
    fn a_layer_hash_chains_its_parent_hash() {
        static BASE_V2: Recipe = Recipe { version: 2, ..BASE };
        let ci = CODE_INTERPRETER.hash(1_000_000_000);
        let on_other_base = Recipe {
            parent: Some(&BASE_V2),
            ..CODE_INTERPRETER
        };
        assert_ne!(on_other_base.hash(1_000_000_000), ci);
        // Every field of the layer counts too, its aliases and interpreter flag included.
        for v in [
            Recipe {
                aliases: &[],
                ..CODE_INTERPRETER
            },
            Recipe {
                code_interpreter: false,
                ..CODE_INTERPRETER
            },
            Recipe {
                packages: &["nodejs"],
                ..CODE_INTERPRETER
            },
            Recipe {
                stub_packages: &[],
                ..CODE_INTERPRETER
            },
            Recipe {
                parent: None,
                ..CODE_INTERPRETER
            },
        ] {
            assert_ne!(v.hash(1_000_000_000), ci, "{}", v.name);
        }
        assert_ne!(CODE_INTERPRETER.hash(0), ci);
        assert_eq!(CODE_INTERPRETER.hash(1_000_000_000), ci, "stable");
    }

    #[test]
    fn code_interpreter_recipe() {
        let r = &CODE_INTERPRETER;
        assert_eq!(r.parent.map(|p| p.name), Some("base"));
        assert_eq!(r.suite, BASE.suite);
        assert_eq!(r.aliases, ["code-interpreter-v1"]);
        assert!(r.code_interpreter && !BASE.code_interpreter);
        for p in [
            "python3-numpy",
            "python3-pandas",
            "python3-matplotlib",
            "python3-ipython",
            "nodejs",
            "fonts-dejavu-core",
        ] {
            assert!(r.packages.contains(&p), "{p}");
        }
        assert_eq!(
            r.ancestors().iter().map(|a| a.name).collect::<Vec<_>>(),
            ["base"]
        );
        assert!(BASE.ancestors().is_empty());
        assert!(r.configure_script.contains("compileall"));
        assert!(LAYER_INSTALL_SCRIPT.contains("--no-install-recommends"));
    }

    #[test]
    fn builtin_lookup() {
        assert_eq!(Recipe::builtin("base").unwrap().name, "base");
        assert_eq!(
            Recipe::builtin("code-interpreter").unwrap().name,
            "code-interpreter"
        );
        assert_eq!(
            Recipe::builtin("code-interpreter-v1").unwrap().name,
            "code-interpreter"
        );
        let err = Recipe::builtin("ubuntu").unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown template 'ubuntu'; built-in templates: base, code-interpreter"
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
