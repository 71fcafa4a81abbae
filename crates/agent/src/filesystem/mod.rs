//! `filesystem.Filesystem` RPCs: `Stat`, `MakeDir`, `Move`, `ListDir`, `Remove` (here and
//! in [`ops`]) and the watches (`WatchDir`, `CreateWatcher`, `GetWatcherEvents`,
//! `RemoveWatcher`, in [`crate::watch`]).
//!
//! Like upstream envd, every operation is performed by the agent (root of the sandbox)
//! on behalf of the request's user: the user decides how relative paths resolve and
//! who owns what gets created, not what may be read or changed. Directories created
//! for a user are chowned to that user.
//!
//! I/O errors map to Connect codes as [`io_error`] documents; the messages name the
//! path. The wire format of [`EntryInfo`](cubicle_envd::proto::EntryInfo) is described
//! in [`entry`].

pub mod entry;
pub mod ops;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cubicle_envd::connect::{Code, ConnectError};
use cubicle_envd::proto::{
    Empty, EntryResponse, ListDirRequest, ListDirResponse, MoveRequest, PathRequest, WatchRequest,
    WatcherRequest,
};
use http::{Request, Response};
use hyper::body::Incoming;

use crate::auth;
use crate::paths;
use crate::rpc::{self, Body};
use crate::server::{unknown_method, Agent};
use crate::users::User;
use crate::watch;

/// Handles `/filesystem.Filesystem/<method>`.
pub async fn rpc(agent: &Arc<Agent>, method: &str, req: Request<Incoming>) -> Response<Body> {
    let user = match auth::basic_user(req.headers()) {
        Ok(u) => u,
        Err(e) => {
            let err = ConnectError::new(Code::Unauthenticated, e.to_string());
            return if method == "WatchDir" {
                rpc::stream_error(&err)
            } else {
                rpc::unary_err(&err)
            };
        }
    };
    if method == "WatchDir" {
        if !rpc::is_streaming(req.headers()) {
            return rpc::unary_err(&ConnectError::new(
                Code::InvalidArgument,
                "WatchDir is a server-streaming RPC (use application/connect+json)",
            ));
        }
        return watch::watch_dir(agent, user, req).await;
    }
    let body = req.into_body();
    let result: Result<Response<Body>, ConnectError> = async {
        match method {
            "Stat" => {
                let r: PathRequest = rpc::unary_request(body).await?;
                let user = agent.rpc_user(user.as_deref())?;
                let path = resolve_path(&r.path, &user)?;
                let entry = ops::stat(&path, &agent.accounts.names())?;
                Ok(rpc::unary_ok(&EntryResponse { entry }))
            }
            "MakeDir" => {
                let r: PathRequest = rpc::unary_request(body).await?;
                let user = agent.rpc_user(user.as_deref())?;
                let path = resolve_path(&r.path, &user)?;
                let entry = ops::make_dir(&path, &user, &agent.accounts.names())?;
                Ok(rpc::unary_ok(&EntryResponse { entry }))
            }
            "Move" => {
                let r: MoveRequest = rpc::unary_request(body).await?;
                let user = agent.rpc_user(user.as_deref())?;
                let source = resolve_path(&r.source, &user)?;
                let destination = resolve_path(&r.destination, &user)?;
                let entry =
                    ops::rename(&source, &destination, &user, &agent.accounts.names()).await?;
                Ok(rpc::unary_ok(&EntryResponse { entry }))
            }
            "ListDir" => {
                let r: ListDirRequest = rpc::unary_request(body).await?;
                let user = agent.rpc_user(user.as_deref())?;
                let path = resolve_path(&r.path, &user)?;
                let entries = ops::list_dir(&path, r.depth, &agent.accounts.names()).await?;
                Ok(rpc::unary_ok(&ListDirResponse { entries }))
            }
            "Remove" => {
                let r: PathRequest = rpc::unary_request(body).await?;
                let user = agent.rpc_user(user.as_deref())?;
                let path = resolve_path(&r.path, &user)?;
                ops::remove(&path).await?;
                Ok(rpc::unary_ok(&Empty {}))
            }
            "CreateWatcher" => {
                let r: WatchRequest = rpc::unary_request(body).await?;
                let user = agent.rpc_user(user.as_deref())?;
                let path = resolve_path(&r.path, &user)?;
                let created = agent.watchers.create(agent, &path, &r).await?;
                Ok(rpc::unary_ok(&created))
            }
            "GetWatcherEvents" => {
                let r: WatcherRequest = rpc::unary_request(body).await?;
                agent.rpc_user(user.as_deref())?;
                Ok(rpc::unary_ok(&agent.watchers.events(&r.watcher_id)?))
            }
            "RemoveWatcher" => {
                let r: WatcherRequest = rpc::unary_request(body).await?;
                agent.rpc_user(user.as_deref())?;
                agent.watchers.remove(&r.watcher_id)?;
                Ok(rpc::unary_ok(&Empty {}))
            }
            other => {
                // Read the body anyway so the keep-alive connection stays usable.
                let _ = rpc::read_body(body, rpc::MAX_UNARY_BODY).await;
                Err(unknown_method("filesystem.Filesystem", other))
            }
        }
    }
    .await;
    result.unwrap_or_else(|e| rpc::unary_err(&e))
}

