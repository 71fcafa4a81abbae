//! [`EntryInfo`]: what `Stat`, `ListDir`, `MakeDir`, `Move` and watch events report
//! about a path.
//!
//! Choices, made to match upstream envd (0.6.x) where the SDK can tell the difference:
//! - **`type`** is that of the entry itself for files and directories. A symlink reports
//!   the type of what it points to (as upstream does), so a link to a directory lists as
//!   a directory and can be listed in turn; `isSymlink: true` and `symlinkTarget` say it
//!   is a link. A dangling (or looping) link reports `FILE_TYPE_SYMLINK` (upstream:
//!   UNSPECIFIED, which the SDK silently drops from listings). Sockets, fifos and devices
//!   are `FILE_TYPE_UNSPECIFIED`.
//! - **`mode`** is the permission bits only (`st_mode & 0o777`), as upstream sends Go's
//!   `FileMode.Perm()`; for a symlink, those of its target.
//! - **`permissions`** is `ls -l` style from `lstat`: `-rw-r--r--`, `drwxr-xr-x`,
//!   `lrwxrwxrwx`, with `s`/`S`/`t`/`T` for setuid, setgid and sticky bits (upstream
//!   prints Go's `FileMode.String()`, e.g. `Lrwxrwxrwx` or `dtrwxrwxrwx`).
//! - **`symlinkTarget`**: the fully resolved absolute target (as upstream's
//!   `EvalSymlinks`); for a dangling link, the link's raw text.
//! - **`size`**, **`owner`**, **`group`**, **`modifiedTime`** come from `lstat` of the entry.
//!   Times are RFC 3339 in UTC with 0, 3, 6 or 9 fractional digits, as protobuf's JSON does.
//! - **`metadata`**: the `user.e2b.*` extended attributes (prefix stripped) whose name
//!   and value are UTF-8.
//! - Names and paths that are not UTF-8 are converted lossily (U+FFFD).

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::{self, FileType as FsFileType, Metadata};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use chrono::{DateTime, SecondsFormat, Utc};
use cubicle_envd::proto::{EntryInfo, FileType};

use crate::paths;
use crate::users::Names;

/// Prefix of the extended attributes that hold user metadata.
pub const METADATA_XATTR_PREFIX: &str = "user.e2b.";

/// The entry at `path` (not following a final symlink).
pub fn entry_info(path: &Path, names: &Names) -> io::Result<EntryInfo> {
    let meta = fs::symlink_metadata(path)?;
    Ok(from_metadata(path, &meta, names))
}

/// The entry at `path` whose `lstat` is `meta`.
pub fn from_metadata(path: &Path, meta: &Metadata, names: &Names) -> EntryInfo {
    let own_type = meta.file_type();
    let mut symlink_target = None;
    let (file_type, mode) = if own_type.is_symlink() {
        match fs::canonicalize(path).and_then(|t| fs::metadata(&t).map(|m| (t, m))) {
            Ok((target, target_meta)) => {
                symlink_target = Some(paths::display(&target));
                (kind(&target_meta.file_type()), target_meta.mode() & 0o777)
            }
            Err(_) => {
                symlink_target = fs::read_link(path).ok().map(|t| paths::display(&t));
                (FileType::Symlink, meta.mode() & 0o777)
            }
        }
    } else {
        (kind(&own_type), meta.mode() & 0o777)
    };
    let metadata = if matches!(file_type, FileType::File | FileType::Directory) {
        read_metadata(path)
    } else {
        BTreeMap::new()
    };
    EntryInfo {
        name: name_of(path),
        file_type,
        path: paths::display(path),
        size: meta.size() as i64,
        mode,
        permissions: permissions_string(meta.mode()),
        owner: names.user(meta.uid()),
        group: names.group(meta.gid()),
        modified_time: rfc3339(meta.mtime(), meta.mtime_nsec()),
        is_symlink: own_type.is_symlink(),
        symlink_target,
        metadata,
    }
}

/// The last component of `path` (`/` for the root).
pub fn name_of(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "/".into())
}

