"""Claims that never reached their miner (issue 18): a claim committed whose poll answer was lost (the
instance died, the connection broke) goes back to the queue once the miner's heartbeats show it never
counted the job, on both backends. Heartbeats come every 15 s on the injected clock; a heartbeat that
repeats the last one written is kept in memory and judged when the next sweep records it."""

from __future__ import annotations

from typing import Any

import pytest

import aitbc_coord as ac
from conftest import Harness, harness

pytestmark = pytest.mark.anyio

MINERS = {"MINER_API_KEYS": ",".join(f"m{i}=key-m{i}" for i in range(4))}
BEAT = 15.0  # seconds between a miner node's heartbeats


def miner(i: int) -> dict[str, str]:
    return {"X-Api-Key": f"key-m{i}"}


class Node:
    """A miner node's heartbeats: each `inflight` as given, recorded as the coordinator would record it.
    `written`: every heartbeat carries new metadata, so each is its own unit of work (tx_heartbeat);
    else they repeat and wait in memory for the sweep (tx_record_liveness / tx_sweep)."""

    def __init__(self, h: Harness, i: int, written: bool) -> None:
        self.h, self.i, self.written, self.sent = h, i, written, 0

    async def beat(self, inflight: int | None, advance: float = BEAT) -> None:
        self.h.clock.advance(advance)
        body: dict[str, Any] = {} if inflight is None else {"inflight": inflight}
        if self.written:
            self.sent += 1
            body["metadata"] = {"beat": self.sent}
        r = await self.h.client.post("/v1/miners/heartbeat", json=body, headers=miner(self.i))
        assert r.status_code == 200, r.text
        await self.h.coord.sweep()


async def strand(h: Harness, miner_id: str) -> dict[str, Any]:
    """A claim committed for `miner_id` whose answer never reaches it (as when the instance that made it
    dies before answering): the poll's unit of work, and no HTTP answer."""
    row, _, _ = await h.coord.apply(ac.tx_poll, miner_id, h.coord.now(), h.coord.matcher)
    assert row is not None
    return await h.job(row["job_id"])


async def state(h: Harness, job_id: str) -> tuple[str, int, str | None]:
    view = await h.job(job_id)
    return view["state"], view["attempts"], view["assigned_miner_id"]


PATHS = pytest.mark.parametrize("written", [True, False], ids=["written", "in-memory"])


@PATHS
async def test_a_claim_whose_answer_was_lost_goes_back_to_the_queue_for_another_miner(tmp_path, written: bool) -> None:
    async with harness(tmp_path, MINERS) as h:
        await h.register(miner(0))
        node = Node(h, 0, written)
        await node.beat(0)
        job = await h.submit()
        h.clock.advance(1)
        assert (await strand(h, "m0"))["attempts"] == 1
        await node.beat(0)  # the claim came after the previous heartbeat: it may be on its way
        assert await state(h, job["job_id"]) == ("RUNNING", 1, "m0")
        await node.beat(0)  # short: once may be a result on its way
        assert await state(h, job["job_id"]) == ("RUNNING", 1, "m0")
        await node.beat(0)  # short again: the job never reached it
        assert await state(h, job["job_id"]) == ("QUEUED", 0, None)  # not counted as an attempt
        await h.register(miner(1))
        got = await h.take(miner(1))
        assert (got["job_id"], got["attempts"]) == (job["job_id"], 1)
        assert (await h.result(job["job_id"], headers=miner(1))).json()["receipt"]["job_id"] == job["job_id"]


@PATHS
async def test_a_miner_that_counts_its_job_keeps_it_however_long_it_runs(tmp_path, written: bool) -> None:
    async with harness(tmp_path, MINERS) as h:
        await h.register(miner(0))
        node = Node(h, 0, written)
        job = await h.submit(ttl_seconds=86_400)
        await h.take(miner(0))
        for _ in range(40):  # ten minutes
            await node.beat(1)
        assert await state(h, job["job_id"]) == ("RUNNING", 1, "m0")
        assert (await h.result(job["job_id"], headers=miner(0))).status_code == 200


@PATHS
async def test_a_result_on_its_way_makes_one_short_heartbeat_and_releases_nothing(tmp_path, written: bool) -> None:
    async with harness(tmp_path, MINERS) as h:
        await h.register(miner(0))
        node = Node(h, 0, written)
        job = await h.submit()
        await h.take(miner(0))
        await node.beat(1)
        await node.beat(1)
        await node.beat(0)  # the node stopped counting the job as it sent its result, which has not committed
        r = await h.result(job["job_id"], headers=miner(0))
        assert r.status_code == 200 and r.json()["receipt"]["job_id"] == job["job_id"]
        await node.beat(0)
        await node.beat(0)
        assert (await h.job(job["job_id"]))["state"] == "COMPLETED"


async def test_short_heartbeats_that_are_not_in_a_row_never_add_up(tmp_path) -> None:
    """Each short heartbeat is followed by one that counts the job: never two short ones in a row."""
    async with harness(tmp_path, MINERS) as h:
        await h.register(miner(0))
        node = Node(h, 0, False)
        job = await h.submit(ttl_seconds=86_400)
        await h.take(miner(0))
        for _ in range(10):
            await node.beat(1)
            await node.beat(0)
        assert await state(h, job["job_id"]) == ("RUNNING", 1, "m0")


