//! Snapshots of sandboxes: records written `creating` before the checkpoint exists and
//! `ready` once it does, listing with keyset pagination, start-up cleanup.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use cubicle_core::SandboxId;
use rusqlite::types::Value;
use rusqlite::{params, Connection, Row};

use crate::error::is_unique_violation;
use crate::{Store, StoreError};

/// Whether a snapshot can be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SnapshotState {
    /// Recorded, its checkpoint is being written; not usable, not listed.
    Creating,
    /// Complete.
    Ready,
}

impl SnapshotState {
    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotState::Creating => "creating",
            SnapshotState::Ready => "ready",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "creating" => Some(SnapshotState::Creating),
            "ready" => Some(SnapshotState::Ready),
            _ => None,
        }
    }
}

/// Everything needed to list a snapshot and to start sandboxes from it.
#[derive(Clone, PartialEq, Eq)]
pub struct SnapshotRecord {
    /// Cubicle's own id: `[a-z0-9]`, also the name of the checkpoint's directory.
    pub key: String,
    /// E2B's snapshot ID (`<name>:default`, or `<key>:default`), unique per owner.
    pub id: String,
    /// The API key that made it.
    pub owner: i64,
    /// The sandbox it was taken of.
    pub sandbox_id: SandboxId,
    /// The name it was given, if any.
    pub name: Option<String>,
    /// Creating or ready.
    pub state: SnapshotState,
    /// When it was asked for, unix ms.
    pub created_at_ms: i64,
    /// Bytes its checkpoint takes on disk (0 while creating).
    pub size_bytes: u64,
    /// The source sandbox's template (its own name, not an alias).
    pub template: String,
    /// The template layers the checkpoint needs, top first.
    pub layers: Vec<PathBuf>,
    /// Host uid of the template's root files.
    pub uid_shift: u32,
    /// The source's environment variables.
    pub env_vars: BTreeMap<String, String>,
    /// The source's default user.
    pub default_user: String,
    /// Whether the source served the code interpreter.
    pub code_interpreter: bool,
    /// The source's CPUs.
    pub cpu_count: u32,
    /// The source's memory, MiB.
    pub memory_mb: u64,
    /// The source's metadata.
    pub metadata: BTreeMap<String, String>,
    /// The source's writable-layer limit in MiB (what is restored from it keeps it).
    pub writable_layer_mib: Option<u64>,
}

/// Redacts the environment's values, which may be secrets.
impl fmt::Debug for SnapshotRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SnapshotRecord")
            .field("key", &self.key)
            .field("id", &self.id)
            .field("owner", &self.owner)
            .field("sandbox_id", &self.sandbox_id)
            .field("name", &self.name)
            .field("state", &self.state)
            .field("created_at_ms", &self.created_at_ms)
            .field("size_bytes", &self.size_bytes)
            .field("template", &self.template)
            .field("layers", &self.layers)
            .field("uid_shift", &self.uid_shift)
            .field("env_var_names", &self.env_vars.keys().collect::<Vec<_>>())
            .field("default_user", &self.default_user)
            .field("code_interpreter", &self.code_interpreter)
            .field("cpu_count", &self.cpu_count)
            .field("memory_mb", &self.memory_mb)
            .field("metadata", &self.metadata)
            .field("writable_layer_mib", &self.writable_layer_mib)
            .finish()
    }
}

/// What [`Store::list_snapshots`] returns: one owner's ready snapshots, newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotQuery {
    /// Whose.
    pub owner: i64,
    /// Only those taken of this sandbox.
    pub sandbox_id: Option<SandboxId>,
    /// Only the one with this E2B snapshot ID.
    pub id: Option<String>,
    /// Page size, clamped to `1..=1000`.
    pub limit: u32,
    /// [`SnapshotPage::next_cursor`] of the previous page.
    pub cursor: Option<String>,
}

/// One page of snapshots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotPage {
    /// The snapshots, newest first.
    pub items: Vec<SnapshotRecord>,
    /// Cursor of the next page; `None` on the last.
    pub next_cursor: Option<String>,
}

const SELECT: &str = "SELECT key, id, owner, sandbox_id, name, state, created_at_ms, \
     size_bytes, template, layers, uid_shift, env_vars, default_user, code_interpreter, \
     cpu_count, memory_mb, metadata, writable_layer_mib FROM snapshots";

