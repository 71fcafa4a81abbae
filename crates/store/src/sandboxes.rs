//! Sandboxes: records, lifecycle transitions, listing with keyset pagination, events.

use std::collections::BTreeMap;
use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use cubicle_core::{SandboxId, SandboxState};
use rusqlite::types::Value;
use rusqlite::{params, Connection, OptionalExtension, Row, TransactionBehavior};

use crate::error::is_unique_violation;
use crate::{now_ms, Store, StoreError};

/// Everything the control plane remembers about one sandbox.
#[derive(Clone, PartialEq, Eq)]
pub struct SandboxRecord {
    /// Its id.
    pub id: SandboxId,
    /// The id of the API key that created it (see the crate docs on deleted keys).
    pub owner: i64,
    /// The template as requested (`templateID`).
    pub template: String,
    /// The template's alias, if it has one.
    pub alias: Option<String>,
    /// Where it is in its life.
    pub state: SandboxState,
    /// When the create request was accepted, unix ms.
    pub created_at_ms: i64,
    /// When it first became running, unix ms.
    pub started_at_ms: Option<i64>,
    /// Its timeout deadline, unix ms.
    pub end_at_ms: i64,
    /// When it was killed, unix ms; set exactly when `state` is killed.
    pub ended_at_ms: Option<i64>,
    /// Why it was killed (`"killed"`, `"timeout"`, `"create failed: ..."`).
    pub end_reason: Option<String>,
    /// CPUs.
    pub cpu_count: u32,
    /// Memory in MiB.
    pub memory_mb: u64,
    /// Disk size in MiB.
    pub disk_mb: u64,
    /// User metadata.
    pub metadata: BTreeMap<String, String>,
    /// Environment variables for every process.
    pub env_vars: BTreeMap<String, String>,
    /// The secret envd accepts as `X-Access-Token`.
    pub envd_access_token: Option<String>,
    /// Whether outbound internet access is allowed.
    pub allow_internet_access: bool,
    /// Whether the timeout pauses instead of killing.
    pub auto_pause: bool,
    /// Size limit of its writable layer in MiB; `None`: no limit.
    pub writable_layer_mib: Option<u64>,
}

/// Redacts the access token and the environment's values, which may be secrets.
impl fmt::Debug for SandboxRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SandboxRecord")
            .field("id", &self.id)
            .field("owner", &self.owner)
            .field("template", &self.template)
            .field("alias", &self.alias)
            .field("state", &self.state)
            .field("created_at_ms", &self.created_at_ms)
            .field("started_at_ms", &self.started_at_ms)
            .field("end_at_ms", &self.end_at_ms)
            .field("ended_at_ms", &self.ended_at_ms)
            .field("end_reason", &self.end_reason)
            .field("cpu_count", &self.cpu_count)
            .field("memory_mb", &self.memory_mb)
            .field("disk_mb", &self.disk_mb)
            .field("metadata", &self.metadata)
            .field("env_var_names", &self.env_vars.keys().collect::<Vec<_>>())
            .field(
                "envd_access_token",
                &self.envd_access_token.as_ref().map(|_| "<redacted>"),
            )
            .field("allow_internet_access", &self.allow_internet_access)
            .field("auto_pause", &self.auto_pause)
            .field("writable_layer_mib", &self.writable_layer_mib)
            .finish()
    }
}

/// Sort order of a listing, by `(created_at_ms, id)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Order {
    /// Oldest first.
    Asc,
    /// Newest first (E2B's default).
    #[default]
    Desc,
}

/// What [`Store::list_sandboxes`] returns. All filters combine with AND.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListQuery {
    /// Only this key's sandboxes; `None` for all owners (admin use).
    pub owner: Option<i64>,
    /// Only these states; empty means every live state (creating, running, paused).
    /// Killed sandboxes appear only when asked for explicitly.
    pub states: Vec<SandboxState>,
    /// Pairs that must all be present in the metadata with exactly these values.
    pub metadata: Vec<(String, String)>,
    /// Only sandboxes whose template or alias is exactly this.
    pub template: Option<String>,
    /// Only sandboxes that started running strictly after this time (unix ms); never
    /// started ones (still creating, or killed while creating) do not match.
    pub started_after_ms: Option<i64>,
    /// Sort order.
    pub order: Order,
    /// Page size, clamped to `1..=`[`ListQuery::MAX_LIMIT`].
    pub limit: u32,
    /// [`Page::next_cursor`] of the previous page; `None` (or empty) for the first.
    pub cursor: Option<String>,
}

impl ListQuery {
    /// The largest page.
    pub const MAX_LIMIT: u32 = 1000;
    /// E2B's default page size.
    pub const DEFAULT_LIMIT: u32 = 100;
}

impl Default for ListQuery {
    fn default() -> Self {
        ListQuery {
            owner: None,
            states: Vec::new(),
            metadata: Vec::new(),
            template: None,
            started_after_ms: None,
            order: Order::Desc,
            limit: ListQuery::DEFAULT_LIMIT,
            cursor: None,
        }
    }
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// The sandboxes, in the requested order.
    pub items: Vec<SandboxRecord>,
    /// Opaque cursor for the next page; `None` when this page is the last one. The store
    /// looks one row ahead, so a result that is an exact multiple of the limit does not
    /// produce a trailing empty page.
    pub next_cursor: Option<String>,
}

/// How much a template was used by one key (for `GET /templates`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TemplateUsage {
    /// Sandboxes ever created from it (while their records are kept).
    pub count: u64,
    /// When the latest of them was created, unix ms.
    pub last_created_ms: Option<i64>,
}

/// One entry of a sandbox's event log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// When, unix ms.
    pub at_ms: i64,
    /// What: `created`, a state name for transitions, `end_at`, or a caller's kind.
    pub kind: String,
    /// Free text: the reason of a transition, the new deadline, ...
    pub detail: Option<String>,
}

const SANDBOX_SELECT: &str = "SELECT s.id, s.owner, s.template, s.alias, s.state, \
     s.created_at_ms, s.started_at_ms, s.end_at_ms, s.ended_at_ms, s.end_reason, \
     s.cpu_count, s.memory_mb, s.disk_mb, s.env_vars, s.envd_access_token, \
     s.allow_internet_access, s.auto_pause, \
     (SELECT json_group_object(m.key, m.value) FROM sandbox_metadata m \
      WHERE m.sandbox_id = s.id), s.writable_layer_mib \
     FROM sandboxes s";

