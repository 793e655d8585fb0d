"""Every input gets a clear answer (spec sections 4 and 15, "Bad input").

The property test walks the app's own /openapi.json: for every route, every query parameter, path
parameter and body field (including the nested fields that the schema only types loosely, such as
`capabilities.gpu.memory_gb` or `metrics.units`), and the Idempotency-Key header of POST /v1/jobs, it
sends a hostile value in that one place while the rest of the request is valid (right key, a
registered miner, a job the miner holds, an admin offer, a bid...). For every answer:

- never a 5xx;
- a 422 has `detail` as a list whose items have a `loc` naming the offending parameter;
- any other 4xx has `{"detail": <string>}`;
- a refused request (4xx) creates no job, miner, offer, bid or receipt and changes no job's state;
- a miner's report (result/fail) with odd numbers inside `result`/`metrics` is never blocked.

Bodies are built as raw JSON text (integers of thousands of digits, `-0`), so what is sent is exactly
what the test says. The failures are collected over the whole walk and reported together.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import re
import sqlite3
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import aitbc_coord as ac
from conftest import ADMIN, CLIENT, MINER, Harness, harness, open_database
from test_receipts import EDGE_SEED

KEYS = {"client": CLIENT, "miner": MINER, "admin": ADMIN, None: {}}
ROLE = {(ep.method, ep.path): ep.role for ep in ac.ENDPOINTS}
ENV = {"RATE_LIMIT_REQUESTS": "0", "POLL_MAX_WAIT_SECONDS": "0.01", "RECEIPT_SIGNING_KEY_HEX": EDGE_SEED,
       "DB_SYNCHRONOUS": "OFF"}
EXAMPLES_PER_PLACE = 10  # generated values per place, on top of the fixed list


# --- raw JSON text -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Raw:
    """A JSON value given as its text (Python's json refuses to write ints of more than 4300 digits)."""

    text: str

    def __repr__(self) -> str:
        return f"Raw({self.text!r})" if len(self.text) < 40 else f"Raw({self.text[:12]!r}...<{len(self.text)} chars>)"


def dump(value: Any) -> str:
    """JSON text of `value`, with Raw members spliced in as they are."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{dump(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dump(v) for v in value) + "]"
    return json.dumps(value)


def loads(text: str) -> Any:
    """Parse an answer as a client would that keeps every JSON integer (Python's int() stops at 4,300
    digits; the coordinator writes such a number back exactly as it was sent)."""
    return json.loads(text, parse_int=lambda digits: int(digits) if len(digits) <= 4300 else Raw(digits))


def as_text(value: Any) -> str:
    """The value as a query string, path segment or header would carry it."""
    if isinstance(value, str):
        return value
    return dump(value)


def short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- hostile values ------------------------------------------------------------------------------

NUMERALS = ["²", "٣", "४", "௫", "Ⅻ", "１２", "𝟗", "½", "①", "٣٤٥"]
BIG_DIGITS = [Raw("9" * 25), Raw("1" * 1000), Raw("-" + "1" * 1000), Raw("9" * 5000), Raw("-" + "9" * 5000)]
BOUNDS = [ac.MAX_AMOUNT, Raw("1000000000001"), ac.MAX_AMOUNT * 1.5, 10**6, 10**6 + 1, 1024 * 10**6 + 1,
          0, 500, 501, 4097, 604801, 1_000_000_001, 2**53, 2**53 + 1, 2**63, 2**64, 1e308, -1e308, 5e-324]
NEGATIVE = [Raw("-0"), -0.0, -1, -5, -1.5, -(2**63) - 1]
NUL = ["a\u0000b", "\u0000"]
WRONG_TYPES: list[Any] = [[], [1, "a"], {}, {"a": 1}, "x", "", True, False, None]
HOSTILE: list[Any] = [*NUMERALS, *BIG_DIGITS, *BOUNDS, *NEGATIVE, *NUL, *WRONG_TYPES]

GENERATED = st.one_of(
    st.text(alphabet=st.characters(categories=["Nd", "No", "Nl"]), min_size=1, max_size=5),
    st.integers(min_value=19, max_value=5000).map(lambda n: Raw("9" * n)),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=6).map(lambda s: f"{s}\u0000{s}"),
    st.sampled_from(WRONG_TYPES),
)

# --- where a value can go ------------------------------------------------------------------------

# Fields the schema types only as "an object": what the coordinator reads inside them.
LOOSE: dict[str, list[tuple[Any, ...]]] = {
    "capabilities": [("gpu",), ("gpu", "model"), ("gpu", "memory_gb"), ("gpu", "cuda_version"), ("gpus",),
                     ("gpus", 0), ("gpus", 0, "name"), ("gpus", 0, "memory_mb"), ("price",), ("cuda",),
                     ("models",), ("models", 0), ("sla",), ("region",)],
    "result": [("units",), ("price",), ("unit_type",)],
    "metrics": [("units",), ("price",), ("unit_type",)],
    "payload": [("value",)],
    "metadata": [("note",)],
}


@dataclasses.dataclass(frozen=True)
class Place:
    method: str
    route: str
    where: str  # "query", "path", "body" or "header"
    name: tuple[Any, ...]

    def __str__(self) -> str:
        dotted = ".".join(f"[{p}]" if isinstance(p, int) else p for p in self.name).replace(".[", "[")
        return f"{self.method} {self.route} {self.where}:{dotted}"


def places_from_openapi(doc: dict[str, Any]) -> list[Place]:
    schemas = doc["components"]["schemas"]

    def resolve(schema: dict[str, Any]) -> dict[str, Any]:
        while True:
            if "$ref" in schema:
                schema = schemas[schema["$ref"].rsplit("/", 1)[1]]
            elif "anyOf" in schema and len(branches := [b for b in schema["anyOf"] if b.get("type") != "null"]) == 1:
                schema = branches[0]
            else:
                return schema

    def walk(schema: dict[str, Any], prefix: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        s, out = resolve(schema), []
        if s.get("type") in ("object", None) and s.get("properties"):  # keywords without a type bind objects
            for name, sub in s["properties"].items():
                out += [prefix + (name,), *walk(sub, prefix + (name,))]
        elif s.get("type") in ("array", None) and "items" in s:
            out += [prefix + (0,), *walk(s["items"], prefix + (0,))]
        if s.get("type") == "object" and prefix:
            out += [prefix + extra for extra in LOOSE.get(prefix[-1], []) if prefix + extra not in out]
        return out

    places = []
    for route, ops in doc["paths"].items():
        if not route.startswith("/v1/"):
            continue
        for method, op in ops.items():
            method = method.upper()
            for p in op.get("parameters", []):
                places.append(Place(method, route, p["in"], (p["name"],)))
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if body is not None:
                places += [Place(method, route, "body", name) for name in walk(body, ())]
            if (method, route) == ("POST", "/v1/jobs"):
                places.append(Place(method, route, "header", ("idempotency-key",)))
    return places


# --- a valid request around the hostile value ----------------------------------------------------

CAPS = {"gpu": {"model": "X", "memory_gb": 24, "cuda_version": "12.1"}, "price": 0.5, "cuda": "12.1",
        "models": ["m"], "sla": "gold", "region": "eu"}
BASE: dict[str, dict[str, Any]] = {
    "/v1/jobs": {"payload": {"task": "t", "value": "1"}, "ttl_seconds": 600,
                 "constraints": {"gpu": "A100", "cuda": "12", "min_vram_gb": 1, "models": ["m"], "region": "eu",
                                 "max_price": 1.0}},
    "/v1/miners/register": {"capabilities": CAPS, "concurrency": 1, "region": "eu"},
    "/v1/miners/heartbeat": {"inflight": 0, "status": "ONLINE", "metadata": {"note": "n"}},
    "/v1/miners/poll": {"max_wait_seconds": 0},
    "/v1/miners/{job_id}/result": {"result": {"ok": 1, "units": 2, "price": 1.0, "unit_type": "gpu_seconds"},
                                   "metrics": {"units": 2, "price": 1.0, "unit_type": "gpu_seconds"}},
    "/v1/miners/{job_id}/fail": {"error_code": "E", "error_message": "m", "metrics": {"units": 1, "price": 1.0},
                                 "retryable": False},
    "/v1/marketplace/offers": {"provider": "p", "capacity": 1, "price": 1.0, "sla": "s", "status": "open"},
    "/v1/marketplace/offers/{offer_id}/status": {"status": "open"},
    "/v1/marketplace/bids": {"provider": "p", "capacity": 1, "price": 1.0, "notes": "n"},
}


# Required query parameters of the routes that have them, for a probe of another one ("receipt" is
# the seeded receipt's id).
QUERY_BASE: dict[str, dict[str, Any]] = {
    "/v1/log/proof/inclusion": {"receipt_id": "receipt"},
    "/v1/log/proof/consistency": {"first": 0, "second": 1},
    "/v1/log/entries": {"start": 0},
}


def set_in(body: dict[str, Any], name: tuple[Any, ...], value: Any) -> None:
    node: Any = body
    for i, step in enumerate(name):
        last = i == len(name) - 1
        if isinstance(step, int):
            if not isinstance(node, list):
                raise AssertionError(f"{name}: not a list at {step}")
            while len(node) <= step:
                node.append({})
            if last:
                node[step] = value
            node = node[step]
        else:
            if last:
                node[step] = value
            else:
                node = node.setdefault(step, [] if isinstance(name[i + 1], int) else {})


def body_for(place: Place, value: Any, extra: dict[str, Any]) -> dict[str, Any]:
    base = copy.deepcopy(BASE.get(place.route, extra))
    if place.where == "body":
        if place.name[:2] == ("capabilities", "gpus"):
            base["capabilities"]["gpus"] = [{"name": "A100", "memory_mb": 40960}]
        set_in(base, place.name, value)
    return base


# --- what the database holds ---------------------------------------------------------------------

SNAPSHOT_SQL = [
    "SELECT COUNT(*), SUM(attempts), SUM(LENGTH(COALESCE(error, ''))), SUM(LENGTH(COALESCE(result, ''))),"
    " SUM(COALESCE(finished_at, 0)) FROM jobs LEFT JOIN job_data USING (seq)",
    "SELECT state, SUM(n) FROM job_counts GROUP BY state ORDER BY state",
    "SELECT job_id, state, assigned_miner_id, attempts, error, result, metrics FROM jobs JOIN job_data USING (seq)"
    " WHERE state IN ('QUEUED', 'RUNNING') ORDER BY seq",
    "SELECT miner_id, capabilities, price, sla, concurrency, region, status, reported_inflight, metadata,"
    " session_token, jobs_completed, jobs_failed FROM miners ORDER BY miner_id",
    "SELECT offer_id, provider, capacity, price, sla, status FROM offers ORDER BY seq",
    "SELECT COUNT(*), SUM(capacity), SUM(price) FROM bids",
    "SELECT COUNT(*) FROM receipts",
    "SELECT COUNT(*) FROM idempotency_keys",
]


class Snapshots:
    def __init__(self, db: Path | str) -> None:
        self.conn = open_database(db)

    def take(self) -> list[list[tuple[Any, ...]]]:
        if isinstance(self.conn, ac.PgConnection):  # one round trip, not eight: half this test's time
            arrays = ", ".join(f"ARRAY(SELECT CAST(row_to_json(q) AS text) FROM ({sql}) AS q)" for sql in SNAPSHOT_SQL)
            return [[(row,) for row in column] for column in self.conn.execute(f"SELECT {arrays}").fetchone()]
        return [[tuple(row) for row in self.conn.execute(sql).fetchall()] for sql in SNAPSHOT_SQL]

    def job(self, job_id: str) -> tuple[Any, ...] | None:
        return self.conn.execute("SELECT state, assigned_miner_id FROM jobs WHERE job_id = ?", (job_id,)).fetchone()

    def close(self) -> None:
        self.conn.close()


# --- the checks ----------------------------------------------------------------------------------


def names_place(loc: Any, place: Place) -> bool:
    if not isinstance(loc, list) or len(loc) < 2:
        return False
    if place.where == "header":
        return loc[:2] == ["header", place.name[0].lower()]
    return loc[:2] == [place.where, place.name[0]]


def answer_problems(place: Place, status: int, text: str) -> list[str]:
    """What is wrong with an answer, whatever the input was (empty when it is clear)."""
    if status >= 500:
        return [f"{status} (5xx)"]
    if status == 204:
        return []
    try:
        data = loads(text)
    except ValueError:
        return [f"{status} with a body that is not JSON: {text[:80]!r}"]
    if not 400 <= status < 500:
        return []
    detail = data.get("detail") if isinstance(data, dict) else None
    if status == 422:
        if not isinstance(detail, list) or not detail:
            return [f"422 whose detail is not a list of errors: {text[:120]}"]
        bad = [item.get("loc") if isinstance(item, dict) else item for item in detail
               if not isinstance(item, dict) or not names_place(item.get("loc"), place)]
        if bad:
            return [f"422 with loc {json.dumps(bad[0], ensure_ascii=False)[:100]} not naming "
                    f"{place.where}.{place.name[0]}"]
        return []
    if not isinstance(detail, str):
        return [f"{status} whose detail is not a string: {text[:120]}"]
    return []


# Where a value must be refused (422 naming it) and not stored: U+0000 in a field stored as its own
# text column, and numbers out of the documented range in what a client or miner declares.
TEXT_COLUMNS = {
    ("/v1/miners/register", "body", ("region",)), ("/v1/miners/register", "body", ("capabilities", "sla")),
    ("/v1/miners/heartbeat", "body", ("status",)),
    ("/v1/miners/{job_id}/fail", "body", ("error_code",)), ("/v1/miners/{job_id}/fail", "body", ("error_message",)),
    ("/v1/marketplace/offers", "body", ("provider",)), ("/v1/marketplace/offers", "body", ("sla",)),
    ("/v1/marketplace/bids", "body", ("provider",)), ("/v1/marketplace/bids", "body", ("notes",)),
    *[("/v1/jobs", "body", ("constraints", name)) for name in ("gpu", "cuda", "region")],
    ("/v1/jobs", "body", ("constraints", "models", 0)), ("/v1/jobs", "header", ("idempotency-key",)),
}
# (route, field) -> (lowest, highest) accepted number
RANGES = {
    ("/v1/miners/register", ("capabilities", "price")): (0, ac.MAX_AMOUNT),
    ("/v1/miners/register", ("capabilities", "gpu", "memory_gb")): (0, 10**6),
    ("/v1/miners/register", ("capabilities", "gpus", 0, "memory_mb")): (0, 1024 * 10**6),
    ("/v1/jobs", ("constraints", "max_price")): (0, ac.MAX_AMOUNT),
    ("/v1/jobs", ("constraints", "min_vram_gb")): (0, 10**6),
    ("/v1/marketplace/offers", ("price",)): (0, ac.MAX_AMOUNT),
    ("/v1/marketplace/offers", ("capacity",)): (0, ac.MAX_AMOUNT),
    ("/v1/marketplace/bids", ("price",)): (0, ac.MAX_AMOUNT),
    ("/v1/marketplace/bids", ("capacity",)): (0, ac.MAX_AMOUNT),
}
FREE_OBJECTS = ("payload", "result", "metrics", "metadata")


def number_of(value: Any) -> float | int | None:
    """The number a JSON value is (a Raw of thousands of digits counts as +-infinity), or None."""
    if isinstance(value, Raw):
        digits = value.text.lstrip("-")
        if digits.isdigit():
            sign = -1 if value.text.startswith("-") else 1
            return sign * math.inf if len(digits) > 30 else int(value.text)
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    return None


def expected(place: Place, value: Any) -> str | None:
    """"refuse" (422 naming the place), "accept" (2xx), or None (any clear answer)."""
    if place.name == ("cursor",):  # nothing here is a cursor the server issued for that list
        return None if re.fullmatch(r"[0-9]{1,3}", as_text(value)) else "refuse"
    if isinstance(value, str) and "\u0000" in value:
        if (place.route, place.where, place.name) in TEXT_COLUMNS:
            return "refuse"
        if place.where == "body" and len(place.name) >= 2 and place.name[0] in FREE_OBJECTS:
            return "accept"
    bounds = RANGES.get((place.route, place.name)) if place.where == "body" else None
    number = number_of(value)
    if bounds is not None and number is not None and not bounds[0] <= number <= bounds[1]:
        return "refuse"
    return None


def is_miner_report_inside(place: Place) -> bool:
    """A number or string inside `result` or `metrics` of a result/fail: it must never block the job."""
    return (place.where == "body" and place.route.startswith("/v1/miners/{job_id}/") and len(place.name) >= 2
            and place.name[0] in ("result", "metrics"))


# --- the world the probes run in -----------------------------------------------------------------


class World:
    """A coordinator seeded so that every route reaches its logic, and the probe that drives it."""

    def __init__(self, h: Harness, db: Path) -> None:
        self.h, self.snap = h, Snapshots(db)
        self.ids: dict[str, str] = {}
        self.receipt: dict[str, Any] = {}
        self.held = ""
        self.failures: dict[tuple[str, str], list[str]] = {}
        self.counts: dict[tuple[str, str], int] = {}
        self.sent = 0
        self.unchanged: list[list[tuple[Any, ...]]] | None = None  # the snapshot after a refusal that changed nothing

    async def setup(self) -> None:
        h = self.h
        await self.register()
        done = await h.submit()
        assert (await h.take())["job_id"] == done["job_id"]
        r = await h.result(done["job_id"], {"ok": 1})
        assert r.status_code == 200, r.text
        self.receipt = r.json()["receipt"]
        offer = await h.client.post("/v1/marketplace/offers", json=BASE["/v1/marketplace/offers"], headers=ADMIN)
        bid = await h.client.post("/v1/marketplace/bids", json=BASE["/v1/marketplace/bids"])
        assert offer.status_code == 201 and bid.status_code == 202, (offer.text, bid.text)
        self.ids = {"done": done["job_id"], "offer_id": offer.json()["id"], "bid_id": bid.json()["id"]}

    async def register(self) -> None:
        await self.h.register(capabilities=CAPS, concurrency=1, region="eu")

    async def cancel_queued(self) -> None:
        r = await self.h.client.get("/v1/jobs", params={"state": "QUEUED", "limit": 500}, headers=CLIENT)
        for job in r.json()["items"]:
            await self.h.client.post(f"/v1/jobs/{job['job_id']}/cancel", headers=CLIENT)

    async def ensure_held(self) -> bool:
        """A RUNNING job held by the miner, with nothing else queued; whether it had to make one."""
        row = self.snap.job(self.held) if self.held else None
        if row is not None and row[0] == "RUNNING":
            return False
        for _ in range(2):
            await self.cancel_queued()
            job = await self.h.submit()
            r = await self.h.poll()
            if r.status_code == 200 and r.json()["job_id"] == job["job_id"]:
                self.held = job["job_id"]
                return True
            await self.register()  # slot taken or status changed: start the miner afresh
        raise AssertionError("could not hand the miner a job")

    def path_for(self, place: Place, value: Any) -> str:
        def fill(m: re.Match[str]) -> str:
            name = m.group(1)
            if place.where == "path" and place.name[0] == name:
                return urllib.parse.quote(as_text(value), safe="")
            if name == "job_id":
                return self.held if place.route.startswith("/v1/miners/") else self.ids["done"]
            return self.ids[name]
        return re.sub(r"{(\w+)}", fill, place.route)

    async def send(self, place: Place, value: Any) -> httpx.Response:
        headers: dict[str, Any] = {**KEYS[ROLE[(place.method, place.route)]]}
        params = [(name, as_text(self.receipt["receipt_id"] if v == "receipt" else v))
                  for name, v in QUERY_BASE.get(place.route, {}).items() if (place.where, name) != ("query", place.name[0])]
        params += [(place.name[0], as_text(value))] if place.where == "query" else []
        if place.where == "header":
            headers[place.name[0]] = as_text(value).encode("utf-8")
        content = None
        if place.method == "POST":
            content = dump(body_for(place, value, {"receipt": self.receipt})).encode("utf-8")
            headers["content-type"] = "application/json"
        return await self.h.client.request(place.method, self.path_for(place, value), params=params,
                                           content=content, headers=headers)

    async def tidy(self, place: Place, r: httpx.Response) -> None:
        """Undo what an accepted probe changed, so the next one starts from the seeded state."""
        if r.status_code >= 300:
            return
        if place.route == "/v1/miners/register":
            await self.register()
        elif place.route == "/v1/miners/heartbeat":
            await self.h.client.post("/v1/miners/heartbeat", json={"status": "ONLINE"}, headers=MINER)
        if place.method == "POST" and place.route in ("/v1/jobs", "/v1/miners/register", "/v1/miners/{job_id}/fail",
                                                     "/v1/miners/poll"):
            await self.cancel_queued()

    async def probe(self, place: Place, value: Any) -> None:
        made = place.route.startswith("/v1/miners/{job_id}/") and await self.ensure_held()
        # the state after the last refusal, which changed nothing, is the state now unless a job was made
        before = self.unchanged if self.unchanged is not None and not made else self.snap.take()
        r = await self.send(place, value)
        self.sent += 1
        self.unchanged = None
        problems = answer_problems(place, r.status_code, r.text)
        if 400 <= r.status_code < 500:
            if (after := self.snap.take()) != before:
                problems.append(f"refused with {r.status_code} but the database changed")
            else:
                self.unchanged = after
        want = expected(place, value)
        if want == "refuse" and r.status_code != 422:
            problems.append(f"should be refused with a 422 naming it, got {r.status_code} {r.text[:80]}")
        if want == "accept" and not 200 <= r.status_code < 300:
            problems.append(f"should be accepted, got {r.status_code} {r.text[:80]}")
        if is_miner_report_inside(place):
            state = (self.snap.job(self.held) or ("?",))[0]
            want = "COMPLETED" if place.route.endswith("/result") else "FAILED"
            if r.status_code != 200 or state != want:
                problems.append(f"miner report blocked: {r.status_code} {r.text[:100]} (job {state}, want 200 "
                                f"and {want})")
        for problem in problems:
            kind = " ".join(problem.split()[:3])
            examples = self.failures.setdefault((str(place), kind), [])
            if len(examples) < 3:
                examples.append(f"{short(value)} -> {problem}")
            self.counts[(str(place), kind)] = self.counts.get((str(place), kind), 0) + 1
        await self.tidy(place, r)

    def report(self) -> str:
        lines = [f"{len(self.failures)} (place, kind) failures over {self.sent} requests:"]
        for key, examples in sorted(self.failures.items()):
            more = self.counts[key] - len(examples)
            lines.append(f"  {key[0]}" + (f"  (+{more} more values)" if more else ""))
            lines += [f"      {e}" for e in examples]
        return "\n".join(lines)


@contextlib.contextmanager
def world(tmp_path: Path) -> Iterator[tuple[World, Callable[[Any], Any], list[Place]]]:
    """A seeded World on its own event loop (hypothesis drives it from a plain function)."""
    loop = asyncio.new_event_loop()
    cm = harness(tmp_path, ENV)
    h = loop.run_until_complete(cm.__aenter__())
    w = World(h, h.coord.settings.target)
    try:
        loop.run_until_complete(w.setup())
        doc = loop.run_until_complete(h.client.get("/openapi.json")).json()
        yield w, loop.run_until_complete, places_from_openapi(doc)
    finally:
        w.snap.close()
        loop.run_until_complete(cm.__aexit__(None, None, None))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def test_every_input_gets_a_clear_answer(tmp_path: Path) -> None:
    with world(tmp_path) as (w, run, places):
        names = {str(p) for p in places}
        for must in ("POST /v1/miners/register body:capabilities.gpu.memory_gb",
                     "POST /v1/miners/register body:capabilities.gpus[0].memory_mb",
                     "POST /v1/miners/register body:capabilities.price",
                     "POST /v1/jobs body:constraints.min_vram_gb", "POST /v1/jobs body:constraints.max_price",
                     "POST /v1/jobs body:constraints.models[0]", "POST /v1/jobs header:idempotency-key",
                     "POST /v1/miners/{job_id}/result body:metrics.units",
                     "POST /v1/miners/{job_id}/result body:result.price",
                     "POST /v1/miners/{job_id}/fail body:metrics.price",
                     "GET /v1/jobs/{job_id}/receipts query:cursor", "GET /v1/jobs/{job_id}/receipts path:job_id",
                     "POST /v1/marketplace/offers body:capacity", "POST /v1/marketplace/bids body:price"):
            assert must in names, must
        for place in places:
            for value in HOSTILE:
                run(w.probe(place, value))

            @given(value=GENERATED)
            @settings(max_examples=EXAMPLES_PER_PLACE, derandomize=True, deadline=None, database=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            def generated(value: Any) -> None:
                run(w.probe(place, value))

            generated()
        assert w.sent >= len(places) * len(HOSTILE)
        assert not w.failures, w.report()


# === Explicit examples: the right answer for each fault the issue names ===


def loc_of(r: httpx.Response) -> list[Any]:
    """The loc of a 422's only (or first) error."""
    assert r.status_code == 422, (r.status_code, r.text)
    detail = r.json()["detail"]
    assert isinstance(detail, list) and detail, r.text
    return detail[0]["loc"]


async def post_raw(h: Harness, path: str, body: Any, headers: dict[str, str]) -> httpx.Response:
    return await h.client.post(path, content=dump(body).encode(), headers={**headers, "content-type": "application/json"})


def names_field(loc: list[Any], *path: Any) -> bool:
    """loc is ["body", path[0], ...] and names the last named step of `path` somewhere."""
    leaf = next(p for p in reversed(path) if isinstance(p, str))
    return loc[:2] == ["body", path[0]] and leaf in loc


@pytest.mark.anyio
async def test_receipt_cursor_in_superscript_two_is_a_422(tmp_path: Path) -> None:
    async with harness(tmp_path, ENV) as h:
        job = await h.submit()
        r = await h.client.get(f"/v1/jobs/{job['job_id']}/receipts?cursor=%C2%B2", headers=CLIENT)
        assert r.status_code == 422, (r.status_code, r.text)
        assert loc_of(r) == ["query", "cursor"]


async def two_jobs_with_receipts(h: Harness) -> tuple[str, str]:
    await h.register(capabilities={"price": 0.5})
    ids = []
    for _ in range(2):
        job = await h.submit()
        await h.take()
        assert (await h.result(job["job_id"], {"ok": 1})).status_code == 200
        ids.append(job["job_id"])
    return ids[0], ids[1]


@pytest.mark.anyio
@pytest.mark.parametrize("cursor", ["²", "٣", "४", "𝟗", "１２", "1" * 19, "9" * 18, "-1", "", " 1", "1.0", "0x1",
                                    "a\u0000"])
async def test_receipt_cursors_that_are_no_position_in_the_list(tmp_path: Path, cursor: str) -> None:
    async with harness(tmp_path, ENV) as h:
        _, job_id = await two_jobs_with_receipts(h)
        r = await h.client.get(f"/v1/jobs/{job_id}/receipts", params={"cursor": cursor}, headers=CLIENT)
        assert r.status_code == 422, (cursor, r.status_code, r.text)
        assert loc_of(r) == ["query", "cursor"], (cursor, r.text)


@pytest.mark.anyio
async def test_a_cursor_of_another_jobs_receipt_list_is_refused(tmp_path: Path) -> None:
    async with harness(tmp_path, ENV) as h:
        first, second = await two_jobs_with_receipts(h)
        r = await h.client.get(f"/v1/jobs/{first}/receipts", params={"limit": 1}, headers=CLIENT)
        cursor = r.json()["next_cursor"]
        if cursor is None:  # a one-receipt list issues no cursor: take the one its position would get
            with contextlib.closing(open_database(h.coord.settings.target)) as conn:
                cursor = str(conn.execute("SELECT seq FROM receipts WHERE job_id = ?", (first,)).fetchone()[0])
        r = await h.client.get(f"/v1/jobs/{second}/receipts", params={"cursor": cursor}, headers=CLIENT)
        assert r.status_code == 422, (cursor, r.status_code, r.text)
        assert loc_of(r) == ["query", "cursor"]


def gpu_caps(memory_gb: Any) -> dict[str, Any]:
    return {"capabilities": {"gpu": {"model": "X", "memory_gb": memory_gb}}}


OUT_OF_RANGE_REGISTRATIONS = [
    ("memory_gb 1e308", gpu_caps(1e308), ("capabilities", "gpu", "memory_gb")),
    ("memory_gb -1e308", gpu_caps(-1e308), ("capabilities", "gpu", "memory_gb")),
    ("memory_gb 10**6+1", gpu_caps(10**6 + 1), ("capabilities", "gpu", "memory_gb")),
    ("memory_gb 1e6*1.5", gpu_caps(1.5e6), ("capabilities", "gpu", "memory_gb")),
    ("memory_gb -1", gpu_caps(-1), ("capabilities", "gpu", "memory_gb")),
    ("memory_gb 5000 digits", gpu_caps(Raw("9" * 5000)), ("capabilities", "gpu", "memory_gb")),
    ("memory_gb 1000 digits", gpu_caps(Raw("9" * 1000)), ("capabilities", "gpu", "memory_gb")),
    ("gpus memory_mb above 10**6 GB", {"capabilities": {"gpus": [{"name": "A", "memory_mb": 1024 * 10**6 + 1}]}},
     ("capabilities", "gpus", 0, "memory_mb")),
    ("gpus memory_mb -1", {"capabilities": {"gpus": [{"name": "A", "memory_mb": -1}]}},
     ("capabilities", "gpus", 0, "memory_mb")),
    ("price 1e12+1", {"capabilities": {"price": Raw("1000000000001")}}, ("capabilities", "price")),
    ("price 1e308", {"capabilities": {"price": 1e308}}, ("capabilities", "price")),
    ("price 5000 digits", {"capabilities": {"price": Raw("9" * 5000)}}, ("capabilities", "price")),
    ("price -1", {"capabilities": {"price": -1}}, ("capabilities", "price")),
    ("price -0.5", {"capabilities": {"price": -0.5}}, ("capabilities", "price")),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("label", "body", "field"), OUT_OF_RANGE_REGISTRATIONS,
                         ids=[c[0] for c in OUT_OF_RANGE_REGISTRATIONS])
async def test_out_of_range_registration_is_a_422_naming_the_field(tmp_path: Path, label: str, body: dict[str, Any],
                                                                   field: tuple[Any, ...]) -> None:
    async with harness(tmp_path, ENV) as h:
        r = await post_raw(h, "/v1/miners/register", body, MINER)
        assert r.status_code == 422, (label, r.status_code, r.text)
        assert names_field(loc_of(r), *field), (label, r.text)
        admin = await h.client.get("/v1/admin/miners", headers=ADMIN)
        assert admin.json()["items"] == [], "a refused registration registered the miner"


@pytest.mark.anyio
@pytest.mark.parametrize("caps", [gpu_caps(10**6), gpu_caps(0), {"capabilities": {"price": ac.MAX_AMOUNT}},
                                  {"capabilities": {"price": 0}},
                                  {"capabilities": {"gpus": [{"name": "A", "memory_mb": 1024 * 10**6}]}}],
                         ids=["memory_gb 10**6", "memory_gb 0", "price 1e12", "price 0", "memory_mb 1024e6"])
async def test_registration_at_the_bounds_is_accepted(tmp_path: Path, caps: dict[str, Any]) -> None:
    async with harness(tmp_path, ENV) as h:
        r = await post_raw(h, "/v1/miners/register", caps, MINER)
        assert r.status_code == 200, r.text


OUT_OF_RANGE_CLIENT_NUMBERS = [
    ("/v1/jobs", CLIENT, {"payload": {}, "constraints": {"max_price": ac.MAX_AMOUNT * 1.5}}, ("constraints", "max_price")),
    ("/v1/jobs", CLIENT, {"payload": {}, "constraints": {"max_price": 1e308}}, ("constraints", "max_price")),
    ("/v1/jobs", CLIENT, {"payload": {}, "constraints": {"max_price": -1}}, ("constraints", "max_price")),
    ("/v1/jobs", CLIENT, {"payload": {}, "constraints": {"max_price": Raw("9" * 5000)}}, ("constraints", "max_price")),
    ("/v1/jobs", CLIENT, {"payload": {}, "constraints": {"min_vram_gb": 10**6 + 1}}, ("constraints", "min_vram_gb")),
    ("/v1/jobs", CLIENT, {"payload": {}, "constraints": {"min_vram_gb": -1}}, ("constraints", "min_vram_gb")),
    ("/v1/jobs", CLIENT, {"payload": {}, "ttl_seconds": Raw("9" * 5000)}, ("ttl_seconds",)),
    ("/v1/marketplace/offers", ADMIN, {"provider": "p", "capacity": 1, "price": Raw("1000000000001")}, ("price",)),
    ("/v1/marketplace/offers", ADMIN, {"provider": "p", "capacity": Raw("1000000000001"), "price": 1}, ("capacity",)),
    ("/v1/marketplace/offers", ADMIN, {"provider": "p", "capacity": 1, "price": -1}, ("price",)),
    ("/v1/marketplace/offers", ADMIN, {"provider": "p", "capacity": -1, "price": 1}, ("capacity",)),
    ("/v1/marketplace/offers", ADMIN, {"provider": "p", "capacity": 1, "price": Raw("9" * 5000)}, ("price",)),
    ("/v1/marketplace/bids", {}, {"provider": "p", "capacity": 1, "price": 1e308}, ("price",)),
    ("/v1/marketplace/bids", {}, {"provider": "p", "capacity": Raw("9" * 5000), "price": 1}, ("capacity",)),
    ("/v1/marketplace/bids", {}, {"provider": "p", "capacity": 1, "price": -0.5}, ("price",)),
]


def ac_value(body: Any, field: tuple[Any, ...]) -> Any:
    for step in field:
        body = body[step]
    return body


@pytest.mark.anyio
@pytest.mark.parametrize(("path", "headers", "body", "field"), OUT_OF_RANGE_CLIENT_NUMBERS,
                         ids=[f"{c[0]}:{'.'.join(map(str, c[3]))}={short(ac_value(c[2], c[3]))[:30]}"
                              for c in OUT_OF_RANGE_CLIENT_NUMBERS])
async def test_out_of_range_declared_numbers_are_a_422_naming_the_field(
        tmp_path: Path, path: str, headers: dict[str, str], body: dict[str, Any], field: tuple[Any, ...]) -> None:
    async with harness(tmp_path, ENV) as h:
        r = await post_raw(h, path, body, headers)
        assert r.status_code == 422, (r.status_code, r.text)
        assert names_field(loc_of(r), *field), r.text


ODD_REPORTS = [
    ("metrics 1e308/-5", {"units": 1e308, "price": -5}, {}),
    ("metrics -1e308/1e308", {"units": -1e308, "price": 1e308}, {}),
    ("metrics 1000-digit ints", {"units": Raw("9" * 1000), "price": Raw("9" * 1000)}, {}),
    ("metrics 5000-digit ints", {"units": Raw("9" * 5000), "price": Raw("-" + "9" * 5000)}, {}),
    ("metrics strings", {"units": "12", "price": "²"}, {}),
    ("metrics other scripts", {"units": "٣", "price": "１２"}, {}),
    ("metrics wrong types", {"units": [1], "price": {"a": 1}, "unit_type": 5}, {}),
    ("metrics above 1e12", {"units": Raw("1000000000001"), "price": ac.MAX_AMOUNT * 2}, {}),
    ("result 1e308/-5", {}, {"units": 1e308, "price": -5}),
    ("result 5000-digit ints", {}, {"units": Raw("9" * 5000), "price": Raw("9" * 5000)}),
    ("result strings", {}, {"units": "12", "price": "²"}),
]


async def held_job(h: Harness) -> str:
    await h.register(capabilities={"price": 0.5})
    job = await h.submit()
    assert (await h.take())["job_id"] == job["job_id"]
    h.clock.advance(2)
    return job["job_id"]


@pytest.mark.anyio
@pytest.mark.parametrize(("label", "metrics", "result"), ODD_REPORTS, ids=[c[0] for c in ODD_REPORTS])
async def test_odd_numbers_in_a_result_never_block_it(tmp_path: Path, label: str, metrics: dict[str, Any],
                                                      result: dict[str, Any]) -> None:
    async with harness(tmp_path, ENV) as h:
        control_id = await held_job(h)
        control = (await h.result(control_id, {"ok": 1})).json()["receipt"]  # nothing reported: the fallbacks
        job_id = await held_job(h)
        r = await post_raw(h, f"/v1/miners/{job_id}/result", {"result": {"ok": 1, **result}, "metrics": metrics},
                           MINER)
        assert r.status_code == 200, (label, r.status_code, r.text)
        assert (await h.job(job_id))["state"] == "COMPLETED"
        receipt = loads(r.text)["receipt"]
        assert (receipt["units"], receipt.get("price")) == (control["units"], control.get("price")) == (2.0, 1.0), \
            (label, receipt)


@pytest.mark.anyio
@pytest.mark.parametrize(("label", "metrics", "result"), [c for c in ODD_REPORTS if c[2] == {}],
                         ids=[c[0] for c in ODD_REPORTS if c[2] == {}])
async def test_odd_numbers_in_a_failure_never_block_it(tmp_path: Path, label: str, metrics: dict[str, Any],
                                                       result: dict[str, Any]) -> None:
    async with harness(tmp_path, ENV) as h:
        job_id = await held_job(h)
        r = await post_raw(h, f"/v1/miners/{job_id}/fail",
                           {"error_code": "E", "error_message": "m", "metrics": metrics}, MINER)
        assert r.status_code == 200, (label, r.status_code, r.text)
        assert (await h.job(job_id))["state"] == "FAILED"


NUL = "bad\u0000value"
NUL_TEXT_COLUMNS = [
    ("/v1/miners/register", MINER, {"capabilities": {}, "region": NUL}, ("region",)),
    ("/v1/miners/register", MINER, {"capabilities": {"region": NUL}}, ("capabilities", "region")),
    ("/v1/miners/register", MINER, {"capabilities": {"sla": NUL}}, ("capabilities", "sla")),
    ("/v1/miners/heartbeat", MINER, {"status": NUL}, ("status",)),
    ("/v1/miners/{job_id}/fail", MINER, {"error_code": NUL, "error_message": "m"}, ("error_code",)),
    ("/v1/miners/{job_id}/fail", MINER, {"error_code": "E", "error_message": NUL}, ("error_message",)),
    ("/v1/marketplace/offers", ADMIN, {"provider": NUL, "capacity": 1, "price": 1}, ("provider",)),
    ("/v1/marketplace/offers", ADMIN, {"provider": "p", "capacity": 1, "price": 1, "sla": NUL}, ("sla",)),
    ("/v1/marketplace/bids", {}, {"provider": NUL, "capacity": 1, "price": 1}, ("provider",)),
    ("/v1/marketplace/bids", {}, {"provider": "p", "capacity": 1, "price": 1, "notes": NUL}, ("notes",)),
    *[("/v1/jobs", CLIENT, {"payload": {}, "constraints": {name: NUL}}, ("constraints", name))
      for name in ("gpu", "cuda", "region")],
    ("/v1/jobs", CLIENT, {"payload": {}, "constraints": {"models": ["m", NUL]}}, ("constraints", "models", 1)),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("path", "headers", "body", "field"), NUL_TEXT_COLUMNS,
                         ids=[f"{c[0]}:{'.'.join(map(str, c[3]))}" for c in NUL_TEXT_COLUMNS])
async def test_nul_in_a_text_column_field_is_a_422_naming_it(tmp_path: Path, path: str, headers: dict[str, str],
                                                             body: dict[str, Any], field: tuple[Any, ...]) -> None:
    async with harness(tmp_path, ENV) as h:
        job_id = await held_job(h)
        before = Snapshots(h.coord.settings.target)
        try:
            snap = before.take()
            r = await post_raw(h, path.replace("{job_id}", job_id), body, headers)
            assert r.status_code == 422, (r.status_code, r.text)
            assert names_field(loc_of(r), *field), r.text
            assert before.take() == snap, "a refused request changed the database"
        finally:
            before.close()


@pytest.mark.anyio
async def test_nul_in_the_idempotency_key_is_a_422_naming_it(tmp_path: Path) -> None:
    async with harness(tmp_path, ENV) as h:
        r = await h.client.post("/v1/jobs", json={"payload": {}},
                                headers={**CLIENT, "Idempotency-Key": "key\u0000one".encode()})
        assert r.status_code == 422, (r.status_code, r.text)
        assert loc_of(r) == ["header", "idempotency-key"]
        assert (await h.client.get("/v1/admin/stats", headers=ADMIN)).json()["total_jobs"] == 0


@pytest.mark.anyio
async def test_nul_inside_json_objects_stays_allowed(tmp_path: Path) -> None:
    async with harness(tmp_path, ENV) as h:
        job_id = await held_job(h)
        r = await h.client.post("/v1/jobs", json={"payload": {"s": NUL, NUL: [NUL]}}, headers=CLIENT)
        assert r.status_code == 201, r.text
        r = await h.client.post("/v1/miners/heartbeat", json={"metadata": {"s": NUL}}, headers=MINER)
        assert r.status_code == 200, r.text
        r = await h.result(job_id, {"s": NUL, NUL: 1}, metrics={"note": NUL})
        assert r.status_code == 200, r.text
        receipt = r.json()["receipt"]
        assert receipt["metadata"]["metrics"]["note"] == NUL
        canonical = json.dumps({"s": NUL, NUL: 1}, sort_keys=True, separators=(",", ":")).encode()
        assert receipt["metadata"]["result_sha256"] == hashlib.sha256(canonical).hexdigest()
        verify = await h.client.post("/v1/receipts/verify", json={"receipt": receipt})
        assert verify.json()["valid"] is True, verify.text


LAX_INTEGERS = ["3_0", "1.0", " 7", "7 ", "+7", "\u0667"]  # int() takes all of these (the last: Arabic-Indic 7)


@pytest.mark.anyio
async def test_every_integer_in_a_query_string_is_decimal_digits_only(tmp_path: Path) -> None:
    """Break report 17 #11: tree_size=3_0 was taken as 30 and first=1.0 as 1 (pydantic's lax parsing)."""
    async with harness(tmp_path, ENV) as h:
        paths = (await h.client.get("/openapi.json")).json()["paths"]

        def is_integer(schema: dict[str, Any]) -> bool:
            return schema.get("type") == "integer" or any(is_integer(branch) for branch in schema.get("anyOf", []))

        places = [(ep, p["name"]) for ep in ac.ENDPOINTS for p in paths[ep.path][ep.method.lower()]["parameters"]
                  if p["in"] == "query" and is_integer(p["schema"])]
        names = {(ep.path, name) for ep, name in places}
        assert {("/v1/log/proof/inclusion", "tree_size"), ("/v1/log/proof/consistency", "first"),
                ("/v1/log/entries", "start"), ("/v1/explorer/blocks", "offset"), ("/v1/jobs", "limit")} <= names
        for ep, name in places:
            path = re.sub(r"{\w+}", "x", ep.path)
            for value in LAX_INTEGERS:
                r = await h.client.request(ep.method, path, params={name: value}, headers=KEYS[ep.role])
                assert r.status_code == 422, (ep.path, name, value, r.status_code)
                assert ["query", name] in [item["loc"] for item in r.json()["detail"]], (ep.path, name, r.text)
        r = await h.client.get("/v1/log/proof/consistency", params={"first": "0", "second": "0"})
        assert r.status_code == 200  # decimal digits are as before
