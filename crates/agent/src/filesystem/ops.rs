//! The operations behind the unary `filesystem.Filesystem` RPCs, on absolute paths.
//!
//! All I/O is synchronous `std::fs` in small steps: long walks, removals and copies
//! yield to the runtime every [`YIELD_EVERY`] entries (the agent's runtime has a single
//! thread and must never need another).

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use cubicle_envd::connect::{Code, ConnectError};
use cubicle_envd::proto::EntryInfo;

use super::entry::{entry_info, from_metadata};
use super::{ensure_dirs, io_error, random_hex};
use crate::paths;
use crate::users::{Names, User};

/// Entries handled between two yields to the runtime.
pub const YIELD_EVERY: usize = 256;

/// `Stat`: the entry at `path` (a final symlink is reported as a link).
pub fn stat(path: &Path, names: &Names) -> Result<EntryInfo, ConnectError> {
    entry_info(path, names).map_err(|e| io_error(&e, path))
}

/// `MakeDir`: `mkdir -p path`, new directories owned by `user`.
/// `already_exists` if `path` is a directory, `invalid_argument` if it is something else.
pub fn make_dir(path: &Path, user: &User, names: &Names) -> Result<EntryInfo, ConnectError> {
    match fs::metadata(path) {
        Ok(m) if m.is_dir() => {
            return Err(ConnectError::new(
                Code::AlreadyExists,
                format!("directory '{}' already exists", paths::display(path)),
            ))
        }
        Ok(_) => {
            return Err(ConnectError::new(
                Code::InvalidArgument,
                format!(
                    "path '{}' already exists and is not a directory",
                    paths::display(path)
                ),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error(&e, path)),
    }
    ensure_dirs(path, user.uid, user.gid).map_err(|(e, at)| dir_error(&e, &at))?;
    stat(path, names)
}

/// The error of [`ensure_dirs`] failing at `at`.
pub fn dir_error(err: &io::Error, at: &Path) -> ConnectError {
    if err.raw_os_error() == Some(libc::ENOTDIR) {
        return ConnectError::new(
            Code::InvalidArgument,
            format!(
                "path '{}' exists and is not a directory",
                paths::display(at)
            ),
        );
    }
    io_error(err, at)
}

/// `Move`: renames `source` to `destination`, creating the destination's parent
/// directories (owned by `user`). Replaces an existing file or empty directory, as
/// rename(2) does. Across file systems (and for directories that only exist in the
/// template layer of the sandbox's overlay, which the kernel refuses to rename with
/// `EXDEV`), the tree is copied next to the destination, renamed into place and the
/// source removed, as `mv` does.
pub async fn rename(
    source: &Path,
    destination: &Path,
    user: &User,
    names: &Names,
) -> Result<EntryInfo, ConnectError> {
    fs::symlink_metadata(source).map_err(|e| io_error(&e, source))?;
    if source == Path::new("/") {
        return Err(ConnectError::new(Code::InvalidArgument, "cannot move '/'"));
    }
    if let Some(parent) = destination.parent() {
        ensure_dirs(parent, user.uid, user.gid).map_err(|(e, at)| dir_error(&e, &at))?;
    }
    match fs::rename(source, destination) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            copy_then_rename(source, destination).await?;
        }
        Err(e) => return Err(move_error(&e, source, destination)),
    }
    stat(destination, names)
}

fn move_error(err: &io::Error, source: &Path, destination: &Path) -> ConnectError {
    let (s, d) = (paths::display(source), paths::display(destination));
    match err.raw_os_error() {
        Some(libc::ENOENT) => io_error(err, source),
        Some(libc::EINVAL) => ConnectError::new(
            Code::InvalidArgument,
            format!("cannot move '{s}' into itself ('{d}')"),
        ),
        Some(libc::EISDIR) => ConnectError::new(
            Code::InvalidArgument,
            format!("cannot replace directory '{d}' with non-directory '{s}'"),
        ),
        Some(libc::ENOTDIR) => ConnectError::new(
            Code::InvalidArgument,
            format!("cannot replace non-directory '{d}' with directory '{s}'"),
        ),
        Some(libc::EEXIST | libc::ENOTEMPTY) => ConnectError::new(
            Code::AlreadyExists,
            format!("destination '{d}' is a directory that is not empty"),
        ),
        _ => {
            let mut e = io_error(err, destination);
            e.message = format!("moving '{s}' to '{d}': {}", e.message);
            e
        }
    }
}

