"""Leases, liveness and expiry, driven by an injectable clock (spec section 6)."""

from __future__ import annotations

import asyncio

import pytest

from conftest import ADMIN, CLIENT, MINER, FakeClock, Harness, harness

pytestmark = pytest.mark.anyio
MINERS = {"MINER_API_KEYS": "m0=key-m0,m1=key-m1,m2=key-m2", "HEARTBEAT_TIMEOUT_SECONDS": "30"}
M0, M1, M2 = ({"X-Api-Key": f"key-m{i}"} for i in range(3))


async def stats(h: Harness) -> dict:
    return (await h.client.get("/v1/admin/stats", headers=ADMIN)).json()


async def test_a_queued_job_expires_at_its_deadline(h: Harness) -> None:
    job = await h.submit(ttl_seconds=10)
    h.clock.advance(9.999)
    assert (await h.job(job["job_id"]))["state"] == "QUEUED"
    h.clock.advance(0.001)
    view = await h.job(job["job_id"])  # shown EXPIRED even before the sweeper has run
    assert (view["state"], view["error"]) == ("EXPIRED", "job expired")
    await h.register()
    assert (await h.poll()).status_code == 204  # never handed out past its deadline
    await h.coord.sweep()
    assert (await stats(h))["jobs_by_state"]["EXPIRED"] == 1
    r = await h.client.post(f"/v1/jobs/{job['job_id']}/cancel", headers=CLIENT)
    assert r.status_code == 409


async def test_a_running_job_expires_and_frees_its_slot(h: Harness) -> None:
    job = await h.submit(ttl_seconds=60)
    nxt = await h.submit(ttl_seconds=600)
    await h.register()
    await h.take()
    h.clock.advance(61)
    await h.client.post("/v1/miners/heartbeat", headers=MINER)  # alive all along
    await h.coord.sweep()
    view = await h.job(job["job_id"])
    assert (view["state"], view["error"]) == ("EXPIRED", "job expired")
    assert (await h.take())["job_id"] == nxt["job_id"]
    r = await h.result(job["job_id"])
    assert (r.status_code, r.json()["detail"]) == (409, "job already expired")


async def test_a_late_result_is_refused_even_before_the_sweep(h: Harness) -> None:
    job = await h.submit(ttl_seconds=5)
    await h.register()
    await h.take()
    h.clock.advance(5)
    r = await h.result(job["job_id"])
    assert (r.status_code, r.json()["detail"]) == (409, "job expired")
    assert (await h.job(job["job_id"]))["state"] == "EXPIRED"


async def test_a_silent_miner_loses_its_jobs_and_its_late_result(tmp_path) -> None:
    async with harness(tmp_path, MINERS) as h:
        job = await h.submit()
        await h.register(M0)
        await h.register(M1)
        await h.take(M0)
        h.clock.advance(29)
        await h.client.post("/v1/miners/heartbeat", headers=M1)
        assert await h.coord.sweep() == 0  # 29 s of silence: still M0's
        h.clock.advance(2)
        await h.client.post("/v1/miners/heartbeat", headers=M1)
        assert await h.coord.sweep() == 1
        view = await h.job(job["job_id"])
        assert (view["state"], view["attempts"], view["assigned_miner_id"]) == ("QUEUED", 1, None)
        assert (await stats(h))["online_miners"] == 1
        assert (await h.take(M1))["attempts"] == 2
        late = await h.result(job["job_id"], headers=M0)
        assert late.status_code == 409 and "another miner" in late.json()["detail"]
        assert (await h.result(job["job_id"], headers=M1)).status_code == 200


