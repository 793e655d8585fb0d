"""HTTP details behind proxies and caches: Vary for CORS answers, serving under a path prefix, access
lines through any standard logging setup, and one migration at start."""

from __future__ import annotations

import io
import logging
import re
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

import aitbc_coord as ac
from conftest import CLIENT, database_of, harness, make_settings
from test_serve import start_server

pytestmark = pytest.mark.anyio
LISTED = {"ALLOW_ORIGINS": "https://dash.example,https://explorer.example"}
PREFLIGHT = {"Access-Control-Request-Method": "GET"}


def varies_on_origin(response: httpx.Response) -> bool:
    return "origin" in {v.strip().lower() for v in response.headers.get("vary", "").split(",")}


async def test_with_listed_origins_every_answer_says_it_varies_by_origin(tmp_path: Path) -> None:
    async with harness(tmp_path, LISTED) as h:
        for headers in ({"Origin": "https://dash.example"}, {"Origin": "https://evil.example"}, {}):
            for method, path, extra in (("GET", "/v1/health", {}), ("GET", "/v1/jobs", CLIENT),
                                        ("GET", "/v1/nowhere", {}), ("POST", "/v1/jobs", CLIENT)):
                r = await h.client.request(method, path, headers={**headers, **extra})
                assert varies_on_origin(r), (headers, method, path, r.status_code, r.headers)
            allowed = headers.get("Origin") == "https://dash.example"
            assert ("access-control-allow-origin" in r.headers) == allowed
        for origin in ("https://dash.example", "https://evil.example"):
            r = await h.client.options("/v1/jobs", headers={"Origin": origin, **PREFLIGHT})
            assert r.status_code == (200 if origin == "https://dash.example" else 400)
            assert varies_on_origin(r), r.headers