/// The `EXDEV` fallback of [`rename`]. A directory is copied straight to its
/// destination: the sandbox's overlay (mounted in a user namespace, so without
/// `redirect_dir`) refuses to rename any directory, even a fresh one. Anything else is
/// copied to a temporary name next to the destination and renamed over it.
async fn copy_then_rename(source: &Path, destination: &Path) -> Result<(), ConnectError> {
    let meta = fs::symlink_metadata(source).map_err(|e| io_error(&e, source))?;
    if meta.is_dir() {
        if destination.starts_with(source) {
            return Err(move_error(
                &io::Error::from_raw_os_error(libc::EINVAL),
                source,
                destination,
            ));
        }
        // rename(2)'s rules: an empty directory is replaced, anything else is not.
        match fs::symlink_metadata(destination) {
            Ok(d) if d.is_dir() => {
                fs::remove_dir(destination).map_err(|e| move_error(&e, source, destination))?
            }
            Ok(_) => {
                let e = io::Error::from_raw_os_error(libc::ENOTDIR);
                return Err(move_error(&e, source, destination));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(&e, destination)),
        }
        if let Err(e) = copy_tree(source, destination).await {
            let _ = remove(destination).await;
            return Err(e);
        }
    } else {
        let parent = destination.parent().unwrap_or(Path::new("/"));
        let staging = parent.join(format!(".cubicle-move-{}", random_hex(8)));
        let copied = copy_tree(source, &staging).await;
        let renamed = copied.and_then(|()| {
            fs::rename(&staging, destination).map_err(|e| move_error(&e, source, destination))
        });
        if let Err(e) = renamed {
            let _ = remove(&staging).await;
            return Err(e);
        }
    }
    remove(source).await
}

/// Copies the tree at `from` to the new path `to`: contents, modes, owners, symlinks
/// and modification times. Other file kinds (fifos, sockets, devices) are skipped.
async fn copy_tree(from: &Path, to: &Path) -> Result<(), ConnectError> {
    let mut stack = vec![(from.to_owned(), to.to_owned())];
    let mut dirs = Vec::new();
    let mut handled = 0usize;
    while let Some((src, dst)) = stack.pop() {
        handled += 1;
        if handled % YIELD_EVERY == 0 {
            tokio::task::yield_now().await;
        }
        let meta = fs::symlink_metadata(&src).map_err(|e| io_error(&e, &src))?;
        let t = meta.file_type();
        if t.is_dir() {
            fs::create_dir(&dst).map_err(|e| io_error(&e, &dst))?;
            for child in sorted_names(&src).map_err(|e| io_error(&e, &src))? {
                stack.push((src.join(&child), dst.join(&child)));
            }
            // Mode and times last: a read-only directory must still accept its children.
            dirs.push((dst, meta));
            continue;
        }
        if t.is_symlink() {
            let target = fs::read_link(&src).map_err(|e| io_error(&e, &src))?;
            std::os::unix::fs::symlink(&target, &dst).map_err(|e| io_error(&e, &dst))?;
        } else if t.is_file() {
            copy_file(&src, &dst, &meta).await?;
        } else {
            continue;
        }
        std::os::unix::fs::lchown(&dst, Some(meta.uid()), Some(meta.gid()))
            .map_err(|e| io_error(&e, &dst))?;
    }
    for (dir, meta) in dirs.into_iter().rev() {
        std::os::unix::fs::lchown(&dir, Some(meta.uid()), Some(meta.gid()))
            .map_err(|e| io_error(&e, &dir))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(meta.mode() & 0o7777))
            .map_err(|e| io_error(&e, &dir))?;
        if let (Ok(f), Ok(t)) = (fs::File::open(&dir), meta.modified()) {
            let _ = f.set_modified(t);
        }
    }
    Ok(())
}