@PATHS
async def test_of_a_long_job_and_a_lost_claim_only_the_lost_one_goes_back(tmp_path, written: bool) -> None:
    async with harness(tmp_path, MINERS) as h:
        await h.register(miner(0), concurrency=2)
        node = Node(h, 0, written)
        long = await h.submit({"n": "long"}, ttl_seconds=86_400)
        lost = await h.submit({"n": "lost"}, ttl_seconds=86_400)
        await h.take(miner(0))
        for _ in range(3):
            await node.beat(1)
        await strand(h, "m0")
        for _ in range(3):
            await node.beat(1)
        assert await state(h, lost["job_id"]) == ("QUEUED", 0, None)
        for _ in range(10):
            await node.beat(1)
        assert await state(h, long["job_id"]) == ("RUNNING", 1, "m0")


@PATHS
async def test_a_lost_claim_goes_back_not_the_newer_one_its_retried_poll_got(tmp_path, written: bool) -> None:
    """The node's poll failed (its answer lost), it polled again at once and got a newer job: both were
    claimed between two heartbeats, and the older one is the one it never heard of."""
    async with harness(tmp_path, MINERS) as h:
        await h.register(miner(0), concurrency=2)
        node = Node(h, 0, written)
        await node.beat(0)
        lost = await h.submit({"n": "lost"}, ttl_seconds=86_400)
        kept = await h.submit({"n": "kept"}, ttl_seconds=86_400)
        h.clock.advance(1)
        await strand(h, "m0")
        h.clock.advance(0.2)
        assert (await h.take(miner(0)))["job_id"] == kept["job_id"]
        for _ in range(3):
            await node.beat(1)
        assert await state(h, lost["job_id"]) == ("QUEUED", 0, None)
        assert await state(h, kept["job_id"]) == ("RUNNING", 1, "m0")
        for _ in range(5):
            await node.beat(1)
        assert (await h.result(kept["job_id"], headers=miner(0))).status_code == 200


@PATHS
async def test_a_job_claimed_after_the_previous_heartbeat_is_never_released(tmp_path, written: bool) -> None:
    async with harness(tmp_path, MINERS) as h:
        await h.register(miner(0), concurrency=2)
        node = Node(h, 0, written)
        first = await h.submit({"n": 1}, ttl_seconds=86_400)
        second = await h.submit({"n": 2}, ttl_seconds=86_400)
        await node.beat(0)
        h.clock.advance(1)
        await strand(h, "m0")
        await node.beat(0, BEAT - 1)
        await node.beat(0)  # first strike for `first`
        h.clock.advance(BEAT - 1)
        await strand(h, "m0")  # just before the next heartbeat: its answer may be on its way
        await node.beat(0, 1)
        assert await state(h, first["job_id"]) == ("QUEUED", 0, None)
        assert await state(h, second["job_id"]) == ("RUNNING", 1, "m0")
        await node.beat(0)
        assert await state(h, second["job_id"]) == ("RUNNING", 1, "m0")  # one strike only
        await node.beat(0)
        assert await state(h, second["job_id"]) == ("QUEUED", 0, None)


@PATHS
async def test_a_miner_that_does_not_say_its_inflight_never_loses_a_job(tmp_path, written: bool) -> None:
    async with harness(tmp_path, MINERS) as h:
        await h.register(miner(0))
        node = Node(h, 0, written)
        job = await h.submit(ttl_seconds=86_400)
        await strand(h, "m0")
        for _ in range(10):
            await node.beat(None)
        assert await state(h, job["job_id"]) == ("RUNNING", 1, "m0")


def test_judging_one_heartbeat() -> None:
    """judge_inflight on its own: which jobs are eligible, the two strikes, and the order they go back in."""
    t = 1_000_000
    held = [(t - 40_000, 1, "a"), (t - 20_000, 2, "b"), (t - 2_000, 3, "c")]
    judge = ac.judge_inflight
    prev = t - 15_000
    assert judge((t, 0), prev, None, None, held) == ac.InflightVerdict(t, None)  # a and b eligible: a strike
    assert judge((t, 0), prev, t - 30_000, None, held) == ac.InflightVerdict(t, None)  # the previous one was not short
    assert judge((t, 0), prev, prev, None, held).release == ("a", "b")  # the second strike; none counted: oldest first
    assert judge((t, 1), prev, prev, t - 30_000, held).release == ("b",)  # a was counted
    assert judge((t, 2), prev, prev, None, held) == ac.InflightVerdict(prev, None)  # not short: nothing changes
    assert judge((t, 3), prev, None, None, held) == ac.InflightVerdict(None, t)  # every job counted
    assert judge((t, 0), None, None, None, held) == ac.InflightVerdict(None, None)  # no previous heartbeat
    assert judge((t, None), prev, prev, None, held) == ac.InflightVerdict(prev, None)  # not said: never judged
    # a previous heartbeat a moment ago: a claim younger than the grace is not eligible; counted ones
    # go back newest first
    assert judge((t, 0), t - 100, t - 100, t - 10_000, held).release == ("b", "a")
