-- Cubicle store, schema version 2: snapshots of running sandboxes.
--
-- Never edit a migration that has shipped: add the next numbered file instead.

-- One row per snapshot. `key` is Cubicle's own id (also the name of the checkpoint's
-- directory, `<data dir>/snapshots/<key>`); `id` is what E2B calls the snapshot ID
-- (`<name>:default`, or `<key>:default` without a name), unique per owner. A row is
-- written as `creating` before the runtime writes the checkpoint and becomes `ready`
-- when it is complete, so a daemon that stops in between leaves a row that the start-up
-- reconcile removes together with its directory. Like sandboxes.owner, owner is the
-- api_keys.id without a foreign key. Snapshots outlive their source sandbox, so
-- sandbox_id is not a foreign key either.
CREATE TABLE snapshots (
    key              TEXT    NOT NULL PRIMARY KEY,
    id               TEXT    NOT NULL,
    owner            INTEGER NOT NULL,
    sandbox_id       TEXT    NOT NULL,
    name             TEXT,
    state            TEXT    NOT NULL CHECK (state IN ('creating', 'ready')),
    created_at_ms    INTEGER NOT NULL,
    size_bytes       INTEGER NOT NULL CHECK (size_bytes >= 0),
    template         TEXT    NOT NULL,
    layers           TEXT    NOT NULL, -- JSON array of paths, top first
    uid_shift        INTEGER NOT NULL CHECK (uid_shift >= 0),
    env_vars         TEXT    NOT NULL, -- JSON object of string -> string
    default_user     TEXT    NOT NULL,
    code_interpreter INTEGER NOT NULL CHECK (code_interpreter IN (0, 1)),
    cpu_count        INTEGER NOT NULL CHECK (cpu_count >= 0),
    memory_mb        INTEGER NOT NULL CHECK (memory_mb >= 0),
    metadata         TEXT    NOT NULL, -- JSON object of string -> string
    UNIQUE (owner, id)
) STRICT;

-- Keyset pagination of one owner's snapshots, newest first.
CREATE INDEX snapshots_by_owner ON snapshots (owner, created_at_ms, key);
-- Listing by source sandbox, rollback checks.
CREATE INDEX snapshots_by_sandbox ON snapshots (sandbox_id);
