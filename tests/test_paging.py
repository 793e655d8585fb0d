"""Keyset cursors on every list: a walk sees each row that existed throughout exactly once, whatever is
inserted meanwhile; offsets keep working as before; a cursor that is no position is a 422."""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

import aitbc_coord as ac
from conftest import ADMIN, CLIENT, Harness, harness, make_settings
from test_receipts import EDGE_SEED

pytestmark = pytest.mark.anyio
CLIENTS = [f"c{i}" for i in range(8)]
MINERS = [f"m{i}" for i in range(12)]
KEYS = {"CLIENT_API_KEYS": ",".join(f"{c}=key-{c}" for c in CLIENTS),
        "MINER_API_KEYS": ",".join(f"{m}=key-{m}" for m in MINERS), "RECEIPT_SIGNING_KEY_HEX": EDGE_SEED}


def key(name: str) -> dict[str, str]:
    return {"X-Api-Key": f"key-{name}"}


class World:
    """Jobs from several clients, some completed (receipts), miners and admin offers; `grow` adds rows
    of every list while a walk is under way, on a clock that moves forward."""

    def __init__(self, h: Harness) -> None:
        self.h, self.n = h, 0

    async def job(self, client: str = "c0", complete_by: str | None = None) -> None:
        self.h.clock.advance(1)
        self.n += 1
        # a job left queued is for no miner here, so a poll takes the one about to be completed
        where = {} if complete_by is not None else {"constraints": {"region": "nowhere"}}
        job = await self.h.submit({"n": self.n}, headers=key(client), **where)
        if complete_by is not None:
            await self.h.register(key(complete_by), capabilities={"price": 1})
            assert (await self.h.take(key(complete_by)))["job_id"] == job["job_id"]
            assert (await self.h.result(job["job_id"], headers=key(complete_by))).status_code == 200

    async def miner(self, name: str) -> None:
        self.h.clock.advance(1)
        await self.h.register(key(name), capabilities={"price": 1})

    async def offer(self) -> None:
        self.h.clock.advance(1)
        r = await self.h.client.post("/v1/marketplace/offers", json={"provider": f"dc-{self.n}", "capacity": 1,
                                                                      "price": 2.0}, headers=ADMIN)
        assert r.status_code == 201
        self.n += 1

    async def seed(self) -> None:
        for i in range(6):
            await self.miner(MINERS[i])
        for i in range(9):
            await self.job(CLIENTS[i % 4], MINERS[i % 6] if i % 2 else None)
        for _ in range(3):
            await self.offer()

    async def grow(self, step: int) -> None:
        """New rows in every list: a job of a new client (a new address), a completed job (a new receipt
        and block), a new miner and a new admin offer. Existing rows keep their sort keys."""
        await self.job(CLIENTS[4 + step % 4])
        await self.job(CLIENTS[4 + step % 4], MINERS[6 + step % 6])
        await self.miner(MINERS[6 + (step + 1) % 6])
        await self.offer()


# list path, headers, the field naming a row, the JSON of the page
LISTS: dict[str, tuple[str, dict[str, str], str]] = {
    "client jobs": ("/v1/jobs", key("c4"), "job_id"),
    "admin jobs": ("/v1/admin/jobs", ADMIN, "job_id"),
    "admin miners": ("/v1/admin/miners", ADMIN, "miner_id"),
    "blocks": ("/v1/explorer/blocks", {}, "hash"),
    "transactions": ("/v1/explorer/transactions", {}, "hash"),
    "addresses": ("/v1/explorer/addresses", {}, "address"),
    "receipts": ("/v1/explorer/receipts", {}, "receiptId"),
    "offers": ("/v1/marketplace/offers", {}, "id"),
}


async def page(h: Harness, path: str, headers: dict[str, str], **params: Any) -> tuple[list[Any], str | None]:
    """One page's items and the cursor of the next (from the body, or the offers' Link header)."""
    r = await h.client.get(path, params=params, headers=headers)
    assert r.status_code == 200, r.text
    body = r.json()
    if isinstance(body, list):  # the offers list: a bare array, its next page in a Link header
        link = r.headers.get("link")
        cursor = None
        if link is not None:
            target = re.fullmatch(r'<([^>]*)>; rel="next"', link).group(1)  # type: ignore[union-attr]
            cursor = urllib.parse.parse_qs(urllib.parse.urlsplit(target).query)["cursor"][0]
        return body, cursor
    return body["items"], body["next_cursor"]


