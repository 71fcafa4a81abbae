//! Paths given by clients: absolute, `~`-prefixed or relative to the user's home, made
//! absolute and normalised lexically (`.`/`..` resolved, never above `/`).
//!
//! The agent lives inside the sandbox's root, so no path can name anything outside the
//! sandbox; normalising only makes answers predictable.

use std::path::{Component, Path, PathBuf};

/// Why a client path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The path contains a NUL byte.
    #[error("path {0:?} contains a NUL byte")]
    Nul(String),
    /// The path is not valid UTF-8 (after percent-decoding).
    #[error("path is not valid UTF-8")]
    NotUtf8,
}

/// Resolves `path` for a user whose home is `home`. An empty path is the home itself.
pub fn resolve(path: &str, home: &Path) -> Result<PathBuf, PathError> {
    if path.contains('\0') {
        return Err(PathError::Nul(path.to_owned()));
    }
    let joined = if path.is_empty() || path == "~" {
        home.to_owned()
    } else if let Some(rest) = path.strip_prefix("~/") {
        home.join(rest)
    } else if path.starts_with('/') {
        PathBuf::from(path)
    } else {
        home.join(path)
    };
    Ok(normalize(&joined))
}

/// Lexical normalisation of an absolute path.
pub fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// A path as UTF-8 text for a response (non-UTF-8 bytes become U+FFFD, as envd does).
pub fn display(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolution() {
        let home = Path::new("/home/user");
        assert_eq!(resolve("", home).unwrap(), Path::new("/home/user"));
        assert_eq!(resolve("~", home).unwrap(), Path::new("/home/user"));
        assert_eq!(resolve("~/a", home).unwrap(), Path::new("/home/user/a"));
        assert_eq!(resolve("a/b", home).unwrap(), Path::new("/home/user/a/b"));
        assert_eq!(
            resolve("/etc/./x/../passwd", home).unwrap(),
            Path::new("/etc/passwd")
        );
        assert_eq!(resolve("/../../etc", home).unwrap(), Path::new("/etc"));
        assert_eq!(resolve("../../../..", home).unwrap(), Path::new("/"));
        assert!(matches!(resolve("a\0b", home), Err(PathError::Nul(_))));
    }
}
