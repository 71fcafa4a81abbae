//! Snapshots of running (or paused) sandboxes, fork (clone) and rollback.
//!
//! A snapshot is a runtime checkpoint in `<data dir>/snapshots/<key>` plus a store
//! record. The record is written `creating` before the runtime is asked and `ready` when
//! the checkpoint is complete; a failure removes both, a restart removes `creating`
//! leftovers and directories no record claims. Checkpoints, forks and rollbacks of one
//! sandbox take its operation lock (one after another, and never during a pause, resume
//! or kill of it); different sandboxes proceed in parallel.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use cubicle_core::{SandboxId, SandboxState, TemplateName};
use cubicle_store::{SandboxRecord, SnapshotPage, SnapshotQuery, SnapshotRecord, SnapshotState};
use cubicle_template::TemplateError;
use futures_util::StreamExt;

use super::{Controller, Launch, Live};
use crate::request::{check_snapshot_ref, MAX_SNAPSHOT_REF};
use crate::{now_ms, ControlError};

/// Most sandboxes one fork request makes (E2B: 1–20).
pub const MAX_FORKS: u32 = 20;
/// Lifetime of forks whose request names no timeout, in seconds (E2B's API default).
pub const FORK_DEFAULT_TIMEOUT: u64 = 15;
/// How many forks of one request are restored at the same time.
const FORK_CONCURRENCY: usize = 4;
/// The only tag a snapshot has.
const TAG: &str = "default";
/// Longest snapshot name.
const MAX_NAME: usize = 63;

/// `GET /snapshots`, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotListRequest {
    /// Only snapshots of this sandbox.
    pub sandbox_id: Option<String>,
    /// Only the snapshot with this name or id (`my-snap`, `ns/my-snap`, `my-snap:default`).
    pub name: Option<String>,
    /// Page size, 1..=1000.
    pub limit: u32,
    /// The previous page's cursor.
    pub cursor: Option<String>,
}

impl Default for SnapshotListRequest {
    fn default() -> Self {
        SnapshotListRequest {
            sandbox_id: None,
            name: None,
            limit: 100,
            cursor: None,
        }
    }
}

impl Controller {
    /// Where the checkpoint of the snapshot `key` lives.
    pub(super) fn snapshot_dir(&self, key: &str) -> PathBuf {
        self.templates.data_dir().snapshots().join(key)
    }

    /// The namespace of `owner`'s snapshot names (E2B's team slug): its key's name.
    fn namespace(&self, owner: i64) -> Result<String, ControlError> {
        Ok(self
            .store
            .key_name(owner)?
            .unwrap_or_else(|| format!("key-{owner}")))
    }

    /// E2B's full names of a snapshot: `["<namespace>/<name>:default"]`, or `[]` for a
    /// snapshot without a name.
    pub fn snapshot_names(&self, snapshot: &SnapshotRecord) -> Result<Vec<String>, ControlError> {
        match &snapshot.name {
            Some(name) => Ok(vec![format!(
                "{}/{name}:{TAG}",
                self.namespace(snapshot.owner)?
            )]),
            None => Ok(Vec::new()),
        }
    }

    /// The snapshot id a reference means for `owner` (`None` if it cannot be one of
    /// theirs: another namespace, another tag, malformed).
    fn snapshot_id_of(&self, owner: i64, reference: &str) -> Result<Option<String>, ControlError> {
        if check_snapshot_ref(reference).is_err() {
            return Ok(None);
        }
        let rest = match reference.split_once('/') {
            Some((ns, rest)) => {
                if ns != self.namespace(owner)? {
                    return Ok(None);
                }
                rest
            }
            None => reference,
        };
        Ok(match rest.split_once(':') {
            Some((_, tag)) if tag != TAG => None,
            Some(_) => Some(rest.to_owned()),
            None => Some(format!("{rest}:{TAG}")),
        })
    }

    /// `owner`'s ready snapshot that `reference` names, if any.
    pub(super) fn find_snapshot(
        &self,
        owner: i64,
        reference: &str,
    ) -> Result<Option<SnapshotRecord>, ControlError> {
        let Some(id) = self.snapshot_id_of(owner, reference)? else {
            return Ok(None);
        };
        Ok(self
            .store
            .get_snapshot(owner, &id)?
            .filter(|s| s.state == SnapshotState::Ready))
    }

    fn snapshot_of(&self, owner: i64, reference: &str) -> Result<SnapshotRecord, ControlError> {
        self.find_snapshot(owner, reference)?
            .ok_or_else(|| ControlError::SnapshotNotFound(shorten(reference)))
    }

