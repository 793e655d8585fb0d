"""Authorization matrix (issue 7.5): every route x every kind of caller, and no raw key anywhere."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

import aitbc_coord as ac
from conftest import harness
from test_receipts import EDGE_SEED

pytestmark = pytest.mark.anyio
RAW = {"A": "authz-client-a-key-5b1e", "B": "authz-client-b-key-77c2", "miner": "authz-miner-key-9d0f",
       "admin": "authz-admin-key-41aa"}
ENV = {"CLIENT_API_KEYS": f"alice={RAW['A']},bob={RAW['B']}", "MINER_API_KEYS": f"rig={RAW['miner']}",
       "ADMIN_API_KEYS": f"ops={RAW['admin']}", "RECEIPT_SIGNING_KEY_HEX": EDGE_SEED, "RATE_LIMIT_REQUESTS": "0"}
CALLERS = {"none": {}, **{name: {"X-Api-Key": key} for name, key in RAW.items()},
           **{f"{name}-bearer": {"Authorization": f"Bearer {key}"} for name, key in RAW.items()}}
BODIES = {"/v1/jobs": {"payload": {}}, "/v1/miners/register": {"capabilities": {}}, "/v1/miners/heartbeat": {},
          "/v1/miners/poll": {}, "/v1/miners/{job_id}/result": {"result": {"x": 1}},
          "/v1/miners/{job_id}/fail": {"error_code": "E", "error_message": "m"},
          "/v1/marketplace/offers": {"provider": "p", "capacity": 1, "price": 1},
          "/v1/marketplace/offers/{offer_id}/status": {"status": "open"},
          "/v1/marketplace/bids": {"provider": "p", "capacity": 1, "price": 1}, "/v1/receipts/verify": {"receipt": {}}}


def may_succeed(ep: ac.Endpoint, caller: str) -> bool:
    """Whether a 2xx is legitimate for this caller on this route (called with alice's job id)."""
    who = caller.removesuffix("-bearer")
    if ep.role is None:
        return True
    if ep.role == "client":
        return who == "A" or (who == "B" and "{job_id}" not in ep.path)
    return who == ep.role


async def test_every_route_for_every_caller(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []
    async with harness(tmp_path, ENV) as h:
        alice, rig = CALLERS["A"], CALLERS["miner"]
        job = await h.submit(headers=alice)
        await h.register(rig)
        await h.take(rig)
        receipt = (await h.result(job["job_id"], {"x": 1}, headers=rig)).json()["receipt"]
        offer = (await h.client.post("/v1/marketplace/offers", json=BODIES["/v1/marketplace/offers"],
                                     headers=CALLERS["admin"])).json()
        ids = {"job_id": job["job_id"], "offer_id": offer["id"], "bid_id": "0" * 32}
        checked = 0
        for ep in ac.ENDPOINTS:
            path = re.sub(r"{(\w+)}", lambda m: ids[m.group(1)], ep.path)
            body = BODIES.get(ep.path, {"receipt": receipt}) if ep.method == "POST" else None
            for caller, headers in CALLERS.items():
                r = await h.client.request(ep.method, path, json=body, headers=headers)
                texts.append(r.text)
                checked += 1
                if not may_succeed(ep, caller):
                    assert not 200 <= r.status_code < 300, (ep.method, ep.path, caller, r.status_code)
                    if ep.role is not None and caller.removesuffix("-bearer") not in ("A", "B"):
                        assert r.status_code == 401, (ep.method, ep.path, caller)
                    elif ep.role == "client":  # bob, or alice's job asked for by bob
                        assert (r.status_code, r.json()) == (404, {"detail": "job not found"}), (ep.path, caller)
        assert checked == len(ac.ENDPOINTS) * len(CALLERS)
        bobs = (await h.client.get("/v1/jobs", headers=CALLERS["B"])).json()["items"]
        assert job["job_id"] not in {j["job_id"] for j in bobs}
        texts.append((await h.client.get("/metrics")).text)
        texts.append((await h.client.get("/openapi.json")).text)
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("coord.db*"))
    logged = caplog.text + "".join(str(r.__dict__) for r in caplog.records)
    for key in RAW.values():
        assert all(key not in t for t in texts), key
        assert key.encode() not in stored, key
        assert key not in logged, key
