-- Cubicle store, schema version 1.
--
-- Applied by `cubicle-store` inside one transaction together with
-- `PRAGMA user_version = 1`. Never edit a migration that has shipped: add the next
-- numbered file instead.

-- API keys (E2B's X-API-KEY). Only the SHA-256 of the full key is stored.
-- AUTOINCREMENT: ids are never reused, so a new key can never inherit the sandboxes
-- (sandboxes.owner) of a deleted one.
CREATE TABLE api_keys (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    name            TEXT    NOT NULL UNIQUE,
    key_hash        BLOB    NOT NULL UNIQUE CHECK (length(key_hash) = 32),
    prefix          TEXT    NOT NULL,
    created_at_ms   INTEGER NOT NULL,
    last_used_at_ms INTEGER
) STRICT;

-- One row per sandbox ever created (killed ones stay until purged).
-- owner is the api_keys.id of the creating key, deliberately without a foreign key:
-- keys must stay deletable, and the sandboxes of a deleted key keep their owner id
-- (which no other key can ever get, see AUTOINCREMENT above).
CREATE TABLE sandboxes (
    id                    TEXT    NOT NULL PRIMARY KEY,
    owner                 INTEGER NOT NULL,
    template              TEXT    NOT NULL,
    alias                 TEXT,
    state                 TEXT    NOT NULL
        CHECK (state IN ('creating', 'running', 'paused', 'killed')),
    created_at_ms         INTEGER NOT NULL,
    started_at_ms         INTEGER,
    end_at_ms             INTEGER NOT NULL,
    ended_at_ms           INTEGER,
    end_reason            TEXT,
    cpu_count             INTEGER NOT NULL CHECK (cpu_count >= 0),
    memory_mb             INTEGER NOT NULL CHECK (memory_mb >= 0),
    disk_mb               INTEGER NOT NULL CHECK (disk_mb >= 0),
    env_vars              TEXT    NOT NULL, -- JSON object of string -> string
    envd_access_token     TEXT,
    allow_internet_access INTEGER NOT NULL CHECK (allow_internet_access IN (0, 1)),
    auto_pause            INTEGER NOT NULL CHECK (auto_pause IN (0, 1)),
    CHECK ((state = 'killed') = (ended_at_ms IS NOT NULL))
) STRICT;

-- Keyset pagination. Killed rows pile up until purged while live ones are bounded by
-- the machine, so listings of live sandboxes (the common case; the query then says
-- `state <> 'killed'`) walk partial indexes holding live rows only.
CREATE INDEX sandboxes_live_by_owner ON sandboxes (owner, created_at_ms, id)
    WHERE state <> 'killed';
CREATE INDEX sandboxes_live ON sandboxes (created_at_ms, id) WHERE state <> 'killed';
-- Listings that ask for killed sandboxes too.
CREATE INDEX sandboxes_by_owner ON sandboxes (owner, created_at_ms, id);
-- purge_killed.
CREATE INDEX sandboxes_killed ON sandboxes (ended_at_ms) WHERE state = 'killed';

-- User metadata, one row per pair, so that filters are exact comparisons of bound
-- parameters (any key: dots, quotes, unicode) served by an index.
CREATE TABLE sandbox_metadata (
    sandbox_id TEXT NOT NULL REFERENCES sandboxes (id) ON DELETE CASCADE,
    key        TEXT NOT NULL,
    value      TEXT NOT NULL,
    PRIMARY KEY (sandbox_id, key)
) STRICT, WITHOUT ROWID;

CREATE INDEX sandbox_metadata_by_pair ON sandbox_metadata (key, value, sandbox_id);

-- Lifecycle log: transitions are recorded automatically, others on request.
CREATE TABLE sandbox_events (
    seq        INTEGER PRIMARY KEY,
    sandbox_id TEXT    NOT NULL REFERENCES sandboxes (id) ON DELETE CASCADE,
    at_ms      INTEGER NOT NULL,
    kind       TEXT    NOT NULL,
    detail     TEXT
) STRICT;

CREATE INDEX sandbox_events_by_sandbox ON sandbox_events (sandbox_id, seq);
