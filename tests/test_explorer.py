"""Explorer read models (spec section 11) and what both dashboards request (section 14)."""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime
from pathlib import Path

import pytest

import aitbc_coord as ac
from conftest import T0, Harness, harness
from test_receipts import EDGE_ATTESTATION_SEED, EDGE_SEED

pytestmark = pytest.mark.anyio
KEYS = {"CLIENT_API_KEYS": "alice=key-alice,bob=key-bob", "MINER_API_KEYS": "rig-a=key-rig-a,rig-b=key-rig-b",
        "ADMIN_API_KEYS": "ops=key-ops", "RECEIPT_SIGNING_KEY_HEX": EDGE_SEED,
        "RECEIPT_ATTESTATION_KEY_HEX": EDGE_ATTESTATION_SEED}
ALICE, BOB = {"X-Api-Key": "key-alice"}, {"X-Api-Key": "key-bob"}
RIG_A, RIG_B = {"X-Api-Key": "key-rig-a"}, {"X-Api-Key": "key-rig-b"}
LISTS = ("/v1/explorer/blocks", "/v1/explorer/transactions", "/v1/explorer/addresses", "/v1/explorer/receipts")


def when(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def scenario(h: Harness) -> dict[str, str]:
    """Seven jobs: completed (2), failed, canceled, expired, running, queued; names -> job ids."""
    ids: dict[str, str] = {}

    async def submit(name: str, who: dict, **body: object) -> None:
        h.clock.advance(1)
        ids[name] = (await h.submit(headers=who, **body))["job_id"]

    await h.register(RIG_A, capabilities={"price": 0.5}, concurrency=2)
    await h.register(RIG_B, capabilities={"price": 2}, concurrency=2)
    await submit("j1", ALICE, payload={"value": "12.5"})
    await h.take(RIG_A)
    h.clock.advance(1)
    assert (await h.result(ids["j1"], {"ok": 1}, headers=RIG_A, metrics={"units": 4})).status_code == 200
    await submit("j2", BOB, payload={"value": 7})
    await h.take(RIG_B)
    await h.result(ids["j2"], {"price": 3.25}, headers=RIG_B)
    await submit("j3", ALICE)
    await h.take(RIG_A)
    await h.client.post(f"/v1/miners/{ids['j3']}/fail", json={"error_code": "E", "error_message": "x"}, headers=RIG_A)
    await submit("j4", BOB, ttl_seconds=5)
    await h.client.post(f"/v1/jobs/{ids['j4']}/cancel", headers=BOB)
    await submit("j5", ALICE, ttl_seconds=5, constraints={"region": "mars"})
    h.clock.advance(6)
    await h.coord.sweep()
    await submit("j6", BOB, payload={"value": 1.5})
    await h.take(RIG_B)
    await submit("j7", ALICE, constraints={"gpu": "none-such"})
    return ids


async def get(h: Harness, path: str, **params: object) -> dict:
    r = await h.client.get(path, params=params)
    assert r.status_code == 200, r.text
    return r.json()


async def test_blocks_and_transactions_after_a_realistic_sequence(tmp_path) -> None:
    async with harness(tmp_path, KEYS) as h:
        ids = await scenario(h)
        order = [ids[f"j{i}"] for i in range(7, 0, -1)]  # newest first
        blocks = (await get(h, "/v1/explorer/blocks"))["items"]
        assert [b["hash"] for b in blocks] == order
        assert [b["height"] for b in blocks] == list(range(100007, 100000, -1))
        assert all(b["txCount"] == 1 and isinstance(b["timestamp"], str) for b in blocks)
        assert [b["proposer"] for b in blocks] == ["unassigned", "rig-b", "unassigned", "unassigned", "rig-a",
                                                   "rig-b", "rig-a"]
        assert when(blocks[-1]["timestamp"]) == T0 + 1
        txs = (await get(h, "/v1/explorer/transactions"))["items"]
        assert [(t["hash"], t["block"], t["from"], t["to"], t["value"], t["status"]) for t in txs] == [
            (ids["j7"], 100007, "alice", "unassigned", "0", "Queued"),
            (ids["j6"], 100006, "bob", "rig-b", "1.5", "Running"),
            (ids["j5"], 100005, "alice", "unassigned", "0", "Expired"),
            (ids["j4"], 100004, "bob", "unassigned", "0", "Canceled"),
            (ids["j3"], 100003, "alice", "rig-a", "0", "Failed"),
            (ids["j2"], 100002, "bob", "rig-b", "3.25", "Succeeded"),
            (ids["j1"], 100001, "alice", "rig-a", "2.0", "Succeeded")]


async def test_addresses_carry_balances_counts_and_recent_jobs(tmp_path) -> None:
    async with harness(tmp_path, KEYS) as h:
        ids = await scenario(h)
        items = (await get(h, "/v1/explorer/addresses"))["items"]
        by = {a["address"]: a for a in items}
        assert [a["address"] for a in items] == ["alice", "rig-b", "bob", "rig-a"]  # by last activity (ties: address)
        assert {a: (by[a]["balance"], by[a]["txCount"]) for a in by} == {
            "alice": ("-2.000000", 4), "bob": ("-3.250000", 3), "rig-a": ("2.000000", 2), "rig-b": ("3.250000", 2)}
        assert by["alice"]["recentTransactions"] == [ids["j7"], ids["j5"], ids["j3"], ids["j1"]]
        assert by["rig-b"]["recentTransactions"] == [ids["j6"], ids["j2"]]
        assert all(when(a["lastActive"]) > T0 for a in items)
        for _ in range(4):
            await h.submit(headers=ALICE)
        assert len((await get(h, "/v1/explorer/addresses"))["items"][0]["recentTransactions"]) == 5


async def test_balances_past_a_64_bit_integer_still_take_every_result(tmp_path) -> None:
    """A receipt moves up to MAX_AMOUNT (10^18 millionths): ten of them are past a 64-bit integer. On
    PostgreSQL the address's stripe row overflowed bigint, and every later priced result of that miner
    or that client through the same writer failed with 503 (the job never completed). 28 results put
    at least ten on one of the 3 writers' stripes."""
    async with harness(tmp_path, KEYS) as h:
        await h.register(RIG_A, capabilities={"price": ac.MAX_AMOUNT})
        for _ in range(28):
            job = await h.submit(headers=ALICE)
            assert (await h.take(RIG_A))["job_id"] == job["job_id"]
            r = await h.result(job["job_id"], headers=RIG_A, metrics={"units": 1})
            assert r.status_code == 200, r.text
        by = {a["address"]: a for a in (await get(h, "/v1/explorer/addresses"))["items"]}
        assert (by["rig-a"]["balance"], by["alice"]["balance"]) == ("28000000000000.000000", "-28000000000000.000000")


async def test_receipts_list_and_its_job_filter(tmp_path) -> None:
    async with harness(tmp_path, KEYS) as h:
        ids = await scenario(h)
        body = await get(h, "/v1/explorer/receipts")
        assert body["jobId"] == "all" and body["next_offset"] is None
        assert [r["jobId"] for r in body["items"]] == [ids["j2"], ids["j1"]]
        first = body["items"][1]
        assert (first["miner"], first["coordinator"], first["status"]) == ("rig-a", "aitbc-coordinator", "Attested")
        assert first["receiptId"] == first["payload"]["receipt_id"] and first["payload"]["price"] == 2.0
        assert isinstance(first["issuedAt"], str)
        verify = await h.client.post("/v1/receipts/verify", json={"receipt": first["payload"]})
        assert verify.json()["valid"] is True
        one = await get(h, "/v1/explorer/receipts", job_id=ids["j2"])
        assert one["jobId"] == ids["j2"] and [r["jobId"] for r in one["items"]] == [ids["j2"]]
        assert (await get(h, "/v1/explorer/receipts", job_id="f" * 32))["items"] == []


async def test_signed_receipts_without_attestation_show_as_signed(tmp_path) -> None:
    async with harness(tmp_path, {"RECEIPT_SIGNING_KEY_HEX": EDGE_SEED}) as h:
        job = await h.submit()
        await h.register()
        await h.take()
        await h.result(job["job_id"])
        assert (await get(h, "/v1/explorer/receipts"))["items"][0]["status"] == "Signed"


async def test_every_list_pages_without_gaps_or_duplicates(tmp_path) -> None:
    async with harness(tmp_path, KEYS) as h:
        await scenario(h)
        for path in LISTS:
            everything = (await get(h, path, limit=100))["items"]
            seen, offset = [], 0
            while offset is not None:
                body = await get(h, path, limit=3, offset=offset)
                assert len(body["items"]) <= 3
                assert body["next_offset"] == (offset + 3 if len(body["items"]) == 3 else None)
                seen += body["items"]
                offset = body["next_offset"]
            assert seen == everything and len(everything) > 0, path
            for bad in ({"limit": 0}, {"offset": -1}, {"limit": "many"}):
                r = await h.client.get(path, params=bad)
                assert r.status_code == 422 and r.json()["detail"][0]["loc"][0] == "query"
        assert (await h.client.get("/v1/explorer/blocks", params={"limit": 201})).status_code == 422
        assert len((await get(h, "/v1/explorer/blocks"))["items"]) == 7  # default 20


async def test_no_key_ever_appears_in_public_responses(tmp_path) -> None:
    async with harness(tmp_path, KEYS) as h:
        await scenario(h)
        await h.client.post("/v1/marketplace/offers", json={"provider": "p", "capacity": 1, "price": 1},
                            headers={"X-Api-Key": "key-ops"})
        await h.client.post("/v1/marketplace/bids", json={"provider": "p", "capacity": 1, "price": 1})
        secrets = ["key-alice", "key-bob", "key-rig-a", "key-rig-b", "key-ops", EDGE_SEED, EDGE_ATTESTATION_SEED,
                   *ac.DEV_KEYS.values()]
        for path in (*LISTS, "/v1/marketplace/offers", "/v1/marketplace/stats", "/v1/receipts/keys"):
            text = (await h.client.get(path, params={"limit": 100} if "stats" not in path else {})).text
            for secret in secrets:
                assert secret not in text, (path, secret)


async def test_dashboards_requests_with_preflight_and_a_stray_bearer(tmp_path) -> None:
    async with harness(tmp_path, KEYS) as h:
        await scenario(h)
        origin = {"Origin": "https://explorer.example"}
        for path in (*LISTS, "/v1/marketplace/offers", "/v1/marketplace/stats", "/v1/marketplace/bids"):
            pre = await h.client.options(path, headers={
                **origin, "Access-Control-Request-Method": "POST" if path.endswith("bids") else "GET",
                "Access-Control-Request-Headers": "cache-control, authorization, content-type"})
            assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "*", path
        headers = {**origin, "Authorization": "Bearer not-a-key", "Cache-Control": "no-cache"}
        for path in (*LISTS, "/v1/marketplace/offers", "/v1/marketplace/stats"):
            r = await h.client.get(path, headers=headers)
            assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*", path
        r = await h.client.post("/v1/marketplace/bids", headers=headers,
                                json={"provider": "dash", "capacity": 1, "price": 1, "notes": None})
        assert 200 <= r.status_code < 300
        txs = (await h.client.get("/v1/explorer/transactions", headers=headers)).json()["items"]
        assert all(isinstance(t["to"], str) and isinstance(t["hash"], str) for t in txs)  # string methods work
        assert sum(t["status"] == "Succeeded" for t in txs) == 2
        receipts = (await h.client.get("/v1/explorer/receipts", params={"limit": 5})).json()["items"]
        assert sum(r["status"] == "Attested" for r in receipts) == 2


def _vm_steps(conn: sqlite3.Connection, fn, *args) -> int:  # noqa: ANN001
    steps = [0]

    def count() -> int:
        steps[0] += 1
        return 0

    conn.set_progress_handler(count, 1)
    fn(conn, *args)
    conn.set_progress_handler(None, 0)
    return steps[0]


@pytest.mark.sqlite_only  # SQLite VM steps
def test_a_page_costs_the_same_with_1000_or_50000_jobs(tmp_path: Path) -> None:
    """SQLite VM steps of each public first page (and admin stats) at two table sizes."""
    path = str(tmp_path / "depth.db")
    ac.migrate(path)
    conn = ac.connect(path)
    now = int(T0 * 1000)
    shape = ac.ensure_shape(conn, ac.compact_json(dict.fromkeys(ac.CONSTRAINT_KEYS)))
    for i in range(20):
        ac.upsert_miner(conn, f"rig-{i}", {"price": 1}, 2, None, "t" * 32, now)

    def seed(n: int, start: int) -> None:
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO jobs (job_id, client_id, state, constraints, shape_id, requested_at, expires_at,"
            " assigned_miner_id) VALUES (lower(hex(randomblob(16))), ?, 'COMPLETED', '{}', ?, ?, ?, ?)",
            [(f"client-{i % 50}", shape, now + start + i, now + 10**9, f"rig-{i % 20}") for i in range(n)])
        conn.execute("INSERT INTO receipts (receipt_id, job_id, issued_at, price, body)"  # bodies: never unpacked here
                     " SELECT lower(hex(randomblob(16))), job_id, requested_at, 1.5, randomblob(300) FROM jobs"
                     " WHERE seq > ?", (start,))
        conn.execute("COMMIT")

    reads = {
        "transactions": lambda c: ac.get_receipt_prices(c, [r["job_id"] for r in ac.list_job_page(c, 50, 0)]),
        "addresses": lambda c: [ac.list_recent_job_ids(c, r["address"], 5) for r in ac.list_addresses(c, 50, 0)],
        "offers": lambda c: ac.list_offers(c, None, 100, 0),
        "market stats": lambda c: (ac.get_fleet_totals(c), ac.get_counter(c, "active_bids")),
        "admin stats": lambda c: ac.read_admin_stats(c),
        "receipts": lambda c: ac.list_receipts(c, None, 50, 0),
        "blocks by cursor": lambda c: ac.list_job_page(c, 20, 0, 900),
        "addresses by cursor": lambda c: ac.list_addresses(c, 50, 0, (int(now + 500), "client-7")),
    }
    seed(1_000, 0)
    small = {name: _vm_steps(conn, fn) for name, fn in reads.items()}
    seed(49_000, 1_000)
    large = {name: _vm_steps(conn, fn) for name, fn in reads.items()}
    conn.close()
    print(json.dumps({"1k": small, "50k": large}))
    for name in reads:
        assert large[name] <= 2 * small[name], (name, small[name], large[name])