fn corrupt(key: &str, what: &str, e: impl fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("snapshot {key:?}: {what}: {e}"))
}

fn from_row(row: &Row<'_>) -> Result<SnapshotRecord, StoreError> {
    let key: String = row.get(0)?;
    let sandbox_id: String = row.get(3)?;
    let sandbox_id = sandbox_id
        .parse()
        .map_err(|e| corrupt(&key, "sandbox_id", e))?;
    let state: String = row.get(5)?;
    let state = SnapshotState::parse(&state).ok_or_else(|| corrupt(&key, "state", &state))?;
    let int = |i: usize, what: &str| -> Result<u64, StoreError> {
        let v: i64 = row.get(i)?;
        u64::try_from(v).map_err(|e| corrupt(&key, what, e))
    };
    let layers: String = row.get(9)?;
    let layers: Vec<PathBuf> =
        serde_json::from_str(&layers).map_err(|e| corrupt(&key, "layers", e))?;
    let env_vars: String = row.get(11)?;
    let env_vars = serde_json::from_str(&env_vars).map_err(|e| corrupt(&key, "env_vars", e))?;
    let metadata: String = row.get(16)?;
    let metadata = serde_json::from_str(&metadata).map_err(|e| corrupt(&key, "metadata", e))?;
    Ok(SnapshotRecord {
        id: row.get(1)?,
        owner: row.get(2)?,
        sandbox_id,
        name: row.get(4)?,
        state,
        created_at_ms: row.get(6)?,
        size_bytes: int(7, "size_bytes")?,
        template: row.get(8)?,
        layers,
        uid_shift: u32::try_from(int(10, "uid_shift")?)
            .map_err(|e| corrupt(&key, "uid_shift", e))?,
        env_vars,
        default_user: row.get(12)?,
        code_interpreter: row.get(13)?,
        cpu_count: u32::try_from(int(14, "cpu_count")?)
            .map_err(|e| corrupt(&key, "cpu_count", e))?,
        memory_mb: int(15, "memory_mb")?,
        metadata,
        writable_layer_mib: row
            .get::<_, Option<i64>>(17)?
            .map(u64::try_from)
            .transpose()
            .map_err(|e| corrupt(&key, "writable_layer_mib", e))?,
        key,
    })
}

fn select(conn: &Connection, sql: &str, args: &[Value]) -> Result<Vec<SnapshotRecord>, StoreError> {
    crate::select_rows(conn, sql, args, from_row)
}

fn json<T: serde::Serialize + ?Sized>(what: &str, v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::InvalidInput(format!("{what}: {e}")))
}

fn to_i64(what: &str, v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::InvalidInput(format!("{what} {v} is too large")))
}

fn encode_cursor(created_at_ms: i64, key: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{created_at_ms}:{key}"))
}

fn decode_cursor(cursor: &str) -> Result<(i64, String), StoreError> {
    let bad = || StoreError::InvalidInput(format!("malformed pagination cursor {cursor:?}"));
    if cursor.len() > 128 {
        return Err(bad());
    }
    let bytes = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let (at, key) = text.split_once(':').ok_or_else(bad)?;
    let at: i64 = at.parse().map_err(|_| bad())?;
    if key.is_empty()
        || !key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err(bad());
    }
    Ok((at, key.to_owned()))
}

