//! `GET /files?path=...`: the file's bytes, streamed in chunks.
//!
//! 200 with `Content-Type: application/octet-stream` and `Content-Length`; 404 if
//! missing, 400 for a directory or anything that is not a regular file (fifos and
//! devices could block or never end), 403 if the agent may not open it. The body is
//! read with synchronous `std::fs` reads of [`CHUNK`] bytes, yielding to the runtime
//! between chunks; it is never compressed (gzip is optional in envd's protocol).

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};

use super::{prepare, resolve, FileError};
use crate::auth::FileOperation;
use crate::paths;
use crate::rpc::Body;
use crate::server::Agent;

/// Bytes read per chunk.
pub const CHUNK: usize = 64 * 1024;

/// `GET /files`.
pub async fn download(agent: &Arc<Agent>, req: Request<Incoming>) -> Response<Body> {
    match open(agent, &req) {
        Ok((file, len, name)) => respond(file, len, &name),
        Err(e) => e.response(),
    }
}

fn open(agent: &Agent, req: &Request<Incoming>) -> Result<(File, u64, String), FileError> {
    let (q, user) = prepare(agent, req.headers(), req.uri().query(), FileOperation::Read)?;
    let path = resolve(q.path.as_deref().unwrap_or_default(), &user)?;
    // O_NONBLOCK: opening a fifo must not wait for a writer.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&path)
        .map_err(|e| FileError::io(&e, &path))?;
    let meta = file.metadata().map_err(|e| FileError::io(&e, &path))?;
    if meta.is_dir() {
        return Err(FileError::bad_request(format!(
            "path '{}' is a directory",
            paths::display(&path)
        )));
    }
    if !meta.is_file() {
        return Err(FileError::bad_request(format!(
            "path '{}' is not a regular file",
            paths::display(&path)
        )));
    }
    Ok((file, meta.len(), crate::filesystem::entry::name_of(&path)))
}

fn respond(file: File, len: u64, name: &str) -> Response<Body> {
    let chunks = futures_util::stream::unfold((file, len), |(mut file, remaining)| async move {
        if remaining == 0 {
            return None;
        }
        tokio::task::yield_now().await;
        let want = remaining.min(CHUNK as u64) as usize;
        let mut buf = BytesMut::zeroed(want);
        let result = loop {
            match file.read(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => break r,
            }
        };
        match result {
            Ok(n) if n > 0 => {
                buf.truncate(n);
                let frame = Frame::data(Bytes::from(buf));
                Some((Ok(frame), (file, remaining - n as u64)))
            }
            // The file shrank under us: fail the body rather than send a short one.
            Ok(_) => Some((
                Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "file shrank while it was downloaded",
                )),
                (file, 0),
            )),
            Err(e) => Some((Err(e), (file, 0))),
        }
    });
    let mut builder = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, len);
    if let Some(disposition) = content_disposition(name) {
        builder = builder.header(header::CONTENT_DISPOSITION, disposition);
    }
    builder
        .body(StreamBody::new(chunks.boxed()).boxed_unsync())
        .expect("valid response")
}

/// `inline; filename="..."` when the name is plain printable ASCII.
fn content_disposition(name: &str) -> Option<String> {
    let plain = name
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\');
    plain.then(|| format!("inline; filename=\"{name}\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn streams_whole_file_in_chunks() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("big.bin");
        let data: Vec<u8> = (0..CHUNK * 3 + 17).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let resp = respond(File::open(&path).unwrap(), data.len() as u64, "big.bin");
        assert_eq!(
            resp.headers()[header::CONTENT_LENGTH],
            (data.len()).to_string().as_str()
        );
        assert_eq!(
            resp.headers()[header::CONTENT_DISPOSITION],
            "inline; filename=\"big.bin\""
        );
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body.as_ref(), data.as_slice());
    }

    #[tokio::test]
    async fn shrinking_file_fails_the_body() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("f");
        std::fs::write(&path, b"short").unwrap();
        let resp = respond(File::open(&path).unwrap(), 100, "f");
        assert!(resp.into_body().collect().await.is_err());
    }

    #[test]
    fn dispositions() {
        assert_eq!(
            content_disposition("a b.txt").as_deref(),
            Some("inline; filename=\"a b.txt\"")
        );
        assert_eq!(content_disposition("q\"uote"), None);
        assert_eq!(content_disposition("ünï"), None);
    }
}
