//! `GET /files` (download, [`download`]) and `POST /files` (upload, [`upload`]).
//!
//! Both take `?path=` (absolute, or relative to the user's home) and `?username=`
//! (default: the sandbox's default user), percent-decoded; a value that is not UTF-8
//! after decoding, or a path with a NUL byte, is a 400. With an access token
//! configured, a request needs `X-Access-Token` or a valid URL signature
//! (`signature`, `signature_expiration`), else 401; a token header that is present but
//! wrong is a 401 even with a valid signature (as envd). An unknown user is a 401.
//! Errors are JSON `{"code": <status>, "message": "..."}`.
//!
//! Files are read and written by the agent (root of the sandbox) on behalf of the user,
//! as upstream envd does: the user decides where relative paths go and who owns
//! what is written, not what may be read or overwritten.

mod download;
mod upload;

use std::io;
use std::path::{Path, PathBuf};

use http::{HeaderMap, StatusCode};

use crate::auth::{self, FileOperation};
use crate::paths;
use crate::rpc::{self, Body};
use crate::server::Agent;
use crate::users::{User, UserError};

pub use download::download;
pub use upload::upload;

/// A `/files` failure: the HTTP status and the message of the JSON error body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileError {
    /// HTTP status.
    pub status: StatusCode,
    /// Message for the client.
    pub message: String,
}

impl FileError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        FileError {
            status,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        FileError::new(StatusCode::BAD_REQUEST, message)
    }

    fn response(&self) -> http::Response<Body> {
        rpc::http_error(self.status, self.message.clone())
    }

    /// An I/O error on `path`: 404 missing, 403 permission, 400 bad path, 507 disk
    /// full, 500 otherwise.
    fn io(err: &io::Error, path: &Path) -> Self {
        let p = paths::display(path);
        let (status, message) = match err.raw_os_error() {
            Some(libc::ENOENT) => (StatusCode::NOT_FOUND, format!("path '{p}' does not exist")),
            Some(libc::EACCES | libc::EPERM) => {
                (StatusCode::FORBIDDEN, format!("permission denied: '{p}'"))
            }
            Some(libc::EROFS) => (
                StatusCode::FORBIDDEN,
                format!("'{p}' is on a read-only file system"),
            ),
            Some(libc::ENOTDIR) => (
                StatusCode::BAD_REQUEST,
                format!("a component of path '{p}' is not a directory"),
            ),
            Some(libc::EISDIR) => (
                StatusCode::BAD_REQUEST,
                format!("path '{p}' is a directory"),
            ),
            Some(libc::ELOOP) => (
                StatusCode::BAD_REQUEST,
                format!("too many levels of symbolic links in '{p}'"),
            ),
            Some(libc::ENAMETOOLONG) => {
                (StatusCode::BAD_REQUEST, format!("path '{p}' is too long"))
            }
            Some(libc::ENOSPC | libc::EDQUOT) => (
                StatusCode::INSUFFICIENT_STORAGE,
                format!("not enough disk space available to write '{p}'"),
            ),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, format!("'{p}': {err}")),
        };
        FileError::new(status, message)
    }
}

/// The query parameters `/files` understands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileQuery {
    /// `path`.
    pub path: Option<String>,
    /// `username`.
    pub username: Option<String>,
    /// `signature`.
    pub signature: Option<String>,
    /// `signature_expiration` (unix seconds).
    pub signature_expiration: Option<String>,
}

impl FileQuery {
    /// Parses a query string as form data (`+` is a space, `%XX` a byte). The first
    /// occurrence of a parameter wins; unknown parameters are ignored.
    pub fn parse(query: Option<&str>) -> Result<FileQuery, FileError> {
        let mut q = FileQuery::default();
        for pair in query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
        {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let key = decode(key);
            let slot = match key.as_slice() {
                b"path" => &mut q.path,
                b"username" => &mut q.username,
                b"signature" => &mut q.signature,
                b"signature_expiration" => &mut q.signature_expiration,
                _ => continue,
            };
            if slot.is_some() {
                continue;
            }
            let value = String::from_utf8(decode(value)).map_err(|_| {
                FileError::bad_request(format!(
                    "query parameter '{}' is not valid UTF-8 after percent-decoding",
                    String::from_utf8_lossy(&key)
                ))
            })?;
            *slot = Some(value);
        }
        Ok(q)
    }
}