/// A client path made absolute for `user` (see [`paths::resolve`]).
pub fn resolve_path(path: &str, user: &User) -> Result<PathBuf, ConnectError> {
    paths::resolve(path, &user.home)
        .map_err(|e| ConnectError::new(Code::InvalidArgument, e.to_string()))
}

/// How an I/O error is reported: Connect code and message, both naming `path`.
///
/// | errno | code |
/// |---|---|
/// | `ENOENT` | `not_found` ("path '/x' does not exist") |
/// | `EACCES`, `EPERM`, `EROFS` | `permission_denied` |
/// | `ENOTDIR`, `EISDIR`, `EINVAL`, `ELOOP`, `ENAMETOOLONG` | `invalid_argument` |
/// | `EEXIST`, `ENOTEMPTY` | `already_exists` |
/// | `ENOSPC`, `EDQUOT` | `resource_exhausted` |
/// | `EBUSY`, `EXDEV` | `failed_precondition` |
/// | anything else | `internal` |
pub fn io_error(err: &io::Error, path: &Path) -> ConnectError {
    let p = paths::display(path);
    let (code, message) = match err.raw_os_error() {
        Some(libc::ENOENT) => (Code::NotFound, format!("path '{p}' does not exist")),
        Some(libc::EACCES | libc::EPERM) => {
            (Code::PermissionDenied, format!("permission denied: '{p}'"))
        }
        Some(libc::EROFS) => (
            Code::PermissionDenied,
            format!("'{p}' is on a read-only file system"),
        ),
        Some(libc::ENOTDIR) => (
            Code::InvalidArgument,
            format!("a component of path '{p}' is not a directory"),
        ),
        Some(libc::EISDIR) => (Code::InvalidArgument, format!("path '{p}' is a directory")),
        Some(libc::EINVAL) => (
            Code::InvalidArgument,
            format!("invalid operation on '{p}': {err}"),
        ),
        Some(libc::ELOOP) => (
            Code::InvalidArgument,
            format!("too many levels of symbolic links in '{p}'"),
        ),
        Some(libc::ENAMETOOLONG) => (Code::InvalidArgument, format!("path '{p}' is too long")),
        Some(libc::EEXIST) => (Code::AlreadyExists, format!("path '{p}' already exists")),
        Some(libc::ENOTEMPTY) => (
            Code::AlreadyExists,
            format!("path '{p}' is a directory that is not empty"),
        ),
        Some(libc::ENOSPC | libc::EDQUOT) => (
            Code::ResourceExhausted,
            format!("no space left on device for '{p}'"),
        ),
        Some(libc::EBUSY) => (
            Code::FailedPrecondition,
            format!("path '{p}' is busy (a mount point?)"),
        ),
        Some(libc::EXDEV) => (
            Code::FailedPrecondition,
            format!("'{p}' cannot be moved across file systems"),
        ),
        _ => (Code::Internal, format!("'{p}': {err}")),
    };
    ConnectError::new(code, message)
}

