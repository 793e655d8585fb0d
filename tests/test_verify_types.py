"""Untrusted signed documents with wrong types (spec sections 8 and 15, "Bad input").

A receipt given to `POST /v1/receipts/verify` or to the offline `aitbc-coord verify FILE` is
untrusted: any field of the receipt, of its `signature` and of each `attestations` item can arrive
with any JSON type. The right answers:

- route: a body whose `receipt` is not an object is a 422 with loc ["body", "receipt"]; a receipt
  object with a field of a wrong type is a 200 `{"valid": false, "signature_valid": bool,
  "attestations_valid": [bool...], "known_key": bool, "reason": str}` (`attestations_valid` is []
  when `attestations` is not a list; the reason names the signature/attestation field it is about);
- CLI: one line starting `invalid: ` and exit status 1, never a traceback;
- an untouched receipt still verifies (valid when its key is known; CLI exit 0).

Receipts are a valid signed one (shaped like spec section 8) with one field's type changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

import aitbc_coord as ac
from conftest import Harness, harness
from test_receipts import EDGE_ATTESTATION_SEED, EDGE_SEED

ENV = {"RECEIPT_SIGNING_KEY_HEX": EDGE_SEED, "RECEIPT_ATTESTATION_KEY_HEX": EDGE_ATTESTATION_SEED,
       "RATE_LIMIT_REQUESTS": "0", "DB_SYNCHRONOUS": "OFF"}
SIGNER = ac.Signer(SigningKey(bytes.fromhex(EDGE_SEED)), SigningKey(bytes.fromhex(EDGE_ATTESTATION_SEED)))
SIGNING_KEY_ID = SIGNER.ids[0]
BODY = {
    "version": "1.0", "receipt_id": "0f1e2d3c4b5a69788796a5b4c3d2e1f0", "job_id": "5d41402abc4b2a76b9719d911017c592",
    "provider": "gpu-berlin-01", "client": "client-3fa2c0e1d4b5", "coordinator_id": "aitbc-coordinator",
    "status": "COMPLETED", "units": 2, "unit_type": "gpu_seconds", "unit_price": 0.5, "price": 1.0,
    "started_at": 1764000000, "completed_at": 1764000002,
    "metadata": {"job_payload": {"prompt": "café", "n": 3}, "job_constraints": {"gpu": "A100", "models": ["m"]},
                 "result": {"text": "ok", "score": 0.25}, "metrics": {"duration_ms": 2000}}}
RECEIPT, _ = SIGNER.seal(BODY)

# Every field whose type is mutated: each top-level field, each signature field, the attestation
# item and each of its fields, and metadata with what is nested in it.
PATHS: list[tuple[Any, ...]] = [
    *[(k,) for k in RECEIPT],
    ("signature", "alg"), ("signature", "key_id"), ("signature", "sig"),
    ("attestations", 0), ("attestations", 0, "alg"), ("attestations", 0, "key_id"), ("attestations", 0, "sig"),
    ("metadata", "job_payload"), ("metadata", "job_constraints"), ("metadata", "result"), ("metadata", "metrics"),
    ("metadata", "job_payload", "prompt"), ("metadata", "job_constraints", "models"),
    ("metadata", "job_constraints", "models", 0), ("metadata", "result", "score"),
    ("metadata", "metrics", "duration_ms"),
]
TYPES: dict[str, list[Any]] = {"list": [[], [1, "a"]], "object": [{}, {"key_id": "x"}], "string": ["", "x"],
                               "int": [0, 7, 2**64], "float": [1.5, -0.0], "bool": [True, False], "null": [None]}
STRUCTURAL = ("signature", "attestations")  # the fields the verifier itself reads


def type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    return {list: "list", dict: "object", str: "string", int: "int", float: "float"}[type(value)]


def get_in(doc: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        doc = doc[step]
    return doc


def mutated(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    receipt = copy.deepcopy(RECEIPT)
    parent = get_in(receipt, path[:-1])
    parent[path[-1]] = copy.deepcopy(value)
    return receipt


def cases() -> Iterator[tuple[tuple[Any, ...], Any]]:
    """(path, value) for every field and every JSON type other than the field's own."""
    for path in PATHS:
        own = type_name(get_in(RECEIPT, path))
        for kind, values in TYPES.items():
            if kind != own:
                for value in values:
                    yield path, value


