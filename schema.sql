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

-- Version 4: retention, kept offer and fleet totals, keyset paging of every list.

-- A job's bulk, its payload, result and metrics, in a table of its own: what retention drops
-- (PAYLOAD_RETENTION_DAYS after the job finished) is whole rows and their pages, and the summaries
-- that stay in jobs are small rows packed densely. (Dropped in place, a big row's summary would keep
-- the leaf page its payload spread over: ~4 KB a job for good.) pruned_at says when it went.
CREATE TABLE job_data (
    seq     INTEGER PRIMARY KEY,  -- the job's
    payload TEXT NOT NULL,        -- canonical JSON (keys sorted), as its receipt's digest covers it
    result  TEXT,                 -- canonical JSON, compared on a repeated result
    metrics TEXT
);
INSERT INTO job_data (seq, payload, result, metrics) SELECT seq, payload, result, metrics FROM jobs;
ALTER TABLE jobs DROP COLUMN payload;
ALTER TABLE jobs DROP COLUMN result;
ALTER TABLE jobs DROP COLUMN metrics;
ALTER TABLE jobs ADD COLUMN pruned_at INTEGER;
-- Finished jobs whose bulk is still held, oldest first: what the pruner and archiver walk.
-- A pruned job leaves it, so the index costs nothing for what is kept for good.
CREATE INDEX jobs_unpruned ON jobs (finished_at) WHERE finished_at IS NOT NULL AND pruned_at IS NULL;
-- Pruned jobs by age: what JOB_RETENTION_DAYS deletes, found without walking jobs that never finish.
CREATE INDEX jobs_pruned ON jobs (finished_at) WHERE pruned_at IS NOT NULL;

-- When retention's clock started ('clock_started': the first start of a coordinator with retention).
-- A job that finished before then counts as finished then, so an upgrade never prunes at once.
CREATE TABLE retention (
    name TEXT PRIMARY KEY,
    at   INTEGER NOT NULL
);

-- A miner's offer, kept in step so that no read looks at every miner: online is the sweep's
-- judgement of its liveness (monotonic clock); offer_status follows online, the reported status and
-- its RUNNING jobs, set by the units of work that change them (a claim and a completion toggle it
-- without a trigger: a trigger costs its sub-program on every firing, and these are the hottest
-- statements). The totals below follow offer_status by trigger, only when it is written.
ALTER TABLE miners ADD COLUMN online INTEGER NOT NULL DEFAULT 1;
ALTER TABLE miners ADD COLUMN offer_status TEXT NOT NULL DEFAULT 'open';
-- price as whole units and millionths, what the open-offer totals add and take away
ALTER TABLE miners ADD COLUMN price_units INTEGER NOT NULL DEFAULT 0;
ALTER TABLE miners ADD COLUMN price_micro INTEGER NOT NULL DEFAULT 0;
UPDATE miners SET price_units = CAST(price AS INTEGER),
                  price_micro = CAST(ROUND((price - CAST(price AS INTEGER)) * 1000000) AS INTEGER);
UPDATE miners SET offer_status = CASE WHEN upper(status) IN ('DRAINING', 'OFFLINE') THEN 'closed'
    WHEN (SELECT COUNT(*) FROM jobs WHERE jobs.state = 'RUNNING' AND jobs.assigned_miner_id = miners.miner_id)
         >= concurrency THEN 'reserved' ELSE 'open' END;
CREATE INDEX miners_by_registration ON miners (created_at, miner_id);
CREATE INDEX miners_offers ON miners (created_at, offer_id);
CREATE INDEX miners_offers_by_status ON miners (offer_status, created_at, offer_id);
CREATE INDEX miners_open_by_price ON miners (price, created_at, offer_id) WHERE offer_status = 'open';
CREATE INDEX offers_by_age ON offers (created_at, offer_id);
CREATE INDEX offers_by_status ON offers (status, created_at, offer_id);
CREATE INDEX offers_open_by_price ON offers (price, created_at, offer_id) WHERE status = 'open';

