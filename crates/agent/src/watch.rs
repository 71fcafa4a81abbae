//! Directory watches with inotify: the `WatchDir` stream and the polling watchers
//! (`CreateWatcher`, `GetWatcherEvents`, `RemoveWatcher`).
//!
//! Each watch owns one inotify instance, read through tokio's `AsyncFd` (no thread);
//! dropping the watch closes it, which removes every kernel watch at once.
//!
//! Events, as upstream envd (fsnotify) reports them, with `name` relative to the
//! watched directory:
//!
//! | inotify | event |
//! |---|---|
//! | `IN_CREATE`, `IN_MOVED_TO` | `CREATE` |
//! | `IN_MOVED_FROM`, `IN_MOVE_SELF` | `RENAME` |
//! | `IN_ATTRIB` | `CHMOD` |
//! | `IN_MODIFY` | `WRITE` |
//! | `IN_DELETE`, `IN_DELETE_SELF` | `REMOVE` |
//!
//! Events about the watched directory itself are named `.`. In a recursive watch,
//! directories created later are watched too (and what was already created in them is
//! reported as `CREATE`); directories moved in are watched, moved out unwatched. A
//! subdirectory's own events are left to its parent's watch, so none is reported twice.
//! Uploads through `/files` write a temporary file that is renamed into place: its
//! events are hidden, and the upload ends with `CREATE` and `WRITE` of the file.
//! A kernel queue overflow ends the watch with an error, as upstream does.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cubicle_envd::connect::{Code, ConnectError};
use cubicle_envd::proto::{
    CreateWatcherResponse, EventType, FilesystemEvent, GetWatcherEventsResponse, WatchDirResponse,
    WatchRequest,
};
use futures_util::StreamExt;
use http::{Request, Response};
use hyper::body::Incoming;
use inotify::{EventMask, EventOwned, EventStream, Inotify, WatchDescriptor, WatchMask, Watches};

use crate::filesystem::{self, entry, random_hex};
use crate::rpc::{self, Body, StreamRequest};
use crate::server::Agent;
use crate::users::{Accounts, Names};

/// Events a polling watcher keeps between two `GetWatcherEvents` (oldest dropped).
pub const MAX_BUFFERED_EVENTS: usize = 10_000;
/// Polling watchers that may exist at once.
pub const MAX_WATCHERS: usize = 256;
/// Names starting with this are `/files` uploads in progress, hidden from watches.
pub const UPLOAD_TEMP_PREFIX: &str = ".cubicle-upload-";

const EVENTS: WatchMask = WatchMask::CREATE
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::MOVE_SELF)
    .union(WatchMask::ATTRIB)
    .union(WatchMask::MODIFY)
    .union(WatchMask::DELETE)
    .union(WatchMask::DELETE_SELF)
    .union(WatchMask::EXCL_UNLINK)
    .union(WatchMask::ONLYDIR);

/// One watched directory tree.
pub struct DirWatch {
    events: EventStream<Vec<u8>>,
    watches: Watches,
    /// The directory as requested (paths in entries are under it).
    root: PathBuf,
    root_wd: WatchDescriptor,
    recursive: bool,
    include_entry: bool,
    /// Watched directories, relative to `root` (`""` for the root).
    dirs: HashMap<WatchDescriptor, PathBuf>,
    pending: VecDeque<FilesystemEvent>,
    accounts: Accounts,
    names: Option<(Instant, Names)>,
}

impl std::fmt::Debug for DirWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirWatch")
            .field("root", &self.root)
            .field("recursive", &self.recursive)
            .field("watched_dirs", &self.dirs.len())
            .finish()
    }
}