/// Copies one regular file in chunks, yielding between them.
async fn copy_file(src: &Path, dst: &Path, meta: &fs::Metadata) -> Result<(), ConnectError> {
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let mut input = fs::File::open(src).map_err(|e| io_error(&e, src))?;
    let mut output = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dst)
        .map_err(|e| io_error(&e, dst))?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_error(&e, src)),
        };
        output.write_all(&buf[..n]).map_err(|e| io_error(&e, dst))?;
        tokio::task::yield_now().await;
    }
    output
        .set_permissions(fs::Permissions::from_mode(meta.mode() & 0o7777))
        .map_err(|e| io_error(&e, dst))?;
    if let Ok(t) = meta.modified() {
        let _ = output.set_modified(t);
    }
    Ok(())
}

/// The names in directory `dir`, sorted bytewise (as Go's `WalkDir` orders them).
fn sorted_names(dir: &Path) -> io::Result<Vec<OsString>> {
    let mut names = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .collect::<Vec<_>>();
    names.sort();
    Ok(names)
}

/// `ListDir`: the entries under `path` (a directory, or a symlink to one) down to
/// `depth` levels (0 means 1), depth first in name order, without `path` itself.
/// Symlinks below `path` are reported, never followed. Reported paths are under
/// `path` as given. Entries that vanish during the walk and unreadable
/// subdirectories are skipped.
pub async fn list_dir(
    path: &Path,
    depth: u32,
    names: &Names,
) -> Result<Vec<EntryInfo>, ConnectError> {
    let depth = depth.max(1);
    let meta = fs::metadata(path).map_err(|e| io_error(&e, path))?;
    if !meta.is_dir() {
        return Err(ConnectError::new(
            Code::InvalidArgument,
            format!("path '{}' is not a directory", paths::display(path)),
        ));
    }
    struct Level {
        dir: PathBuf,
        level: u32,
        names: std::vec::IntoIter<OsString>,
    }
    let first = sorted_names(path).map_err(|e| io_error(&e, path))?;
    let mut stack = vec![Level {
        dir: path.to_owned(),
        level: 1,
        names: first.into_iter(),
    }];
    let mut entries = Vec::new();
    while let Some(top) = stack.last_mut() {
        let Some(name) = top.names.next() else {
            stack.pop();
            continue;
        };
        let child = top.dir.join(&name);
        let level = top.level;
        let Ok(meta) = fs::symlink_metadata(&child) else {
            continue;
        };
        entries.push(from_metadata(&child, &meta, names));
        if meta.is_dir() && level < depth {
            if let Ok(children) = sorted_names(&child) {
                stack.push(Level {
                    dir: child,
                    level: level + 1,
                    names: children.into_iter(),
                });
            }
        }
        if entries.len() % YIELD_EVERY == 0 {
            tokio::task::yield_now().await;
        }
    }
    Ok(entries)
}

/// `Remove`: `rm -rf path`; succeeds if `path` does not exist. A symlink is removed,
/// never followed. Refuses `/`.
pub async fn remove(path: &Path) -> Result<(), ConnectError> {
    if path == Path::new("/") {
        return Err(ConnectError::new(
            Code::InvalidArgument,
            "refusing to remove '/'",
        ));
    }
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_error(&e, path)),
    };
    if !meta.is_dir() {
        return ignore_missing(fs::remove_file(path)).map_err(|e| io_error(&e, path));
    }
    // One child subtree at a time, yielding in between, so a huge tree does not stall
    // the runtime; std's remove_dir_all never follows symlinks.
    let children = match sorted_names(path) {
        Ok(c) => c,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_error(&e, path)),
    };
    for (i, name) in children.iter().enumerate() {
        let child = path.join(name);
        let result = match fs::symlink_metadata(&child) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&child),
            Ok(_) => fs::remove_file(&child),
            Err(e) => Err(e),
        };
        ignore_missing(result).map_err(|e| io_error(&e, &child))?;
        if i % 16 == 15 {
            tokio::task::yield_now().await;
        }
    }
    ignore_missing(fs::remove_dir_all(path)).map_err(|e| io_error(&e, path))
}