fn corrupt(id: &str, what: &str, e: impl fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("sandbox {id:?}: {what}: {e}"))
}

fn record_from_row(row: &Row<'_>) -> Result<SandboxRecord, StoreError> {
    let raw_id: String = row.get(0)?;
    let id = raw_id
        .parse::<SandboxId>()
        .map_err(|e| corrupt(&raw_id, "id", e))?;
    let state = row
        .get::<_, String>(4)?
        .parse::<SandboxState>()
        .map_err(|e| corrupt(&raw_id, "state", e))?;
    let cpu_count = row.get::<_, i64>(10)?;
    let cpu_count = u32::try_from(cpu_count).map_err(|e| corrupt(&raw_id, "cpu_count", e))?;
    let memory_mb = row.get::<_, i64>(11)?;
    let memory_mb = u64::try_from(memory_mb).map_err(|e| corrupt(&raw_id, "memory_mb", e))?;
    let disk_mb = row.get::<_, i64>(12)?;
    let disk_mb = u64::try_from(disk_mb).map_err(|e| corrupt(&raw_id, "disk_mb", e))?;
    let env_vars: String = row.get(13)?;
    let env_vars = serde_json::from_str(&env_vars).map_err(|e| corrupt(&raw_id, "env_vars", e))?;
    let metadata: String = row.get(17)?;
    let metadata = serde_json::from_str(&metadata).map_err(|e| corrupt(&raw_id, "metadata", e))?;
    let writable_layer_mib = row
        .get::<_, Option<i64>>(18)?
        .map(u64::try_from)
        .transpose()
        .map_err(|e| corrupt(&raw_id, "writable_layer_mib", e))?;
    Ok(SandboxRecord {
        id,
        owner: row.get(1)?,
        template: row.get(2)?,
        alias: row.get(3)?,
        state,
        created_at_ms: row.get(5)?,
        started_at_ms: row.get(6)?,
        end_at_ms: row.get(7)?,
        ended_at_ms: row.get(8)?,
        end_reason: row.get(9)?,
        cpu_count,
        memory_mb,
        disk_mb,
        metadata,
        env_vars,
        envd_access_token: row.get(14)?,
        allow_internet_access: row.get(15)?,
        auto_pause: row.get(16)?,
        writable_layer_mib,
    })
}

fn select_one(conn: &Connection, id: &SandboxId) -> Result<Option<SandboxRecord>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!("{SANDBOX_SELECT} WHERE s.id = ?1"))?;
    let mut rows = stmt.query([id.as_str()])?;
    match rows.next()? {
        Some(row) => record_from_row(row).map(Some),
        None => Ok(None),
    }
}

fn select_many(
    conn: &Connection,
    sql: &str,
    params: &[Value],
) -> Result<Vec<SandboxRecord>, StoreError> {
    crate::select_rows(conn, sql, params, record_from_row)
}

fn insert_event(
    conn: &Connection,
    id: &SandboxId,
    at_ms: i64,
    kind: &str,
    detail: Option<&str>,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO sandbox_events (sandbox_id, at_ms, kind, detail) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![id.as_str(), at_ms, kind, detail])?;
    Ok(())
}

fn to_i64(what: &str, v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::InvalidInput(format!("{what} {v} is too large")))
}

/// The cursor of a position: base64url of `"<created_at_ms>:<id>"`.
fn encode_cursor(created_at_ms: i64, id: &SandboxId) -> String {
    URL_SAFE_NO_PAD.encode(format!("{created_at_ms}:{id}"))
}

fn decode_cursor(cursor: &str) -> Result<(i64, SandboxId), StoreError> {
    let bad = || StoreError::InvalidInput(format!("malformed pagination cursor {cursor:?}"));
    if cursor.len() > 128 {
        return Err(bad());
    }
    let bytes = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let (at, id) = text.split_once(':').ok_or_else(bad)?;
    let at: i64 = at.parse().map_err(|_| bad())?;
    let id: SandboxId = id.parse().map_err(|_| bad())?;
    Ok((at, id))
}

/// The SQL, its parameters and the clamped page size of a listing.
fn list_sql(query: &ListQuery) -> Result<(String, Vec<Value>, u32), StoreError> {
    let limit = query.limit.clamp(1, ListQuery::MAX_LIMIT);
    let cursor = match query.cursor.as_deref() {
        None | Some("") => None,
        Some(c) => Some(decode_cursor(c)?),
    };
    let mut conds: Vec<String> = Vec::new();
    let mut args: Vec<Value> = Vec::new();
    if let Some(owner) = query.owner {
        args.push(Value::Integer(owner));
        conds.push(format!("s.owner = ?{}", args.len()));
    }
    let mut states: Vec<SandboxState> = if query.states.is_empty() {
        SandboxState::ALL
            .into_iter()
            .filter(|s| s.is_live())
            .collect()
    } else {
        query.states.clone()
    };
    states.sort_by_key(|s| s.as_str());
    states.dedup();
    let mut marks = Vec::with_capacity(states.len());
    for s in &states {
        args.push(Value::Text(s.as_str().to_owned()));
        marks.push(format!("?{}", args.len()));
    }
    conds.push(format!("s.state IN ({})", marks.join(", ")));
    // Live-only listings walk the partial indexes of live rows, whatever the
    // planner (which has no statistics) would guess: their cost is then bounded by
    // the number of live sandboxes, not by the history of killed ones.
    let indexed_by = if states.contains(&SandboxState::Killed) {
        ""
    } else {
        conds.push("s.state <> 'killed'".to_owned());
        if query.owner.is_some() {
            " INDEXED BY sandboxes_live_by_owner"
        } else {
            " INDEXED BY sandboxes_live"
        }
    };
    if let Some(t) = &query.template {
        args.push(Value::Text(t.clone()));
        let n = args.len();
        conds.push(format!("(s.template = ?{n} OR s.alias = ?{n})"));
    }
    if let Some(after) = query.started_after_ms {
        args.push(Value::Integer(after));
        conds.push(format!("s.started_at_ms > ?{}", args.len()));
    }
    for (k, v) in &query.metadata {
        args.push(Value::Text(k.clone()));
        args.push(Value::Text(v.clone()));
        let n = args.len();
        conds.push(format!(
            "EXISTS (SELECT 1 FROM sandbox_metadata f WHERE f.sandbox_id = s.id \
                 AND f.key = ?{} AND f.value = ?{n})",
            n - 1
        ));
    }
    let (cmp, dir) = match query.order {
        Order::Asc => (">", "ASC"),
        Order::Desc => ("<", "DESC"),
    };
    if let Some((at, id)) = cursor {
        args.push(Value::Integer(at));
        args.push(Value::Text(id.as_str().to_owned()));
        let n = args.len();
        conds.push(format!("(s.created_at_ms, s.id) {cmp} (?{}, ?{n})", n - 1));
    }
    args.push(Value::Integer(i64::from(limit) + 1));
    let sql = format!(
        "{SANDBOX_SELECT}{indexed_by} WHERE {} ORDER BY s.created_at_ms {dir}, s.id {dir} \
             LIMIT ?{}",
        conds.join(" AND "),
        args.len()
    );
    Ok((sql, args, limit))
}