impl DirWatch {
    /// Starts watching `root` (a directory, or a symlink to one). `not_found` if it is
    /// missing, `invalid_argument` if it is not a directory.
    pub async fn open(
        root: &Path,
        recursive: bool,
        include_entry: bool,
        accounts: Accounts,
    ) -> Result<DirWatch, ConnectError> {
        let meta = std::fs::metadata(root).map_err(|e| filesystem::io_error(&e, root))?;
        if !meta.is_dir() {
            return Err(ConnectError::new(
                Code::InvalidArgument,
                format!("path '{}' is not a directory", crate::paths::display(root)),
            ));
        }
        let inotify = Inotify::init().map_err(|e| inotify_error(&e, root))?;
        let events = inotify
            .into_event_stream(vec![0u8; 64 * 1024])
            .map_err(|e| inotify_error(&e, root))?;
        let mut watches = events.watches();
        let root_wd = watches
            .add(root, EVENTS)
            .map_err(|e| inotify_error(&e, root))?;
        let mut watch = DirWatch {
            events,
            watches,
            root: root.to_owned(),
            root_wd: root_wd.clone(),
            recursive,
            include_entry,
            dirs: HashMap::from([(root_wd, PathBuf::new())]),
            pending: VecDeque::new(),
            accounts,
            names: None,
        };
        if recursive {
            let mut stack = vec![PathBuf::new()];
            let mut seen = 0usize;
            while let Some(rel) = stack.pop() {
                watch.add_children(&rel, false, &mut stack)?;
                seen += 1;
                if seen % 64 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }
        Ok(watch)
    }

    /// The next event. Cancel-safe: events are only taken from the kernel inside the
    /// one await point and are handled before the next.
    pub async fn next(&mut self) -> Result<FilesystemEvent, ConnectError> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Ok(e);
            }
            match self.events.next().await {
                Some(Ok(event)) => self.handle(event)?,
                Some(Err(e)) => {
                    return Err(ConnectError::new(
                        Code::Internal,
                        format!("reading inotify events: {e}"),
                    ))
                }
                None => return Err(ConnectError::new(Code::Internal, "inotify closed")),
            }
        }
    }

    fn handle(&mut self, event: EventOwned) -> Result<(), ConnectError> {
        let mask = event.mask;
        if mask.contains(EventMask::Q_OVERFLOW) {
            return Err(ConnectError::new(
                Code::Internal,
                "watcher error: too many filesystem events at once; some were lost",
            ));
        }
        if mask.contains(EventMask::IGNORED) {
            self.dirs.remove(&event.wd);
            return Ok(());
        }
        let Some(base) = self.dirs.get(&event.wd).cloned() else {
            return Ok(());
        };
        let rel = match event.name.as_deref().filter(|n| !n.is_empty()) {
            Some(name) => base.join(name),
            // Events about a watched directory itself: only the root's are reported,
            // its parent's watch reports the others.
            None if event.wd == self.root_wd => PathBuf::new(),
            None => return Ok(()),
        };
        if is_upload_temp(&rel) {
            return Ok(());
        }
        let is_dir = mask.contains(EventMask::ISDIR);
        let has_name = !rel.as_os_str().is_empty();
        let mut types = Vec::with_capacity(1);
        if mask.intersects(EventMask::CREATE | EventMask::MOVED_TO) {
            types.push(EventType::Create);
        }
        if mask.intersects(EventMask::MOVED_FROM | EventMask::MOVE_SELF) {
            types.push(EventType::Rename);
        }
        if mask.contains(EventMask::ATTRIB) {
            types.push(EventType::Chmod);
        }
        if mask.contains(EventMask::MODIFY) {
            types.push(EventType::Write);
        }
        if mask.intersects(EventMask::DELETE | EventMask::DELETE_SELF) {
            types.push(EventType::Remove);
        }
        for t in types {
            let e = self.event(&rel, t);
            self.pending.push_back(e);
        }
        if self.recursive && is_dir && has_name {
            if mask.contains(EventMask::CREATE) {
                // mkdir -p a/b/c: b and c may exist before a is watched.
                self.add_tree(&rel, true)?;
            } else if mask.contains(EventMask::MOVED_TO) {
                self.add_tree(&rel, false)?;
            } else if mask.contains(EventMask::MOVED_FROM) {
                self.remove_tree(&rel);
            }
        }
        Ok(())
    }

    fn event(&mut self, rel: &Path, event_type: EventType) -> FilesystemEvent {
        let name = if rel.as_os_str().is_empty() {
            ".".to_owned()
        } else {
            crate::paths::display(rel)
        };
        let entry = if self.include_entry
            && matches!(
                event_type,
                EventType::Create | EventType::Write | EventType::Chmod
            ) {
            let path = self.root.join(rel);
            let names = self.names();
            entry::entry_info(&path, &names).ok()
        } else {
            None
        };
        FilesystemEvent {
            name,
            event_type,
            entry,
        }
    }

    /// Owner names, re-read at most every few seconds.
    fn names(&mut self) -> Names {
        match &self.names {
            Some((at, names)) if at.elapsed() < Duration::from_secs(5) => names.clone(),
            _ => {
                let names = self.accounts.names();
                self.names = Some((Instant::now(), names.clone()));
                names
            }
        }
    }

    /// Watches the new directory `rel` and everything below it; with `report`, every
    /// entry already inside is reported as created.
    fn add_tree(&mut self, rel: &Path, report: bool) -> Result<(), ConnectError> {
        match self
            .watches
            .add(self.root.join(rel), EVENTS | WatchMask::DONT_FOLLOW)
        {
            Ok(wd) => {
                self.dirs.insert(wd, rel.to_owned());
            }
            Err(e) if vanished(&e) => return Ok(()),
            Err(e) => return Err(inotify_error(&e, &self.root.join(rel))),
        }
        let mut stack = vec![rel.to_owned()];
        while let Some(dir) = stack.pop() {
            self.add_children(&dir, report, &mut stack)?;
        }
        Ok(())
    }

    /// Watches the subdirectories of the watched `rel`, pushing them on `stack`.
    fn add_children(
        &mut self,
        rel: &Path,
        report: bool,
        stack: &mut Vec<PathBuf>,
    ) -> Result<(), ConnectError> {
        let Ok(read) = std::fs::read_dir(self.root.join(rel)) else {
            return Ok(());
        };
        let mut children: Vec<_> = read.filter_map(Result::ok).collect();
        children.sort_by_key(|e| e.file_name());
        for child in children {
            let child_rel = rel.join(child.file_name());
            if report && !is_upload_temp(&child_rel) {
                let e = self.event(&child_rel, EventType::Create);
                self.pending.push_back(e);
            }
            if !child.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            match self
                .watches
                .add(self.root.join(&child_rel), EVENTS | WatchMask::DONT_FOLLOW)
            {
                Ok(wd) => {
                    self.dirs.insert(wd, child_rel.clone());
                    stack.push(child_rel);
                }
                Err(e) if vanished(&e) => {}
                Err(e) => return Err(inotify_error(&e, &self.root.join(&child_rel))),
            }
        }
        Ok(())
    }

    /// Stops watching `rel` and everything below it (moved out or away).
    fn remove_tree(&mut self, rel: &Path) {
        let gone: Vec<WatchDescriptor> = self
            .dirs
            .iter()
            .filter(|(_, p)| p.starts_with(rel))
            .map(|(wd, _)| wd.clone())
            .collect();
        for wd in gone {
            self.dirs.remove(&wd);
            let _ = self.watches.remove(wd);
        }
    }
}