fn decode(s: &str) -> Vec<u8> {
    let plus_as_space = s.replace('+', " ");
    percent_encoding::percent_decode_str(&plus_as_space).collect()
}

/// Checks the access token or the URL signature for `op`.
fn authorize(
    agent: &Agent,
    headers: &HeaderMap,
    q: &FileQuery,
    op: FileOperation,
) -> Result<(), FileError> {
    let Some(token) = agent.access_token() else {
        return Ok(());
    };
    let token = token.as_str();
    let unauthorized = |m: &str| FileError::new(StatusCode::UNAUTHORIZED, m);
    if headers.contains_key("x-access-token") {
        return if auth::token_ok(Some(token), headers) {
            Ok(())
        } else {
            Err(unauthorized(
                "access token present in header but does not match",
            ))
        };
    }
    let Some(signature) = q.signature.as_deref() else {
        return Err(unauthorized(
            "unauthorized access, please provide a valid access token or method signing if supported",
        ));
    };
    let expiration = match q.signature_expiration.as_deref() {
        None => None,
        Some(s) => Some(
            s.trim()
                .parse::<u64>()
                .map_err(|_| unauthorized("invalid signature_expiration"))?,
        ),
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    auth::verify_signature(
        q.path.as_deref().unwrap_or_default(),
        op,
        q.username.as_deref().unwrap_or_default(),
        token,
        signature,
        expiration,
        now,
    )
    .map_err(|e| unauthorized(&e.to_string()))
}

/// The user named by the query (401 if unknown).
fn user_of(agent: &Agent, q: &FileQuery) -> Result<User, FileError> {
    let name = q.username.as_deref().filter(|n| !n.is_empty());
    agent.user(name).map_err(|e| match e {
        UserError::Unknown(name) => FileError::new(
            StatusCode::UNAUTHORIZED,
            format!("error looking up user '{name}': no such user in the sandbox"),
        ),
        e @ (UserError::Read { .. } | UserError::UnknownGroup(_)) => {
            FileError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
        }
    })
}

/// Resolves a client path for `user` (400 on a NUL byte).
fn resolve(path: &str, user: &User) -> Result<PathBuf, FileError> {
    paths::resolve(path, &user.home).map_err(|e| FileError::bad_request(e.to_string()))
}

/// Parses, authorizes and resolves the parts every `/files` request shares.
fn prepare(
    agent: &Agent,
    headers: &HeaderMap,
    query: Option<&str>,
    op: FileOperation,
) -> Result<(FileQuery, User), FileError> {
    let q = FileQuery::parse(query)?;
    authorize(agent, headers, &q, op)?;
    let user = user_of(agent, &q)?;
    Ok((q, user))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cubicle_runtime::AgentConfig;

    #[test]
    fn query_parsing() {
        let q = FileQuery::parse(Some(
            "path=%2Fhome%2Fuser%2Fa+b.txt&username=root&x=%FF&path=ignored",
        ))
        .unwrap();
        assert_eq!(q.path.as_deref(), Some("/home/user/a b.txt"));
        assert_eq!(q.username.as_deref(), Some("root"));
        assert_eq!(FileQuery::parse(None).unwrap(), FileQuery::default());
        let q = FileQuery::parse(Some(
            "path=%E2%9C%93&signature=v1_abc&signature_expiration=12",
        ))
        .unwrap();
        assert_eq!(q.path.as_deref(), Some("✓"));
        assert_eq!(q.signature_expiration.as_deref(), Some("12"));
        let bad = FileQuery::parse(Some("path=%FF%FE")).unwrap_err();
        assert_eq!(bad.status, StatusCode::BAD_REQUEST);
        assert!(bad.message.contains("UTF-8"), "{}", bad.message);
        // A NUL decodes fine; resolving refuses it.
        let q = FileQuery::parse(Some("path=a%00b")).unwrap();
        let user = User {
            name: "u".into(),
            uid: 1,
            gid: 1,
            home: "/home/u".into(),
            shell: String::new(),
            groups: vec![],
        };
        assert_eq!(
            resolve(q.path.as_deref().unwrap(), &user)
                .unwrap_err()
                .status,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            resolve("/../../etc/hostname", &user).unwrap(),
            Path::new("/etc/hostname")
        );
    }

    fn agent(token: Option<&str>) -> Agent {
        let mut config = AgentConfig::new("test");
        config.access_token = token.map(str::to_owned);
        Agent::new(config)
    }

    #[test]
    fn signature_decisions() {
        let none = agent(None);
        let h = HeaderMap::new();
        let q = |s: &str| FileQuery::parse(Some(s)).unwrap();
        // Signatures are standard base64: '+' and '/' must be percent-encoded.
        let enc = |s: String| {
            percent_encoding::utf8_percent_encode(&s, percent_encoding::NON_ALPHANUMERIC)
                .to_string()
        };
        assert!(authorize(&none, &h, &q(""), FileOperation::Read).is_ok());

        let a = agent(Some("tok"));
        assert_eq!(
            authorize(&a, &h, &q("path=/x"), FileOperation::Read)
                .unwrap_err()
                .status,
            StatusCode::UNAUTHORIZED
        );
        let mut good = HeaderMap::new();
        good.insert("x-access-token", "tok".parse().unwrap());
        assert!(authorize(&a, &good, &q("path=/x"), FileOperation::Read).is_ok());

        let sig = enc(auth::signature("/x", FileOperation::Read, "", "tok", None));
        assert!(authorize(
            &a,
            &h,
            &q(&format!("path=/x&signature={sig}")),
            FileOperation::Read
        )
        .is_ok());
        // Signed for another operation, path or user.
        assert!(authorize(
            &a,
            &h,
            &q(&format!("path=/x&signature={sig}")),
            FileOperation::Write
        )
        .is_err());
        assert!(authorize(
            &a,
            &h,
            &q(&format!("path=/y&signature={sig}")),
            FileOperation::Read
        )
        .is_err());
        assert!(authorize(
            &a,
            &h,
            &q(&format!("path=/x&username=root&signature={sig}")),
            FileOperation::Read
        )
        .is_err());
        let root_sig = enc(auth::signature(
            "/x",
            FileOperation::Read,
            "root",
            "tok",
            None,
        ));
        assert!(authorize(
            &a,
            &h,
            &q(&format!("path=/x&username=root&signature={root_sig}")),
            FileOperation::Read
        )
        .is_ok());
        // A wrong token header loses even with a valid signature.
        let mut wrong = HeaderMap::new();
        wrong.insert("x-access-token", "nope".parse().unwrap());
        assert!(authorize(
            &a,
            &wrong,
            &q(&format!("path=/x&signature={sig}")),
            FileOperation::Read
        )
        .is_err());
        // Expiry.
        let future = 4_000_000_000u64;
        let timed = enc(auth::signature(
            "/x",
            FileOperation::Write,
            "",
            "tok",
            Some(future),
        ));
        let ok = format!("path=/x&signature={timed}&signature_expiration={future}");
        assert!(authorize(&a, &h, &q(&ok), FileOperation::Write).is_ok());
        let old = enc(auth::signature(
            "/x",
            FileOperation::Write,
            "",
            "tok",
            Some(1),
        ));
        let expired = authorize(
            &a,
            &h,
            &q(&format!("path=/x&signature={old}&signature_expiration=1")),
            FileOperation::Write,
        );
        assert!(expired.unwrap_err().message.contains("expired"));
        let garbage = authorize(
            &a,
            &h,
            &q(&format!(
                "path=/x&signature={timed}&signature_expiration=soon"
            )),
            FileOperation::Write,
        );
        assert_eq!(garbage.unwrap_err().status, StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn io_errors_map_to_statuses() {
        let p = Path::new("/x");
        let status = |errno| FileError::io(&io::Error::from_raw_os_error(errno), p).status;
        assert_eq!(status(libc::ENOENT), StatusCode::NOT_FOUND);
        assert_eq!(
            FileError::io(&io::Error::from_raw_os_error(libc::ENOENT), p).message,
            "path '/x' does not exist"
        );
        assert_eq!(status(libc::EACCES), StatusCode::FORBIDDEN);
        assert_eq!(status(libc::EISDIR), StatusCode::BAD_REQUEST);
        assert_eq!(status(libc::ENOSPC), StatusCode::INSUFFICIENT_STORAGE);
        assert_eq!(status(libc::EDQUOT), StatusCode::INSUFFICIENT_STORAGE);
        assert_eq!(status(libc::EIO), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
