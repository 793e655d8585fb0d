"""The same calls on SQLite and on PostgreSQL give the same views (issue 18).

Hypothesis generates a session of calls (submits with constraints and idempotency keys, registrations,
heartbeats, polls, results with receipts, fails, cancels, offers and bids, the clock moving and the
sweep, retention and the receipt log's checkpoints) and every read a client, a miner, an admin or an
auditor makes between them (jobs and their receipts, paged lists followed cursor by cursor, the
marketplace, the explorer, admin figures, the log's entries and proofs). Each call goes to a coordinator
on SQLite and to one on PostgreSQL, on injected clocks that read the same; their answers, status and
JSON body, must be equal.

Nothing is normalised away: the coordinator's random ids (jobs, receipts, miners' tokens, offers, bids)
come from `secrets`, which this test replaces with a generator seeded afresh, the same way for both
backends, before each call; so receipts, their Ed25519 signatures (deterministic, RFC 8032) and the
Merkle tree heads over them come out byte for byte the same where the two agree.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aitbc_coord as ac
from conftest import FakeClock, Harness, harness
from test_receipts import EDGE_SEED

pytestmark = pytest.mark.postgres
CLIENTS, MINERS = ("alice", "bob"), ("rig1", "rig2", "rig3")
ENV = {"CLIENT_API_KEYS": ",".join(f"{c}=key-{c}" for c in CLIENTS),
       "MINER_API_KEYS": ",".join(f"{m}=key-{m}" for m in MINERS),
       "RECEIPT_SIGNING_KEY_HEX": EDGE_SEED, "RATE_LIMIT_REQUESTS": "0", "RECEIPT_LOG_CHECKPOINT_SECONDS": "0",
       "HEARTBEAT_TIMEOUT_SECONDS": "30", "JOB_MAX_ATTEMPTS": "2", "PAYLOAD_RETENTION_DAYS": "1"}
KEY = {name: {"X-Api-Key": f"key-{name}"} for name in (*CLIENTS, *MINERS)}
ADMIN = {"X-Api-Key": ac.DEV_KEYS["admin"]}
NOPE = "0" * 32  # an id neither side has


class SeededSecrets:
    """What the coordinator takes from `secrets`, drawn from a generator the test reseeds before each call."""

    def __init__(self) -> None:
        self.rng = random.Random(0)

    def reseed(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def token_bytes(self, n: int = 32) -> bytes:
        return self.rng.randbytes(n)

    def token_hex(self, n: int = 32) -> str:
        return self.token_bytes(n).hex()


# --- the calls: each a function of one side (its harness and the ids it has seen) to a response ---

Call = Callable[["Side"], Any]


class Side:
    """One backend's coordinator and what the session learnt from its answers (job ids, in order)."""

    def __init__(self, h: Harness) -> None:
        self.h, self.jobs, self.offers = h, [], []

    def job(self, k: int) -> str:
        return self.jobs[k % len(self.jobs)] if self.jobs else NOPE

    def offer(self, k: int) -> str:
        return self.offers[k % len(self.offers)] if self.offers else NOPE


def request(method: str, path: Callable[[Side], str] | str, headers: dict[str, str] | None = None,
            body: Any = None, **params: Any) -> Call:
    async def call(side: Side) -> httpx.Response:
        url = path(side) if callable(path) else path
        return await side.h.client.request(method, url, headers=headers or {}, json=body, params=params or None)
    call.__name__ = f"{method} {path if isinstance(path, str) else path.__name__}"
    return call


def paged(path: str, headers: dict[str, str] | None = None, limit: int = 2, **params: Any) -> Call:
    """Every page of a list, following each side's own next cursor (Link header for bare arrays)."""
    async def call(side: Side) -> list[Any]:
        pages, query = [], {"limit": limit, **params}
        for _ in range(50):
            r = await side.h.client.get(path, headers=headers or {}, params=query)
            pages.append((r.status_code, r.json()))
            body = r.json()
            cursor = body.get("next_cursor") if isinstance(body, dict) else None
            if isinstance(body, list) and "link" in r.headers:
                cursor = httpx.URL(r.headers["link"].split(">")[0].lstrip("<")).params.get("cursor")
            if r.status_code != 200 or not cursor:
                return pages
            query = {"limit": limit, "cursor": cursor, **params}
        raise AssertionError(f"{path}: more than 50 pages")
    call.__name__ = f"pages of {path}"
    return call


def submit(client: str, constraints: dict[str, Any], ttl: int, idempotency: str | None, n: int) -> Call:
    headers = {**KEY[client], **({"Idempotency-Key": idempotency} if idempotency else {})}

    async def call(side: Side) -> httpx.Response:
        r = await side.h.client.post("/v1/jobs", json={"payload": {"n": n}, "constraints": constraints,
                                                       "ttl_seconds": ttl}, headers=headers)
        if r.status_code == 201 and r.json()["job_id"] not in side.jobs:
            side.jobs.append(r.json()["job_id"])
        return r
    call.__name__ = "submit"
    return call


