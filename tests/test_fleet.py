"""A fleet on one coordinator: what an event costs does not grow with the miners it does not concern.

Deterministic counts, not timings: waiters the hub examines, lines the rate limiter runs, SQLite VM
steps of a poll; and liveness measured on a monotonic clock that tests step apart from the wall clock.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
import threading
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import aitbc_coord as ac
from conftest import CLIENT, FakeClock, Harness, database_of, failing_commits, harness, open_database

pytestmark = pytest.mark.anyio
ANY = ac.compact_json(dict.fromkeys(ac.CONSTRAINT_KEYS))


def profile(miner_id: str, region: str | None = None, price: float = 1.0) -> ac.MinerProfile:
    return ac.MinerProfile(miner_id, {"price": price}, region, 1, "ONLINE", "t" * 32, ac.fit_key_of({"price": price}, region))


def constraints(**set_: Any) -> str:
    return ac.compact_json({**dict.fromkeys(ac.CONSTRAINT_KEYS), **set_})


def count_writes(h: Harness, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The units of work the coordinator commits from now on, by name (either backend)."""
    units: list[str] = []
    write = h.coord.db.write

    async def counted(fn: Any, *args: Any) -> Any:
        units.append(fn.__name__)
        return await write(fn, *args)

    monkeypatch.setattr(h.coord.db, "write", counted)
    return units


async def test_a_job_no_parked_miner_can_run_examines_none_of_them() -> None:
    hub = ac.PollHub()
    for i in range(10_000):
        hub.park(hub.add(f"m{i}"), profile(f"m{i}", region="us"), ready=True)
    hub.notify(ac.Wake(queued=[("j1", constraints(region="eu"), 1)]))
    assert hub.examined == 0 and not any(w.event.is_set() for w in hub.waiters)
    hub.notify(ac.Wake(queued=[("j2", constraints(region="us"), 2)]))
    woken = [w for w in hub.waiters if w.event.is_set()]
    assert hub.examined == 1 and [w.miner_id for w in woken] == ["m0"]  # one, the longest waiting


async def test_the_longest_waiting_able_miner_gets_the_job_across_kinds() -> None:
    hub = ac.PollHub()
    cheap, dear, eu = hub.add("cheap"), hub.add("dear"), hub.add("eu")
    hub.park(eu, profile("eu", region="eu"), ready=True)  # waiting longest, but cannot run it
    hub.park(dear, profile("dear", price=5.0), ready=True)  # too dear for the job
    hub.park(cheap, profile("cheap", price=0.5), ready=True)
    hub.notify(ac.Wake(queued=[("j", constraints(max_price=1.0), 1)]))
    assert [w.miner_id for w in hub.waiters if w.event.is_set()] == ["cheap"]
    assert cheap.woken_for == [("j", constraints(max_price=1.0), 1)] and not dear.woken_for


async def test_a_miner_with_no_region_never_gets_a_job_for_the_region_named_none(tmp_path: Path) -> None:
    """Region "None" and no region at all are different miners to match: a claim by one never hands
    the other its jobs (their kinds were once one key, "None" + capabilities, and whichever claimed
    first decided for both)."""
    env = {"MINER_API_KEYS": "named=key-named,nowhere=key-nowhere"}
    named, nowhere = {"X-Api-Key": "key-named"}, {"X-Api-Key": "key-nowhere"}
    async with harness(tmp_path, env) as h:
        await h.register(named, capabilities={"price": 1}, region="None")
        await h.register(nowhere, capabilities={"price": 1})
        first, second = await h.submit(constraints={"region": "None"}), await h.submit(constraints={"region": "None"})
        assert (await h.take(named))["job_id"] == first["job_id"]
        assert (await h.poll(nowhere)).status_code == 204
        assert (await h.job(second["job_id"]))["state"] == "QUEUED"
        assert (await h.result(first["job_id"], headers=named)).status_code == 200
        assert (await h.take(named))["job_id"] == second["job_id"]


CAPABILITY_VALUES = st.one_of(st.none(), st.booleans(), st.sampled_from([0, 1, 1.0, 2, "1", "A100", "12.1", "None"]))
CAPABILITIES = st.dictionaries(
    st.sampled_from(["gpus", "cuda", "models", "price", "hostname", "gpu"]),
    st.one_of(CAPABILITY_VALUES, st.lists(st.one_of(CAPABILITY_VALUES, st.fixed_dictionaries(
        {}, optional={"name": CAPABILITY_VALUES, "memory_mb": st.sampled_from([1024, 2048.0, 81920, True, "2048"]),
                      "serial": CAPABILITY_VALUES})), max_size=3)))
REGIONS = st.sampled_from([None, "None", "", "eu", "null"])
JOB_CONSTRAINTS = st.fixed_dictionaries({}, optional={
    "region": REGIONS, "gpu": CAPABILITY_VALUES, "cuda": st.sampled_from([None, "12", "1", "True", "None"]),
    "min_vram_gb": st.sampled_from([None, 1, 2, 80]), "max_price": st.sampled_from([None, 0.5, 1, 2]),
    "models": st.lists(CAPABILITY_VALUES, max_size=2)})


