"""Database: schema, migrations, pragmas, the single writer and group commit (spec section 13)."""

from __future__ import annotations

import asyncio
import gc
import os
import re
import sqlite3
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import aitbc_coord as ac
from conftest import CLIENT, Harness, failing_commits, harness, open_database

pytestmark = pytest.mark.anyio


def schema_of(path: Path) -> list[tuple[str, str]]:
    conn = sqlite3.connect(path)
    try:
        return sorted(conn.execute("SELECT name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"))
    finally:
        conn.close()


@pytest.mark.sqlite_only  # the SQLite schema (test_postgres_schema: PostgreSQL's)
def test_migrate_creates_then_is_idempotent(tmp_path: Path) -> None:
    db = tmp_path / "sub" / "c.db"
    assert ac.migrate(str(db)) == (0, ac.SCHEMA_VERSION)
    first = schema_of(db)
    assert ac.migrate(str(db)) == (ac.SCHEMA_VERSION, ac.SCHEMA_VERSION)
    assert schema_of(db) == first
    names = {n for n, _ in first}
    assert {"jobs", "miners", "shapes", "idempotency_keys", "job_counts", "jobs_queued", "jobs_running"} <= names


def test_schema_file_ends_with_its_version() -> None:
    text = ac.schema_sql().rstrip()
    assert text.endswith(f"PRAGMA user_version = {ac.SCHEMA_VERSION};")
    assert "DROP TABLE" not in text.upper()


def test_every_upgrade_step_is_numbered_up_to_the_current_version() -> None:
    assert sorted(ac.UPGRADES) == list(range(2, ac.SCHEMA_VERSION + 1))


def normalised_schema(path: Path) -> list[tuple[str, ...]]:
    """sqlite_master without comments and layout, plus the rows the schema seeds."""
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")
        objects = sorted((t, n, tb, " ".join(re.sub(r"--[^\n]*", "", sql or "").split())) for t, n, tb, sql in rows)
        seeded = sorted(conn.execute("SELECT 'job_counts', state, 0 FROM job_counts"))
        seeded += sorted(conn.execute("SELECT 'counters', name, 0 FROM counters"))
        seeded += sorted(conn.execute("SELECT 'fleet_totals', id, 0 FROM fleet_totals"))
        return objects + seeded
    finally:
        conn.close()


@pytest.mark.sqlite_only  # upgrades of a SQLite file
def test_an_upgraded_database_ends_identical_to_a_fresh_one(tmp_path: Path) -> None:
    old, fresh = tmp_path / "old.db", tmp_path / "fresh.db"
    conn = sqlite3.connect(old)
    conn.executescript((Path(__file__).parent / "data" / "schema_v1.sql").read_text())
    conn.execute("INSERT INTO shapes (constraints) VALUES ('{}')")
    conn.execute("INSERT INTO jobs (job_id, client_id, state, payload, constraints, shape_id, requested_at, expires_at)"
                 " VALUES ('a', 'c', 'QUEUED', '{}', '{}', 1, 0, 1)")
    conn.commit()
    conn.close()
    assert ac.migrate(str(old)) == (1, ac.SCHEMA_VERSION)
    assert ac.migrate(str(fresh)) == (0, ac.SCHEMA_VERSION)
    assert normalised_schema(old) == normalised_schema(fresh)
    conn = sqlite3.connect(old)
    assert conn.execute("SELECT job_id FROM jobs").fetchall() == [("a",)]  # data survives the upgrade
    assert conn.execute("SELECT n FROM job_counts WHERE state = 'QUEUED'").fetchone() == (1,)
    assert conn.execute("SELECT address, tx_count FROM addresses").fetchall() == [("c", 1)]  # backfilled
    conn.close()