fn is_upload_temp(rel: &Path) -> bool {
    rel.file_name()
        .is_some_and(|n| n.as_bytes().starts_with(UPLOAD_TEMP_PREFIX.as_bytes()))
}

/// A directory that disappeared (or turned into something else) before it was watched.
fn vanished(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP | libc::EACCES)
    )
}

fn inotify_error(e: &io::Error, path: &Path) -> ConnectError {
    match e.raw_os_error() {
        Some(libc::EMFILE) => ConnectError::new(
            Code::ResourceExhausted,
            "too many watches open in the sandbox (inotify instance limit reached)",
        ),
        Some(libc::ENOSPC) => ConnectError::new(
            Code::ResourceExhausted,
            format!(
                "cannot watch '{}': inotify watch limit reached (watch a smaller tree)",
                crate::paths::display(path)
            ),
        ),
        _ => filesystem::io_error(e, path),
    }
}

/// `WatchDir`: `start`, then events, with a `keepalive` after each quiet
/// `Keepalive-Ping-Interval`; the watch ends when the client goes away.
pub async fn watch_dir(
    agent: &Arc<Agent>,
    user: Option<String>,
    req: Request<Incoming>,
) -> Response<Body> {
    let keepalive = rpc::keepalive_interval(req.headers());
    let opened = async {
        let request: WatchRequest = StreamRequest::new(req.into_body()).single().await?;
        let user = agent.rpc_user(user.as_deref())?;
        let path = filesystem::resolve_path(&request.path, &user)?;
        DirWatch::open(
            &path,
            request.recursive,
            request.include_entry,
            agent.accounts.clone(),
        )
        .await
    }
    .await;
    let mut watch = match opened {
        Ok(w) => w,
        Err(e) => return rpc::stream_error(&e),
    };
    let (out, response) = rpc::stream_channel();
    tokio::spawn(async move {
        if !out.send(&WatchDirResponse::Start {}).await {
            return;
        }
        loop {
            let message = tokio::select! {
                _ = out.closed() => return,
                event = watch.next() => match event {
                    Ok(e) => WatchDirResponse::Filesystem(Box::new(e)),
                    Err(e) => return out.finish(Err(e)).await,
                },
                _ = tokio::time::sleep(keepalive) => WatchDirResponse::Keepalive {},
            };
            if !out.send(&message).await {
                return;
            }
        }
    });
    response
}

