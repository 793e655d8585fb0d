"""Miner faults (issue 7.2): vanishing, stalling, duplicating and impostor miners beside an honest one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import aitbc_coord as ac
from conftest import Harness, harness
from test_receipts import EDGE_SEED

pytestmark = pytest.mark.anyio
NAMES = ("honest", "vanisher", "staller", "doubler", "impostor")
ENV = {"MINER_API_KEYS": ",".join(f"{n}=key-{n}" for n in NAMES), "RECEIPT_SIGNING_KEY_HEX": EDGE_SEED,
       "HEARTBEAT_TIMEOUT_SECONDS": "30", "JOB_MAX_ATTEMPTS": "6", "RATE_LIMIT_REQUESTS": "0"}
KEY = {n: {"X-Api-Key": f"key-{n}"} for n in NAMES}


async def test_faulty_miners_never_corrupt_the_books(tmp_path: Path) -> None:
    async with harness(tmp_path, ENV) as h:
        jobs = [(await h.submit({"n": i}, ttl_seconds=36_000))["job_id"] for i in range(40)]
        for name in NAMES:
            await h.register(KEY[name], concurrency=2)
        held: dict[str, list[str]] = {n: [] for n in NAMES}
        stale_accepted, accepted = [], {}

        async def take(name: str) -> None:
            r = await h.poll(KEY[name])
            if r.status_code == 200:
                held[name].append(r.json()["job_id"])

        async def report(name: str, job_id: str, stale: bool) -> None:
            r = await h.result(job_id, {"by": name}, headers=KEY[name])
            if r.status_code == 200:
                if stale:
                    stale_accepted.append((name, job_id))
                accepted.setdefault(job_id, set()).add(r.json()["receipt"]["receipt_id"])

        for name in ("vanisher", "staller"):  # each takes two jobs, then falls silent
            await take(name)
            await take(name)
        assert len(held["vanisher"]) == len(held["staller"]) == 2
        for round_ in range(40):
            for name in ("doubler", "honest"):
                await take(name)
            for job_id in held["doubler"]:  # every result twice: the second is the same receipt
                await report("doubler", job_id, stale=False)
                await report("doubler", job_id, stale=False)
            held["doubler"].clear()
            for job_id in held["honest"]:
                await report("honest", job_id, stale=False)
            held["honest"].clear()
            for job_id in jobs[round_ % 40: round_ % 40 + 3]:  # results for jobs it never took
                await report("impostor", job_id, stale=True)
            h.clock.advance(11)  # vanisher and staller say nothing; the others keep talking
            for name in ("honest", "doubler", "impostor"):
                await h.client.post("/v1/miners/heartbeat", headers=KEY[name])
            await h.coord.sweep()
            if round_ == 20:  # the staller comes back after its jobs were taken away
                for job_id in held["staller"]:
                    await report("staller", job_id, stale=True)
        await account(h, jobs, accepted, stale_accepted)


async def account(h: Harness, jobs: list[str], accepted: dict[str, set[str]], stale: list) -> None:
    states = dict(await h.rows("SELECT job_id, state FROM jobs"))
    holders = dict(await h.rows("SELECT job_id, assigned_miner_id FROM jobs"))
    receipts: dict[str, list[tuple[str, str]]] = {}
    for job_id, rid, body in await h.rows("SELECT job_id, receipt_id, body FROM receipts"):
        receipts.setdefault(job_id, []).append((rid, json.loads(ac.unpack_receipt(body, rid, job_id))["provider"]))
    assert stale == []  # no late or foreign result was ever accepted
    assert sorted(states) == sorted(jobs)  # nothing lost, nothing invented
    assert all(len(r) == 1 for r in receipts.values())  # nothing completed twice
    assert all(len(ids) == 1 and ids == {receipts[j][0][0]} for j, ids in accepted.items())
    for job_id, state in states.items():
        assert state in ("COMPLETED", "FAILED", "QUEUED"), (job_id, state)
        if state == "COMPLETED":
            assert receipts[job_id][0][1] == holders[job_id] in ("honest", "doubler")
        if state == "FAILED":  # only by running out of attempts on silent miners
            assert holders[job_id] in ("vanisher", "staller")
    assert sum(s == "COMPLETED" for s in states.values()) >= 30
    print(f"faults: jobs={len(states)} completed={sum(s == 'COMPLETED' for s in states.values())} "
          f"failed={sum(s == 'FAILED' for s in states.values())} queued={sum(s == 'QUEUED' for s in states.values())} "
          f"lost=0 duplicated=0 stale_accepted=0")
