//! The agent binaries sandboxes run, kept by content: `<data>/agents/<sha256>/cubicle-agent`.
//!
//! A sandbox bind-mounts the agent binary, and a CRIU checkpoint maps that file again when
//! it is restored: restoring onto another build of the agent fails ("has bad size") or,
//! worse, maps other code at the addresses the process was running. So a runtime never
//! hands sandboxes the binary it was given, which an upgrade replaces, but a copy of it
//! stored under its digest; checkpoints record that copy ([`super::checkpoint::CheckpointMeta::agent_bin`])
//! and restores mount it again, whatever agent the runtime has by then. A copy is written
//! once (to a temporary name, then renamed) and never modified; one runtime start hashes
//! the binary (~35 MB, tens of milliseconds).

use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use cubicle_core::DataDir;
use sha2::{Digest, Sha256};

use crate::RuntimeError;

/// The name of the binary inside its digest's directory.
const BINARY: &str = "cubicle-agent";

/// Returns the stored copy of `agent` (copying it into the store if it is not there).
pub fn install(data: &DataDir, agent: &Path) -> Result<PathBuf, RuntimeError> {
    let failed = |op: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| RuntimeError::Io { op, path, source }
    };
    let digest = sha256_hex(agent).map_err(failed("read", agent))?;
    let root = data.agents();
    // Traversable by every sandbox's root (it bind-mounts the file from inside).
    let dir = root.join(&digest);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&dir)
        .map_err(failed("create", &dir))?;
    for d in [&root, &dir] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))
            .map_err(failed("chmod", d))?;
    }
    let stored = dir.join(BINARY);
    if stored.is_file() {
        return Ok(stored);
    }
    let tmp = dir.join(format!(".{BINARY}.{}", std::process::id()));
    std::fs::copy(agent, &tmp).map_err(failed("copy", agent))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
        .map_err(failed("chmod", &tmp))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(failed("sync", &tmp))?;
    std::fs::rename(&tmp, &stored).map_err(failed("rename", &tmp))?;
    tracing::info!(agent = %agent.display(), stored = %stored.display(), "agent binary stored");
    Ok(stored)
}

fn sha256_hex(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_are_kept_by_content_and_never_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let data = DataDir::new(tmp.path().join("data"));
        let agent = tmp.path().join("agent");
        std::fs::write(&agent, b"first build").unwrap();
        let first = install(&data, &agent).unwrap();
        assert_eq!(std::fs::read(&first).unwrap(), b"first build");
        assert!(first.starts_with(data.agents()));
        assert_eq!(
            std::fs::metadata(&first).unwrap().permissions().mode() & 0o777,
            0o755
        );
        // The same binary again: the same copy.
        assert_eq!(install(&data, &agent).unwrap(), first);
        // A new build: a new copy; the old one is untouched.
        std::fs::write(&agent, b"second build, longer").unwrap();
        let second = install(&data, &agent).unwrap();
        assert_ne!(second, first);
        assert_eq!(std::fs::read(&first).unwrap(), b"first build");
        assert_eq!(std::fs::read(&second).unwrap(), b"second build, longer");
    }
}