@given(CAPABILITIES, REGIONS, CAPABILITIES, REGIONS, st.lists(JOB_CONSTRAINTS, min_size=1, max_size=8))
@settings(max_examples=500, deadline=None)
def test_miners_of_one_kind_meet_the_same_jobs(caps_a: dict[str, Any], region_a: str | None, caps_b: dict[str, Any],
                                               region_b: str | None, jobs: list[dict[str, Any]]) -> None:
    """A kind (fit_key) is what the hub wakes and the matcher remembers fits by: two miners of one
    kind must meet exactly the same jobs, and every shape the same way; what matching does not read
    (a hostname) does not split a kind."""
    a = ac.MinerProfile("a", caps_a, region_a, 1, "ONLINE", "t", ac.fit_key_of(caps_a, region_a))
    b = ac.MinerProfile("b", caps_b, region_b, 1, "ONLINE", "t", ac.fit_key_of(caps_b, region_b))
    if a.fit_key == b.fit_key:
        for job in jobs:
            assert ac.satisfies(job, a) == ac.satisfies(job, b), (job, a, b)
            shape = ac.load_json(ac.shape_of({**dict.fromkeys(ac.CONSTRAINT_KEYS), **job}))
            assert ac.fit_of(shape, a) == ac.fit_of(shape, b), (job, a, b)
    other = {**caps_a, "hostname": f"{caps_a.get('hostname')}-2"}
    assert ac.fit_key_of(other, region_a) == a.fit_key


def lines_run(fn: Any) -> int:
    """Lines of the module executed while `fn` runs: work, counted the same way every time."""
    lines = 0

    def count(frame: Any, event: str, arg: Any) -> Any:
        nonlocal lines
        if event == "line" and frame.f_code.co_filename == ac.__file__:
            lines += 1
        return count

    sys.settrace(count)
    try:
        fn()
    finally:
        sys.settrace(None)
    return lines


def renewal_lines(polls: int) -> float:
    """Hub lines per renewal when `polls` parked polls all end and start again at once."""
    hub = ac.PollHub()
    for i in range(polls):
        hub.park(hub.add(f"m{i}"), profile(f"m{i}"), ready=True)

    def renew_all() -> None:
        for i, w in enumerate(hub.waiters):
            hub.remove(w)
            hub.park(hub.add(f"m{i}"), profile(f"m{i}"), ready=True)

    lines = lines_run(renew_all)
    assert hub.count == polls and len(hub.kinds) == 1
    return lines / polls


async def test_renewals_cost_the_hub_the_same_with_any_number_of_polls() -> None:
    """5,000 polls end and start again in the same second: each renewal does O(1) hub work."""
    assert abs(renewal_lines(5_000) - renewal_lines(5)) < 1  # the same, up to the loop's own set-up


def return_lines(behind: int) -> float:
    """Hub lines for each of 100 polls that began first to come back from claims that missed (as in a
    burst of jobs) with `behind` polls parked after them, and then be picked in order."""
    hub = ac.PollHub()
    early = [hub.add(f"early{i}") for i in range(100)]  # began first, then went to claim
    for i in range(behind):
        hub.park(hub.add(f"m{i}"), profile(f"m{i}"), ready=True)

    def come_back() -> None:
        for w in reversed(early):  # claims end out of order
            hub.park(w, profile(w.miner_id), ready=True)

    lines = lines_run(come_back)
    order = []
    for n in range(100):
        hub.notify(ac.Wake(queued=[(f"j{n}", ANY, 1)]))
        order += [w.miner_id for w in early if w.woken_for and w.miner_id not in order]
    assert order == [f"early{i}" for i in range(100)]  # each kept its place: the longest waiting first
    return lines / 100


async def test_a_poll_back_from_a_missed_claim_keeps_its_place_at_the_same_cost_behind_any_number() -> None:
    """A burst at 10,000 miners: each poll whose claim missed parks again in its old place without
    walking the polls that parked after it."""
    assert return_lines(10_000) == return_lines(10)


# (op, which poll): park a new poll of a miner; park again a poll that is not parked (back from a
# claim, in any order); end a parked poll, or one that is claiming; queue a job (wakes the longest waiting)
HUB_STEPS = st.lists(st.tuples(st.sampled_from(["start", "return", "end", "leave", "job"]), st.integers(0, 1_000)),
                     max_size=300)


