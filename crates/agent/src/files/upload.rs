//! `POST /files`: uploads, as `multipart/form-data` or `application/octet-stream`.
//!
//! - **multipart**: every part named `file` is a file (other parts are skipped); its
//!   destination is `?path=` if given, else the part's `filename` (absolute or relative
//!   to the user's home). The same destination twice in one request is a 400; files
//!   written before that stay written, as in envd.
//! - **octet-stream**: the body is the file; `?path=` is required.
//! - `Content-Encoding: gzip` (either kind) is gunzipped while streaming.
//! - `X-Metadata-<key>: <value>` headers become `user.e2b.<key>` xattrs of every file
//!   written (best effort where the file system has no user xattrs).
//!
//! Each file is streamed chunk by chunk into a temporary file next to its destination
//! (named [`UPLOAD_TEMP_PREFIX`]`<random>`, hidden from watches), owned by the user,
//! then renamed over the destination, so a failed upload never leaves half a file; a
//! final same-size `ftruncate` makes watchers see a `WRITE` of the destination (envd
//! writes in place, and clients wait for that event). Missing parent directories are
//! created and owned by the user. An existing destination keeps its permission bits
//! (new files get 0644); a destination that is a symlink is written through (the link
//! stays), as envd's in-place write does.
//!
//! More than `max_upload_bytes` of file content (after gunzip) is a 413 and nothing of
//! the file that crossed the limit is kept; disk full is a 507. After an error the rest
//! of the request body is read and discarded (up to [`DRAIN_LIMIT`]) so the client gets
//! the answer instead of a reset connection. Success is 200 with
//! `[{"name": "a.txt", "type": "file", "path": "/home/user/a.txt"}]`.

