"""Targeted hostile input (issue 7.4) on every route that takes a body: never a 5xx."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

import aitbc_coord as ac
from conftest import ADMIN, CLIENT, MINER, harness
from test_authz import BODIES

pytestmark = pytest.mark.anyio
KEYS = {"client": CLIENT, "miner": MINER, "admin": ADMIN, None: {}}
NASTY: list[Any] = [None, 0, -1, 1.5, True, "", "x" * 5000, "\u0000nul\u0000", "é☕𝄞\u202e", [], [1, "a", None],
                    {}, {"a": {"b": {"c": [1, {}]}}}, 10**30, -(10**30), 1e300, 2**63, -(2**63) - 1]
RAW_BODIES = [b'{"x": NaN}', b'{"x": Infinity}', b'{"x": -Infinity}', b'{"x": 1e999}', b"[" * 5000 + b"]" * 5000,
              b'{"a":' * 70 + b"1" + b"}" * 70, b"\x00\x01\x02", b'"\\ud800"', b"null", b"1" * 10000,
              b'{"payload": {"n": 1' + b"0" * 5000 + b"}}"]


def body_routes() -> list[ac.Endpoint]:
    return [ep for ep in ac.ENDPOINTS if ep.body is not None]


async def test_every_field_of_every_body_with_wrong_values(tmp_path: Path) -> None:
    async with harness(tmp_path, {"RATE_LIMIT_REQUESTS": "0", "POLL_MAX_WAIT_SECONDS": "0.01"}) as h:
        job = await h.submit()
        ids = {"job_id": job["job_id"], "offer_id": "0" * 32}
        sent = 0
        for ep in body_routes():
            path = re.sub(r"{(\w+)}", lambda m: ids[m.group(1)], ep.path)
            base = BODIES.get(ep.path, {"receipt": {}})
            for field in ep.body.model_fields:
                for value in NASTY:
                    r = await h.client.request(ep.method, path, json={**base, field: value}, headers=KEYS[ep.role])
                    sent += 1
                    assert r.status_code < 500, (ep.path, field, value, r.status_code, r.text)
                    json.loads(r.text or "{}")  # every answer is JSON (or empty, for 204)
            for raw in RAW_BODIES:
                r = await h.client.request(ep.method, path, content=raw, headers={**KEYS[ep.role],
                                                                                   "content-type": "application/json"})
                sent += 1
                assert r.status_code < 500 and (r.status_code != 200 or ep.optional_body), (ep.path, raw[:40])
        assert sent > 500


async def test_bodies_over_the_limit_everywhere(tmp_path: Path) -> None:
    async with harness(tmp_path, {"MAX_BODY_BYTES": "4096", "RATE_LIMIT_REQUESTS": "0"}) as h:
        big = json.dumps({"payload": {"blob": "x" * 5000}}).encode()

        async def chunked():
            for i in range(0, len(big), 1000):
                yield big[i:i + 1000]

        for ep in body_routes():
            path = re.sub(r"{(\w+)}", "x", ep.path)
            for content in (big, chunked()):
                r = await h.client.request(ep.method, path, content=content, headers=KEYS[ep.role])
                assert r.status_code == 413, (ep.path, r.status_code)