def on_job(method: str, template: str, headers: dict[str, str], k: int, body: Any = None) -> Call:
    def path(side: Side) -> str:
        return template.format(job=side.job(k))
    path.__name__ = template
    return request(method, path, headers, body)


def work(miner: str, outcome: str) -> Call:
    """A miner's round: poll, and when it gets a job, report its result (or fail it) at once."""
    async def call(side: Side) -> list[Any]:
        r = await side.h.client.post("/v1/miners/poll", json={}, headers=KEY[miner])
        out = [view(r)]
        if r.status_code == 200:
            job = r.json()["job_id"]
            if outcome == "fail":
                body = {"error_code": "OOM", "error_message": "out of memory", "retryable": True}
            else:
                body = {"result": {"out": job[:4]}, "metrics": {"units": 2.5, "unit_type": "gpu_seconds"}}
            out.append(view(await side.h.client.post(f"/v1/miners/{job}/{outcome}", json=body, headers=KEY[miner])))
        return out
    call.__name__ = f"{miner} works ({outcome})"
    return call


def create_offer(provider: str, capacity: int, price: float) -> Call:
    async def call(side: Side) -> httpx.Response:
        r = await side.h.client.post("/v1/marketplace/offers", headers=ADMIN,
                                     json={"provider": provider, "capacity": capacity, "price": price})
        if r.status_code in (200, 201):
            side.offers.append(r.json()["id"])
        return r
    call.__name__ = "create offer"
    return call


def set_offer_status(k: int, status: str) -> Call:
    def path(side: Side) -> str:
        return f"/v1/marketplace/offers/{side.offer(k)}/status"
    path.__name__ = "offer status"
    return request("POST", path, ADMIN, {"status": status})


def advance(seconds: int) -> Call:
    async def call(side: Side) -> dict[str, Any]:
        side.h.clock.advance(seconds)
        taken = await side.h.coord.sweep()
        return {"taken_back": taken, "checkpoint": await side.h.coord.checkpoint()}
    call.__name__ = f"advance {seconds} s and sweep"
    return call


def retain() -> Call:
    async def call(side: Side) -> dict[str, int]:
        side.h.clock.advance(2 * 86_400)
        return await side.h.coord.retain()
    call.__name__ = "two days on, retention"
    return call


def log_reads(k: int) -> Call:
    """The auditor's view: the latest checkpoint, every entry, an inclusion and a consistency proof."""
    async def call(side: Side) -> list[Any]:
        get = side.h.client.get
        cp = await get("/v1/log/checkpoint")
        out: list[Any] = [(cp.status_code, cp.json())]
        size = cp.json().get("tree_size", 0) if cp.status_code == 200 else 0
        if size:
            out.append((await get("/v1/log/entries", params={"start": 0})).json())
            out.append((await get("/v1/log/proof/consistency", params={"first": 1 + k % size, "second": size})).json())
            receipts = (await get(f"/v1/jobs/{side.job(k)}/receipts", headers=ADMIN_OR_OWNER)).json()
            for item in receipts.get("items", [])[:1]:
                out.append((await get("/v1/log/proof/inclusion", params={"receipt_id": item["receipt_id"]})).json())
        out.append((await get("/v1/log/checkpoints")).json())
        return out
    call.__name__ = "log reads"
    return call


ADMIN_OR_OWNER = KEY["alice"]

client = st.sampled_from(CLIENTS)
miner = st.sampled_from(MINERS)
job_ref = st.integers(0, 30)
price = st.sampled_from([0.5, 1.0, 1.02, 1.5, 3.0])
constraints = st.fixed_dictionaries({}, optional={
    "region": st.sampled_from(["eu", "us"]), "max_price": price, "models": st.just(["llama"]),
    "min_vram_gb": st.sampled_from([8, 80])})
capabilities = st.fixed_dictionaries({"price": price}, optional={
    "region": st.sampled_from(["eu", "us"]), "models": st.just(["llama", "sd"]),
    "gpus": st.just([{"name": "A100", "memory_mb": 81920}])})

