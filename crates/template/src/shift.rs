//! Shifting the owners of a root filesystem into a sandbox's user-namespace range, and
//! measuring it on the way.

use std::collections::HashSet;
use std::fs::{self, Metadata, Permissions};
use std::os::unix::fs::{lchown, FileTypeExt, MetadataExt, PermissionsExt};
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

/// What [`shift_layer_ownership`] saw in a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LayerStats {
    /// The walk over the layer, as [`measure`] reports it.
    pub tree: TreeStats,
    /// Inodes whose uid or gid was shifted (created by the build).
    pub shifted: u64,
    /// Inodes left alone because both ids were already shifted (copied up from a lower
    /// layer).
    pub kept: u64,
    /// Whiteouts (character devices 0/0): files of a lower layer deleted in this one.
    pub whiteouts: u64,
    /// Directories marked opaque (`user.overlay.opaque`): they hide the lower layers'
    /// directory of the same path.
    pub opaque_dirs: u64,
}

/// Where an id of a layer built by host root on top of shifted layers belongs, given
/// the uid shift: ids below [`RANGE`] were written by the build and are shifted; ids in
/// `shift..shift + RANGE` were copied up from a lower layer and are kept; anything else
/// is an error (`None`).
///
/// [`RANGE`]: cubicle_core::uid_map::RANGE
pub fn layer_id(id: u32, shift: u32) -> Option<u32> {
    let range = cubicle_core::uid_map::RANGE;
    if id < range {
        id.checked_add(shift)
    } else if id >= shift && u64::from(id) < u64::from(shift) + u64::from(range) {
        Some(id)
    } else {
        None
    }
}

/// Shifts the owners of a freshly built overlay layer (the upper directory of an
/// overlay whose lower layers are already shifted) into the sandboxes' range: each uid
/// and gid below [`cubicle_core::uid_map::RANGE`] gets `+ shift` (the build created or
/// chowned the entry); one already in `shift..shift + RANGE` is kept (the entry was
/// copied up from a lower layer); any other is an error ([`TemplateError::IdOutOfRange`]).
///
/// Entries whose ids do not change are not touched at all. Whiteouts (character devices
/// 0/0) stay whiteouts and `user.overlay.*` extended attributes stay as they are (`chown`
/// does not touch them); modes, setuid and setgid bits included, are re-applied after a
/// `chown` as in [`shift_ownership`]. Counts whiteouts and opaque directories.
pub fn shift_layer_ownership(root: &Path, shift: u32) -> Result<LayerStats, TemplateError> {
    let mut stats = LayerStats::default();
    stats.tree = walk(root, &mut |path, meta| {
        if meta.file_type().is_char_device() && meta.rdev() == 0 {
            stats.whiteouts += 1;
        }
        if meta.is_dir() && is_opaque(path) {
            stats.opaque_dirs += 1;
        }
        let out_of_range = |id: u32| TemplateError::IdOutOfRange {
            path: path.to_path_buf(),
            id,
            shift,
            range: cubicle_core::uid_map::RANGE,
        };
        let uid = layer_id(meta.uid(), shift).ok_or_else(|| out_of_range(meta.uid()))?;
        let gid = layer_id(meta.gid(), shift).ok_or_else(|| out_of_range(meta.gid()))?;
        if (uid, gid) == (meta.uid(), meta.gid()) {
            stats.kept += 1;
            return Ok(());
        }
        stats.shifted += 1;
        chown_keeping_mode(path, meta, uid, gid)
    })?;
    Ok(stats)
}

