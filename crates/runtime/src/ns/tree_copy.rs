//! A faithful copy of a directory tree, in-process: what `cp -a --reflink=auto` does to
//! a sandbox's writable layer when a checkpoint is taken or restored, without starting a
//! process (about 2 ms of each copy, most of a small layer's).
//!
//! Kept: file types (overlayfs whiteouts are character devices 0:0), contents (a
//! reflink where the filesystem can, else an in-kernel copy), owners, modes (set-id bits
//! included), extended attributes (overlayfs' `user.overlay.*` among them), hard links
//! and modification/access times.
//!
//! **Unchanged files are not copied twice.** A copy reports which of the source's and
//! the target's regular files are byte for byte which files of the copy (a
//! [`LayerOrigin`]). Given the origin of a sandbox's layer, the next checkpoint
//! hard-links every file whose identity and change time are still those of the origin
//! (checkpoint copies are never written to, so sharing their inodes is safe) and copies
//! only the rest. A file whose origin is gone (a deleted snapshot) is copied.
//!
//! **Restored layers are linked, not copied.** A checkpoint's copy of a layer is never
//! written, so a sandbox restored from it gets a *base* layer of hard links to it
//! ([`link_tree`]) under a fresh, empty writable layer: overlayfs copies a file up only
//! when the sandbox writes it. A checkpoint of such a sandbox flattens the two
//! ([`link_tree`] of the base, then [`merge_upper`]: the writable layer's whiteouts,
//! opaque directories and files applied on top), so a checkpoint is always one layer.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{lchown, symlink, DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::sys::stat::{mknod, utimensat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use serde::{Deserialize, Serialize};

use super::sys;

/// A regular file as `stat` sees it: same identity and change time means same contents
/// (any write, truncation or attribute change moves `ctime`, which nobody can set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FileState {
    dev: u64,
    ino: u64,
    ctime: i64,
    ctime_nsec: i64,
    size: u64,
}

impl FileState {
    fn of(md: &fs::Metadata) -> FileState {
        FileState {
            dev: md.dev(),
            ino: md.ino(),
            ctime: md.ctime(),
            ctime_nsec: md.ctime_nsec(),
            size: md.size(),
        }
    }
}

/// Which regular files of a sandbox's writable layer are copies of (or were copied to)
/// files under `copy_root`, a checkpoint's copy of the layer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerOrigin {
    /// The checkpoint's copy of the layer.
    pub copy_root: PathBuf,
    /// Each file's state in the sandbox's layer, and its path under `copy_root` (bytes:
    /// names need not be UTF-8).
    files: Vec<(FileState, Vec<u8>)>,
}

/// What a copy made, for [`LayerOrigin`]s in both directions.
#[derive(Debug, Default)]
pub struct Copied {
    /// Regular files: state of the source, relative path.
    files: Vec<(FileState, Vec<u8>)>,
    /// Bytes hard-linked from the previous copy instead of copied.
    pub reused_bytes: u64,
    /// Bytes copied.
    pub copied_bytes: u64,
}

impl Copied {
    /// The origin of the source (a sandbox's layer copied into a checkpoint at `to`).
    pub fn source_origin(&self, to: &Path) -> LayerOrigin {
        LayerOrigin {
            copy_root: to.to_owned(),
            files: self.files.clone(),
        }
    }
}

/// Copies `from` (a directory or a single file) to `to`, which must not exist. Files of
/// `from` that `reuse` knows unchanged are hard-linked from its copy.
pub fn copy_tree(from: &Path, to: &Path, reuse: Option<&LayerOrigin>) -> io::Result<Copied> {
    let mut copy = Copy::new(reuse, false);
    copy.entry(from, to, Path::new(""))?;
    Ok(copy.copied)
}

/// Recreates the tree `from` at `to` (which must not exist) with every regular file a
/// hard link to `from`'s (a copy where a link is impossible): for trees nobody writes,
/// such as a checkpoint's copy of a layer.
pub fn link_tree(from: &Path, to: &Path) -> io::Result<()> {
    Copy::new(None, true).entry(from, to, Path::new(""))
}

/// Applies `upper`, an overlay's writable layer, onto `onto`, a flattened copy of the
/// layer below it: whiteouts replace what they hide (and stay, for the layers further
/// down), an opaque directory replaces the directory below, other directories merge, and
/// files replace. Files `reuse` knows unchanged are linked, the others copied.
pub fn merge_upper(upper: &Path, onto: &Path, reuse: Option<&LayerOrigin>) -> io::Result<Copied> {
    let mut copy = Copy::new(reuse, false);
    copy.merge_dir(upper, onto, Path::new(""))?;
    Ok(copy.copied)
}

