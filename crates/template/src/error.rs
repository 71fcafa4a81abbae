//! The one error type of this crate.

use std::io;
use std::path::PathBuf;

use cubicle_core::ErrorKind;

/// Everything that can go wrong while looking up, building or removing a template.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// No template of this name is installed.
    #[error("template '{name}' {}", not_found_advice(.name))]
    NotFound {
        /// The template asked for.
        name: String,
    },

    /// A template directory exists but its `template.json` or root filesystem is not
    /// usable. Such a directory is not a template; rebuilding replaces it.
    #[error("template '{name}' is corrupt: {reason}; rebuild it with `cubicle tpl build {name}`")]
    Corrupt {
        /// The template asked for.
        name: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A layered template cannot be used because of its parent chain.
    #[error("template '{name}' cannot be used: its parent '{parent}': {reason}; rebuild it with `cubicle tpl build {name}`")]
    BrokenParent {
        /// The template asked for.
        name: String,
        /// The parent (or further ancestor) at fault.
        parent: String,
        /// What is wrong.
        reason: String,
    },

    /// Refusing to remove a template other templates are layers on.
    #[error("template '{name}' is the parent of {children}; remove {} first", if .children.contains(',') { "them" } else { "it" })]
    HasChildren {
        /// The template to remove.
        name: String,
        /// The templates built on it, comma separated.
        children: String,
    },

    /// There is no built-in recipe of this name.
    #[error("unknown template '{name}'; built-in templates: {known}")]
    UnknownRecipe {
        /// The name asked for.
        name: String,
        /// The built-in names, comma separated.
        known: String,
    },

    /// The name asked for a new template is taken.
    #[error("template '{name}' {reason}")]
    Exists {
        /// The name.
        name: String,
        /// Why it cannot be used.
        reason: String,
    },

    /// A container image cannot be read or unpacked.
    #[error(transparent)]
    Image(#[from] crate::oci::ImageError),

    /// The service, environment, ports or probe asked for do not fit the image.
    #[error(transparent)]
    RunConfig(#[from] crate::run_config::RunConfigError),

    /// A string is not a valid template name.
    #[error(transparent)]
    InvalidName(#[from] cubicle_core::IdError),

    /// A sandbox default asked for is out of range (e.g. the writable-layer size).
    #[error("invalid sandbox default: {0}")]
    InvalidDefaults(cubicle_core::LimitsError),

    /// Building needs root (debootstrap, chroot, chown of foreign uids).
    #[error(
        "building templates requires root, but this process runs as uid {uid}; run it with sudo"
    )]
    NotRoot {
        /// The effective uid of this process.
        uid: u32,
    },

    /// A program the build needs is not installed.
    #[error("`{tool}` is not installed (searched PATH, /usr/sbin and /sbin); run `apt-get install {package}`")]
    MissingTool {
        /// The program.
        tool: &'static str,
        /// The Debian package that provides it.
        package: &'static str,
    },

    /// No mirror was given and none could be found in the host's apt sources.
    #[error("no Debian {suite} mirror in the host's apt sources; pass --mirror URL")]
    NoMirror {
        /// The Debian suite looked for.
        suite: String,
    },

    /// The mirror URL given is not usable by debootstrap.
    #[error("invalid mirror URL {url:?}: {reason}")]
    InvalidMirror {
        /// The URL given.
        url: String,
        /// Why it is refused.
        reason: &'static str,
    },

    /// debootstrap failed; usually the mirror is unreachable or incomplete.
    #[error("debootstrap from {mirror} failed ({status}); pass --mirror URL to use another mirror; last output:\n{tail}")]
    Debootstrap {
        /// The mirror used.
        mirror: String,
        /// How the process ended.
        status: String,
        /// The last lines it printed.
        tail: String,
    },

    /// A build step other than debootstrap failed.
    #[error("{step} failed ({status}); last output:\n{tail}")]
    StepFailed {
        /// The step, in words.
        step: String,
        /// How the process ended.
        status: String,
        /// The last lines it printed.
        tail: String,
    },

    /// A uid or gid in the root filesystem plus the uid shift does not fit in 32 bits.
    #[error("cannot shift owner {id} of {path} by {shift}: the result does not fit in 32 bits")]
    UidOverflow {
        /// The file.
        path: PathBuf,
        /// Its uid or gid.
        id: u32,
        /// The shift asked for.
        shift: u32,
    },

    /// An owner in a freshly built layer is neither a sandbox id (below the range size)
    /// nor an already shifted one, so it cannot be mapped into sandboxes.
    #[error("{path} is owned by id {id}, which is neither below {range} nor in the shifted range {shift}..{}", u64::from(*.shift) + u64::from(*.range))]
    IdOutOfRange {
        /// The file.
        path: PathBuf,
        /// Its uid or gid.
        id: u32,
        /// The uid shift.
        shift: u32,
        /// How many ids sandboxes map.
        range: u32,
    },

    /// Refusing to delete a directory that has something mounted inside it.
    #[error("refusing to delete {path}: {mount} is mounted inside it; unmount it first")]
    MountedInside {
        /// The directory that was to be deleted.
        path: PathBuf,
        /// A mount point at or below it.
        mount: PathBuf,
    },

    /// A file system operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done, e.g. "read" or "rename".
        op: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl TemplateError {
    /// The coarse kind of this error, for exit codes and HTTP statuses.
    ///
    /// A corrupt template counts as [`ErrorKind::NotFound`]: a directory without a
    /// usable `template.json` is not a template.
    pub fn kind(&self) -> ErrorKind {
        match self {
            TemplateError::NotFound { .. }
            | TemplateError::Corrupt { .. }
            | TemplateError::BrokenParent { .. } => ErrorKind::NotFound,
            TemplateError::UnknownRecipe { .. }
            | TemplateError::RunConfig(_)
            | TemplateError::InvalidName(_)
            | TemplateError::InvalidDefaults(_)
            | TemplateError::InvalidMirror { .. } => ErrorKind::InvalidInput,
            TemplateError::NotRoot { .. }
            | TemplateError::MissingTool { .. }
            | TemplateError::NoMirror { .. }
            | TemplateError::Debootstrap { .. } => ErrorKind::Unavailable,
            TemplateError::MountedInside { .. }
            | TemplateError::HasChildren { .. }
            | TemplateError::Exists { .. } => ErrorKind::Conflict,
            TemplateError::Image(e) if e.is_input_error() => ErrorKind::InvalidInput,
            TemplateError::StepFailed { .. }
            | TemplateError::UidOverflow { .. }
            | TemplateError::IdOutOfRange { .. }
            | TemplateError::Image(_)
            | TemplateError::Io { .. } => ErrorKind::Internal,
        }
    }

    /// An [`TemplateError::Io`] for `op` on `path`.
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        TemplateError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

/// Shorthand for `map_err(|e| TemplateError::io(op, path, e))`.
pub(crate) trait IoContext<T> {
    /// Attaches the operation and path to an I/O error.
    fn ctx(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T, TemplateError>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T, TemplateError> {
        self.map_err(|e| TemplateError::io(op, path, e))
    }
}

/// What to do about a missing template: build it if it is a built-in recipe.
fn not_found_advice(name: &str) -> String {
    if crate::recipe::Recipe::builtin(name).is_ok() {
        format!("is not built; run `cubicle tpl build {name}`")
    } else {
        "does not exist; `cubicle tpl ls` lists the built templates".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_lowercase_without_trailing_period() {
        let errors = [
            TemplateError::NotFound {
                name: "base".into(),
            },
            TemplateError::NotRoot { uid: 1000 },
            TemplateError::MissingTool {
                tool: "debootstrap",
                package: "debootstrap",
            },
            TemplateError::NoMirror {
                suite: "bookworm".into(),
            },
        ];
        for e in &errors {
            let msg = e.to_string();
            assert!(!msg.ends_with('.'), "{msg}");
            assert!(!msg.starts_with(char::is_uppercase), "{msg}");
        }
        assert_eq!(
            errors[0].to_string(),
            "template 'base' is not built; run `cubicle tpl build base`"
        );
        let unknown = TemplateError::NotFound {
            name: "nope".into(),
        };
        assert_eq!(
            unknown.to_string(),
            "template 'nope' does not exist; `cubicle tpl ls` lists the built templates"
        );
        assert!(errors[2]
            .to_string()
            .contains("apt-get install debootstrap"));
        assert_eq!(
            errors[3].to_string(),
            "no Debian bookworm mirror in the host's apt sources; pass --mirror URL"
        );
        assert_eq!(errors[0].kind(), ErrorKind::NotFound);
        assert_eq!(errors[1].kind(), ErrorKind::Unavailable);
    }
}
