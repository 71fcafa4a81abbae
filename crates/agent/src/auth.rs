//! Who may call the agent and as which user.
//!
//! - With an access token configured, every request but `/health` must carry it in
//!   `X-Access-Token`, except `/files` requests signed with it (E2B's signed URLs:
//!   `signature = "v1_" + base64_nopad(sha256("<path>:<read|write>:<user>:<token>[:<exp>]"))`).
//! - The user is named by `Authorization: Basic base64("<user>:")` on RPCs and by
//!   `?username=` on `/files`; absent means the sandbox's default user.

use base64::Engine;
use http::HeaderMap;
use sha2::{Digest, Sha256};

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Missing or wrong `X-Access-Token`.
    #[error("missing or invalid access token")]
    BadToken,
    /// A malformed `Authorization` header.
    #[error("malformed Authorization header: {0}")]
    BadAuthorization(&'static str),
    /// A signed URL whose signature does not match.
    #[error("invalid signature")]
    BadSignature,
    /// A signed URL past its expiry.
    #[error("signature expired")]
    Expired,
}

/// Whether the request carries the sandbox's access token (or none is configured).
pub fn token_ok(expected: Option<&str>, headers: &HeaderMap) -> bool {
    match expected {
        None => true,
        Some(expected) => headers
            .get("x-access-token")
            .is_some_and(|got| constant_time_eq(got.as_bytes(), expected.as_bytes())),
    }
}

/// The user named by `Authorization: Basic`, if any.
pub fn basic_user(headers: &HeaderMap) -> Result<Option<String>, AuthError> {
    let Some(value) = headers.get(http::header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| AuthError::BadAuthorization("not ASCII"))?;
    let encoded = value
        .strip_prefix("Basic ")
        .ok_or(AuthError::BadAuthorization("not Basic"))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| AuthError::BadAuthorization("bad base64"))?;
    let text = String::from_utf8(decoded).map_err(|_| AuthError::BadAuthorization("not UTF-8"))?;
    let user = text.split(':').next().unwrap_or_default();
    Ok((!user.is_empty()).then(|| user.to_owned()))
}

/// What a signed `/files` URL allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileOperation {
    /// `GET /files`.
    Read,
    /// `POST /files`.
    Write,
}

impl FileOperation {
    fn as_str(self) -> &'static str {
        match self {
            FileOperation::Read => "read",
            FileOperation::Write => "write",
        }
    }
}

/// E2B's URL signature for `path`, `op`, `user` (empty for the default), `token`.
pub fn signature(
    path: &str,
    op: FileOperation,
    user: &str,
    token: &str,
    expiration: Option<u64>,
) -> String {
    let mut raw = format!("{path}:{}:{user}:{token}", op.as_str());
    if let Some(exp) = expiration {
        raw.push_str(&format!(":{exp}"));
    }
    let digest = Sha256::digest(raw.as_bytes());
    format!(
        "v1_{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
    )
}

/// Checks a signed URL's `signature` and `signature_expiration` (unix seconds).
pub fn verify_signature(
    path: &str,
    op: FileOperation,
    user: &str,
    token: &str,
    given: &str,
    expiration: Option<u64>,
    now_unix: u64,
) -> Result<(), AuthError> {
    let expected = signature(path, op, user, token, expiration);
    if !constant_time_eq(given.as_bytes(), expected.as_bytes()) {
        return Err(AuthError::BadSignature);
    }
    match expiration {
        Some(exp) if exp < now_unix => Err(AuthError::Expired),
        _ => Ok(()),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        let mut h = HeaderMap::new();
        assert!(token_ok(None, &h));
        assert!(!token_ok(Some("s3cret"), &h));
        h.insert("x-access-token", "s3cret".parse().unwrap());
        assert!(token_ok(Some("s3cret"), &h));
        assert!(!token_ok(Some("s3creT"), &h));
    }

    #[test]
    fn basic_users() {
        let mut h = HeaderMap::new();
        assert_eq!(basic_user(&h), Ok(None));
        h.insert(
            http::header::AUTHORIZATION,
            "Basic cm9vdDo=".parse().unwrap(),
        );
        assert_eq!(basic_user(&h), Ok(Some("root".into())));
        h.insert(http::header::AUTHORIZATION, "Bearer x".parse().unwrap());
        assert!(basic_user(&h).is_err());
    }

    #[test]
    fn signatures() {
        let sig = signature("/home/user/a.txt", FileOperation::Read, "", "tok", None);
        assert!(sig.starts_with("v1_") && !sig.ends_with('='));
        let ok = |s: &str, exp, now| {
            verify_signature(
                "/home/user/a.txt",
                FileOperation::Read,
                "",
                "tok",
                s,
                exp,
                now,
            )
        };
        assert_eq!(ok(&sig, None, 0), Ok(()));
        let write = signature("/home/user/a.txt", FileOperation::Write, "", "tok", None);
        assert_eq!(ok(&write, None, 0), Err(AuthError::BadSignature));
        let timed = signature(
            "/home/user/a.txt",
            FileOperation::Read,
            "",
            "tok",
            Some(100),
        );
        assert_eq!(ok(&timed, Some(100), 50), Ok(()));
        assert_eq!(ok(&timed, Some(100), 101), Err(AuthError::Expired));
    }
}
