//! Template build jobs: a record per build, its phase, the end of its log, and what
//! failed; the start-up reconcile fails the builds a restart cut short.

use std::fmt;

use rusqlite::types::Value;
use rusqlite::{params, Connection, Row};
use serde::{Deserialize, Serialize};

use crate::error::is_unique_violation;
use crate::{Store, StoreError};

/// How many log lines a build record keeps (the last ones).
pub const BUILD_LOG_LINES: usize = 200;

/// The phases a build goes through, as stored (`queued` … `ready` | `failed`).
pub const BUILD_PHASES: [&str; 7] = [
    "queued",
    "pulling",
    "unpacking",
    "building",
    "snapshotting",
    "ready",
    "failed",
];

/// One line of a build's output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildLogLine {
    /// When it was logged, unix ms.
    pub at_ms: i64,
    /// The line.
    pub message: String,
}

/// Whose fault a failed build is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildFault {
    /// The request's: a bad image, bad flags, a name taken.
    User,
    /// The host's or Cubicle's.
    Internal,
}

impl BuildFault {
    /// The name stored.
    pub fn as_str(self) -> &'static str {
        match self {
            BuildFault::User => "user",
            BuildFault::Internal => "internal",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "user" => Some(BuildFault::User),
            "internal" => Some(BuildFault::Internal),
            _ => None,
        }
    }
}

/// A template build job.
#[derive(Clone, PartialEq, Eq)]
pub struct BuildRecord {
    /// The build ID (UUID-shaped).
    pub id: String,
    /// The template it makes (or remakes).
    pub template: String,
    /// The API key that asked for it.
    pub owner: i64,
    /// `recipe` or `image`.
    pub source: String,
    /// What was asked for, as JSON (no credentials).
    pub request: String,
    /// Whether it replaces an existing template.
    pub rebuild: bool,
    /// One of [`BUILD_PHASES`].
    pub phase: String,
    /// When it was submitted, unix ms.
    pub created_at_ms: i64,
    /// When its phase last changed, unix ms.
    pub updated_at_ms: i64,
    /// When it ended, unix ms.
    pub finished_at_ms: Option<i64>,
    /// Why it failed.
    pub error: Option<String>,
    /// Whose fault the failure is.
    pub fault: Option<BuildFault>,
    /// The phase it failed in.
    pub failed_phase: Option<String>,
    /// The last [`BUILD_LOG_LINES`] lines of its output.
    pub logs: Vec<BuildLogLine>,
    /// How many lines it logged in all (the first kept line is number
    /// `log_count - logs.len()`, counting from 0).
    pub log_count: u64,
}

/// The request may hold environment values; only its size is shown.
impl fmt::Debug for BuildRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BuildRecord")
            .field("id", &self.id)
            .field("template", &self.template)
            .field("owner", &self.owner)
            .field("source", &self.source)
            .field("request_bytes", &self.request.len())
            .field("rebuild", &self.rebuild)
            .field("phase", &self.phase)
            .field("created_at_ms", &self.created_at_ms)
            .field("finished_at_ms", &self.finished_at_ms)
            .field("error", &self.error)
            .field("fault", &self.fault)
            .field("log_count", &self.log_count)
            .finish_non_exhaustive()
    }
}

impl BuildRecord {
    /// Whether it has ended (ready or failed).
    pub fn is_finished(&self) -> bool {
        self.phase == "ready" || self.phase == "failed"
    }
}

const SELECT: &str = "SELECT id, template, owner, source, request, rebuild, phase, \
     created_at_ms, updated_at_ms, finished_at_ms, error, error_kind, failed_phase, logs, \
     log_count FROM template_builds";

fn corrupt(id: &str, what: &str, e: impl fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("build {id:?}: {what}: {e}"))
}

