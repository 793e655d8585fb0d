"""Every route's responses match the models its /openapi.json entry names (the STYLE "one home per wire shape" proof).

The models in `@endpoint(..., responses=...)` only feed the OpenAPI document; the bodies on the wire
are built by separate code, so the two can drift. One in-process scenario drives every endpoint in
`ac.ENDPOINTS` through successes and every error status it declares (jobs completed, failed, canceled,
expired and queued; signed and attested receipts; miner and admin offers; matched and pending bids;
explorer lists with data; 401, 404, 409, 413, 422, 425, 400, 429 and 503). Every response is recorded
at the client and checked:

- its status must be one the endpoint declares (an undeclared status is a mismatch);
- every header it carries beside the framing (content type and length, CORS) must be declared for
  its status (`@endpoint(..., headers=...)`, which /openapi.json lists);
- its body must validate, in pydantic's strict JSON mode, against a copy of the declared model that
  forbids extra fields at every depth (nested models, list items, unions), so a field the model lacks,
  a missing required field or a wrong JSON type all fail. Aliases count as on the wire (`from`, not
  `from_`). A 204 must have no body.

Finally every declared (route, status) pair must have been seen: each route got at least one checked
2xx and at least one checked 4xx. All mismatches are reported at once, one line per distinct problem.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest
from pydantic import BaseModel, ConfigDict, RootModel, TypeAdapter, ValidationError, create_model

import aitbc_coord as ac
from conftest import ADMIN, CLIENT, Harness, database_error, harness
from test_receipts import EDGE_ATTESTATION_SEED, EDGE_SEED

pytestmark = pytest.mark.anyio

Route = tuple[str, str]  # (method, path template), as registered
ENV = {"MINER_API_KEYS": "rig=key-rig,ghost=key-ghost", "RECEIPT_SIGNING_KEY_HEX": EDGE_SEED,
       "RECEIPT_ATTESTATION_KEY_HEX": EDGE_ATTESTATION_SEED, "RATE_LIMIT_REQUESTS": "0", "MAX_BODY_BYTES": "4096"}
RIG, GHOST, WRONG = {"X-Api-Key": "key-rig"}, {"X-Api-Key": "key-ghost"}, {"X-Api-Key": "not-a-key"}
CAPS = {"price": 0.5, "sla": "99.9%", "gpus": [{"name": "A100", "memory_mb": 81920}], "models": ["sd-1.5"]}
NOPE = "0" * 32  # an id nothing has


# --- strict copies of the response models ---


@functools.cache
def strict_model(model: type[BaseModel]) -> type[BaseModel]:
    """`model` rebuilt with extra="forbid", its nested models likewise."""
    if issubclass(model, RootModel):
        return RootModel[strict_type(model.model_fields["root"].annotation)]  # type: ignore[misc,return-value]
    fields: dict[str, Any] = {name: (strict_type(info.annotation), info) for name, info in model.model_fields.items()}
    config = ConfigDict(**{**model.model_config, "extra": "forbid"})  # type: ignore[typeddict-item]
    return create_model(f"Strict{model.__name__}", __config__=config, **fields)


def strict_type(tp: Any) -> Any:
    """A type annotation with every pydantic model in it replaced by its strict copy."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return strict_model(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is None or not args:
        return tp
    rebuilt = tuple(strict_type(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return typing.Union[rebuilt]  # noqa: UP007 - built from a tuple at run time
    return origin[rebuilt] if origin is not typing.Annotated else typing.Annotated[rebuilt]


@functools.cache
def adapter(shape: Any) -> TypeAdapter[Any]:
    return TypeAdapter(strict_type(shape))


def shape_name(shape: Any) -> str:
    """`Offer`, or `list[Offer]` for a generic."""
    return shape.__name__ if typing.get_origin(shape) is None else str(shape).replace("aitbc_coord.", "")


# --- recording and checking responses ---


@dataclasses.dataclass(frozen=True)
class Exchange:
    """One response as the client saw it, with the endpoint that served it (None: no endpoint did)."""

    endpoint: ac.Endpoint | None
    method: str
    path: str
    status: int
    content_type: str
    body: bytes
    headers: frozenset[str] = frozenset()  # names, lower case


@dataclasses.dataclass
class Recorder:
    """An httpx response hook that keeps every response of the scenario."""

    app: ac.App
    exchanges: list[Exchange] = dataclasses.field(default_factory=list)

    async def __call__(self, response: httpx.Response) -> None:
        await response.aread()
        method, path = response.request.method, response.request.url.path
        self.exchanges.append(Exchange(self.endpoint(method, path), method, path, response.status_code,
                                       response.headers.get("content-type", ""), response.content,
                                       frozenset(name.lower() for name in response.headers)))

    def endpoint(self, method: str, path: str) -> ac.Endpoint | None:
        try:
            template, _, _ = self.app.router.find(method, path)
        except (ac.NotFound, ac.MethodNotAllowed):
            return None
        return next((ep for ep in ac.ENDPOINTS if (ep.method, ep.path) == (method, template)), None)


def body_problems(shape: Any, ex: Exchange) -> list[str]:
    """What is wrong with `ex`'s body as an instance of `shape` (one line per pydantic error)."""
    if not ex.content_type.startswith("application/json"):
        return [f"content-type {ex.content_type!r}, not application/json"]
    try:
        adapter(shape).validate_json(ex.body, strict=True)
    except ValidationError as exc:
        return [f"{_loc(e['loc'])}: {e['msg']} [{e['type']}]" for e in exc.errors(include_url=False)]
    return []


def _loc(loc: tuple[int | str, ...]) -> str:
    """A pydantic error location with list indices folded to [] (the same drift in every item is one line)."""
    text = "".join("[]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    return text or "(body)"


def problems_of(ex: Exchange) -> tuple[str, list[str]]:
    """What `ex`'s endpoint declares for its status, and how the response differs from that."""
    ep = ex.endpoint
    if ep is None:
        return "no endpoint", ["no endpoint in ac.ENDPOINTS serves this request"]
    if ex.status not in ep.responses:
        return "undeclared", [f"status {ex.status} is not declared (declared: {sorted(ep.responses)})"]
    shape, label = ep.responses[ex.status], "declared model"
    declared_headers = {name.lower() for name in ep.headers.get(ex.status, ())}
    header_problems = [f"header {name} is not declared for {ex.status}" for name in sorted(ex.headers)
                       if name not in declared_headers and name not in FRAMING and not name.startswith("access-control-")]
    if shape is None:
        return "declared with no body", header_problems + ([] if not ex.body else ["the response has a body"])
    return f"{label} {shape_name(shape)}", header_problems + body_problems(shape, ex)


FRAMING = {"content-length", "content-type"}  # headers every response carries, declared by the format itself


def report(exchanges: list[Exchange]) -> list[str]:
    """The mismatches grouped by route, status and declaration, each with a body the wire sent."""
    groups: dict[str, dict[str, int]] = {}
    samples: dict[str, bytes] = {}
    for ex in exchanges:
        declared, problems = problems_of(ex)
        route = f"{ex.endpoint.method} {ex.endpoint.path}" if ex.endpoint else f"{ex.method} {ex.path}"
        head = f"{route} -> {ex.status}, {declared}"
        for problem in problems:
            counts = groups.setdefault(head, {})
            counts[problem] = counts.get(problem, 0) + 1
            samples.setdefault(head, ex.body)
    return [f"{head}\n    wire sent: {samples[head][:300]!r}\n"
            + "\n".join(f"    {problem} ({n} response{'s' * (n > 1)})" for problem, n in sorted(problems.items()))
            for head, problems in sorted(groups.items())]


def uncovered(exchanges: list[Exchange]) -> list[str]:
    """Declared (route, status) pairs no response of the scenario exercised."""
    seen = {(ex.endpoint.method, ex.endpoint.path, ex.status) for ex in exchanges if ex.endpoint is not None}
    return [f"{ep.method} {ep.path} -> {status}" for ep in ac.ENDPOINTS for status in ep.responses
            if (ep.method, ep.path, status) not in seen]


# --- the scenario ---


async def call(h: Harness, method: str, path: str, headers: dict[str, str] | None = None, body: Any = None, *,
               expect: int = 200, **params: Any) -> Any:
    """One request; its JSON (None when empty). Fails when the scenario did not get the status it meant to."""
    r = await h.client.request(method, path, headers=headers, json=body, params=params or None)
    assert r.status_code == expect, f"{method} {path}: expected {expect}, got {r.status_code} {r.text[:300]}"
    return r.json() if r.content else None


async def submit(h: Harness, payload: dict[str, Any], expect: int = 201, key: str | None = None,
                 **body: Any) -> Any:
    headers = {**CLIENT, **({"Idempotency-Key": key} if key is not None else {})}
    return await call(h, "POST", "/v1/jobs", headers, {"payload": payload, **body}, expect=expect)


async def miners_and_jobs(h: Harness) -> dict[str, str]:
    """Register, then a job in every state: completed (with receipt), failed, canceled twice, queued, expired."""
    await call(h, "GET", "/v1/health")
    await call(h, "GET", "/v1/receipts/keys")
    await call(h, "POST", "/v1/miners/heartbeat", RIG, {}, expect=404)  # not registered yet
    await call(h, "POST", "/v1/miners/poll", RIG, {}, expect=404)
    await call(h, "POST", "/v1/miners/register", RIG, {"capabilities": CAPS, "concurrency": 2, "region": "eu"})
    await call(h, "POST", "/v1/miners/register", RIG, {"capabilities": 1}, expect=422)
    await call(h, "POST", "/v1/miners/heartbeat", RIG, {"inflight": 0, "status": "online", "metadata": {"v": 1}})
    await call(h, "POST", "/v1/miners/heartbeat", RIG, {"inflight": -1}, expect=422)
    await call(h, "POST", "/v1/miners/poll", RIG, expect=204)  # nothing queued; an empty body is allowed
    await call(h, "POST", "/v1/miners/poll", RIG, {"max_wait_seconds": -1}, expect=422)
    ids = await submit_jobs(h)
    await run_jobs(h, ids)
    return ids


async def submit_jobs(h: Harness) -> dict[str, str]:
    """Six jobs, plus the submit errors: idempotent retry, reused key, bad body, bad ttl, bad key header."""
    ids: dict[str, str] = {}
    done = {"task": "render", "value": "12.5"}
    constraints = {"gpu": "A100", "models": ["sd-1.5"]}
    ids["done"] = (await submit(h, done, key="k-1", constraints=constraints))["job_id"]
    assert (await submit(h, done, key="k-1", constraints=constraints))["job_id"] == ids["done"]  # a retry
    await submit(h, {"task": "other"}, 422, key="k-1")  # the same key with another body
    for name in ("failed", "deleted", "canceled"):
        ids[name] = (await submit(h, {"task": name}, ttl_seconds=600))["job_id"]
    ids["queued"] = (await submit(h, {"task": "q", "value": 3}, constraints={"gpu": "none-such"}))["job_id"]
    ids["expired"] = (await submit(h, {"task": "e"}, ttl_seconds=5, constraints={"region": "mars"}))["job_id"]
    await call(h, "POST", "/v1/jobs", CLIENT, {"constraints": {}}, expect=422)  # no payload
    await submit(h, {"task": "x"}, 422, ttl_seconds=10**9)
    await submit(h, {"task": "x"}, 422, key="k" * 300)
    await call(h, "POST", f"/v1/jobs/{ids['canceled']}/cancel", CLIENT)
    return ids


async def run_jobs(h: Harness, ids: dict[str, str]) -> None:
    """The miner takes, completes, fails and loses jobs; every refused report is a 409 or 404."""
    for name in ("done", "failed"):
        assert (await call(h, "POST", "/v1/miners/poll", RIG, {"max_wait_seconds": 0}))["job_id"] == ids[name]
    result = {"result": {"image": "s3://out.png", "units": 4}, "metrics": {"units": 4, "duration_ms": 4000}}
    receipt = (await call(h, "POST", f"/v1/miners/{ids['done']}/result", RIG, result))["receipt"]
    assert receipt["attestations"], "the scenario needs an attested receipt"
    await call(h, "POST", f"/v1/miners/{ids['done']}/result", RIG, result)  # the same again: same receipt
    await call(h, "POST", f"/v1/miners/{ids['done']}/result", RIG, {"result": {"other": 1}}, expect=409)
    failure = {"error_code": "OOM", "error_message": "out of memory", "retryable": False}
    await call(h, "POST", f"/v1/miners/{ids['failed']}/fail", RIG, failure)
    await call(h, "POST", f"/v1/miners/{ids['failed']}/fail", RIG, failure)  # repeated: ok, no change
    await call(h, "POST", f"/v1/miners/{ids['done']}/fail", RIG, failure, expect=409)
    assert (await call(h, "POST", "/v1/miners/poll", RIG, {}))["job_id"] == ids["deleted"]
    await call(h, "DELETE", f"/v1/jobs/{ids['deleted']}", CLIENT)
    await call(h, "POST", f"/v1/miners/{ids['deleted']}/result", RIG, {"result": {}}, expect=409)
    await call(h, "POST", f"/v1/miners/{ids['deleted']}/fail", RIG, failure, expect=409)
    await call(h, "POST", f"/v1/miners/{NOPE}/result", RIG, {"result": {}}, expect=404)
    await call(h, "POST", f"/v1/miners/{NOPE}/fail", RIG, failure, expect=404)
    await call(h, "POST", f"/v1/miners/{ids['done']}/result", GHOST, {"result": {}}, expect=404)  # not registered
    await call(h, "POST", f"/v1/miners/{ids['done']}/result", RIG, {"metrics": {}}, expect=422)
    await call(h, "POST", f"/v1/miners/{ids['done']}/fail", RIG, {"error_code": "E"}, expect=422)
    h.clock.advance(6)
    await h.coord.sweep()  # the ttl-5 job expires


async def client_reads(h: Harness, ids: dict[str, str]) -> dict[str, Any]:
    """Every client read in every state; returns the completed job's receipt."""
    for job_id in ids.values():
        await call(h, "GET", f"/v1/jobs/{job_id}", CLIENT)
    await call(h, "GET", f"/v1/jobs/{NOPE}", CLIENT, expect=404)
    receipt = (await call(h, "GET", f"/v1/jobs/{ids['done']}/result", CLIENT))["receipt"]
    for name in ("failed", "queued", "expired", "canceled"):
        await call(h, "GET", f"/v1/jobs/{ids[name]}/result", CLIENT, expect=425)
    await call(h, "GET", f"/v1/jobs/{NOPE}/result", CLIENT, expect=404)
    await call(h, "GET", f"/v1/jobs/{ids['done']}/receipt", CLIENT)
    for job_id in (ids["failed"], NOPE):
        await call(h, "GET", f"/v1/jobs/{job_id}/receipt", CLIENT, expect=404)
    await call(h, "GET", f"/v1/jobs/{ids['done']}/receipts", CLIENT)
    await call(h, "GET", f"/v1/jobs/{ids['failed']}/receipts", CLIENT)  # an empty page
    await call(h, "GET", f"/v1/jobs/{ids['done']}/receipts", CLIENT, expect=422, cursor="abc")
    await call(h, "GET", f"/v1/jobs/{NOPE}/receipts", CLIENT, expect=404)
    await call(h, "GET", "/v1/jobs", CLIENT)
    first = await call(h, "GET", "/v1/jobs", CLIENT, limit=2)
    assert first["next_offset"] == 2
    assert (await call(h, "GET", "/v1/jobs", CLIENT, limit=2, cursor=first["next_cursor"]))["next_offset"] is None
    await call(h, "GET", "/v1/jobs", CLIENT, expect=422, cursor=first["next_cursor"], offset=2)
    await call(h, "GET", "/v1/jobs", CLIENT, state="completed")
    await call(h, "GET", "/v1/jobs", CLIENT, expect=422, state="DONE")
    for method, path in (("POST", "/v1/jobs/{}/cancel"), ("DELETE", "/v1/jobs/{}")):
        await call(h, method, path.format(ids["done"]), CLIENT, expect=409)
        await call(h, method, path.format(NOPE), CLIENT, expect=404)
    return receipt


async def receipts_and_admin(h: Harness, receipt: dict[str, Any]) -> None:
    """Verify a good and a tampered receipt; read the admin views."""
    assert (await call(h, "POST", "/v1/receipts/verify", body={"receipt": receipt}))["valid"] is True
    tampered = {**receipt, "units": 40}
    assert (await call(h, "POST", "/v1/receipts/verify", body={"receipt": tampered}))["valid"] is False
    await call(h, "POST", "/v1/receipts/verify", body={"receipt": []}, expect=422)
    await call(h, "GET", "/v1/admin/stats", ADMIN)
    await call(h, "GET", "/v1/admin/jobs", ADMIN)
    await call(h, "GET", "/v1/admin/jobs", ADMIN, state="failed", limit=1)
    await call(h, "GET", "/v1/admin/jobs", ADMIN, expect=422, state="DONE")
    await call(h, "GET", "/v1/admin/miners", ADMIN)
    await call(h, "GET", "/v1/admin/miners", ADMIN, limit=1)
    await call(h, "GET", "/v1/admin/miners", ADMIN, expect=422, cursor="abc")


async def marketplace(h: Harness) -> dict[str, str]:
    """A miner offer and an admin offer, status changes, a matched and a pending bid; returns ids."""
    (miner_offer,) = await call(h, "GET", "/v1/marketplace/offers")
    offer = {"provider": "dc-1", "capacity": 4, "price": 1.0, "sla": "99%"}
    admin_offer = (await call(h, "POST", "/v1/marketplace/offers", ADMIN, offer, expect=201))["id"]
    await call(h, "POST", "/v1/marketplace/offers", ADMIN, {**offer, "capacity": 0}, expect=422)
    status_url = "/v1/marketplace/offers/{}/status"
    await call(h, "POST", status_url.format(admin_offer), ADMIN, {"status": "RESERVED"})
    await call(h, "POST", status_url.format(admin_offer), ADMIN, {"status": "open"})
    await call(h, "POST", status_url.format(miner_offer["id"]), ADMIN, {"status": "closed"}, expect=409)
    await call(h, "POST", status_url.format(NOPE), ADMIN, {"status": "closed"}, expect=404)
    await call(h, "POST", status_url.format(admin_offer), ADMIN, {"status": "gone"}, expect=422)
    assert len(await call(h, "GET", "/v1/marketplace/offers", status="OPEN")) == 2
    await call(h, "GET", "/v1/marketplace/offers", expect=400, status="gone")
    bid = {"provider": "buyer", "capacity": 3, "price": 5.0, "notes": "rush"}
    matched = await call(h, "POST", "/v1/marketplace/bids", body=bid, expect=202)
    pending = await call(h, "POST", "/v1/marketplace/bids", body={"provider": "cheap", "capacity": 1, "price": 0.1},
                         expect=202)
    assert (matched["status"], pending["status"]) == ("matched", "pending")
    for bid_id in (matched["id"], pending["id"]):
        await call(h, "GET", f"/v1/marketplace/bids/{bid_id}")
    await call(h, "GET", f"/v1/marketplace/bids/{NOPE}", expect=404)
    await call(h, "POST", "/v1/marketplace/bids", body={**bid, "price": 0}, expect=422)
    await call(h, "GET", "/v1/marketplace/stats")
    return {"admin_offer": admin_offer, "bid": matched["id"]}


async def retention(h: Harness, ids: dict[str, str]) -> None:
    """Past PAYLOAD_RETENTION_DAYS the completed job's result is pruned (410); the job and its receipts stay."""
    h.clock.advance(31 * 86400)
    assert (await h.coord.retain())["pruned"] >= 4
    await call(h, "GET", f"/v1/jobs/{ids['done']}/result", CLIENT, expect=410)
    await call(h, "GET", f"/v1/jobs/{ids['done']}", CLIENT)
    assert (await call(h, "GET", f"/v1/jobs/{ids['done']}/receipts", CLIENT))["items"]


async def explorer(h: Harness, ids: dict[str, str]) -> None:
    """The four explorer lists, full and paged, and the receipts of one job and of none."""
    for path in ("blocks", "transactions", "addresses", "receipts"):
        everything = (await call(h, "GET", f"/v1/explorer/{path}"))["items"]
        first = await call(h, "GET", f"/v1/explorer/{path}", limit=1)
        assert first["next_offset"] == 1 and (first["next_cursor"] is not None) == (len(everything) > 1)
        if first["next_cursor"]:
            assert (await call(h, "GET", f"/v1/explorer/{path}", limit=1, cursor=first["next_cursor"]))["items"]
    await call(h, "GET", "/v1/explorer/receipts", job_id=ids["done"])
    await call(h, "GET", "/v1/explorer/receipts", job_id=NOPE)


async def receipt_log(h: Harness, receipt: dict[str, Any]) -> None:
    """The receipt log: 425 until a checkpoint covers the receipt, then every route's answers and errors."""
    rid = receipt["receipt_id"]
    await call(h, "GET", "/v1/log/proof/inclusion", expect=425, receipt_id=rid)
    h.clock.advance(2)
    assert await h.coord.checkpoint()
    await call(h, "GET", "/v1/log/checkpoint")
    first = await call(h, "GET", "/v1/log/checkpoints", limit=1)
    await call(h, "GET", "/v1/log/checkpoints", cursor=first["next_cursor"])
    await call(h, "GET", "/v1/log/checkpoints", expect=422, cursor="abc")
    await call(h, "GET", "/v1/log/proof/inclusion", receipt_id=rid)
    await call(h, "GET", "/v1/log/proof/inclusion", expect=404, receipt_id=NOPE)
    await call(h, "GET", "/v1/log/proof/inclusion", expect=404, receipt_id=rid, tree_size=9)
    await call(h, "GET", "/v1/log/proof/inclusion", expect=422, receipt_id=rid, tree_size=0)
    await call(h, "GET", "/v1/log/proof/consistency", first=0, second=1)
    await call(h, "GET", "/v1/log/proof/consistency", expect=422, first=1, second=0)
    await call(h, "GET", "/v1/log/proof/consistency", expect=404, first=1, second=9)
    await call(h, "GET", "/v1/log/entries", start=0)
    await call(h, "GET", "/v1/log/entries", expect=422, start=1, end=0)


async def keyless_log(tmp_path: Path, recorder: Recorder) -> None:
    """A coordinator without a signing key has no checkpoint: 404."""
    async with harness(tmp_path / "keyless", {"RECEIPT_DEV_SIGNING_KEY": "false"}) as h:
        h.client.event_hooks = {"request": [], "response": [recorder]}
        await call(h, "GET", "/v1/log/checkpoint", expect=404)


# --- the same errors for every route: probes ---


class Probe(NamedTuple):
    """A request each endpoint accepts: path, the right key, a valid body."""

    path: str
    headers: dict[str, str]
    body: Any = None


def probes(ids: dict[str, str]) -> dict[Route, Probe]:
    job, offer, bid, receipt = ids["done"], ids["admin_offer"], ids["bid"], ids["receipt"]
    return {
        ("GET", "/v1/health"): Probe("/v1/health", {}),
        ("POST", "/v1/jobs"): Probe("/v1/jobs", CLIENT, {"payload": {"task": "probe"}}),
        ("GET", "/v1/jobs"): Probe("/v1/jobs", CLIENT),
        ("GET", "/v1/jobs/{job_id}"): Probe(f"/v1/jobs/{job}", CLIENT),
        ("GET", "/v1/jobs/{job_id}/result"): Probe(f"/v1/jobs/{job}/result", CLIENT),
        ("POST", "/v1/jobs/{job_id}/cancel"): Probe(f"/v1/jobs/{job}/cancel", CLIENT),
        ("DELETE", "/v1/jobs/{job_id}"): Probe(f"/v1/jobs/{job}", CLIENT),
        ("GET", "/v1/jobs/{job_id}/receipt"): Probe(f"/v1/jobs/{job}/receipt", CLIENT),
        ("GET", "/v1/jobs/{job_id}/receipts"): Probe(f"/v1/jobs/{job}/receipts", CLIENT),
        ("GET", "/v1/receipts/keys"): Probe("/v1/receipts/keys", {}),
        ("POST", "/v1/receipts/verify"): Probe("/v1/receipts/verify", {}, {"receipt": {}}),
        ("POST", "/v1/miners/register"): Probe("/v1/miners/register", RIG, {"capabilities": CAPS}),
        ("POST", "/v1/miners/heartbeat"): Probe("/v1/miners/heartbeat", RIG, {}),
        ("POST", "/v1/miners/poll"): Probe("/v1/miners/poll", RIG, {}),
        ("POST", "/v1/miners/{job_id}/result"): Probe(f"/v1/miners/{job}/result", RIG, {"result": {}}),
        ("POST", "/v1/miners/{job_id}/fail"): Probe(f"/v1/miners/{job}/fail", RIG,
                                                    {"error_code": "E", "error_message": "m"}),
        ("GET", "/v1/admin/stats"): Probe("/v1/admin/stats", ADMIN),
        ("GET", "/v1/admin/jobs"): Probe("/v1/admin/jobs", ADMIN),
        ("GET", "/v1/admin/miners"): Probe("/v1/admin/miners", ADMIN),
        ("GET", "/v1/marketplace/offers"): Probe("/v1/marketplace/offers", {}),
        ("GET", "/v1/marketplace/stats"): Probe("/v1/marketplace/stats", {}),
        ("POST", "/v1/marketplace/bids"): Probe("/v1/marketplace/bids", {},
                                                {"provider": "p", "capacity": 1, "price": 1}),
        ("GET", "/v1/marketplace/bids/{bid_id}"): Probe(f"/v1/marketplace/bids/{bid}", {}),
        ("POST", "/v1/marketplace/offers"): Probe("/v1/marketplace/offers", ADMIN,
                                                  {"provider": "p", "capacity": 1, "price": 1}),
        ("POST", "/v1/marketplace/offers/{offer_id}/status"): Probe(f"/v1/marketplace/offers/{offer}/status", ADMIN,
                                                                    {"status": "open"}),
        ("GET", "/v1/explorer/blocks"): Probe("/v1/explorer/blocks", {}),
        ("GET", "/v1/explorer/transactions"): Probe("/v1/explorer/transactions", {}),
        ("GET", "/v1/explorer/addresses"): Probe("/v1/explorer/addresses", {}),
        ("GET", "/v1/explorer/receipts"): Probe("/v1/explorer/receipts", {}),
        ("GET", "/v1/log/checkpoint"): Probe("/v1/log/checkpoint", {}),
        ("GET", "/v1/log/checkpoints"): Probe("/v1/log/checkpoints", {}),
        ("GET", "/v1/log/proof/inclusion"): Probe(f"/v1/log/proof/inclusion?receipt_id={receipt}", {}),
        ("GET", "/v1/log/proof/consistency"): Probe("/v1/log/proof/consistency?first=0&second=1", {}),
        ("GET", "/v1/log/entries"): Probe("/v1/log/entries?start=0", {}),
    }


async def send(h: Harness, ep: ac.Endpoint, probe: Probe, headers: dict[str, str] | None = None,
               content: bytes | None = None, params: dict[str, str] | None = None) -> int:
    """The probe, with any part replaced; the status."""
    body = {"content": content} if content is not None else {"json": probe.body}
    r = await h.client.request(ep.method, probe.path, headers=headers if headers is not None else probe.headers,
                               params=params, **body)
    return r.status_code


async def probe_errors(h: Harness, table: dict[Route, Probe]) -> None:
    """401 with a wrong key, 413 past MAX_BODY_BYTES, 422 for malformed JSON and an out-of-range limit."""
    too_big = json.dumps({"pad": "x" * 5000}).encode()
    for ep in ac.ENDPOINTS:
        probe = table[(ep.method, ep.path)]
        if ep.role is not None:
            assert await send(h, ep, probe, headers=WRONG) == 401, ep.path
        if ep.body is not None:
            assert await send(h, ep, probe, content=too_big) == 413, ep.path
            assert await send(h, ep, probe, content=b'{"broken": ') == 422, ep.path
        if ep.query is not None:
            assert await send(h, ep, probe, params={"limit": "0"}) == 422, ep.path


@contextlib.contextmanager
def database_down(coord: ac.Coordinator) -> Iterator[None]:
    """Every read and write fails as a disk I/O error would, until the block ends."""
    async def broken(*args: object) -> None:
        raise database_error(coord)

    coord.db.read = coord.db.peek = coord.db.write = broken  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        del coord.db.read, coord.db.peek, coord.db.write


async def probe_unavailable_and_throttled(h: Harness, table: dict[Route, Probe]) -> None:
    """Every route once with the database down (503), then twice past a rate limit of one (429)."""
    with database_down(h.coord):
        for ep in ac.ENDPOINTS:
            assert await send(h, ep, table[(ep.method, ep.path)]) == 503, ep.path
    h.coord.limiter = ac.RateLimiter(1, 3600)
    for ep in ac.ENDPOINTS:
        await send(h, ep, table[(ep.method, ep.path)])
        assert await send(h, ep, table[(ep.method, ep.path)]) == 429, ep.path


async def scenario(h: Harness) -> None:
    ids = await miners_and_jobs(h)
    receipt = await client_reads(h, ids)
    await receipts_and_admin(h, receipt)
    ids |= await marketplace(h)
    await explorer(h, ids)
    await receipt_log(h, receipt)
    ids["receipt"] = receipt["receipt_id"]
    await retention(h, ids)
    table = probes(ids)
    assert set(table) == {(ep.method, ep.path) for ep in ac.ENDPOINTS}, "a route has no probe"
    await probe_errors(h, table)
    await probe_unavailable_and_throttled(h, table)


# --- the tests ---


async def test_every_response_matches_the_model_openapi_names(tmp_path: Path) -> None:
    async with harness(tmp_path, ENV) as h:
        recorder = Recorder(h.app)
        h.client.event_hooks = {"request": [], "response": [recorder]}
        await scenario(h)
    await keyless_log(tmp_path, recorder)
    exchanges = recorder.exchanges
    mismatches, missing = report(exchanges), uncovered(exchanges)
    assert not mismatches, (f"{len(exchanges)} responses checked; where the wire and the model /openapi.json "
                            "names differ:\n" + "\n".join(mismatches))
    assert not missing, "declared but never exercised by the scenario:\n  " + "\n  ".join(missing)


def test_openapi_names_exactly_the_declared_models() -> None:
    """What the test above checks against is what /openapi.json says: the model and the headers per
    route and status; and every operation's summary is one line, every response described."""
    paths = ac.openapi_document(ac.Settings.load({}, dotenv=False))["paths"]
    for ep in ac.ENDPOINTS:
        op = paths[ep.path][ep.method.lower()]
        assert op["summary"] and "\n" not in op["summary"] and "  " not in op["summary"], (ep.path, op["summary"])
        for status, model in ep.responses.items():
            response = op["responses"][str(status)]
            content = response.get("content")
            schema = content["application/json"]["schema"] if content else None
            assert schema == documented_schema(ep, status, model), (ep.method, ep.path, status)
            assert not response["description"].isdigit(), (ep.path, status, response["description"])
            assert set(response.get("headers", {})) == set(ep.headers.get(status, ())), (ep.path, status)
    def constraint_keys(schema: Any) -> set[str]:  # pydantic's names where JSON Schema has minimum/maximum
        if isinstance(schema, dict):
            return {k for k in schema if k in ("ge", "le", "gt", "lt")} | set().union(*map(constraint_keys, schema.values()))
        return set().union(*map(constraint_keys, schema)) if isinstance(schema, list) else set()

    for path, methods in paths.items():
        for method, op in methods.items():
            assert not constraint_keys(op["parameters"]), (method, path, op["parameters"])
    inclusion = paths["/v1/log/proof/inclusion"]["get"]["responses"]
    assert inclusion["425"]["description"] == "Too Early" and "Retry-After" in inclusion["425"]["headers"]
    assert "Receipt-Log-Index" in paths["/v1/jobs/{job_id}/receipt"]["get"]["responses"]["200"]["headers"]
    assert "\n" not in paths["/v1/log/proof/consistency"]["get"]["summary"]  # once broken across two lines


def documented_schema(ep: ac.Endpoint, status: int, model: type[BaseModel] | None) -> dict[str, Any] | None:
    """The schema /openapi.json should give one response, from `responses`."""
    if model is not None:
        return {"$ref": f"#/components/schemas/{model.__name__}"}
    return None if status == 204 else {"type": "object"}