    /// What a checkpoint of `record` needs from its template (uid shift, interpreter).
    fn template_of(
        &self,
        record: &SandboxRecord,
    ) -> Result<cubicle_template::Template, ControlError> {
        let name: TemplateName = record
            .template
            .parse()
            .map_err(|_| ControlError::TemplateNotFound(record.template.clone()))?;
        self.templates.get(&name).map_err(|e| match e {
            TemplateError::NotFound { .. } => {
                ControlError::TemplateNotFound(record.template.clone())
            }
            other => other.into(),
        })
    }

    /// A snapshot record of the live sandbox `record` (state creating, no layers yet).
    fn snapshot_record(
        &self,
        record: &SandboxRecord,
        key: String,
        name: Option<String>,
    ) -> Result<SnapshotRecord, ControlError> {
        let template = self.template_of(record)?;
        Ok(SnapshotRecord {
            id: format!("{}:{TAG}", name.as_deref().unwrap_or(&key)),
            key,
            owner: record.owner,
            sandbox_id: record.id.clone(),
            name,
            state: SnapshotState::Creating,
            created_at_ms: now_ms(),
            size_bytes: 0,
            template: template.name.to_string(),
            layers: Vec::new(),
            uid_shift: template.meta.uid_shift,
            env_vars: record.env_vars.clone(),
            default_user: "user".into(),
            code_interpreter: template.meta.code_interpreter,
            cpu_count: record.cpu_count,
            memory_mb: record.memory_mb,
            metadata: record.metadata.clone(),
            writable_layer_mib: record.writable_layer_mib,
        })
    }

    /// Takes a snapshot of `owner`'s sandbox `id`: its memory, processes and files, as
    /// E2B's `create_snapshot`. The sandbox runs on; a paused sandbox is snapshotted as
    /// it is and stays paused. `name` gives the snapshot the id `<name>:default` (a
    /// name the owner already uses, or a template's name, is a conflict); without one
    /// the id is generated. On failure nothing of the snapshot is left.
    pub async fn snapshot(
        &self,
        owner: i64,
        id: &SandboxId,
        name: Option<String>,
    ) -> Result<SnapshotRecord, ControlError> {
        if let Some(n) = &name {
            check_name(n)?;
            if n.parse::<TemplateName>()
                .ok()
                .is_some_and(|t| self.templates.get(&t).is_ok())
            {
                return Err(ControlError::Conflict(format!(
                    "{n:?} is the name of a template; choose another snapshot name"
                )));
            }
        }
        let live = self.live_of(owner, id)?;
        let _op = live.ops.lock().await;
        if !self.still_indexed(id, &live) {
            return Err(ControlError::SandboxNotFound(id.clone()));
        }
        let record = self.get(owner, id)?;
        let key = SandboxId::generate().to_string();
        let snapshot = self.snapshot_record(&record, key.clone(), name)?;
        self.store.insert_snapshot(&snapshot).map_err(|e| match e {
            cubicle_store::StoreError::Conflict(_) => ControlError::Conflict(format!(
                "a snapshot named {} already exists; delete it first or choose another name",
                snapshot.id
            )),
            e => e.into(),
        })?;
        let dir = self.snapshot_dir(&key);
        if let Err(e) = create_dir(&self.templates.data_dir().snapshots()).await {
            let _ = self.store.delete_snapshot(&key);
            return Err(e);
        }
        let t0 = std::time::Instant::now();
        let result = match self.runtime.checkpoint(id, &dir).await {
            Ok(info) => self
                .store
                .finish_snapshot(&key, info.size_bytes, &info.layers)
                .map_err(ControlError::from)
                .map(|r| (r, info)),
            Err(e) => Err(e.into()),
        };
        match result {
            Ok((snapshot, info)) => {
                tracing::info!(
                    sandbox = %id, snapshot = %snapshot.id, bytes = info.size_bytes,
                    frozen_us = info.frozen_us, ms = t0.elapsed().as_millis() as u64,
                    "snapshot taken"
                );
                Ok(snapshot)
            }
            Err(e) => {
                remove_dir(&dir).await;
                if let Err(store_err) = self.store.delete_snapshot(&key) {
                    tracing::error!(snapshot = %key, error = %store_err, "removing a failed snapshot's record");
                }
                tracing::warn!(sandbox = %id, error = %e.chain(), "snapshot failed");
                Err(e)
            }
        }
    }

    /// A page of `owner`'s snapshots, newest first.
    pub fn list_snapshots(
        &self,
        owner: i64,
        request: &SnapshotListRequest,
    ) -> Result<SnapshotPage, ControlError> {
        if request.limit == 0 || request.limit > 1000 {
            return Err(ControlError::InvalidInput(format!(
                "limit must be between 1 and 1000, got {}",
                request.limit
            )));
        }
        let empty = SnapshotPage {
            items: Vec::new(),
            next_cursor: None,
        };
        let sandbox_id = match request.sandbox_id.as_deref() {
            None => None,
            Some(s) => match s.parse::<SandboxId>() {
                Ok(id) => Some(id),
                // No sandbox has such an id, so none of its snapshots exist.
                Err(_) => return Ok(empty),
            },
        };
        let id = match request.name.as_deref() {
            None => None,
            Some(n) => match self.snapshot_id_of(owner, n)? {
                Some(id) => Some(id),
                None => return Ok(empty),
            },
        };
        Ok(self.store.list_snapshots(&SnapshotQuery {
            owner,
            sandbox_id,
            id,
            limit: request.limit,
            cursor: request.cursor.clone(),
        })?)
    }

