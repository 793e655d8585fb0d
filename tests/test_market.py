"""Marketplace (spec section 10): offers from miners and admins, stats, bids."""

from __future__ import annotations

import re
from datetime import datetime

import pytest

from conftest import ADMIN, CLIENT, Harness, harness

pytestmark = pytest.mark.anyio
MINERS = {"MINER_API_KEYS": "rig-a=key-a,rig-b=key-b,rig-c=key-c"}
RIG_A, RIG_B, RIG_C = ({"X-Api-Key": f"key-{c}"} for c in "abc")
HEX32 = re.compile(r"[0-9a-f]{32}")


async def offers(h: Harness, **params: object) -> list[dict]:
    r = await h.client.get("/v1/marketplace/offers", params=params)
    assert r.status_code == 200, r.text
    assert isinstance(r.json(), list)  # a bare array, as the dashboard reads it
    return r.json()


async def stats(h: Harness) -> dict:
    return (await h.client.get("/v1/marketplace/stats")).json()


async def admin_offer(h: Harness, **body: object) -> dict:
    r = await h.client.post("/v1/marketplace/offers", json={"provider": "dc-1", "capacity": 4, "price": 2.0, **body},
                            headers=ADMIN)
    assert r.status_code == 201, r.text
    return r.json()


def assert_offer_shape(offer: dict) -> None:
    assert set(offer) >= {"id", "provider", "capacity", "price", "sla", "status", "created_at"}
    assert HEX32.fullmatch(offer["id"]) and isinstance(offer["provider"], str)
    assert isinstance(offer["capacity"], int) and isinstance(offer["price"], (int, float))
    assert isinstance(offer["sla"], str) and offer["status"] in ("open", "reserved", "closed")
    datetime.fromisoformat(offer["created_at"].replace("Z", "+00:00"))


async def test_every_registered_miner_is_an_offer(tmp_path) -> None:
    async with harness(tmp_path, MINERS) as h:
        await h.register(RIG_A, capabilities={"price": 0.75, "sla": "99.9%"}, concurrency=3)
        h.clock.advance(1)
        await h.register(RIG_B, capabilities={"price": "n/a"})
        listed = await offers(h)
        for offer in listed:
            assert_offer_shape(offer)
        assert [(o["provider"], o["capacity"], o["price"], o["sla"], o["status"]) for o in listed] == [
            ("rig-b", 1, 0, "", "open"), ("rig-a", 3, 0.75, "99.9%", "open")]
        rig_a_id = listed[1]["id"]
        await h.register(RIG_A, capabilities={"price": 0.5}, concurrency=2)  # re-registering keeps the offer id
        again = {o["provider"]: o for o in await offers(h)}
        assert again["rig-a"]["id"] == rig_a_id and again["rig-a"]["price"] == 0.5


async def test_a_miner_offer_follows_the_miner(tmp_path) -> None:
    async with harness(tmp_path, MINERS) as h:
        await h.register(RIG_A, capabilities={"price": 1}, concurrency=2)
        await h.register(RIG_B, capabilities={"price": 1})
        for _ in range(2):
            await h.submit()
        status = lambda listed: {o["provider"]: o["status"] for o in listed}  # noqa: E731
        await h.take(RIG_A)
        await h.coord.sweep()  # offers follow slots at the next sweep (every 0.5 s), not at each claim
        assert status(await offers(h))["rig-a"] == "open"  # one slot still free
        await h.take(RIG_A)
        await h.coord.sweep()
        assert status(await offers(h)) == {"rig-a": "reserved", "rig-b": "open"}
        assert (await stats(h))["openCapacity"] == 1
        h.clock.advance(31)  # rig-a goes silent; rig-b keeps talking
        await h.client.post("/v1/miners/heartbeat", headers=RIG_B)
        await h.coord.sweep()  # finds rig-a silent: its offer closes, its jobs go back to the queue
        assert status(await offers(h)) == {"rig-a": "closed", "rig-b": "open"}
        assert (await stats(h))["openCapacity"] == 1
        await h.client.post("/v1/miners/heartbeat", json={"status": "DRAINING"}, headers=RIG_B)
        assert status(await offers(h))["rig-b"] == "closed"
        assert (await stats(h))["openCapacity"] == 0
        await h.client.post("/v1/miners/heartbeat", json={"status": "ONLINE"}, headers=RIG_B)
        await h.client.post("/v1/miners/heartbeat", headers=RIG_A)  # rig-a comes back with free slots
        assert status(await offers(h)) == {"rig-a": "open", "rig-b": "open"}
        assert (await stats(h))["openCapacity"] == 3


