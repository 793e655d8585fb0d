-- Frozen copy of schema.sql at version 1: test_db.py upgrades a database made from it.
-- AITBC Coordinator: the whole current schema.
--
-- A fresh database is created from this file; an older one is brought here by the numbered steps in
-- aitbc_coord.UPGRADES. Timestamps are integer Unix milliseconds (UTC); JSON columns hold compact
-- JSON text. Only SQL that PostgreSQL also understands, apart from the triggers' syntax.

-- Distinct constraint sets ("shapes"). A poll probes the queue once per shape the miner satisfies,
-- so its cost follows the number of shapes, not the number of queued jobs it cannot run.
CREATE TABLE shapes (
    shape_id    INTEGER PRIMARY KEY,
    constraints TEXT NOT NULL UNIQUE
);

CREATE TABLE jobs (
    seq               INTEGER PRIMARY KEY,   -- submission order (the explorer's block height)
    job_id            TEXT NOT NULL UNIQUE,
    client_id         TEXT NOT NULL,
    state             TEXT NOT NULL CHECK (state IN
                          ('QUEUED', 'RUNNING', 'COMPLETED', 'FAILED', 'CANCELED', 'EXPIRED')),
    payload           TEXT NOT NULL,
    constraints       TEXT NOT NULL,         -- the full 6-key object, as returned to miners
    shape_id          INTEGER NOT NULL REFERENCES shapes (shape_id),
    requested_at      INTEGER NOT NULL,
    expires_at        INTEGER NOT NULL,
    attempts          INTEGER NOT NULL DEFAULT 0,
    assigned_miner_id TEXT,
    assigned_at       INTEGER,
    finished_at       INTEGER,
    error             TEXT,
    result            TEXT,                  -- canonical JSON, compared on a repeated result
    metrics           TEXT,
    value             TEXT                   -- payload.value as the explorer shows it, or NULL
);
CREATE INDEX jobs_by_client ON jobs (client_id, seq);
CREATE INDEX jobs_by_client_state ON jobs (client_id, state, seq);
CREATE INDEX jobs_by_state ON jobs (state, seq);
CREATE INDEX jobs_by_miner ON jobs (assigned_miner_id, seq);
-- The queue: only QUEUED rows, ordered by age within each shape.
CREATE INDEX jobs_queued ON jobs (shape_id, seq) WHERE state = 'QUEUED';
-- A miner's in-flight slots are derived from this index, never counted separately.
CREATE INDEX jobs_running ON jobs (assigned_miner_id) WHERE state = 'RUNNING';
CREATE INDEX jobs_deadline ON jobs (state, expires_at) WHERE state IN ('QUEUED', 'RUNNING');

CREATE TABLE miners (
    miner_id          TEXT PRIMARY KEY,      -- the miner key's public identity
    offer_id          TEXT NOT NULL UNIQUE,  -- every miner is a marketplace offer
    capabilities      TEXT NOT NULL,         -- normalised: gpus [{name, memory_mb}], cuda, ...
    price             REAL NOT NULL,         -- capabilities.price when a number, else 0
    sla               TEXT NOT NULL,         -- capabilities.sla when a string, else ''
    concurrency       INTEGER NOT NULL,
    region            TEXT,
    status            TEXT NOT NULL,         -- as last reported: ONLINE, DRAINING, OFFLINE, ...
    reported_inflight INTEGER,
    metadata          TEXT,
    session_token     TEXT NOT NULL,
    created_at        INTEGER NOT NULL,      -- first registration
    registered_at     INTEGER NOT NULL,      -- latest registration
    last_seen         INTEGER NOT NULL,      -- any authenticated miner request
    last_heartbeat    INTEGER,
    jobs_completed    INTEGER NOT NULL DEFAULT 0,
    jobs_failed       INTEGER NOT NULL DEFAULT 0,
    busy_ms_total     INTEGER NOT NULL DEFAULT 0,
    last_receipt_id   TEXT
);
CREATE INDEX miners_by_last_seen ON miners (last_seen);

CREATE TABLE idempotency_keys (
    client_id    TEXT NOT NULL,
    key          TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    job_id       TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    PRIMARY KEY (client_id, key)
);
CREATE INDEX idempotency_by_age ON idempotency_keys (created_at);

-- Jobs per state, kept in step by triggers inside the writing transaction, so stats never scan jobs.
CREATE TABLE job_counts (
    state TEXT PRIMARY KEY,
    n     INTEGER NOT NULL
);
INSERT INTO job_counts (state, n) VALUES
    ('QUEUED', 0), ('RUNNING', 0), ('COMPLETED', 0), ('FAILED', 0), ('CANCELED', 0), ('EXPIRED', 0);

CREATE TRIGGER jobs_count_insert AFTER INSERT ON jobs
BEGIN
    UPDATE job_counts SET n = n + 1 WHERE state = NEW.state;
END;

CREATE TRIGGER jobs_count_update AFTER UPDATE OF state ON jobs WHEN OLD.state <> NEW.state
BEGIN
    UPDATE job_counts SET n = n - 1 WHERE state = OLD.state;
    UPDATE job_counts SET n = n + 1 WHERE state = NEW.state;
END;

PRAGMA user_version = 1;