async def walk(h: Harness, name: str, limit: int, between: Callable[[int], Awaitable[None]] | None = None) -> list[str]:
    path, headers, field = LISTS[name]
    seen, cursor, step = [], None, 0
    while True:
        items, cursor = await page(h, path, headers, limit=limit, **({"cursor": cursor} if cursor else {}))
        seen += [item[field] for item in items]
        if cursor is None:
            return seen
        if between is not None:
            await between(step)
        step += 1


@pytest.mark.parametrize("name", list(LISTS))
async def test_a_walk_by_cursor_sees_every_row_once_while_rows_are_added(tmp_path: Path, name: str) -> None:
    async with harness(tmp_path, KEYS) as h:
        world = World(h)
        await world.seed()
        await world.grow(0)  # the client jobs list is c4's
        before = await walk(h, name, 200)
        assert len(before) >= 2 and len(set(before)) == len(before)
        during = await walk(h, name, 2, world.grow)
        assert len(set(during)) == len(during), f"{name}: a row seen twice"
        assert set(before) <= set(during), f"{name}: rows skipped: {set(before) - set(during)}"
        assert set(during) <= set(await walk(h, name, 200))


async def test_an_offset_page_repeats_a_row_after_an_insert_and_a_cursor_page_does_not(tmp_path: Path) -> None:
    """The issue's example: a job submitted between ?limit=2 and ?offset=2 shows on both pages."""
    async with harness(tmp_path) as h:
        for i in range(4):
            await h.submit({"n": i})
        first = (await h.client.get("/v1/jobs", params={"limit": 2}, headers=CLIENT)).json()
        assert first["next_offset"] == 2 and first["next_cursor"]
        await h.submit({"n": "late"})
        by_offset = (await h.client.get("/v1/jobs", params={"limit": 2, "offset": 2}, headers=CLIENT)).json()
        by_cursor = (await h.client.get("/v1/jobs", params={"limit": 2, "cursor": first["next_cursor"]},
                                        headers=CLIENT)).json()
        seen = {j["job_id"] for j in first["items"]}
        assert seen & {j["job_id"] for j in by_offset["items"]}  # the offset page repeats one (kept as it was)
        assert not seen & {j["job_id"] for j in by_cursor["items"]} and len(by_cursor["items"]) == 2
        assert by_cursor["next_offset"] is None and by_cursor["next_cursor"] is None  # the walk is done


async def test_state_filtered_lists_page_by_cursor(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        queued = [(await h.submit({"n": i}))["job_id"] for i in range(5)]
        await h.register(concurrency=2)
        for _ in range(2):
            queued.remove((await h.take())["job_id"])
        cursor, seen = None, []
        while True:
            params = {"state": "queued", "limit": 1, **({"cursor": cursor} if cursor else {})}
            body = (await h.client.get("/v1/admin/jobs", params=params, headers=ADMIN)).json()
            seen += [j["job_id"] for j in body["items"]]
            if (cursor := body["next_cursor"]) is None:
                break
        assert seen == list(reversed(queued))


def other_cursor(name: str) -> str:
    """A well-formed cursor this server issues, but for another list."""
    return ac.make_cursor("receipts" if name != "receipts" else "blocks", 5)


@pytest.mark.parametrize("name", list(LISTS))
async def test_a_cursor_that_is_no_position_in_the_list_is_a_422(tmp_path: Path, name: str) -> None:
    path, headers, _ = LISTS[name]
    async with harness(tmp_path, KEYS) as h:
        for bad in ("abc", "%%", "W10", "x" * 401, ac.make_cursor(), other_cursor(name),
                    ac.make_cursor(*{"addresses": ("addresses", -1, "x"), "admin miners": ("miners", 1, 2),
                                     "offers": ("offers", 1, 2)}.get(name, ("jobs", -5)))):
            r = await h.client.get(path, params={"cursor": bad}, headers=headers)
            assert r.status_code == 422, (name, bad, r.text)
            assert r.json()["detail"][0]["loc"] == ["query", "cursor"], (name, bad, r.text)
        r = await h.client.get(path, params={"cursor": other_cursor(name), "offset": 3}, headers=headers)
        assert (r.status_code, r.json()["detail"][0]["loc"]) == (422, ["query", "offset"])


async def test_offers_give_their_next_page_in_a_link_header_under_any_prefix(tmp_path: Path) -> None:
    app = ac.App(make_settings(tmp_path))
    outer = Starlette(routes=[Mount("/coordinator", app=app)])
    async with app.lifespan():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=outer), base_url="http://proxy.test") as client:
            for i in range(5):
                r = await client.post("/coordinator/v1/marketplace/offers", headers=ADMIN,
                                      json={"provider": f"dc-{i}", "capacity": 1, "price": 1, "status": "open"})
                assert r.status_code == 201
            url, ids = "/coordinator/v1/marketplace/offers?status=OPEN&limit=2", []
            while url:
                r = await client.get(url)
                ids += [o["id"] for o in r.json()]
                link = r.headers.get("link")
                url = re.fullmatch(r'<(/coordinator/v1/marketplace/offers\?status=OPEN&limit=2&cursor=[\w-]+)>;'
                                   r' rel="next"', link).group(1) if link else ""  # type: ignore[union-attr]
            every = (await client.get("/coordinator/v1/marketplace/offers")).json()
            assert ids == [o["id"] for o in every] and len(ids) == 5
            last = await client.get("/coordinator/v1/marketplace/offers", params={"limit": 5})
            assert "link" not in last.headers  # nothing follows the last page