fn kind(t: &FsFileType) -> FileType {
    if t.is_file() {
        FileType::File
    } else if t.is_dir() {
        FileType::Directory
    } else if t.is_symlink() {
        FileType::Symlink
    } else {
        FileType::Unspecified
    }
}

/// `ls -l` style mode string of an `st_mode`.
pub fn permissions_string(mode: u32) -> String {
    let kind = match mode & libc::S_IFMT {
        libc::S_IFREG => '-',
        libc::S_IFDIR => 'd',
        libc::S_IFLNK => 'l',
        libc::S_IFCHR => 'c',
        libc::S_IFBLK => 'b',
        libc::S_IFIFO => 'p',
        libc::S_IFSOCK => 's',
        _ => '?',
    };
    let bit = |mask: u32, c: char| if mode & mask != 0 { c } else { '-' };
    // The execute position shows the special bit too: lowercase if also executable.
    let special = |exec: u32, special: u32, set: char, unset: char| match (
        mode & exec != 0,
        mode & special != 0,
    ) {
        (true, true) => set,
        (false, true) => unset,
        (true, false) => 'x',
        (false, false) => '-',
    };
    [
        kind,
        bit(0o400, 'r'),
        bit(0o200, 'w'),
        special(0o100, 0o4000, 's', 'S'),
        bit(0o040, 'r'),
        bit(0o020, 'w'),
        special(0o010, 0o2000, 's', 'S'),
        bit(0o004, 'r'),
        bit(0o002, 'w'),
        special(0o001, 0o1000, 't', 'T'),
    ]
    .iter()
    .collect()
}

/// RFC 3339 in UTC, with as many fractional digits as needed (0, 3, 6 or 9).
pub fn rfc3339(secs: i64, nanos: i64) -> String {
    DateTime::<Utc>::from_timestamp(secs, nanos.clamp(0, 999_999_999) as u32)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// The `user.e2b.*` extended attributes of `path` (following symlinks). Best effort:
/// unsupported file systems, unreadable attributes and non-UTF-8 ones are skipped.
pub fn read_metadata(path: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let Ok(cpath) = CString::new(path.as_os_str().as_bytes()) else {
        return out;
    };
    let Some(list) = xattr_call(|buf, len| {
        // SAFETY: `cpath` is NUL-terminated; `buf`/`len` describe a writable buffer
        // (or are null/0 to query the size).
        unsafe { libc::listxattr(cpath.as_ptr(), buf.cast(), len) }
    }) else {
        return out;
    };
    for name in list.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let Some(key) = name.strip_prefix(METADATA_XATTR_PREFIX.as_bytes()) else {
            continue;
        };
        let Ok(cname) = CString::new(name) else {
            continue;
        };
        let value = xattr_call(|buf, len| {
            // SAFETY: as above; `cname` is NUL-terminated.
            unsafe { libc::getxattr(cpath.as_ptr(), cname.as_ptr(), buf.cast(), len) }
        });
        if let (Ok(key), Some(Ok(value))) = (std::str::from_utf8(key), value.map(String::from_utf8))
        {
            out.insert(key.to_owned(), value);
        }
    }
    out
}