fn from_row(row: &Row<'_>) -> Result<BuildRecord, StoreError> {
    let id: String = row.get(0)?;
    let logs: String = row.get(13)?;
    let logs = serde_json::from_str(&logs).map_err(|e| corrupt(&id, "logs", e))?;
    let fault: Option<String> = row.get(11)?;
    let fault = match fault {
        None => None,
        Some(f) => Some(BuildFault::parse(&f).ok_or_else(|| corrupt(&id, "error_kind", &f))?),
    };
    let log_count: i64 = row.get(14)?;
    Ok(BuildRecord {
        template: row.get(1)?,
        owner: row.get(2)?,
        source: row.get(3)?,
        request: row.get(4)?,
        rebuild: row.get(5)?,
        phase: row.get(6)?,
        created_at_ms: row.get(7)?,
        updated_at_ms: row.get(8)?,
        finished_at_ms: row.get(9)?,
        error: row.get(10)?,
        fault,
        failed_phase: row.get(12)?,
        logs,
        log_count: u64::try_from(log_count).map_err(|e| corrupt(&id, "log_count", e))?,
        id,
    })
}

fn select(conn: &Connection, sql: &str, args: &[Value]) -> Result<Vec<BuildRecord>, StoreError> {
    crate::select_rows(conn, sql, args, from_row)
}

fn check_phase(phase: &str) -> Result<(), StoreError> {
    if BUILD_PHASES.contains(&phase) {
        Ok(())
    } else {
        Err(StoreError::InvalidInput(format!(
            "unknown build phase {phase:?}"
        )))
    }
}

fn logs_json(logs: &[BuildLogLine]) -> Result<String, StoreError> {
    let start = logs.len().saturating_sub(BUILD_LOG_LINES);
    serde_json::to_string(&logs[start..])
        .map_err(|e| StoreError::InvalidInput(format!("logs: {e}")))
}