async def test_admin_miners_page_in_registration_order(tmp_path: Path) -> None:
    async with harness(tmp_path, KEYS) as h:
        for name in ("m3", "m1", "m2"):
            h.clock.advance(1)
            await h.register(key(name))
        h.clock.advance(1)
        await h.register(key("m3"), concurrency=4)  # re-registering does not move it
        body = (await h.client.get("/v1/admin/miners", params={"limit": 2}, headers=ADMIN)).json()
        assert [m["miner_id"] for m in body["items"]] == ["m3", "m1"] and body["next_offset"] == 2
        rest = (await h.client.get("/v1/admin/miners", params={"cursor": body["next_cursor"]}, headers=ADMIN)).json()
        assert [m["miner_id"] for m in rest["items"]] == ["m2"] and rest["next_cursor"] is None
        assert (await h.client.get("/v1/admin/miners", params={"limit": 501}, headers=ADMIN)).status_code == 422


def raw_cursor(json_text: str) -> str:
    """A cursor made of JSON text as given (escapes and all), as a crafted request would send it."""
    return ac.b64url(json_text.encode())


LONE = "\\ud800"  # decodes to a lone surrogate, which no SQLite text parameter can hold


@pytest.mark.parametrize("name", [*LISTS, "job receipts", "checkpoints"])
async def test_a_cursor_holding_a_lone_surrogate_is_a_422_on_every_list(tmp_path: Path, name: str) -> None:
    """Any string of a cursor's key that is not UTF-8 text is refused before it reaches SQLite (was a 500)."""
    async with harness(tmp_path, KEYS) as h:
        job = await h.submit({"n": 1}, headers=key("c4"))
        path, headers, _ = LISTS.get(name) or {
            "job receipts": (f"/v1/jobs/{job['job_id']}/receipts", key("c4"), ""),
            "checkpoints": ("/v1/log/checkpoints", {}, "")}[name]
        tag = {"client jobs": "jobs", "admin jobs": "jobs", "admin miners": "miners",
               "job receipts": job["job_id"]}.get(name, name)
        for text in (f'["{tag}", 1, "{LONE}"]', f'["{tag}", 1, "a{LONE}b"]', f'["{LONE}", 1]',
                     f'["{tag}", 1]'.replace(tag, tag[:1] + LONE), f'["{tag}", "{LONE}", 1]'):
            r = await h.client.get(path, params={"cursor": raw_cursor(text)}, headers=headers)
            assert r.status_code == 422, (name, text, r.text)
            assert r.json()["detail"][0]["loc"] == ["query", "cursor"], (name, text, r.text)