def field_words(path: tuple[Any, ...]) -> list[str]:
    """Words a reason about this field must contain."""
    if path[0] == "signature":
        return ["signature"] if len(path) == 1 else [path[-1]]
    if path[0] == "attestations":
        return ["attestation"] + ([path[-1]] if len(path) > 2 else [])
    return []


def mentions(reason: str, word: str) -> bool:
    return re.search(rf"(?<![A-Za-z_]){re.escape(word)}", reason) is not None if word == "attestation" else \
        re.search(rf"(?<![A-Za-z_]){re.escape(word)}(?![A-Za-z_])", reason) is not None


def report_problems(path: tuple[Any, ...], receipt: dict[str, Any], status: int, text: str) -> list[str]:
    """What is wrong with the route's answer for a receipt whose `path` has a wrong type."""
    if status != 200:
        return [f"route {status}, want 200: {text[:160]}"]
    data = json.loads(text)
    problems = []
    for key in ("valid", "signature_valid", "known_key"):
        if not isinstance(data.get(key), bool):
            problems.append(f"{key} is {data.get(key)!r}, want a bool")
    if data.get("valid") is not False:
        problems.append(f"valid is {data.get('valid')!r}, want false")
    reason = data.get("reason")
    if not isinstance(reason, str) or not reason:
        problems.append(f"reason is {reason!r}, want a string")
    else:
        missing = [w for w in field_words(path) if not mentions(reason, w)]
        if missing:
            problems.append(f"reason {reason!r} does not name {'/'.join(missing)}")
    if path[0] != "attestations" and data.get("signature_valid") is not False:
        problems.append(f"signature_valid is {data.get('signature_valid')!r}, want false")
    sig = receipt.get("signature")
    if (not isinstance(sig, dict) or not isinstance(sig.get("key_id"), str)) and data.get("known_key") is not False:
        problems.append(f"known_key is {data.get('known_key')!r}, want false")
    atts = receipt.get("attestations")
    got = data.get("attestations_valid")
    if not isinstance(atts, list):
        if got != []:
            problems.append(f"attestations_valid is {got!r}, want [] (attestations is not a list)")
    elif not (isinstance(got, list) and len(got) == len(atts) and all(isinstance(b, bool) for b in got)):
        problems.append(f"attestations_valid is {got!r}, want {len(atts)} bools")
    return problems


def cli_problems(tmp_path: Path, receipt: dict[str, Any], *args: str) -> list[str]:
    """What is wrong with `aitbc-coord verify FILE` for an invalid receipt."""
    path = tmp_path / "receipt.json"
    path.write_text(json.dumps(receipt))
    result = CliRunner().invoke(ac.cli, ["verify", str(path), *args])
    lines = [line for line in result.output.splitlines() if line.strip()]
    label = f"cli{' --key-id' if args else ''}"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return [f"{label}: {type(result.exception).__name__}: {result.exception} (traceback)"]
    problems = []
    if result.exit_code != 1:
        problems.append(f"{label}: exit {result.exit_code}, want 1")
    if len(lines) != 1 or not lines[0].startswith("invalid: "):
        problems.append(f"{label}: printed {lines!r}, want one line starting 'invalid: '")
    return problems


