"""Client job routes (spec section 5)."""

from __future__ import annotations

import re
from datetime import datetime

import pytest

from conftest import ADMIN, CLIENT, MINER, NO_RECEIPTS, T0, FakeClock, Harness, harness

ISO_Z = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
ALICE, BOB = {"X-Api-Key": "key-alice"}, {"X-Api-Key": "key-bob"}
TWO_CLIENTS = {"CLIENT_API_KEYS": "alice=key-alice,bob=key-bob"}

pytestmark = pytest.mark.anyio


def parse_iso(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def test_submit_returns_a_queued_job_view(h: Harness) -> None:
    job = await h.submit({"prompt": "hi"})
    assert re.fullmatch(r"[0-9a-f]{32}", job["job_id"])
    assert job["state"] == "QUEUED" and job["assigned_miner_id"] is None and job["error"] is None
    assert job["attempts"] == 0
    assert ISO_Z.fullmatch(job["requested_at"]) and ISO_Z.fullmatch(job["expires_at"])
    assert parse_iso(job["requested_at"]) == T0
    assert parse_iso(job["expires_at"]) - parse_iso(job["requested_at"]) == 900
    assert job["constraints"] == {"gpu": None, "cuda": None, "min_vram_gb": None, "models": None,
                                  "region": None, "max_price": None}


async def test_ttl_is_clamped_below_and_refused_above_the_maximum(tmp_path) -> None:
    async with harness(tmp_path, {"JOB_TTL_MAX_SECONDS": "60"}) as h:
        for ttl in (0, -5):
            job = await h.submit(ttl_seconds=ttl)
            assert parse_iso(job["expires_at"]) - parse_iso(job["requested_at"]) == 1
        assert parse_iso((await h.submit(ttl_seconds=60))["expires_at"]) == T0 + 60
        r = await h.client.post("/v1/jobs", json={"payload": {}, "ttl_seconds": 61}, headers=CLIENT)
        assert r.status_code == 422
        assert r.json()["detail"][0]["loc"] == ["body", "ttl_seconds"]


async def test_constraints_are_validated(h: Harness) -> None:
    r = await h.client.post("/v1/jobs", json={"payload": {}, "constraints": {"min_vram_gb": "lots"}}, headers=CLIENT)
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "constraints", "min_vram_gb"]
    job = await h.submit(constraints={"gpu": "A100", "models": ["m"], "max_price": 2, "unknown": 1})
    assert job["constraints"]["gpu"] == "A100" and job["constraints"]["max_price"] == 2
    assert "unknown" not in job["constraints"]


async def test_a_client_sees_only_its_own_jobs(tmp_path) -> None:
    async with harness(tmp_path, TWO_CLIENTS) as h:
        job = await h.submit(headers=ALICE)
        for path in ("", "/result", "/receipt", "/receipts"):
            r = await h.client.get(f"/v1/jobs/{job['job_id']}{path}", headers=BOB)
            assert (r.status_code, r.json()) == (404, {"detail": "job not found"}), path
        for r in (await h.client.post(f"/v1/jobs/{job['job_id']}/cancel", headers=BOB),
                  await h.client.delete(f"/v1/jobs/{job['job_id']}", headers=BOB)):
            assert r.status_code == 404
        assert (await h.client.get("/v1/jobs", headers=BOB)).json()["items"] == []
        assert (await h.job(job["job_id"], ALICE))["state"] == "QUEUED"  # untouched by bob
        r = await h.client.get("/v1/jobs/" + "0" * 32, headers=ALICE)
        assert (r.status_code, r.json()) == (404, {"detail": "job not found"})


