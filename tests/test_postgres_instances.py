"""Several coordinator instances on one PostgreSQL database (issue 18): wake-ups cross between them."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import aitbc_coord as ac
from conftest import ADMIN, MINER, FakeClock, Harness, harness

pytestmark = pytest.mark.anyio


@contextlib.asynccontextmanager
async def two_instances(tmp_path: Path, url: str) -> AsyncIterator[tuple[Harness, Harness]]:
    """Instances A and B of one cluster: each its own process state, one database."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with harness(tmp_path / "a", db_path=url) as a, harness(tmp_path / "b", db_path=url) as b:
        for h in (a, b):  # each listens, and counts the other, before the test starts
            await until(lambda h=h: h.coord.peers is not None and h.coord.peers.connected and h.coord.peers.others == 1)
        yield a, b


@contextlib.asynccontextmanager
async def alone(tmp_path: Path, url: str) -> AsyncIterator[tuple[Harness, ac.Peers]]:
    """Instance A on its own, listening and counting no other instance (B's directory made beside it
    for a test that starts one); yields A and its Peers."""
    for name in "ab":
        (tmp_path / name).mkdir()
    async with harness(tmp_path / "a", db_path=url) as a:
        peers = a.coord.peers
        assert peers is not None
        await until(lambda: peers.connected and peers.others == 0)
        yield a, peers


async def until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    """Wait until `condition()` holds (no fixed sleep); AssertionError after `seconds`."""
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    assert condition()


async def test_a_job_submitted_to_one_instance_wakes_a_miner_polling_another(tmp_path: Path, pg_url: str) -> None:
    async with two_instances(tmp_path, pg_url) as (a, b):
        await b.register(capabilities={"gpu": "a100"})
        for n in range(3):
            poll = asyncio.create_task(b.poll(wait=20))
            await b.parked(1)
            job = await a.submit({"n": n})
            r = await asyncio.wait_for(poll, 10)
            assert r.status_code == 200 and r.json()["job_id"] == job["job_id"]
            assert (await a.result(job["job_id"])).status_code == 200
        assert a.coord.peers.sent >= 3 and b.coord.peers.received >= 3  # type: ignore[union-attr]


async def test_a_slot_freed_on_one_instance_wakes_the_same_miners_poll_on_another(
        tmp_path: Path, pg_url: str) -> None:
    async with two_instances(tmp_path, pg_url) as (a, b):
        await a.register(capabilities={"gpu": "a100"}, concurrency=1)
        first, second = await a.submit({"n": 1}), await a.submit({"n": 2})
        assert (await a.take())["job_id"] == first["job_id"]
        poll = asyncio.create_task(b.poll(wait=20))  # its one slot is taken: it waits for the slot
        await b.parked(1)
        assert not poll.done()
        assert (await a.result(first["job_id"])).status_code == 200
        r = await asyncio.wait_for(poll, 10)
        assert r.status_code == 200 and r.json()["job_id"] == second["job_id"]


async def test_a_listener_cut_off_reconnects_and_no_job_waits_past_a_tick(tmp_path: Path, pg_url: str) -> None:
    """The server ends B's LISTEN connection: wake-ups sent meanwhile are lost; B reconnects, wakes its
    polls to claim again, and its sweep tick re-announces the queue's heads."""
    async with two_instances(tmp_path, pg_url) as (a, b):
        await b.register(capabilities={"gpu": "a100"})
        peers = b.coord.peers
        assert peers is not None
        poll = asyncio.create_task(b.poll(wait=20))
        await b.parked(1)
        reconnects = peers.reconnects
        with contextlib.closing(ac.PgConnection(ac.pg_connect(pg_url))) as admin:
            killed = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                                   " WHERE application_name = ? AND datname = current_database()",
                                   (ac.Peers.LISTENER_NAME,)).fetchall()
        assert len(killed) == 2  # A's listener and B's
        job = await a.submit({"n": 1})
        r = await asyncio.wait_for(poll, 10)  # B's reconnect woke the poll, which claimed
        assert r.status_code == 200 and r.json()["job_id"] == job["job_id"]
        assert peers.reconnects > reconnects
        assert (await a.result(job["job_id"])).status_code == 200
        # a job queued while nobody listens, with a poll parked on B: the tick's re-announcement finds it
        peers.on_wake = lambda wake: None  # this notification is "lost"
        poll = asyncio.create_task(b.poll(wait=20))
        await b.parked(1)
        lost = await a.submit({"n": 2})
        await asyncio.sleep(0.2)
        assert not poll.done()
        assert await b.coord.reannounce() == 1
        r = await asyncio.wait_for(poll, 10)
        assert r.status_code == 200 and r.json()["job_id"] == lost["job_id"]


