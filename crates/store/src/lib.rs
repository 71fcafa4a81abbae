//! Cubicle's persistent state in one embedded SQLite database (compiled in through
//! `rusqlite`'s `bundled` feature): API keys, sandboxes with their user metadata, and a
//! per-sandbox event log. This is the only crate that speaks SQL; everything else goes
//! through [`Store`].
//!
//! # Schema (version 4: `migrations/0001_init.sql`, `0002_snapshots.sql`,
//! `0003_writable_layer.sql`, `0004_template_builds.sql`)
//!
//! ```text
//! api_keys          id INTEGER PK AUTOINCREMENT, name UNIQUE, key_hash BLOB(32) UNIQUE,
//!                   prefix, created_at_ms, last_used_at_ms NULL
//! sandboxes         id TEXT PK, owner INTEGER, template, alias NULL, state CHECK(..),
//!                   created_at_ms, started_at_ms NULL, end_at_ms, ended_at_ms NULL,
//!                   end_reason NULL, cpu_count, memory_mb, disk_mb, env_vars (JSON),
//!                   envd_access_token NULL, allow_internet_access, auto_pause,
//!                   writable_layer_mib NULL
//!   index sandboxes_live_by_owner (owner, created_at_ms, id) WHERE state <> 'killed'
//!   index sandboxes_live          (created_at_ms, id)        WHERE state <> 'killed'
//!   index sandboxes_by_owner      (owner, created_at_ms, id)  listings incl. killed
//!   index sandboxes_killed        (ended_at_ms)              WHERE state = 'killed'
//! sandbox_metadata  (sandbox_id → sandboxes ON DELETE CASCADE, key, value),
//!                   PK (sandbox_id, key), WITHOUT ROWID
//!   index sandbox_metadata_by_pair (key, value, sandbox_id)
//! sandbox_events    seq INTEGER PK, sandbox_id → sandboxes ON DELETE CASCADE, at_ms,
//!                   kind, detail NULL
//!   index sandbox_events_by_sandbox (sandbox_id, seq)
//! snapshots         key TEXT PK, id, owner, sandbox_id, name NULL, state CHECK(creating,
//!                   ready), created_at_ms, size_bytes, template, layers (JSON), uid_shift,
//!                   env_vars (JSON), default_user, code_interpreter, cpu_count,
//!                   memory_mb, metadata (JSON), writable_layer_mib NULL,
//!                   UNIQUE (owner, id)
//!   index snapshots_by_owner   (owner, created_at_ms, key)
//!   index snapshots_by_sandbox (sandbox_id)
//! template_builds   id TEXT PK, template, owner, source CHECK(recipe, image), request
//!                   (JSON, no credentials), rebuild, phase CHECK(queued .. ready, failed),
//!                   created_at_ms, updated_at_ms, finished_at_ms NULL, error NULL,
//!                   error_kind NULL (user, internal), failed_phase NULL, logs (JSON,
//!                   the last 200 lines), log_count
//!   index template_builds_by_template (template, created_at_ms)
//!   index template_builds_unfinished  (created_at_ms) WHERE phase NOT IN (ready, failed)
//! ```
//!
//! All tables are `STRICT`; times are unix milliseconds.
//!
//! * **Snapshots** are written `creating` before the runtime writes the checkpoint and
//!   become `ready` when it is complete ([`Store::finish_snapshot`]); only ready ones are
//!   listed. A daemon that stops in between leaves a `creating` row, which the start-up
//!   reconcile deletes ([`Store::delete_creating_snapshots`]) with its directory.
//!   `key` (Cubicle's id, the directory name) is global; `id` (E2B's snapshot ID, e.g.
//!   `my-snap:default`) is unique per owner. Snapshots outlive their sandbox (no foreign
//!   key) and are never purged with it.
//!
//! * **Template builds** are written `queued` when submitted, move through their
//!   phases ([`Store::update_build`], which also saves the last [`BUILD_LOG_LINES`]
//!   lines of output) and end `ready` or `failed` ([`Store::finish_build`], with the
//!   error and whose fault it is). A restart leaves unfinished rows, which the start-up
//!   reconcile fails ([`Store::unfinished_builds`]).
//!
//! * **API keys** are stored as the SHA-256 of the whole key only (plus an 8-character
//!   display prefix); the plaintext is returned once by [`Store::create_key`].
//!   `last_used_at_ms` is written at most once a minute per key, so authentication is a
//!   read in the common case.
//! * **Owner.** `sandboxes.owner` is the creating key's id as a plain integer, without a
//!   foreign key: keys must stay deletable (`ON DELETE RESTRICT` would forbid that) and
//!   the sandboxes of a deleted key keep their history. Because key ids come from
//!   `AUTOINCREMENT` they are never reused, so a new key can never see a deleted key's
//!   sandboxes; a deleted key's sandboxes are owned by nobody who can authenticate.
//! * **Listing** is keyset pagination on `(created_at_ms, id)`: the cursor names the
//!   last row returned, so concurrent inserts and kills neither shift nor repeat the rest
//!   of a walk (OFFSET would). Killed rows accumulate until [`Store::purge_killed`] while
//!   live rows are bounded by the machine, so live-only listings (every E2B listing) are
//!   pinned with `INDEXED BY` to the partial indexes that hold live rows only: their
//!   cost grows with the number of live sandboxes, never with the history. Listings that
//!   ask for killed sandboxes (admin use) go through `sandboxes_by_owner`, or a scan
//!   without an owner.
//! * **Metadata** lives in its own table rather than in a JSON column: each filter pair
//!   becomes `EXISTS (SELECT 1 FROM sandbox_metadata f WHERE f.sandbox_id = s.id AND
//!   f.key = ? AND f.value = ?)`, with both strings bound as parameters, so keys with
//!   dots, quotes, spaces or any unicode need no JSON-path escaping and matching is exact
//!   byte equality; each probe is one lookup in the covering `(key, value, sandbox_id)`
//!   index. The correlated form is deliberate: the planner walks the live rows in page
//!   order and stops at the page size, whereas `id IN (SELECT ...)` materialises every
//!   matching pair first, killed sandboxes included (measured: 7 ms against 0.6 ms for
//!   a common pair with 40 000 killed rows). Records read their metadata back through
//!   `json_group_object` in the same query.
//! * **Events**: [`Store::insert_sandbox`] records `created` (detail: the initial state),
//!   [`Store::transition`] records the target state's name (`running`, `paused`,
//!   `killed`; detail: the reason), [`Store::set_end_at`] records `end_at` (detail: the
//!   new deadline in unix ms); [`Store::record_event`] adds anything else.
//!
//! # Durability
//!
//! The database runs in WAL mode with `synchronous=NORMAL`: a committed transaction
//! survives a crash of the process (the daemon's, or a panic), and the database stays
//! consistent, but a power loss or kernel crash may lose the last transactions committed
//! before it (the WAL is synced at checkpoints, not at every commit). The daemon's
//! start-up reconcile compares [`Store::live_sandboxes`] with what really runs and repairs
//! either side, so losing the last instants is acceptable; a write per API call costs
//! no fsync. `foreign_keys` is on, and a busy timeout of 5 s covers a second process
//! (the CLI) opening the same file.
//!
//! One connection serves the whole process behind a mutex ([`Store`] is `Clone + Send +
//! Sync`); every method is one short synchronous call, meant to be called directly
//! from async code: tens of microseconds for point reads and writes (no fsync per
//! commit), about 2.5 µs per returned record for listings. WAL checkpoints (every
//! ~1000 written pages) fsync and make an occasional write take a few milliseconds.
//!
//! # Migrations
//!
//! `migrations/NNNN_*.sql` are embedded with `include_str!` in [`MIGRATIONS`]; the schema
//! version is SQLite's `PRAGMA user_version` (0 for a fresh file). Opening runs every
//! migration past the stored version, in order, in one `IMMEDIATE` transaction that also
//! sets `user_version`, so a database is either fully upgraded or left as it was, and two
//! processes opening it at once do not both migrate. Migrations run with foreign keys
//! off (so a future one may rebuild a table the SQLite way) and `PRAGMA
//! foreign_key_check` must come back empty before the commit. A database whose version
//! is higher than this build's is refused with [`StoreError::TooNew`]. A shipped
//! migration is never edited; changes go into the next numbered file.

