"""HTTP conventions (spec section 4): auth, error shapes, limits, hostile input, CORS, OpenAPI."""

from __future__ import annotations

import json
import re

import pytest

import aitbc_coord as ac
from conftest import ADMIN, CLIENT, CLIENT_KEY, MINER, MINER_KEY, Harness, database_error, harness, http_scope

pytestmark = pytest.mark.anyio
PROTECTED = [("POST", "/v1/jobs", "client"), ("GET", "/v1/jobs", "client"), ("GET", "/v1/jobs/{job_id}", "client"),
             ("GET", "/v1/jobs/{job_id}/result", "client"), ("POST", "/v1/jobs/{job_id}/cancel", "client"),
             ("DELETE", "/v1/jobs/{job_id}", "client"), ("GET", "/v1/jobs/{job_id}/receipt", "client"),
             ("GET", "/v1/jobs/{job_id}/receipts", "client"), ("POST", "/v1/miners/register", "miner"),
             ("POST", "/v1/miners/heartbeat", "miner"), ("POST", "/v1/miners/poll", "miner"),
             ("POST", "/v1/miners/{job_id}/result", "miner"), ("POST", "/v1/miners/{job_id}/fail", "miner"),
             ("GET", "/v1/admin/stats", "admin"), ("GET", "/v1/admin/jobs", "admin"),
             ("GET", "/v1/admin/miners", "admin"), ("POST", "/v1/marketplace/offers", "admin"),
             ("POST", "/v1/marketplace/offers/{offer_id}/status", "admin")]
KEYS = {"client": CLIENT, "miner": MINER, "admin": ADMIN}


async def test_every_protected_route_refuses_missing_unknown_and_wrong_role_keys(h: Harness) -> None:
    assert {(ep.method, ep.path) for ep in ac.ENDPOINTS if ep.role} == {(m, p) for m, p, _ in PROTECTED}
    for method, template, role in PROTECTED:
        path = re.sub(r"{\w+}", "x", template)
        wrong = [hdrs for r, hdrs in KEYS.items() if r != role]
        for headers in ({}, {"X-Api-Key": "nope"}, {"Authorization": "Bearer nope"},
                        {"Authorization": f"Basic {CLIENT_KEY}"}, *wrong):
            r = await h.client.request(method, path, headers=headers, json={})
            assert (r.status_code, r.json()) == (401, {"detail": "invalid api key"}), (method, path, headers)


async def test_bearer_is_the_same_as_x_api_key(h: Harness) -> None:
    r = await h.client.post("/v1/miners/register", json={"capabilities": {}},
                            headers={"Authorization": f"Bearer {MINER_KEY}"})
    assert r.status_code == 200
    r = await h.client.post("/v1/jobs", json={"payload": {}}, headers={"Authorization": f"bearer {CLIENT_KEY}"})
    assert r.status_code == 201


@pytest.mark.parametrize("body", [b"{", b"not json", b"[1,2", b"\xff\xfe", b'{"payload": {"x": NaN}}',
                                  b'{"payload": {"x": Infinity}}', b'{"payload": {"x": -Infinity}}',
                                  b'{"payload": {"x": 1e999}}', b'{"payload": {"s": "\\ud800"}}',
                                  b"[" * 100_000 + b"]" * 100_000, b'{"payload": {"a": ' + b"[" * 950 + b"]" * 950 + b"}}",
                                  b'{"payload": {"a": ' + b"[" * 64 + b"]" * 64 + b"}}"])
async def test_malformed_json_is_a_422_list(h: Harness, body: bytes) -> None:
    r = await h.client.post("/v1/jobs", content=body, headers={**CLIENT, "content-type": "application/json"})
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert isinstance(detail, list) and detail[0]["loc"][0] == "body" and {"type", "loc", "msg", "input"} <= set(detail[0])