async def test_list_is_newest_first_filtered_and_paged(h: Harness) -> None:
    ids = [(await h.submit({"n": i}))["job_id"] for i in range(5)]
    await h.register()
    taken = await h.take()  # the oldest becomes RUNNING
    assert taken["job_id"] == ids[0]
    r = await h.client.get("/v1/jobs", params={"limit": 2}, headers=CLIENT)
    body = r.json()
    assert [j["job_id"] for j in body["items"]] == ids[::-1][:2] and body["next_offset"] == 2
    body = (await h.client.get("/v1/jobs", params={"limit": 2, "offset": 4}, headers=CLIENT)).json()
    assert [j["job_id"] for j in body["items"]] == [ids[0]] and body["next_offset"] is None
    body = (await h.client.get("/v1/jobs", params={"state": "RUNNING"}, headers=CLIENT)).json()
    assert [j["job_id"] for j in body["items"]] == [ids[0]]
    for bad in ({"limit": 0}, {"limit": 501}, {"offset": -1}, {"state": "DONE"}, {"limit": "x"}):
        r = await h.client.get("/v1/jobs", params=bad, headers=CLIENT)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"][0] == "query", bad


async def test_result_is_425_until_finished_then_returns_it(tmp_path) -> None:
    async with harness(tmp_path, NO_RECEIPTS) as h:
        job = await h.submit()
        url = f"/v1/jobs/{job['job_id']}/result"
        assert (await h.client.get(url, headers=CLIENT)).json() == {"detail": "job not ready"}
        await h.register()
        await h.take()
        r = await h.client.get(url, headers=CLIENT)
        assert r.status_code == 425
        assert (await h.result(job["job_id"], {"answer": 42})).status_code == 200
        r = await h.client.get(url, headers=CLIENT)
        assert (r.status_code, r.json()) == (200, {"result": {"answer": 42}, "receipt": None})


async def test_cancel_by_post_and_delete(h: Harness) -> None:
    a, b = await h.submit(), await h.submit()
    r = await h.client.post(f"/v1/jobs/{a['job_id']}/cancel", headers=CLIENT)
    assert r.status_code == 200
    assert (r.json()["state"], r.json()["error"]) == ("CANCELED", "canceled by client")
    r = await h.client.delete(f"/v1/jobs/{b['job_id']}", headers=CLIENT)
    assert r.json()["state"] == "CANCELED"
    for again in (h.client.post(f"/v1/jobs/{a['job_id']}/cancel", headers=CLIENT),
                  h.client.delete(f"/v1/jobs/{b['job_id']}", headers=CLIENT)):
        r = await again
        assert (r.status_code, r.json()) == (409, {"detail": "job not cancelable"})
    await h.register()
    assert (await h.poll()).status_code == 204  # canceled jobs are never handed out


async def test_canceling_a_running_job_frees_the_miner_slot(h: Harness) -> None:
    first, second = await h.submit(), await h.submit()
    await h.register()
    assert (await h.take())["job_id"] == first["job_id"]
    assert (await h.poll()).status_code == 204  # concurrency 1: busy
    await h.client.post(f"/v1/jobs/{first['job_id']}/cancel", headers=CLIENT)
    assert (await h.take())["job_id"] == second["job_id"]
    r = await h.result(first["job_id"])
    assert r.status_code == 409 and "canceled" in r.json()["detail"]


async def test_receipt_routes_before_signing_is_configured(h: Harness) -> None:
    job = await h.submit()
    r = await h.client.get(f"/v1/jobs/{job['job_id']}/receipt", headers=CLIENT)
    assert (r.status_code, r.json()) == (404, {"detail": "receipt not available"})
    r = await h.client.get(f"/v1/jobs/{job['job_id']}/receipts", headers=CLIENT)
    assert (r.status_code, r.json()) == (200, {"items": [], "next_offset": None, "next_cursor": None})


