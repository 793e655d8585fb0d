"""Miner routes and matching (spec sections 6 and 7)."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from typing import Any

import pytest

import aitbc_coord as ac
from conftest import ADMIN, CLIENT, MINER, NO_RECEIPTS, MINER_KEY, T0, Harness, harness, http_scope

MINERS = {"MINER_API_KEYS": ",".join(f"m{i}=key-m{i}" for i in range(20))}

pytestmark = pytest.mark.anyio


def miner(i: int) -> dict[str, str]:
    return {"X-Api-Key": f"key-m{i}"}


async def test_register_heartbeat_and_unregistered_miners(h: Harness) -> None:
    assert (await h.poll()).json() == {"detail": "miner not registered"}
    r = await h.client.post("/v1/miners/heartbeat", json={}, headers=MINER)
    assert (r.status_code, r.json()) == (404, {"detail": "miner not registered"})
    reg = await h.register(capabilities={"gpus": [{"name": "A100", "memory_mb": 81920}]}, concurrency=2, region="eu")
    assert reg["status"] == "ok" and re.fullmatch(r"[0-9a-f]{32}", reg["session_token"])
    r = await h.client.post("/v1/miners/heartbeat", headers=MINER)  # no body at all
    assert (r.status_code, r.json()) == (200, {"status": "ok"})
    r = await h.client.post("/v1/miners/heartbeat", json={"inflight": 3, "status": "online", "metadata": {"t": 61}},
                            headers=MINER)
    assert r.status_code == 200
    m = (await h.client.get("/v1/admin/miners", headers=ADMIN)).json()["items"][0]
    assert (m["reported_inflight"], m["inflight"], m["status"], m["concurrency"], m["region"]) == (3, 0, "ONLINE", 2, "eu")
    assert m["last_heartbeat"] is not None
    for bad in ({"capabilities": []}, {}, {"capabilities": {}, "concurrency": 0}, {"capabilities": {}, "concurrency": 10**30}):
        r = await h.client.post("/v1/miners/register", json=bad, headers=MINER)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"][0] == "body", bad


async def test_poll_returns_the_assignment_or_204(h: Harness) -> None:
    await h.register()
    r = await h.client.post("/v1/miners/poll", headers=MINER)  # empty body: no wait
    assert (r.status_code, r.content) == (204, b"")
    job = await h.submit({"x": 1}, constraints={"gpu": None})
    r = await h.client.post("/v1/miners/poll", json={"max_wait_seconds": 0.5}, headers=MINER)
    assert r.status_code == 200
    got = r.json()
    assert (got["job_id"], got["payload"], got["attempts"]) == (job["job_id"], {"x": 1}, 1)
    assert got["constraints"] == dict.fromkeys(ac.CONSTRAINT_KEYS)
    view = await h.job(job["job_id"])
    assert view["state"] == "RUNNING" and view["assigned_miner_id"] == "miner-" + ac.key_digest(ac.DEV_KEYS["miner"])[:12]


async def test_oldest_matching_job_first(tmp_path) -> None:
    async with harness(tmp_path, MINERS) as h:
        pinned = await h.submit(constraints={"region": "us"})
        free = [await h.submit({"n": i}) for i in range(2)]
        await h.register(miner(0), region="eu", concurrency=5)
        got = [(await h.take(miner(0)))["job_id"] for _ in range(2)]
        assert got == [j["job_id"] for j in free]  # skips the job it cannot run
        assert (await h.poll(miner(0))).status_code == 204
        await h.register(miner(1), region="us")
        assert (await h.take(miner(1)))["job_id"] == pinned["job_id"]


GPU_CAPS = {"gpus": [{"name": "RTX 4090", "memory_mb": 24576}], "cuda": "12.4", "models": ["llama3", "sdxl"],
            "price": 0.5}
RULES = [  # (constraints, satisfied by GPU_CAPS in region "eu")
    ({}, True),
    ({"region": "eu"}, True), ({"region": "us"}, False),
    ({"gpu": "RTX 4090"}, True), ({"gpu": "A100"}, False),
    ({"min_vram_gb": 24}, True), ({"min_vram_gb": 25}, False), ({"min_vram_gb": 0}, True),
    ({"cuda": "12"}, True), ({"cuda": "12.4"}, True), ({"cuda": "11"}, False),
    ({"models": ["llama3"]}, True), ({"models": ["llama3", "sdxl"]}, True), ({"models": ["llama3", "gpt"]}, False),
    ({"models": []}, True),
    ({"max_price": 0.5}, True), ({"max_price": 1}, True), ({"max_price": 0.49}, False),
    ({"region": "eu", "gpu": "RTX 4090", "min_vram_gb": 16, "cuda": "12", "models": ["sdxl"], "max_price": 1}, True),
    ({"region": "eu", "gpu": "RTX 4090", "min_vram_gb": 16, "cuda": "12", "models": ["sdxl"], "max_price": 0.1}, False),
]


@pytest.mark.parametrize(("constraints", "expected"), RULES)
async def test_matching_rules(tmp_path, constraints: dict[str, Any], expected: bool) -> None:
    async with harness(tmp_path) as h:
        await h.register(capabilities=GPU_CAPS, region="eu")
        await h.submit(constraints=constraints)
        assert (await h.poll()).status_code == (200 if expected else 204)


@pytest.mark.parametrize(("caps", "constraints", "expected"), [
    ({}, {"cuda": "12"}, False),                                    # no cuda at all
    ({"cuda": 12.1}, {"cuda": "12.1"}, True),                       # string form of a number
    ({"price": "0.1"}, {"max_price": 1}, False),                    # price must be a number
    ({}, {"max_price": 1}, False),
    ({"gpus": "RTX"}, {"gpu": "RTX"}, False),                       # malformed gpus never crash matching
    ({"gpus": [{"name": "A"}, 3]}, {"min_vram_gb": 1}, False),
    ({"gpu": {"model": "A100", "memory_gb": 80, "cuda_version": "12.2"}},
     {"gpu": "A100", "min_vram_gb": 80, "cuda": "12.2"}, True),     # the later CLI's layout
    ({"gpu": {"model": "A100", "memory_gb": 40}}, {"min_vram_gb": 80}, False),
])
async def test_matching_edge_cases(tmp_path, caps: dict[str, Any], constraints: dict[str, Any], expected: bool) -> None:
    async with harness(tmp_path) as h:
        await h.register(capabilities=caps)
        await h.submit(constraints=constraints)
        assert (await h.poll()).status_code == (200 if expected else 204)


def test_alternative_capability_layout_is_normalised() -> None:
    caps = ac.normalise_capabilities({"gpu": {"model": "A100", "memory_gb": 40, "cuda_version": "12.2"}, "price": 2})
    assert caps["gpus"] == [{"name": "A100", "memory_mb": 40960}] and caps["cuda"] == "12.2" and caps["price"] == 2
    native = {"gpus": [{"name": "X", "memory_mb": 1}], "cuda": "11"}
    assert ac.normalise_capabilities(native) == native


async def test_slots_follow_running_jobs(h: Harness) -> None:
    jobs = [await h.submit({"n": i}) for i in range(3)]
    await h.register(concurrency=2)
    a, b = await h.take(), await h.take()
    assert (await h.poll()).status_code == 204  # both slots busy
    assert (await h.result(a["job_id"])).status_code == 200
    assert (await h.take())["job_id"] == jobs[2]["job_id"]
    assert b["job_id"] == jobs[1]["job_id"]
    m = (await h.client.get("/v1/admin/miners", headers=ADMIN)).json()["items"][0]
    assert m["inflight"] == 2


async def test_draining_or_offline_miners_get_no_work(h: Harness) -> None:
    await h.register()
    await h.submit()
    for status in ("DRAINING", "offline"):
        await h.client.post("/v1/miners/heartbeat", json={"status": status}, headers=MINER)
        assert (await h.poll()).status_code == 204
    await h.client.post("/v1/miners/heartbeat", json={"status": "ONLINE"}, headers=MINER)
    assert (await h.poll()).status_code == 200


async def test_result_ownership_and_repeats(tmp_path) -> None:
    async with harness(tmp_path, {**MINERS, **NO_RECEIPTS}) as h:
        job = await h.submit()
        await h.register(miner(0))
        await h.register(miner(1))
        await h.take(miner(0))
        r = await h.result(job["job_id"], headers=miner(1))
        assert r.status_code == 409 and "another miner" in r.json()["detail"]
        assert (await h.result("f" * 32, headers=miner(0))).json() == {"detail": "job not found"}
        first = await h.result(job["job_id"], {"v": 1, "w": [1, 2]}, headers=miner(0), metrics={"units": 1})
        assert first.status_code == 200 and first.json() == {"status": "ok", "receipt": None}
        again = await h.result(job["job_id"], {"w": [1, 2], "v": 1}, headers=miner(0))  # same object, other key order
        assert (again.status_code, again.json()) == (200, first.json())
        other = await h.result(job["job_id"], {"v": 2}, headers=miner(0))
        assert other.status_code == 409 and "completed" in other.json()["detail"]
        r = await h.result(job["job_id"], {"v": 1, "w": [1, 2]}, headers=miner(1))
        assert r.status_code == 409
        m0 = (await h.client.get("/v1/admin/miners", headers=ADMIN)).json()["items"][0]
        assert m0["jobs_completed"] == 1
        r = await h.client.post(f"/v1/miners/{job['job_id']}/result", json={"metrics": {}}, headers=miner(0))
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "result"]


async def test_fail_requeues_retryable_errors_until_attempts_run_out(tmp_path) -> None:
    async with harness(tmp_path, {"JOB_MAX_ATTEMPTS": "2"}) as h:
        job = await h.submit()
        await h.register()
        fail = {"error_code": "OOM", "error_message": "out of memory", "retryable": True}
        await h.take()
        r = await h.client.post(f"/v1/miners/{job['job_id']}/fail", json=fail, headers=MINER)
        assert (r.status_code, r.json()) == (200, {"status": "ok"})
        view = await h.job(job["job_id"])
        assert (view["state"], view["attempts"], view["assigned_miner_id"]) == ("QUEUED", 1, None)
        assert (await h.take())["attempts"] == 2
        await h.client.post(f"/v1/miners/{job['job_id']}/fail", json=fail, headers=MINER)
        view = await h.job(job["job_id"])
        assert (view["state"], view["error"]) == ("FAILED", "OOM: out of memory")
        repeat = await h.client.post(f"/v1/miners/{job['job_id']}/fail", json=fail, headers=MINER)
        assert repeat.status_code == 200  # the same report again changes nothing
        assert (await h.result(job["job_id"])).status_code == 409
        m = (await h.client.get("/v1/admin/miners", headers=ADMIN)).json()["items"][0]
        assert m["jobs_failed"] == 2


async def test_non_retryable_fail_is_final(h: Harness) -> None:
    job = await h.submit()
    await h.register()
    await h.take()
    r = await h.client.post(f"/v1/miners/{job['job_id']}/fail",
                            json={"error_code": "E", "error_message": "bad input", "metrics": {"t": 1}}, headers=MINER)
    assert r.status_code == 200
    assert (await h.job(job["job_id"]))["error"] == "E: bad input"
    r = await h.client.post(f"/v1/miners/{job['job_id']}/fail", json={"error_code": "E"}, headers=MINER)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "error_message"]


async def test_re_registering_returns_held_jobs_to_the_queue(tmp_path) -> None:
    async with harness(tmp_path, MINERS) as h:
        job = await h.submit()
        await h.register(miner(0))
        await h.take(miner(0))
        await h.register(miner(0))  # restarted miner node: it holds nothing any more
        view = await h.job(job["job_id"])
        assert (view["state"], view["attempts"], view["assigned_miner_id"]) == ("QUEUED", 1, None)
        await h.register(miner(1))
        assert (await h.take(miner(1)))["attempts"] == 2
        assert (await h.result(job["job_id"], headers=miner(0))).status_code == 409


async def test_concurrent_polls_never_share_a_job(tmp_path) -> None:
    async with harness(tmp_path, MINERS) as h:
        for i in range(20):
            await h.register(miner(i), concurrency=3)
        jobs = {(await h.submit({"n": i}))["job_id"] for i in range(30)}
        responses = await asyncio.gather(*(h.poll(miner(i % 20)) for i in range(60)))
        taken = [r.json()["job_id"] for r in responses if r.status_code == 200]
        assert sorted(taken) == sorted(jobs)  # every job handed out exactly once
        assert sum(r.status_code == 204 for r in responses) == 30


async def test_long_poll_wakes_when_a_matching_job_arrives(h: Harness) -> None:
    await h.register(region="eu")
    waiting = asyncio.create_task(h.poll(wait=20))
    await h.parked(1)
    assert not waiting.done()
    await h.submit(constraints={"region": "us"})  # not for this miner: it keeps waiting
    await asyncio.sleep(0.05)
    assert not waiting.done()
    started = time.monotonic()
    job = await h.submit(constraints={"region": "eu"})
    r = await asyncio.wait_for(waiting, 5)  # far below the 20 s it asked to wait
    assert r.status_code == 200 and r.json()["job_id"] == job["job_id"]
    assert time.monotonic() - started < 5


async def test_long_poll_wakes_when_a_slot_frees(h: Harness) -> None:
    first, second = await h.submit(), await h.submit()
    await h.register()
    await h.take()
    waiting = asyncio.create_task(h.poll(wait=20))
    await h.parked(1)
    assert not waiting.done()
    await h.client.post(f"/v1/jobs/{first['job_id']}/cancel", headers=CLIENT)
    r = await asyncio.wait_for(waiting, 5)
    assert r.json()["job_id"] == second["job_id"]


async def test_long_poll_is_capped_by_poll_max_wait(tmp_path) -> None:
    async with harness(tmp_path, {"POLL_MAX_WAIT_SECONDS": "0.2"}) as h:
        await h.register()
        started = time.monotonic()
        r = await asyncio.wait_for(h.poll(wait=30), 10)
        assert r.status_code == 204 and time.monotonic() - started < 10


def _poll_vm_steps(conn: sqlite3.Connection, matcher: ac.Matcher, now: int) -> int:
    steps = [0]

    def count() -> int:
        steps[0] += 1
        return 0

    conn.set_progress_handler(count, 1)
    conn.execute("SAVEPOINT probe")
    job, _, _ = ac.tx_poll(conn, "eu-miner", now, matcher).value
    conn.execute("ROLLBACK TO probe")
    conn.execute("RELEASE probe")
    conn.set_progress_handler(None, 0)
    assert job is not None
    return steps[0]


@pytest.mark.sqlite_only  # SQLite VM steps
def test_poll_cost_does_not_grow_with_jobs_the_miner_cannot_run(tmp_path) -> None:
    """SQLite VM steps of one claim, with 100 vs 100,000 queued jobs pinned to another region."""
    path = str(tmp_path / "depth.db")
    ac.migrate(path)
    conn = ac.connect(path)
    now = int(T0 * 1000)
    conn.execute("BEGIN")
    ac.upsert_miner(conn, "eu-miner", {}, 1, "eu", "t" * 32, now)
    other = ac.compact_json({**dict.fromkeys(ac.CONSTRAINT_KEYS), "region": "us"})
    mine = ac.compact_json(dict.fromkeys(ac.CONSTRAINT_KEYS))
    us, anywhere = ac.ensure_shape(conn, other), ac.ensure_shape(conn, mine)

    def seed(n: int) -> None:
        conn.executemany("INSERT INTO jobs (job_id, client_id, state, constraints, shape_id, requested_at,"
                         " expires_at) VALUES (lower(hex(randomblob(16))), 'c', 'QUEUED', ?, ?, ?, ?)",
                         [(other, us, now, now + 10**9)] * n)

    seed(100)
    ac.insert_job(conn, "f" * 32, "c", "{}", mine, anywhere, now, now + 10**9)
    shallow = _poll_vm_steps(conn, ac.Matcher(), now)
    seed(99_900)
    deep = _poll_vm_steps(conn, ac.Matcher(), now)
    conn.execute("ROLLBACK")
    conn.close()
    print(f"poll VM steps: {shallow} with 100 foreign jobs, {deep} with 100,000")
    assert deep <= 2 * shallow, (shallow, deep)


async def test_one_queued_job_wakes_one_waiting_miner(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with harness(tmp_path, MINERS) as h:
        for i in range(3):
            await h.register(miner(i))
        waiting = [asyncio.create_task(h.poll(miner(i), wait=20)) for i in range(3)]
        await h.parked(3)
        claims: list[str] = []
        original = ac.claim

        def counting(*args: Any) -> Any:
            claims.append(args[1])
            return original(*args)

        monkeypatch.setattr(ac, "claim", counting)  # a poll's own claim, or one made for it by a submit
        job = await h.submit()
        await asyncio.wait(waiting, timeout=5, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.sleep(0.05)  # room for any other (wrongly woken) poll to reach the database
        done = [t for t in waiting if t.done()]
        assert len(done) == 1 and done[0].result().json()["job_id"] == job["job_id"]
        assert claims == ["m0"]  # the longest-waiting miner, and no other went to the database
        second = await h.submit()
        await asyncio.wait([t for t in waiting if t not in done], timeout=5, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.sleep(0.05)
        assert sum(t.done() for t in waiting) == 2 and claims == ["m0", "m1"]
        assert next(t for t in waiting if t.done() and t not in done).result().json()["job_id"] == second["job_id"]
        for t in waiting:
            t.cancel()


async def test_back_to_back_jobs_reach_both_waiting_polls(h: Harness) -> None:
    await h.register(concurrency=4)
    waiting = [asyncio.create_task(h.poll(wait=20)) for _ in range(2)]
    await h.parked(2)
    jobs = {(await h.submit({"n": i}))["job_id"] for i in range(2)}
    done = await asyncio.wait_for(asyncio.gather(*waiting), 5)  # a lost wake-up would sit out 20 s
    assert {r.json()["job_id"] for r in done} == jobs


async def test_a_job_claimed_for_a_poll_that_went_away_goes_back(h: Harness) -> None:
    """The miner node gave up on its long-poll; the job it would have got must not sit with it."""
    await h.register()
    body = b'{"max_wait_seconds": 10}'
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    gone = asyncio.Event()

    async def receive() -> dict:
        if messages:
            return messages.pop(0)
        await gone.wait()
        return {"type": "http.disconnect"}

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    poll = asyncio.create_task(h.app(http_scope("POST", "/v1/miners/poll", MINER_KEY, body), receive, send))
    await h.parked(1)
    gone.set()  # the miner's connection drops while it waits
    job = await h.submit()
    await asyncio.wait_for(poll, 5)
    assert sent[0]["status"] == 204
    view = await h.job(job["job_id"])
    assert (view["state"], view["attempts"], view["assigned_miner_id"]) == ("QUEUED", 0, None)
    got = await h.take()  # the next poll gets it, as its first attempt
    assert (got["job_id"], got["attempts"]) == (job["job_id"], 1)
