"""PostgreSQL only (issue 18): the units of work on several connections at once, each unit in a
transaction of its own and each connection in a thread of its own, as the writers of N coordinator
instances sharing one database run them. Claims (FOR UPDATE SKIP LOCKED), a result racing the sweep
(tx_sweep, and the cluster's tx_cluster_sweep) or a cancel, a miner's report racing its own poll,
concurrent first submits of a shape, and after a mixed soak the invariants the rows keep.

Interleavings are forced, never timed: a thread is held inside its open transaction by an Event right
after a data-layer call (Pause), and the test waits until PostgreSQL reports the other backend waiting
for that transaction's lock (pg_blocking_pids) before it lets the first one go on."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import rfc9162 as rfc
from nacl.signing import SigningKey

import aitbc_coord as ac

T0 = 1_764_000_000_000  # ms
TIMEOUT_MS, MAX_ATTEMPTS = 30_000, 3
WAIT = 30.0  # seconds a thread waits for another before the test fails (a hang, never a timing)
SIGNER = ac.Signer(SigningKey(bytes(range(32))))
PAYLOAD = '{"task":"t"}'


def run(conn: ac.PgConnection, fn: Callable[..., ac.Outcome], *args: Any,
        retried: collections.Counter[str] | None = None) -> ac.Outcome:
    """One unit of work in a transaction of its own, as a writer runs it: an ApiError it raises rolls it
    back and becomes the outcome's error; a deadlock or a serialisation failure runs it again, as
    PgDatabase does (3 runs in all; counted in `retried`)."""
    psycopg = ac.load_psycopg()
    for attempt in range(1, 4):
        try:
            with conn.raw.transaction():
                return fn(conn, *args)
        except ac.ApiError as exc:
            return ac.Outcome(error=exc)
        except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure) as exc:
            if retried is not None:
                retried[type(exc).__name__] += 1
            if attempt == 3:
                raise
    raise AssertionError("unreachable")


def constraints(**given: Any) -> tuple[str, str]:
    """A job's constraints as tx_submit takes them: (as stored, its shape)."""
    full = {**dict.fromkeys(ac.CONSTRAINT_KEYS), **given}
    return ac.stored_constraints(full), ac.shape_of(full)


def submit(conn: ac.PgConnection, client: str = "client", now: int = T0, ttl_ms: int = 600_000,
           **given: Any) -> str:
    out = run(conn, ac.tx_submit, client, PAYLOAD, *constraints(**given), ttl_ms, now, None, 0)
    assert out.error is None, out.error
    return str(out.value["job_id"])


def register(conn: ac.PgConnection, miner: str, concurrency: int = 1, region: str | None = None,
             now: int = T0) -> None:
    """Register `miner`, heard from at `now` (on the wall clock, and on the database's for tx_cluster_sweep)."""
    assert run(conn, ac.tx_register, miner, {"price": 0.25}, concurrency, region, now, MAX_ATTEMPTS, now).error is None


class Database:
    """A new database with the schema loaded: its URL, a connection for setup and checks, and more
    connections (each another instance's writer), all closed when the test ends."""

    def __init__(self, url: str) -> None:
        ac.migrate_pg(url)
        self.url, self.opened = url, []
        self.conn = self.connect()

    def connect(self, kind: type[ac.PgConnection] = ac.PgConnection, *args: Any) -> Any:
        """A writer's connection, as PgDatabase opens them (with a counter stripe of its own)."""
        raw = ac.pg_connect(self.url)
        ac.claim_counter_stripe(raw)
        conn = kind(raw, *args)
        self.opened.append(conn)
        return conn


@pytest.fixture
def db(pg_url: str) -> Iterator[Database]:
    database = Database(pg_url)
    yield database
    for conn in database.opened:
        conn.close()


@pytest.fixture
def threads() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        yield pool