async def test_any_miner_request_keeps_it_alive(tmp_path) -> None:
    async with harness(tmp_path, MINERS) as h:
        jobs = [await h.submit({"n": i}) for i in range(3)]
        await h.register(M0, concurrency=3)
        for _ in jobs:
            await h.take(M0)
        for _ in range(5):  # 100 s of polls (all 204: slots busy) and no heartbeat
            h.clock.advance(20)
            assert (await h.poll(M0)).status_code == 204
            assert await h.coord.sweep() == 0
        h.clock.advance(20)
        assert (await h.result(jobs[0]["job_id"], headers=M0)).status_code == 200
        h.clock.advance(20)
        assert await h.coord.sweep() == 0
        assert [(await h.job(j["job_id"]))["state"] for j in jobs] == ["COMPLETED", "RUNNING", "RUNNING"]
        h.clock.advance(11)  # 31 s of silence
        assert await h.coord.sweep() == 2


async def test_a_miner_waiting_in_a_long_poll_is_alive(tmp_path) -> None:
    async with harness(tmp_path, MINERS) as h:
        job = await h.submit()
        await h.register(M0, concurrency=2)
        await h.take(M0)
        waiting = asyncio.create_task(h.poll(M0, wait=20))
        await h.parked(1)
        h.clock.advance(25)
        await h.coord.sweep()  # the sweeper sees it waiting and refreshes its liveness
        h.clock.advance(25)
        assert await h.coord.sweep() == 0
        assert (await h.job(job["job_id"]))["state"] == "RUNNING"
        await h.submit()
        assert (await asyncio.wait_for(waiting, 5)).status_code == 200


async def test_a_job_fails_after_max_attempts_naming_the_lost_miner(tmp_path) -> None:
    async with harness(tmp_path, {**MINERS, "JOB_MAX_ATTEMPTS": "2"}) as h:
        job = await h.submit(ttl_seconds=3600)
        for key, name in ((M0, "m0"), (M1, "m1")):
            await h.register(key)
            assert (await h.take(key))["job_id"] == job["job_id"]
            h.clock.advance(31)
            await h.coord.sweep()
        view = await h.job(job["job_id"])
        assert (view["state"], view["attempts"]) == ("FAILED", 2)
        assert "m1" in view["error"] and "lost" in view["error"]
        await h.register(M2)
        assert (await h.poll(M2)).status_code == 204


async def test_terminal_states_never_change(tmp_path) -> None:
    async with harness(tmp_path, MINERS) as h:
        done, failed, canceled = await h.submit(), await h.submit(), await h.submit()
        await h.register(M0, concurrency=3)
        await h.take(M0)
        await h.take(M0)
        await h.result(done["job_id"], headers=M0)
        await h.client.post(f"/v1/miners/{failed['job_id']}/fail", json={"error_code": "E", "error_message": "m"},
                            headers=M0)
        await h.client.post(f"/v1/jobs/{canceled['job_id']}/cancel", headers=CLIENT)
        h.clock.advance(10_000)
        await h.coord.sweep()
        assert [(await h.job(j["job_id"]))["state"] for j in (done, failed, canceled)] == [
            "COMPLETED", "FAILED", "CANCELED"]


async def test_the_background_sweeper_runs_on_its_own(tmp_path) -> None:
    clock = FakeClock()
    async with harness(tmp_path, MINERS, clock=clock, sweep_interval_seconds=0.02) as h:
        running = await h.submit(ttl_seconds=3600)
        queued = await h.submit(ttl_seconds=5)
        await h.register(M0)
        await h.take(M0)
        clock.advance(40)  # the queued job's deadline and M0's heartbeat timeout both pass
        for _ in range(250):  # up to 5 s of real time for a 20 ms sweeper
            counts = (await stats(h))["jobs_by_state"]
            if counts["EXPIRED"] == 1 and counts["QUEUED"] == 1:
                break
            await asyncio.sleep(0.02)
        assert counts["EXPIRED"] == 1 and counts["QUEUED"] == 1 and counts["RUNNING"] == 0
        assert (await h.job(running["job_id"]))["attempts"] == 1
        assert (await h.job(queued["job_id"]))["state"] == "EXPIRED"