@given(HUB_STEPS)
@settings(max_examples=300, deadline=None)
def test_a_queued_job_wakes_the_longest_waiting_parked_poll_whatever_came_before(steps: list[Any]) -> None:
    """The hub against a reference (the parked polls sorted by when each began): every job goes to
    the one that began first, through renewals, returns out of order, ends and rebuilds."""
    ac.KindQueue.SLACK = 2  # rebuild often
    try:
        hub, parked, unparked = ac.PollHub(), [], []
        n = 0
        for op, i in steps:
            if op == "start":
                n += 1
                w = hub.add(f"m{n}")
                hub.park(w, profile(w.miner_id), ready=True)
                parked.append(w)
            elif op == "return" and unparked:
                w = unparked.pop(i % len(unparked))
                hub.park(w, profile(w.miner_id), ready=True)
                parked.append(w)
            elif op == "end" and parked:
                hub.remove(parked.pop(i % len(parked)))
            elif op == "leave" and unparked:
                hub.remove(unparked.pop(i % len(unparked)))
            elif op == "job":
                expected = min(parked, key=lambda w: w.since) if parked else None
                hub.notify(ac.Wake(queued=[(f"j{i}", ANY, 1)]))
                woken = [w for w in parked if w.woken_for]
                assert woken == ([expected] if expected else [])
                if expected:
                    expected.woken_for.clear()
                    parked.remove(expected)
                    hub.unpark(expected)  # as the poll does when it wakes
                    unparked.append(expected)  # it claims, may miss, and comes back
            queue = hub.kinds.get(profile("m").fit_key)
            assert (len(queue) if queue else 0) == len(parked)
    finally:
        ac.KindQueue.SLACK = 32


def test_the_hub_keeps_nothing_of_miners_whose_polls_have_ended() -> None:
    """A fleet's churn (miners that come, poll and go for good) does not grow the hub: slot versions
    are kept while a miner has polls, which is while a claim may compare them (changed_since)."""
    hub = ac.PollHub()
    for i in range(1_000):
        w = hub.add(f"m{i}")
        mark = hub.mark(w.miner_id)
        hub.notify(ac.Wake(miners={f"m{i}", f"never-polled{i}"}))  # its slot freed while it claimed
        assert hub.changed_since(mark, profile(w.miner_id), ready=True)
        hub.park(w, profile(w.miner_id), ready=i % 2 == 0)
        hub.remove(w)
    assert hub.by_miner == {} and hub.slot_versions == {} and hub.kinds == {} and hub.count == 0


def test_the_rate_limiter_does_the_same_work_per_call_with_10_or_200000_callers() -> None:
    clock = FakeClock(0.0)

    def lines_per_call(callers: int) -> float:
        limiter = ac.RateLimiter(1_000, 60, clock)
        clock.t = 0.0
        for i in range(callers):
            limiter.hit(f"c{i}")
        clock.t = 61.0  # a new window: every entry has ended

        def new_callers() -> None:
            for i in range(1_000):
                limiter.hit(f"new{i}")

        return lines_run(new_callers) / 1_000

    # Each new caller drops at most two ended entries: with 2,000 or 200,000 ended, exactly two each;
    # with 10, fewer once they are gone. Never more work because more callers are live.
    assert lines_per_call(200_000) == lines_per_call(2_000) >= lines_per_call(10)


def test_the_rate_limiter_still_limits_and_forgets_ended_windows() -> None:
    clock = FakeClock(0.0)
    limiter = ac.RateLimiter(2, 60, clock)
    limiter.hit("a")
    limiter.hit("a")
    with pytest.raises(ac.TooManyRequests):
        limiter.hit("a")
    clock.t = 60.0
    limiter.hit("a")  # a new window
    for i in range(5):
        limiter.hit(f"b{i}")
    assert list(limiter.counts) == ["a", "b0", "b1", "b2", "b3", "b4"]
    clock.t = 120.0
    for i in range(3):
        limiter.hit(f"c{i}")
    assert len(limiter.counts) == 3 + 6 - 6  # each new caller dropped up to two ended entries


async def test_a_wall_clock_step_reaps_no_healthy_miner(tmp_path: Path) -> None:
    wall, mono = FakeClock(), FakeClock(1000.0)
    async with harness(tmp_path, clock=wall, monotonic=mono) as h:
        await h.register()
        job = await h.submit()
        assert (await h.take())["job_id"] == job["job_id"]
        wall.advance(60)  # the wall clock jumps; no time has passed
        assert await h.coord.sweep() == 0
        assert (await h.result(job["job_id"])).status_code == 200


async def test_a_silent_miner_is_lost_whichever_way_the_wall_clock_moved(tmp_path: Path) -> None:
    wall, mono = FakeClock(), FakeClock(1000.0)
    async with harness(tmp_path, clock=wall, monotonic=mono) as h:
        await h.register()
        job = await h.submit()
        await h.take()
        wall.advance(-3600)  # set back an hour
        mono.advance(29)
        assert await h.coord.sweep() == 0
        mono.advance(2)  # 31 s of real silence
        assert await h.coord.sweep() == 1
        assert (await h.job(job["job_id"]))["state"] == "QUEUED"