async def test_with_any_origin_the_answer_does_not_vary_by_origin(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        r = await h.client.get("/v1/health", headers={"Origin": "https://anywhere.example"})
        assert r.headers["access-control-allow-origin"] == "*" and not varies_on_origin(r)
        r = await h.client.options("/v1/jobs", headers={"Origin": "https://anywhere.example", **PREFLIGHT})
        assert r.status_code == 200 and not varies_on_origin(r)
        assert "access-control-request-method" in r.headers["vary"].lower()  # the answer depends on it


async def test_mounted_under_a_prefix_every_route_answers_there(tmp_path: Path) -> None:
    app = ac.App(make_settings(tmp_path))
    outer = Starlette(routes=[Mount("/coordinator", app=app)])
    async with app.lifespan():
        transport = httpx.ASGITransport(app=outer)
        async with httpx.AsyncClient(transport=transport, base_url="http://proxy.test") as client:
            assert (await client.get("/coordinator/v1/health")).json()["status"] == "ok"
            r = await client.post("/coordinator/v1/jobs", json={"payload": {"x": 1}}, headers=CLIENT)
            assert r.status_code == 201, r.text
            r = await client.get(f"/coordinator/v1/jobs/{r.json()['job_id']}", headers=CLIENT)
            assert r.status_code == 200
            doc = (await client.get("/coordinator/openapi.json")).json()
            assert doc["servers"] == [{"url": "/coordinator"}]
            assert (await client.get("/v1/health")).status_code == 404  # only under the prefix


def test_root_path_setting_is_a_path_prefix(tmp_path: Path) -> None:
    assert make_settings(tmp_path, {"ROOT_PATH": "/coordinator"}).root_path == "/coordinator"
    assert make_settings(tmp_path, {"ROOT_PATH": "/"}).root_path == ""
    for bad in ("coordinator", "/coordinator/", "/a b", "//"):
        with pytest.raises(ac.ConfigError, match="ROOT_PATH"):
            make_settings(tmp_path, {"ROOT_PATH": bad})


def test_serve_behind_a_proxy_that_strips_the_prefix(tmp_path: Path) -> None:
    """The proxy forwards /coordinator/v1/... as /v1/...; serve --root-path names the prefix for links
    and the OpenAPI document, as uvicorn's own --root-path does. Migrations run once at start."""
    proc, base = start_server(tmp_path, "--db", database_of(tmp_path), "--root-path", "/coordinator",
                              env={"APP_ENV": "dev"})
    try:
        with httpx.Client(base_url=base, timeout=10) as http:
            assert http.get("/v1/health").json()["status"] == "ok"
            r = http.post("/v1/jobs", json={"payload": {}}, headers=CLIENT)
            assert r.status_code == 201, r.text
            assert http.get("/openapi.json").json()["servers"] == [{"url": "/coordinator"}]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    log = (tmp_path / "serve.log").read_text()
    assert len(re.findall(r"schema version \d+ \(was \d+\)", log)) == 1, log
    version = ac.PG_SCHEMA_VERSION if ac.is_postgres_url(database_of(tmp_path)) else ac.SCHEMA_VERSION
    was = version if ac.is_postgres_url(database_of(tmp_path)) else 0  # (PostgreSQL's come migrated)
    assert f"schema version {version} (was {was})" in log  # the migration that did the work, once


# Every attribute the logging documentation lists for LogRecord (LogRecord attributes table).
LOG_RECORD_FORMAT = ("%(asctime)s|%(created)f|%(filename)s|%(funcName)s|%(levelname)s|%(levelno)d|%(lineno)d|"
                     "%(message)s|%(module)s|%(msecs)d|%(name)s|%(pathname)s|%(process)d|%(processName)s|"
                     "%(relativeCreated)d|%(stack_info)s|%(thread)d|%(threadName)s"
                     + ("|%(taskName)s" if sys.version_info >= (3, 12) else ""))


class Raising(logging.StreamHandler):  # type: ignore[type-arg]
    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        raise  # noqa: PLE0704 - re-raise what emit hit, instead of printing it


async def test_access_lines_work_with_every_standard_logging_attribute(tmp_path: Path) -> None:
    stream = io.StringIO()
    handler = Raising(stream)
    handler.setFormatter(logging.Formatter(LOG_RECORD_FORMAT))
    access = logging.getLogger("aitbc_coord.access")
    access.addHandler(handler)
    level = access.level
    access.setLevel(logging.INFO)
    try:
        async with harness(tmp_path) as h:
            await h.client.get("/v1/health")
    finally:
        access.removeHandler(handler)
        access.setLevel(level)
    line = stream.getvalue().strip().splitlines()[-1]
    fields = line.split("|")
    assert "GET /v1/health 200" in fields[7]
    assert int(fields[12]) > 0 and int(fields[16]) > 0 and fields[13] and fields[17], line  # process, thread


def test_access_records_made_directly_have_what_logrecord_gives_with_the_flags_off(monkeypatch: Any) -> None:
    """`serve` turns thread and process lookups off; the record made directly then has the same
    attributes LogRecord's constructor would give, so formats that work there work here."""
    for flag in ("logThreads", "logProcesses", "logMultiprocessing", "logAsyncioTasks"):
        monkeypatch.setattr(logging, flag, False, raising=False)
    direct = ac.AccessRecord("GET", "/v1/health", 200, 0.001, "-")
    standard = logging.LogRecord("aitbc_coord.access", logging.INFO, "(unknown file)", 0, "m", (), None,
                                 "(unknown function)")
    assert set(vars(standard)) <= set(vars(direct))
    for name in ("thread", "threadName", "process", "processName", "pathname", "filename", "module", "lineno",
                 "funcName", "levelname", "levelno", "name", "exc_info", "exc_text", "stack_info"):
        assert getattr(direct, name) == getattr(standard, name), name
    line = logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s %(msecs)03d").format(direct)
    assert "GET /v1/health 200" in line


@pytest.mark.parametrize(("path", "body", "key"), [
    ("/v1/jobs", b'{"payload": {}, "constraints": {"gpu": "a\xed\xa0\x80"}}', CLIENT),
    ("/v1/jobs", b'{"payload": {"p": "a\xed\xa0\x80"}}', CLIENT),
    ("/v1/miners/register", b'{"capabilities": {"x": "\xed\xa0\x80"}}', {"X-Api-Key": ac.DEV_KEYS["miner"]}),
    ("/v1/marketplace/bids", b'{"provider": "\xed\xa0\x80", "capacity": 1, "price": 1}', {}),
])
async def test_a_surrogate_encoded_as_utf8_bytes_is_malformed_json_and_stores_nothing(
        tmp_path: Path, path: str, body: bytes, key: dict[str, str]) -> None:
    """U+D800 written as raw bytes (WTF-8/CESU-8), not as an escape, is not UTF-8: 422, nothing kept."""
    async with harness(tmp_path) as h:
        r = await h.client.post(path, content=body, headers={**key, "content-type": "application/json"})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"][0] == "body", r.text
        stats = (await h.client.get("/v1/admin/stats", headers={"X-Api-Key": ac.DEV_KEYS["admin"]})).json()
        assert stats["total_jobs"] == 0
        assert (await h.client.get("/v1/admin/miners", headers={"X-Api-Key": ac.DEV_KEYS["admin"]})).json()["items"] == []


async def test_an_app_mounted_without_its_lifespan_answers_503_not_500(tmp_path: Path) -> None:
    outer = Starlette(routes=[Mount("/coordinator", app=ac.App(make_settings(tmp_path)))])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=outer), base_url="http://proxy.test") as client:
        r = await client.get("/coordinator/v1/health")
        assert (r.status_code, r.json()["db"]) == (503, "error")
        r = await client.post("/coordinator/v1/jobs", json={"payload": {}}, headers=CLIENT)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"


async def test_an_empty_job_id_filter_on_explorer_receipts_means_every_job(tmp_path: Path) -> None:
    async with harness(tmp_path, {"RECEIPT_SIGNING_KEY_HEX": "11" * 32}) as h:
        await h.register()
        job = await h.submit()
        await h.take()
        assert (await h.result(job["job_id"])).status_code == 200
        page = (await h.client.get("/v1/explorer/receipts", params={"job_id": ""})).json()
        assert page["jobId"] == "all" and len(page["items"]) == 1