async def test_admin_offers_and_their_status(tmp_path) -> None:
    async with harness(tmp_path, MINERS) as h:
        made = await admin_offer(h, sla="gold", status="RESERVED")
        assert_offer_shape(made)
        assert (made["provider"], made["capacity"], made["price"], made["sla"], made["status"]) == (
            "dc-1", 4, 2.0, "gold", "reserved")
        r = await h.client.post(f"/v1/marketplace/offers/{made['id']}/status", json={"status": "Open"}, headers=ADMIN)
        assert (r.status_code, r.json()["status"]) == (200, "open")
        assert (await offers(h))[0]["status"] == "open"
        for bad in ({"capacity": 0}, {"price": 0}, {"price": -1}, {"provider": ""}, {"status": "gone"}):
            r = await h.client.post("/v1/marketplace/offers",
                                    json={"provider": "p", "capacity": 1, "price": 1, **bad}, headers=ADMIN)
            assert r.status_code == 422, bad
        r = await h.client.post(f"/v1/marketplace/offers/{'0' * 32}/status", json={"status": "open"}, headers=ADMIN)
        assert (r.status_code, r.json()) == (404, {"detail": "offer not found"})
        await h.register(RIG_A)
        miner_offer = next(o for o in await offers(h) if o["provider"] == "rig-a")
        r = await h.client.post(f"/v1/marketplace/offers/{miner_offer['id']}/status", json={"status": "closed"},
                                headers=ADMIN)
        assert r.status_code == 409
        r = await h.client.post(f"/v1/marketplace/offers/{made['id']}/status", json={"status": "x"}, headers=ADMIN)
        assert r.status_code == 422
        assert (await h.client.post("/v1/marketplace/offers", json={}, headers=CLIENT)).status_code == 401


async def test_status_filter_and_paging(tmp_path) -> None:
    async with harness(tmp_path, MINERS) as h:
        made = []
        for i, status in enumerate(["open", "closed", "open", "reserved", "open"]):
            made.append(await admin_offer(h, provider=f"dc-{i}", status=status))
            h.clock.advance(1)
        newest_first = [o["id"] for o in reversed(made)]
        assert [o["id"] for o in await offers(h)] == newest_first
        assert [o["provider"] for o in await offers(h, status="OPEN")] == ["dc-4", "dc-2", "dc-0"]
        assert [o["provider"] for o in await offers(h, status="closed")] == ["dc-1"]
        pages = [await offers(h, limit=2, offset=k) for k in (0, 2, 4)]
        assert [o["id"] for p in pages for o in p] == newest_first
        r = await h.client.get("/v1/marketplace/offers", params={"status": "sold"})
        assert (r.status_code, r.json()) == (400, {"detail": "invalid status filter"})
        for bad in ({"limit": 0}, {"limit": 501}, {"offset": -1}):
            assert (await h.client.get("/v1/marketplace/offers", params=bad)).status_code == 422


async def test_stats_arithmetic(tmp_path) -> None:
    async with harness(tmp_path, MINERS) as h:
        assert await stats(h) == {"totalOffers": 0, "openCapacity": 0, "averagePrice": 0.0, "activeBids": 0}
        await admin_offer(h, capacity=4, price=1.0)
        await admin_offer(h, capacity=6, price=2.0)
        await admin_offer(h, capacity=100, price=50.0, status="closed")
        await h.register(RIG_A, capabilities={"price": 0.3333}, concurrency=2)
        s = await stats(h)
        assert (s["totalOffers"], s["openCapacity"]) == (4, 12)
        assert s["averagePrice"] == round((1.0 + 2.0 + 0.3333) / 3, 4)
        assert all(isinstance(s[k], int) for k in ("totalOffers", "openCapacity", "activeBids"))
        assert isinstance(s["averagePrice"], float)