fn ignore_missing(r: io::Result<()>) -> io::Result<()> {
    match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cubicle_envd::proto::FileType;
    use std::os::unix::fs::symlink;

    fn me(home: &Path) -> User {
        User {
            name: "me".into(),
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
            home: home.to_owned(),
            shell: "/bin/sh".into(),
            groups: vec![],
        }
    }

    /// root/{a.txt, b/{c.txt, d/{e.txt}}, link-to-b -> b}
    fn tree() -> tempfile::TempDir {
        let tmp = tempfile::tempdir().unwrap();
        let r = tmp.path();
        fs::write(r.join("a.txt"), b"a").unwrap();
        fs::create_dir_all(r.join("b/d")).unwrap();
        fs::write(r.join("b/c.txt"), b"c").unwrap();
        fs::write(r.join("b/d/e.txt"), b"e").unwrap();
        symlink(r.join("b"), r.join("link-to-b")).unwrap();
        tmp
    }

    fn rel(entries: &[EntryInfo], root: &Path) -> Vec<String> {
        entries
            .iter()
            .map(|e| {
                e.path
                    .strip_prefix(root.to_str().unwrap())
                    .unwrap()
                    .to_owned()
            })
            .collect()
    }

    #[tokio::test]
    async fn list_depths() {
        let t = tree();
        let r = t.path();
        let names = Names::default();
        let one = list_dir(r, 0, &names).await.unwrap();
        assert_eq!(rel(&one, r), ["/a.txt", "/b", "/link-to-b"]);
        assert_eq!(list_dir(r, 1, &names).await.unwrap(), one);
        let two = list_dir(r, 2, &names).await.unwrap();
        assert_eq!(
            rel(&two, r),
            ["/a.txt", "/b", "/b/c.txt", "/b/d", "/link-to-b"]
        );
        let all = list_dir(r, 10, &names).await.unwrap();
        assert_eq!(
            rel(&all, r),
            [
                "/a.txt",
                "/b",
                "/b/c.txt",
                "/b/d",
                "/b/d/e.txt",
                "/link-to-b"
            ]
        );
        // The symlinked directory is reported (as a directory, flagged as a link) but
        // not followed.
        let link = all.last().unwrap();
        assert!(link.is_symlink);
        assert_eq!(link.file_type, FileType::Directory);
        // Listing through a symlink lists its target, with paths under the link.
        let via = list_dir(&r.join("link-to-b"), 1, &names).await.unwrap();
        assert_eq!(rel(&via, r), ["/link-to-b/c.txt", "/link-to-b/d"]);
    }

    #[tokio::test]
    async fn non_utf8_names_are_lossy() {
        use std::os::unix::ffi::OsStrExt;
        let tmp = tempfile::tempdir().unwrap();
        let name = std::ffi::OsStr::from_bytes(b"bad\xffname");
        fs::write(tmp.path().join(name), b"").unwrap();
        let entries = list_dir(tmp.path(), 1, &Names::default()).await.unwrap();
        assert_eq!(entries[0].name, "bad\u{FFFD}name");
        assert!(entries[0].path.ends_with("/bad\u{FFFD}name"));
    }

    #[tokio::test]
    async fn list_errors() {
        let t = tree();
        let names = Names::default();
        let e = list_dir(&t.path().join("nope"), 1, &names)
            .await
            .unwrap_err();
        assert_eq!(e.code, Code::NotFound);
        assert!(e.message.contains("does not exist"));
        let e = list_dir(&t.path().join("a.txt"), 1, &names)
            .await
            .unwrap_err();
        assert_eq!(e.code, Code::InvalidArgument);
        assert!(e.message.contains("not a directory"));
    }

    #[test]
    fn stat_missing_is_not_found() {
        let t = tree();
        let e = stat(&t.path().join("missing"), &Names::default()).unwrap_err();
        assert_eq!(e.code, Code::NotFound);
        assert_eq!(
            e.message,
            format!(
                "path '{}' does not exist",
                t.path().join("missing").display()
            )
        );
    }

    #[test]
    fn make_dir_cases() {
        let t = tree();
        let user = me(t.path());
        let names = Names::default();
        let e = make_dir(&t.path().join("x/y/z"), &user, &names).unwrap();
        assert_eq!(e.file_type, FileType::Directory);
        assert_eq!(e.name, "z");
        assert!(t.path().join("x/y/z").is_dir());
        let again = make_dir(&t.path().join("x/y/z"), &user, &names).unwrap_err();
        assert_eq!(again.code, Code::AlreadyExists);
        let file = make_dir(&t.path().join("a.txt"), &user, &names).unwrap_err();
        assert_eq!(file.code, Code::InvalidArgument);
        let under_file = make_dir(&t.path().join("a.txt/sub"), &user, &names).unwrap_err();
        assert_eq!(under_file.code, Code::InvalidArgument);
        assert!(
            under_file.message.contains("a.txt"),
            "{}",
            under_file.message
        );
    }

    #[tokio::test]
    async fn move_cases() {
        let t = tree();
        let r = t.path();
        let user = me(r);
        let names = Names::default();
        // Creates the destination's parents.
        let e = rename(&r.join("a.txt"), &r.join("new/dir/a2.txt"), &user, &names)
            .await
            .unwrap();
        assert_eq!(e.name, "a2.txt");
        assert_eq!(fs::read(r.join("new/dir/a2.txt")).unwrap(), b"a");
        assert!(!r.join("a.txt").exists());
        // Missing source.
        let missing = rename(&r.join("a.txt"), &r.join("z"), &user, &names)
            .await
            .unwrap_err();
        assert_eq!(missing.code, Code::NotFound);
        assert!(missing.message.contains("a.txt"));
        // A directory into itself.
        let inside = rename(&r.join("b"), &r.join("b/d/b"), &user, &names)
            .await
            .unwrap_err();
        assert_eq!(inside.code, Code::InvalidArgument);
        // Over a non-empty directory.
        let busy = rename(&r.join("new"), &r.join("b"), &user, &names)
            .await
            .unwrap_err();
        assert_eq!(busy.code, Code::AlreadyExists);
        // A symlink moves as a link.
        let l = rename(&r.join("link-to-b"), &r.join("l2"), &user, &names)
            .await
            .unwrap();
        assert!(l.is_symlink);
    }

    #[tokio::test]
    async fn copy_fallback_preserves_tree() {
        let t = tree();
        let r = t.path();
        fs::set_permissions(r.join("b/c.txt"), fs::Permissions::from_mode(0o751)).unwrap();
        copy_then_rename(&r.join("b"), &r.join("copied"))
            .await
            .unwrap();
        assert!(!r.join("b").exists());
        copy_then_rename(&r.join("a.txt"), &r.join("copied/a.txt"))
            .await
            .unwrap();
        assert_eq!(fs::read(r.join("copied/a.txt")).unwrap(), b"a");
        // rename(2)'s rules for directories.
        fs::create_dir_all(r.join("x/y")).unwrap();
        fs::create_dir(r.join("empty")).unwrap();
        let busy = copy_then_rename(&r.join("x"), &r.join("copied"))
            .await
            .unwrap_err();
        assert_eq!(busy.code, Code::AlreadyExists);
        let onto_file = copy_then_rename(&r.join("x"), &r.join("copied/a.txt"))
            .await
            .unwrap_err();
        assert_eq!(onto_file.code, Code::InvalidArgument);
        let inside = copy_then_rename(&r.join("x"), &r.join("x/y/z"))
            .await
            .unwrap_err();
        assert_eq!(inside.code, Code::InvalidArgument);
        copy_then_rename(&r.join("x"), &r.join("empty"))
            .await
            .unwrap();
        assert!(r.join("empty/y").is_dir() && !r.join("x").exists());
        assert_eq!(fs::read(r.join("copied/d/e.txt")).unwrap(), b"e");
        let m = fs::metadata(r.join("copied/c.txt")).unwrap();
        assert_eq!(m.mode() & 0o777, 0o751);
        // No staging directory is left behind.
        let leftovers: Vec<_> = fs::read_dir(r)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(".cubicle-move-")
            })
            .collect();
        assert!(leftovers.is_empty());
    }

    #[tokio::test]
    async fn remove_cases() {
        let t = tree();
        let r = t.path();
        // A symlink to a directory: the link goes, the directory stays.
        remove(&r.join("link-to-b")).await.unwrap();
        assert!(r.join("b/c.txt").exists());
        remove(&r.join("b")).await.unwrap();
        assert!(!r.join("b").exists());
        remove(&r.join("a.txt")).await.unwrap();
        // Missing is fine.
        remove(&r.join("a.txt")).await.unwrap();
        assert_eq!(
            remove(Path::new("/")).await.unwrap_err().code,
            Code::InvalidArgument
        );
        assert_eq!(fs::read_dir(r).unwrap().count(), 0);
    }
}