impl Store {
    /// Stores a new sandbox (with its metadata) and records a `created` event.
    ///
    /// Errors: [`StoreError::Conflict`] if the id exists; [`StoreError::InvalidInput`]
    /// if `ended_at_ms` is not set exactly when the state is killed, or a size does not
    /// fit SQLite's 64-bit signed integers.
    pub fn insert_sandbox(&self, record: &SandboxRecord) -> Result<(), StoreError> {
        let r = record;
        if (r.state == SandboxState::Killed) != r.ended_at_ms.is_some() {
            return Err(StoreError::InvalidInput(format!(
                "sandbox {}: ended_at_ms must be set exactly when the state is killed \
                 (state {}, ended_at_ms {:?})",
                r.id, r.state, r.ended_at_ms
            )));
        }
        let memory_mb = to_i64("memory_mb", r.memory_mb)?;
        let disk_mb = to_i64("disk_mb", r.disk_mb)?;
        let writable_layer_mib = r
            .writable_layer_mib
            .map(|v| to_i64("writable_layer_mib", v))
            .transpose()?;
        let env_vars = serde_json::to_string(&r.env_vars)
            .map_err(|e| StoreError::InvalidInput(format!("env_vars: {e}")))?;
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let inserted = tx
            .prepare_cached(
                "INSERT INTO sandboxes (id, owner, template, alias, state, created_at_ms, \
                 started_at_ms, end_at_ms, ended_at_ms, end_reason, cpu_count, memory_mb, \
                 disk_mb, env_vars, envd_access_token, allow_internet_access, auto_pause, \
                 writable_layer_mib) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, \
                 ?16, ?17, ?18)",
            )?
            .execute(params![
                r.id.as_str(),
                r.owner,
                r.template,
                r.alias,
                r.state.as_str(),
                r.created_at_ms,
                r.started_at_ms,
                r.end_at_ms,
                r.ended_at_ms,
                r.end_reason,
                r.cpu_count,
                memory_mb,
                disk_mb,
                env_vars,
                r.envd_access_token,
                r.allow_internet_access,
                r.auto_pause,
                writable_layer_mib,
            ]);
        match inserted {
            Ok(_) => {}
            Err(e) if is_unique_violation(&e) => {
                return Err(StoreError::Conflict(format!(
                    "sandbox {} already exists",
                    r.id
                )));
            }
            Err(e) => return Err(e.into()),
        }
        {
            let mut meta = tx.prepare_cached(
                "INSERT INTO sandbox_metadata (sandbox_id, key, value) VALUES (?1, ?2, ?3)",
            )?;
            for (k, v) in &r.metadata {
                meta.execute(params![r.id.as_str(), k, v])?;
            }
        }
        insert_event(
            &tx,
            &r.id,
            r.created_at_ms,
            "created",
            Some(r.state.as_str()),
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Moves sandbox `id` to state `to` at time `at_ms`, atomically: refuses what
    /// [`SandboxState::can_transition`] forbids, sets `started_at_ms` on the first entry
    /// into running and `ended_at_ms`/`end_reason` (= `reason`) on entry into killed,
    /// and records an event named after `to` with `reason` as its detail. Returns the
    /// updated record.
    ///
    /// Errors: [`StoreError::NotFound`], [`StoreError::InvalidTransition`].
    pub fn transition(
        &self,
        id: &SandboxId,
        to: SandboxState,
        at_ms: i64,
        reason: Option<&str>,
    ) -> Result<SandboxRecord, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let from: String = tx
            .prepare_cached("SELECT state FROM sandboxes WHERE id = ?1")?
            .query_row([id.as_str()], |r| r.get(0))
            .optional()?
            .ok_or_else(|| StoreError::NotFound(id.clone()))?;
        let from: SandboxState = from.parse().map_err(|e| corrupt(id.as_str(), "state", e))?;
        if !from.can_transition(to) {
            return Err(StoreError::InvalidTransition {
                id: id.clone(),
                from,
                to,
            });
        }
        tx.prepare_cached(
            "UPDATE sandboxes SET state = ?2, \
             started_at_ms = CASE WHEN ?2 = 'running' AND started_at_ms IS NULL \
                 THEN ?3 ELSE started_at_ms END, \
             ended_at_ms = CASE WHEN ?2 = 'killed' THEN ?3 ELSE ended_at_ms END, \
             end_reason = CASE WHEN ?2 = 'killed' THEN ?4 ELSE end_reason END \
             WHERE id = ?1",
        )?
        .execute(params![id.as_str(), to.as_str(), at_ms, reason])?;
        insert_event(&tx, id, at_ms, to.as_str(), reason)?;
        let record = select_one(&tx, id)?.ok_or_else(|| StoreError::NotFound(id.clone()))?;
        tx.commit()?;
        Ok(record)
    }

    /// Moves the timeout deadline of a live sandbox (earlier or later) and records an
    /// `end_at` event. A killed sandbox is as gone as an unknown one (E2B answers 404
    /// for both), so both give [`StoreError::NotFound`].
    pub fn set_end_at(&self, id: &SandboxId, end_at_ms: i64) -> Result<SandboxRecord, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let n = tx
            .prepare_cached(
                "UPDATE sandboxes SET end_at_ms = ?2 WHERE id = ?1 AND state <> 'killed'",
            )?
            .execute(params![id.as_str(), end_at_ms])?;
        if n == 0 {
            return Err(StoreError::NotFound(id.clone()));
        }
        insert_event(&tx, id, now_ms(), "end_at", Some(&end_at_ms.to_string()))?;
        let record = select_one(&tx, id)?.ok_or_else(|| StoreError::NotFound(id.clone()))?;
        tx.commit()?;
        Ok(record)
    }