async def test_after_a_restart_every_miner_gets_a_fresh_timeout(tmp_path: Path) -> None:
    mono = FakeClock(1000.0)
    async with harness(tmp_path, monotonic=mono) as h:
        await h.register()
        job = await h.submit()
        await h.take()
    mono.advance(600)  # down for ten minutes
    async with harness(tmp_path, monotonic=mono) as h:
        assert await h.coord.sweep() == 0  # not heard from since the start: a fresh timeout
        mono.advance(31)
        assert await h.coord.sweep() == 1
        assert (await h.job(job["job_id"]))["state"] == "QUEUED"


async def test_a_parked_poll_keeps_its_miner_alive_without_writes(tmp_path: Path) -> None:
    mono = FakeClock(1000.0)
    async with harness(tmp_path, monotonic=mono) as h:
        await h.register()
        job = await h.submit()
        await h.take()  # holds a job
        waiting = asyncio.create_task(h.poll(wait=30))
        await h.parked(1)
        await h.coord.sweep()  # records the poll's own request as its last_seen, once
        sqlite = not isinstance(h.coord.db, ac.PgDatabase)
        before = h.coord.db._wconn.total_changes if sqlite else None
        for _ in range(4):  # then sweeps while it waits write nothing for it
            mono.advance(30)
            assert await h.coord.sweep() == 0
        # (on PostgreSQL instances share no memory: a sweep stamps its parked miners' heard_at, on the
        # database's clock, once a third of HEARTBEAT_TIMEOUT_SECONDS, so that another instance sees them)
        assert not sqlite or h.coord.db._wconn.total_changes == before
        h.coord.hub.close()
        await waiting
        assert (await h.job(job["job_id"]))["state"] == "RUNNING"