class Verifier:
    """A coordinator holding the receipt keys, on its own loop (hypothesis drives it from plain code)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.loop = asyncio.new_event_loop()
        self.cm = harness(tmp_path, ENV)
        self.h: Harness = self.loop.run_until_complete(self.cm.__aenter__())
        self.failures: dict[tuple[str, str], tuple[set[str], str]] = {}
        self.checked = 0

    def post(self, content: bytes) -> httpx.Response:
        return self.loop.run_until_complete(self.h.client.post(
            "/v1/receipts/verify", content=content, headers={"content-type": "application/json"}))

    def check(self, path: tuple[Any, ...], value: Any) -> None:
        receipt = mutated(path, value)
        r = self.post(json.dumps({"receipt": receipt}).encode())
        problems = report_problems(path, receipt, r.status_code, r.text)
        problems += cli_problems(self.tmp_path, receipt)
        problems += cli_problems(self.tmp_path, receipt, "--key-id", SIGNING_KEY_ID)
        self.checked += 1
        field = ".".join(map(str, path))
        for problem in problems:
            kind = re.sub(r"'[^']*'|\[.*?\]|\d+", "_", problem)[:70]
            types, _ = self.failures.setdefault((field, kind), (set(), f"{value!r:.30} -> {problem[:200]}"))
            types.add(type_name(value))

    def close(self) -> None:
        self.loop.run_until_complete(self.cm.__aexit__(None, None, None))
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()

    def report(self) -> str:
        lines = [f"{len(self.failures)} (field, kind) failures over {self.checked} receipts:"]
        for (field, _), (types, example) in sorted(self.failures.items()):
            lines.append(f"  {field} as {'/'.join(sorted(types))}: e.g. {example}")
        return "\n".join(lines)


@contextlib.contextmanager
def verifier(tmp_path: Path) -> Iterator[Verifier]:
    v = Verifier(tmp_path)
    try:
        yield v
    finally:
        v.close()


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6)


def test_untouched_receipt_still_verifies(tmp_path: Path) -> None:
    with verifier(tmp_path) as v:
        r = v.post(json.dumps({"receipt": RECEIPT}).encode())
        assert r.status_code == 200 and r.json() == {"valid": True, "signature_valid": True,
                                                     "attestations_valid": [True], "known_key": True,
                                                     "reason": None}, r.text
    path = tmp_path / "good.json"
    path.write_text(json.dumps(RECEIPT))
    for args in ([], ["--key-id", SIGNING_KEY_ID]):
        result = CliRunner().invoke(ac.cli, ["verify", str(path), *args])
        assert result.exit_code == 0 and result.output.startswith("valid: "), result.output


@pytest.mark.anyio
async def test_a_served_receipt_still_verifies(tmp_path: Path) -> None:
    async with harness(tmp_path, ENV) as h:
        await h.register()
        job = await h.submit()
        await h.take()
        receipt = (await h.result(job["job_id"], {"ok": 1})).json()["receipt"]
        r = await h.client.post("/v1/receipts/verify", json={"receipt": receipt})
        assert r.json()["valid"] is True, r.text


@pytest.mark.anyio
@pytest.mark.parametrize("receipt", [[], [RECEIPT], "x", "", 0, 1.5, True, False, None],
                         ids=["list", "list-of-receipt", "string", "empty-string", "int", "float", "true", "false",
                              "null"])
async def test_a_receipt_that_is_not_an_object_is_a_422(tmp_path: Path, receipt: Any) -> None:
    async with harness(tmp_path, ENV) as h:
        r = await h.client.post("/v1/receipts/verify", json={"receipt": receipt})
        assert r.status_code == 422, r.text
        assert [e["loc"] for e in r.json()["detail"]] == [["body", "receipt"]], r.text


def test_the_reported_key_id_list(tmp_path: Path) -> None:
    """The case from the issue: {"signature": {"alg": "Ed25519", "key_id": [1], "sig": "x"}}."""
    receipt = {"signature": {"alg": "Ed25519", "key_id": [1], "sig": "x"}}
    with verifier(tmp_path) as v:
        r = v.post(json.dumps({"receipt": receipt}).encode())
    problems = cli_problems(tmp_path, receipt) + cli_problems(tmp_path, receipt, "--key-id", SIGNING_KEY_ID)
    if r.status_code != 200:
        problems.append(f"route {r.status_code}: {r.text}")
    else:
        data = r.json()
        if (data["valid"], data["signature_valid"], data["known_key"]) != (False, False, False):
            problems.append(f"route answered {data}")
        if not (isinstance(data["reason"], str) and mentions(data["reason"], "key_id")):
            problems.append(f"reason {data['reason']!r} does not name key_id")
    assert not problems, problems


def test_every_field_with_every_wrong_type(tmp_path: Path) -> None:
    with verifier(tmp_path) as v:
        for path, value in cases():
            v.check(path, value)

        @given(path=st.sampled_from(PATHS), value=JSON_VALUES)
        @settings(max_examples=300, derandomize=True, deadline=None, database=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        def generated(path: tuple[Any, ...], value: Any) -> None:
            if type_name(value) != type_name(get_in(RECEIPT, path)):
                v.check(path, value)

        generated()
        assert v.checked > 300
        assert not v.failures, v.report()
