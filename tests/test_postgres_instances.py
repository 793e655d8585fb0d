"""Several coordinator instances on one PostgreSQL database (issue 18): wake-ups cross between them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import aitbc_coord as ac
from conftest import CLIENT, MINER, Harness, harness

pytestmark = pytest.mark.anyio


@contextlib.asynccontextmanager
async def two_instances(tmp_path: Path, url: str) -> AsyncIterator[tuple[Harness, Harness]]:
    """Instances A and B of one cluster: each its own process state, one database."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with harness(tmp_path / "a", db_path=url) as a, harness(tmp_path / "b", db_path=url) as b:
        for h in (a, b):
            for _ in range(500):  # each listens before the test starts (no fixed sleep)
                if h.coord.peers is not None and h.coord.peers.connected:
                    break
                await asyncio.sleep(0.01)
            assert h.coord.peers is not None and h.coord.peers.connected
        yield a, b


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
                                   " WHERE query LIKE 'LISTEN%' AND datname = current_database()").fetchall()
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