-- The run time of completed jobs (finished_at - assigned_at) beside their count: admin stats' average
-- miner job duration, kept by the trigger that keeps the counts (no trigger more on a completion).
ALTER TABLE job_counts ADD COLUMN busy_ms INTEGER NOT NULL DEFAULT 0;
UPDATE job_counts SET busy_ms = (SELECT COALESCE(SUM(busy_ms_total), 0) FROM miners) WHERE state = 'COMPLETED';
DROP TRIGGER jobs_count_update;
CREATE TRIGGER jobs_count_update AFTER UPDATE OF state ON jobs WHEN OLD.state <> NEW.state
BEGIN
    UPDATE job_counts SET n = n - 1 WHERE state = OLD.state;
    UPDATE job_counts SET n = n + 1,
        busy_ms = busy_ms + CASE WHEN NEW.state = 'COMPLETED' THEN COALESCE(NEW.finished_at - NEW.assigned_at, 0) ELSE 0 END
     WHERE state = NEW.state;
END;

-- Totals of the fleet and of every offer, one row kept in step by the triggers below, so market and
-- admin stats read one row. Open offers' prices are summed as whole units and millionths (exact
-- integers: a float sum that adds and takes away drifts).
CREATE TABLE fleet_totals (
    id               INTEGER PRIMARY KEY CHECK (id = 1),
    offers           INTEGER NOT NULL,
    open_offers      INTEGER NOT NULL,
    open_capacity    INTEGER NOT NULL,
    open_price_units INTEGER NOT NULL,
    open_price_micro INTEGER NOT NULL,
    online_miners    INTEGER NOT NULL
);
INSERT INTO fleet_totals (id, offers, open_offers, open_capacity, open_price_units, open_price_micro, online_miners)
SELECT 1, m.n + o.n, m.open_n + o.open_n, m.open_capacity + o.open_capacity, m.units + o.units, m.micro + o.micro,
       m.online
  FROM (SELECT COUNT(*) AS n, COALESCE(SUM(offer_status = 'open'), 0) AS open_n,
               COALESCE(SUM(CASE WHEN offer_status = 'open' THEN concurrency END), 0) AS open_capacity,
               COALESCE(SUM(CASE WHEN offer_status = 'open' THEN price_units END), 0) AS units,
               COALESCE(SUM(CASE WHEN offer_status = 'open' THEN price_micro END), 0) AS micro,
               COALESCE(SUM(online), 0) AS online FROM miners) AS m,
       (SELECT COUNT(*) AS n, COALESCE(SUM(status = 'open'), 0) AS open_n,
               COALESCE(SUM(CASE WHEN status = 'open' THEN capacity END), 0) AS open_capacity,
               COALESCE(SUM(CASE WHEN status = 'open' THEN CAST(price AS INTEGER) END), 0) AS units,
               COALESCE(SUM(CASE WHEN status = 'open'
                            THEN CAST(ROUND((price - CAST(price AS INTEGER)) * 1000000) AS INTEGER) END), 0) AS micro
          FROM offers) AS o;

CREATE TRIGGER miners_totals_insert AFTER INSERT ON miners
BEGIN
    UPDATE fleet_totals SET offers = offers + 1, online_miners = online_miners + NEW.online,
        open_offers = open_offers + (NEW.offer_status = 'open'),
        open_capacity = open_capacity + (NEW.offer_status = 'open') * NEW.concurrency,
        open_price_units = open_price_units + (NEW.offer_status = 'open') * NEW.price_units,
        open_price_micro = open_price_micro + (NEW.offer_status = 'open') * NEW.price_micro;
END;

-- An offer opens or stops being open (a claim or a finish for a miner of one slot, each time: lean).
CREATE TRIGGER miners_totals_open AFTER UPDATE OF offer_status ON miners
WHEN (OLD.offer_status = 'open') <> (NEW.offer_status = 'open')
BEGIN
    UPDATE fleet_totals SET open_offers = open_offers + 2 * (NEW.offer_status = 'open') - 1,
        open_capacity = open_capacity + (2 * (NEW.offer_status = 'open') - 1) * NEW.concurrency,
        open_price_units = open_price_units + (2 * (NEW.offer_status = 'open') - 1) * NEW.price_units,
        open_price_micro = open_price_micro + (2 * (NEW.offer_status = 'open') - 1) * NEW.price_micro;