@pytest.mark.sqlite_only  # PRAGMA user_version (test_postgres_schema: PostgreSQL's)
def test_a_newer_database_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    ac.migrate(str(db))
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {ac.SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(ac.ConfigError, match="newer"):
        ac.migrate(str(db))


@pytest.mark.sqlite_only  # a SQLite file
def test_an_unreadable_database_is_a_clear_error(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    db.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ac.ConfigError, match="cannot migrate"):
        ac.migrate(str(db))


def test_old_sqlite_is_refused() -> None:
    with pytest.raises(ac.ConfigError, match="3.35"):
        ac.check_sqlite_version("3.34.1")
    ac.check_sqlite_version("3.35.0")


@pytest.mark.sqlite_only  # PRAGMA
@pytest.mark.parametrize(("mode", "level"), [("FULL", 2), ("NORMAL", 1)])
def test_connections_carry_the_pragmas(tmp_path: Path, mode: str, level: int) -> None:
    db = str(tmp_path / "c.db")
    ac.migrate(db)
    writer, reader = ac.connect(db, mode), ac.connect(db, mode, readonly=True)
    try:
        assert writer.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert writer.execute("PRAGMA synchronous").fetchone()[0] == level
        assert writer.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert writer.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
        with pytest.raises(sqlite3.OperationalError):
            reader.execute("DELETE FROM jobs")
    finally:
        writer.close()
        reader.close()


async def test_an_acknowledged_submit_is_already_committed(h: Harness) -> None:
    job = await h.submit()
    other = open_database(h.coord.settings.target)  # a separate connection sees it at once
    try:
        row = other.execute("SELECT state FROM jobs WHERE job_id = ?", (job["job_id"],)).fetchone()
        assert tuple(row) == ("QUEUED",)
    finally:
        other.close()


async def test_concurrent_writes_share_commits_and_a_failing_unit_stays_alone(h: Harness) -> None:
    db = h.coord.db
    batches: list[int] = []
    db.commit_observer = lambda units, seconds: batches.append(units)

    def boom(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO shapes (constraints) VALUES ('doomed')")
        raise ac.Conflict("boom")

    results = await asyncio.gather(*(h.submit({"n": i}) for i in range(40)), db.write(boom),
                                   return_exceptions=True)
    assert isinstance(results[-1], ac.Conflict)
    assert all(isinstance(r, dict) for r in results[:-1])
    if isinstance(db, ac.PgDatabase):  # a transaction a unit (no lock held across units): the refused one rolled back
        assert batches == [1] * 40
    else:
        assert sum(batches) == 41 and len(batches) < 41  # commits were shared
    counts = (await h.client.get("/v1/admin/stats", headers={"X-Api-Key": ac.DEV_KEYS["admin"]})).json()
    assert counts["total_jobs"] == 40
    assert await db.read(lambda c: c.execute("SELECT COUNT(*) FROM shapes WHERE constraints = 'doomed'").fetchone()[0]) == 0


async def test_a_refused_unit_of_work_leaves_nothing_for_the_cycle_collector(h: Harness) -> None:
    """serve runs the cycle collector on a clock: what is alive at a tick (0.1 s) moves to the oldest
    generation, collected about once a day. An error a unit of work raised or returned carries a
    traceback through the writer's frames; were those frames to hold the error (the batch's outcomes,
    the Outcome being raised), every refused cancel or report (404, 409, everyday requests) would be a
    reference cycle, ~300 bytes a request piling up there whenever a tick fell inside the request."""

    def refuse(conn: sqlite3.Connection) -> ac.Outcome:
        raise ac.NotFound("no such thing")

    def returns_refusal(conn: sqlite3.Connection) -> ac.Outcome:
        return ac.Outcome(error=ac.Conflict("not now"))

    units = [(ac.tx_cancel, ("client", "no-such-job", h.coord.now())), (refuse, ()), (returns_refusal, ())]
    for fn, args in units:  # warm: first-use caches are not garbage
        with pytest.raises(ac.ApiError):
            await h.coord.apply(fn, *args)
    gc.collect()
    gc.disable()
    try:
        for fn, args in units:
            with pytest.raises(ac.ApiError):
                await h.coord.apply(fn, *args)
            with pytest.raises(ac.ApiError):
                await h.coord.maintain(fn, *args)
        assert gc.collect() == 0
    finally:
        gc.enable()


async def test_a_failed_commit_acknowledges_nothing(h: Harness) -> None:
    with failing_commits(h.coord.db) as failures:
        r = await h.client.post("/v1/jobs", json={"payload": {}}, headers=CLIENT)
    assert failures and r.status_code == 503 and r.headers["retry-after"] == "1"
    assert (await h.client.get("/v1/jobs", headers=CLIENT)).json()["items"] == []
    assert (await h.client.post("/v1/jobs", json={"payload": {}}, headers=CLIENT)).status_code == 201


@pytest.mark.sqlite_only  # SQLite's one write lock
async def test_another_process_holding_the_write_lock_is_waited_out(h: Harness) -> None:
    other = sqlite3.connect(h.coord.settings.db_path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # e.g. a migrate run by hand while the server runs
    submit = asyncio.create_task(h.client.post("/v1/jobs", json={"payload": {}}, headers=CLIENT))
    await asyncio.sleep(0.1)
    assert not submit.done()
    health = await h.client.get("/v1/health")  # the loop is not blocked meanwhile
    assert health.status_code == 200
    other.execute("COMMIT")
    other.close()
    assert (await submit).status_code == 201


async def test_job_counts_follow_every_transition(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        for i in range(4):
            await h.submit({"n": i}, ttl_seconds=100 if i else 5)
        await h.register(concurrency=3)
        jobs = [await h.take() for _ in range(2)]
        await h.result(jobs[1]["job_id"])
        h.clock.advance(6)
        await h.coord.sweep()
        db_counts = await h.coord.db.read(
            lambda c: dict(c.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()))
        kept = await h.coord.db.read(ac.get_job_counts)
        assert {k: v for k, v in kept.items() if v} == db_counts


@pytest.mark.sqlite_only  # WAL file
async def test_the_wal_shrinks_back_under_its_bound_once_a_pinned_reader_lets_go(tmp_path: Path) -> None:
    """A reader holding a snapshot (a backup, a slow dashboard read) keeps the WAL growing; once it is
    gone and a checkpoint can reset the log, the -wal file is back under WAL_SIZE_LIMIT_BYTES."""
    async with harness(tmp_path) as h:
        wal = Path(h.coord.settings.db_path + "-wal")
        payload = {"blob": "x" * 60_000}

        async def submits(n: int) -> None:
            for _ in range(n):
                await h.submit(payload)

        await submits(100)
        reader = sqlite3.connect(h.coord.settings.db_path, isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM jobs").fetchone()  # the snapshot is pinned from here
        await submits(400)
        assert wal.stat().st_size > ac.WAL_SIZE_LIMIT_BYTES  # 400 x 60 KB: nothing could be checkpointed away
        assert await h.coord.wal_checkpoint() == "partial"  # frames the reader may still need stay in the log
        reader.execute("COMMIT")
        reader.close()
        await submits(20)
        assert await h.coord.wal_checkpoint() == "complete"
        await submits(5)  # the next commits restart the log and cut the file back
        assert wal.stat().st_size <= ac.WAL_SIZE_LIMIT_BYTES
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for family in
                   text_string_to_metric_families((await h.client.get("/metrics")).text) for s in family.samples}
        assert samples[("aitbc_db_wal_bytes", ())] == wal.stat().st_size
        assert samples[("aitbc_db_checkpoints_total", (("outcome", "partial"),))] == 1
        assert samples[("aitbc_db_checkpoints_total", (("outcome", "complete"),))] == 1
        assert samples[("aitbc_db_last_checkpoint_busy", ())] == 0
        assert samples[("aitbc_db_bytes", ())] > 30_000_000 and ("aitbc_db_free_bytes", ()) in samples


@pytest.mark.sqlite_only  # an upgrade of a SQLite file
def test_an_upgrade_keeps_the_fleet_totals_the_rows_imply(tmp_path: Path) -> None:
    """Offer statuses, the market totals and the completed jobs' run time, backfilled from version 1 rows."""
    db = tmp_path / "old.db"
    conn = sqlite3.connect(db)
    conn.executescript((Path(__file__).parent / "data" / "schema_v1.sql").read_text())
    miners = [("busy", 1.25, 1, "ONLINE", 3, 9000), ("free", 0.5, 2, "ONLINE", 1, 1000), ("away", 4.0, 1, "DRAINING", 0, 0)]
    for name, price, concurrency, status, done, busy_ms in miners:
        conn.execute("INSERT INTO miners (miner_id, offer_id, capabilities, price, sla, concurrency, status, session_token,"
                     " created_at, registered_at, last_seen, jobs_completed, busy_ms_total) VALUES (?, ?, '{}', ?, '', ?, ?,"
                     " 't', 0, 0, 0, ?, ?)", (name, f"offer-{name}", price, concurrency, status, done, busy_ms))
    conn.execute("INSERT INTO shapes (constraints) VALUES ('{}')")
    for i, miner in enumerate(("busy", "free")):
        conn.execute("INSERT INTO jobs (job_id, client_id, state, payload, constraints, shape_id, requested_at, expires_at,"
                     " assigned_miner_id, assigned_at) VALUES (?, 'c', 'RUNNING', '{}', '{}', 1, 0, 10, ?, 0)", (f"j{i}", miner))
    conn.commit()
    conn.close()
    assert ac.migrate(str(db)) == (1, ac.SCHEMA_VERSION)
    conn = ac.connect(str(db), readonly=True)
    try:
        assert dict(conn.execute("SELECT miner_id, offer_status FROM miners").fetchall()) == {
            "busy": "reserved", "free": "open", "away": "closed"}
        fleet = ac.get_fleet_totals(conn)
        assert (fleet["offers"], fleet["open_offers"], fleet["open_capacity"], fleet["online_miners"]) == (3, 1, 2, 3)
        assert ac.market_stats_view(fleet, 0)["averagePrice"] == 0.5
        assert ac.get_completed_busy_ms(conn) == 10_000
    finally:
        conn.close()


@pytest.mark.sqlite_only  # the SQLite file's mode
def test_a_database_the_coordinator_creates_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    """The quick start's database was created 0644 (the umask's default) while backups and archives are
    0600; its -wal and -shm files take the database file's mode from SQLite."""
    old = os.umask(0o022)
    try:
        path = tmp_path / "new.db"
        ac.migrate(str(path))
        conn = ac.connect(str(path))
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO signing_keys (key_id, role, first_seen_at) VALUES ('probe', 'signing', 1)")
            conn.execute("COMMIT")
            files = [path, tmp_path / "new.db-wal", tmp_path / "new.db-shm"]
            assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: "0o600" for f in files}
        finally:
            conn.close()
        existing = tmp_path / "shared.db"
        existing.touch(mode=0o640)  # an operator's own choice on a file that exists is kept
        ac.connect(str(existing)).close()
        assert oct(existing.stat().st_mode & 0o777) == "0o640"
    finally:
        os.umask(old)