/// Whether the directory `path` carries overlayfs' opaque mark in the `user.` namespace
/// (what an overlay mounted with `userxattr` writes and reads).
pub fn is_opaque(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    let mut value = [0u8; 8];
    // SAFETY: both strings are NUL-terminated and `value` is writable for its length.
    let n = unsafe {
        libc::lgetxattr(
            c_path.as_ptr(),
            c"user.overlay.opaque".as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    n == 1 && value[0] == b'y'
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
    chown_keeping_mode(path, meta, uid, gid)
}

/// `lchown`, then the old mode again on anything but a symlink (`chown` clears the
/// setuid and setgid bits of non-directories).
fn chown_keeping_mode(
    path: &Path,
    meta: &Metadata,
    uid: u32,
    gid: u32,
) -> Result<(), TemplateError> {
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
    fn layer_id_rules() {
        let shift = 1_000_000_000;
        // Written by the build: shifted.
        assert_eq!(layer_id(0, shift), Some(shift));
        assert_eq!(layer_id(1000, shift), Some(shift + 1000));
        assert_eq!(layer_id(65_535, shift), Some(shift + 65_535));
        // Copied up from a shifted lower layer: kept.
        assert_eq!(layer_id(shift, shift), Some(shift));
        assert_eq!(layer_id(shift + 1000, shift), Some(shift + 1000));
        assert_eq!(layer_id(shift + 65_535, shift), Some(shift + 65_535));
        // Neither: refused.
        for id in [65_536, shift - 1, shift + 65_536, u32::MAX] {
            assert_eq!(layer_id(id, shift), None, "{id}");
        }
        // A shift of 0 keeps everything in range and refuses the rest.
        assert_eq!(layer_id(5, 0), Some(5));
        assert_eq!(layer_id(70_000, 0), None);
        // Overflow is refused, not wrapped.
        assert_eq!(layer_id(10, u32::MAX - 5), None);
    }

    fn lgetxattr(p: &Path, name: &std::ffi::CStr) -> Option<Vec<u8>> {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
        let mut buf = [0u8; 64];
        // SAFETY: NUL-terminated strings, writable buffer of the given length.
        let n = unsafe { libc::lgetxattr(c.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), 64) };
        (n >= 0).then(|| buf[..n as usize].to_vec())
    }

    fn lsetxattr(p: &Path, name: &std::ffi::CStr, value: &[u8]) {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
        // SAFETY: NUL-terminated strings, readable value of the given length.
        let rc = unsafe {
            libc::lsetxattr(
                c.as_ptr(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        assert_eq!(
            rc,
            0,
            "setxattr {}: {}",
            p.display(),
            std::io::Error::last_os_error()
        );
    }

    #[test]
    fn layer_shift_moves_new_ids_keeps_copied_up_ones_and_overlay_marks() {
        if !is_root() {
            eprintln!("skipping: chown to foreign uids and mknod need root");
            return;
        }
        let shift = 1_000_000_000;
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("delta");
        // What a build leaves: new files owned by root or user, directories copied up
        // from the parent (already shifted), an opaque directory, a whiteout.
        fs::create_dir_all(root.join("usr/lib/python3/dist-packages/numpy")).unwrap();
        fs::write(
            root.join("usr/lib/python3/dist-packages/numpy/__init__.py"),
            b"",
        )
        .unwrap();
        fs::create_dir_all(root.join("home/user/.cache/matplotlib")).unwrap();
        fs::write(
            root.join("home/user/.cache/matplotlib/fontlist.json"),
            b"{}",
        )
        .unwrap();
        for p in ["home/user/.cache", "home/user/.cache/matplotlib"] {
            lchown(root.join(p), Some(1000), Some(1000)).unwrap();
        }
        lchown(
            root.join("home/user/.cache/matplotlib/fontlist.json"),
            Some(1000),
            Some(1000),
        )
        .unwrap();
        // Copied up: /usr, /home, /home/user carry shifted ids already.
        for (p, id) in [("usr", shift), ("home", shift), ("home/user", shift + 1000)] {
            lchown(root.join(p), Some(id), Some(id)).unwrap();
        }
        // Copied up file, then chgrp'ed by the build to a small gid.
        fs::write(root.join("usr/shadowish"), b"x").unwrap();
        lchown(root.join("usr/shadowish"), Some(shift), Some(42)).unwrap();
        // A setuid program installed by the build.
        fs::create_dir(root.join("usr/bin")).unwrap();
        fs::write(root.join("usr/bin/helper"), b"#!/bin/true\n").unwrap();
        fs::set_permissions(root.join("usr/bin/helper"), Permissions::from_mode(0o4755)).unwrap();
        // An opaque directory (rm -rf of a lower directory, then recreated).
        fs::create_dir(root.join("opt")).unwrap();
        lsetxattr(&root.join("opt"), c"user.overlay.opaque", b"y");
        // A whiteout (a deleted lower file), as overlayfs makes them.
        nix::sys::stat::mknod(
            &root.join("usr/gone"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::empty(),
            0,
        )
        .unwrap();
        lsetxattr(&root.join("usr"), c"user.overlay.impure", b"y");
        let ctime_before = fs::symlink_metadata(root.join("home/user"))
            .unwrap()
            .ctime_nsec();

        let stats = shift_layer_ownership(&root, shift).unwrap();
        assert_eq!(stats.whiteouts, 1);
        assert_eq!(stats.opaque_dirs, 1);
        // kept: usr, home, home/user
        assert_eq!(stats.kept, 3);
        assert_eq!(stats.shifted + stats.kept, stats.tree.entries + 1);

        assert_eq!(owner(&root), (shift, shift));
        assert_eq!(
            owner(&root.join("usr/lib/python3/dist-packages/numpy/__init__.py")),
            (shift, shift)
        );
        assert_eq!(owner(&root.join("usr")), (shift, shift));
        assert_eq!(owner(&root.join("home/user")), (shift + 1000, shift + 1000));
        for p in [
            "home/user/.cache",
            "home/user/.cache/matplotlib",
            "home/user/.cache/matplotlib/fontlist.json",
        ] {
            assert_eq!(owner(&root.join(p)), (shift + 1000, shift + 1000), "{p}");
        }
        assert_eq!(owner(&root.join("usr/shadowish")), (shift, shift + 42));
        assert_eq!(mode(&root.join("usr/bin/helper")), 0o4755);
        // Untouched entries were not even chowned.
        assert_eq!(
            fs::symlink_metadata(root.join("home/user"))
                .unwrap()
                .ctime_nsec(),
            ctime_before
        );
        // Overlay marks survive.
        let gone = fs::symlink_metadata(root.join("usr/gone")).unwrap();
        assert!(gone.file_type().is_char_device() && gone.rdev() == 0);
        assert_eq!((gone.uid(), gone.gid()), (shift, shift));
        assert!(is_opaque(&root.join("opt")));
        assert!(!is_opaque(&root.join("usr")));
        assert_eq!(
            lgetxattr(&root.join("usr"), c"user.overlay.impure").as_deref(),
            Some(&b"y"[..])
        );

        // Ids that are neither small nor shifted are refused.
        fs::write(root.join("stray"), b"").unwrap();
        lchown(root.join("stray"), Some(70_000), None).unwrap();
        let err = shift_layer_ownership(&root, shift).unwrap_err();
        assert!(
            matches!(err, TemplateError::IdOutOfRange { id: 70_000, .. }),
            "{err}"
        );
        // Running again over a shifted layer changes nothing else (idempotent).
        fs::remove_file(root.join("stray")).unwrap();
        let again = shift_layer_ownership(&root, shift).unwrap();
        assert_eq!(again.shifted, 0);
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