async def test_an_instance_alone_sends_no_wake_ups_and_starts_once_another_listens(tmp_path: Path, pg_url: str) -> None:
    """One instance on PostgreSQL has no one to wake: it sends nothing. A second one starting is counted
    at once (it announces itself) and gets the first's wake-ups; once it stops, the first sends nothing
    again."""
    async with alone(tmp_path, pg_url) as (a, peers):
        await a.register(capabilities={"gpu": "a100"})
        for n in range(3):
            job = await a.submit({"n": n})
            assert (await a.take())["job_id"] == job["job_id"]
            assert (await a.result(job["job_id"])).status_code == 200
        await asyncio.sleep(0.05)  # a flush would have run by now
        assert peers.sent == 0
        async with harness(tmp_path / "b", db_path=pg_url) as b:
            await until(lambda: b.coord.peers is not None and b.coord.peers.connected and peers.others == 1, 1.0)
            poll = asyncio.create_task(b.poll(wait=20))
            await b.parked(1)
            job = await a.submit({"n": "across"})
            r = await asyncio.wait_for(poll, 10)
            assert r.status_code == 200 and r.json()["job_id"] == job["job_id"]
            assert peers.sent >= 1
        await until(lambda: peers.others == 0)  # within a count's interval of B's stop
        sent = peers.sent
        await a.submit({"n": "alone again"})
        await asyncio.sleep(0.05)
        assert peers.sent == sent
        await until(lambda: not peers.unsent)  # kept for one that may have begun to listen: not past a count
        assert peers.sent == sent


async def test_polls_on_postgresql_claim_at_once_while_claims_find_work_and_read_first_once_none_does(
        tmp_path: Path, pg_url: str) -> None:
    """A claim is a unit of work on a writer; while jobs are being found, a poll claims at once rather
    than read first (a read, a thread hop and four statements saved a job), and once a claim with a
    free slot found nothing the next poll reads first (renewals of an idle fleet write nothing)."""
    async with harness(tmp_path, db_path=pg_url) as h:
        await h.register(capabilities={"gpu": "a100"}, concurrency=8)
        peeks: list[str] = []
        peek = h.coord.db.peek

        async def counted(fn: Any, *args: Any) -> Any:
            peeks.append(fn.__name__)
            return await peek(fn, *args)
        h.coord.db.peek = counted  # type: ignore[method-assign]
        jobs = [await h.submit({"n": n}) for n in range(3)]
        assert [(await h.take())["job_id"] for _ in jobs] == [j["job_id"] for j in jobs]
        assert peeks == []
        assert (await h.poll()).status_code == 204  # a claim with a free slot finds nothing
        assert peeks == []
        assert (await h.poll()).status_code == 204 and peeks == ["read_poll"]  # now reads first
        assert (await h.poll()).status_code == 204 and peeks == ["read_poll"] * 2
        job = await h.submit({"n": 3})  # queued: claims go straight to their unit again
        assert (await h.take())["job_id"] == job["job_id"] and peeks == ["read_poll"] * 2
        assert (await h.poll()).status_code == 204 and peeks == ["read_poll"] * 2  # nothing found: reads next
        assert (await h.result(job["job_id"])).status_code == 200  # a slot freed queues nothing (breaker)
        assert (await h.poll()).status_code == 204 and peeks == ["read_poll"] * 3