impl Store {
    /// Records a new build job (normally `queued`, with no logs).
    ///
    /// Errors: [`StoreError::Conflict`] if the id exists.
    pub fn insert_build(&self, r: &BuildRecord) -> Result<(), StoreError> {
        check_phase(&r.phase)?;
        let logs = logs_json(&r.logs)?;
        let log_count = i64::try_from(r.log_count)
            .map_err(|_| StoreError::InvalidInput("log_count is too large".into()))?;
        let conn = self.lock();
        let inserted = conn
            .prepare_cached(
                "INSERT INTO template_builds (id, template, owner, source, request, rebuild, \
                 phase, created_at_ms, updated_at_ms, finished_at_ms, error, error_kind, \
                 failed_phase, logs, log_count) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, \
                 ?10, ?11, ?12, ?13, ?14, ?15)",
            )?
            .execute(params![
                r.id,
                r.template,
                r.owner,
                r.source,
                r.request,
                r.rebuild,
                r.phase,
                r.created_at_ms,
                r.updated_at_ms,
                r.finished_at_ms,
                r.error,
                r.fault.map(BuildFault::as_str),
                r.failed_phase,
                logs,
                log_count,
            ]);
        match inserted {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => {
                Err(StoreError::Conflict(format!("a build {} exists", r.id)))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Moves an unfinished build to `phase` and saves its log so far. Finishing
    /// phases (`ready`, `failed`) go through [`Store::finish_build`].
    ///
    /// Errors: [`StoreError::InvalidInput`] for an unknown or finishing phase, or a
    /// build that is not unfinished.
    pub fn update_build(
        &self,
        id: &str,
        phase: &str,
        logs: &[BuildLogLine],
        log_count: u64,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        check_phase(phase)?;
        if phase == "ready" || phase == "failed" {
            return Err(StoreError::InvalidInput(format!(
                "{phase} ends a build: use finish_build"
            )));
        }
        self.write_build(id, phase, logs, log_count, at_ms, None)
    }

    /// Ends an unfinished build: `ready` (no error), or `failed` with the error, whose
    /// fault it is and the phase it failed in. Returns the record.
    pub fn finish_build(
        &self,
        id: &str,
        error: Option<(&str, BuildFault, &str)>,
        logs: &[BuildLogLine],
        log_count: u64,
        at_ms: i64,
    ) -> Result<BuildRecord, StoreError> {
        let phase = if error.is_some() { "failed" } else { "ready" };
        self.write_build(id, phase, logs, log_count, at_ms, Some(error))?;
        self.get_build(id)?
            .ok_or_else(|| StoreError::Corrupt(format!("build {id} vanished")))
    }

    fn write_build(
        &self,
        id: &str,
        phase: &str,
        logs: &[BuildLogLine],
        log_count: u64,
        at_ms: i64,
        finish: Option<Option<(&str, BuildFault, &str)>>,
    ) -> Result<(), StoreError> {
        let logs = logs_json(logs)?;
        let log_count = i64::try_from(log_count)
            .map_err(|_| StoreError::InvalidInput("log_count is too large".into()))?;
        let (finished, error, fault, failed_phase) = match finish {
            None => (None, None, None, None),
            Some(None) => (Some(at_ms), None, None, None),
            Some(Some((message, fault, failed))) => (
                Some(at_ms),
                Some(message),
                Some(fault.as_str()),
                Some(failed),
            ),
        };
        let conn = self.lock();
        let n = conn
            .prepare_cached(
                "UPDATE template_builds SET phase = ?2, logs = ?3, log_count = ?4, \
                 updated_at_ms = ?5, finished_at_ms = ?6, error = ?7, error_kind = ?8, \
                 failed_phase = ?9 WHERE id = ?1 AND phase NOT IN ('ready', 'failed')",
            )?
            .execute(params![
                id,
                phase,
                logs,
                log_count,
                at_ms,
                finished,
                error,
                fault,
                failed_phase
            ])?;
        if n == 0 {
            return Err(StoreError::InvalidInput(format!(
                "no unfinished build {id}"
            )));
        }
        Ok(())
    }

    /// The build `id`.
    pub fn get_build(&self, id: &str) -> Result<Option<BuildRecord>, StoreError> {
        Ok(select(
            &self.lock(),
            &format!("{SELECT} WHERE id = ?1"),
            &[Value::Text(id.to_owned())],
        )?
        .pop())
    }

    /// The builds of `template`, oldest first.
    pub fn builds_of(&self, template: &str) -> Result<Vec<BuildRecord>, StoreError> {
        select(
            &self.lock(),
            &format!("{SELECT} WHERE template = ?1 ORDER BY created_at_ms, id"),
            &[Value::Text(template.to_owned())],
        )
    }

    /// Builds that have not ended, oldest first.
    pub fn unfinished_builds(&self) -> Result<Vec<BuildRecord>, StoreError> {
        select(
            &self.lock(),
            &format!(
                "{SELECT} INDEXED BY template_builds_unfinished \
                 WHERE phase NOT IN ('ready', 'failed') ORDER BY created_at_ms, id"
            ),
            &[],
        )
    }

    /// Deletes the build records of `template` (when the template is deleted); returns
    /// how many.
    pub fn delete_builds_of(&self, template: &str) -> Result<usize, StoreError> {
        let conn = self.lock();
        let n = conn
            .prepare_cached(
                "DELETE FROM template_builds WHERE template = ?1 \
                 AND phase IN ('ready', 'failed')",
            )?
            .execute([template])?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cubicle_core::ErrorKind;

    fn build(id: &str, template: &str, at: i64) -> BuildRecord {
        BuildRecord {
            id: id.to_owned(),
            template: template.to_owned(),
            owner: 1,
            source: "image".to_owned(),
            request: r#"{"image":"/x"}"#.to_owned(),
            rebuild: false,
            phase: "queued".to_owned(),
            created_at_ms: at,
            updated_at_ms: at,
            finished_at_ms: None,
            error: None,
            fault: None,
            failed_phase: None,
            logs: Vec::new(),
            log_count: 0,
        }
    }

    fn lines(from: usize, to: usize) -> Vec<BuildLogLine> {
        (from..to)
            .map(|i| BuildLogLine {
                at_ms: i as i64,
                message: format!("line {i}"),
            })
            .collect()
    }

    #[test]
    fn a_build_goes_through_its_phases_and_keeps_the_end_of_its_log() {
        let store = Store::open_in_memory().unwrap();
        store.insert_build(&build("b1", "t", 10)).unwrap();
        let err = store.insert_build(&build("b1", "t", 11)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Conflict);
        assert_eq!(store.unfinished_builds().unwrap().len(), 1);
        store
            .update_build("b1", "unpacking", &lines(0, 3), 3, 20)
            .unwrap();
        let r = store.get_build("b1").unwrap().unwrap();
        assert_eq!(
            (r.phase.as_str(), r.log_count, r.logs.len()),
            ("unpacking", 3, 3)
        );
        assert!(!r.is_finished());
        // Only the last BUILD_LOG_LINES are kept; the count is of every line.
        let many = lines(0, 250);
        let done = store.finish_build("b1", None, &many, 250, 30).unwrap();
        assert_eq!(done.phase, "ready");
        assert_eq!(done.finished_at_ms, Some(30));
        assert_eq!(done.logs.len(), BUILD_LOG_LINES);
        assert_eq!(done.logs[0].message, "line 50");
        assert_eq!(done.log_count, 250);
        assert!(done.is_finished());
        // Finished builds do not move again.
        assert!(store.update_build("b1", "building", &[], 0, 40).is_err());
        assert!(store.finish_build("b1", None, &[], 0, 40).is_err());
        assert!(store.update_build("b1", "bogus", &[], 0, 40).is_err());
        assert!(store.update_build("b1", "ready", &[], 0, 40).is_err());
        assert!(store.unfinished_builds().unwrap().is_empty());
    }

    #[test]
    fn failures_say_why_and_whose_fault() {
        let store = Store::open_in_memory().unwrap();
        store.insert_build(&build("b1", "t", 10)).unwrap();
        store.insert_build(&build("b2", "t", 5)).unwrap();
        store.insert_build(&build("b3", "other", 7)).unwrap();
        let failed = store
            .finish_build(
                "b1",
                Some(("layer 1/1: digest mismatch", BuildFault::User, "unpacking")),
                &[],
                0,
                20,
            )
            .unwrap();
        assert_eq!(failed.phase, "failed");
        assert_eq!(failed.error.as_deref(), Some("layer 1/1: digest mismatch"));
        assert_eq!(failed.fault, Some(BuildFault::User));
        assert_eq!(failed.failed_phase.as_deref(), Some("unpacking"));
        let ids: Vec<_> = store
            .builds_of("t")
            .unwrap()
            .into_iter()
            .map(|b| b.id)
            .collect();
        assert_eq!(ids, ["b2", "b1"]);
        let unfinished: Vec<_> = store
            .unfinished_builds()
            .unwrap()
            .into_iter()
            .map(|b| b.id)
            .collect();
        assert_eq!(unfinished, ["b2", "b3"]);
        // Deleting a template's builds leaves unfinished ones alone.
        assert_eq!(store.delete_builds_of("t").unwrap(), 1);
        assert_eq!(store.builds_of("t").unwrap().len(), 1);
    }

    #[test]
    fn builds_survive_reopen_and_the_migration_creates_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let store = Store::open(&path).unwrap();
            store.insert_build(&build("p1", "t", 1)).unwrap();
            store
                .update_build("p1", "building", &lines(0, 2), 2, 5)
                .unwrap();
        }
        let store = Store::open(&path).unwrap();
        let r = store.get_build("p1").unwrap().unwrap();
        assert_eq!((r.phase.as_str(), r.logs.len()), ("building", 2));
        // A version-2 database (before builds) gains the table without losing rows.
        let old = dir.path().join("v2");
        {
            let conn = Connection::open(&old).unwrap();
            for sql in &crate::MIGRATIONS[..2] {
                conn.execute_batch(sql).unwrap();
            }
            conn.pragma_update(None, "user_version", 2).unwrap();
            conn.execute(
                "INSERT INTO api_keys (name, key_hash, prefix, created_at_ms) \
                 VALUES ('k', zeroblob(32), 'e2b_0000', 1)",
                [],
            )
            .unwrap();
        }
        let store = Store::open(&old).unwrap();
        assert_eq!(store.schema_version().unwrap(), crate::SCHEMA_VERSION);
        assert_eq!(store.list_keys().unwrap().len(), 1);
        store.insert_build(&build("n1", "t", 1)).unwrap();
    }
}
