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

-- Version 2: signed receipts, the marketplace and the explorer.

-- Receipts exactly as signed and returned (body), with the columns the read models need.
CREATE TABLE receipts (
    seq        INTEGER PRIMARY KEY,          -- issue order: the paging cursor
    receipt_id TEXT NOT NULL UNIQUE,
    job_id     TEXT NOT NULL,
    provider   TEXT NOT NULL,
    client_id  TEXT NOT NULL,
    issued_at  INTEGER NOT NULL,
    price      REAL,
    attested   INTEGER NOT NULL,
    body       TEXT NOT NULL
);
CREATE INDEX receipts_by_job ON receipts (job_id, seq);

-- Every public key this coordinator has signed with; one no longer configured is 'retired'.
CREATE TABLE signing_keys (
    key_id        TEXT PRIMARY KEY,
    role          TEXT NOT NULL CHECK (role IN ('signing', 'attestation')),
    first_seen_at INTEGER NOT NULL
);

-- Totals kept in step by triggers, so stats never count rows.
CREATE TABLE counters (
    name TEXT PRIMARY KEY,
    n    INTEGER NOT NULL
);
INSERT INTO counters (name, n) VALUES ('receipts', 0), ('active_bids', 0);

CREATE TRIGGER receipts_count_insert AFTER INSERT ON receipts
BEGIN
    UPDATE counters SET n = n + 1 WHERE name = 'receipts';
END;

-- Offers an admin created. Every registered miner is an offer too; its row lives in miners and its
-- status is derived from the miner's liveness and free slots when read.
CREATE TABLE offers (
    seq        INTEGER PRIMARY KEY,
    offer_id   TEXT NOT NULL UNIQUE,
    provider   TEXT NOT NULL,
    capacity   INTEGER NOT NULL,
    price      REAL NOT NULL,
    sla        TEXT NOT NULL,
    status     TEXT NOT NULL CHECK (status IN ('open', 'reserved', 'closed')),
    created_at INTEGER NOT NULL
);

CREATE TABLE bids (
    seq        INTEGER PRIMARY KEY,
    bid_id     TEXT NOT NULL UNIQUE,
    provider   TEXT NOT NULL,
    capacity   INTEGER NOT NULL,
    price      REAL NOT NULL,
    notes      TEXT,
    status     TEXT NOT NULL CHECK (status IN ('pending', 'matched', 'closed')),
    offer_id   TEXT,
    created_at INTEGER NOT NULL
);

CREATE TRIGGER bids_count_insert AFTER INSERT ON bids WHEN NEW.status IN ('pending', 'matched')
BEGIN
    UPDATE counters SET n = n + 1 WHERE name = 'active_bids';
END;

CREATE TRIGGER bids_count_update AFTER UPDATE OF status ON bids
BEGIN
    UPDATE counters SET n = n + (NEW.status IN ('pending', 'matched')) - (OLD.status IN ('pending', 'matched'))
     WHERE name = 'active_bids';
END;

-- Every client and miner identity seen in jobs: the explorer's addresses. tx_count counts the jobs
-- it submitted or currently holds; balance is receipt prices earned minus spent, in millionths.
CREATE TABLE addresses (
    address       TEXT PRIMARY KEY,
    tx_count      INTEGER NOT NULL,
    balance_micro INTEGER NOT NULL,
    last_active   INTEGER NOT NULL
);
CREATE INDEX addresses_by_activity ON addresses (last_active, address);

-- Upgrading a version 1 database: the addresses its jobs already imply.
INSERT INTO addresses (address, tx_count, balance_micro, last_active)
SELECT address, COUNT(*), 0, MAX(t) FROM (
    SELECT client_id AS address, COALESCE(finished_at, requested_at) AS t FROM jobs
    UNION ALL
    SELECT assigned_miner_id, COALESCE(finished_at, assigned_at) FROM jobs WHERE assigned_miner_id IS NOT NULL
) AS touched GROUP BY address;

CREATE TRIGGER jobs_address_insert AFTER INSERT ON jobs
BEGIN
    INSERT INTO addresses (address, tx_count, balance_micro, last_active)
    SELECT NEW.client_id, 1, 0, NEW.requested_at WHERE true
    ON CONFLICT (address) DO UPDATE SET tx_count = tx_count + 1,
        last_active = MAX(last_active, excluded.last_active);
END;

CREATE TRIGGER jobs_address_assign AFTER UPDATE OF assigned_miner_id ON jobs
WHEN NEW.assigned_miner_id IS NOT OLD.assigned_miner_id
BEGIN
    UPDATE addresses SET tx_count = tx_count - 1 WHERE address = OLD.assigned_miner_id;
    INSERT INTO addresses (address, tx_count, balance_micro, last_active)
    SELECT NEW.assigned_miner_id, 1, 0, COALESCE(NEW.assigned_at, NEW.requested_at)
     WHERE NEW.assigned_miner_id IS NOT NULL
    ON CONFLICT (address) DO UPDATE SET tx_count = tx_count + 1,
        last_active = MAX(last_active, excluded.last_active);
END;

CREATE TRIGGER jobs_address_finish AFTER UPDATE OF finished_at ON jobs
WHEN NEW.finished_at IS NOT NULL AND OLD.finished_at IS NULL
BEGIN
    UPDATE addresses SET last_active = MAX(last_active, NEW.finished_at)
     WHERE address IN (NEW.client_id, NEW.assigned_miner_id);
END;

CREATE TRIGGER receipts_balance AFTER INSERT ON receipts WHEN NEW.price IS NOT NULL
BEGIN
    UPDATE addresses SET balance_micro = balance_micro + CAST(ROUND(NEW.price * 1000000) AS INTEGER)
     WHERE address = NEW.provider;
    UPDATE addresses SET balance_micro = balance_micro - CAST(ROUND(NEW.price * 1000000) AS INTEGER)
     WHERE address = NEW.client_id;
END;

-- Version 3: the receipt log, an RFC 9162 Merkle tree with every receipt as a leaf, and its signed
-- checkpoints (C2SP tlog-checkpoint notes).

-- One leaf per receipt, from 0 in issue order with no gap: appended in the transaction that stores the
-- receipt. leaf_hash = SHA-256(0x00 || the receipt's bytes as stored and served); it stays when the
-- receipt's body is pruned, so proofs keep working.
CREATE TABLE log_leaves (
    leaf_index INTEGER PRIMARY KEY,
    receipt_id TEXT NOT NULL UNIQUE,
    leaf_hash  BLOB NOT NULL
);

-- The hash of every complete subtree above the leaves, written in the transaction of the leaf that
-- completes it and never changed, so a proof reads about one row per level. The subtree over leaves
-- [idx * 2^level, (idx + 1) * 2^level) is keyed by its in-order position, idx * 2^(level+1) + 2^level - 1
-- (a "flat tree" numbering: one integer key, one B-tree).
CREATE TABLE log_nodes (
    node_id INTEGER PRIMARY KEY,
    hash    BLOB NOT NULL
);

-- Signed tree heads as published: every one of the last day, then the last of each hour.
CREATE TABLE log_checkpoints (
    tree_size  INTEGER PRIMARY KEY,
    root_hash  BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    note       TEXT NOT NULL                 -- the signed note, exactly as served
);
CREATE INDEX log_checkpoints_by_age ON log_checkpoints (created_at);

-- Every key that has signed checkpoints, with the origin it signed for (the log keeps its origin when
-- its key is rotated).
CREATE TABLE log_keys (
    key_id        TEXT PRIMARY KEY,
    origin        TEXT NOT NULL,
    first_seen_at INTEGER NOT NULL
);

PRAGMA user_version = 3;