def test_a_loop_turns_wake_ups_go_out_in_payloads_postgresql_accepts() -> None:
    peers = ac.Peers("postgresql://unused", lambda wake: None, lambda: None)
    wake = ac.Wake(queued=[(f"{i:032x}", '{"gpu":"' + "x" * 300 + '"}', i) for i in range(100)] +
                   [("f" * 32, '{"region":"' + "r" * 9000 + '"}', 7)], miners={f"m{i}" for i in range(500)})
    payloads = peers.payloads(wake)
    assert all(len(p.encode()) < 8000 for p in payloads) and len(payloads) > 1
    read = [ac.load_json(p) for p in payloads]
    assert [q[0] for r in read for q in r["q"]] == [job for job, _, _ in wake.queued]
    assert {m for r in read for m in r["m"]} == wake.miners and {r["i"] for r in read} == {peers.instance}
    assert [q[1] for r in read for q in r["q"]][-1] is None  # too long to send: the receiver reads it


async def test_a_miner_heard_only_by_one_instance_is_alive_for_all_and_lost_once(tmp_path: Path, pg_url: str) -> None:
    """Silence is judged on the database server's clock: a miner that talks only to B keeps the job it
    claimed through A; once it falls silent, the job goes back once, whichever instance sweeps."""
    shared = FakeClock(1000.0)  # both instances' monotonic clocks run together (as real time does)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with harness(tmp_path / "a", db_path=pg_url, monotonic=shared) as a, \
            harness(tmp_path / "b", db_path=pg_url, monotonic=shared) as b:
        await a.register(capabilities={"gpu": "a100"})
        job = await a.submit()
        assert (await a.take())["job_id"] == job["job_id"]
        for _ in range(4):  # 80 s of heartbeats to B only, A and B sweeping
            shared.advance(20)
            assert (await b.client.post("/v1/miners/heartbeat", json={}, headers=MINER)).status_code == 200
            assert await b.coord.sweep() == 0 and await a.coord.sweep() == 0
        assert (await a.job(job["job_id"]))["state"] == "RUNNING"
        shared.advance(31)  # silent for longer than HEARTBEAT_TIMEOUT_SECONDS (30)
        assert await a.coord.sweep() + await b.coord.sweep() == 1
        assert (await a.job(job["job_id"]))["state"] == "QUEUED"
        miners = (await b.client.get("/v1/admin/miners", headers=ADMIN)).json()["items"]
        assert [m["status"] for m in miners] == ["offline"] or [m.get("online") for m in miners] == [False]


class CountedPolls(dict):  # type: ignore[type-arg]
    """A hub's by_miner that counts the look-ups and the steps of walks made of it."""

    looked = 0

    def __contains__(self, key: object) -> bool:
        self.looked += 1
        return super().__contains__(key)

    def __iter__(self) -> Iterator[Any]:
        for key in super().__iter__():
            self.looked += 1
            yield key