use std::collections::{BTreeMap, HashSet};
use std::ffi::CString;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use flate2::write::MultiGzDecoder;
use futures_util::{Stream, StreamExt};
use http::{header, HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::Serialize;

use super::{prepare, resolve, FileError};
use crate::auth::FileOperation;
use crate::filesystem::entry::{name_of, METADATA_XATTR_PREFIX};
use crate::filesystem::{ensure_dirs, random_hex};
use crate::paths;
use crate::rpc::{self, Body};
use crate::server::Agent;
use crate::users::User;
pub use crate::watch::UPLOAD_TEMP_PREFIX;

/// Request bytes read and discarded after an error, at most.
pub const DRAIN_LIMIT: u64 = 256 << 20;
/// Time spent discarding the rest of a failed request, at most.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Compressed bytes fed to the gzip decoder at once (bounds the output per step).
const GZIP_INPUT_STEP: usize = 4096;
/// Longest metadata key (the xattr name `user.e2b.<key>` is at most 255 bytes).
const MAX_METADATA_KEY: usize = 255 - METADATA_XATTR_PREFIX.len();
/// Largest total metadata (names and values) per file.
const MAX_METADATA_TOTAL: usize = 4096;

/// One written file, as the response lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Written {
    /// Base name.
    pub name: String,
    /// Always `"file"`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Absolute path.
    pub path: String,
    /// Metadata stored on the file.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

/// `POST /files`.
pub async fn upload(agent: &Arc<Agent>, req: Request<Incoming>) -> Response<Body> {
    let (parts, incoming) = req.into_parts();
    let mut body = UploadBody::new(incoming, content_length(&parts.headers));
    let result = handle(agent, &parts.headers, parts.uri.query(), &mut body).await;
    body.drain().await;
    match result {
        Ok(written) => rpc::json(StatusCode::OK, &written),
        Err(e) => {
            tracing::debug!(status = %e.status, message = %e.message, "upload failed");
            e.response()
        }
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// Everything but the response: parses, authorizes and writes the files.
pub async fn handle<B>(
    agent: &Agent,
    headers: &HeaderMap,
    query: Option<&str>,
    body: &mut UploadBody<B>,
) -> Result<Vec<Written>, FileError>
where
    B: http_body::Body<Data = Bytes> + Unpin + Send,
    B::Error: std::fmt::Display,
{
    let (q, user) = prepare(agent, headers, query, FileOperation::Write)?;
    let metadata = metadata_headers(headers)?;
    let gzip = match headers.get(header::CONTENT_ENCODING).map(|v| v.to_str()) {
        None => false,
        Some(Ok(v)) if v.trim().eq_ignore_ascii_case("identity") || v.trim().is_empty() => false,
        Some(Ok(v))
            if v.trim().eq_ignore_ascii_case("gzip") || v.trim().eq_ignore_ascii_case("x-gzip") =>
        {
            true
        }
        Some(v) => {
            return Err(FileError::bad_request(format!(
                "unsupported Content-Encoding {:?} (only gzip)",
                v.unwrap_or("<not ASCII>")
            )))
        }
    };
    if gzip {
        body.gunzip();
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let media = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let mut budget = Budget {
        limit: agent.config.max_upload_bytes,
        used: 0,
    };
    if media == "application/octet-stream" {
        let path = q.path.as_deref().ok_or_else(|| {
            FileError::bad_request("path query parameter is required for raw body upload")
        })?;
        let target = resolve(path, &user)?;
        if !gzip && body.announced.is_some_and(|n| n > budget.limit) {
            return Err(budget.exceeded());
        }
        let mut writer = FileWriter::create(&target, &user, &metadata)?;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(body_error)?;
            budget.take(chunk.len())?;
            writer.write(&chunk)?;
            tokio::task::yield_now().await;
        }
        let stored = writer.commit()?;
        Ok(vec![written(&target, stored)])
    } else if media.starts_with("multipart/") {
        let boundary = multer::parse_boundary(content_type)
            .map_err(|e| FileError::bad_request(format!("invalid multipart content type: {e}")))?;
        multipart(
            q.path.as_deref(),
            &user,
            &metadata,
            body,
            boundary,
            &mut budget,
        )
        .await
    } else {
        Err(FileError::bad_request(format!(
            "unsupported content type '{content_type}', expected multipart/form-data or application/octet-stream"
        )))
    }
}

async fn multipart<B>(
    path: Option<&str>,
    user: &User,
    metadata: &BTreeMap<String, String>,
    body: &mut UploadBody<B>,
    boundary: String,
    budget: &mut Budget,
) -> Result<Vec<Written>, FileError>
where
    B: http_body::Body<Data = Bytes> + Unpin + Send,
    B::Error: std::fmt::Display,
{
    let mut parts = multer::Multipart::new(body, boundary);
    let mut out: Vec<Written> = Vec::new();
    let mut seen = HashSet::new();
    while let Some(mut field) = parts.next_field().await.map_err(multipart_error)? {
        if field.name() != Some("file") {
            continue;
        }
        let destination = match path.or(field.file_name()).filter(|p| !p.is_empty()) {
            Some(d) => d.to_owned(),
            None => {
                return Err(FileError::bad_request(
                    "a 'file' part has no filename and no path query parameter was given",
                ))
            }
        };
        let target = resolve(&destination, user)?;
        if !seen.insert(target.clone()) {
            let mut message = format!(
                "you cannot upload multiple files to the same path '{}' in one upload request, only the first specified file was uploaded",
                paths::display(&target)
            );
            let others: Vec<&str> = out
                .iter()
                .map(|w| w.path.as_str())
                .filter(|p| *p != paths::display(&target))
                .collect();
            if !others.is_empty() {
                message.push_str(&format!(
                    ", also the following files were uploaded: {}",
                    others.join(", ")
                ));
            }
            return Err(FileError::bad_request(message));
        }
        let mut writer = FileWriter::create(&target, user, metadata)?;
        while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
            budget.take(chunk.len())?;
            writer.write(&chunk)?;
            tokio::task::yield_now().await;
        }
        let stored = writer.commit()?;
        out.push(written(&target, stored));
    }
    if out.is_empty() {
        return Err(FileError::bad_request(
            "the multipart body has no part named 'file'",
        ));
    }
    Ok(out)
}

fn written(target: &Path, metadata: BTreeMap<String, String>) -> Written {
    Written {
        name: name_of(target),
        kind: "file",
        path: paths::display(target),
        metadata,
    }
}

fn body_error(e: io::Error) -> FileError {
    FileError::bad_request(e.to_string())
}

fn multipart_error(e: multer::Error) -> FileError {
    match e {
        multer::Error::StreamReadFailed(inner) => FileError::bad_request(inner.to_string()),
        e => FileError::bad_request(format!("malformed multipart body: {e}")),
    }
}

/// Counts file bytes against `max_upload_bytes`.
#[derive(Debug)]
struct Budget {
    limit: u64,
    used: u64,
}

impl Budget {
    fn take(&mut self, n: usize) -> Result<(), FileError> {
        self.used += n as u64;
        if self.used > self.limit {
            return Err(self.exceeded());
        }
        Ok(())
    }

    fn exceeded(&self) -> FileError {
        FileError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("upload exceeds {} bytes", self.limit),
        )
    }
}

/// `X-Metadata-<key>` headers: keys lowercased, keys and values printable ASCII,
/// at most [`MAX_METADATA_TOTAL`] bytes in all.
pub fn metadata_headers(headers: &HeaderMap) -> Result<BTreeMap<String, String>, FileError> {
    let mut out = BTreeMap::new();
    let mut total = 0;
    for (name, value) in headers {
        let Some(key) = name.as_str().strip_prefix("x-metadata-") else {
            continue;
        };
        if key.is_empty() || out.contains_key(key) {
            continue;
        }
        if key.len() > MAX_METADATA_KEY {
            return Err(FileError::bad_request(format!(
                "invalid metadata: key {key:?} exceeds {MAX_METADATA_KEY} bytes"
            )));
        }
        let printable = |b: &u8| (0x20..=0x7e).contains(b);
        if !key.as_bytes().iter().all(printable) || !value.as_bytes().iter().all(printable) {
            return Err(FileError::bad_request(format!(
                "invalid metadata: key {key:?} or its value is not printable ASCII"
            )));
        }
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        total += METADATA_XATTR_PREFIX.len() + key.len() + value.len();
        out.insert(key.to_owned(), value);
    }
    if total > MAX_METADATA_TOTAL {
        return Err(FileError::bad_request(format!(
            "invalid metadata: total metadata size {total} exceeds {MAX_METADATA_TOTAL} bytes"
        )));
    }
    Ok(out)
}

/// A file being uploaded: a temporary file next to its destination, removed unless
/// [`FileWriter::commit`] renames it into place.
#[derive(Debug)]
struct FileWriter {
    file: File,
    temp: PathBuf,
    /// Where it goes (a symlinked destination resolved).
    destination: PathBuf,
    /// As the client named it (for messages).
    shown: PathBuf,
    metadata: BTreeMap<String, String>,
    written: u64,
    committed: bool,
}

impl FileWriter {
    fn create(
        target: &Path,
        user: &User,
        metadata: &BTreeMap<String, String>,
    ) -> Result<FileWriter, FileError> {
        let destination = match std::fs::symlink_metadata(target) {
            Ok(m) if m.file_type().is_symlink() => {
                std::fs::canonicalize(target).unwrap_or_else(|_| target.to_owned())
            }
            _ => target.to_owned(),
        };
        let mode = match std::fs::metadata(&destination) {
            Ok(m) if m.is_dir() => {
                return Err(FileError::bad_request(format!(
                    "path '{}' is a directory",
                    paths::display(target)
                )))
            }
            Ok(m) if m.is_file() => m.mode() & 0o777,
            Ok(_) => {
                return Err(FileError::bad_request(format!(
                    "path '{}' is not a regular file",
                    paths::display(target)
                )))
            }
            Err(_) => 0o644,
        };
        let parent = destination.parent().unwrap_or(Path::new("/"));
        ensure_dirs(parent, user.uid, user.gid).map_err(|(e, at)| {
            if e.raw_os_error() == Some(libc::ENOTDIR) {
                FileError::bad_request(format!(
                    "path '{}' exists and is not a directory",
                    paths::display(&at)
                ))
            } else {
                FileError::io(&e, &at)
            }
        })?;
        let temp = parent.join(format!("{UPLOAD_TEMP_PREFIX}{}", random_hex(8)));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&temp)
            .map_err(|e| FileError::io(&e, target))?;
        let mut writer = FileWriter {
            file,
            temp,
            destination,
            shown: target.to_owned(),
            metadata: BTreeMap::new(),
            written: 0,
            committed: false,
        };
        std::os::unix::fs::fchown(&writer.file, Some(user.uid), Some(user.gid))
            .map_err(|e| FileError::io(&e, target))?;
        writer
            .file
            .set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(|e| FileError::io(&e, target))?;
        writer.set_metadata(metadata)?;
        Ok(writer)
    }

    fn set_metadata(&mut self, metadata: &BTreeMap<String, String>) -> Result<(), FileError> {
        for (key, value) in metadata {
            let name = CString::new(format!("{METADATA_XATTR_PREFIX}{key}"))
                .expect("validated: printable ASCII");
            // SAFETY: a valid fd, a NUL-terminated name and a value slice.
            let r = unsafe {
                libc::fsetxattr(
                    self.file.as_raw_fd(),
                    name.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    0,
                )
            };
            if r == 0 {
                self.metadata.insert(key.clone(), value.clone());
                continue;
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::ENOTSUP) => {
                    tracing::warn!(path = %self.shown.display(), "file system has no user xattrs; metadata not stored");
                    return Ok(());
                }
                Some(libc::ENOSPC | libc::EDQUOT | libc::E2BIG) => {
                    return Err(FileError::new(
                        StatusCode::INSUFFICIENT_STORAGE,
                        format!(
                            "not enough space for the metadata of '{}'",
                            paths::display(&self.shown)
                        ),
                    ))
                }
                _ => return Err(FileError::io(&err, &self.shown)),
            }
        }
        Ok(())
    }

    fn write(&mut self, data: &[u8]) -> Result<(), FileError> {
        self.file
            .write_all(data)
            .map_err(|e| FileError::io(&e, &self.shown))?;
        self.written += data.len() as u64;
        Ok(())
    }

    /// Renames the file into place; returns the metadata stored on it.
    fn commit(mut self) -> Result<BTreeMap<String, String>, FileError> {
        std::fs::rename(&self.temp, &self.destination)
            .map_err(|e| FileError::io(&e, &self.shown))?;
        self.committed = true;
        // Same size, no data change: an IN_MODIFY on the destination's name for
        // watchers, which saw only the (hidden) temporary file being written.
        let _ = self.file.set_len(self.written);
        Ok(std::mem::take(&mut self.metadata))
    }
}