    /// Deletes one of `owner`'s snapshots and its checkpoint. Sandboxes started from it
    /// are not affected.
    pub async fn delete_snapshot(&self, owner: i64, reference: &str) -> Result<(), ControlError> {
        let snapshot = self.snapshot_of(owner, reference)?;
        if self.store.delete_snapshot(&snapshot.key)? {
            remove_dir(&self.snapshot_dir(&snapshot.key)).await;
            tracing::info!(snapshot = %snapshot.id, "snapshot deleted");
        }
        Ok(())
    }

    /// E2B's fork: checkpoints `owner`'s sandbox `id` once (under its operation lock; it
    /// runs on with its id and deadline) and starts `count` new sandboxes from that
    /// checkpoint, each with its own id, access token and a deadline `timeout_secs` from
    /// now. Each fork succeeds or fails on its own; the temporary checkpoint is removed
    /// at the end.
    pub async fn fork(
        &self,
        owner: i64,
        id: &SandboxId,
        count: u32,
        timeout_secs: Option<u64>,
    ) -> Result<Vec<Result<SandboxRecord, ControlError>>, ControlError> {
        if count == 0 || count > MAX_FORKS {
            return Err(ControlError::InvalidInput(format!(
                "count must be between 1 and {MAX_FORKS}, got {count}"
            )));
        }
        self.check_timeout(timeout_secs)?;
        let live = self.live_of(owner, id)?;
        let key = SandboxId::generate().to_string();
        let dir = self
            .templates
            .data_dir()
            .snapshots()
            .join(format!("fork-{key}"));
        let (record, mut source) = {
            let _op = live.ops.lock().await;
            if !self.still_indexed(id, &live) {
                return Err(ControlError::SandboxNotFound(id.clone()));
            }
            let record = self.get(owner, id)?;
            let source = self.snapshot_record(&record, key, None)?;
            if let Some(parent) = dir.parent() {
                create_dir(parent).await?;
            }
            match self.runtime.checkpoint(id, &dir).await {
                Ok(info) => {
                    let mut source = source;
                    source.layers = info.layers;
                    (record, source)
                }
                Err(e) => {
                    remove_dir(&dir).await;
                    return Err(e.into());
                }
            }
        };
        source.state = SnapshotState::Ready;
        let timeout = timeout_secs.unwrap_or(FORK_DEFAULT_TIMEOUT);
        let results = futures_util::stream::iter(0..count)
            .map(|_| {
                let launch = Launch {
                    template: record.template.clone(),
                    alias: record.alias.clone(),
                    timeout_secs: timeout,
                    metadata: record.metadata.clone(),
                    env_vars: record.env_vars.clone(),
                    secure: record.envd_access_token.is_some(),
                    allow_internet_access: record.allow_internet_access,
                    auto_pause: false,
                    service: None,
                };
                self.launch(owner, launch, &source, Some(&dir))
            })
            .buffered(FORK_CONCURRENCY)
            .collect::<Vec<_>>()
            .await;
        remove_dir(&dir).await;
        let ok = results.iter().filter(|r| r.is_ok()).count();
        tracing::info!(sandbox = %id, count, ok, "forked");
        Ok(results)
    }