async def test_path_and_query_strings_that_are_not_utf8_never_reach_sqlite_as_such(tmp_path: Path) -> None:
    """Percent-encoded surrogates (ED A0 80) in a path or a query parameter decode with replacement
    characters: an ordinary answer (a 404, or an empty page), never a 500."""
    async with harness(tmp_path, KEYS) as h:
        for path, headers in (("/v1/jobs/%ED%A0%80", key("c4")), ("/v1/jobs/%ED%A0%80/result", key("c4")),
                              ("/v1/jobs/%ED%A0%80/receipts", key("c4")), ("/v1/explorer/blocks/%ED%A0%80", {}),
                              ("/v1/explorer/addresses/%ED%A0%80", {}), ("/v1/marketplace/bids/%ED%A0%80", {}),
                              ("/v1/explorer/receipts?job_id=%ED%A0%80", {}),
                              ("/v1/log/proof/inclusion?receipt_id=%ED%A0%80", {}),
                              ("/v1/marketplace/offers?status=%ED%A0%80", {}), ("/v1/admin/jobs?state=%ED%A0%80", ADMIN)):
            r = await h.client.get(path, headers=headers)
            assert r.status_code < 500, (path, r.status_code, r.text)


async def test_a_negative_checkpoint_cursor_and_offset_0_beside_a_cursor_are_422(tmp_path: Path) -> None:
    async with harness(tmp_path, KEYS) as h:
        r = await h.client.get("/v1/log/checkpoints", params={"cursor": ac.make_cursor("checkpoints", -5)})
        assert (r.status_code, r.json()["detail"][0]["loc"]) == (422, ["query", "cursor"])
        for name, (path, headers, _) in LISTS.items():
            cursor = {"admin miners": ac.make_cursor("miners", 1, "x"), "offers": ac.make_cursor("offers", 1, "x"),
                      "addresses": ac.make_cursor("addresses", 1, "x")}.get(
                name, ac.make_cursor("jobs" if "jobs" in name else name, 5))
            r = await h.client.get(path, params={"cursor": cursor, "offset": 0}, headers=headers)
            assert (r.status_code, r.json()["detail"][0]["loc"]) == (422, ["query", "offset"]), (name, r.text)


async def test_offset_pages_every_list_including_a_jobs_receipts_and_the_checkpoints(tmp_path: Path) -> None:
    """?offset=1 on a job's receipts and on the checkpoints once answered the first page again (a client
    paging by offset never finished); on every list it skips that many rows, and next_offset says where on."""
    async with harness(tmp_path, {**KEYS, "RECEIPT_LOG_CHECKPOINT_SECONDS": "1"}) as h:
        world = World(h)
        await world.seed()
        assert await h.coord.checkpoint()
        await world.grow(0)
        h.clock.advance(5)
        assert await h.coord.checkpoint()
        job_id = (await h.client.get("/v1/explorer/receipts")).json()["items"][0]["jobId"]
        client = (await h.client.get("/v1/admin/jobs", params={"limit": 500}, headers=ADMIN)).json()
        owner = next(j["client_id"] for j in client["items"] if j["job_id"] == job_id)
        lists = {**LISTS, "job receipts": (f"/v1/jobs/{job_id}/receipts", key(owner), "receipt_id"),
                 "checkpoints": ("/v1/log/checkpoints", {}, "tree_size")}
        for name, (path, headers, field) in lists.items():
            everything = [item[field] for item in (await page(h, path, headers, limit=200))[0]]
            assert len(everything) >= (1 if name == "job receipts" else 2), name
            for offset in (1, 2):
                r = await h.client.get(path, params={"limit": 1, "offset": offset}, headers=headers)
                assert r.status_code == 200, (name, r.text)
                body = r.json()
                items = body if isinstance(body, list) else body["items"]
                assert [item[field] for item in items] == everything[offset:offset + 1], (name, offset)
                if not isinstance(body, list):
                    assert body["next_offset"] == (offset + 1 if items else None), (name, body)
            first = (await h.client.get(path, params={"limit": 1}, headers=headers)).json()
            if isinstance(first, dict) and first["next_cursor"]:
                r = await h.client.get(path, params={"cursor": first["next_cursor"], "offset": 1}, headers=headers)
                assert (r.status_code, r.json()["detail"][0]["loc"]) == (422, ["query", "offset"]), name
