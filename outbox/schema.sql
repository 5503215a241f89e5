-- cockpit-agent's durable state. Read it with: sqlite3 /var/lib/cockpit-agent/outbox.db
-- Times are unix seconds (REAL). States and statuses are plain words.

-- Every command the agent ever accepted, one row per command_id, written before the
-- command is queued. state: queued -> running -> done. A command_id already here is
-- never run again.
CREATE TABLE IF NOT EXISTS commands (
    seq               INTEGER PRIMARY KEY AUTOINCREMENT,  -- arrival order
    command_id        TEXT    NOT NULL UNIQUE,
    command           TEXT    NOT NULL,
    params            TEXT    NOT NULL,                   -- JSON object, as received
    sender            TEXT,
    state             TEXT    NOT NULL DEFAULT 'queued'
                      CHECK (state IN ('queued', 'running', 'done')),
    status            TEXT    CHECK (status IN ('success', 'error')),  -- set once done
    output            TEXT,                               -- full output (a response may hold a truncated copy)
    error             TEXT,
    execution_time_ms INTEGER,
    received_at       REAL    NOT NULL,
    started_at        REAL,
    finished_at       REAL,
    response          TEXT                                -- the response JSON as published
);
CREATE INDEX IF NOT EXISTS commands_pending ON commands (state) WHERE state != 'done';

-- Every message still to be published. A row is deleted only once PUBLISH reached a
-- receiver (or, after RESPONSE_RETRY_SECONDS with no receiver, once the response is safe
-- at its result key). SELECT count(*) FROM outbox is what waits.
CREATE TABLE IF NOT EXISTS outbox (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,    -- publish order
    channel         TEXT    NOT NULL,
    payload         TEXT    NOT NULL,                     -- the JSON message
    command_id      TEXT,
    result_key      TEXT,     -- also SET here for RESULT_TTL; NULL for answers that must not claim an id
    created_at      REAL    NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL    NOT NULL DEFAULT 0,
    unheard_since   REAL,     -- first time Redis answered but no one was subscribed
    last_error      TEXT
);
