//! Shifting the owners of a root filesystem into a sandbox's user-namespace range, and
//! measuring it on the way.

use std::collections::HashSet;
use std::fs::{self, Metadata, Permissions};
use std::os::unix::fs::{lchown, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{IoContext, TemplateError};

/// What a walk over a tree saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TreeStats {
    /// Entries below the root (files, directories, symlinks, devices, ...), the root
    /// itself not counted; a file with several hard links counts once per link.
    pub entries: u64,
    /// Allocated bytes (`st_blocks * 512`) of the root and everything below it, each
    /// inode counted once.
    pub bytes: u64,
    /// Entries skipped because they are on another file system (mount points).
    pub other_fs: u64,
}

/// Adds `shift` to the uid and gid of `root` and of everything below it.
///
/// Symlinks are changed themselves (`lchown`), never followed. Directories on another
/// file system than `root` (mount points) are neither changed nor entered. Every inode
/// is shifted exactly once, even if it has several hard links. Because `chown` clears
/// the setuid and setgid bits (and file capabilities) of non-directories, the original
/// mode is re-applied to every non-symlink afterwards.
///
/// Not idempotent: running it twice shifts twice.
pub fn shift_ownership(root: &Path, shift: u32) -> Result<TreeStats, TemplateError> {
    walk(root, &mut |path, meta| shift_one(path, meta, shift))
}

/// Measures `root` like [`shift_ownership`] does, without changing anything.
pub fn measure(root: &Path) -> Result<TreeStats, TemplateError> {
    walk(root, &mut |_, _| Ok(()))
}

/// Calls `visit` once per inode of the tree (root first, parents before children),
/// staying on `root`'s file system and not following symlinks.
fn walk(
    root: &Path,
    visit: &mut dyn FnMut(&Path, &Metadata) -> Result<(), TemplateError>,
) -> Result<TreeStats, TemplateError> {
    let root_meta = fs::symlink_metadata(root).ctx("stat", root)?;
    if !root_meta.is_dir() {
        return Err(TemplateError::io(
            "walk",
            root,
            std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
        ));
    }
    let dev = root_meta.dev();
    let mut stats = TreeStats {
        bytes: root_meta.blocks() * 512,
        ..TreeStats::default()
    };
    visit(root, &root_meta)?;
    let mut seen_links: HashSet<u64> = HashSet::new();
    let mut stack: Vec<PathBuf> = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).ctx("read directory", &dir)? {
            let entry = entry.ctx("read directory", &dir)?;
            let path = entry.path();
            let meta = fs::symlink_metadata(&path).ctx("stat", &path)?;
            if meta.dev() != dev {
                tracing::warn!("not entering {}: another file system", path.display());
                stats.other_fs += 1;
                continue;
            }
            stats.entries += 1;
            if !meta.is_dir() && meta.nlink() > 1 && !seen_links.insert(meta.ino()) {
                continue; // another name of an inode already visited
            }
            stats.bytes += meta.blocks() * 512;
            visit(&path, &meta)?;
            if meta.is_dir() {
                stack.push(path);
            }
        }
    }
    Ok(stats)
}