async def test_idempotent_submission(tmp_path) -> None:
    async with harness(tmp_path, TWO_CLIENTS) as h:
        key = {"Idempotency-Key": "order-1"}
        body = {"payload": {"a": 1}, "ttl_seconds": 30}
        first = await h.client.post("/v1/jobs", json=body, headers={**ALICE, **key})
        again = await h.client.post("/v1/jobs", json=body, headers={**ALICE, **key})
        assert first.status_code == again.status_code == 201
        assert first.json()["job_id"] == again.json()["job_id"]
        other = await h.client.post("/v1/jobs", json={"payload": {"a": 2}}, headers={**ALICE, **key})
        assert (other.status_code, other.json()) == (
            422, {"detail": "idempotency key reused with a different request"})
        bobs = await h.client.post("/v1/jobs", json=body, headers={**BOB, **key})
        assert bobs.status_code == 201 and bobs.json()["job_id"] != first.json()["job_id"]
        stats = (await h.client.get("/v1/admin/stats", headers=ADMIN)).json()
        assert stats["total_jobs"] == 2
        h.clock.advance(25 * 3600)  # keys are kept 24 h; after that the key may be used afresh
        await h.coord.sweep()
        later = await h.client.post("/v1/jobs", json={"payload": {"a": 3}}, headers={**ALICE, **key})
        assert later.status_code == 201 and later.json()["job_id"] != first.json()["job_id"]


async def test_admin_sees_every_clients_jobs_and_stats(tmp_path) -> None:
    async with harness(tmp_path, {**TWO_CLIENTS, **NO_RECEIPTS}) as h:
        a, b = await h.submit(headers=ALICE), await h.submit(headers=BOB)
        await h.register()
        await h.take()
        h.clock.advance(2)
        await h.result(a["job_id"])
        body = (await h.client.get("/v1/admin/jobs", headers=ADMIN)).json()
        assert [(j["job_id"], j["client_id"]) for j in body["items"]] == [(b["job_id"], "bob"), (a["job_id"], "alice")]
        body = (await h.client.get("/v1/admin/jobs", params={"state": "completed"}, headers=ADMIN)).json()
        assert [j["job_id"] for j in body["items"]] == [a["job_id"]]
        stats = (await h.client.get("/v1/admin/stats", headers=ADMIN)).json()
        assert stats["total_jobs"] == 2 and stats["active_jobs"] == 1 and stats["online_miners"] == 1
        assert stats["avg_miner_job_duration_ms"] == 2000.0
        assert stats["jobs_by_state"]["COMPLETED"] == 1 and stats["jobs_by_state"]["QUEUED"] == 1
        assert stats["receipts_total"] == 0
        miners = (await h.client.get("/v1/admin/miners", headers=ADMIN)).json()["items"]
        assert len(miners) == 1 and miners[0]["jobs_completed"] == 1 and miners[0]["inflight"] == 0
        assert miners[0]["average_job_duration_ms"] == 2000.0 and miners[0]["online"] is True
        for path in ("/v1/admin/stats", "/v1/admin/jobs", "/v1/admin/miners"):
            assert (await h.client.get(path, headers=CLIENT)).status_code == 401
            assert (await h.client.get(path, headers=MINER)).status_code == 401


async def test_a_wall_clock_step_ahead_expires_no_idempotency_key(tmp_path) -> None:
    """A step of the wall clock (a VM restored with a bad RTC) with no time passing must not expire
    the keys: a client retrying its submit then would get its job made twice. Keys still expire
    after IDEMPOTENCY_TTL_SECONDS that really passed, whichever way the wall clock moved."""
    wall, mono = FakeClock(), FakeClock(1000.0)
    async with harness(tmp_path, TWO_CLIENTS, clock=wall, monotonic=mono) as h:
        key, body = {"Idempotency-Key": "order-1"}, {"payload": {"a": 1}, "ttl_seconds": 30}
        first = await h.client.post("/v1/jobs", json=body, headers={**ALICE, **key})
        wall.advance(2 * 86_400)  # two days ahead; no time has passed
        mono.advance(1)
        await h.coord.sweep()
        again = await h.client.post("/v1/jobs", json=body, headers={**ALICE, **key})
        assert (again.status_code, again.json()["job_id"]) == (201, first.json()["job_id"])
        mono.advance(25 * 3600)  # a day that really passed (the wall clock keeps its step)
        wall.advance(25 * 3600)
        await h.coord.sweep()
        later = await h.client.post("/v1/jobs", json=body, headers={**ALICE, **key})
        assert later.status_code == 201 and later.json()["job_id"] != first.json()["job_id"]
        stats = (await h.client.get("/v1/admin/stats", headers=ADMIN)).json()
        assert stats["total_jobs"] == 2
