"""Model-based testing (issue 7.3): random lifecycles through the units of work, invariants after every step;
on SQLite, and on PostgreSQL (issue 18) when a server is named (tests/conftest.py: pg_server)."""

from __future__ import annotations

import collections
import json
import os
import sqlite3
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

import aitbc_coord as ac

MINERS = ("m0", "m1", "m2")
MAX_ATTEMPTS, TIMEOUT_MS = 3, 30_000
TERMINAL = {"COMPLETED", "FAILED", "CANCELED", "EXPIRED"}


class Lifecycle(RuleBasedStateMachine):
    jobs = Bundle("jobs")

    @initialize()
    def open_database(self) -> None:
        self.conn, self.matcher = self.connect()
        self.now = 1_764_000_000_000
        self.seen_terminal: dict[str, str] = {}
        self.held_by: dict[str, str] = {}  # the miner each RUNNING job was last handed to
        self.deleted_states: collections.Counter[str] = collections.Counter()  # jobs retention deleted
        self.deleted_touches: collections.Counter[str] = collections.Counter()  # of each address
        self.swept = False  # no unit since the last sweep: every offer is up to date

    def connect(self) -> tuple[Any, ac.Matcher]:
        """A new, empty database (a file in a temporary directory) and the Matcher the coordinator keeps."""
        self.dir = tempfile.TemporaryDirectory()
        path = str(Path(self.dir.name) / "model.db")
        ac.migrate(path)
        return ac.connect(path, "OFF"), ac.Matcher()

    def teardown(self) -> None:
        if hasattr(self, "conn"):
            self.conn.close()
            self.dir.cleanup()

    def transaction(self, fn: Any, *args: Any) -> Any:
        """`fn` as the writer runs a unit: in its own savepoint, committed; an ApiError it raises undoes
        its writes and is returned."""
        self.conn.execute("BEGIN IMMEDIATE")
        self.conn.execute("SAVEPOINT unit")
        try:
            out = fn(self.conn, *args)
        except ac.ApiError as exc:
            self.conn.execute("ROLLBACK TO unit")
            out = ac.Outcome(error=exc)
        self.conn.execute("RELEASE unit")
        self.conn.execute("COMMIT")
        return out

    def unit(self, fn: Any, *args: Any) -> Any:
        """Run a unit of work the way the writer does (transaction), error returned."""
        self.swept = False
        out = self.transaction(fn, *args)
        self.matcher.queue(job[2] for job in out.wake.queued)  # as Coordinator.apply does after the commit
        return out

    def job(self, job_id: str) -> sqlite3.Row:
        return ac.get_job(self.conn, job_id)

    # max_price 1.0 and 1.03 share a threshold bucket; a miner asking 1.02 meets only some of its jobs
    @rule(target=jobs, ttl=st.integers(1, 120), region=st.sampled_from([None, "eu", "None"]),
          max_price=st.sampled_from([None, 0.9, 1.0, 1.03, 2.0]))
    def submit(self, ttl: int, region: str | None, max_price: float | None = None) -> str:
        constraints = {**dict.fromkeys(ac.CONSTRAINT_KEYS), "region": region, "max_price": max_price}
        out = self.unit(ac.tx_submit, "client", "{}", ac.compact_json(constraints), ac.shape_of(constraints),
                        ttl * 1000, self.now, None, 0)
        return out.value["job_id"]

    @rule(miner=st.sampled_from(MINERS), concurrency=st.integers(1, 3), region=st.sampled_from([None, "eu", "us", "None"]),
          price=st.sampled_from([1, 1.02]))
    def register(self, miner: str, concurrency: int, region: str | None, price: float = 1) -> None:
        self.unit(ac.tx_register, miner, {"price": price}, concurrency, region, self.now, MAX_ATTEMPTS)

    @rule(miner=st.sampled_from(MINERS), status=st.sampled_from(["ONLINE", "DRAINING"]))
    def heartbeat(self, miner: str, status: str) -> None:
        self.unit(ac.tx_heartbeat, miner, None, status, None, self.now)

    @rule(miner=st.sampled_from(MINERS))
    def poll(self, miner: str) -> None:
        out = self.unit(ac.tx_poll, miner, self.now, self.matcher)
        if out.error is not None:
            return
        job, profile, ready = out.value
        if job is not None:
            job_id = job["job_id"]
            assert self.job(job_id)["state"] == "RUNNING"
            assert ac.satisfies(json.loads(job["constraints"]), profile), (job["constraints"], profile)
            self.held_by[job_id] = miner
        elif ready:  # nothing claimed with a free slot: no live queued job it can run was passed over
            for (constraints,) in self.conn.execute("SELECT constraints FROM jobs WHERE state = 'QUEUED'"
                                                    " AND expires_at > ?", (self.now,)):
                assert not ac.satisfies(json.loads(constraints), profile), (constraints, profile)

    def deleted(self, job_id: str, fn: Any, *args: Any) -> bool:
        """Whether retention deleted the job: then a unit naming it finds no job (404) and changes nothing."""
        if self.job(job_id) is not None:
            return False
        out = self.unit(fn, *args)
        assert isinstance(out.error, ac.NotFound), out
        return True

    def may_report(self, miner: str, job_id: str) -> bool:
        before = self.job(job_id)
        return before["state"] == "RUNNING" and before["assigned_miner_id"] == miner and before["expires_at"] > self.now

    @rule(miner=st.sampled_from(MINERS), job_id=jobs)
    def result(self, miner: str, job_id: str) -> None:
        if self.deleted(job_id, ac.tx_result, miner, job_id, {"r": 1}, {}, self.now + 1, None, "c"):
            return
        allowed = self.may_report(miner, job_id) and ac.get_miner(self.conn, miner) is not None
        out = self.unit(ac.tx_result, miner, job_id, {"r": 1}, {}, self.now + 1, None, "c")
        accepted = out.error is None
        repeat = not allowed and accepted  # the same result again from the miner that completed it
        assert accepted == allowed or (repeat and self.job(job_id)["state"] == "COMPLETED"
                                       and self.job(job_id)["assigned_miner_id"] == miner)

    @rule(miner=st.sampled_from(MINERS), job_id=jobs, retryable=st.booleans())
    def fail(self, miner: str, job_id: str, retryable: bool) -> None:
        if self.deleted(job_id, ac.tx_fail, miner, job_id, "E: x", "{}", retryable, self.now, MAX_ATTEMPTS):
            return
        allowed = self.may_report(miner, job_id) and ac.get_miner(self.conn, miner) is not None
        attempts = self.job(job_id)["attempts"]
        out = self.unit(ac.tx_fail, miner, job_id, "E: x", "{}", retryable, self.now, MAX_ATTEMPTS)
        if allowed:
            assert out.error is None
            want = "QUEUED" if retryable and attempts < MAX_ATTEMPTS else "FAILED"
            assert self.job(job_id)["state"] == want

    @rule(job_id=jobs)
    def cancel(self, job_id: str) -> None:
        if self.deleted(job_id, ac.tx_cancel, "client", job_id, self.now):
            return
        before = self.job(job_id)
        out = self.unit(ac.tx_cancel, "client", job_id, self.now)
        active = before["state"] in ("QUEUED", "RUNNING") and before["expires_at"] > self.now
        assert (out.error is None) == active

    @rule(seconds=st.integers(1, 45))
    def advance_clock(self, seconds: int) -> None:
        self.now += seconds * 1000

    @rule()
    def sweep(self) -> None:
        def silent(miner: str) -> bool:  # the model's clock of silence: the last request each miner made
            return ac.get_miner(self.conn, miner)["last_seen"] < self.now - TIMEOUT_MS

        miners = [m["miner_id"] for m in ac.list_miners(self.conn)]
        quiet = [m for m in miners if silent(m)]
        self.unit(ac.tx_sweep, self.now, silent, TIMEOUT_MS, MAX_ATTEMPTS, 0, None, None, quiet,
                  [m for m in miners if m not in quiet], miners)
        self.swept = True

    @rule(days=st.integers(0, 2))
    def retain(self, days: int) -> None:
        """Prune and delete what finished more than `days` days ago (the clock moves in seconds: 0 is all)."""
        before_rows = {r["job_id"]: r for r in self.conn.execute("SELECT * FROM jobs")}
        cutoff = self.now - days * 86_400_000 + 1
        self.unit(ac.tx_prune_due, cutoff, self.now, 5)
        self.unit(ac.tx_delete_jobs, cutoff, 5)
        self.unit(ac.tx_delete_receipts, cutoff, 8, 5)
        left = {r[0] for r in self.conn.execute("SELECT job_id FROM jobs")}
        for job_id, row in before_rows.items():
            if job_id not in left:
                assert row["state"] in TERMINAL
                self.deleted_states[row["state"]] += 1
                self.deleted_touches.update(a for a in (row["client_id"], row["assigned_miner_id"]) if a)

    @invariant()
    def slots_are_running_jobs_and_within_concurrency(self) -> None:
        running = ac.count_running_by_miner(self.conn)
        for miner in ac.list_miners(self.conn):
            assert running.get(miner["miner_id"], 0) <= miner["concurrency"]
        rows = self.conn.execute("SELECT job_id, state, assigned_miner_id, attempts FROM jobs").fetchall()
        assert sum(running.values()) == sum(r["state"] == "RUNNING" for r in rows)
        for r in rows:
            if r["state"] == "RUNNING":  # held by exactly the miner it was last handed to
                assert r["assigned_miner_id"] is not None and self.held_by[r["job_id"]] == r["assigned_miner_id"]
            if r["state"] == "QUEUED":
                assert r["assigned_miner_id"] is None

    @invariant()
    def terminal_states_never_change(self) -> None:
        for job_id, state in self.conn.execute("SELECT job_id, state FROM jobs"):
            if job_id in self.seen_terminal:
                assert state == self.seen_terminal[job_id], (job_id, self.seen_terminal[job_id], state)
            elif state in TERMINAL:
                self.seen_terminal[job_id] = state

    @invariant()
    def attempts_never_exceed_the_maximum(self) -> None:
        top = self.conn.execute("SELECT COALESCE(MAX(attempts), 0) FROM jobs").fetchone()[0]
        assert top <= MAX_ATTEMPTS

    @invariant()
    def kept_totals_match_the_rows_and_what_retention_deleted(self) -> None:
        counted = collections.Counter(dict(self.conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state")))
        kept = {k: v for k, v in ac.get_job_counts(self.conn).items() if v}
        assert kept == dict(counted + self.deleted_states)
        for row in self.conn.execute("SELECT address, SUM(tx_count) FROM addresses GROUP BY address"):
            touching = self.conn.execute("SELECT COUNT(*) FROM jobs WHERE client_id = ? OR assigned_miner_id = ?",
                                         (row[0], row[0])).fetchone()[0]
            assert row[1] == touching + self.deleted_touches[row[0]], (row[0], row[1], touching)

    @invariant()
    def fleet_totals_follow_the_offers_and_a_sweep_brings_offers_up_to_date(self) -> None:
        rows = self.conn.execute(f"SELECT offer_status, {ac.OFFER_STATUS_SQL} AS truth, online, concurrency, price"
                                 " FROM miners").fetchall()
        fleet = ac.get_fleet_totals(self.conn)
        is_open = [r for r in rows if r["offer_status"] == "open"]
        assert (fleet["offers"], fleet["online_miners"]) == (len(rows), sum(r["online"] for r in rows))
        assert (fleet["open_offers"], fleet["open_capacity"]) == (len(is_open), sum(r["concurrency"] for r in is_open))
        assert fleet["open_price_units"] * 10**6 + fleet["open_price_micro"] == sum(round(r["price"] * 10**6)
                                                                                  for r in is_open)
        if self.swept:
            assert [r["offer_status"] for r in rows] == [r["truth"] for r in rows]


Lifecycle.TestCase.settings = settings(max_examples=int(os.environ.get("MODEL_EXAMPLES", "60")), stateful_step_count=40, deadline=None,
                                       suppress_health_check=[HealthCheck.too_slow])
TestLifecycle = Lifecycle.TestCase


class PgLifecycle(Lifecycle):
    """The same machine on PostgreSQL: each run on a new database of the test server, the coordinator's
    Matcher as it is kept there (the queue read afresh), each unit in a transaction of its own."""

    def __init__(self, create_database: Callable[[], str]) -> None:
        super().__init__()
        self.create_database = create_database

    def connect(self) -> tuple[Any, ac.Matcher]:
        url = self.create_database()
        ac.migrate_pg(url)
        return ac.PgConnection(ac.pg_connect(url)), ac.Matcher(cache_queue=False)

    def teardown(self) -> None:
        if hasattr(self, "conn"):
            self.conn.close()

    def transaction(self, fn: Any, *args: Any) -> Any:
        try:
            with self.conn.raw.transaction():
                return fn(self.conn, *args)
        except ac.ApiError as exc:
            return ac.Outcome(error=exc)


def test_the_model_on_postgres(new_pg_database: Callable[[], str]) -> None:
    """Fewer runs than on SQLite (each makes a database; CI time matters): MODEL_EXAMPLES_PG."""
    run_state_machine_as_test(lambda: PgLifecycle(new_pg_database), settings=settings(
        max_examples=int(os.environ.get("MODEL_EXAMPLES_PG", "12")), stateful_step_count=40, deadline=None,
        suppress_health_check=[HealthCheck.too_slow]))


def a_step_really_checks_something(machine: Lifecycle) -> None:
    machine.open_database()
    try:
        job_id = machine.submit(10, None)
        machine.register("m0", 1, None)
        machine.poll("m0")
        machine.slots_are_running_jobs_and_within_concurrency()
        machine.conn.execute("UPDATE jobs SET state = 'QUEUED' WHERE job_id = ?", (job_id,))  # corrupt it
        try:
            machine.slots_are_running_jobs_and_within_concurrency()
        except AssertionError:
            return
        raise AssertionError("the invariant missed a QUEUED job that still has a miner")
    finally:
        machine.teardown()


def test_a_state_machine_step_really_checks_something() -> None:
    a_step_really_checks_something(Lifecycle())


def test_a_state_machine_step_really_checks_something_on_postgres(new_pg_database: Callable[[], str]) -> None:
    a_step_really_checks_something(PgLifecycle(new_pg_database))