fn shift_one(path: &Path, meta: &Metadata, shift: u32) -> Result<(), TemplateError> {
    let add = |id: u32| {
        id.checked_add(shift)
            .ok_or_else(|| TemplateError::UidOverflow {
                path: path.to_path_buf(),
                id,
                shift,
            })
    };
    let (uid, gid) = (add(meta.uid())?, add(meta.gid())?);
    lchown(path, Some(uid), Some(gid)).ctx("lchown", path)?;
    if !meta.file_type().is_symlink() {
        fs::set_permissions(path, Permissions::from_mode(meta.mode() & 0o7777))
            .ctx("chmod", path)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn owner(p: &Path) -> (u32, u32) {
        let m = fs::symlink_metadata(p).unwrap();
        (m.uid(), m.gid())
    }

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn shifts_everything_once_and_keeps_modes() {
        if !is_root() {
            eprintln!("skipping: chown to foreign uids needs root");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("rootfs");
        fs::create_dir_all(root.join("usr/bin")).unwrap();
        fs::create_dir_all(root.join("home/user")).unwrap();
        fs::write(root.join("usr/bin/sudo"), b"#!/bin/true\n").unwrap();
        fs::set_permissions(root.join("usr/bin/sudo"), Permissions::from_mode(0o4755)).unwrap();
        fs::write(root.join("usr/bin/wall"), b"x").unwrap();
        fs::set_permissions(root.join("usr/bin/wall"), Permissions::from_mode(0o2755)).unwrap();
        fs::create_dir(root.join("tmp")).unwrap();
        fs::set_permissions(root.join("tmp"), Permissions::from_mode(0o1777)).unwrap();
        fs::write(root.join("home/user/.bashrc"), b"# rc\n").unwrap();
        lchown(root.join("home/user"), Some(1000), Some(1000)).unwrap();
        lchown(root.join("home/user/.bashrc"), Some(1000), Some(1000)).unwrap();
        fs::hard_link(root.join("home/user/.bashrc"), root.join("home/user/link")).unwrap();
        // Symlinks: one pointing outside the tree (must not be followed), one dangling.
        let outside = tmp.path().join("outside");
        fs::write(&outside, b"host file").unwrap();
        symlink(&outside, root.join("escape")).unwrap();
        symlink("/nonexistent", root.join("dangling")).unwrap();
        symlink("usr/bin", root.join("bin")).unwrap();

        let shift = 1_000_000_000;
        let stats = shift_ownership(&root, shift).unwrap();
        // usr, usr/bin, sudo, wall, home, home/user, .bashrc, link, tmp, escape,
        // dangling, bin
        assert_eq!(stats.entries, 12);
        assert_eq!(stats.other_fs, 0);
        assert!(stats.bytes > 0);

        assert_eq!(owner(&root), (shift, shift));
        assert_eq!(owner(&root.join("usr/bin/sudo")), (shift, shift));
        assert_eq!(mode(&root.join("usr/bin/sudo")), 0o4755);
        assert_eq!(mode(&root.join("usr/bin/wall")), 0o2755);
        assert_eq!(mode(&root.join("tmp")), 0o1777);
        // The hard-linked file is shifted once, not twice.
        assert_eq!(
            owner(&root.join("home/user/.bashrc")),
            (shift + 1000, shift + 1000)
        );
        assert_eq!(owner(&root.join("home/user")), (shift + 1000, shift + 1000));
        // Symlinks themselves are shifted; their targets are not touched.
        assert_eq!(owner(&root.join("escape")), (shift, shift));
        assert_eq!(owner(&root.join("dangling")), (shift, shift));
        assert_eq!(owner(&outside), (0, 0));
        assert_eq!(owner(&root.join("bin")), (shift, shift));
        assert_eq!(owner(&root.join("usr/bin")), (shift, shift));

        // Measuring sees the same tree.
        let again = measure(&root).unwrap();
        assert_eq!(again, stats);
    }

    #[test]
    fn overflow_is_an_error_not_a_wrap() {
        if !is_root() {
            eprintln!("skipping: chown to foreign uids needs root");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("r");
        fs::create_dir(&root).unwrap();
        fs::write(root.join("f"), b"").unwrap();
        lchown(root.join("f"), Some(u32::MAX - 10), None).unwrap();
        let err = shift_ownership(&root, 1_000_000_000).unwrap_err();
        assert!(matches!(err, TemplateError::UidOverflow { .. }), "{err}");
    }

    #[test]
    fn refuses_a_non_directory_root() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("file");
        fs::write(&f, b"").unwrap();
        assert!(measure(&f).is_err());
        assert!(measure(&tmp.path().join("missing")).is_err());
    }

    #[test]
    fn does_not_cross_into_other_file_systems() {
        if !is_root() {
            eprintln!("skipping: mounting a tmpfs needs root");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("rootfs");
        fs::create_dir_all(root.join("mnt")).unwrap();
        fs::write(root.join("file"), b"x").unwrap();
        let root2 = root.clone();
        // A mount namespace of its own for this thread only, so the tmpfs never shows
        // up on the host and vanishes with the thread.
        let (stats, inner_owner) = std::thread::spawn(move || {
            use nix::mount::{mount, MsFlags};
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).unwrap();
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )
            .unwrap();
            let mnt = root2.join("mnt");
            mount(
                Some("tmpfs"),
                &mnt,
                Some("tmpfs"),
                MsFlags::empty(),
                None::<&str>,
            )
            .unwrap();
            fs::write(mnt.join("inner"), b"y").unwrap();
            let stats = shift_ownership(&root2, 5000).unwrap();
            (stats, owner(&mnt.join("inner")))
        })
        .join()
        .unwrap();
        assert_eq!(stats.other_fs, 1);
        assert_eq!(stats.entries, 1); // only `file`
        assert_eq!(inner_owner, (0, 0));
        assert_eq!(owner(&root.join("file")), (5000, 5000));
        // The mount point itself (on the other file system) was not changed either;
        // outside the thread's namespace the underlying directory is visible again.
        assert_eq!(owner(&root.join("mnt")), (0, 0));
    }
}
