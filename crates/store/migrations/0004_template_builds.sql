-- Cubicle store, schema version 3: template build jobs.
--
-- Never edit a migration that has shipped: add the next numbered file instead.

-- One row per build job (`cubicle tpl create-from-image`, a rebuild). `id` is the
-- build ID (UUID-shaped, as in E2B). A job is written `queued` when it is submitted and
-- goes through `pulling`, `unpacking`, `building`, `snapshotting` to `ready` or
-- `failed`; a daemon that stops in between leaves an unfinished row, which the start-up
-- reconcile marks failed. `request` is what was asked for as JSON, without registry
-- credentials (never stored); a rebuild repeats it. `logs` keeps the last lines of the
-- build's output (JSON array of {"at_ms", "message"}); `log_count` counts every line
-- ever logged, so a line's absolute number is stable for `logsOffset`. Like
-- sandboxes.owner, owner is the api_keys.id without a foreign key.
CREATE TABLE template_builds (
    id             TEXT    NOT NULL PRIMARY KEY,
    template       TEXT    NOT NULL,
    owner          INTEGER NOT NULL,
    source         TEXT    NOT NULL CHECK (source IN ('recipe', 'image')),
    request        TEXT    NOT NULL, -- JSON
    rebuild        INTEGER NOT NULL CHECK (rebuild IN (0, 1)),
    phase          TEXT    NOT NULL CHECK (phase IN ('queued', 'pulling', 'unpacking',
                                  'building', 'snapshotting', 'ready', 'failed')),
    created_at_ms  INTEGER NOT NULL,
    updated_at_ms  INTEGER NOT NULL,
    finished_at_ms INTEGER,
    error          TEXT,
    error_kind     TEXT,     -- 'user' (bad image, bad flags) or 'internal'
    failed_phase   TEXT,
    logs           TEXT    NOT NULL, -- JSON array, the last lines
    log_count      INTEGER NOT NULL CHECK (log_count >= 0)
) STRICT;

-- A template's builds, newest last.
CREATE INDEX template_builds_by_template ON template_builds (template, created_at_ms);
-- Unfinished builds (start-up reconcile, one job at a time).
CREATE INDEX template_builds_unfinished ON template_builds (created_at_ms)
    WHERE phase NOT IN ('ready', 'failed');