mod builds;
mod error;
mod keys;
mod sandboxes;
mod snapshots;

use std::fs::{DirBuilder, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, TransactionBehavior};

pub use builds::{BuildFault, BuildLogLine, BuildRecord, BUILD_LOG_LINES, BUILD_PHASES};
pub use error::StoreError;
pub use keys::{KeyRecord, KEY_PREFIX};
pub use sandboxes::{Event, ListQuery, Order, Page, SandboxRecord, TemplateUsage};
pub use snapshots::{SnapshotPage, SnapshotQuery, SnapshotRecord, SnapshotState};

/// The schema migrations, in order; entry `i` brings `user_version` from `i` to `i + 1`.
pub const MIGRATIONS: &[&str] = &[
    include_str!("../migrations/0001_init.sql"),
    include_str!("../migrations/0002_snapshots.sql"),
    include_str!("../migrations/0003_writable_layer.sql"),
    include_str!("../migrations/0004_template_builds.sql"),
];

/// The schema version this build writes (the number of migrations).
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// How long a statement waits for another process's lock before failing with "busy".
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// A handle on the database. Cheap to clone; all clones share one connection.
#[derive(Debug, Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
}

impl Store {
    /// Opens (creating if missing) the database at `path` and brings its schema up to
    /// date. Missing parent directories are created (with the default mode: the parent is
    /// usually the data directory, which other parts of Cubicle share); a missing
    /// database file is created with mode 0600, as it holds access tokens and
    /// environment variables, and SQLite gives its `-wal` and `-shm` files the same mode.
    /// The mode of an existing file is left alone.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            DirBuilder::new()
                .recursive(true)
                .create(parent)
                .map_err(|e| StoreError::io(format!("creating {}", parent.display()), e))?;
        }
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|e| StoreError::io(format!("opening {}", path.display()), e))?;
        let conn = Connection::open(path)?;
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "wal", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::io(
                format!("enabling WAL mode on {}", path.display()),
                std::io::Error::other(format!("sqlite kept journal mode {mode:?}")),
            ));
        }
        Store::setup(conn)
    }

    /// A private in-memory database (for tests): same schema, nothing persisted.
    pub fn open_in_memory() -> Result<Store, StoreError> {
        Store::setup(Connection::open_in_memory()?)
    }

    fn setup(mut conn: Connection) -> Result<Store, StoreError> {
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", false)?;
        migrate(&mut conn)?;
        conn.pragma_update(None, "foreign_keys", true)?;
        let fk: bool = conn.pragma_query_value(None, "foreign_keys", |r| r.get(0))?;
        if !fk {
            return Err(StoreError::Corrupt(
                "sqlite refused to enable foreign keys".to_owned(),
            ));
        }
        conn.set_prepared_statement_cache_capacity(64);
        Ok(Store {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// The database's schema version (`PRAGMA user_version`).
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        Ok(self
            .lock()
            .pragma_query_value(None, "user_version", |r| r.get(0))?)
    }

    /// The connection. A panic while it was held cannot leave a transaction open
    /// (rusqlite rolls back on drop), so a poisoned lock is simply taken over.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let stored = user_version(conn)?;
    if stored == SCHEMA_VERSION {
        return Ok(());
    }
    if stored > SCHEMA_VERSION {
        // Refused before taking the write lock, so a read-only file says so too.
        return Err(StoreError::TooNew {
            found: stored,
            supported: SCHEMA_VERSION,
        });
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    // Re-read under the write lock: another process may have migrated meanwhile.
    let stored = user_version(&tx)?;
    if stored > SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            found: stored,
            supported: SCHEMA_VERSION,
        });
    }
    let first = usize::try_from(stored)
        .map_err(|_| StoreError::Corrupt(format!("negative schema version {stored}")))?;
    for sql in &MIGRATIONS[first..] {
        tx.execute_batch(sql)?;
    }
    let violations: i64 =
        tx.query_row("SELECT count(*) FROM pragma_foreign_key_check", [], |r| {
            r.get(0)
        })?;
    if violations != 0 {
        return Err(StoreError::Corrupt(format!(
            "{violations} foreign key violations after migrating to version {SCHEMA_VERSION}"
        )));
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()?;
    Ok(())
}