class Pause:
    """Holds the thread that calls the data-layer function `name` right after the call, inside its
    unit's open transaction (row locks taken), until `go` is set; `reached` tells the test it is there."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.reached, self.go = threading.Event(), threading.Event()
        original = getattr(ac, name)

        def paused(*args: Any, **kwargs: Any) -> Any:
            value = original(*args, **kwargs)
            self.reached.set()
            assert self.go.wait(WAIT), f"{name}: never let go"
            return value
        monkeypatch.setattr(ac, name, paused)


def wait_until_blocked(monitor: ac.PgConnection, conn: ac.PgConnection, unit: concurrent.futures.Future[Any]) -> None:
    """Return once `conn`'s backend waits for a lock another transaction holds, or once its unit has
    finished (then nothing blocked it: the test's assertions judge what it did)."""
    pid = conn.raw.info.backend_pid
    deadline = time.monotonic() + WAIT
    while not unit.done():
        if monitor.execute("SELECT cardinality(pg_blocking_pids(CAST(? AS integer)))", (pid,)).fetchone()[0]:
            return
        assert time.monotonic() < deadline, "the unit neither waited for a lock nor finished"
        time.sleep(0.001)


Unit = tuple[Callable[..., ac.Outcome], tuple[Any, ...]]  # a unit of work and its arguments


def race(db: Database, threads: concurrent.futures.ThreadPoolExecutor, pause: Pause, first: Unit,
         second: Unit) -> tuple[ac.Outcome, ac.Outcome]:
    """Two units on two connections: `first` runs until `pause` holds it inside its transaction, then
    `second` runs until it waits for a lock first holds (or ends), then first goes on. Their outcomes;
    neither may have deadlocked (LOCK ORDER in aitbc_coord: PostgreSQL would abort one of them after
    deadlock_timeout, and it would run again)."""
    retried: collections.Counter[str] = collections.Counter()
    try:
        a = threads.submit(run, db.connect(), first[0], *first[1], retried=retried)
        assert pause.reached.wait(WAIT), "the first unit never reached its pause"
        own = db.connect()
        b = threads.submit(run, own, second[0], *second[1], retried=retried)
        wait_until_blocked(db.conn, own, b)
        pause.go.set()
        outcomes = a.result(WAIT), b.result(WAIT)
    finally:
        pause.go.set()
    assert not retried, f"the two units deadlocked: {retried}"
    return outcomes


# --- Invariants ---

def deadlocks(conn: ac.PgConnection) -> int:
    """Deadlocks PostgreSQL detected in this test's database (pg_stat_database, which a backend updates
    at its transaction's end and the statistics snapshot of this transaction caches: read it afresh)."""
    conn.execute("SELECT pg_stat_clear_snapshot()")
    return int(conn.execute("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()").fetchone()[0])


def check_invariants(conn: ac.PgConnection) -> dict[str, int]:
    """What must hold of the rows whatever ran concurrently; returns the jobs in each state."""
    states = dict(conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
    kept = {state: n for state, n in conn.execute("SELECT state, SUM(n) FROM job_counts GROUP BY state") if n}
    assert kept == states, "job_counts, summed over its stripes, differ from the rows"
    busy = conn.execute("SELECT COALESCE(SUM(finished_at - assigned_at), 0) FROM jobs WHERE state = 'COMPLETED'")
    assert conn.execute("SELECT SUM(busy_ms) FROM job_counts WHERE state = 'COMPLETED'").fetchone()[0] \
        == busy.fetchone()[0]

    receipts = conn.execute("SELECT COUNT(*) FROM receipts").fetchone()[0]
    assert conn.execute("SELECT SUM(n) FROM counters WHERE name = 'receipts'").fetchone()[0] == receipts
    wrong = conn.execute("SELECT job_id, state, COUNT(receipts.seq) FROM jobs LEFT JOIN receipts USING (job_id)"
                         " GROUP BY job_id, state HAVING (state = 'COMPLETED') <> (COUNT(receipts.seq) = 1)").fetchall()
    assert not wrong, f"jobs without exactly one receipt when COMPLETED, or with one otherwise: {wrong}"
    orphans = conn.execute("SELECT COUNT(*) FROM receipts WHERE job_id NOT IN (SELECT job_id FROM jobs)")
    assert orphans.fetchone()[0] == 0

    held = conn.execute("SELECT job_id, state, assigned_miner_id FROM jobs WHERE"
                        " (state IN ('RUNNING', 'COMPLETED') AND assigned_miner_id IS NULL)"
                        " OR (state = 'QUEUED' AND (assigned_miner_id IS NOT NULL OR assigned_at IS NOT NULL))"
                        " OR attempts > ? OR attempts < 0", (MAX_ATTEMPTS,)).fetchall()
    assert not held, f"jobs in a state their holder contradicts: {held}"
    over = conn.execute("SELECT miner_id, concurrency, COUNT(*) FROM miners JOIN jobs ON assigned_miner_id = miner_id"
                        " AND state = 'RUNNING' GROUP BY miner_id, concurrency"
                        " HAVING COUNT(*) > concurrency").fetchall()
    assert not over, f"miners holding more jobs than their concurrency: {over}"

    assert conn.execute("SELECT COALESCE(SUM(balance_micro), 0) FROM addresses").fetchone()[0] == 0
    touches = conn.execute(
        "SELECT address, tx_count, (SELECT COUNT(*) FROM jobs WHERE client_id = address OR assigned_miner_id = address)"
        " FROM (SELECT address, SUM(tx_count) AS tx_count FROM addresses GROUP BY address) AS a"
        " WHERE tx_count <> (SELECT COUNT(*) FROM jobs WHERE client_id = address"
        " OR assigned_miner_id = address)").fetchall()
    assert not touches, f"addresses whose tx_count is not the jobs that touch them: {touches}"
    fleet = ac.get_fleet_totals(conn)
    miners = conn.execute("SELECT COUNT(*), COALESCE(SUM(online), 0), COUNT(*) FILTER (WHERE offer_status = 'open'),"
                          " COALESCE(SUM(concurrency) FILTER (WHERE offer_status = 'open'), 0) FROM miners").fetchone()
    assert (fleet["offers"], fleet["online_miners"], fleet["open_offers"], fleet["open_capacity"]) == tuple(miners)

    size, low, high = conn.execute("SELECT COUNT(*), MIN(leaf_index), MAX(leaf_index) FROM log_leaves").fetchone()
    assert (low, high) == ((0, size - 1) if size else (None, None)), "receipt-log leaves with a gap"
    leaves = conn.execute("SELECT leaf_index, leaf_hash, receipt_id, job_id, body FROM log_leaves"
                          " JOIN receipts USING (receipt_id) ORDER BY leaf_index").fetchall()
    assert len(leaves) == size == receipts, "receipts and receipt-log leaves are not one to one"
    entries = [ac.unpack_receipt(body, receipt_id, job_id).encode() for _, _, receipt_id, job_id, body in leaves]
    assert [bytes(leaf[1]) for leaf in leaves] == [rfc.hash_leaf(entry) for entry in entries]
    assert ac.log_root(conn, size) == rfc.Tree(entries).root(size), "the stored subtrees disagree with the leaves"
    return states


# --- 1. Claims ---

POLLERS, POLLS_EACH = 16, 12


def test_sixteen_pollers_on_one_shape_share_no_job_and_never_come_back_empty(db, threads) -> None:
    """As many polls as queued jobs, 16 miners at once: each poll gets a job and no two the same one.
    (A probe that does not lock the head it finds has pollers that found the same head wait for the
    winner's claim, then find it taken and come back empty; one that locks it without SKIP LOCKED
    has them wait in turn for each other's commits.)"""
    conn = db.conn
    queued = [submit(conn) for _ in range(POLLERS * POLLS_EACH)]
    miners = [f"m{i:02d}" for i in range(POLLERS)]
    for miner in miners:
        register(conn, miner, concurrency=POLLS_EACH)
    start = threading.Barrier(POLLERS)

    def poller(miner: str, own: ac.PgConnection) -> list[str | None]:
        matcher = ac.Matcher(cache_queue=False)  # one an instance, as Coordinator keeps it
        start.wait(WAIT)
        got = []
        for i in range(POLLS_EACH):
            job, _, ready = run(own, ac.tx_poll, miner, T0 + 1 + i, matcher).value
            assert ready
            got.append(None if job is None else job["job_id"])
        return got

    claims = dict(zip(miners, [f.result() for f in [threads.submit(poller, m, db.connect()) for m in miners]]))
    empty = sum(job is None for got in claims.values() for job in got)
    assert empty == 0, f"{empty} polls came back empty while jobs waited"
    claimed = [job for got in claims.values() for job in got]
    assert sorted(claimed) == sorted(queued), "a job claimed twice, or one left behind"
    rows = {r["job_id"]: r for r in conn.execute("SELECT job_id, state, assigned_miner_id, attempts FROM jobs")}
    for miner, got in claims.items():
        for job_id in got:
            assert (rows[job_id]["state"], rows[job_id]["assigned_miner_id"], rows[job_id]["attempts"]) \
                == ("RUNNING", miner, 1)
    assert check_invariants(conn) == {"RUNNING": len(queued)}


def test_two_polls_of_one_miner_on_two_instances_never_exceed_its_concurrency(db, threads, monkeypatch) -> None:
    """A miner's polls reach two instances at once (its concurrency is 1). The second waits for the
    first's lock on the miner's row; once the first commits its claim, the second must count that
    claim and take nothing."""
    conn = db.conn
    for _ in range(2):
        submit(conn)
    register(conn, "m", concurrency=1)
    pause = Pause(monkeypatch, "assign_job")  # the first poll has claimed a job, not yet committed
    first, second = race(db, threads, pause, (ac.tx_poll, ("m", T0 + 1, ac.Matcher(cache_queue=False))),
                         (ac.tx_poll, ("m", T0 + 2, ac.Matcher(cache_queue=False))))
    (job_a, _, ready_a), (job_b, _, ready_b) = first.value, second.value
    assert job_a is not None and ready_a
    assert job_b is None and not ready_b, "the second poll claimed a job beyond the miner's concurrency"
    assert check_invariants(conn) == {"RUNNING": 1, "QUEUED": 1}


# A miner's report (or re-registration) on one instance while its poll runs on another: the report
# writes the miner's row and the job's, the poll claims a job, which writes the miner's address row.
REPORTS = {
    "result": ("finish_job", lambda job_id: (ac.tx_result, ("m", job_id, {"ok": 1}, {}, T0 + 1, SIGNER, "coord",
                                                            ac.LogEdge()))),
    "fail": ("requeue_job", lambda job_id: (ac.tx_fail, ("m", job_id, "E: x", "{}", True, T0 + 1, MAX_ATTEMPTS))),
    "register": ("release_running", lambda job_id: (ac.tx_register, ("m", {}, 2, None, T0 + 1, MAX_ATTEMPTS))),
}


@pytest.mark.parametrize("report", REPORTS)
def test_a_miners_report_and_its_poll_on_two_instances_take_turns_and_never_deadlock(
        db, threads, monkeypatch, report) -> None:
    """The report is held after it wrote the job (its address rows locked); the poll of the same miner
    then waits for the miner's row, which the report locked first, instead of taking it and then
    waiting for the address row while the report waits for the miner's row."""
    conn = db.conn
    register(conn, "m", concurrency=2)
    held = submit(conn)
    assert run(conn, ac.tx_poll, "m", T0, ac.Matcher(cache_queue=False)).value[0]["job_id"] == held
    waiting = submit(conn)
    call, unit = REPORTS[report]
    pause = Pause(monkeypatch, call)
    reported, polled = race(db, threads, pause, unit(held), (ac.tx_poll, ("m", T0 + 2, ac.Matcher(cache_queue=False))))
    assert reported.error is None and polled.error is None
    assert polled.value[0]["job_id"] == (held if report != "result" else waiting)  # re-queued: oldest first
    assert check_invariants(conn) == {"result": {"COMPLETED": 1, "RUNNING": 1},
                                      "fail": {"RUNNING": 1, "QUEUED": 1},
                                      "register": {"RUNNING": 1, "QUEUED": 1}}[report]


# --- 2. A result racing the sweep ---

DEADLINE_MS = 60_000


@pytest.fixture
def claimed(db: Database) -> str:
    """The id of one job, claimed by miner m (its one slot), due at T0 + DEADLINE_MS; a sweep has since
    brought m's offer up to date (reserved: taking the job back changes it)."""
    job_id = submit(db.conn, ttl_ms=DEADLINE_MS)
    register(db.conn, "m")
    job, _, _ = run(db.conn, ac.tx_poll, "m", T0, ac.Matcher(cache_queue=False)).value
    assert job["job_id"] == job_id
    run(db.conn, lambda conn: ac.Outcome(ac.refresh_offers(conn, ["m"])))  # as the next tick does
    assert ac.get_miner(db.conn, "m")["offer_status"] == "reserved"
    return job_id


# A sweep whose duty takes the job back: (the data-layer call that does, its `now`, the unit). tx_sweep
# is the one instance's (silence by the Coordinator's monotonic clock: is_silent), tx_cluster_sweep
# the cluster's (silence by heard_at on the database's clock: m was heard at T0).
SWEEPS = {
    "silent-miner": ("release_running", T0 + 2_000,
                     (ac.tx_sweep, (T0 + 2_000, lambda miner: miner == "m", TIMEOUT_MS, MAX_ATTEMPTS, 0))),
    "expiry": ("expire_due_jobs", T0 + DEADLINE_MS,
               (ac.tx_sweep, (T0 + DEADLINE_MS, lambda miner: False, TIMEOUT_MS, MAX_ATTEMPTS, 0))),
    "cluster-silent-miner": ("release_running", T0 + 2_000,
                             (ac.tx_cluster_sweep, (T0 + 2_000, T0 + TIMEOUT_MS + 1, 0, TIMEOUT_MS, MAX_ATTEMPTS, 0))),
    "cluster-expiry": ("expire_due_jobs", T0 + DEADLINE_MS,
                       (ac.tx_cluster_sweep, (T0 + DEADLINE_MS, T0 + 1_000, 0, TIMEOUT_MS, MAX_ATTEMPTS, 0))),
}


def result_unit(job_id: str) -> Unit:
    return ac.tx_result, ("m", job_id, {"answer": 42}, {}, T0 + 1_000, SIGNER, "coord", ac.LogEdge())


def sweep_unit(duty: str) -> Unit:
    return SWEEPS[duty][2]


@pytest.mark.parametrize("duty", SWEEPS)
def test_a_result_that_read_its_job_first_completes_it_and_the_sweep_takes_nothing_back(
        db, claimed, threads, monkeypatch, duty) -> None:
    conn, job_id = db.conn, claimed
    pause = Pause(monkeypatch, "get_report")  # the result has locked and read its job
    result, sweep = race(db, threads, pause, result_unit(job_id), sweep_unit(duty))
    assert result.error is None and result.value is not None
    assert sweep.error is None and sweep.value == 0
    job = ac.get_job(conn, job_id)
    assert (job["state"], job["assigned_miner_id"], job["attempts"]) == ("COMPLETED", "m", 1)
    assert ac.get_latest_receipt(conn, job_id) == result.value
    assert check_invariants(conn) == {"COMPLETED": 1}


@pytest.mark.parametrize("duty", SWEEPS)
def test_a_sweep_that_took_the_job_back_first_has_the_late_result_refused(db, claimed, threads, monkeypatch,
                                                                        duty) -> None:
    conn, job_id = db.conn, claimed
    call, now, _ = SWEEPS[duty]
    pause = Pause(monkeypatch, call)  # the sweep has taken the job back, not yet committed
    sweep, result = race(db, threads, pause, sweep_unit(duty), result_unit(job_id))
    assert isinstance(result.error, ac.Conflict), result
    assert sweep.error is None
    job = ac.get_job(conn, job_id)
    if duty.endswith("expiry"):
        assert (job["state"], job["finished_at"], sweep.value) == ("EXPIRED", now, 0)
        assert check_invariants(conn) == {"EXPIRED": 1}
    else:
        assert (job["state"], job["assigned_miner_id"], job["attempts"], sweep.value) == ("QUEUED", None, 1, 1)
        assert check_invariants(conn) == {"QUEUED": 1}
    assert conn.execute("SELECT COUNT(*) FROM receipts").fetchone()[0] == 0


# A client's cancel racing its job's result: whichever reads the job first decides it.

def cancel_unit(job_id: str) -> Unit:
    return ac.tx_cancel, ("client", job_id, T0 + 1_000)


def test_a_result_that_read_its_job_first_completes_it_and_the_cancel_is_refused(db, claimed, threads,
                                                                                 monkeypatch) -> None:
    pause = Pause(monkeypatch, "get_report")
    result, cancel = race(db, threads, pause, result_unit(claimed), cancel_unit(claimed))
    assert result.error is None and isinstance(cancel.error, ac.Conflict)
    assert ac.get_job(db.conn, claimed)["state"] == "COMPLETED"
    assert ac.get_latest_receipt(db.conn, claimed) == result.value
    assert check_invariants(db.conn) == {"COMPLETED": 1}


def test_a_cancel_that_read_the_job_first_cancels_it_and_the_result_is_refused(db, claimed, threads,
                                                                               monkeypatch) -> None:
    pause = Pause(monkeypatch, "get_job")  # tx_cancel's read (a result reads with get_report)
    cancel, result = race(db, threads, pause, cancel_unit(claimed), result_unit(claimed))
    assert cancel.error is None and isinstance(result.error, ac.Conflict)
    assert cancel.value["state"] == ac.get_job(db.conn, claimed)["state"] == "CANCELED"
    assert check_invariants(db.conn) == {"CANCELED": 1}


# --- The receipt log's edge ---

def test_an_append_rolled_back_and_then_made_by_another_instance_leaves_no_wrong_subtree(db) -> None:
    """An instance appends a receipt, then its transaction rolls back (a deadlock: PgDatabase runs the
    batch again); meanwhile another instance appends at that index. The first one's next append lands
    one past it, just where its LogEdge says the log ends: the edge must not vouch for a leaf the log
    no longer has, or the subtree hashes it stores disagree with the leaves for good."""
    conn = db.conn
    register(conn, "m", concurrency=3)
    matcher = ac.Matcher(cache_queue=False)
    jobs = []
    for _ in range(3):
        submit(conn)
        jobs.append(run(conn, ac.tx_poll, "m", T0, matcher).value[0]["job_id"])
    mine, other, edge = db.connect(), db.connect(), ac.LogEdge()

    class Deadlocked(Exception):
        pass
    with pytest.raises(Deadlocked), mine.raw.transaction():
        ac.tx_result(mine, "m", jobs[0], {"n": 0}, {}, T0 + 1, SIGNER, "coord", edge)
        raise Deadlocked
    assert run(other, ac.tx_result, "m", jobs[1], {"n": 1}, {}, T0 + 2, SIGNER, "coord", ac.LogEdge()).error is None
    assert run(mine, ac.tx_result, "m", jobs[2], {"n": 2}, {}, T0 + 3, SIGNER, "coord", edge).error is None
    assert check_invariants(conn) == {"COMPLETED": 2, "RUNNING": 1}


# --- 3. A new shape ---

class GatedConnection(ac.PgConnection):
    """Waits at `gate` before inserting a shape: every submit has looked for the shape and not found it."""

    def __init__(self, raw: Any, gate: threading.Barrier) -> None:
        super().__init__(raw)
        self.gate = gate

    def execute(self, sql: str, params: Any = ()) -> Any:
        if sql.startswith("INSERT INTO shapes"):
            self.gate.wait(WAIT)
        return super().execute(sql, params)


def test_concurrent_first_submits_of_a_new_shape_make_it_once(db, threads) -> None:
    conn = db.conn
    submit(conn, gpu="other")  # a shape already there
    writers = 8
    gate = threading.Barrier(writers)
    given = {"gpu": "RTX 4090", "min_vram_gb": 20}

    def first_submit(i: int, own: GatedConnection) -> ac.Outcome:
        return run(own, ac.tx_submit, f"client{i}", PAYLOAD, *constraints(**given), 600_000, T0, None, 0)

    outcomes = [f.result() for f in [threads.submit(first_submit, i, db.connect(GatedConnection, gate))
                                     for i in range(writers)]]
    assert [out.error for out in outcomes] == [None] * writers
    shapes = conn.execute("SELECT shape_id, constraints FROM shapes ORDER BY shape_id").fetchall()
    assert [s["constraints"] for s in shapes] == [constraints(gpu="other")[1], constraints(**given)[1]]
    jobs = conn.execute("SELECT job_id, shape_id, state FROM jobs WHERE shape_id = ?", (shapes[1]["shape_id"],))
    assert sorted((j["job_id"], j["state"]) for j in jobs) == sorted((o.value["job_id"], "QUEUED") for o in outcomes)
    assert check_invariants(conn) == {"QUEUED": writers + 1}


# --- 4. A mixed soak ---

SOAK_SECONDS = 3.0
MINERS = {f"m{i}": ("eu" if i < 3 else None) for i in range(6)}  # id: region
SHAPES = [{}, {"region": "eu"}]


def test_after_a_mixed_soak_every_invariant_holds(db, threads) -> None:
    """Submitters, two poll-and-report workers per miner (concurrency 2), a canceller and a sweeper
    (tx_sweep or a cluster tick, finding a random miner silent, re-registering another now and then),
    for SOAK_SECONDS; then the invariants, and every result that was accepted is the job's completion
    with its receipt."""
    conn = db.conn
    for miner, region in MINERS.items():
        register(conn, miner, concurrency=2, region=region)
    stop = threading.Event()
    began = time.monotonic()
    ran: collections.Counter[str] = collections.Counter()
    retried: collections.Counter[str] = collections.Counter()
    submitted: list[tuple[str, str]] = []
    accepted: list[tuple[str, str, str]] = []  # (job, miner, receipt)

    def now() -> int:  # one wall clock for all, moving with real time
        return T0 + int((time.monotonic() - began) * 1000)

    def worker(seed: int, body: Callable[[ac.PgConnection, random.Random, Any], None], own: ac.PgConnection) -> None:
        rng, state = random.Random(seed), (ac.Matcher(cache_queue=False), ac.LogEdge())  # an instance's own
        while not stop.is_set():
            body(own, rng, state)

    def submitting(own: ac.PgConnection, rng: random.Random, _: Any) -> None:
        client = rng.choice(["c1", "c2"])
        out = run(own, ac.tx_submit, client, PAYLOAD, *constraints(**rng.choice(SHAPES)), rng.choice([300, 5_000]),
                  now(), None, now() - 60_000, retried=retried)
        submitted.append((client, out.value["job_id"]))
        ran["submit"] += 1

    def mining(miner: str) -> Callable[[ac.PgConnection, random.Random, Any], None]:
        def body(own: ac.PgConnection, rng: random.Random, state: tuple[ac.Matcher, ac.LogEdge]) -> None:
            out = run(own, ac.tx_poll, miner, now(), state[0], retried=retried)
            job = out.error is None and out.value[0]
            if not job:
                ran["poll empty" if out.error is None else "poll refused"] += 1
                stop.wait(0.02)  # as a long-poll would wait (no CPU spent on polls that find nothing)
                return
            ran["claim"] += 1
            roll = rng.random()
            if roll < 0.7:
                out = run(own, ac.tx_result, miner, job["job_id"], {"n": rng.random()}, {"units": 1}, now(), SIGNER,
                          "coord", state[1], None, retried=retried)
                ran["result " + ("refused" if out.error else "accepted")] += 1
                if out.error is None:
                    accepted.append((job["job_id"], miner, out.value))
            elif roll < 0.85:
                out = run(own, ac.tx_fail, miner, job["job_id"], "E: x", "{}", rng.random() < 0.5, now(),
                          MAX_ATTEMPTS, retried=retried)
                ran["fail " + ("refused" if out.error else "accepted")] += 1
            else:
                ran["abandon"] += 1  # held until the sweep or its deadline takes it back
        return body

    def cancelling(own: ac.PgConnection, rng: random.Random, _: Any) -> None:
        if submitted:
            client, job_id = rng.choice(submitted)
            out = run(own, ac.tx_cancel, client, job_id, now(), retried=retried)
            ran["cancel " + ("refused" if out.error else "accepted")] += 1
        stop.wait(0.01)

    def sweeping(own: ac.PgConnection, rng: random.Random, _: Any) -> None:
        at, quiet = now(), rng.choice(list(MINERS)) if rng.random() < 0.5 else None  # quiet: found silent
        if rng.random() < 0.5:  # one instance's sweep
            out = run(own, ac.tx_sweep, at, lambda miner: miner == quiet, TIMEOUT_MS, MAX_ATTEMPTS, at - 60_000,
                      retried=retried)
            ran["sweep"] += 1
        else:  # a tick in a cluster: this instance's part, then the cluster's (silent: not heard at `at`)
            run(own, ac.tx_record_heard, {m: at for m in MINERS if m != quiet}, at, retried=retried)
            out = run(own, ac.tx_cluster_sweep, at, at, 0, 0, MAX_ATTEMPTS, at - 60_000, retried=retried)
            ran["cluster sweep"] += 1
        ran["taken back"] += out.value
        if rng.random() < 0.2:
            miner = rng.choice(list(MINERS))
            run(own, ac.tx_register, miner, {"price": 0.25}, 2, MINERS[miner], now(), MAX_ATTEMPTS, retried=retried)
            ran["register"] += 1
        stop.wait(0.02)

    seeds = itertools.count(1)
    bodies = [submitting, submitting, cancelling, sweeping]
    bodies += [mining(miner) for miner in MINERS for _ in range(2)]
    futures = [threads.submit(worker, next(seeds), body, db.connect()) for body in bodies]
    stop.wait(SOAK_SECONDS)
    stop.set()
    for future in futures:
        future.result(WAIT)

    for kind in ("submit", "claim", "result accepted", "fail accepted", "abandon", "cancel accepted", "sweep",
                 "cluster sweep", "register", "taken back"):
        assert ran[kind] > 0, (kind, ran, retried)
    assert not retried, f"units ran again (LOCK ORDER): {retried}"
    assert deadlocks(conn) == 0
    states = check_invariants(conn)
    assert states.get("COMPLETED", 0) == len(accepted) > 0
    for job_id, miner, receipt in accepted:
        job = ac.get_job(conn, job_id)
        assert (job["state"], job["assigned_miner_id"]) == ("COMPLETED", miner)
        assert ac.get_latest_receipt(conn, job_id) == receipt
    assert sum(states.values()) == len(submitted)


CLIENT_KEYS = [f"client-{k}" for k in range(8)]
LIFECYCLE_MINERS = [f"miner-{k}" for k in range(8)]
JOBS_PER_CLIENT = 20


def test_two_instances_running_lifecycles_for_many_clients_never_run_a_unit_again(pg_url: str) -> None:
    """Two instances' writers (two PgDatabase, WRITERS connections each) on one database run whole
    lifecycles at once: eight client keys submit on either instance, eight miners poll and report on
    either (results with receipts: balances move, the receipt log grows), and both instances tick
    (their part, then the cluster's duties). No unit ran again (PgDatabase.retried: a deadlock or a
    serialisation failure) and PostgreSQL detected no deadlock; every job is
    completed with its receipt, each client paid for its jobs, and the rows keep every invariant."""
    ac.migrate_pg(pg_url)
    total = len(CLIENT_KEYS) * JOBS_PER_CLIENT
    shape = constraints()

    def now() -> int:
        return T0 + int(time.monotonic() * 1000) % 1_000_000

    async def main() -> list[ac.PgDatabase]:
        instances = [ac.PgDatabase(pg_url), ac.PgDatabase(pg_url)]
        for db in instances:
            await db.start()
        try:
            edges = [ac.LogEdge(), ac.LogEdge()]  # each instance's own
            matchers = [ac.Matcher(cache_queue=False), ac.Matcher(cache_queue=False)]
            for k, miner in enumerate(LIFECYCLE_MINERS):
                out = await instances[k % 2].write(ac.tx_register, miner, {"price": 0.25}, 2, None, now(),
                                                   MAX_ATTEMPTS, now())
                assert out.error is None
            completed: list[str] = []
            done = asyncio.Event()

            async def client(k: int, name: str) -> None:
                for n in range(JOBS_PER_CLIENT):
                    out = await instances[(k + n) % 2].write(ac.tx_submit, name, PAYLOAD, *shape, 600_000, now(),
                                                             None, 0)
                    assert out.error is None

            async def mining(k: int, miner: str) -> None:
                turn = k
                while not done.is_set():
                    turn += 1
                    i = turn % 2  # a poll on one instance, its report on the other, as a balancer deals them
                    out = await instances[i].write(ac.tx_poll, miner, now(), matchers[i])
                    job = out.value[0]
                    if not job:
                        await asyncio.sleep(0.002)
                        continue
                    i = 1 - i
                    out = await instances[i].write(ac.tx_result, miner, job["job_id"], {"n": turn}, {}, now(), SIGNER,
                                                   "coord", edges[i], None)
                    assert out.error is None, out.error
                    completed.append(job["job_id"])
                    if len(completed) == total:
                        done.set()

            async def ticking(i: int) -> None:
                while not done.is_set():
                    at = now()
                    await instances[i].write(ac.tx_record_heard, {m: at for m in LIFECYCLE_MINERS}, at - TIMEOUT_MS)
                    await instances[i].write(ac.tx_cluster_sweep, at, at, 0, TIMEOUT_MS, MAX_ATTEMPTS, at - 60_000)
                    await asyncio.sleep(0.01)

            await asyncio.wait_for(asyncio.gather(*[client(k, c) for k, c in enumerate(CLIENT_KEYS)],
                                                  *[mining(k, m) for k, m in enumerate(LIFECYCLE_MINERS)],
                                                  ticking(0), ticking(1)), WAIT * 4)
            assert sorted(completed) == sorted(set(completed))
        finally:
            for db in instances:
                await db.close()
        return instances

    instances = asyncio.run(main())
    assert [dict(db.retried) for db in instances] == [{}, {}], "units ran again (LOCK ORDER)"
    raw = ac.pg_connect(pg_url)
    try:
        conn = ac.PgConnection(raw)
        assert deadlocks(conn) == 0
        assert check_invariants(conn) == {"COMPLETED": total}
        assert ac.get_counter(conn, "receipts") == total == ac.get_log_size(conn)
        balances = dict(conn.execute("SELECT address, SUM(balance_micro) FROM addresses GROUP BY address").fetchall())
        paid = dict(conn.execute("SELECT jobs.client_id, -SUM(CAST(sqlite_round(receipts.price * 1000000) AS bigint))"
                                 " FROM receipts JOIN jobs USING (job_id) GROUP BY jobs.client_id").fetchall())
        assert {c: balances[c] for c in CLIENT_KEYS} == paid and all(paid[c] < 0 for c in CLIENT_KEYS)
        stripes = conn.execute("SELECT COUNT(DISTINCT stripe) FROM job_counts WHERE stripe >= 16").fetchone()[0]
        assert stripes >= 2  # each writer added to a stripe of its own
    finally:
        raw.close()