WRITES = st.one_of(
    st.builds(submit, client, constraints, st.sampled_from([5, 60, 3600]),
              st.sampled_from([None, None, "k1", "k2"]), st.integers(0, 3)),
    st.builds(lambda m, caps, c: request("POST", "/v1/miners/register", KEY[m],
                                         {"capabilities": caps, "concurrency": c}),
              miner, capabilities, st.integers(1, 2)),
    st.builds(lambda m, inflight, status: request("POST", "/v1/miners/heartbeat", KEY[m],
                                                  {"inflight": inflight, "status": status}),
              miner, st.sampled_from([None, 0, 1]), st.sampled_from(["ONLINE", "ONLINE", "DRAINING"])),
    st.builds(lambda m: request("POST", "/v1/miners/poll", KEY[m], {}), miner),
    st.builds(work, miner, st.sampled_from(["result", "result", "fail"])),
    st.builds(work, miner, st.just("result")),
    st.builds(lambda m, k, units: on_job("POST", "/v1/miners/{job}/result", KEY[m], k, {
                  "result": {"out": k}, "metrics": {"units": units, "unit_type": "gpu_seconds"}}),
              miner, job_ref, st.sampled_from([1, 2.5, 30])),
    st.builds(lambda m, k, retry: on_job("POST", "/v1/miners/{job}/fail", KEY[m], k,
                                         {"error_code": "OOM", "error_message": "out of memory", "retryable": retry}),
              miner, job_ref, st.booleans()),
    st.builds(lambda c, k: on_job("POST", "/v1/jobs/{job}/cancel", KEY[c], k), client, job_ref),
    st.builds(create_offer, st.sampled_from(["p1", "p2"]), st.integers(1, 4), price),
    st.builds(set_offer_status, st.integers(0, 5), st.sampled_from(["open", "reserved", "closed"])),
    st.builds(lambda cap, p: request("POST", "/v1/marketplace/bids", None, {"provider": "b", "capacity": cap,
                                                                              "price": p}),
              st.integers(1, 4), price),
    st.builds(advance, st.sampled_from([1, 11, 31, 61])),
)
READS = st.one_of(
    st.builds(lambda c, k: on_job("GET", "/v1/jobs/{job}", KEY[c], k), client, job_ref),
    st.builds(lambda c, k: on_job("GET", "/v1/jobs/{job}/result", KEY[c], k), client, job_ref),
    st.builds(lambda c, k: on_job("GET", "/v1/jobs/{job}/receipt", KEY[c], k), client, job_ref),
    st.builds(lambda c, state: paged("/v1/jobs", KEY[c], **({"state": state} if state else {})),
              client, st.sampled_from([None, "QUEUED", "COMPLETED"])),
    st.builds(lambda: paged("/v1/admin/jobs", ADMIN)),
    st.builds(lambda: paged("/v1/admin/miners", ADMIN)),
    st.builds(lambda: request("GET", "/v1/admin/stats", ADMIN)),
    st.builds(lambda status: paged("/v1/marketplace/offers", **({"status": status} if status else {})),
              st.sampled_from([None, "open"])),
    st.builds(lambda: request("GET", "/v1/marketplace/stats")),
    st.builds(lambda: paged("/v1/explorer/blocks")),
    st.builds(lambda: paged("/v1/explorer/transactions")),
    st.builds(lambda: paged("/v1/explorer/addresses")),
    st.builds(lambda: paged("/v1/explorer/receipts")),
    st.builds(log_reads, job_ref),
)
SESSION = st.lists(st.one_of(WRITES, WRITES, READS), min_size=10, max_size=40)
EVERY_READ = [paged("/v1/admin/jobs", ADMIN), paged("/v1/admin/miners", ADMIN),
              request("GET", "/v1/admin/stats", ADMIN), paged("/v1/marketplace/offers"),
              request("GET", "/v1/marketplace/stats"), paged("/v1/explorer/blocks"), paged("/v1/explorer/transactions"),
              paged("/v1/explorer/addresses"), paged("/v1/explorer/receipts"),
              *(paged("/v1/jobs", KEY[c]) for c in CLIENTS), log_reads(0)]


def view(answer: Any) -> Any:
    """What a caller sees of an answer: status and JSON body (with the headers a client acts on)."""
    if isinstance(answer, httpx.Response):
        body = answer.json() if answer.content else None
        return answer.status_code, {k: answer.headers.get(k) for k in ("retry-after", "link", "location")}, body
    return answer


async def run_session(sides: tuple[Side, Side], calls: list[Call], secrets: SeededSecrets) -> int:
    """Each call on both sides, the ids they draw seeded alike; the number of calls compared."""
    for n, call in enumerate([*calls, retain(), *EVERY_READ, advance(1), *EVERY_READ]):
        views = []
        for side in sides:
            secrets.reseed(n)
            views.append(view(await call(side)))
        assert views[0] == views[1], (f"call {n} ({call.__name__}) differs:\n  sqlite:   {views[0]}\n"
                                      f"  postgres: {views[1]}")
    return n + 1


def test_the_same_calls_give_the_same_views_on_both_backends(tmp_path: Path, pg_server: str,
                                                             new_pg_database: Callable[[], str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    secrets = SeededSecrets()
    monkeypatch.setattr(ac, "secrets", secrets)
    sessions: list[int] = []

    async def both(calls: list[Call], where: Path) -> None:
        async with harness(where, ENV, clock=FakeClock(), monotonic=FakeClock(1000.0),  # alike, each its own
                           db_path=str(where / "coord.db")) as lite:
            async with harness(where, ENV, clock=FakeClock(), monotonic=FakeClock(1000.0),
                               db_path=new_pg_database()) as pg:
                sessions.append(await run_session((Side(lite), Side(pg)), calls, secrets))

    @given(calls=SESSION)
    @settings(max_examples=12, derandomize=True, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    def session(calls: list[Call]) -> None:
        where = tmp_path / f"session-{len(sessions)}"
        where.mkdir()
        asyncio.run(both(calls, where))

    session()
    assert len(sessions) == 12 and sum(sessions) > 12 * len(EVERY_READ)