struct Copy<'a> {
    reuse: Option<(&'a Path, HashMap<FileState, &'a [u8]>)>,
    /// Regular files are hard-linked to the source's ([`link_tree`]).
    link_files: bool,
    /// The first copy of each multiply-linked file, by the source's (device, inode).
    links: HashMap<(u64, u64), PathBuf>,
    copied: Copied,
}

impl<'a> Copy<'a> {
    fn new(reuse: Option<&'a LayerOrigin>, link_files: bool) -> Copy<'a> {
        let reuse = reuse.map(|o| {
            let files: HashMap<FileState, &[u8]> =
                o.files.iter().map(|(s, p)| (*s, p.as_slice())).collect();
            (o.copy_root.as_path(), files)
        });
        Copy {
            reuse,
            link_files,
            links: HashMap::new(),
            copied: Copied::default(),
        }
    }

    fn entry(&mut self, from: &Path, to: &Path, rel: &Path) -> io::Result<()> {
        let md = fs::symlink_metadata(from)?;
        let kind = md.file_type();
        if kind.is_dir() {
            fs::DirBuilder::new().mode(0o700).create(to)?;
            for entry in fs::read_dir(from)? {
                let entry = entry?;
                let name = entry.file_name();
                self.entry(&entry.path(), &to.join(&name), &rel.join(&name))?;
            }
        } else {
            if md.nlink() > 1 {
                if let Some(first) = self.links.get(&(md.dev(), md.ino())) {
                    return fs::hard_link(first, to);
                }
                self.links.insert((md.dev(), md.ino()), to.to_owned());
            }
            if kind.is_file() && self.link_files && fs::hard_link(from, to).is_ok() {
                // The same inode: its attributes are already the source's.
                return Ok(());
            }
            if kind.is_file() {
                let state = FileState::of(&md);
                if self.link_unchanged(&state, to)? {
                    self.copied.reused_bytes += md.size();
                    self.copied
                        .files
                        .push((state, rel.as_os_str().as_bytes().to_vec()));
                    return Ok(());
                }
                copy_contents(from, to)?;
                self.copied.copied_bytes += md.size();
            } else if kind.is_symlink() {
                symlink(fs::read_link(from)?, to)?;
            } else {
                // Devices (whiteouts), fifos and sockets.
                let file_type = SFlag::from_bits_truncate(md.mode() & libc::S_IFMT);
                mknod(to, file_type, Mode::from_bits_truncate(0o600), md.rdev())?;
            }
        }
        copy_attributes(&md, from, to)?;
        if kind.is_file() {
            self.copied
                .files
                .push((FileState::of(&md), rel.as_os_str().as_bytes().to_vec()));
        }
        Ok(())
    }

    /// [`merge_upper`] of the directory `upper` onto the directory `onto`.
    fn merge_dir(&mut self, upper: &Path, onto: &Path, rel: &Path) -> io::Result<()> {
        for entry in fs::read_dir(upper)? {
            let entry = entry?;
            let name = entry.file_name();
            let (from, to, rel) = (entry.path(), onto.join(&name), rel.join(&name));
            let md = fs::symlink_metadata(&from)?;
            let below = fs::symlink_metadata(&to).ok();
            if md.is_dir() && !is_opaque(&from)? && below.as_ref().is_some_and(|b| b.is_dir()) {
                self.merge_dir(&from, &to, &rel)?;
                copy_attributes(&md, &from, &to)?;
                continue;
            }
            match below {
                Some(b) if b.is_dir() => fs::remove_dir_all(&to)?,
                Some(_) => fs::remove_file(&to)?,
                None => {}
            }
            self.entry(&from, &to, &rel)?;
        }
        Ok(())
    }

    /// Hard-links `to` to the previous copy of a file in `state`, if there is one.
    fn link_unchanged(&self, state: &FileState, to: &Path) -> io::Result<bool> {
        let Some((root, files)) = &self.reuse else {
            return Ok(false);
        };
        let Some(rel) = files.get(state) else {
            return Ok(false);
        };
        let previous = root.join(std::ffi::OsStr::from_bytes(rel));
        // The copy must still be the one made (a deleted snapshot, another filesystem:
        // copy instead).
        match fs::symlink_metadata(&previous) {
            Ok(md) if md.is_file() && md.size() == state.size => {}
            _ => return Ok(false),
        }
        Ok(fs::hard_link(&previous, to).is_ok())
    }
}

/// Whether the directory `dir` of an overlay layer is opaque (hides the layers below).
fn is_opaque(dir: &Path) -> io::Result<bool> {
    Ok(sys::xattrs(dir)?
        .iter()
        .any(|(name, value)| name.as_bytes() == b"user.overlay.opaque" && value == b"y"))
}

/// Owner, mode, extended attributes and times of `md` (the source `from`) onto `to`.
fn copy_attributes(md: &fs::Metadata, from: &Path, to: &Path) -> io::Result<()> {
    // Owner first: a chown clears the set-id bits and file capabilities set before it.
    lchown(to, Some(md.uid()), Some(md.gid()))?;
    if !md.file_type().is_symlink() {
        fs::set_permissions(
            to,
            std::os::unix::fs::PermissionsExt::from_mode(md.mode() & 0o7777),
        )?;
    }
    for (name, value) in sys::xattrs(from)? {
        sys::set_xattr(to, &name, &value)?;
    }
    // Last, so that filling a directory does not change its times again.
    utimensat(
        None,
        to,
        &TimeSpec::new(md.atime(), md.atime_nsec()),
        &TimeSpec::new(md.mtime(), md.mtime_nsec()),
        UtimensatFlags::NoFollowSymlink,
    )?;
    Ok(())
}

/// A reflink of `from` at `to` where the filesystem shares extents, else a copy made in
/// the kernel (`copy_file_range`, which `io::copy` between files uses).
fn copy_contents(from: &Path, to: &Path) -> io::Result<()> {
    let mut source = File::open(from)?;
    let mut target = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)?;
    if sys::reflink(&source, &target).is_ok() {
        return Ok(());
    }
    io::copy(&mut source, &mut target)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};

    fn meta(p: &Path) -> fs::Metadata {
        fs::symlink_metadata(p).unwrap()
    }

    /// Needs root (ownership, a whiteout device); the suite runs as root.
    #[test]
    fn a_copy_keeps_types_contents_owners_modes_xattrs_links_and_times() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir(&src).unwrap();
        fs::create_dir(src.join("dir")).unwrap();
        fs::write(src.join("dir/file"), b"contents").unwrap();
        fs::hard_link(src.join("dir/file"), src.join("link")).unwrap();
        symlink("dir/file", src.join("sym")).unwrap();
        mknod(
            &src.join("whiteout"),
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o000),
            0,
        )
        .unwrap();
        nix::unistd::mkfifo(&src.join("fifo"), Mode::from_bits_truncate(0o640)).unwrap();
        sys::set_overlay_opaque(&src.join("dir")).unwrap();
        lchown(
            src.join("dir/file"),
            Some(1_000_000_000),
            Some(1_000_000_005),
        )
        .unwrap();
        fs::set_permissions(src.join("dir/file"), fs::Permissions::from_mode(0o4755)).unwrap();
        lchown(src.join("sym"), Some(1_000_000_001), Some(1_000_000_001)).unwrap();
        let old = TimeSpec::new(1_000_000_000, 123);
        utimensat(
            None,
            &src.join("dir/file"),
            &old,
            &old,
            UtimensatFlags::NoFollowSymlink,
        )
        .unwrap();
        utimensat(
            None,
            &src.join("dir"),
            &old,
            &old,
            UtimensatFlags::NoFollowSymlink,
        )
        .unwrap();

        let dst = tmp.path().join("dst");
        copy_tree(&src, &dst, None).unwrap();

        assert_eq!(fs::read(dst.join("dir/file")).unwrap(), b"contents");
        let file = meta(&dst.join("dir/file"));
        assert_eq!(file.mode() & 0o7777, 0o4755, "set-uid kept after the chown");
        assert_eq!((file.uid(), file.gid()), (1_000_000_000, 1_000_000_005));
        assert_eq!((file.mtime(), file.mtime_nsec()), (1_000_000_000, 123));
        assert_eq!(file.ino(), meta(&dst.join("link")).ino(), "hard link kept");
        assert_eq!(
            fs::read_link(dst.join("sym")).unwrap(),
            Path::new("dir/file")
        );
        assert_eq!(meta(&dst.join("sym")).uid(), 1_000_000_001);
        let whiteout = meta(&dst.join("whiteout"));
        assert!(whiteout.file_type().is_char_device());
        assert_eq!(whiteout.rdev(), 0);
        assert!(meta(&dst.join("fifo")).file_type().is_fifo());
        assert_eq!(meta(&dst.join("fifo")).mode() & 0o7777, 0o640);
        let dir = meta(&dst.join("dir"));
        assert_eq!((dir.mtime(), dir.mtime_nsec()), (1_000_000_000, 123));
        assert!(sys::xattrs(&dst.join("dir"))
            .unwrap()
            .iter()
            .any(|(n, v)| n.as_bytes() == b"user.overlay.opaque" && v == b"y"));
        // A single file copies too, and an existing target is refused.
        copy_tree(&src.join("dir/file"), &tmp.path().join("one"), None).unwrap();
        assert_eq!(fs::read(tmp.path().join("one")).unwrap(), b"contents");
        assert!(copy_tree(&src, &dst, None).is_err());
    }

    #[test]
    fn unchanged_files_are_linked_from_the_previous_copy_and_changed_ones_copied() {
        let tmp = tempfile::tempdir().unwrap();
        let layer = tmp.path().join("layer");
        fs::create_dir_all(layer.join("d")).unwrap();
        fs::write(layer.join("d/big"), vec![7u8; 1 << 20]).unwrap();
        fs::write(layer.join("small"), b"v1").unwrap();
        fs::write(layer.join("gone-later"), b"x").unwrap();

        let first = tmp.path().join("ckpt1");
        let copied = copy_tree(&layer, &first, None).unwrap();
        assert_eq!(copied.reused_bytes, 0);
        let origin = copied.source_origin(&first);

        // The layer changes: one file rewritten, one removed, one added.
        fs::write(layer.join("small"), b"v2").unwrap();
        fs::remove_file(layer.join("gone-later")).unwrap();
        fs::write(layer.join("new"), b"n").unwrap();
        let second = tmp.path().join("ckpt2");
        let copied = copy_tree(&layer, &second, Some(&origin)).unwrap();
        assert_eq!(copied.reused_bytes, 1 << 20);
        assert_eq!(copied.copied_bytes, 3);
        let ino = |p: &Path| meta(p).ino();
        assert_eq!(
            ino(&first.join("d/big")),
            ino(&second.join("d/big")),
            "linked"
        );
        assert_ne!(
            ino(&first.join("small")),
            ino(&second.join("small")),
            "copied"
        );
        assert_eq!(fs::read(second.join("small")).unwrap(), b"v2");
        assert_eq!(
            fs::read(first.join("small")).unwrap(),
            b"v1",
            "old copy intact"
        );
        assert!(!second.join("gone-later").exists());

        // A change that keeps the size (an in-place write) is seen through ctime.
        let origin = copied.source_origin(&second);
        fs::OpenOptions::new()
            .write(true)
            .open(layer.join("d/big"))
            .and_then(|mut f| io::Write::write_all(&mut f, &[9u8]))
            .unwrap();
        // A deleted previous copy is no reason to fail: the file is copied.
        fs::remove_dir_all(&first).unwrap();
        let third = tmp.path().join("ckpt3");
        let copied = copy_tree(&layer, &third, Some(&origin)).unwrap();
        assert_eq!(copied.copied_bytes, 1 << 20);
        assert_eq!(fs::read(third.join("d/big")).unwrap()[0], 9);
        assert_eq!(
            fs::read(second.join("d/big")).unwrap()[0],
            7,
            "old copy intact"
        );

        // A restored layer is links to the copy; flattened with the writable layer above
        // it, unchanged files stay links and changed ones are copies.
        let base = tmp.path().join("base");
        link_tree(&third, &base).unwrap();
        assert_eq!(ino(&third.join("d/big")), ino(&base.join("d/big")));
        let upper = tmp.path().join("upper");
        fs::create_dir_all(upper.join("d")).unwrap();
        fs::write(upper.join("small"), b"v3").unwrap();
        mknod(&upper.join("new"), SFlag::S_IFCHR, Mode::empty(), 0).unwrap(); // rm new
        fs::create_dir(upper.join("opaque")).unwrap();
        fs::write(upper.join("opaque/only"), b"o").unwrap();
        sys::set_overlay_opaque(&upper.join("opaque")).unwrap();
        fs::create_dir_all(base.join("opaque/hidden")).unwrap();
        let flat = tmp.path().join("ckpt4");
        link_tree(&base, &flat).unwrap();
        let copied = merge_upper(&upper, &flat, None).unwrap();
        assert_eq!(copied.copied_bytes, 3);
        assert_eq!(
            ino(&third.join("d/big")),
            ino(&flat.join("d/big")),
            "still a link"
        );
        assert_eq!(fs::read(flat.join("small")).unwrap(), b"v3");
        assert_eq!(
            fs::read(third.join("small")).unwrap(),
            b"v2",
            "the copy is intact"
        );
        assert!(
            meta(&flat.join("new")).file_type().is_char_device(),
            "whiteout kept"
        );
        assert!(!flat.join("opaque/hidden").exists(), "opaque replaces");
        assert_eq!(fs::read(flat.join("opaque/only")).unwrap(), b"o");
        assert!(is_opaque(&flat.join("opaque")).unwrap());
    }
}