    /// The sandbox with this id in any state, killed included (until purged).
    pub fn get_sandbox(&self, id: &SandboxId) -> Result<Option<SandboxRecord>, StoreError> {
        select_one(&self.lock(), id)
    }

    /// Every sandbox that is not killed, soonest deadline first: for the start-up
    /// reconcile and the timeout scheduler.
    pub fn live_sandboxes(&self) -> Result<Vec<SandboxRecord>, StoreError> {
        select_many(
            &self.lock(),
            &format!("{SANDBOX_SELECT} WHERE s.state <> 'killed' ORDER BY s.end_at_ms, s.id"),
            &[],
        )
    }

    /// How often `owner` created sandboxes from `template`, killed ones included.
    pub fn template_usage(&self, owner: i64, template: &str) -> Result<TemplateUsage, StoreError> {
        let conn = self.lock();
        let (count, last): (i64, Option<i64>) = conn.query_row(
            "SELECT count(*), max(created_at_ms) FROM sandboxes WHERE owner = ?1 AND template = ?2",
            rusqlite::params![owner, template],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )?;
        Ok(TemplateUsage {
            count: u64::try_from(count).unwrap_or(0),
            last_created_ms: last,
        })
    }

    /// One page of the sandboxes matching `query`, with keyset pagination on
    /// `(created_at_ms, id)`: a cursor names the last row seen, so rows inserted or
    /// killed meanwhile neither shift nor repeat the rest of the walk.
    ///
    /// Errors: [`StoreError::InvalidInput`] for a cursor this store did not make.
    pub fn list_sandboxes(&self, query: &ListQuery) -> Result<Page, StoreError> {
        let (sql, args, limit) = list_sql(query)?;
        let mut items = select_many(&self.lock(), &sql, &args)?;
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let next_cursor = if items.len() > limit {
            items.truncate(limit);
            items
                .last()
                .map(|last| encode_cursor(last.created_at_ms, &last.id))
        } else {
            None
        };
        Ok(Page { items, next_cursor })
    }

    /// Deletes killed sandboxes that ended before `before_ms`, with their metadata and
    /// events; returns how many.
    pub fn purge_killed(&self, before_ms: i64) -> Result<usize, StoreError> {
        let conn = self.lock();
        let n = conn
            .prepare_cached("DELETE FROM sandboxes WHERE state = 'killed' AND ended_at_ms < ?1")?
            .execute([before_ms])?;
        Ok(n)
    }