async def test_bids_match_the_cheapest_fitting_open_offer(tmp_path) -> None:
    async with harness(tmp_path, MINERS) as h:
        cheap_small = await admin_offer(h, capacity=1, price=1.0)
        mid = await admin_offer(h, capacity=8, price=3.0)
        await admin_offer(h, capacity=8, price=2.0, status="closed")  # cheaper, but closed
        await admin_offer(h, capacity=16, price=5.0)

        async def bid(**body: object) -> dict:
            r = await h.client.post("/v1/marketplace/bids", json={"provider": "buyer", **body},
                                    headers={"Authorization": "Bearer whatever", "Cache-Control": "no-cache"})
            assert r.status_code == 202, r.text
            return r.json()

        matched = await bid(capacity=4, price=4.0, notes="for a render farm")
        assert matched["status"] == "matched" and matched["offer_id"] == mid["id"] and HEX32.fullmatch(matched["id"])
        assert (await bid(capacity=1, price=10))["offer_id"] == cheap_small["id"]
        assert (await bid(capacity=32, price=100))["status"] == "pending"  # no offer is that big
        assert (await bid(capacity=2, price=2.5))["status"] == "pending"  # the 2.0 one is closed
        stored = (await h.client.get(f"/v1/marketplace/bids/{matched['id']}")).json()
        assert stored == {"id": matched["id"], "provider": "buyer", "capacity": 4, "price": 4.0,
                          "notes": "for a render farm", "status": "matched", "offer_id": mid["id"],
                          "created_at": stored["created_at"]}
        assert (await h.client.get(f"/v1/marketplace/bids/{'0' * 32}")).status_code == 404
        assert (await stats(h))["activeBids"] == 4
        for bad in ({"capacity": 0, "price": 1}, {"capacity": 1, "price": 0}, {"capacity": 1, "price": 1, "notes": "x" * 1025},
                    {"capacity": 1}, {"provider": "", "capacity": 1, "price": 1}):
            r = await h.client.post("/v1/marketplace/bids", json={"provider": "p", **bad})
            assert r.status_code == 422, bad


async def test_a_miner_offer_can_take_a_bid(tmp_path) -> None:
    async with harness(tmp_path, MINERS) as h:
        await h.register(RIG_C, capabilities={"price": 0.2}, concurrency=4)
        r = await h.client.post("/v1/marketplace/bids", json={"provider": "buyer", "capacity": 2, "price": 0.5})
        listed = await offers(h)
        assert r.json()["offer_id"] == listed[0]["id"]


@pytest.mark.sqlite_only  # SQLite VM steps
def test_reads_cost_the_same_with_100_or_20000_miners(tmp_path) -> None:
    """SQLite VM steps of every read that lists or counts miners, at two fleet sizes: the admin miner
    page, market and admin stats, the offers page (with and without a status filter, by offset and by
    cursor) and a bid's match. Kept totals and one index range per page, never a walk of the fleet."""
    import aitbc_coord as ac  # noqa: PLC0415

    path = str(tmp_path / "fleet.db")
    ac.migrate(path)
    conn = ac.connect(path, "OFF")
    now = 1_764_000_000_000

    def register(start: int, n: int) -> None:
        conn.execute("BEGIN")
        for i in range(start, start + n):
            ac.upsert_miner(conn, f"rig-{i:06d}", {"price": 0.5 + i % 7}, 1 + i % 3, None, "t" * 32, now + i)
        conn.execute("UPDATE miners SET offer_status = 'reserved' WHERE rowid % 5 = 0")
        conn.execute("UPDATE miners SET online = 0, offer_status = 'closed' WHERE rowid % 11 = 0")
        conn.execute("COMMIT")

    def steps(fn) -> int:  # noqa: ANN001
        count = [0]

        def tick() -> int:
            count[0] += 1
            return 0

        conn.set_progress_handler(tick, 1)
        fn(conn)
        conn.set_progress_handler(None, 0)
        return count[0]

    reads = {
        "admin miners": lambda c: [ac.count_running(c, r["miner_id"]) for r in ac.list_miners(c, 101, 0)],
        "admin miners by cursor": lambda c: ac.list_miners(c, 101, 0, (now, "rig-000000")),
        "market stats": lambda c: (ac.get_fleet_totals(c), ac.get_counter(c, "active_bids")),
        "admin stats": ac.read_admin_stats,
        "offers": lambda c: ac.list_offers(c, None, 101, 0),
        "reserved offers": lambda c: ac.list_offers(c, "reserved", 9, 0),  # (a full page in both fleets)
        "closed offers by cursor": lambda c: ac.list_offers(c, "closed", 9, 0, (now + 10**9, "f" * 32)),
        "bid match": lambda c: ac.cheapest_open_offer(c, 3.0, 2),
    }
    register(0, 100)
    small = {name: steps(fn) for name, fn in reads.items()}
    register(100, 19_900)
    large = {name: steps(fn) for name, fn in reads.items()}
    conn.close()
    for name in reads:
        assert large[name] <= 2 * small[name], (name, small[name], large[name])