/// Polling watchers by id.
#[derive(Debug, Default)]
pub struct Watchers {
    table: Mutex<HashMap<String, Polled>>,
}

/// A polling watcher: a task collecting events into a shared buffer.
#[derive(Debug)]
struct Polled {
    buffer: Arc<Mutex<Buffer>>,
    task: tokio::task::AbortHandle,
}

impl Drop for Polled {
    fn drop(&mut self) {
        // Dropping the task's DirWatch closes the inotify instance.
        self.task.abort();
    }
}

#[derive(Debug, Default)]
struct Buffer {
    events: VecDeque<FilesystemEvent>,
    dropped: u64,
    error: Option<ConnectError>,
}

impl Buffer {
    fn push(&mut self, e: FilesystemEvent) {
        if self.events.len() >= MAX_BUFFERED_EVENTS {
            self.events.pop_front();
            self.dropped += 1;
        }
        self.events.push_back(e);
    }
}

impl Watchers {
    /// `CreateWatcher`: starts collecting events for `path` in the background.
    pub async fn create(
        &self,
        agent: &Agent,
        path: &Path,
        request: &WatchRequest,
    ) -> Result<CreateWatcherResponse, ConnectError> {
        self.check_capacity()?;
        let mut watch = DirWatch::open(
            path,
            request.recursive,
            request.include_entry,
            agent.accounts.clone(),
        )
        .await?;
        let buffer = Arc::new(Mutex::new(Buffer::default()));
        let sink = buffer.clone();
        let task = tokio::spawn(async move {
            loop {
                let next = watch.next().await;
                let mut b = sink.lock().expect("watcher buffer lock");
                match next {
                    Ok(e) => b.push(e),
                    Err(e) => {
                        b.error = Some(e);
                        return;
                    }
                }
            }
        });
        let polled = Polled {
            buffer,
            task: task.abort_handle(),
        };
        let mut table = self.table.lock().expect("watchers lock");
        if table.len() >= MAX_WATCHERS {
            return Err(too_many_watchers());
        }
        let id = format!("w{}", random_hex(10));
        table.insert(id.clone(), polled);
        Ok(CreateWatcherResponse { watcher_id: id })
    }

    fn check_capacity(&self) -> Result<(), ConnectError> {
        if self.table.lock().expect("watchers lock").len() >= MAX_WATCHERS {
            return Err(too_many_watchers());
        }
        Ok(())
    }

    /// `GetWatcherEvents`: the events since the previous call. A watcher that failed
    /// hands out its remaining events first, then its error.
    pub fn events(&self, id: &str) -> Result<GetWatcherEventsResponse, ConnectError> {
        let table = self.table.lock().expect("watchers lock");
        let polled = table.get(id).ok_or_else(|| unknown_watcher(id))?;
        let mut buffer = polled.buffer.lock().expect("watcher buffer lock");
        if buffer.dropped > 0 {
            tracing::warn!(
                watcher = id,
                dropped = buffer.dropped,
                "watcher buffer full, oldest events dropped"
            );
            buffer.dropped = 0;
        }
        if buffer.events.is_empty() {
            if let Some(e) = buffer.error.clone() {
                return Err(e);
            }
        }
        Ok(GetWatcherEventsResponse {
            events: buffer.events.drain(..).collect(),
        })
    }