async def test_an_integer_past_pythons_digit_limit_is_kept_exactly_where_json_is_opaque(h: Harness) -> None:
    """Python will not convert integers of more than 4,300 digits; inside a payload one is still JSON
    and reaches the miner exactly as sent. Where a number is declared, it is out of range (422)."""
    digits = "1" + "0" * 5000
    r = await h.client.post("/v1/jobs", content=b'{"payload": {"n": ' + digits.encode() + b'}, "ttl_seconds": 60}',
                            headers={**CLIENT, "content-type": "application/json"})
    assert r.status_code == 201, r.text
    await h.register()
    polled = await h.poll()
    assert polled.status_code == 200 and f'"payload":{{"n":{digits}}}' in polled.text
    r = await h.client.post("/v1/jobs", content=b'{"payload": {}, "ttl_seconds": ' + digits.encode() + b"}",
                            headers={**CLIENT, "content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "ttl_seconds"]


@pytest.mark.parametrize(("body", "loc"), [
    ({}, ["body", "payload"]), ({"payload": []}, ["body", "payload"]), ({"payload": "x"}, ["body", "payload"]),
    ({"payload": {}, "ttl_seconds": "soon"}, ["body", "ttl_seconds"]),
    ({"payload": {}, "ttl_seconds": 10**40}, ["body", "ttl_seconds"]),
    ({"payload": {}, "constraints": {"models": "llama"}}, ["body", "constraints", "models"]),
    ({"payload": {}, "constraints": {"max_price": "cheap"}}, ["body", "constraints", "max_price"]),
])
async def test_validation_errors_point_at_the_field(h: Harness, body: object, loc: list) -> None:
    r = await h.client.post("/v1/jobs", json=body, headers=CLIENT)
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == loc
    assert json.loads(json.dumps(r.json()))  # the error list itself is plain JSON


async def test_a_non_object_body_and_an_empty_body(h: Harness) -> None:
    for content in (b"[]", b"3", b'"x"', b""):
        r = await h.client.post("/v1/jobs", content=content, headers=CLIENT)
        assert r.status_code == 422, content


async def test_unicode_nul_and_big_numbers_round_trip(h: Harness) -> None:
    deep: object = 1
    for _ in range(60):
        deep = [deep, {"k": deep}] if isinstance(deep, int) else [deep]
    payload = {"deep": deep, "text": "café ☕ 𝄞 \u0000 end", "big": 10**30, "neg": -1.5e-300, "nested": {"a": [None, True]}}
    job = await h.submit(payload)
    await h.register()
    got = await h.take()
    assert got["payload"] == payload and got["job_id"] == job["job_id"]


async def test_bodies_over_the_limit_get_413_with_or_without_content_length(tmp_path) -> None:
    async with harness(tmp_path, {"MAX_BODY_BYTES": "2048"}) as h:
        big = json.dumps({"payload": {"blob": "x" * 4000}}).encode()
        r = await h.client.post("/v1/jobs", content=big, headers=CLIENT)
        assert (r.status_code, r.json()) == (413, {"detail": "request body too large"})

        async def chunks():
            for i in range(0, len(big), 500):
                yield big[i:i + 500]

        r = await h.client.post("/v1/jobs", content=chunks(), headers=CLIENT)  # chunked: no Content-Length
        assert "content-length" not in r.request.headers
        assert r.status_code == 413
        ok = json.dumps({"payload": {"blob": "x" * 1500}}).encode()
        assert (await h.client.post("/v1/jobs", content=ok, headers=CLIENT)).status_code == 201


async def test_unknown_routes_and_wrong_methods(h: Harness) -> None:
    r = await h.client.get("/v1/nope")
    assert (r.status_code, r.json()) == (404, {"detail": "Not Found"})
    r = await h.client.put("/v1/jobs", headers=CLIENT)
    assert r.status_code == 405 and "detail" in r.json()
    assert (await h.client.get("/v1/miners/poll", headers=MINER)).status_code == 405


async def test_wrong_methods_say_which_are_allowed_and_get_routes_answer_head(h: Harness) -> None:
    r = await h.client.put("/v1/jobs", headers=CLIENT)
    assert r.headers["allow"] == "GET, HEAD, POST"
    r = await h.client.head("/v1/health")
    assert (r.status_code, r.content) == (200, b"")
    assert (await h.client.get("/v1/jobs/x/y/z", headers=CLIENT)).status_code == 404  # a parameter is one segment


async def test_an_unexpected_error_is_a_logged_json_500(h: Harness, monkeypatch, caplog) -> None:
    def broken(conn: object) -> None:
        raise KeyError("a bug")

    monkeypatch.setattr(ac, "list_signing_keys", broken)
    r = await h.client.get("/v1/receipts/keys")
    assert (r.status_code, r.json()) == (500, {"detail": "Internal Server Error"})
    assert any(rec.levelname == "ERROR" and rec.exc_info and "/v1/receipts/keys" in rec.getMessage()
               for rec in caplog.records)
    assert (await h.client.get("/v1/health")).status_code == 200  # and the server carries on


async def test_a_client_gone_mid_body_queues_nothing_and_is_no_server_error(h: Harness, caplog) -> None:
    parts = [{"type": "http.request", "body": b'{"payload": {"half": ', "more_body": True}, {"type": "http.disconnect"}]

    async def receive() -> dict:
        return parts.pop(0)

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    await h.app(http_scope("POST", "/v1/jobs", CLIENT_KEY), receive, send)  # no Content-Length: chunked
    assert sent[0]["status"] == 400
    assert not [r for r in caplog.records if r.levelno >= 40]
    assert (await h.client.get("/v1/jobs", headers=CLIENT)).json()["items"] == []


async def test_unknown_fields_are_ignored(h: Harness) -> None:
    r = await h.client.post("/v1/miners/register", json={"capabilities": {}, "extra": [1], "miner_id": "x"},
                            headers=MINER, params={"miner_id": "cli-sends-this"})
    assert r.status_code == 200


async def test_cors_preflight_and_simple_requests(h: Harness) -> None:
    r = await h.client.options("/v1/jobs", headers={
        "Origin": "https://dash.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, authorization, cache-control, x-api-key, idempotency-key"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "*"
    allowed = r.headers["access-control-allow-headers"].lower()
    for header in ("content-type", "authorization", "cache-control", "x-api-key", "idempotency-key"):
        assert header in allowed
    r = await h.client.get("/v1/health", headers={"Origin": "https://dash.example"})
    assert r.headers["access-control-allow-origin"] == "*"


async def test_cors_origins_come_from_settings(tmp_path) -> None:
    async with harness(tmp_path, {"ALLOW_ORIGINS": '["https://ok.example"]'}) as h:
        good = await h.client.get("/v1/health", headers={"Origin": "https://ok.example"})
        bad = await h.client.get("/v1/health", headers={"Origin": "https://evil.example"})
        assert good.headers["access-control-allow-origin"] == "https://ok.example"
        assert good.headers["vary"] == "Origin"
        assert "access-control-allow-origin" not in bad.headers
        preflight = {"Origin": "https://ok.example", "Access-Control-Request-Method": "POST"}
        ok = await h.client.options("/v1/jobs", headers=preflight)
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://ok.example"
        for refused, what in (({"Origin": "https://evil.example"}, "origin"),
                              ({"Access-Control-Request-Method": "PUT"}, "method"),
                              ({"Access-Control-Request-Headers": "x-api-key, x-secret"}, "headers")):
            r = await h.client.options("/v1/jobs", headers={**preflight, **refused})
            assert (r.status_code, r.json()) == (400, {"detail": f"Disallowed CORS {what}"})
            assert "access-control-allow-origin" not in r.headers


async def test_health(h: Harness) -> None:
    r = await h.client.get("/v1/health")
    assert (r.status_code, r.json()) == (200, {"status": "ok", "env": "dev", "db": "ok", "version": ac.__version__})


async def test_health_is_degraded_when_the_database_cannot_be_read(h: Harness) -> None:
    async def broken(*args: object) -> None:
        raise database_error(h.coord)

    h.coord.db.read = broken  # type: ignore[method-assign]
    r = await h.client.get("/v1/health")
    assert r.status_code == 503 and r.json()["status"] == "degraded" and r.json()["db"] == "error"


async def test_openapi_describes_every_route_with_schemas(h: Harness) -> None:
    for path in ("/openapi.json", "/v1/openapi.json"):
        doc = (await h.client.get(path)).json()
        assert doc["openapi"].startswith("3.")
        for ep in ac.ENDPOINTS:
            op = doc["paths"][ep.path][ep.method.lower()]
            assert op["responses"], ep.path
            if ep.body is not None:
                ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
                assert ref.rsplit("/", 1)[1] in doc["components"]["schemas"]
        submit = doc["components"]["schemas"]["JobSubmit"]
        assert "payload" in submit["required"]
        assert doc["paths"]["/v1/jobs"]["post"]["responses"]["201"]["content"]["application/json"]["schema"]
