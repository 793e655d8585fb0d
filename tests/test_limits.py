"""Limits (issue 7.6): rate limits with 429 and Retry-After, a long-poll cap, a busy database as 503."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

import aitbc_coord as ac
from conftest import ADMIN, CLIENT, MINER, FakeClock, Harness, database_error, harness

pytestmark = pytest.mark.anyio
TWO = {"CLIENT_API_KEYS": "alice=key-a,bob=key-b", "RATE_LIMIT_REQUESTS": "5", "RATE_LIMIT_WINDOW_SECONDS": "60"}
ALICE, BOB = {"X-Api-Key": "key-a"}, {"X-Api-Key": "key-b"}


async def test_each_identity_has_its_own_budget(tmp_path) -> None:
    async with harness(tmp_path, TWO) as h:
        for _ in range(5):
            assert (await h.client.get("/v1/jobs", headers=ALICE)).status_code == 200
        r = await h.client.get("/v1/jobs", headers=ALICE)
        assert (r.status_code, r.json()) == (429, {"detail": "rate limit exceeded"})
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert (await h.client.get("/v1/jobs", headers=BOB)).status_code == 200  # bob is not alice


async def test_public_routes_and_bad_keys_count_per_address(tmp_path) -> None:
    async with harness(tmp_path, TWO) as h:
        for _ in range(5):
            assert (await h.client.get("/v1/explorer/blocks")).status_code == 200
        assert (await h.client.get("/v1/marketplace/stats")).status_code == 429
        assert (await h.client.get("/v1/jobs", headers={"X-Api-Key": "guess"})).status_code == 429
        assert (await h.client.get("/v1/jobs", headers=ALICE)).status_code == 200  # a real key has its own


async def test_zero_turns_rate_limiting_off(tmp_path) -> None:
    async with harness(tmp_path, {"RATE_LIMIT_REQUESTS": "0"}) as h:
        for _ in range(300):
            assert (await h.client.get("/v1/health")).status_code == 200
        for _ in range(50):
            assert (await h.client.get("/v1/explorer/blocks")).status_code == 200


def test_the_default_never_throttles_a_busy_miner_or_a_dashboard() -> None:
    settings = ac.Settings.load({})
    clock = FakeClock(0)
    limiter = ac.RateLimiter(settings.rate_limit_requests, settings.rate_limit_window_seconds, clock)
    for second in range(3600):  # an hour of a miner finishing a job a second, and a live dashboard
        limiter.hit("miner:rig")  # poll
        limiter.hit("miner:rig")  # result
        if second % 15 == 0:
            limiter.hit("miner:rig")  # heartbeat
        if second % 5 == 0:
            for _ in range(6):  # the explorer's four lists and the marketplace's two reads
                limiter.hit("address:10.0.0.7")
        clock.advance(1)


async def test_a_miner_may_hold_only_so_many_long_polls(tmp_path) -> None:
    async with harness(tmp_path, {"POLL_MAX_CONCURRENT": "2"}) as h:
        await h.register(concurrency=4)
        waiting = [asyncio.create_task(h.poll(wait=5)) for _ in range(2)]
        await h.parked(2)
        r = await h.poll(wait=5)
        assert r.status_code == 429 and r.json()["detail"] == "too many concurrent polls for this miner"
        assert r.headers["retry-after"] == "1"
        await h.submit()
        await h.submit()
        assert {t.status_code for t in await asyncio.gather(*waiting)} == {200}
        assert (await h.poll()).status_code == 204  # the cap frees with the polls


@pytest.mark.sqlite_only  # SQLite's one write lock, held by another process
async def test_a_database_locked_by_another_process_is_a_503_not_a_500(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(ac.Database, "BUSY_RETRY_SECONDS", 0.2)
    async with harness(tmp_path) as h:
        other = sqlite3.connect(h.coord.settings.db_path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            r = await h.client.post("/v1/jobs", json={"payload": {}}, headers=CLIENT)
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert (r.status_code, r.json(), r.headers["retry-after"]) == (503, {"detail": "database unavailable"}, "1")
        assert (await h.client.post("/v1/jobs", json={"payload": {}}, headers=CLIENT)).status_code == 201


async def test_a_failing_read_is_a_503_not_a_500(h: Harness) -> None:
    async def broken(*args: object) -> None:
        raise database_error(h.coord)

    h.coord.db.read = broken  # type: ignore[method-assign]
    for path, headers in (("/v1/jobs", CLIENT), ("/v1/explorer/blocks", {}), ("/v1/admin/miners", ADMIN)):
        r = await h.client.get(path, headers=headers)
        assert (r.status_code, r.headers["retry-after"]) == (503, "1"), path
    await h.register()  # writes go through the writer, not the broken reader
    assert (await h.client.post("/v1/miners/heartbeat", json={}, headers=MINER)).status_code == 200


async def test_the_hub_counts_each_miners_open_polls() -> None:
    hub = ac.PollHub()
    a, b, c = hub.add("m1"), hub.add("m1"), hub.add("m2")
    assert (hub.polls_of("m1"), hub.polls_of("m2"), hub.count) == (2, 1, 3)
    hub.remove(a)
    hub.remove(a)  # a second removal changes nothing
    assert (hub.polls_of("m1"), hub.polls_of("m2"), hub.count) == (1, 1, 2)
    hub.remove(b)
    hub.remove(c)
    assert hub.polls_of("m1") == hub.count == 0 and not hub.waiters and not hub.by_miner