impl Store {
    /// Records a snapshot about to be written (its `state` should be
    /// [`SnapshotState::Creating`]).
    ///
    /// Errors: [`StoreError::Conflict`] if the owner already has a snapshot with this id
    /// (or the key exists).
    pub fn insert_snapshot(&self, r: &SnapshotRecord) -> Result<(), StoreError> {
        let layers = json("layers", &r.layers)?;
        let env_vars = json("env_vars", &r.env_vars)?;
        let metadata = json("metadata", &r.metadata)?;
        let conn = self.lock();
        let inserted = conn
            .prepare_cached(
                "INSERT INTO snapshots (key, id, owner, sandbox_id, name, state, created_at_ms, \
                 size_bytes, template, layers, uid_shift, env_vars, default_user, \
                 code_interpreter, cpu_count, memory_mb, metadata, writable_layer_mib) VALUES \
                 (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, \
                 ?18)",
            )?
            .execute(params![
                r.key,
                r.id,
                r.owner,
                r.sandbox_id.as_str(),
                r.name,
                r.state.as_str(),
                r.created_at_ms,
                to_i64("size_bytes", r.size_bytes)?,
                r.template,
                layers,
                r.uid_shift,
                env_vars,
                r.default_user,
                r.code_interpreter,
                r.cpu_count,
                to_i64("memory_mb", r.memory_mb)?,
                metadata,
                r.writable_layer_mib
                    .map(|v| to_i64("writable_layer_mib", v))
                    .transpose()?,
            ]);
        match inserted {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => Err(StoreError::Conflict(format!(
                "a snapshot {} already exists",
                r.id
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// Marks a `creating` snapshot ready with its size and layers; returns the record.
    ///
    /// Errors: [`StoreError::InvalidInput`] if there is no `creating` snapshot `key`
    /// (deleted meanwhile, or already ready).
    pub fn finish_snapshot(
        &self,
        key: &str,
        size_bytes: u64,
        layers: &[PathBuf],
    ) -> Result<SnapshotRecord, StoreError> {
        let layers = serde_json::to_string(layers)
            .map_err(|e| StoreError::InvalidInput(format!("layers: {e}")))?;
        let conn = self.lock();
        let n = conn
            .prepare_cached(
                "UPDATE snapshots SET state = 'ready', size_bytes = ?2, layers = ?3 \
                 WHERE key = ?1 AND state = 'creating'",
            )?
            .execute(params![key, to_i64("size_bytes", size_bytes)?, layers])?;
        if n == 0 {
            return Err(StoreError::InvalidInput(format!(
                "no snapshot {key} is being created"
            )));
        }
        select(
            &conn,
            &format!("{SELECT} WHERE key = ?1"),
            &[Value::Text(key.to_owned())],
        )?
        .pop()
        .ok_or_else(|| StoreError::Corrupt(format!("snapshot {key} vanished")))
    }

    /// The owner's snapshot with this E2B snapshot ID, in any state.
    pub fn get_snapshot(&self, owner: i64, id: &str) -> Result<Option<SnapshotRecord>, StoreError> {
        Ok(select(
            &self.lock(),
            &format!("{SELECT} WHERE owner = ?1 AND id = ?2"),
            &[Value::Integer(owner), Value::Text(id.to_owned())],
        )?
        .pop())
    }

    /// Deletes the snapshot record `key`; returns whether there was one.
    pub fn delete_snapshot(&self, key: &str) -> Result<bool, StoreError> {
        let conn = self.lock();
        let n = conn
            .prepare_cached("DELETE FROM snapshots WHERE key = ?1")?
            .execute([key])?;
        Ok(n > 0)
    }

    /// Deletes every `creating` snapshot record (a checkpoint cut by a restart); returns
    /// their keys, whose directories the caller removes.
    pub fn delete_creating_snapshots(&self) -> Result<Vec<String>, StoreError> {
        let conn = self.lock();
        let keys = conn
            .prepare_cached("DELETE FROM snapshots WHERE state = 'creating' RETURNING key")?
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(keys)
    }

    /// Every snapshot (any owner, any state) whose checkpoint needs the template layer
    /// `layer` (a template's `rootfs/`), oldest first.
    pub fn snapshots_using_layer(
        &self,
        layer: &std::path::Path,
    ) -> Result<Vec<SnapshotRecord>, StoreError> {
        let layer = layer
            .to_str()
            .ok_or_else(|| StoreError::InvalidInput(format!("{} is not UTF-8", layer.display())))?;
        select(
            &self.lock(),
            &format!(
                "{SELECT} WHERE EXISTS (SELECT 1 FROM json_each(snapshots.layers) l \
                 WHERE l.value = ?1) ORDER BY created_at_ms, key"
            ),
            &[Value::Text(layer.to_owned())],
        )
    }

    /// The keys of every snapshot record, whatever its owner or state.
    pub fn snapshot_keys(&self) -> Result<Vec<String>, StoreError> {
        let conn = self.lock();
        let keys = conn
            .prepare_cached("SELECT key FROM snapshots")?
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(keys)
    }

    /// One page of an owner's ready snapshots, newest first, with keyset pagination on
    /// `(created_at_ms, key)`.
    ///
    /// Errors: [`StoreError::InvalidInput`] for a cursor this store did not make.
    pub fn list_snapshots(&self, q: &SnapshotQuery) -> Result<SnapshotPage, StoreError> {
        let limit = q.limit.clamp(1, 1000);
        let mut conds = vec!["owner = ?1".to_owned(), "state = 'ready'".to_owned()];
        let mut args = vec![Value::Integer(q.owner)];
        if let Some(s) = &q.sandbox_id {
            args.push(Value::Text(s.as_str().to_owned()));
            conds.push(format!("sandbox_id = ?{}", args.len()));
        }
        if let Some(id) = &q.id {
            args.push(Value::Text(id.clone()));
            conds.push(format!("id = ?{}", args.len()));
        }
        if let Some(c) = q.cursor.as_deref().filter(|c| !c.is_empty()) {
            let (at, key) = decode_cursor(c)?;
            args.push(Value::Integer(at));
            args.push(Value::Text(key));
            let n = args.len();
            conds.push(format!("(created_at_ms, key) < (?{}, ?{n})", n - 1));
        }
        args.push(Value::Integer(i64::from(limit) + 1));
        let sql = format!(
            "{SELECT} INDEXED BY snapshots_by_owner WHERE {} \
             ORDER BY created_at_ms DESC, key DESC LIMIT ?{}",
            conds.join(" AND "),
            args.len()
        );
        let mut items = select(&self.lock(), &sql, &args)?;
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let next_cursor = if items.len() > limit {
            items.truncate(limit);
            items.last().map(|l| encode_cursor(l.created_at_ms, &l.key))
        } else {
            None
        };
        Ok(SnapshotPage { items, next_cursor })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cubicle_core::ErrorKind;

    fn snap(key: &str, id: &str, owner: i64, sandbox: &str, at: i64) -> SnapshotRecord {
        SnapshotRecord {
            key: key.to_owned(),
            id: id.to_owned(),
            owner,
            sandbox_id: sandbox.parse().unwrap(),
            name: None,
            state: SnapshotState::Creating,
            created_at_ms: at,
            size_bytes: 0,
            template: "base".to_owned(),
            layers: Vec::new(),
            uid_shift: 100_000,
            env_vars: BTreeMap::from([("A".to_owned(), "1".to_owned())]),
            default_user: "user".to_owned(),
            code_interpreter: false,
            cpu_count: 2,
            memory_mb: 512,
            metadata: BTreeMap::from([("k".to_owned(), "v".to_owned())]),
            writable_layer_mib: Some(64),
        }
    }

    #[test]
    fn creating_then_ready_round_trips() {
        let store = Store::open_in_memory().unwrap();
        let s = snap("k1", "n:default", 1, "sbx", 10);
        store.insert_snapshot(&s).unwrap();
        // Creating snapshots are not listed.
        let all = |owner| SnapshotQuery {
            owner,
            limit: 100,
            ..SnapshotQuery::default()
        };
        assert!(store.list_snapshots(&all(1)).unwrap().items.is_empty());
        let layers = vec![PathBuf::from("/t/base/rootfs")];
        let ready = store.finish_snapshot("k1", 4096, &layers).unwrap();
        assert_eq!(ready.state, SnapshotState::Ready);
        assert_eq!((ready.size_bytes, &ready.layers), (4096, &layers));
        assert_eq!(ready.env_vars, s.env_vars);
        assert_eq!(ready.metadata, s.metadata);
        assert_eq!(
            store.get_snapshot(1, "n:default").unwrap(),
            Some(ready.clone())
        );
        assert_eq!(store.get_snapshot(2, "n:default").unwrap(), None);
        assert_eq!(store.list_snapshots(&all(1)).unwrap().items, vec![ready]);
        assert!(store.list_snapshots(&all(2)).unwrap().items.is_empty());
        // Finishing twice is refused.
        assert!(store.finish_snapshot("k1", 1, &layers).is_err());
    }

    #[test]
    fn ids_are_unique_per_owner() {
        let store = Store::open_in_memory().unwrap();
        store
            .insert_snapshot(&snap("a1", "n:default", 1, "s", 1))
            .unwrap();
        let err = store
            .insert_snapshot(&snap("a2", "n:default", 1, "s", 2))
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Conflict);
        store
            .insert_snapshot(&snap("a3", "n:default", 2, "s", 3))
            .unwrap();
    }

    #[test]
    fn creating_leftovers_are_deleted_and_keys_listed() {
        let store = Store::open_in_memory().unwrap();
        store
            .insert_snapshot(&snap("c1", "c1:default", 1, "s", 1))
            .unwrap();
        store
            .insert_snapshot(&snap("r1", "r1:default", 1, "s", 2))
            .unwrap();
        store.finish_snapshot("r1", 1, &[]).unwrap();
        assert_eq!(store.delete_creating_snapshots().unwrap(), vec!["c1"]);
        assert_eq!(store.snapshot_keys().unwrap(), vec!["r1"]);
        assert!(store.delete_snapshot("r1").unwrap());
        assert!(!store.delete_snapshot("r1").unwrap());
    }

    #[test]
    fn snapshots_are_found_by_the_layers_they_need() {
        let store = Store::open_in_memory().unwrap();
        store
            .insert_snapshot(&snap("a", "a:default", 1, "s", 1))
            .unwrap();
        store
            .finish_snapshot(
                "a",
                1,
                &[
                    PathBuf::from("/t/top/rootfs"),
                    PathBuf::from("/t/base/rootfs"),
                ],
            )
            .unwrap();
        store
            .insert_snapshot(&snap("b", "b:default", 2, "s", 2))
            .unwrap();
        store
            .finish_snapshot("b", 1, &[PathBuf::from("/t/base/rootfs")])
            .unwrap();
        let keys = |p: &str| -> Vec<String> {
            store
                .snapshots_using_layer(std::path::Path::new(p))
                .unwrap()
                .into_iter()
                .map(|s| s.key)
                .collect()
        };
        assert_eq!(keys("/t/base/rootfs"), ["a", "b"]);
        assert_eq!(keys("/t/top/rootfs"), ["a"]);
        assert!(keys("/t/top").is_empty());
    }

    #[test]
    fn pagination_and_filters() {
        let store = Store::open_in_memory().unwrap();
        for i in 0..7 {
            let key = format!("k{i}");
            let sandbox = if i % 2 == 0 { "even" } else { "odd" };
            // Ties on created_at: the key breaks them.
            store
                .insert_snapshot(&snap(&key, &format!("{key}:default"), 1, sandbox, i / 2))
                .unwrap();
            store.finish_snapshot(&key, 1, &[]).unwrap();
        }
        let mut seen = Vec::new();
        let mut cursor = None;
        loop {
            let page = store
                .list_snapshots(&SnapshotQuery {
                    owner: 1,
                    limit: 3,
                    cursor: cursor.take(),
                    ..SnapshotQuery::default()
                })
                .unwrap();
            assert!(!page.items.is_empty() && page.items.len() <= 3);
            seen.extend(page.items.into_iter().map(|s| s.key));
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        assert_eq!(seen, ["k6", "k5", "k4", "k3", "k2", "k1", "k0"]);
        let by_sandbox = store
            .list_snapshots(&SnapshotQuery {
                owner: 1,
                sandbox_id: Some("odd".parse().unwrap()),
                limit: 100,
                ..SnapshotQuery::default()
            })
            .unwrap();
        let keys: Vec<_> = by_sandbox.items.iter().map(|s| s.key.as_str()).collect();
        assert_eq!(keys, ["k5", "k3", "k1"]);
        let by_id = store
            .list_snapshots(&SnapshotQuery {
                owner: 1,
                id: Some("k4:default".into()),
                limit: 100,
                ..SnapshotQuery::default()
            })
            .unwrap();
        assert_eq!(by_id.items.len(), 1);
        for bad in ["!!", "abc", &URL_SAFE_NO_PAD.encode("1:A B")] {
            let err = store
                .list_snapshots(&SnapshotQuery {
                    owner: 1,
                    cursor: Some(bad.to_owned()),
                    limit: 1,
                    ..SnapshotQuery::default()
                })
                .unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput);
        }
    }

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let store = Store::open(&path).unwrap();
            store
                .insert_snapshot(&snap("p1", "p1:default", 1, "s", 1))
                .unwrap();
            store.finish_snapshot("p1", 7, &[]).unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(
            store
                .get_snapshot(1, "p1:default")
                .unwrap()
                .unwrap()
                .size_bytes,
            7
        );
    }
}
