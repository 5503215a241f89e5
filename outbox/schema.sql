-- cockpit-agent's durable state. Read it with: sqlite3 /var/lib/cockpit-agent/outbox.db
-- The comments inside each statement are kept by SQLite: `.schema` shows them.
-- The file is in auto_vacuum=INCREMENTAL mode: the pages pruning frees are given back to the
-- file system (PRAGMA incremental_vacuum, run by the agent), so the file shrinks with its data.

CREATE TABLE IF NOT EXISTS commands (
    -- Every command accepted in the last COMMAND_RETENTION (7 days), one row per command_id,
    -- written before it is queued; a command_id found here is never run again. Then a done
    -- command is pruned, never while its answer still waits in the outbox. Times are unix
    -- seconds (REAL): SELECT * FROM history shows them readable.
    seq               INTEGER PRIMARY KEY AUTOINCREMENT,  -- arrival order
    command_id        TEXT    NOT NULL UNIQUE,
    command           TEXT    NOT NULL,
    params            TEXT    NOT NULL,                   -- JSON object, as received
    sender            TEXT,
    state             TEXT    NOT NULL DEFAULT 'queued'
                      CHECK (state IN ('queued', 'running', 'done')),
    status            TEXT    CHECK (status IN ('success', 'error')),  -- set once done
    full_output       TEXT,   -- where the response carries a truncated copy (OUTPUT_LIMIT), else NULL
    error             TEXT,
    execution_time_ms INTEGER,
    received_at       REAL    NOT NULL,
    started_at        REAL,
    finished_at       REAL,
    response          TEXT,                               -- the response JSON as published
    output            TEXT    GENERATED ALWAYS AS (coalesce(full_output, CASE WHEN json_valid(response)
                      THEN json_extract(response, '$.output') END)) VIRTUAL  -- the full output, stored once
);
CREATE INDEX IF NOT EXISTS commands_pending ON commands (state) WHERE state != 'done';
CREATE INDEX IF NOT EXISTS commands_done ON commands (finished_at) WHERE state = 'done';

CREATE TABLE IF NOT EXISTS pruned (
    -- What pruning removed so far, one row: counts over the agent's whole life stay true
    -- (the registry's commands_executed includes the pruned commands that ran).
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    commands  INTEGER NOT NULL DEFAULT 0,                 -- done commands pruned
    executed  INTEGER NOT NULL DEFAULT 0,                 -- of those, the ones that ran
    last_at   REAL                                        -- the last pruning that removed any
);
INSERT OR IGNORE INTO pruned (id) VALUES (1);

CREATE TABLE IF NOT EXISTS outbox (
    -- Every message still to be published. A row is deleted only once PUBLISH reached a
    -- receiver (or, after RESPONSE_RETRY_SECONDS with no receiver, once the response is safe
    -- at its result key). SELECT count(*) FROM outbox is what waits; SELECT * FROM pending
    -- shows it readable.
    id              INTEGER PRIMARY KEY AUTOINCREMENT,    -- publish order
    channel         TEXT    NOT NULL,
    payload         TEXT    NOT NULL,                     -- the JSON message
    command_id      TEXT,
    result_key      TEXT,     -- also SET here for RESULT_TTL; NULL for answers that must not claim an id
    created_at      REAL    NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL    NOT NULL DEFAULT 0,
    unheard_since   REAL,     -- first time Redis answered but no one was subscribed
    -- Why it waits: 'no receiver' (Redis answered, no one was subscribed), or 'Redis
    -- unreachable since HH:MM:SS UTC' (while the agent cannot reach Redis).
    last_error      TEXT
);

-- Views: the same rows for people, times as ISO 8601 UTC (2026-12-03T08:40:12Z).
-- sqlite3 -header -column outbox.db 'SELECT * FROM pending'

CREATE VIEW IF NOT EXISTS pending AS
    -- What waits to be published, oldest first (the outbox). waiting_s: seconds since it was
    -- written; next_attempt: 'now' when due, else when; last_error: why it waits; bytes: the
    -- message's size (the message itself: outbox.payload).
    SELECT id,
           command_id,
           strftime('%Y-%m-%dT%H:%M:%SZ', created_at, 'unixepoch') AS created,
           CAST((julianday('now') - 2440587.5) * 86400 - created_at AS INTEGER) AS waiting_s,
           attempts,
           CASE WHEN next_attempt_at <= (julianday('now') - 2440587.5) * 86400 THEN 'now'
                ELSE strftime('%Y-%m-%dT%H:%M:%SZ', next_attempt_at, 'unixepoch') END AS next_attempt,
           strftime('%Y-%m-%dT%H:%M:%SZ', unheard_since, 'unixepoch') AS unheard_since,
           last_error,
           length(payload) AS bytes,
           channel
    FROM outbox ORDER BY id;

CREATE VIEW IF NOT EXISTS history AS
    -- Every command kept, newest first (... LIMIT 20: the last twenty). status: queued or
    -- running until done, then success or error; result: the error, or the start of the
    -- output on one line (all of it: commands.output).
    SELECT seq,
           command_id,
           command,
           CASE WHEN state = 'done' THEN status ELSE state END AS status,
           strftime('%Y-%m-%dT%H:%M:%SZ', received_at, 'unixepoch') AS received,
           strftime('%Y-%m-%dT%H:%M:%SZ', finished_at, 'unixepoch') AS finished,
           execution_time_ms AS ms,
           coalesce(error, substr(replace(output, char(10), ' '), 1, 60)) AS result,
           sender,
           params
    FROM commands ORDER BY seq DESC;

CREATE VIEW IF NOT EXISTS unfinished AS
    -- Commands queued or running, oldest first. After a crash, the running ones were
    -- interrupted: the agent answers them with an error at its next start, and runs the queued.
    SELECT seq,
           command_id,
           command,
           state,
           strftime('%Y-%m-%dT%H:%M:%SZ', received_at, 'unixepoch') AS received,
           strftime('%Y-%m-%dT%H:%M:%SZ', started_at, 'unixepoch') AS started,
           sender,
           params
    FROM commands WHERE state != 'done' ORDER BY seq;