impl Drop for FileWriter {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// A request body as a stream of (optionally gunzipped) chunks.
#[derive(Debug)]
pub struct UploadBody<B = Incoming> {
    inner: B,
    gunzip: Option<MultiGzDecoder<Vec<u8>>>,
    /// Compressed bytes not yet fed to the decoder.
    input: Bytes,
    /// `Content-Length`, if announced.
    announced: Option<u64>,
    /// Raw bytes read so far.
    read: u64,
    /// The inner body has ended (or failed).
    ended: bool,
    /// Everything, or an error, has been handed out.
    finished: bool,
}

impl<B> UploadBody<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    /// Wraps a request body whose `Content-Length` is `announced`.
    pub fn new(inner: B, announced: Option<u64>) -> Self {
        UploadBody {
            inner,
            gunzip: None,
            input: Bytes::new(),
            announced,
            read: 0,
            ended: false,
            finished: false,
        }
    }

    /// Decompresses the body as gzip (several members allowed).
    pub fn gunzip(&mut self) {
        self.gunzip = Some(MultiGzDecoder::new(Vec::new()));
    }

    /// Reads and discards what is left of the body, within [`DRAIN_LIMIT`] and
    /// [`DRAIN_TIMEOUT`]; a longer body is left to the connection's close.
    pub async fn drain(&mut self) {
        if self.ended {
            return;
        }
        if self
            .announced
            .is_some_and(|n| n.saturating_sub(self.read) > DRAIN_LIMIT)
        {
            return;
        }
        let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
        let mut drained = 0u64;
        while drained <= DRAIN_LIMIT {
            match tokio::time::timeout_at(deadline, self.inner.frame()).await {
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        drained += data.len() as u64;
                    }
                }
                Ok(None) => {
                    self.ended = true;
                    break;
                }
                Ok(Some(Err(_))) | Err(_) => break,
            }
        }
    }
}

