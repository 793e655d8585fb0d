-- AITBC Coordinator: the whole current schema (version 6) for PostgreSQL 15 or newer.
--
-- The twin of schema.sql: the same tables, columns (in the same order), indexes and triggers under the
-- same names, and the same derived rows after the same writes (tests/test_postgres_schema.py proves
-- both). What each table means is said in schema.sql; the comments here say only what differs, and why.
-- The whole file is one script, run in one transaction (one psycopg `execute` without parameters).
--
-- What differs, and why:
-- - Every integer is bigint (times are Unix ms, ~1.8e12; integer is 32 bits), REAL is double precision
--   (real is 4 bytes), BLOB is bytea. One exception: addresses.balance_micro is numeric (version 9).
-- - Every text column is COLLATE "C": SQLite compares text by its bytes (BINARY), so keyset cursors and
--   ORDER BY on ids follow byte order on both engines, and upper() changes ASCII letters only, as
--   SQLite's does. One collation throughout also keeps every index usable where two text columns are
--   compared (an index serves a comparison only under the index's own collation).
-- - Keys SQLite numbers itself when an insert leaves them out (rowids) are identity columns, except
--   two whose numbering the code relies on beyond uniqueness: shapes.shape_id (the Matcher learns new
--   shapes as "shape_id > the highest seen", so ids must become visible in id order) and
--   log_leaves.leaf_index (the receipt log's leaves are numbered from 0 with no gap). An identity
--   hands out values at insert and they become visible at commit, in any order, and a rollback leaves
--   a gap; these two are numbered by a BEFORE INSERT trigger as one more than the largest, under a
--   transaction-scoped advisory lock, so concurrent inserts take turns until commit.
-- - Totals that every job's lifecycle updates (job_counts, counters, fleet_totals) would be single
--   rows that every writer on every instance waits on until its commit. Here each is spread over
--   stripes: the key gains a `stripe` column, a trigger adds its change to the stripe of its backend
--   (counter_stripe(): a coordinator's writer connection claims one of its own), and a read sums the
--   stripes of a key (SUM ... GROUP BY key): exact, and two writers on different stripes never wait
--   for each other. Stripe 0 of every key is seeded, so the sums have every key from the start.
-- - shapes.constraints is unbounded text (gpu, cuda, region and models strings have no length limit),
--   and a B-tree entry over ~2,700 bytes is refused. Its uniqueness is a unique index on the text's
--   SHA-256 (shapes_constraints_digest), which `INSERT ... ON CONFLICT DO NOTHING` (no conflict
--   target) uses as its arbiter; lookups by the text go through a hash index, which stores 4 bytes a
--   row whatever the text's length.
-- - Triggers are PL/pgSQL functions; SQLite's two-argument MAX is GREATEST, its boolean arithmetic a
--   CASE, its `IS NOT` IS DISTINCT FROM. Triggers whose change would be zero do not fire (a WHEN), so
--   a re-registration or an unchanged status never locks a total.
-- - SQLite's ROUND(x) rounds half away from zero in double arithmetic, and CAST(real AS INTEGER)
--   truncates; PostgreSQL's round(double precision) rounds half to even and its cast to an integer
--   rounds. sqlite_round() and trunc() do what SQLite does, bit for bit (round(x::numeric) does not:
--   the cast keeps only 15 significant digits, so 1121.4999999999975 would become 1122).
-- - The schema's version is the one row of schema_version (SQLite: PRAGMA user_version).
--
-- Advisory locks taken here (two-key form, first key 1095324738 = 'AITB'): (1095324738, 1) numbers
-- shapes, (1095324738, 2) numbers log leaves, (1095324738, 65536 + s) is held by the session whose
-- counter stripe is s (claim_counter_stripe). Other second keys are free for the coordinator's own.

-- Helpers

-- SQLite's ROUND(x) (func.c, roundFunc): x + 0.5 (x - 0.5 below zero) truncated, in double arithmetic;
-- a value past 2^52 has no fraction and is returned as it is.
CREATE FUNCTION sqlite_round(x double precision) RETURNS double precision
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN CASE WHEN abs(x) > 4503599627370496 THEN x ELSE trunc(x + CASE WHEN x < 0 THEN -0.5 ELSE 0.5 END) END;

-- A price as whole units and millionths, as schema.sql's triggers split it: CAST(price AS INTEGER) and
-- CAST(ROUND((price - CAST(price AS INTEGER)) * 1000000) AS INTEGER).
CREATE FUNCTION price_whole_units(price double precision) RETURNS bigint
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN trunc(price)::bigint;

CREATE FUNCTION price_millionths(price double precision) RETURNS bigint
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN sqlite_round((price - trunc(price)) * 1000000)::bigint;

-- The SHA-256 of a text's UTF-8 bytes. (IMMUTABLE although convert_to is only STABLE: a database's
-- encoding never changes, and the conversion of its text to UTF-8 is fixed.)
CREATE FUNCTION constraints_digest(constraints text) RETURNS bytea
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN sha256(convert_to(constraints, 'UTF8'));

-- The stripe of the totals this backend (connection) adds to (as version 6 made it; version 7 below
-- lets a coordinator's writer connections claim stripes of their own).
CREATE FUNCTION counter_stripe() RETURNS smallint
    LANGUAGE sql STABLE
    RETURN (pg_backend_pid() % 16)::smallint;

-- Version 1: jobs, miners, shapes, idempotency keys, job counts.

CREATE TABLE shapes (
    shape_id    bigint PRIMARY KEY,          -- numbered by shapes_number
    constraints text COLLATE "C" NOT NULL
);
CREATE UNIQUE INDEX shapes_constraints_digest ON shapes (constraints_digest(constraints));
CREATE INDEX shapes_by_constraints ON shapes USING hash (constraints);

CREATE FUNCTION shapes_number() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.shape_id IS NULL THEN
        PERFORM pg_advisory_xact_lock(1095324738, 1);
        NEW.shape_id := (SELECT COALESCE(MAX(shape_id), 0) + 1 FROM shapes);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER shapes_number BEFORE INSERT ON shapes FOR EACH ROW EXECUTE FUNCTION shapes_number();

CREATE TABLE jobs (
    seq               bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    job_id            text COLLATE "C" NOT NULL UNIQUE,
    client_id         text COLLATE "C" NOT NULL,
    state             text COLLATE "C" NOT NULL CHECK (state IN
                          ('QUEUED', 'RUNNING', 'COMPLETED', 'FAILED', 'CANCELED', 'EXPIRED')),
    constraints       text COLLATE "C" NOT NULL,
    shape_id          bigint NOT NULL REFERENCES shapes (shape_id),
    requested_at      bigint NOT NULL,
    expires_at        bigint NOT NULL,
    attempts          bigint NOT NULL DEFAULT 0,
    assigned_miner_id text COLLATE "C",
    assigned_at       bigint,
    finished_at       bigint,
    error             text COLLATE "C",
    value             text COLLATE "C",
    pruned_at         bigint
);
CREATE INDEX jobs_by_client ON jobs (client_id, seq);
CREATE INDEX jobs_by_client_state ON jobs (client_id, state, seq);
CREATE INDEX jobs_by_state ON jobs (state, seq);
CREATE INDEX jobs_by_miner ON jobs (assigned_miner_id, seq);
CREATE INDEX jobs_queued ON jobs (shape_id, seq) WHERE state = 'QUEUED';
CREATE INDEX jobs_running ON jobs (assigned_miner_id) WHERE state = 'RUNNING';
CREATE INDEX jobs_deadline ON jobs (state, expires_at) WHERE state IN ('QUEUED', 'RUNNING');
CREATE INDEX jobs_unpruned ON jobs (finished_at) WHERE finished_at IS NOT NULL AND pruned_at IS NULL;
CREATE INDEX jobs_pruned ON jobs (finished_at) WHERE pruned_at IS NOT NULL;

CREATE TABLE miners (
    miner_id          text COLLATE "C" PRIMARY KEY,
    offer_id          text COLLATE "C" NOT NULL UNIQUE,
    capabilities      text COLLATE "C" NOT NULL,
    price             double precision NOT NULL,
    sla               text COLLATE "C" NOT NULL,
    concurrency       bigint NOT NULL,
    region            text COLLATE "C",
    status            text COLLATE "C" NOT NULL,
    reported_inflight bigint,
    metadata          text COLLATE "C",
    session_token     text COLLATE "C" NOT NULL,
    created_at        bigint NOT NULL,
    registered_at     bigint NOT NULL,
    last_seen         bigint NOT NULL,
    last_heartbeat    bigint,
    jobs_completed    bigint NOT NULL DEFAULT 0,
    jobs_failed       bigint NOT NULL DEFAULT 0,
    busy_ms_total     bigint NOT NULL DEFAULT 0,
    last_receipt_id   text COLLATE "C",
    online            bigint NOT NULL DEFAULT 1,
    offer_status      text COLLATE "C" NOT NULL DEFAULT 'open',
    price_units       bigint NOT NULL DEFAULT 0,
    price_micro       bigint NOT NULL DEFAULT 0,
    -- PostgreSQL only: when an instance last heard from the miner, on the database server's clock (ms),
    -- the one clock instances on different machines share; its silence is judged by it.
    heard_at          bigint NOT NULL DEFAULT 0
);
CREATE INDEX miners_by_registration ON miners (created_at, miner_id);
CREATE INDEX miners_offers ON miners (created_at, offer_id);
CREATE INDEX miners_offers_by_status ON miners (offer_status, created_at, offer_id);
CREATE INDEX miners_open_by_price ON miners (price, created_at, offer_id) WHERE offer_status = 'open';

CREATE TABLE idempotency_keys (
    client_id    text COLLATE "C" NOT NULL,
    key          text COLLATE "C" NOT NULL,
    request_hash text COLLATE "C" NOT NULL,
    job_id       text COLLATE "C" NOT NULL,
    created_at   bigint NOT NULL,
    PRIMARY KEY (client_id, key)
);
CREATE INDEX idempotency_by_age ON idempotency_keys (created_at);

-- Striped: the jobs in a state (and the run time of the completed) are the sums over its stripes.
CREATE TABLE job_counts (
    state   text COLLATE "C" NOT NULL,
    stripe  smallint NOT NULL CHECK (stripe >= 0),
    n       bigint NOT NULL,
    busy_ms bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (state, stripe)
);
INSERT INTO job_counts (state, stripe, n) VALUES
    ('QUEUED', 0, 0), ('RUNNING', 0, 0), ('COMPLETED', 0, 0), ('FAILED', 0, 0), ('CANCELED', 0, 0), ('EXPIRED', 0, 0);

-- Add to a state's count (and run time) in this backend's stripe.
CREATE FUNCTION job_counts_add(of_state text, delta bigint, busy bigint) RETURNS void LANGUAGE sql AS $$
    INSERT INTO job_counts AS c (state, stripe, n, busy_ms) VALUES (of_state, counter_stripe(), delta, busy)
    ON CONFLICT (state, stripe) DO UPDATE SET n = c.n + excluded.n, busy_ms = c.busy_ms + excluded.busy_ms;
$$;

CREATE FUNCTION jobs_count_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM job_counts_add(NEW.state, 1, 0);
    RETURN NULL;
END $$;
CREATE TRIGGER jobs_count_insert AFTER INSERT ON jobs FOR EACH ROW EXECUTE FUNCTION jobs_count_insert();

-- The two rows are changed in the order of their keys, so that two transactions moving jobs between
-- the same states in the same stripe lock them in one order (no deadlock between them).
CREATE FUNCTION jobs_count_update() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    busy bigint := CASE WHEN NEW.state = 'COMPLETED' THEN COALESCE(NEW.finished_at - NEW.assigned_at, 0) ELSE 0 END;
BEGIN
    IF OLD.state < NEW.state THEN
        PERFORM job_counts_add(OLD.state, -1, 0);
        PERFORM job_counts_add(NEW.state, 1, busy);
    ELSE
        PERFORM job_counts_add(NEW.state, 1, busy);
        PERFORM job_counts_add(OLD.state, -1, 0);
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER jobs_count_update AFTER UPDATE OF state ON jobs
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state) EXECUTE FUNCTION jobs_count_update();

-- Version 2: signed receipts, the marketplace and the explorer.

CREATE TABLE receipts (
    seq        bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    receipt_id text COLLATE "C" NOT NULL UNIQUE,
    job_id     text COLLATE "C" NOT NULL,
    issued_at  bigint NOT NULL,
    price      double precision,
    body       bytea                         -- nullable as in schema.sql (a column added by version 5)
);
CREATE INDEX receipts_by_job ON receipts (job_id, seq);

CREATE TABLE signing_keys (
    key_id        text COLLATE "C" PRIMARY KEY,
    role          text COLLATE "C" NOT NULL CHECK (role IN ('signing', 'attestation')),
    first_seen_at bigint NOT NULL
);

-- Striped as job_counts.
CREATE TABLE counters (
    name   text COLLATE "C" NOT NULL,
    stripe smallint NOT NULL CHECK (stripe >= 0),
    n      bigint NOT NULL,
    PRIMARY KEY (name, stripe)
);
INSERT INTO counters (name, stripe, n) VALUES ('receipts', 0, 0), ('active_bids', 0, 0);

CREATE FUNCTION counters_add(of_name text, delta bigint) RETURNS void LANGUAGE sql AS $$
    INSERT INTO counters AS c (name, stripe, n) VALUES (of_name, counter_stripe(), delta)
    ON CONFLICT (name, stripe) DO UPDATE SET n = c.n + excluded.n;
$$;

CREATE FUNCTION receipts_count_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM counters_add('receipts', 1);
    RETURN NULL;
END $$;
CREATE TRIGGER receipts_count_insert AFTER INSERT ON receipts FOR EACH ROW EXECUTE FUNCTION receipts_count_insert();

CREATE TABLE offers (
    seq        bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    offer_id   text COLLATE "C" NOT NULL UNIQUE,
    provider   text COLLATE "C" NOT NULL,
    capacity   bigint NOT NULL,
    price      double precision NOT NULL,
    sla        text COLLATE "C" NOT NULL,
    status     text COLLATE "C" NOT NULL CHECK (status IN ('open', 'reserved', 'closed')),
    created_at bigint NOT NULL
);
CREATE INDEX offers_by_age ON offers (created_at, offer_id);
CREATE INDEX offers_by_status ON offers (status, created_at, offer_id);
CREATE INDEX offers_open_by_price ON offers (price, created_at, offer_id) WHERE status = 'open';

CREATE TABLE bids (
    seq        bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    bid_id     text COLLATE "C" NOT NULL UNIQUE,
    provider   text COLLATE "C" NOT NULL,
    capacity   bigint NOT NULL,
    price      double precision NOT NULL,
    notes      text COLLATE "C",
    status     text COLLATE "C" NOT NULL CHECK (status IN ('pending', 'matched', 'closed')),
    offer_id   text COLLATE "C",
    created_at bigint NOT NULL
);

CREATE FUNCTION bids_count_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM counters_add('active_bids', 1);
    RETURN NULL;
END $$;
CREATE TRIGGER bids_count_insert AFTER INSERT ON bids
    FOR EACH ROW WHEN (NEW.status IN ('pending', 'matched')) EXECUTE FUNCTION bids_count_insert();

CREATE FUNCTION bids_count_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM counters_add('active_bids', CASE WHEN NEW.status IN ('pending', 'matched') THEN 1 ELSE -1 END);
    RETURN NULL;
END $$;
CREATE TRIGGER bids_count_update AFTER UPDATE OF status ON bids
    FOR EACH ROW WHEN ((OLD.status IN ('pending', 'matched')) IS DISTINCT FROM (NEW.status IN ('pending', 'matched')))
    EXECUTE FUNCTION bids_count_update();

-- (Version 7 stripes it as the totals: see the end of the file.)
CREATE TABLE addresses (
    address       text COLLATE "C" PRIMARY KEY,
    tx_count      bigint NOT NULL,
    balance_micro bigint NOT NULL,
    last_active   bigint NOT NULL
);
CREATE INDEX addresses_by_activity ON addresses (last_active, address);

-- An identity touched by a job at `at`: one more job, active at least then.
CREATE FUNCTION addresses_touch(touched text, at bigint) RETURNS void LANGUAGE sql AS $$
    INSERT INTO addresses AS a (address, tx_count, balance_micro, last_active) VALUES (touched, 1, 0, at)
    ON CONFLICT (address) DO UPDATE SET tx_count = a.tx_count + 1,
        last_active = GREATEST(a.last_active, excluded.last_active);
$$;

CREATE FUNCTION jobs_address_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM addresses_touch(NEW.client_id, NEW.requested_at);
    RETURN NULL;
END $$;
CREATE TRIGGER jobs_address_insert AFTER INSERT ON jobs FOR EACH ROW EXECUTE FUNCTION jobs_address_insert();

CREATE FUNCTION jobs_address_assign() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE addresses SET tx_count = tx_count - 1 WHERE address = OLD.assigned_miner_id;
    IF NEW.assigned_miner_id IS NOT NULL THEN
        PERFORM addresses_touch(NEW.assigned_miner_id, COALESCE(NEW.assigned_at, NEW.requested_at));
    END IF;
    RETURN NULL;
END $$;
CREATE TRIGGER jobs_address_assign AFTER UPDATE OF assigned_miner_id ON jobs
    FOR EACH ROW WHEN (NEW.assigned_miner_id IS DISTINCT FROM OLD.assigned_miner_id)
    EXECUTE FUNCTION jobs_address_assign();

CREATE FUNCTION jobs_address_finish() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE addresses SET last_active = GREATEST(last_active, NEW.finished_at)
     WHERE address IN (NEW.client_id, NEW.assigned_miner_id);
    RETURN NULL;
END $$;
CREATE TRIGGER jobs_address_finish AFTER UPDATE OF finished_at ON jobs
    FOR EACH ROW WHEN (NEW.finished_at IS NOT NULL AND OLD.finished_at IS NULL)
    EXECUTE FUNCTION jobs_address_finish();

-- Version 3: the receipt log (RFC 9162 Merkle tree) and its checkpoints (C2SP tlog-checkpoint).

CREATE TABLE log_leaves (
    leaf_index bigint PRIMARY KEY,           -- numbered by log_leaves_number: from 0, no gap
    receipt_id text COLLATE "C" NOT NULL UNIQUE,
    leaf_hash  bytea NOT NULL
);

-- The lock is held until commit: the next append waits for it, then sees this leaf (and the subtrees
-- its transaction stored) before it reads the log. A rolled-back append leaves no gap.
CREATE FUNCTION log_leaves_number() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.leaf_index IS NULL THEN
        PERFORM pg_advisory_xact_lock(1095324738, 2);
        NEW.leaf_index := (SELECT COALESCE(MAX(leaf_index) + 1, 0) FROM log_leaves);
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER log_leaves_number BEFORE INSERT ON log_leaves FOR EACH ROW EXECUTE FUNCTION log_leaves_number();

CREATE TABLE log_nodes (
    node_id bigint PRIMARY KEY,
    hash    bytea NOT NULL
);

CREATE TABLE log_checkpoints (
    tree_size  bigint PRIMARY KEY,
    root_hash  bytea NOT NULL,
    created_at bigint NOT NULL,
    note       text COLLATE "C" NOT NULL
);
CREATE INDEX log_checkpoints_by_age ON log_checkpoints (created_at);

CREATE TABLE log_keys (
    key_id        text COLLATE "C" PRIMARY KEY,
    origin        text COLLATE "C" NOT NULL,
    first_seen_at bigint NOT NULL
);

-- Version 4: retention, kept offer and fleet totals, keyset paging of every list.

CREATE TABLE job_data (
    seq     bigint PRIMARY KEY,  -- the job's
    payload text COLLATE "C" NOT NULL,
    result  text COLLATE "C",
    metrics text COLLATE "C"
);

CREATE TABLE retention (
    name text COLLATE "C" PRIMARY KEY,
    at   bigint NOT NULL
);

-- Striped as job_counts: the fleet's totals are the sums over the stripes of row 1.
CREATE TABLE fleet_totals (
    id               bigint NOT NULL CHECK (id = 1),
    stripe           smallint NOT NULL CHECK (stripe >= 0),
    offers           bigint NOT NULL,
    open_offers      bigint NOT NULL,
    open_capacity    bigint NOT NULL,
    open_price_units bigint NOT NULL,
    open_price_micro bigint NOT NULL,
    online_miners    bigint NOT NULL,
    PRIMARY KEY (id, stripe)
);
INSERT INTO fleet_totals (id, stripe, offers, open_offers, open_capacity, open_price_units, open_price_micro,
                          online_miners) VALUES (1, 0, 0, 0, 0, 0, 0, 0);

CREATE FUNCTION fleet_totals_add(d_offers bigint, d_open bigint, d_capacity bigint, d_units bigint, d_micro bigint,
                                 d_online bigint) RETURNS void LANGUAGE sql AS $$
    INSERT INTO fleet_totals AS t (id, stripe, offers, open_offers, open_capacity, open_price_units, open_price_micro,
                                   online_miners)
    VALUES (1, counter_stripe(), d_offers, d_open, d_capacity, d_units, d_micro, d_online)
    ON CONFLICT (id, stripe) DO UPDATE SET offers = t.offers + excluded.offers,
        open_offers = t.open_offers + excluded.open_offers, open_capacity = t.open_capacity + excluded.open_capacity,
        open_price_units = t.open_price_units + excluded.open_price_units,
        open_price_micro = t.open_price_micro + excluded.open_price_micro,
        online_miners = t.online_miners + excluded.online_miners;
$$;

CREATE FUNCTION miners_totals_insert() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    is_open bigint := CASE WHEN NEW.offer_status = 'open' THEN 1 ELSE 0 END;
BEGIN
    PERFORM fleet_totals_add(1, is_open, is_open * NEW.concurrency, is_open * NEW.price_units,
                             is_open * NEW.price_micro, NEW.online);
    RETURN NULL;
END $$;
CREATE TRIGGER miners_totals_insert AFTER INSERT ON miners FOR EACH ROW EXECUTE FUNCTION miners_totals_insert();

CREATE FUNCTION miners_totals_open() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    d bigint := CASE WHEN NEW.offer_status = 'open' THEN 1 ELSE -1 END;
BEGIN
    PERFORM fleet_totals_add(0, d, d * NEW.concurrency, d * NEW.price_units, d * NEW.price_micro, 0);
    RETURN NULL;
END $$;
CREATE TRIGGER miners_totals_open AFTER UPDATE OF offer_status ON miners
    FOR EACH ROW WHEN ((OLD.offer_status = 'open') IS DISTINCT FROM (NEW.offer_status = 'open'))
    EXECUTE FUNCTION miners_totals_open();

CREATE FUNCTION miners_totals_terms() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM fleet_totals_add(0, 0, NEW.concurrency - OLD.concurrency, NEW.price_units - OLD.price_units,
                             NEW.price_micro - OLD.price_micro, 0);
    RETURN NULL;
END $$;
CREATE TRIGGER miners_totals_terms AFTER UPDATE OF concurrency, price_units, price_micro ON miners
    FOR EACH ROW WHEN (OLD.offer_status = 'open' AND NEW.offer_status = 'open'
                       AND (OLD.concurrency, OLD.price_units, OLD.price_micro)
                           IS DISTINCT FROM (NEW.concurrency, NEW.price_units, NEW.price_micro))
    EXECUTE FUNCTION miners_totals_terms();

CREATE FUNCTION miners_totals_online() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM fleet_totals_add(0, 0, 0, 0, 0, NEW.online - OLD.online);
    RETURN NULL;
END $$;
CREATE TRIGGER miners_totals_online AFTER UPDATE OF online ON miners
    FOR EACH ROW WHEN (OLD.online IS DISTINCT FROM NEW.online) EXECUTE FUNCTION miners_totals_online();

CREATE FUNCTION offers_totals_insert() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    is_open bigint := CASE WHEN NEW.status = 'open' THEN 1 ELSE 0 END;
BEGIN
    PERFORM fleet_totals_add(1, is_open, is_open * NEW.capacity, is_open * price_whole_units(NEW.price),
                             is_open * price_millionths(NEW.price), 0);
    RETURN NULL;
END $$;
CREATE TRIGGER offers_totals_insert AFTER INSERT ON offers FOR EACH ROW EXECUTE FUNCTION offers_totals_insert();

CREATE FUNCTION offers_totals_status() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    d bigint := CASE WHEN NEW.status = 'open' THEN 1 ELSE -1 END;
BEGIN
    PERFORM fleet_totals_add(0, d, d * NEW.capacity, d * price_whole_units(NEW.price),
                             d * price_millionths(NEW.price), 0);
    RETURN NULL;
END $$;
CREATE TRIGGER offers_totals_status AFTER UPDATE OF status ON offers
    FOR EACH ROW WHEN ((OLD.status = 'open') IS DISTINCT FROM (NEW.status = 'open'))
    EXECUTE FUNCTION offers_totals_status();

-- Version 5 and 6: receipts are stored packed (receipts.body above is the packed one), and their balance
-- moves are made by the unit of work that stores them (aitbc_coord.insert_receipt), not by a trigger.

-- PostgreSQL only: cluster duties (expiry, lost-miner recovery, offline marks, idempotency keys) run on one
-- instance a tick. An instance whose tick takes pg_try_advisory_xact_lock runs them when last_run (the
-- database server's clock, ms) is at least a tick ago, and stamps it: once a tick summed over instances.
CREATE TABLE sweep_state (
    id       bigint PRIMARY KEY CHECK (id = 1),
    last_run bigint NOT NULL
);
INSERT INTO sweep_state (id, last_run) VALUES (1, 0);
CREATE INDEX miners_online_by_heard ON miners (heard_at) WHERE online = 1;

-- The database server's clock, Unix ms.
CREATE FUNCTION db_now_ms() RETURNS bigint LANGUAGE sql VOLATILE
    RETURN (extract(epoch FROM clock_timestamp()) * 1000)::bigint;

-- The schema's version (SQLite: PRAGMA user_version), one row.
CREATE TABLE schema_version (
    version bigint NOT NULL
);
CREATE UNIQUE INDEX schema_version_one_row ON schema_version ((true));
INSERT INTO schema_version (version) VALUES (9);  -- aitbc_coord.PG_SCHEMA_VERSION

-- Version 7: claims that never reached their miner; as in schema.sql (migrate_pg runs this section to
-- upgrade a version 6 database: the section runs to the end of the file).
ALTER TABLE miners ADD COLUMN short_since bigint;
ALTER TABLE miners ADD COLUMN known_through bigint;
-- Rolling upgrades: the oldest schema version whose coordinator can still work on this database
-- (aitbc_coord.SCHEMA_COMPATIBLE_FROM, written by migrate_pg); a coordinator refuses a newer schema only
-- when this is above its own version.
ALTER TABLE schema_version ADD COLUMN compatible_from bigint NOT NULL DEFAULT 7;
-- The stripe of the totals this backend (connection) adds to: the one it claimed (a coordinator's
-- writers do, claim_counter_stripe), else one of 0-15 by its process id (a session of psql, the copy).
CREATE OR REPLACE FUNCTION counter_stripe() RETURNS smallint
    LANGUAGE sql STABLE
    RETURN COALESCE(CAST(NULLIF(current_setting('aitbc.stripe', true), '') AS smallint),
                    (pg_backend_pid() % 16)::smallint);

-- Claim a stripe of 16 or more that no other live session holds, for this session's life (a session-level
-- advisory lock (1095324738, 65536 + stripe), released when the connection closes), and make it this
-- session's counter_stripe(); returns it. Two sessions that each add only to a stripe of their own never
-- wait for each other on a total, so no cycle of waits can pass through the totals.
CREATE FUNCTION claim_counter_stripe() RETURNS smallint LANGUAGE plpgsql AS $$
BEGIN
    FOR s IN 16..32767 LOOP
        IF pg_try_advisory_lock(1095324738, 65536 + s) THEN
            PERFORM set_config('aitbc.stripe', s::text, false);
            RETURN s;
        END IF;
    END LOOP;
    RAISE EXCEPTION 'every counter stripe is claimed';
END $$;

-- The explorer's addresses striped as the totals: every submit and result of one identity wrote its
-- one row, so its jobs ran one commit after another once each unit committed alone. A writer now adds
-- to the identity's row in its own stripe (counter_stripe()), and a read sums an address's stripes
-- (tx_count, balance_micro) and takes the latest of their last_active (list_addresses).
ALTER TABLE addresses ADD COLUMN stripe smallint NOT NULL DEFAULT 0 CHECK (stripe >= 0);
ALTER TABLE addresses DROP CONSTRAINT addresses_pkey;
ALTER TABLE addresses ADD PRIMARY KEY (address, stripe);
ALTER TABLE addresses ALTER COLUMN stripe DROP DEFAULT;  -- the rows there were are stripe 0

-- Add to an identity's row in this backend's stripe: jobs (tx_count), millionths (balance_micro), and
-- activity at least at `at` (0: none).
CREATE FUNCTION addresses_add(touched text, jobs bigint, micro bigint, at bigint) RETURNS void LANGUAGE sql AS $$
    INSERT INTO addresses AS a (address, stripe, tx_count, balance_micro, last_active)
    VALUES (touched, counter_stripe(), jobs, micro, at)
    ON CONFLICT (address, stripe) DO UPDATE SET tx_count = a.tx_count + excluded.tx_count,
        balance_micro = a.balance_micro + excluded.balance_micro,
        last_active = GREATEST(a.last_active, excluded.last_active);
$$;

CREATE OR REPLACE FUNCTION addresses_touch(touched text, at bigint) RETURNS void LANGUAGE sql AS $$
    SELECT addresses_add(touched, 1, 0, at);
$$;

CREATE OR REPLACE FUNCTION jobs_address_assign() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.assigned_miner_id IS NOT NULL THEN
        PERFORM addresses_add(OLD.assigned_miner_id, -1, 0, 0);
    END IF;
    IF NEW.assigned_miner_id IS NOT NULL THEN
        PERFORM addresses_touch(NEW.assigned_miner_id, COALESCE(NEW.assigned_at, NEW.requested_at));
    END IF;
    RETURN NULL;
END $$;

CREATE OR REPLACE FUNCTION jobs_address_finish() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM addresses_add(NEW.client_id, 0, 0, NEW.finished_at);
    IF NEW.assigned_miner_id IS NOT NULL AND NEW.assigned_miner_id <> NEW.client_id THEN
        PERFORM addresses_add(NEW.assigned_miner_id, 0, 0, NEW.finished_at);
    END IF;
    RETURN NULL;
END $$;

-- Version 8: (PostgreSQL only; SQLite's schema stays at 7) the helpers the triggers and the units call
-- for every job, in PL/pgSQL, which keeps each statement's plan for the session. A LANGUAGE sql
-- function that writes is planned afresh at every call: ~35 us of the server's CPU each, a dozen calls
-- a job. Same arguments, same effects: version 7 code works on it (compatible_from stays 7).
CREATE OR REPLACE FUNCTION job_counts_add(of_state text, delta bigint, busy bigint) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO job_counts AS c (state, stripe, n, busy_ms) VALUES (of_state, counter_stripe(), delta, busy)
    ON CONFLICT (state, stripe) DO UPDATE SET n = c.n + excluded.n, busy_ms = c.busy_ms + excluded.busy_ms;
END $$;

CREATE OR REPLACE FUNCTION counters_add(of_name text, delta bigint) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO counters AS c (name, stripe, n) VALUES (of_name, counter_stripe(), delta)
    ON CONFLICT (name, stripe) DO UPDATE SET n = c.n + excluded.n;
END $$;

CREATE OR REPLACE FUNCTION fleet_totals_add(d_offers bigint, d_open bigint, d_capacity bigint, d_units bigint,
                                            d_micro bigint, d_online bigint) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO fleet_totals AS t (id, stripe, offers, open_offers, open_capacity, open_price_units, open_price_micro,
                                   online_miners)
    VALUES (1, counter_stripe(), d_offers, d_open, d_capacity, d_units, d_micro, d_online)
    ON CONFLICT (id, stripe) DO UPDATE SET offers = t.offers + excluded.offers,
        open_offers = t.open_offers + excluded.open_offers, open_capacity = t.open_capacity + excluded.open_capacity,
        open_price_units = t.open_price_units + excluded.open_price_units,
        open_price_micro = t.open_price_micro + excluded.open_price_micro,
        online_miners = t.online_miners + excluded.online_miners;
END $$;

CREATE OR REPLACE FUNCTION addresses_add(touched text, jobs bigint, micro bigint, at bigint) RETURNS void
    LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO addresses AS a (address, stripe, tx_count, balance_micro, last_active)
    VALUES (touched, counter_stripe(), jobs, micro, at)
    ON CONFLICT (address, stripe) DO UPDATE SET tx_count = a.tx_count + excluded.tx_count,
        balance_micro = a.balance_micro + excluded.balance_micro,
        last_active = GREATEST(a.last_active, excluded.last_active);
END $$;

CREATE OR REPLACE FUNCTION addresses_touch(touched text, at bigint) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM addresses_add(touched, 1, 0, at);
END $$;

-- Version 9: (PostgreSQL only) an address's balance is numeric. A receipt moves up to 10^18 millionths
-- (MAX_AMOUNT), so ten of them pass a bigint: the row's update then failed ("bigint out of range"), and
-- with it every later priced result of that miner or that client through the same writer (SQLite turns
-- such a sum into a REAL and goes on). numeric does not overflow and stays exact; reads sum it as
-- before (a whole numeric is read as an int). addresses_add still takes one move as a bigint. Version 7
-- and 8 code works on it (compatible_from stays 7); the change rewrites addresses under an ACCESS
-- EXCLUSIVE lock, so its writers wait for the upgrade's length (one row per identity and stripe).
ALTER TABLE addresses ALTER COLUMN balance_micro TYPE numeric;
