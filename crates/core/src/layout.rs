//! The on-disk layout of Cubicle's data directory (default `/var/lib/cubicle`):
//!
//! ```text
//! <root>/
//!   templates/<name>/rootfs/        read-only lower layer of every sandbox of <name>
//!   templates/<name>/template.json  what was built, from which recipe, with which uid shift
//!   templates/.build-<name>-<rand>/ a build in progress (renamed into place when done)
//!   sandboxes/<id>/upper|work/      the sandbox's writable overlay layer
//!   sandboxes/<id>/rootfs/          mount point of the merged root (inside the sandbox only)
//!   sandboxes/<id>/sock/agent.sock  the agent's unix socket (the daemon's channel)
//!   sandboxes/<id>/runtime.json     what the runtime needs to find the sandbox again
//!   snapshots/<key>/                a snapshot's checkpoint (written by the runtime)
//!   snapshots/fork-<key>/           a fork's temporary checkpoint
//!   cache/blobs/sha256/<hex>        image blobs pulled from registries, by digest, shared
//!                                   by all templates
//! ```

use std::path::{Path, PathBuf};

use crate::{SandboxId, TemplateName};

/// The default data directory.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cubicle";

/// Paths inside one data directory. Pure path arithmetic, no I/O.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// The default data directory.
    pub const DEFAULT: &'static str = DEFAULT_DATA_DIR;

    /// A layout rooted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        DataDir { root: root.into() }
    }

    /// The data directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where all templates live.
    pub fn templates(&self) -> PathBuf {
        self.root.join("templates")
    }

    /// One template's directory.
    pub fn template(&self, name: &TemplateName) -> PathBuf {
        self.templates().join(name.as_str())
    }

    /// Where all sandboxes' writable state lives.
    pub fn sandboxes(&self) -> PathBuf {
        self.root.join("sandboxes")
    }

    /// One sandbox's directory.
    pub fn sandbox(&self, id: &SandboxId) -> PathBuf {
        self.sandboxes().join(id.as_str())
    }

    /// Where snapshots' checkpoints live.
    pub fn snapshots(&self) -> PathBuf {
        self.root.join("snapshots")
    }

    /// Where hibernated sandboxes' checkpoints live (one directory per sandbox id).
    pub fn hibernated(&self) -> PathBuf {
        self.root.join("hibernated")
    }

    /// The agent binaries sandboxes run, by content: `<agents>/<sha256>/cubicle-agent`
    /// (checkpoints name the one they were taken with, so none is ever replaced).
    pub fn agents(&self) -> PathBuf {
        self.root.join("agents")
    }

    /// Downloaded or built artefacts that can be thrown away and rebuilt.
    pub fn cache(&self) -> PathBuf {
        self.root.join("cache")
    }

    /// The content-addressed cache of image blobs (layers, configs, manifests) pulled
    /// from registries: `<cache>/blobs/sha256/<hex>`.
    pub fn blob_cache(&self) -> PathBuf {
        self.cache().join("blobs")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let d = DataDir::new("/d");
        let id: SandboxId = "abc".parse().unwrap();
        let t: TemplateName = "base".parse().unwrap();
        assert_eq!(d.sandbox(&id), Path::new("/d/sandboxes/abc"));
        assert_eq!(d.template(&t), Path::new("/d/templates/base"));
        assert_eq!(d.blob_cache(), Path::new("/d/cache/blobs"));
    }
}