fn invalid_gzip(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("invalid gzip body: {e}"),
    )
}

impl<B> Stream for UploadBody<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.finished {
                return Poll::Ready(None);
            }
            if let Some(decoder) = this.gunzip.as_mut() {
                if !decoder.get_ref().is_empty() {
                    let out = std::mem::take(decoder.get_mut());
                    return Poll::Ready(Some(Ok(Bytes::from(out))));
                }
                if !this.input.is_empty() {
                    let n = this.input.len().min(GZIP_INPUT_STEP);
                    match decoder.write(&this.input[..n]) {
                        Ok(0) => {
                            this.finished = true;
                            return Poll::Ready(Some(Err(invalid_gzip(
                                "unexpected data after the end",
                            ))));
                        }
                        Ok(k) => this.input.advance(k),
                        Err(e) => {
                            this.finished = true;
                            return Poll::Ready(Some(Err(invalid_gzip(e))));
                        }
                    }
                    continue;
                }
                if this.ended {
                    this.finished = true;
                    return match decoder.try_finish() {
                        Ok(()) => {
                            let rest = std::mem::take(decoder.get_mut());
                            Poll::Ready((!rest.is_empty()).then(|| Ok(Bytes::from(rest))))
                        }
                        Err(e) => Poll::Ready(Some(Err(invalid_gzip(e)))),
                    };
                }
            } else if this.ended {
                this.finished = true;
                return Poll::Ready(None);
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        this.read += data.len() as u64;
                        if this.gunzip.is_some() {
                            this.input = data;
                        } else if !data.is_empty() {
                            return Poll::Ready(Some(Ok(data)));
                        }
                    }
                }
                Some(Err(e)) => {
                    this.ended = true;
                    this.finished = true;
                    return Poll::Ready(Some(Err(io::Error::other(format!(
                        "reading request body: {e}"
                    )))));
                }
                None => this.ended = true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::users::Accounts;
    use cubicle_runtime::AgentConfig;
    use flate2::write::GzEncoder;
    use http_body_util::StreamBody;
    use hyper::body::Frame;

    type TestBody =
        StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, io::Error>>>>;

    fn chunked(data: &[u8], chunk: usize) -> UploadBody<TestBody> {
        let frames: Vec<_> = data
            .chunks(chunk.max(1))
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        UploadBody::new(
            StreamBody::new(futures_util::stream::iter(frames)),
            Some(data.len() as u64),
        )
    }

    async fn collect(mut body: UploadBody<TestBody>) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(c) = body.next().await {
            out.extend_from_slice(&c?);
        }
        Ok(out)
    }

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[tokio::test]
    async fn body_passthrough_and_gunzip() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 97) as u8).collect();
        assert_eq!(collect(chunked(&data, 7000)).await.unwrap(), data);
        for step in [1, 100, 65536] {
            let mut b = chunked(&gz(&data), step);
            b.gunzip();
            assert_eq!(collect(b).await.unwrap(), data, "step {step}");
        }
        // Two members.
        let mut two = gz(b"hello ");
        two.extend(gz(b"world"));
        let mut b = chunked(&two, 5);
        b.gunzip();
        assert_eq!(collect(b).await.unwrap(), b"hello world");
        // Truncated and garbage.
        let zipped = gz(&data);
        let mut b = chunked(&zipped[..zipped.len() / 2], 1000);
        b.gunzip();
        assert_eq!(
            collect(b).await.unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        let mut b = chunked(b"definitely not gzip", 4);
        b.gunzip();
        assert!(collect(b).await.is_err());
    }

    /// An agent whose account database has the current uid as `me` (home in `dir`).
    fn agent(dir: &Path, limit: u64) -> Agent {
        let (uid, gid) = (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        );
        let etc = dir.join("etc");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(
            etc.join("passwd"),
            format!("me:x:{uid}:{gid}::{}:/bin/sh\n", dir.join("home").display()),
        )
        .unwrap();
        std::fs::write(etc.join("group"), format!("me:x:{gid}:\n")).unwrap();
        let mut config = AgentConfig::new("test");
        config.default_user = "me".into();
        config.max_upload_bytes = limit;
        let mut agent = Agent::new(config);
        agent.accounts = Accounts::under(dir);
        agent
    }

    fn multipart_body(parts: &[(&str, Option<&str>, &[u8])]) -> (String, Vec<u8>) {
        let boundary = "XyZbOuNdArY";
        let mut body = Vec::new();
        for (name, filename, data) in parts {
            body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
            let disposition = match filename {
                Some(f) => {
                    format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\n")
                }
                None => format!("Content-Disposition: form-data; name=\"{name}\"\r\n"),
            };
            body.extend_from_slice(disposition.as_bytes());
            body.extend_from_slice(b"Content-Type: text/plain\r\n\r\n");
            body.extend_from_slice(data);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        (format!("multipart/form-data; boundary={boundary}"), body)
    }

    async fn run(
        agent: &Agent,
        headers: &[(&str, &str)],
        query: &str,
        data: &[u8],
    ) -> Result<Vec<Written>, FileError> {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let mut body = chunked(data, 1000);
        handle(agent, &h, Some(query), &mut body).await
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for e in walk(dir) {
            let name = e.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with(UPLOAD_TEMP_PREFIX) {
                out.push(name);
            }
        }
        out
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    out.extend(walk(&p));
                }
                out.push(p);
            }
        }
        out
    }

    #[tokio::test]
    async fn multipart_uploads() {
        let tmp = tempfile::tempdir().unwrap();
        let a = agent(tmp.path(), 1 << 20);
        let home = tmp.path().join("home");
        let abs = tmp.path().join("abs/deep/c.txt");
        let (ct, body) = multipart_body(&[
            ("file", Some("a.txt"), b"alpha"),
            ("other", None, b"ignored"),
            ("file", Some("sub/b.txt"), b"beta"),
            ("file", Some(abs.to_str().unwrap()), b""),
        ]);
        let written = run(&a, &[("content-type", &ct)], "", &body).await.unwrap();
        let paths: Vec<_> = written.iter().map(|w| w.path.clone()).collect();
        assert_eq!(
            paths,
            [
                home.join("a.txt").display().to_string(),
                home.join("sub/b.txt").display().to_string(),
                abs.display().to_string()
            ]
        );
        assert_eq!(written[0].name, "a.txt");
        assert_eq!(serde_json::to_value(&written[0]).unwrap()["type"], "file");
        assert_eq!(std::fs::read(home.join("a.txt")).unwrap(), b"alpha");
        assert_eq!(std::fs::read(home.join("sub/b.txt")).unwrap(), b"beta");
        assert_eq!(std::fs::read(&abs).unwrap(), b"");
        let m = std::fs::metadata(home.join("a.txt")).unwrap();
        assert_eq!(m.mode() & 0o777, 0o644);
        assert_eq!(m.uid(), nix::unistd::getuid().as_raw());
        assert!(leftovers(tmp.path()).is_empty());

        // ?path= wins over the filename.
        let (ct, body) = multipart_body(&[("file", Some("ignored.txt"), b"by path")]);
        let w = run(&a, &[("content-type", &ct)], "path=%2E%2E%2Fq.txt", &body)
            .await
            .unwrap();
        assert_eq!(w[0].path, tmp.path().join("q.txt").display().to_string());
        assert!(!home.join("ignored.txt").exists());

        // Overwrite keeps the mode.
        std::fs::set_permissions(home.join("a.txt"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        let (ct, body) = multipart_body(&[("file", Some("a.txt"), b"again")]);
        run(&a, &[("content-type", &ct)], "", &body).await.unwrap();
        assert_eq!(std::fs::read(home.join("a.txt")).unwrap(), b"again");
        assert_eq!(
            std::fs::metadata(home.join("a.txt")).unwrap().mode() & 0o777,
            0o755
        );
    }

    #[tokio::test]
    async fn multipart_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let a = agent(tmp.path(), 1 << 20);
        let home = tmp.path().join("home");
        let (ct, body) = multipart_body(&[
            ("file", Some("x.txt"), b"1"),
            ("file", Some("./x.txt"), b"2"),
        ]);
        let e = run(&a, &[("content-type", &ct)], "", &body)
            .await
            .unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.contains("same path"), "{}", e.message);
        assert_eq!(std::fs::read(home.join("x.txt")).unwrap(), b"1");

        let (ct, body) = multipart_body(&[("file", None, b"1")]);
        assert_eq!(
            run(&a, &[("content-type", &ct)], "", &body)
                .await
                .unwrap_err()
                .status,
            StatusCode::BAD_REQUEST
        );
        let (ct, body) = multipart_body(&[("nofile", Some("n"), b"1")]);
        assert_eq!(
            run(&a, &[("content-type", &ct)], "", &body)
                .await
                .unwrap_err()
                .status,
            StatusCode::BAD_REQUEST
        );
        std::fs::create_dir_all(home.join("adir")).unwrap();
        let (ct, body) = multipart_body(&[("file", Some("adir"), b"1")]);
        let e = run(&a, &[("content-type", &ct)], "", &body)
            .await
            .unwrap_err();
        assert_eq!(
            (e.status, e.message.contains("is a directory")),
            (StatusCode::BAD_REQUEST, true)
        );
        let (ct, body) = multipart_body(&[("file", Some("x.txt/under"), b"1")]);
        let e = run(&a, &[("content-type", &ct)], "", &body)
            .await
            .unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST, "{}", e.message);
        let e = run(
            &a,
            &[("content-type", "multipart/form-data; boundary=nope")],
            "",
            b"garbage",
        )
        .await
        .unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let e = run(&a, &[("content-type", "text/plain")], "path=t", b"x")
            .await
            .unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        let e = run(
            &a,
            &[("content-type", "application/octet-stream")],
            "username=ghost&path=t",
            b"x",
        )
        .await
        .unwrap_err();
        assert_eq!(e.status, StatusCode::UNAUTHORIZED);
        assert!(leftovers(tmp.path()).is_empty());
    }

    #[tokio::test]
    async fn raw_uploads_gzip_and_limits() {
        let tmp = tempfile::tempdir().unwrap();
        let a = agent(tmp.path(), 100_000);
        let home = tmp.path().join("home");
        let raw = [("content-type", "application/octet-stream")];
        let data: Vec<u8> = (0..90_000u32).map(|i| (i % 13) as u8).collect();
        let w = run(&a, &raw, "path=r%2Fraw.bin", &data).await.unwrap();
        assert_eq!(w[0].path, home.join("r/raw.bin").display().to_string());
        assert_eq!(std::fs::read(home.join("r/raw.bin")).unwrap(), data);

        let gz_headers = [
            ("content-type", "application/octet-stream"),
            ("content-encoding", "gzip"),
        ];
        run(&a, &gz_headers, "path=z.bin", &gz(&data))
            .await
            .unwrap();
        assert_eq!(std::fs::read(home.join("z.bin")).unwrap(), data);

        assert_eq!(
            run(&a, &raw, "", b"x").await.unwrap_err().status,
            StatusCode::BAD_REQUEST
        );

        // Over the limit: announced, streamed, and decompressed.
        let big = vec![7u8; 100_001];
        let e = run(&a, &raw, "path=big", &big).await.unwrap_err();
        assert_eq!(
            (e.status, e.message.as_str()),
            (StatusCode::PAYLOAD_TOO_LARGE, "upload exceeds 100000 bytes")
        );
        let e = run(&a, &gz_headers, "path=big", &gz(&big))
            .await
            .unwrap_err();
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE);
        let mut body = chunked(&big, 1000);
        body.announced = None;
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            "application/octet-stream".parse().unwrap(),
        );
        let e = handle(&a, &h, Some("path=big"), &mut body)
            .await
            .unwrap_err();
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(!home.join("big").exists());
        // An existing file is untouched by a failed upload.
        let e = run(&a, &raw, "path=z.bin", &big).await.unwrap_err();
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(std::fs::read(home.join("z.bin")).unwrap(), data);
        let e = run(&a, &gz_headers, "path=bad", b"not gzip at all")
            .await
            .unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        // Multipart counts file bytes across parts.
        let (ct, body) =
            multipart_body(&[("file", Some("m1"), &data), ("file", Some("m2"), &data)]);
        let e = run(&a, &[("content-type", &ct)], "", &body)
            .await
            .unwrap_err();
        assert_eq!(e.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert!(home.join("m1").exists() && !home.join("m2").exists());
        let e = run(
            &a,
            &[
                ("content-type", "application/octet-stream"),
                ("content-encoding", "br"),
            ],
            "path=x",
            b"x",
        )
        .await
        .unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(leftovers(tmp.path()).is_empty());
    }

    #[tokio::test]
    async fn symlinked_destination_is_written_through() {
        let tmp = tempfile::tempdir().unwrap();
        let a = agent(tmp.path(), 1000);
        let home = tmp.path().join("home");
        std::fs::create_dir_all(home.join("real")).unwrap();
        std::fs::write(home.join("real/target"), b"old").unwrap();
        std::os::unix::fs::symlink("real/target", home.join("link")).unwrap();
        run(
            &a,
            &[("content-type", "application/octet-stream")],
            "path=link",
            b"new",
        )
        .await
        .unwrap();
        assert!(std::fs::symlink_metadata(home.join("link"))
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read(home.join("real/target")).unwrap(), b"new");
    }

    #[test]
    fn metadata_header_rules() {
        let mut h = HeaderMap::new();
        h.insert("x-metadata-Owner", "alice".parse().unwrap());
        h.insert("x-other", "x".parse().unwrap());
        let m = metadata_headers(&h).unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m["owner"], "alice");
        let mut h = HeaderMap::new();
        h.insert(
            "x-metadata-k",
            http::HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap(),
        );
        assert_eq!(
            metadata_headers(&h).unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
        let mut h = HeaderMap::new();
        h.insert("x-metadata-big", "v".repeat(5000).parse().unwrap());
        assert_eq!(
            metadata_headers(&h).unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
    }
}