    /// Cubicle's rollback: puts `owner`'s sandbox `id` back to the state of one of its
    /// own snapshots (another sandbox's snapshot is a conflict). The sandbox keeps its id,
    /// access token and environment; its processes and files are the snapshot's; a
    /// paused sandbox comes back running; its deadline is `timeout_secs` (default: the
    /// default timeout) from now. If the restore fails the sandbox is gone: it is recorded
    /// killed with the reason.
    pub async fn rollback(
        &self,
        owner: i64,
        id: &SandboxId,
        reference: &str,
        timeout_secs: Option<u64>,
    ) -> Result<SandboxRecord, ControlError> {
        let live = self.live_of(owner, id)?;
        self.check_timeout(timeout_secs)?;
        let snapshot = self.snapshot_of(owner, reference)?;
        if snapshot.sandbox_id != *id {
            return Err(ControlError::Conflict(format!(
                "snapshot {} was taken of sandbox {}, not of {id}; a sandbox can only be \
                 rolled back to its own snapshots (create a new sandbox from it instead)",
                snapshot.id, snapshot.sandbox_id
            )));
        }
        let _op = live.ops.lock().await;
        if !self.still_indexed(id, &live) {
            return Err(ControlError::SandboxNotFound(id.clone()));
        }
        let record = self.get(owner, id)?;
        self.runtime.destroy(id).await?;
        let spec = self.spec_for(&record, &snapshot);
        let dir = self.snapshot_dir(&snapshot.key);
        let info = match self.runtime.restore(&dir, spec).await {
            Ok(info) => info,
            Err(e) => {
                self.lost(
                    id,
                    &live,
                    &format!("rollback to {} failed: {e}", snapshot.id),
                );
                return Err(e.into());
            }
        };
        *live.socket.lock().expect("socket") = info.agent_socket;
        let timeout = timeout_secs.unwrap_or(self.config.default_timeout.as_secs());
        let end_at_ms = now_ms() + (timeout as i64) * 1000;
        let stored = (|| {
            if record.state == SandboxState::Paused {
                self.store
                    .transition(id, SandboxState::Running, now_ms(), None)?;
            }
            self.store
                .record_event(id, "rollback", Some(&snapshot.id), now_ms())?;
            self.store.set_end_at(id, end_at_ms)
        })();
        let record = match stored {
            Ok(r) => r,
            Err(e) => {
                // Never leave a sandbox running that the store does not know as running.
                let _ = self.runtime.destroy(id).await;
                self.lost(
                    id,
                    &live,
                    &format!("rollback to {} failed: {e}", snapshot.id),
                );
                return Err(e.into());
            }
        };
        live.end_at_ms.store(end_at_ms, Ordering::Relaxed);
        live.paused.store(false, Ordering::Release);
        if let Some(series) = self.metrics.lock().expect("metrics").get_mut(id) {
            *series = crate::metrics::Series::new(now_ms());
        }
        self.deadlines_changed.notify_one();
        tracing::info!(sandbox = %id, snapshot = %snapshot.id, "rolled back");
        Ok(record)
    }

    /// A sandbox that no longer exists in the runtime (a rollback destroyed it and could
    /// not restore it): out of the index, recorded killed with `reason`.
    fn lost(&self, id: &SandboxId, live: &Arc<Live>, reason: &str) {
        {
            let mut index = self.live.write().expect("live index");
            if index.get(id).is_some_and(|l| Arc::ptr_eq(l, live)) {
                index.remove(id);
            }
        }
        self.metrics.lock().expect("metrics").remove(id);
        if let Err(e) = self
            .store
            .transition(id, SandboxState::Killed, now_ms(), Some(reason))
        {
            tracing::error!(sandbox = %id, error = %e, "recording a sandbox lost in a rollback");
        }
        tracing::error!(sandbox = %id, reason, "sandbox lost");
    }

    /// After a restart: snapshots cut half-way (`creating` records) go with their
    /// directories, and every directory under `snapshots/` that no record claims (a
    /// fork's temporary checkpoint, a record deleted before its directory) is removed.
    pub(super) async fn reconcile_snapshots(&self) -> Result<(), ControlError> {
        for key in self.store.delete_creating_snapshots()? {
            tracing::warn!(snapshot = %key, "removing a snapshot cut by a restart");
            remove_dir(&self.snapshot_dir(&key)).await;
        }
        let keys: std::collections::HashSet<String> =
            self.store.snapshot_keys()?.into_iter().collect();
        let root = self.templates.data_dir().snapshots();
        let mut entries = match tokio::fs::read_dir(&root).await {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(ControlError::Unavailable(format!(
                    "reading {}: {e}",
                    root.display()
                )))
            }
        };
        while let Ok(Some(entry)) = entries.next_entry().await {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !keys.contains(&name) {
                tracing::warn!(dir = %entry.path().display(), "removing a checkpoint no snapshot claims");
                remove_dir(&entry.path()).await;
            }
        }
        Ok(())
    }
}

/// Snapshot names: 1–63 of `[a-z0-9._-]`, starting with a letter or digit.
fn check_name(name: &str) -> Result<(), ControlError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(ControlError::InvalidInput(format!(
            "snapshot name {:?} is invalid: 1 to {MAX_NAME} characters of a-z, 0-9, '.', '_' \
             and '-', starting with a letter or digit",
            shorten(name)
        )))
    }
}

/// A caller's string for an error message, cut to a readable length.
fn shorten(s: &str) -> String {
    let max = MAX_SNAPSHOT_REF.min(80);
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

async fn create_dir(dir: &std::path::Path) -> Result<(), ControlError> {
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| ControlError::Unavailable(format!("creating {}: {e}", dir.display())))
}

/// Removes a checkpoint directory; a missing one is fine, other failures are logged.
async fn remove_dir(dir: &std::path::Path) {
    match tokio::fs::remove_dir_all(dir).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::error!(dir = %dir.display(), error = %e, "removing a checkpoint"),
    }
}