async def test_a_tick_looks_at_the_parked_miners_due_a_write_not_at_every_parked_miner(
        tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A parked miner's heard_at is written again a third of HEARTBEAT_TIMEOUT_SECONDS (30) after the
    last write: a tick (every 0.5 s) finds those due at the front of what it wrote, in that order,
    instead of looking at each of 10,000 parked miners every time. One heard while its poll's body
    was still coming in (not parked yet at that tick) is written again all the same."""
    mono = FakeClock(1000.0)
    async with harness(tmp_path, db_path=pg_url, monotonic=mono) as h:
        hub = h.coord.hub
        hub.by_miner = polls = CountedPolls()
        written: list[set[str]] = []
        touch = ac.touch_heard

        def recorded(conn: Any, heard: dict[str, int]) -> None:
            written.append(set(heard))
            touch(conn, heard)

        monkeypatch.setattr(ac, "touch_heard", recorded)
        for i in range(500):  # each parked by a request: heard first, then in the hub
            h.coord.heard_from(f"m{i}")
            hub.add(f"m{i}")
        h.coord.heard_from("late")  # its poll's body is still coming in
        await h.coord.sweep()
        assert written == [{f"m{i}" for i in range(500)} | {"late"}]
        hub.add("late")
        written.clear()
        polls.looked = 0
        for _ in range(9):  # 9 s: nobody due
            mono.advance(1)
            await h.coord.sweep()
        assert polls.looked == 0 and written == [set()] * 9
        for waiter in hub.waiters[:100]:  # 100 polls end (and their miners say nothing more)
            hub.remove(waiter)
        mono.advance(2)  # 11 s since the write: the parked are due
        await h.coord.sweep()
        assert written[-1] == {f"m{i}" for i in range(100, 500)} | {"late"}
        assert polls.looked <= 501 + 100


async def test_cluster_duties_run_once_a_tick_summed_over_instances_and_survive_one_stopping(
        tmp_path: Path, pg_url: str) -> None:
    tick = 0.1
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with harness(tmp_path / "b", db_path=pg_url, monotonic=time.monotonic, sweep_interval_seconds=tick) as b:
        async with harness(tmp_path / "a", db_path=pg_url, monotonic=time.monotonic, sweep_interval_seconds=tick) as a:
            a0, b0, started = a.coord.cluster_duties, b.coord.cluster_duties, time.monotonic()
            await asyncio.sleep(2.0)
            ran, elapsed = a.coord.cluster_duties - a0 + b.coord.cluster_duties - b0, time.monotonic() - started
        # once a tick (runs at least 0.9 of a tick apart), not once a tick per instance; the lower bound
        # only says they keep running (a loaded machine stretches 0.1 s ticks)
        assert elapsed / tick / 2 - 2 <= ran <= elapsed / (0.9 * tick) + 1, (ran, elapsed)
        b1, started = b.coord.cluster_duties, time.monotonic()
        await asyncio.sleep(1.0)  # A has stopped: B takes the duties over at once
        ran, elapsed = b.coord.cluster_duties - b1, time.monotonic() - started
        assert elapsed / tick / 2 - 2 <= ran <= elapsed / (0.9 * tick) + 1, (ran, elapsed)


async def test_instances_publish_one_checkpoint_of_a_size_and_run_one_retention_pass_at_a_time(
        tmp_path: Path, pg_url: str) -> None:
    day = 86_400
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    env = {"PAYLOAD_RETENTION_DAYS": "1"}
    clock = FakeClock()
    async with harness(tmp_path / "a", env, clock=clock, db_path=pg_url) as a, \
            harness(tmp_path / "b", env, clock=clock, db_path=pg_url) as b:
        await a.register(capabilities={"gpu": "a100"}, concurrency=10)
        jobs = [await b.submit({"n": i}) for i in range(5)]
        for job in jobs:
            await a.take()
            assert (await b.result(job["job_id"])).status_code == 200
        a.coord.checkpoint_due = b.coord.checkpoint_due = 0.0
        published = await asyncio.gather(a.coord.checkpoint(), b.coord.checkpoint())
        assert sorted(published) == [False, True]  # one of them; the other found it covered the log
        sizes = (await a.client.get("/v1/log/checkpoints")).json()["items"]
        assert [c["tree_size"] for c in sizes if c["tree_size"] == 5] == [5]
        clock.advance(2 * day)
        async with a.coord.db.cluster_lock(ac.RETENTION_LOCK) as held:  # A is in a pass: B's does nothing
            assert held
            assert (await b.coord.retain())["pruned"] == 0
        assert (await b.coord.retain())["pruned"] == 5
        assert (await a.coord.retain())["pruned"] == 0  # done already


async def test_a_duty_lock_released_is_free_for_the_next_pass_at_once(tmp_path: Path, pg_url: str) -> None:
    """A pass that held a cluster duty's lock (retention) gives it back before the next one asks: 100
    passes in a row each get it. (Left to the end of the session, the lock went only when the server
    had ended it, after close returned: a pass right after found it held about 1 time in 20, and did
    nothing, as under load test_retention's bids did.)"""
    async with harness(tmp_path, db_path=pg_url) as h:
        got = []
        for _ in range(100):
            async with h.coord.db.cluster_lock(ac.RETENTION_LOCK) as held:
                got.append(held)
        assert got == [True] * 100
        lock = h.coord.db.cluster_lock
        async with lock(ac.RETENTION_LOCK) as first, lock(ac.RETENTION_LOCK) as second:
            assert (first, second) == (True, False)  # while held, nobody else has it


async def test_a_heartbeat_repeated_to_one_instance_still_counts_after_another_changed_the_miner(
        tmp_path: Path, pg_url: str) -> None:
    """An instance that remembered the last heartbeat it wrote must not skip one that repeats it: another
    instance may have changed the row since (a breaker's report: a miner stayed DRAINING for good behind a
    balancer that sent its heartbeats to A after one went to B; and one re-registered on B stayed ONLINE
    while it told A it was draining)."""
    async def beat(h: Harness, status: str) -> None:
        r = await h.client.post("/v1/miners/heartbeat", json={"inflight": 0, "status": status}, headers=MINER)
        assert r.status_code == 200

    async def status(h: Harness) -> str:
        return (await h.rows("SELECT status FROM miners"))[0][0]

    async with two_instances(tmp_path, pg_url) as (a, b):
        await a.register(capabilities={"gpu": "a100"})
        await beat(a, "ONLINE")
        await beat(b, "DRAINING")
        await beat(a, "ONLINE")  # the same as A last wrote: still written
        assert await status(a) == "ONLINE"
        job = await a.submit({"n": 1})
        assert (await a.take())["job_id"] == job["job_id"]
        await beat(a, "DRAINING")
        await b.register(capabilities={"gpu": "a100"})  # ONLINE again, the job taken back
        await beat(a, "DRAINING")
        assert await status(b) == "DRAINING"
        assert (await a.poll()).status_code == 204



@contextlib.contextmanager
def listener_held(peers: ac.Peers, before_count: bool = False) -> Iterator[tuple[threading.Event, threading.Event]]:
    """Hold `peers`' listener thread right after its next count of the other instances (as a busy
    process may leave a thread unscheduled), or just before it, until `release` is set or the block
    ends: what is sent to it meanwhile waits in its socket (and is read, before_count, with the count's
    answer). Yields (held, release)."""
    held, release = threading.Event(), threading.Event()
    count = peers._count_others

    def count_then_hold(conn: Any) -> int:
        n = -1 if before_count else count(conn)
        if not release.is_set():
            held.set()
            release.wait(10)
        return count(conn) if before_count else n
    peers._count_others = count_then_hold  # type: ignore[method-assign]
    try:
        yield held, release
    finally:
        release.set()
        peers._count_others = count  # type: ignore[method-assign]


async def a_wake_up_reaches_a_held_listener(tmp_path: Path, url: str, before_count: bool,
                                            meanwhile: Callable[[], None] = lambda: None) -> None:
    """B queues a job while A's listener is held (listener_held; `meanwhile` runs first): A's poll
    still gets it."""
    async with two_instances(tmp_path, url) as (a, b):
        await a.register(capabilities={"gpu": "a100"})
        poll = asyncio.create_task(a.poll(wait=20))
        await a.parked(1)
        assert a.coord.peers is not None and b.coord.peers is not None
        with listener_held(a.coord.peers, before_count) as (held, _):
            await until(held.is_set)
            meanwhile()
            sent = b.coord.peers.sent
            job = await b.submit({"n": 1})
            await until(lambda: b.coord.peers.sent > sent)  # type: ignore[union-attr]
        r = await asyncio.wait_for(poll, 5)
        assert r.status_code == 200 and r.json()["job_id"] == job["job_id"]


async def test_a_wake_up_that_arrives_with_another_instances_start_is_not_lost(tmp_path: Path, pg_url: str) -> None:
    """A third instance's start announced and B's wake-up read by A's listener in one packet: the start
    makes A count the instances again, and the wake-up behind it still reaches A's poll (it was dropped
    with the rest of the packet: the poll waited for its deadline)."""
    def c_starts() -> None:
        with contextlib.closing(ac.PgConnection(ac.pg_connect(pg_url))) as c:
            c.execute("SELECT pg_notify(?, ?)", (ac.Peers.CHANNEL, ac.compact_json({"i": "c"})))
    await a_wake_up_reaches_a_held_listener(tmp_path, pg_url, before_count=False, meanwhile=c_starts)


async def test_a_slot_freed_before_an_instance_counted_a_new_one_still_wakes_the_new_ones_poll(
        tmp_path: Path, pg_url: str) -> None:
    """A, alone, sends no wake-ups. B starts, listens, and parks a poll of a miner whose one slot a job
    taken through A holds; A frees the slot before it has counted B (its listener is slow to run). The
    poll gets the next job once A has counted B (the wake-up was dropped: no tick re-announces a freed
    slot, and the poll waited for its deadline)."""
    async with alone(tmp_path, pg_url) as (a, peers):
        await a.register(capabilities={"gpu": "a100"}, concurrency=1)
        first, second = await a.submit({"n": 1}), await a.submit({"n": 2})
        assert (await a.take())["job_id"] == first["job_id"]
        with listener_held(peers) as (held, release):
            await until(held.is_set)
            async with harness(tmp_path / "b", db_path=pg_url) as b:
                await until(lambda: b.coord.peers is not None and b.coord.peers.others == 1)
                poll = asyncio.create_task(b.poll(wait=20))
                await b.parked(1)
                assert (await a.result(first["job_id"])).status_code == 200
                await until(lambda: peers._flushing is None)  # A's wake-up is sent, or not, before A counts B
                release.set()
                r = await asyncio.wait_for(poll, 5)
                assert r.status_code == 200 and r.json()["job_id"] == second["job_id"]


async def test_a_wake_up_that_arrives_while_the_listener_counts_the_instances_is_not_lost(
        tmp_path: Path, pg_url: str) -> None:
    """The listener's connection runs a count of the instances every half second; a notification read
    with the count's answer still reaches the polls (psycopg before 3.2.4 dropped it)."""
    await a_wake_up_reaches_a_held_listener(tmp_path, pg_url, before_count=True)


async def test_a_slot_freed_whose_wake_up_could_not_be_sent_still_wakes_the_miners_poll(
        tmp_path: Path, pg_url: str) -> None:
    """A's NOTIFY fails (its pool had no connection to give, the server restarted): the queue's heads
    are re-announced each tick, but a freed slot is not, and the miner's poll on B waited for its
    deadline. A keeps the wake-up and sends it at its listener's next count of B."""
    async with two_instances(tmp_path, pg_url) as (a, b):
        await a.register(capabilities={"gpu": "a100"}, concurrency=1)
        first, second = await a.submit({"n": 1}), await a.submit({"n": 2})
        assert (await a.take())["job_id"] == first["job_id"]
        poll = asyncio.create_task(b.poll(wait=20))  # its one slot is taken: it waits for the slot
        await b.parked(1)
        peers = a.coord.peers
        assert peers is not None
        notify, failed = peers.notify, []

        def fail_once(channel: str, payloads: list[str]) -> None:
            if not failed:
                failed.append(payloads)
                raise ac.load_psycopg().OperationalError("the pool had no connection to give")
            notify(channel, payloads)  # type: ignore[misc]
        peers.notify = fail_once
        assert (await a.result(first["job_id"])).status_code == 200
        r = await asyncio.wait_for(poll, 5)
        assert failed and r.status_code == 200 and r.json()["job_id"] == second["job_id"]