END;

-- An open offer's terms change (a re-registration): its capacity and price.
CREATE TRIGGER miners_totals_terms AFTER UPDATE OF concurrency, price_units, price_micro ON miners
WHEN OLD.offer_status = 'open' AND NEW.offer_status = 'open'
BEGIN
    UPDATE fleet_totals SET open_capacity = open_capacity + NEW.concurrency - OLD.concurrency,
        open_price_units = open_price_units + NEW.price_units - OLD.price_units,
        open_price_micro = open_price_micro + NEW.price_micro - OLD.price_micro;
END;

CREATE TRIGGER miners_totals_online AFTER UPDATE OF online ON miners WHEN OLD.online <> NEW.online
BEGIN
    UPDATE fleet_totals SET online_miners = online_miners + NEW.online - OLD.online;
END;

CREATE TRIGGER offers_totals_insert AFTER INSERT ON offers
BEGIN
    UPDATE fleet_totals SET offers = offers + 1, open_offers = open_offers + (NEW.status = 'open'),
        open_capacity = open_capacity + (NEW.status = 'open') * NEW.capacity,
        open_price_units = open_price_units + (NEW.status = 'open') * CAST(NEW.price AS INTEGER),
        open_price_micro = open_price_micro + (NEW.status = 'open')
            * CAST(ROUND((NEW.price - CAST(NEW.price AS INTEGER)) * 1000000) AS INTEGER);
END;

CREATE TRIGGER offers_totals_status AFTER UPDATE OF status ON offers WHEN (OLD.status = 'open') <> (NEW.status = 'open')
BEGIN
    UPDATE fleet_totals SET open_offers = open_offers + (NEW.status = 'open') - (OLD.status = 'open'),
        open_capacity = open_capacity + ((NEW.status = 'open') - (OLD.status = 'open')) * NEW.capacity,
        open_price_units = open_price_units + ((NEW.status = 'open') - (OLD.status = 'open')) * CAST(NEW.price AS INTEGER),
        open_price_micro = open_price_micro + ((NEW.status = 'open') - (OLD.status = 'open'))
            * CAST(ROUND((NEW.price - CAST(NEW.price AS INTEGER)) * 1000000) AS INTEGER);
END;

-- Version 5: smaller rows for what is kept for good. A receipt's JSON text is stored deflated against a
-- preset dictionary (aitbc_coord.pack_receipt: a leading byte names the dictionary, then a raw RFC 1951
-- stream), filled in by the upgrade's Python step from the text bodies, which version 6 then drops.
-- A job's constraints are stored as the client set them, nulls dropped (aitbc_coord.stored_constraints),
-- converted by the same step.
ALTER TABLE receipts ADD COLUMN packed BLOB;

-- Version 6: every receipt is packed (version 5): the text bodies go, and the packed one is the body.
-- The columns that repeated the body for the balance trigger go too: the unit of work that stores a
-- receipt moves its price between the balances itself (aitbc_coord.insert_receipt); whether it is
-- attested is read from the receipt.
ALTER TABLE receipts DROP COLUMN body;
ALTER TABLE receipts RENAME COLUMN packed TO body;
DROP TRIGGER receipts_balance;
ALTER TABLE receipts DROP COLUMN provider;
ALTER TABLE receipts DROP COLUMN client_id;
ALTER TABLE receipts DROP COLUMN attested;

-- Version 7: claims that never reached their miner (a poll's answer lost after its claim committed).
-- A heartbeat's `inflight` is checked against the jobs the miner held before its previous heartbeat
-- (aitbc_coord.release_unreceived): short_since is when a heartbeat was first found short of them (a
-- second short heartbeat in a row puts the shortfall back in the queue), NULL while none is; every job
-- assigned up to known_through was counted by a heartbeat (Unix ms), which decides which go back.
ALTER TABLE miners ADD COLUMN short_since INTEGER;
ALTER TABLE miners ADD COLUMN known_through INTEGER;

PRAGMA user_version = 7;