    /// `RemoveWatcher`.
    pub fn remove(&self, id: &str) -> Result<(), ConnectError> {
        let removed = self.table.lock().expect("watchers lock").remove(id);
        removed.map(drop).ok_or_else(|| unknown_watcher(id))
    }

    /// How many polling watchers exist.
    pub fn len(&self) -> usize {
        self.table.lock().expect("watchers lock").len()
    }

    /// Whether there is no polling watcher.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn unknown_watcher(id: &str) -> ConnectError {
    ConnectError::new(Code::NotFound, format!("watcher with id {id} not found"))
}

fn too_many_watchers() -> ConnectError {
    ConnectError::new(
        Code::ResourceExhausted,
        format!("too many watchers (at most {MAX_WATCHERS}); remove some first"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    async fn next(w: &mut DirWatch) -> FilesystemEvent {
        tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .expect("an event within 5 s")
            .unwrap()
    }

    /// Collects events until `want` has been seen (or fails after 5 s).
    async fn until(w: &mut DirWatch, want: (&str, EventType)) -> Vec<(String, EventType)> {
        let mut seen = Vec::new();
        loop {
            let e = next(w).await;
            seen.push((e.name.clone(), e.event_type));
            if e.name == want.0 && e.event_type == want.1 {
                return seen;
            }
        }
    }

    #[tokio::test]
    async fn flat_watch_reports_file_events() {
        let tmp = tempfile::tempdir().unwrap();
        let mut w = DirWatch::open(tmp.path(), false, true, Accounts::default())
            .await
            .unwrap();
        fs::write(tmp.path().join("a.txt"), b"hi").unwrap();
        let e = next(&mut w).await;
        assert_eq!(
            (e.name.as_str(), e.event_type),
            ("a.txt", EventType::Create)
        );
        let entry = e.entry.expect("entry requested");
        assert_eq!(entry.name, "a.txt");
        let seen = until(&mut w, ("a.txt", EventType::Write)).await;
        assert!(seen.iter().all(|(n, _)| n == "a.txt"));
        fs::rename(tmp.path().join("a.txt"), tmp.path().join("b.txt")).unwrap();
        assert_eq!(until(&mut w, ("a.txt", EventType::Rename)).await.len(), 1);
        let e = next(&mut w).await;
        assert_eq!(
            (e.name.as_str(), e.event_type),
            ("b.txt", EventType::Create)
        );
        fs::remove_file(tmp.path().join("b.txt")).unwrap();
        let e = next(&mut w).await;
        assert_eq!(
            (e.name.as_str(), e.event_type),
            ("b.txt", EventType::Remove)
        );
        assert!(e.entry.is_none(), "no entry for removals");
        // Not recursive: nothing from inside subdirectories.
        fs::create_dir(tmp.path().join("sub")).unwrap();
        assert_eq!(next(&mut w).await.name, "sub");
        fs::write(tmp.path().join("sub/inner"), b"x").unwrap();
        fs::write(tmp.path().join("marker"), b"").unwrap();
        assert_eq!(next(&mut w).await.name, "marker");
    }

    #[tokio::test]
    async fn recursive_watch_follows_new_directories() {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir_all(tmp.path().join("old/deep")).unwrap();
        let mut w = DirWatch::open(tmp.path(), true, false, Accounts::default())
            .await
            .unwrap();
        fs::write(tmp.path().join("old/deep/f"), b"1").unwrap();
        until(&mut w, ("old/deep/f", EventType::Write)).await;
        fs::create_dir_all(tmp.path().join("n1/n2/n3")).unwrap();
        until(&mut w, ("n1/n2/n3", EventType::Create)).await;
        fs::write(tmp.path().join("n1/n2/n3/g"), b"2").unwrap();
        until(&mut w, ("n1/n2/n3/g", EventType::Write)).await;
        // Moved within the tree: watched under the new name only.
        fs::rename(tmp.path().join("n1"), tmp.path().join("m1")).unwrap();
        until(&mut w, ("m1", EventType::Create)).await;
        fs::write(tmp.path().join("m1/n2/h"), b"3").unwrap();
        let seen = until(&mut w, ("m1/n2/h", EventType::Write)).await;
        assert!(seen.iter().all(|(n, _)| !n.starts_with("n1/")), "{seen:?}");
        // Removing a subdirectory is reported once.
        fs::remove_dir_all(tmp.path().join("old")).unwrap();
        let seen = until(&mut w, ("old", EventType::Remove)).await;
        fs::write(tmp.path().join("marker"), b"").unwrap();
        let rest = until(&mut w, ("marker", EventType::Create)).await;
        let removes = seen
            .iter()
            .chain(&rest)
            .filter(|(n, t)| n == "old" && *t == EventType::Remove)
            .count();
        assert_eq!(removes, 1, "{seen:?} {rest:?}");
        assert!(rest.iter().all(|(n, _)| n == "marker"), "{rest:?}");
    }

    #[tokio::test]
    async fn root_events_and_hidden_uploads() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("w");
        fs::create_dir(&root).unwrap();
        let mut w = DirWatch::open(&root, false, false, Accounts::default())
            .await
            .unwrap();
        fs::write(root.join(format!("{UPLOAD_TEMP_PREFIX}123")), b"x").unwrap();
        fs::rename(
            root.join(format!("{UPLOAD_TEMP_PREFIX}123")),
            root.join("up"),
        )
        .unwrap();
        let e = next(&mut w).await;
        assert_eq!((e.name.as_str(), e.event_type), ("up", EventType::Create));
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700)).unwrap();
        let e = next(&mut w).await;
        assert_eq!((e.name.as_str(), e.event_type), (".", EventType::Chmod));
    }

    #[tokio::test]
    async fn open_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let missing =
            DirWatch::open(&tmp.path().join("x"), false, false, Accounts::default()).await;
        assert_eq!(missing.unwrap_err().code, Code::NotFound);
        fs::write(tmp.path().join("f"), b"").unwrap();
        let file = DirWatch::open(&tmp.path().join("f"), false, false, Accounts::default()).await;
        assert_eq!(file.unwrap_err().code, Code::InvalidArgument);
    }

    #[tokio::test]
    async fn polling_watchers() {
        let tmp = tempfile::tempdir().unwrap();
        let agent = Agent::new(cubicle_runtime::AgentConfig::new("test"));
        let request = WatchRequest {
            path: String::new(),
            recursive: false,
            include_entry: false,
            allow_network_mounts: false,
        };
        let created = agent
            .watchers
            .create(&agent, tmp.path(), &request)
            .await
            .unwrap();
        assert!(created.watcher_id.starts_with('w'));
        assert_eq!(agent.watchers.len(), 1);
        fs::write(tmp.path().join("f"), b"data").unwrap();
        let mut names = Vec::new();
        for _ in 0..50 {
            let got = agent.watchers.events(&created.watcher_id).unwrap();
            names.extend(got.events.into_iter().map(|e| (e.name, e.event_type)));
            if names.contains(&("f".to_owned(), EventType::Write)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            names.first(),
            Some(&("f".to_owned(), EventType::Create)),
            "{names:?}"
        );
        assert!(
            names.contains(&("f".to_owned(), EventType::Write)),
            "{names:?}"
        );
        // Drained: nothing new.
        assert!(agent
            .watchers
            .events(&created.watcher_id)
            .unwrap()
            .events
            .is_empty());
        agent.watchers.remove(&created.watcher_id).unwrap();
        assert!(agent.watchers.is_empty());
        assert_eq!(
            agent.watchers.events(&created.watcher_id).unwrap_err().code,
            Code::NotFound
        );
        assert_eq!(
            agent.watchers.remove(&created.watcher_id).unwrap_err().code,
            Code::NotFound
        );
        let missing = agent
            .watchers
            .create(&agent, &tmp.path().join("nope"), &request)
            .await;
        assert_eq!(missing.unwrap_err().code, Code::NotFound);
    }

    #[test]
    fn buffer_drops_oldest() {
        let mut b = Buffer::default();
        for i in 0..MAX_BUFFERED_EVENTS + 5 {
            b.push(FilesystemEvent {
                name: i.to_string(),
                event_type: EventType::Write,
                entry: None,
            });
        }
        assert_eq!(b.events.len(), MAX_BUFFERED_EVENTS);
        assert_eq!(b.dropped, 5);
        assert_eq!(b.events.front().unwrap().name, "5");
    }
}
