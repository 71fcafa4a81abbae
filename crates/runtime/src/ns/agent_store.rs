//! The agent binaries sandboxes run, kept by content: `<data>/agents/<sha256>/cubicle-agent`.
//!
//! A sandbox bind-mounts the agent binary, and a CRIU checkpoint maps that file again when
//! it is restored: restoring onto another build of the agent fails ("has bad size") or,
//! worse, maps other code at the addresses the process was running. So a runtime never
//! hands sandboxes the binary it was given, which an upgrade replaces, but a copy of it
//! stored under its digest; checkpoints record that copy ([`super::checkpoint::CheckpointMeta::agent_bin`])
//! and restores mount it again, whatever agent the runtime has by then. A copy is written
//! once, by `cp` to a temporary name (why not by this process: see
//! [`copy_in_another_process`]), then renamed, and never modified; one runtime start
//! hashes the binary (~35 MB, tens of milliseconds).

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
    let written = (|| {
        copy_in_another_process(agent, &tmp).map_err(failed("copy", agent))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
            .map_err(failed("chmod", &tmp))?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(failed("sync", &tmp))?;
        std::fs::rename(&tmp, &stored).map_err(failed("rename", &tmp))
    })();
    if written.is_err() {
        // A partial copy (a full disk) is never left to take space.
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    tracing::info!(agent = %agent.display(), stored = %stored.display(), "agent binary stored");
    Ok(stored)
}

/// Copies `from` to `to` with `cp`, so that this process never has the copy open for
/// writing. A runtime's process is multi-threaded and clones sandbox children: a child
/// cloned while the copy was open here would inherit that fd, and as long as any copy of
/// it lives nobody can execute the file (ETXTBSY), which made the first sandbox of a
/// runtime started next to busy ones fail with "execute the agent binary".
fn copy_in_another_process(from: &Path, to: &Path) -> std::io::Result<()> {
    let out = std::process::Command::new("cp")
        .arg("--")
        .args([from, to])
        .stdin(std::process::Stdio::null())
        .output()?;
    if out.status.success() {
        return Ok(());
    }
    Err(std::io::Error::other(format!(
        "cp {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    )))
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

    #[test]
    fn a_full_disk_is_a_clear_error_and_leaves_no_partial_copy() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("data");
        std::fs::create_dir(&root).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            &root,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=1m"),
        )
        .expect("mount a 1 MiB tmpfs (these tests run as root, like CI)");
        struct Unmount<'a>(&'a Path);
        impl Drop for Unmount<'_> {
            fn drop(&mut self) {
                let _ = nix::mount::umount2(self.0, nix::mount::MntFlags::MNT_DETACH);
            }
        }
        let _unmount = Unmount(&root);
        let data = DataDir::new(&root);
        let agent = tmp.path().join("agent");
        std::fs::write(&agent, vec![0x5a; 4 << 20]).unwrap();

        let err = install(&data, &agent).unwrap_err();
        let source = std::error::Error::source(&err).map(|s| s.to_string());
        assert!(err.to_string().starts_with("copy "), "{err}");
        assert!(
            source
                .as_deref()
                .is_some_and(|s| s.contains("No space left on device")),
            "{err}: {source:?}"
        );
        let left: Vec<_> = std::fs::read_dir(data.agents())
            .unwrap()
            .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }

    /// Open file descriptions of this process on files under `dir` with write access.
    fn writable_fds_under(dir: &Path) -> Vec<PathBuf> {
        let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
            return Vec::new();
        };
        fds.flatten()
            .filter_map(|fd| {
                let target = std::fs::read_link(fd.path()).ok()?;
                let info =
                    std::fs::read_to_string(Path::new("/proc/self/fdinfo").join(fd.file_name()))
                        .ok()?;
                let flags = info.lines().find_map(|l| l.strip_prefix("flags:"))?;
                let flags = u32::from_str_radix(flags.trim(), 8).ok()?;
                let writable = flags & libc::O_ACCMODE as u32 != libc::O_RDONLY as u32;
                (writable && target.starts_with(dir)).then_some(target)
            })
            .collect()
    }

    #[test]
    fn this_process_never_has_the_copy_open_for_writing() {
        // Regression: with the copy open here, a sandbox child cloned meanwhile kept the
        // file unexecutable (ETXTBSY) until it executed itself.
        let tmp = tempfile::tempdir().unwrap();
        let data = DataDir::new(tmp.path().join("data"));
        let agent = tmp.path().join("agent");
        // Big enough that copying takes many scans below (the real agent is ~35 MB).
        std::fs::write(&agent, vec![0x5a; 64 << 20]).unwrap();
        let installed = std::sync::atomic::AtomicBool::new(false);
        let seen = std::thread::scope(|s| {
            let scan = s.spawn(|| {
                let mut seen = std::collections::BTreeSet::new();
                let mut scans = 0u32;
                while !installed.load(std::sync::atomic::Ordering::Acquire) {
                    seen.extend(writable_fds_under(&data.agents()));
                    scans += 1;
                }
                (seen, scans)
            });
            let stored = install(&data, &agent);
            installed.store(true, std::sync::atomic::Ordering::Release);
            stored.unwrap();
            scan.join().unwrap()
        });
        assert!(seen.0.is_empty(), "open for writing here: {:?}", seen.0);
        assert!(seen.1 > 1, "the install was not watched ({} scans)", seen.1);
    }
}