/// Creates `dir` and its missing parents (`mkdir -p`) with mode 0755; each directory
/// created is owned by `uid`:`gid`. On failure, returns the error and the path it
/// happened on (a path component that exists but is not a directory is `ENOTDIR`).
pub fn ensure_dirs(dir: &Path, uid: u32, gid: u32) -> Result<(), (io::Error, PathBuf)> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if std::fs::metadata(dir).is_ok_and(|m| m.is_dir()) {
        return Ok(());
    }
    let mut current = PathBuf::from("/");
    for component in dir.components().skip(1) {
        current.push(component);
        match std::fs::metadata(&current) {
            Ok(m) if m.is_dir() => continue,
            Ok(_) => return Err((io::Error::from_raw_os_error(libc::ENOTDIR), current)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err((e, current)),
        }
        match std::fs::DirBuilder::new().mode(0o755).create(&current) {
            Ok(()) => {}
            // Someone else just created it: take it over as upstream does, if a dir.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                if !std::fs::symlink_metadata(&current).is_ok_and(|m| m.is_dir()) {
                    return Err((io::Error::from_raw_os_error(libc::ENOTDIR), current));
                }
            }
            Err(e) => return Err((e, current)),
        }
        // lchown: never follow a link someone swapped in meanwhile.
        std::os::unix::fs::lchown(&current, Some(uid), Some(gid))
            .map_err(|e| (e, current.clone()))?;
        // The mode must not depend on the agent's umask.
        std::fs::set_permissions(&current, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| (e, current.clone()))?;
    }
    Ok(())
}

/// `n` random bytes as lowercase hex (ids of watchers, names of temporary files).
pub fn random_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    let mut filled = 0;
    while filled < n {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`.
        let r = unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), n - filled, 0) };
        if r <= 0 {
            // getrandom cannot fail on a running kernel except EINTR; never loop forever.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default();
            for (i, b) in buf[filled..].iter_mut().enumerate() {
                *b = (nanos >> ((i % 16) * 8)) as u8 ^ (std::process::id() as u8);
            }
            break;
        }
        filled += r as usize;
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn io_errors_map_to_connect_codes() {
        let p = Path::new("/x");
        let code = |errno| io_error(&io::Error::from_raw_os_error(errno), p).code;
        assert_eq!(code(libc::ENOENT), Code::NotFound);
        assert_eq!(
            io_error(&io::Error::from_raw_os_error(libc::ENOENT), p).message,
            "path '/x' does not exist"
        );
        assert_eq!(code(libc::EACCES), Code::PermissionDenied);
        assert_eq!(code(libc::EPERM), Code::PermissionDenied);
        assert_eq!(code(libc::ENOTDIR), Code::InvalidArgument);
        assert_eq!(code(libc::EISDIR), Code::InvalidArgument);
        assert_eq!(code(libc::EINVAL), Code::InvalidArgument);
        assert_eq!(code(libc::ENOSPC), Code::ResourceExhausted);
        assert_eq!(code(libc::EDQUOT), Code::ResourceExhausted);
        assert_eq!(code(libc::EEXIST), Code::AlreadyExists);
        assert_eq!(code(libc::EIO), Code::Internal);
        assert!(io_error(&io::Error::from_raw_os_error(libc::EIO), p)
            .message
            .contains("/x"));
    }

    #[test]
    fn ensure_dirs_creates_parents_and_refuses_files() {
        let tmp = tempfile::tempdir().unwrap();
        let (uid, gid) = (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        );
        let deep = tmp.path().join("a/b/c");
        ensure_dirs(&deep, uid, gid).unwrap();
        let m = std::fs::metadata(&deep).unwrap();
        assert!(m.is_dir());
        assert_eq!(m.mode() & 0o7777, 0o755);
        assert_eq!(m.uid(), uid);
        // Idempotent.
        ensure_dirs(&deep, uid, gid).unwrap();
        std::fs::write(tmp.path().join("file"), b"x").unwrap();
        let (err, at) = ensure_dirs(&tmp.path().join("file/sub"), uid, gid).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOTDIR));
        assert_eq!(at, tmp.path().join("file"));
    }

    #[test]
    fn random_ids_differ() {
        let a = random_hex(8);
        assert_eq!(a.len(), 16);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, random_hex(8));
    }
}