/// Every row `sql` selects with `params`, each made a record by `from_row`.
pub(crate) fn select_rows<T>(
    conn: &Connection,
    sql: &str,
    params: &[rusqlite::types::Value],
    from_row: impl Fn(&rusqlite::Row<'_>) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    let mut stmt = conn.prepare_cached(sql)?;
    let mut rows = stmt.query(rusqlite::params_from_iter(params))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(from_row(row)?);
    }
    Ok(out)
}

fn user_version(conn: &Connection) -> Result<i64, StoreError> {
    Ok(conn.pragma_query_value(None, "user_version", |r| r.get(0))?)
}

/// The current time in unix milliseconds (0 if the clock is before 1970).
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn fresh_db_reaches_latest_version_and_reopen_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/dir/cubicle.db");
        let store = Store::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), SCHEMA_VERSION);
        let (k, _) = store.create_key("first").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        for suffix in ["-wal", "-shm"] {
            let side = path.with_file_name(format!("cubicle.db{suffix}"));
            let m = std::fs::metadata(&side).unwrap();
            assert_eq!(m.permissions().mode() & 0o077, 0, "{suffix}");
        }
        drop(store);
        for _ in 0..3 {
            let again = Store::open(&path).unwrap();
            assert_eq!(again.schema_version().unwrap(), SCHEMA_VERSION);
            assert_eq!(again.list_keys().unwrap(), vec![k.clone()]);
        }
        let mem = Store::open_in_memory().unwrap();
        assert_eq!(mem.schema_version().unwrap(), SCHEMA_VERSION);
    }

    #[test]
    fn wal_and_pragmas_are_set() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let conn = store.lock();
        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let sync: i64 = conn
            .pragma_query_value(None, "synchronous", |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 1, "NORMAL");
        let fk: i64 = conn
            .pragma_query_value(None, "foreign_keys", |r| r.get(0))
            .unwrap();
        assert_eq!(fk, 1);
    }

    #[test]
    fn newer_database_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        drop(Store::open(&path).unwrap());
        {
            let raw = Connection::open(&path).unwrap();
            raw.pragma_update(None, "user_version", SCHEMA_VERSION + 5)
                .unwrap();
        }
        match Store::open(&path) {
            Err(StoreError::TooNew { found, supported }) => {
                assert_eq!((found, supported), (SCHEMA_VERSION + 5, SCHEMA_VERSION));
            }
            other => panic!("expected TooNew, got {other:?}"),
        }
    }

    #[test]
    fn garbage_file_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        std::fs::write(&path, vec![0x5a_u8; 8192]).unwrap();
        let err = Store::open(&path).unwrap_err();
        assert!(matches!(err, StoreError::Sqlite(_)), "{err:?}");
        let err = Store::open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::Io { .. }), "{err:?}");
    }
}