async def test_jobs_that_each_name_their_own_price_share_a_few_shapes(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        await h.register(capabilities={"price": 0.5})
        for i in range(1, 301):
            job = await h.submit(constraints={"max_price": 1 + i / 1_000_000})
            assert (await h.take())["job_id"] == job["job_id"]
            assert (await h.result(job["job_id"])).status_code == 200
        assert await h.rows("SELECT COUNT(*) FROM shapes") == [(1,)]


async def test_a_miner_inside_a_price_bucket_takes_only_the_jobs_it_meets(tmp_path: Path) -> None:
    """1.00 and 1.03 share a bucket; a miner asking 1.02 meets the second only, however old the first."""
    async with harness(tmp_path) as h:
        low = await h.submit(constraints={"max_price": 1.0})
        high = await h.submit(constraints={"max_price": 1.03})
        await h.register(capabilities={"price": 1.02})
        assert (await h.take())["job_id"] == high["job_id"]
        assert (await h.poll()).status_code == 204
        assert (await h.job(low["job_id"]))["state"] == "QUEUED"


def _empty_poll_steps(path: str, now: int) -> int:
    conn = ac.connect(path)
    steps = [0]

    def count() -> int:
        steps[0] += 1
        return 0

    matcher = ac.Matcher()
    conn.execute("BEGIN")
    ac.tx_poll(conn, "m", now, matcher)  # the first poll learns what is queued
    conn.set_progress_handler(count, 1)
    job, _, ready = ac.tx_poll(conn, "m", now, matcher).value
    conn.set_progress_handler(None, 0)
    conn.execute("ROLLBACK")
    conn.close()
    assert job is None and ready
    return steps[0]


@pytest.mark.sqlite_only  # SQLite VM steps (its progress handler)
def test_an_empty_poll_costs_the_same_after_thousands_of_distinct_shapes(tmp_path: Path) -> None:
    fresh, used = str(tmp_path / "fresh.db"), str(tmp_path / "used.db")
    now = 1_764_000_000_000
    for path in (fresh, used):
        ac.migrate(path)
        conn = ac.connect(path)
        ac.upsert_miner(conn, "m", {"price": 0.5}, 1, None, "t" * 32, now)
        conn.close()
    conn = ac.connect(used)
    conn.execute("BEGIN")
    for i in range(2_000):  # each its own exact shape, as before thresholds were bucketed
        c = {**dict.fromkeys(ac.CONSTRAINT_KEYS), "max_price": 1 + i}
        text = ac.compact_json(c)
        ac.insert_job(conn, f"{i:032x}", "c", "{}", text, ac.ensure_shape(conn, text), now, now + 10**9)
    conn.execute("UPDATE jobs SET state = 'COMPLETED', finished_at = ?", (now,))
    conn.execute("COMMIT")
    conn.close()
    assert _empty_poll_steps(used, now) == _empty_poll_steps(fresh, now)


async def test_a_job_queued_while_a_poll_claims_is_not_missed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The poll is not parked while its claim runs; a job committed meanwhile makes it claim again."""
    async with harness(tmp_path) as h:
        await h.register()
        assert (await h.poll()).status_code == 204  # the queue is known to be empty: claims now read first
        original, first, loop, loop_thread = ac.read_poll, [True], asyncio.get_running_loop(), threading.get_ident()

        def arrive() -> None:
            h.coord.hub.notify(ac.Wake(queued=[("j", ANY, 1)]))
            loop.create_task(h.submit())

        def job_arrives_during_the_first_claim(conn: Any, *args: Any) -> Any:
            out = original(conn, *args)  # finds nothing...
            if first[0]:
                first[0] = False  # ...and a job is committed and notified before the poll has parked
                if threading.get_ident() == loop_thread:
                    arrive()
                else:  # PostgreSQL reads in a worker thread: the loop runs this before it resumes the claim
                    loop.call_soon_threadsafe(arrive)
                conn.execute("SELECT 1")  # (the read itself is unchanged)
            return out

        monkeypatch.setattr(ac, "read_poll", job_arrives_during_the_first_claim)
        before = h.coord.hub.queued_version
        r = await h.poll(wait=5)
        assert r.status_code == 200, r.text
        assert json.loads(r.text)["job_id"] and h.coord.hub.queued_version > before


async def test_many_parked_polls_one_job_one_claim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"MINER_API_KEYS": ",".join(f"m{i}=key-{i}" for i in range(50))}
    async with harness(tmp_path, env) as h:
        for i in range(50):
            await h.register({"X-Api-Key": f"key-{i}"})
        polls = [asyncio.create_task(h.poll({"X-Api-Key": f"key-{i}"}, wait=10)) for i in range(50)]
        await h.parked(50)
        claims: list[str] = []
        original = ac.claim

        def counting(conn: Any, miner_id: str, *args: Any) -> Any:
            claims.append(miner_id)
            return original(conn, miner_id, *args)

        monkeypatch.setattr(ac, "claim", counting)  # a poll's own claim, or one made for it by a submit
        try:
            await h.client.post("/v1/jobs", json={"payload": {}}, headers=CLIENT)
            done, _ = await asyncio.wait(polls, timeout=5, return_when=asyncio.FIRST_COMPLETED)
            await asyncio.sleep(0.05)  # room for any wrongly woken poll to reach the database
            assert claims == ["m0"] and len(done) == 1
        finally:
            h.coord.hub.close()
            await asyncio.gather(*polls)


async def test_a_heartbeat_does_not_cost_a_waiting_poll_its_place(tmp_path: Path) -> None:
    env = {"MINER_API_KEYS": "a=key-a,b=key-b,c=key-c"}
    async with harness(tmp_path, env) as h:
        for m in "abc":
            await h.register({"X-Api-Key": f"key-{m}"})
        polls = {}
        for n, m in enumerate("abc", 1):
            polls[m] = asyncio.create_task(h.poll({"X-Api-Key": f"key-{m}"}, wait=10))
            await h.parked(n)
        await h.client.post("/v1/miners/heartbeat", json={}, headers={"X-Api-Key": "key-b"})
        first, second = await h.submit(), await h.submit()
        await asyncio.wait([polls["a"], polls["b"]], timeout=5)
        assert polls["a"].result().json()["job_id"] == first["job_id"]
        assert polls["b"].result().json()["job_id"] == second["job_id"]
        h.coord.hub.close()
        await polls["c"]


async def test_polls_woken_together_each_claim_the_job_it_was_woken_for(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Claims of polls woken together may end in any order (PostgreSQL runs them on threads): the one
    woken second, claiming first, takes the job it was woken for, not the older one woken for the
    first, which the first could run and the other job not (it then sat idle while the newer job
    waited for the second miner)."""
    anywhere, eu = {"X-Api-Key": "key-a"}, {"X-Api-Key": "key-b"}
    async with harness(tmp_path, {"MINER_API_KEYS": "a=key-a,b=key-b"}) as h:
        await h.register(anywhere, capabilities={"price": 1})
        await h.register(eu, capabilities={"price": 1}, region="eu")
        waiting_a = asyncio.create_task(h.poll(anywhere, wait=5))
        await h.parked(1)
        waiting_b = asyncio.create_task(h.poll(eu, wait=5))
        await h.parked(2)
        write = h.coord.db.write

        async def a_claims_after_b(fn: Any, *args: Any) -> Any:
            if fn is ac.tx_poll and args[0] == "a":
                await asyncio.wait([waiting_b])
            return await write(fn, *args)

        monkeypatch.setattr(h.coord.db, "write", a_claims_after_b)
        first = await h.submit()  # a has waited longest: woken for it
        second = await h.submit(constraints={"region": "eu"})  # only b can run it
        assert (await waiting_b).json()["job_id"] == second["job_id"]
        assert (await waiting_a).json()["job_id"] == first["job_id"]


@pytest.mark.sqlite_only  # one writer: on PostgreSQL every heartbeat is written (another instance may have changed the row)
async def test_steady_heartbeats_are_recorded_by_the_sweep_not_a_write_each(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    async with harness(tmp_path) as h:
        await h.register()
        miner = {"X-Api-Key": ac.DEV_KEYS["miner"]}
        assert (await h.client.post("/v1/miners/heartbeat", json={"inflight": 0}, headers=miner)).status_code == 200
        writes = count_writes(h, monkeypatch)
        h.clock.advance(15)
        assert (await h.client.post("/v1/miners/heartbeat", json={"inflight": 0}, headers=miner)).status_code == 200
        assert writes == []  # the same report again: kept in memory
        await h.coord.sweep()
        miner_id = (await h.client.get("/v1/admin/miners", headers={"X-Api-Key": ac.DEV_KEYS["admin"]})
                    ).json()["items"][0]["miner_id"]
        row = await h.coord.db.read(ac.get_miner, miner_id)
        assert row["last_heartbeat"] == int(h.clock.t * 1000) == row["last_seen"]
        r = await h.client.post("/v1/miners/heartbeat", json={"inflight": 0, "status": "DRAINING"}, headers=miner)
        assert r.status_code == 200 and (await h.coord.db.read(ac.get_miner, miner_id))["status"] == "DRAINING"
        assert (await h.client.post("/v1/miners/heartbeat", json={}, headers={"X-Api-Key": "nope"})).status_code == 401


@pytest.mark.sqlite_only  # (what heartbeats were written is remembered with one writer only)
async def test_a_miner_gone_silent_is_no_longer_remembered_by_its_heartbeat(tmp_path: Path) -> None:
    mono = FakeClock(1000.0)
    async with harness(tmp_path, monotonic=mono) as h:
        await h.register()
        miner = {"X-Api-Key": ac.DEV_KEYS["miner"]}
        assert (await h.client.post("/v1/miners/heartbeat", json={"inflight": 0}, headers=miner)).status_code == 200
        [miner_id] = h.coord.reported
        mono.advance(31)
        await h.coord.sweep()
        assert miner_id not in h.coord.reported
        assert (await h.client.post("/v1/miners/heartbeat", json={"inflight": 0}, headers=miner)).status_code == 200
        assert (await h.coord.db.read(ac.get_miner, miner_id))["online"] == 1  # (written, not kept in memory)


async def heard_from_a_fleet(h: Any) -> tuple[int, int]:
    """3 * LIVENESS_UNIT + 10 registered miners, all heard from 5 s later and not yet recorded: the
    even ones by a request, the odd ones by a heartbeat that changed nothing else; (n, then in ms)."""
    n = 3 * ac.LIVENESS_UNIT + 10
    for i in range(n):
        await h.coord.apply(ac.tx_register, f"m{i}", {}, 1, None, h.coord.now(), 3)
    h.clock.advance(5)
    at = int(h.clock.t * 1000)
    h.coord.unrecorded = {f"m{i}": at for i in range(0, n, 2)}
    h.coord.unrecorded_beats = {f"m{i}": (at, None) for i in range(1, n, 2)}
    return n, at


async def fleet_rows(h: Harness, n: int) -> dict[int, Any]:
    """Miners m0 .. m{n-1}'s rows, by number."""
    return await h.coord.db.read(lambda conn: {i: ac.get_miner(conn, f"m{i}") for i in range(n)})


async def test_a_sweep_records_a_fleets_liveness_a_bounded_unit_at_a_time(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A unit of work holds the event loop while it runs: ~1,000 miners heard from between two sweeps
    at 10,000 miners held it 12-56 ms in one unit. Every one is recorded, in units of LIVENESS_UNIT."""
    async with harness(tmp_path) as h:
        unit_sizes = []
        touch = ac.touch_miners

        def counted(conn: Any, seen: dict[str, int], beats: dict[str, int]) -> None:
            unit_sizes.append(len(seen) + len(beats))
            touch(conn, seen, beats)

        monkeypatch.setattr(ac, "touch_miners", counted)
        n, at = await heard_from_a_fleet(h)
        await h.coord.sweep()
        assert sum(unit_sizes) == n and max(unit_sizes) <= ac.LIVENESS_UNIT and len(unit_sizes) == 4
        rows = await fleet_rows(h, n)
        assert all(rows[i]["last_seen"] == at for i in range(0, n, 2))
        assert all(rows[i]["last_heartbeat"] == at for i in range(1, n, 2))
        assert not h.coord.unrecorded and not h.coord.unrecorded_beats


async def test_a_stop_records_the_liveness_a_sweep_in_flight_and_the_requests_since_had_not(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A graceful stop (deploy, restart) cancels the sweeper: liveness kept in memory, whether taken by
    a sweep that had recorded only its first units or heard from since, is written before the
    database closes, not dropped."""
    async with harness(tmp_path) as h:
        n, at = await heard_from_a_fleet(h)
        touching = asyncio.Event()
        touch = ac.touch_miners

        def first_unit_after_the_sweeps_own(conn: Any, seen: dict[str, int], beats: dict[str, int]) -> None:
            touching.set()
            touch(conn, seen, beats)

        monkeypatch.setattr(ac, "touch_miners", first_unit_after_the_sweeps_own)
        h.coord._sweeper = asyncio.create_task(h.coord.sweep())  # what stop() cancels
        await touching.wait()  # the sweep's own unit is committed, the next one running
        h.clock.advance(1)
        h.coord.heard_from("m1")  # heard from again meanwhile
    conn = open_database(database_of(tmp_path))
    try:
        rows = {i: ac.get_miner(conn, f"m{i}") for i in range(n)}
    finally:
        conn.close()
    assert [i for i in range(0, n, 2) if rows[i]["last_seen"] != at] == []
    assert [i for i in range(1, n, 2) if rows[i]["last_heartbeat"] != at] == []
    assert rows[1]["last_seen"] == at + 1000


async def test_liveness_a_failed_commit_did_not_record_waits_for_the_next_sweep(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sweep's later unit whose commit fails: it and the units after it are put back (a miner heard
    from again meanwhile keeps its newer reading), and the next sweep records them."""
    async with harness(tmp_path) as h:
        n, at = await heard_from_a_fleet(h)
        db, calls = h.coord.db, []
        touch = ac.touch_miners

        def third_unit_fails(conn: Any, seen: dict[str, int], beats: dict[str, int]) -> None:
            calls.append(len(seen) + len(beats))
            if len(calls) == 3:
                h.coord.unrecorded_beats["m301"] = (at + 2000, None)  # in this unit, heard from again meanwhile
            touch(conn, seen, beats)

        monkeypatch.setattr(ac, "touch_miners", third_unit_fails)
        with failing_commits(db, lambda: len(calls) == 3) as failures, pytest.raises(ac.Unavailable):
            await h.coord.sweep()
        assert calls[:3] == [ac.LIVENESS_UNIT] * 3 and len(calls) == 3 and len(failures) == 1  # the fourth never ran
        assert (await db.read(ac.get_miner, "m301"))["last_heartbeat"] != at + 2000
        await h.coord.sweep()
        rows = await fleet_rows(h, n)
        assert [i for i in range(0, n, 2) if rows[i]["last_seen"] != at] == []
        assert [i for i in range(1, n, 2) if rows[i]["last_heartbeat"] != at and i != 301] == []
        assert rows[301]["last_heartbeat"] == at + 2000
        assert not h.coord.unrecorded and not h.coord.unrecorded_beats


def fleet_keys(n: int) -> dict[str, str]:
    return {"MINER_API_KEYS": ",".join(f"m{i}=key-{i}" for i in range(n))}


async def parked_fleet(h: Harness, n: int, wait: float = 10) -> list[asyncio.Task[Any]]:
    """`n` registered miners, each with one long-poll parked (m0 the longest waiting)."""
    for i in range(n):
        await h.register({"X-Api-Key": f"key-{i}"})
    polls = []
    for i in range(n):  # one at a time: m0 has waited longest
        polls.append(asyncio.create_task(h.poll({"X-Api-Key": f"key-{i}"}, wait=wait)))
        await h.parked(i + 1)
    return polls


@pytest.mark.sqlite_only  # on PostgreSQL units run on threads: a woken poll claims for itself
async def test_a_submit_hands_its_job_to_the_longest_waiting_poll_in_its_own_transaction(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with harness(tmp_path, fleet_keys(3)) as h:
        polls = await parked_fleet(h, 3)
        writes = count_writes(h, monkeypatch)
        job = await h.submit()
        done, _ = await asyncio.wait(polls, timeout=5, return_when=asyncio.FIRST_COMPLETED)
        assert [t.result().json()["job_id"] for t in done] == [job["job_id"]] and done.pop() is polls[0]
        assert writes == ["tx_submit"]  # no claim of its own: one commit between the submit and the miner
        row = await h.coord.db.read(ac.get_job, job["job_id"])
        assert row["state"] == "RUNNING" and row["attempts"] == 1
        r = await h.client.post(f"/v1/miners/{job['job_id']}/result", json={"result": {}}, headers={"X-Api-Key": "key-0"})
        assert r.status_code == 200, r.text
        h.coord.hub.close()
        await asyncio.gather(*polls)


@pytest.mark.sqlite_only
async def test_a_handed_poll_gets_the_oldest_job_it_can_run_and_the_new_one_wakes_the_next(
        tmp_path: Path) -> None:
    async with harness(tmp_path, fleet_keys(2)) as h:
        polls = await parked_fleet(h, 2)
        # a job queued whose wake-up has not reached the hub (as if it were still on the way)
        older = await h.coord.db.write(ac.tx_submit, "c", "{}", ac.compact_json({}), ac.shape_of({}), 60_000,
                                       h.coord.now(), None, 0)
        h.coord.matcher.queue([older.wake.queued[0][2]])
        newer = await h.submit()
        await asyncio.wait_for(asyncio.gather(*polls), 5)
        assert [p.result().json()["job_id"] for p in polls] == [older.value["job_id"], newer["job_id"]]


@pytest.mark.sqlite_only
async def test_a_hand_off_whose_commit_fails_leaves_the_poll_waiting_for_the_next_job(tmp_path: Path) -> None:
    async with harness(tmp_path, fleet_keys(1)) as h:
        (poll,) = await parked_fleet(h, 1, wait=30)
        with failing_commits(h.coord.db) as failed:
            r = await h.client.post("/v1/jobs", json={"payload": {}}, headers=CLIENT)
        assert r.status_code == 503 and failed and not h.coord.hub.handing
        await h.parked(1)  # it was given back, claimed (nothing was committed) and parked again
        job = await h.submit()
        assert (await asyncio.wait_for(poll, 5)).json()["job_id"] == job["job_id"]


@pytest.mark.sqlite_only
async def test_a_poll_whose_time_runs_out_during_its_hand_off_still_gets_the_job(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with harness(tmp_path, fleet_keys(1)) as h:
        (poll,) = await parked_fleet(h, 1, wait=0.3)
        original = ac.claim

        def slow(*args: Any) -> Any:
            time.sleep(0.5)  # the poll's deadline passes while the submit's transaction is open
            return original(*args)

        monkeypatch.setattr(ac, "claim", slow)
        job = await h.submit()
        r = await asyncio.wait_for(poll, 5)
        assert r.status_code == 200 and r.json()["job_id"] == job["job_id"]  # not a 204 with the job lost to it


def cancel_during_hand_off(monkeypatch: pytest.MonkeyPatch, task: Callable[[], asyncio.Task[Any]]) -> Any:
    """From now on, a hand-off's claim cancels task() as it runs: while the submit's commit is under
    way. Returns the real claim()."""
    loop, original = asyncio.get_running_loop(), ac.claim

    def then_cancel(*args: Any) -> Any:
        loop.call_soon(task().cancel)
        return original(*args)

    monkeypatch.setattr(ac, "claim", then_cancel)
    return original


@pytest.mark.sqlite_only
async def test_a_hand_off_whose_submit_request_went_away_before_the_commit_still_reaches_the_poll(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with harness(tmp_path, fleet_keys(1)) as h:
        (poll,) = await parked_fleet(h, 1, wait=0.5)
        submit: list[asyncio.Task[Any]] = []
        cancel_during_hand_off(monkeypatch, lambda: submit[0])  # the submitter's request is cancelled
        submit.append(asyncio.create_task(h.coord.apply(
            ac.tx_submit, "c", "{}", ac.compact_json({}), ac.shape_of({}), 60_000, h.coord.now(), None, 0, None,
            h.coord.hand_off)))
        with pytest.raises(asyncio.CancelledError):
            await submit[0]
        r = await asyncio.wait_for(poll, 5)  # the commit, not the submitter's coroutine, hands the job over
        assert r.status_code == 200 and not h.coord.hub.handing
        row = await h.coord.db.read(ac.get_job, r.json()["job_id"])
        assert row["state"] == "RUNNING" and row["assigned_miner_id"] == "m0"


@pytest.mark.sqlite_only
async def test_a_hand_off_whose_poll_ended_before_the_commit_puts_the_job_back_in_the_queue(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with harness(tmp_path, fleet_keys(1)) as h:
        (poll,) = await parked_fleet(h, 1, wait=30)
        original = cancel_during_hand_off(monkeypatch, lambda: poll)  # the poll's request ends
        job = await h.submit()
        with pytest.raises(asyncio.CancelledError):
            await poll
        monkeypatch.setattr(ac, "claim", original)
        for _ in range(200):  # the release is a unit of its own, after the commit
            if (await h.coord.db.read(ac.get_job, job["job_id"]))["state"] == "QUEUED":
                break
            await asyncio.sleep(0.01)
        assert (await h.take({"X-Api-Key": "key-0"}))["job_id"] == job["job_id"]  # not held by nobody until its lease ends


@pytest.mark.sqlite_only
async def test_a_hand_off_whose_claim_fails_leaves_no_shape_of_its_undone_submit_in_the_matcher(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with harness(tmp_path, fleet_keys(1)) as h:
        await h.register({"X-Api-Key": "key-0"}, region="eu")
        poll = asyncio.create_task(h.poll({"X-Api-Key": "key-0"}, wait=30))
        await h.parked(1)
        original = ac.assign_job

        def failing(*args: Any) -> Any:
            raise sqlite3.OperationalError("disk I/O error")  # after the matcher read the submit's new shape

        monkeypatch.setattr(ac, "assign_job", failing)
        r = await h.client.post("/v1/jobs", json={"payload": {}, "constraints": {"region": "eu"}}, headers=CLIENT)
        monkeypatch.setattr(ac, "assign_job", original)
        # whether the submit stands or not, no shape the matcher knows may differ from the committed one
        await h.parked(1)
        us = await h.submit(constraints={"region": "us"})  # a new shape (the undone one's id, if it was undone)
        eu = await h.submit(constraints={"region": "eu"})
        got = (await asyncio.wait_for(poll, 5)).json()["job_id"]
        assert got != us["job_id"]  # never a job the miner cannot run
        assert got in {eu["job_id"], *([r.json()["job_id"]] if r.status_code == 201 else [])}