/// Runs a size-query-then-fill xattr call, retrying if the value grew in between.
fn xattr_call(call: impl Fn(*mut u8, usize) -> isize) -> Option<Vec<u8>> {
    for _ in 0..4 {
        let size = call(std::ptr::null_mut(), 0);
        if size < 0 {
            return None;
        }
        if size == 0 {
            return Some(Vec::new());
        }
        let mut buf = vec![0u8; size as usize];
        let got = call(buf.as_mut_ptr(), buf.len());
        if got >= 0 {
            buf.truncate(got as usize);
            return Some(buf);
        }
        if io::Error::last_os_error().raw_os_error() != Some(libc::ERANGE) {
            return None;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn names() -> Names {
        Names::default()
    }

    #[test]
    fn permission_strings() {
        assert_eq!(permissions_string(0o100644), "-rw-r--r--");
        assert_eq!(permissions_string(0o040755), "drwxr-xr-x");
        assert_eq!(permissions_string(0o120777), "lrwxrwxrwx");
        assert_eq!(permissions_string(0o104755), "-rwsr-xr-x");
        assert_eq!(permissions_string(0o102644), "-rw-r-Sr--");
        assert_eq!(permissions_string(0o041777), "drwxrwxrwt");
        assert_eq!(permissions_string(0o041776), "drwxrwxrwT");
        assert_eq!(permissions_string(0o010600), "prw-------");
        assert_eq!(permissions_string(0o020666), "crw-rw-rw-");
        assert_eq!(permissions_string(0o140755), "srwxr-xr-x");
        assert_eq!(permissions_string(0o000000), "?---------");
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000, 5), "2023-11-14T22:13:20.000000005Z");
        assert_eq!(
            rfc3339(1_700_000_000, 120_000_000),
            "2023-11-14T22:13:20.120Z"
        );
    }

    #[test]
    fn file_dir_and_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let file = dir.join("a.txt");
        fs::write(&file, b"hello").unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o640)).unwrap();
        let e = entry_info(&file, &names()).unwrap();
        assert_eq!(e.name, "a.txt");
        assert_eq!(e.file_type, FileType::File);
        assert_eq!(e.path, file.to_str().unwrap());
        assert_eq!(e.size, 5);
        assert_eq!(e.mode, 0o640);
        assert_eq!(e.permissions, "-rw-r-----");
        assert!(!e.is_symlink && e.symlink_target.is_none());
        assert!(e.modified_time.ends_with('Z'));
        assert_eq!(e.owner, nix::unistd::getuid().as_raw().to_string());

        let sub = dir.join("sub");
        fs::create_dir(&sub).unwrap();
        fs::set_permissions(&sub, fs::Permissions::from_mode(0o755)).unwrap();
        let d = entry_info(&sub, &names()).unwrap();
        assert_eq!(
            (d.file_type, d.mode, d.permissions.as_str()),
            (FileType::Directory, 0o755, "drwxr-xr-x")
        );

        let to_dir = dir.join("to-dir");
        symlink(&sub, &to_dir).unwrap();
        let l = entry_info(&to_dir, &names()).unwrap();
        assert_eq!(l.file_type, FileType::Directory);
        assert!(l.is_symlink);
        assert_eq!(l.permissions, "lrwxrwxrwx");
        assert_eq!(l.mode, 0o755);
        let canonical_sub = fs::canonicalize(&sub).unwrap();
        assert_eq!(l.symlink_target.as_deref(), canonical_sub.to_str());
        assert_eq!(l.path, to_dir.to_str().unwrap());

        let to_file = dir.join("to-file");
        symlink("a.txt", &to_file).unwrap();
        let l = entry_info(&to_file, &names()).unwrap();
        assert_eq!((l.file_type, l.mode), (FileType::File, 0o640));

        let dangling = dir.join("dangling");
        symlink("nowhere/x", &dangling).unwrap();
        let l = entry_info(&dangling, &names()).unwrap();
        assert_eq!(l.file_type, FileType::Symlink);
        assert_eq!(l.symlink_target.as_deref(), Some("nowhere/x"));
        assert!(l.is_symlink);

        assert_eq!(
            entry_info(&dir.join("missing"), &names())
                .unwrap_err()
                .kind(),
            io::ErrorKind::NotFound
        );
    }

    #[test]
    fn metadata_from_xattrs() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("m");
        fs::write(&file, b"").unwrap();
        let set = |name: &str, value: &[u8]| {
            let p = CString::new(file.as_os_str().as_bytes()).unwrap();
            let n = CString::new(name).unwrap();
            // SAFETY: valid NUL-terminated strings and a value slice.
            unsafe {
                libc::setxattr(
                    p.as_ptr(),
                    n.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    0,
                )
            }
        };
        if set("user.e2b.owner", b"alice") != 0 {
            // The temp dir's file system has no user xattrs (tmpfs on old kernels).
            return;
        }
        set("user.other", b"ignored");
        set("user.e2b.bad", b"\xff");
        let e = entry_info(&file, &names()).unwrap();
        assert_eq!(e.metadata.len(), 1);
        assert_eq!(e.metadata["owner"], "alice");
    }
}