    /// The event log of a sandbox, oldest first.
    ///
    /// Errors: [`StoreError::NotFound`] if there is no such sandbox (any more).
    pub fn events(&self, id: &SandboxId) -> Result<Vec<Event>, StoreError> {
        let conn = self.lock();
        let exists = conn
            .prepare_cached("SELECT 1 FROM sandboxes WHERE id = ?1")?
            .exists([id.as_str()])?;
        if !exists {
            return Err(StoreError::NotFound(id.clone()));
        }
        let mut stmt = conn.prepare_cached(
            "SELECT at_ms, kind, detail FROM sandbox_events WHERE sandbox_id = ?1 ORDER BY seq",
        )?;
        let events = stmt
            .query_map([id.as_str()], |r| {
                Ok(Event {
                    at_ms: r.get(0)?,
                    kind: r.get(1)?,
                    detail: r.get(2)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(events)
    }

    /// Appends an event to a sandbox's log (killed ones included).
    ///
    /// Errors: [`StoreError::NotFound`] if there is no such sandbox.
    pub fn record_event(
        &self,
        id: &SandboxId,
        kind: &str,
        detail: Option<&str>,
        at_ms: i64,
    ) -> Result<(), StoreError> {
        let conn = self.lock();
        let n = conn
            .prepare_cached(
                "INSERT INTO sandbox_events (sandbox_id, at_ms, kind, detail) \
                 SELECT ?1, ?2, ?3, ?4 WHERE EXISTS (SELECT 1 FROM sandboxes WHERE id = ?1)",
            )?
            .execute(params![id.as_str(), at_ms, kind, detail])?;
        if n == 0 {
            return Err(StoreError::NotFound(id.clone()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cubicle_core::ErrorKind;
    use std::collections::HashSet;
    use std::time::Instant;
    use SandboxState::*;

    fn sid(s: &str) -> SandboxId {
        s.parse().unwrap()
    }

    fn rec(id: &str, owner: i64, created_at_ms: i64) -> SandboxRecord {
        SandboxRecord {
            id: sid(id),
            owner,
            template: "base".to_owned(),
            alias: None,
            state: Creating,
            created_at_ms,
            started_at_ms: None,
            end_at_ms: created_at_ms + 300_000,
            ended_at_ms: None,
            end_reason: None,
            cpu_count: 2,
            memory_mb: 512,
            disk_mb: 2048,
            metadata: BTreeMap::new(),
            env_vars: BTreeMap::new(),
            envd_access_token: None,
            allow_internet_access: true,
            auto_pause: false,
            writable_layer_mib: None,
        }
    }

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn ids(items: &[SandboxRecord]) -> Vec<String> {
        items.iter().map(|r| r.id.to_string()).collect()
    }

    fn list(store: &Store, q: ListQuery) -> Vec<String> {
        let page = store.list_sandboxes(&q).unwrap();
        assert_eq!(page.next_cursor, None, "test lists fit one page");
        ids(&page.items)
    }

    #[test]
    fn template_usage_counts_per_owner_including_killed() {
        let store = Store::open_in_memory().unwrap();
        assert_eq!(
            store.template_usage(1, "base").unwrap(),
            TemplateUsage::default()
        );
        for (id, owner, at) in [("u1", 1, 100), ("u2", 1, 300), ("u3", 2, 500)] {
            let mut r = rec(id, owner, at);
            r.template = "base".into();
            store.insert_sandbox(&r).unwrap();
        }
        store
            .transition(&sid("u1"), SandboxState::Killed, 400, None)
            .unwrap();
        let usage = store.template_usage(1, "base").unwrap();
        assert_eq!((usage.count, usage.last_created_ms), (2, Some(300)));
        assert_eq!(store.template_usage(2, "base").unwrap().count, 1);
        assert_eq!(store.template_usage(1, "other").unwrap().count, 0);
    }

    #[test]
    fn insert_get_round_trip() {
        let store = Store::open_in_memory().unwrap();
        let mut r = rec("full1", 7, 1_000);
        r.alias = Some("code-interpreter-v1".to_owned());
        r.template = "tpl123".to_owned();
        r.metadata = map(&[("user", "abc"), ("ключ.\"x'", "значение ✓"), ("", "")]);
        r.env_vars = map(&[("FOO", "bar"), ("EMPTY", ""), ("NUL", "a\0b")]);
        r.envd_access_token = Some("secret-token".to_owned());
        r.memory_mb = u64::from(u32::MAX) * 4;
        r.cpu_count = u32::MAX;
        r.auto_pause = true;
        r.allow_internet_access = false;
        r.writable_layer_mib = Some(64);
        store.insert_sandbox(&r).unwrap();
        assert_eq!(store.get_sandbox(&r.id).unwrap(), Some(r.clone()));
        assert_eq!(store.get_sandbox(&sid("nope")).unwrap(), None);

        let dbg = format!("{r:?}");
        assert!(
            !dbg.contains("secret-token") && !dbg.contains("bar"),
            "{dbg}"
        );

        let err = store.insert_sandbox(&rec("full1", 8, 5)).unwrap_err();
        assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
        assert_eq!(err.to_string(), "sandbox full1 already exists");
        assert_eq!(store.get_sandbox(&r.id).unwrap().unwrap().owner, 7);

        let events = store.events(&r.id).unwrap();
        assert_eq!(
            events,
            [Event {
                at_ms: 1_000,
                kind: "created".to_owned(),
                detail: Some("creating".to_owned())
            }]
        );
    }

    #[test]
    fn insert_validates() {
        let store = Store::open_in_memory().unwrap();
        let mut killed = rec("k", 1, 1);
        killed.state = Killed;
        let err = store.insert_sandbox(&killed).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        killed.ended_at_ms = Some(2);
        store.insert_sandbox(&killed).unwrap();
        let mut ended_live = rec("l", 1, 1);
        ended_live.ended_at_ms = Some(2);
        assert_eq!(
            store.insert_sandbox(&ended_live).unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
        let mut huge = rec("h", 1, 1);
        huge.disk_mb = u64::MAX;
        assert_eq!(
            store.insert_sandbox(&huge).unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
        assert_eq!(store.get_sandbox(&sid("h")).unwrap(), None);
    }

    /// Brings a fresh sandbox into `state` through legal transitions at times 10, 20.
    fn drive(store: &Store, id: &SandboxId, state: SandboxState) {
        let path: &[SandboxState] = match state {
            Creating => &[],
            Running => &[Running],
            Paused => &[Running, Paused],
            Killed => &[Killed],
        };
        for (i, s) in path.iter().enumerate() {
            let at = 10 * (i as i64 + 1);
            store.transition(id, *s, at, Some("setup")).unwrap();
        }
    }

    #[test]
    fn every_transition_pair() {
        let store = Store::open_in_memory().unwrap();
        let mut n = 0;
        for from in SandboxState::ALL {
            for to in SandboxState::ALL {
                n += 1;
                let id = sid(&format!("t{n}"));
                store.insert_sandbox(&rec(id.as_str(), 1, 1)).unwrap();
                drive(&store, &id, from);
                let before = store.get_sandbox(&id).unwrap().unwrap();
                let events_before = store.events(&id).unwrap().len();
                let result = store.transition(&id, to, 100, Some("why"));
                if from.can_transition(to) {
                    let after = result.unwrap();
                    assert_eq!(after.state, to);
                    assert_eq!(store.get_sandbox(&id).unwrap().unwrap(), after);
                    let events = store.events(&id).unwrap();
                    assert_eq!(events.len(), events_before + 1);
                    let last = events.last().unwrap();
                    assert_eq!(
                        (last.at_ms, last.kind.as_str(), last.detail.as_deref()),
                        (100, to.as_str(), Some("why"))
                    );
                    let expect_started = match (from, to) {
                        (Creating, Running) => Some(100),
                        (Creating, _) => None,
                        _ => Some(10),
                    };
                    assert_eq!(after.started_at_ms, expect_started, "{from}->{to}");
                    if to == Killed {
                        assert_eq!(after.ended_at_ms, Some(100));
                        assert_eq!(after.end_reason.as_deref(), Some("why"));
                    } else {
                        assert_eq!((after.ended_at_ms, after.end_reason), (None, None));
                    }
                } else {
                    match result {
                        Err(StoreError::InvalidTransition {
                            id: eid,
                            from: f,
                            to: t,
                        }) => assert_eq!((eid, f, t), (id.clone(), from, to)),
                        other => panic!("{from}->{to}: expected refusal, got {other:?}"),
                    }
                    assert_eq!(store.get_sandbox(&id).unwrap().unwrap(), before);
                    assert_eq!(store.events(&id).unwrap().len(), events_before);
                }
            }
        }
        assert_eq!(n, 16);
    }

    #[test]
    fn lifecycle_timestamps_and_events() {
        let store = Store::open_in_memory().unwrap();
        let id = sid("life");
        store.insert_sandbox(&rec("life", 1, 5)).unwrap();
        store.transition(&id, Running, 10, None).unwrap();
        store.transition(&id, Paused, 20, Some("pause")).unwrap();
        let r = store.transition(&id, Running, 30, Some("resume")).unwrap();
        assert_eq!(r.started_at_ms, Some(10), "first start is kept");
        store.record_event(&id, "oom", Some("pid 7"), 35).unwrap();
        let r = store.set_end_at(&id, 99_000).unwrap();
        assert_eq!(r.end_at_ms, 99_000);
        let r = store.transition(&id, Killed, 40, Some("timeout")).unwrap();
        assert_eq!(
            (r.ended_at_ms, r.end_reason.as_deref()),
            (Some(40), Some("timeout"))
        );
        let kinds: Vec<_> = store
            .events(&id)
            .unwrap()
            .into_iter()
            .map(|e| (e.kind, e.detail))
            .collect();
        let s = |x: &str| Some(x.to_owned());
        assert_eq!(
            kinds,
            [
                ("created".to_owned(), s("creating")),
                ("running".to_owned(), None),
                ("paused".to_owned(), s("pause")),
                ("running".to_owned(), s("resume")),
                ("oom".to_owned(), s("pid 7")),
                ("end_at".to_owned(), s("99000")),
                ("killed".to_owned(), s("timeout")),
            ]
        );
        // Killed: still readable, no longer live, deadline frozen.
        assert!(store.get_sandbox(&id).unwrap().is_some());
        assert!(matches!(
            store.set_end_at(&id, 1).unwrap_err(),
            StoreError::NotFound(_)
        ));
        store.record_event(&id, "cleanup", None, 50).unwrap();

        let ghost = sid("ghost");
        for err in [
            store.transition(&ghost, Running, 1, None).unwrap_err(),
            store.set_end_at(&ghost, 1).unwrap_err(),
            store.events(&ghost).unwrap_err(),
            store.record_event(&ghost, "x", None, 1).unwrap_err(),
        ] {
            assert!(
                matches!(&err, StoreError::NotFound(i) if *i == ghost),
                "{err:?}"
            );
        }
    }

    #[test]
    fn live_sandboxes_and_purge() {
        let store = Store::open_in_memory().unwrap();
        for i in 0..6 {
            let mut r = rec(&format!("p{i}"), 1, i);
            r.end_at_ms = 1_000 - i;
            r.metadata = map(&[("n", "v")]);
            store.insert_sandbox(&r).unwrap();
        }
        store.transition(&sid("p1"), Killed, 100, None).unwrap();
        store.transition(&sid("p2"), Killed, 200, None).unwrap();
        store.transition(&sid("p3"), Killed, 300, None).unwrap();
        assert_eq!(ids(&store.live_sandboxes().unwrap()), ["p5", "p4", "p0"]);

        assert_eq!(store.purge_killed(200).unwrap(), 1);
        assert_eq!(store.get_sandbox(&sid("p1")).unwrap(), None);
        assert_eq!(store.purge_killed(1_000).unwrap(), 2);
        assert_eq!(store.purge_killed(1_000).unwrap(), 0);
        assert_eq!(ids(&store.live_sandboxes().unwrap()), ["p5", "p4", "p0"]);
        let conn = store.lock();
        let count = |sql: &str| -> i64 { conn.query_row(sql, [], |r| r.get(0)).unwrap() };
        assert_eq!(count("SELECT count(*) FROM sandbox_metadata"), 3);
        assert_eq!(
            count("SELECT count(DISTINCT sandbox_id) FROM sandbox_events"),
            3
        );
    }

    #[test]
    fn list_filters() {
        let store = Store::open_in_memory().unwrap();
        let weird = [
            ("dotted.key", "v1"),
            ("quote\"d", "it's"),
            ("single'q", "x\"y"),
            ("with space", "a b"),
            ("ünï©ødé 🚀", "値"),
            ("%3D&=", "a=b&c"),
        ];
        // owner 1: a (running, weird metadata), b (paused, template alias), c (killed),
        // d (creating); owner 2: e (running, same metadata as a).
        let mut a = rec("a", 1, 1);
        a.metadata = map(&weird);
        let mut b = rec("b", 1, 2);
        b.template = "tplid".to_owned();
        b.alias = Some("my-alias".to_owned());
        b.metadata = map(&[("dotted.key", "v1")]);
        let c = rec("c", 1, 3);
        let d = rec("d", 1, 4);
        let mut e = rec("e", 2, 5);
        e.metadata = map(&weird);
        for r in [&a, &b, &c, &d, &e] {
            store.insert_sandbox(r).unwrap();
        }
        store.transition(&sid("a"), Running, 100, None).unwrap();
        store.transition(&sid("b"), Running, 200, None).unwrap();
        store.transition(&sid("b"), Paused, 250, None).unwrap();
        store.transition(&sid("c"), Running, 300, None).unwrap();
        store.transition(&sid("c"), Killed, 350, None).unwrap();
        store.transition(&sid("e"), Running, 500, None).unwrap();

        let q = |owner: Option<i64>| ListQuery {
            owner,
            ..ListQuery::default()
        };
        // Owner isolation; default states exclude killed; newest first.
        assert_eq!(list(&store, q(Some(1))), ["d", "b", "a"]);
        assert_eq!(list(&store, q(Some(2))), ["e"]);
        assert!(list(&store, q(Some(3))).is_empty());
        assert_eq!(list(&store, q(None)), ["e", "d", "b", "a"]);
        // Explicit states.
        let st = |states: Vec<SandboxState>| ListQuery {
            states,
            ..q(Some(1))
        };
        assert_eq!(list(&store, st(vec![Running])), ["a"]);
        assert_eq!(list(&store, st(vec![Running, Paused, Running])), ["b", "a"]);
        assert_eq!(list(&store, st(vec![Killed])), ["c"]);
        assert_eq!(
            list(&store, st(SandboxState::ALL.to_vec())),
            ["d", "c", "b", "a"]
        );
        // Metadata: every pair must match exactly.
        let md = |pairs: &[(&str, &str)]| ListQuery {
            metadata: pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..q(Some(1))
        };
        assert_eq!(list(&store, md(&weird)), ["a"]);
        assert_eq!(list(&store, md(&[("dotted.key", "v1")])), ["b", "a"]);
        for (k, v) in weird {
            let expect: &[&str] = if k == "dotted.key" {
                &["b", "a"]
            } else {
                &["a"]
            };
            assert_eq!(list(&store, md(&[(k, v)])), expect, "{k:?}");
            assert!(list(&store, md(&[(k, "nope")])).is_empty(), "{k:?}");
            assert!(
                list(&store, md(&[(&format!("{k} "), v)])).is_empty(),
                "{k:?}"
            );
        }
        assert!(list(&store, md(&[("dotted", "v1")])).is_empty());
        assert!(list(&store, md(&[("dotted.key", "V1")])).is_empty());
        assert!(list(&store, md(&[("dotted.key", "v1"), ("with space", "x")])).is_empty());
        assert!(list(&store, md(&[("dotted.key", "v1"), ("dotted.key", "v2")])).is_empty());
        // Template matches the template or the alias.
        let tp = |t: &str| ListQuery {
            template: Some(t.to_owned()),
            ..q(Some(1))
        };
        assert_eq!(list(&store, tp("my-alias")), ["b"]);
        assert_eq!(list(&store, tp("tplid")), ["b"]);
        assert_eq!(list(&store, tp("base")), ["d", "a"]);
        assert!(list(&store, tp("my")).is_empty());
        // Started after (strictly); never started ones do not match.
        let sa = |t: i64| ListQuery {
            started_after_ms: Some(t),
            ..q(None)
        };
        assert_eq!(list(&store, sa(0)), ["e", "b", "a"]);
        assert_eq!(list(&store, sa(100)), ["e", "b"]);
        assert_eq!(list(&store, sa(500)), Vec::<String>::new());
        // Ascending.
        let asc = ListQuery {
            order: Order::Asc,
            ..q(Some(1))
        };
        assert_eq!(list(&store, asc), ["a", "b", "d"]);
    }

    /// Walks every page; returns the ids in the order seen. `between` runs after each
    /// page.
    fn walk(
        store: &Store,
        order: Order,
        limit: u32,
        mut between: impl FnMut(usize),
    ) -> Vec<String> {
        let mut seen = Vec::new();
        let mut cursor = None;
        for page_no in 0.. {
            let page = store
                .list_sandboxes(&ListQuery {
                    owner: Some(1),
                    order,
                    limit,
                    cursor: cursor.take(),
                    ..ListQuery::default()
                })
                .unwrap();
            assert!(page.items.len() <= limit as usize);
            assert!(!page.items.is_empty(), "no empty pages");
            seen.extend(ids(&page.items));
            between(page_no);
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
            assert!(page_no < 1000, "runaway pagination");
        }
        seen
    }

    #[test]
    fn pagination_walks_are_complete_and_stable() {
        let store = Store::open_in_memory().unwrap();
        // 23 records with created_at ties (3 per ms) so the id breaks them, plus noise
        // from another owner.
        let mut base: Vec<(i64, String)> = Vec::new();
        for i in 0..23 {
            let id = format!("s{:02}x{}", (i * 7) % 23, i);
            let at = 1_000 + i / 3;
            store.insert_sandbox(&rec(&id, 1, at)).unwrap();
            base.push((at, id));
            store
                .insert_sandbox(&rec(&format!("other{i}"), 2, at))
                .unwrap();
        }
        base.sort();
        let asc: Vec<String> = base.iter().map(|(_, id)| id.clone()).collect();
        let desc: Vec<String> = asc.iter().rev().cloned().collect();

        for limit in 1..=7 {
            assert_eq!(walk(&store, Order::Asc, limit, |_| {}), asc, "asc {limit}");
            assert_eq!(
                walk(&store, Order::Desc, limit, |_| {}),
                desc,
                "desc {limit}"
            );
        }
        // Exactly one full page: no cursor, no trailing empty page.
        let page = store
            .list_sandboxes(&ListQuery {
                owner: Some(1),
                limit: 23,
                ..ListQuery::default()
            })
            .unwrap();
        assert_eq!((page.items.len(), page.next_cursor), (23, None));

        // Inserting mid-walk (newer, older and tied timestamps) during the first pages:
        // the original records are each seen exactly once, in order, and nothing is
        // repeated.
        let mut extra = 0;
        for order in [Order::Asc, Order::Desc] {
            for limit in 1..=7 {
                let seen = walk(&store, order, limit, |page_no| {
                    if page_no >= 3 {
                        return;
                    }
                    for at in [999, 1_003, 1_004, 5_000] {
                        extra += 1;
                        let id = format!("new{extra}p{page_no}");
                        store.insert_sandbox(&rec(&id, 1, at)).unwrap();
                    }
                });
                let unique: HashSet<_> = seen.iter().collect();
                assert_eq!(unique.len(), seen.len(), "duplicates {order:?} {limit}");
                let originals: Vec<_> =
                    seen.iter().filter(|id| asc.contains(id)).cloned().collect();
                let expect = if order == Order::Asc { &asc } else { &desc };
                assert_eq!(&originals, expect, "{order:?} {limit}");
                // The whole walk is strictly monotonic in (created_at, id).
                let keys: Vec<_> = seen
                    .iter()
                    .map(|id| {
                        let r = store.get_sandbox(&sid(id)).unwrap().unwrap();
                        (r.created_at_ms, r.id)
                    })
                    .collect();
                for w in keys.windows(2) {
                    match order {
                        Order::Asc => assert!(w[0] < w[1]),
                        Order::Desc => assert!(w[0] > w[1]),
                    }
                }
            }
        }
    }

    #[test]
    fn limits_are_clamped() {
        let store = Store::open_in_memory().unwrap();
        for i in 0..3 {
            store.insert_sandbox(&rec(&format!("c{i}"), 1, i)).unwrap();
        }
        let q = |limit| ListQuery {
            limit,
            ..ListQuery::default()
        };
        let zero = store.list_sandboxes(&q(0)).unwrap();
        assert_eq!(zero.items.len(), 1);
        assert!(zero.next_cursor.is_some());
        assert_eq!(store.list_sandboxes(&q(u32::MAX)).unwrap().items.len(), 3);
    }

    #[test]
    fn malformed_cursors_are_invalid_input() {
        let store = Store::open_in_memory().unwrap();
        store.insert_sandbox(&rec("m1", 1, 1)).unwrap();
        let enc = |s: &[u8]| URL_SAFE_NO_PAD.encode(s);
        let long = "A".repeat(10_000);
        let bad = [
            "!!!".to_owned(),
            "====".to_owned(),
            "a".to_owned(),
            enc(b"abc"),
            enc(b"12:"),
            enc(b":abc"),
            enc(b"12:ABC"),
            enc(b"x:abc"),
            enc(b"99999999999999999999:abc"),
            enc(b"12:abc:def"),
            enc(&[0xff, 0xfe, b':', b'a']),
            long,
        ];
        for c in bad {
            let err = store
                .list_sandboxes(&ListQuery {
                    cursor: Some(c.clone()),
                    ..ListQuery::default()
                })
                .unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{c:?}: {err:?}");
        }
        // Round trip, and a cursor naming a vanished row still works.
        let c = encode_cursor(-5, &sid("gone"));
        assert_eq!(decode_cursor(&c).unwrap(), (-5, sid("gone")));
        let page = store
            .list_sandboxes(&ListQuery {
                cursor: Some(encode_cursor(2, &sid("zzz"))),
                ..ListQuery::default()
            })
            .unwrap();
        assert_eq!(ids(&page.items), ["m1"]);
        let empty = store
            .list_sandboxes(&ListQuery {
                cursor: Some(String::new()),
                ..ListQuery::default()
            })
            .unwrap();
        assert_eq!(ids(&empty.items), ["m1"]);
    }

    #[test]
    fn persists_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let mut r = rec("persist", 3, 42);
        r.metadata = map(&[("k", "v")]);
        r.env_vars = map(&[("A", "1")]);
        {
            let store = Store::open(&path).unwrap();
            store.insert_sandbox(&r).unwrap();
            store.transition(&r.id, Running, 50, None).unwrap();
        }
        let store = Store::open(&path).unwrap();
        let got = store.get_sandbox(&r.id).unwrap().unwrap();
        assert_eq!(got.state, Running);
        assert_eq!(got.started_at_ms, Some(50));
        assert_eq!((got.metadata, got.env_vars), (r.metadata, r.env_vars));
        assert_eq!(store.events(&r.id).unwrap().len(), 2);
        assert_eq!(ids(&store.live_sandboxes().unwrap()), ["persist"]);
    }

    #[test]
    fn concurrent_threads() {
        const THREADS: usize = 8;
        const PER_THREAD: usize = 200;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("conc.db")).unwrap();
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for i in 0..PER_THREAD {
                        let id = sid(&format!("t{t}n{i}"));
                        let mut r = rec(id.as_str(), t as i64, i as i64);
                        r.metadata = map(&[("thread", &t.to_string())]);
                        store.insert_sandbox(&r).unwrap();
                        store.transition(&id, Running, i as i64, None).unwrap();
                        if i % 2 == 0 {
                            store.transition(&id, Killed, i as i64 + 1, None).unwrap();
                        }
                        if i % 50 == 0 {
                            store
                                .list_sandboxes(&ListQuery {
                                    owner: Some(t as i64),
                                    ..ListQuery::default()
                                })
                                .unwrap();
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(
            store.live_sandboxes().unwrap().len(),
            THREADS * PER_THREAD / 2
        );
        let page = store
            .list_sandboxes(&ListQuery {
                owner: Some(3),
                metadata: vec![("thread".to_owned(), "3".to_owned())],
                limit: 1000,
                ..ListQuery::default()
            })
            .unwrap();
        assert_eq!(page.items.len(), PER_THREAD / 2);
    }

    #[test]
    fn list_uses_indexes() {
        let store = Store::open_in_memory().unwrap();
        let conn = store.lock();
        let plan = |q: &ListQuery| -> String {
            let (sql, args, _) = list_sql(q).unwrap();
            let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let rows = stmt
                .query_map(rusqlite::params_from_iter(&args), |r| r.get::<_, String>(3))
                .unwrap()
                .collect::<rusqlite::Result<Vec<_>>>()
                .unwrap();
            rows.join("\n")
        };
        let cursor = Some(encode_cursor(5, &sid("x")));
        let full = ListQuery {
            owner: Some(1),
            metadata: vec![("k".to_owned(), "v".to_owned())],
            template: Some("base".to_owned()),
            started_after_ms: Some(3),
            cursor: cursor.clone(),
            ..ListQuery::default()
        };
        let cases = [
            (full.clone(), "sandboxes_live_by_owner"),
            (
                ListQuery {
                    order: Order::Asc,
                    states: vec![Running],
                    ..full.clone()
                },
                "sandboxes_live_by_owner",
            ),
            (
                ListQuery {
                    owner: None,
                    ..full.clone()
                },
                "sandboxes_live",
            ),
            (
                ListQuery {
                    states: vec![Killed, Running],
                    ..full.clone()
                },
                "sandboxes_by_owner",
            ),
        ];
        for (q, index) in cases {
            let p = plan(&q);
            assert!(p.contains(&format!("INDEX {index} ")), "{q:?}:\n{p}");
            assert!(!p.contains("TEMP B-TREE"), "{q:?}:\n{p}");
            assert!(p.contains("sandbox_metadata_by_pair"), "{q:?}:\n{p}");
        }
        let mut stmt = conn
            .prepare(
                "EXPLAIN QUERY PLAN DELETE FROM sandboxes \
                 WHERE state = 'killed' AND ended_at_ms < 5",
            )
            .unwrap();
        let purge: String = stmt.query_row([], |r| r.get(3)).unwrap();
        assert!(purge.contains("sandboxes_killed"), "{purge}");
    }

    #[test]
    fn measure_insert_and_transition() {
        const N: usize = 400;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("bench.db")).unwrap();
        let mut insert = Vec::with_capacity(N);
        let mut transition = Vec::with_capacity(N);
        let mut get = Vec::with_capacity(N);
        let mut list_ns = Vec::with_capacity(N);
        for i in 0..N {
            let mut r = rec(&format!("bench{i}"), 1, i as i64);
            r.metadata = map(&[("user", "u1"), ("job", &i.to_string())]);
            r.env_vars = map(&[("FOO", "bar")]);
            let t0 = Instant::now();
            store.insert_sandbox(&r).unwrap();
            let t1 = Instant::now();
            store.transition(&r.id, Running, i as i64, None).unwrap();
            let t2 = Instant::now();
            store.get_sandbox(&r.id).unwrap().unwrap();
            let t3 = Instant::now();
            store
                .list_sandboxes(&ListQuery {
                    owner: Some(1),
                    metadata: vec![("user".to_owned(), "u1".to_owned())],
                    limit: 10,
                    ..ListQuery::default()
                })
                .unwrap();
            let t4 = Instant::now();
            insert.push(t1 - t0);
            transition.push(t2 - t1);
            get.push(t3 - t2);
            list_ns.push(t4 - t3);
        }
        let report = |name: &str, v: &mut Vec<std::time::Duration>| {
            v.sort();
            println!(
                "store {name:<26} median {:>7.1?}  p90 {:>7.1?}  max {:>7.1?}",
                v[v.len() / 2],
                v[v.len() * 9 / 10],
                v[v.len() - 1]
            );
        };
        println!("store micro-measurement, file db in WAL mode, {N} sandboxes:");
        report("insert_sandbox", &mut insert);
        report("transition", &mut transition);
        report("get_sandbox", &mut get);
        report("list_sandboxes (10 of N)", &mut list_ns);
    }
}
