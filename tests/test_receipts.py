"""Signed receipts (spec section 8), checked against the published vectors and an independent verifier."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

import aitbc_coord as ac
from conftest import ADMIN, CLIENT, MINER, NO_RECEIPTS, T0, FakeClock, Harness, harness

pytestmark = pytest.mark.anyio

# --- the published vectors, copied here (the project never reads ../shared) ---

SAMPLE_SEED = "e2c35a46318ec09cf1cc04f06c4ba18bf2cd3f0ed318d986f01228bdbf9fd326"
SAMPLE_PUBLIC_HEX = "4c9bc7d00f69924d1cdee40c3650a2bcbb37191de2d53d93b5f21b2d3d27dbd4"
SAMPLE_KEY_ID = "TJvH0A9pkk0c3uQMNlCivLs3GR3i1T2TtfIbLT0n29Q"
SAMPLE_PAYLOAD = {
    "version": "1.0", "receipt_id": "rcpt-20250926-000123", "job_id": "job-abc123", "provider": "ait1minerxyz...",
    "client": "ait1clientabc...", "units": 1.9, "unit_type": "gpu_seconds", "price": 4.2,
    "model": "runwayml/stable-diffusion-v1-5", "prompt_hash": "sha256:cf1f...", "started_at": 1695720000,
    "completed_at": 1695720002, "artifact_hash": "sha256:deadbeef...", "coordinator_id": "coord-eu-west-1",
    "nonce": "b7f3d10b", "chain_id": 12345}
SAMPLE_CANONICAL = (
    '{"artifact_hash":"sha256:deadbeef...","chain_id":12345,"client":"ait1clientabc...","completed_at":1695720002,'
    '"coordinator_id":"coord-eu-west-1","job_id":"job-abc123","model":"runwayml/stable-diffusion-v1-5",'
    '"nonce":"b7f3d10b","price":4.2,"prompt_hash":"sha256:cf1f...","provider":"ait1minerxyz...",'
    '"receipt_id":"rcpt-20250926-000123","started_at":1695720000,"unit_type":"gpu_seconds","units":1.9,'
    '"version":"1.0"}')
SAMPLE_SIG = "fSmokpSz5-qf0XwwuBOBNseIONRM3Y6Bmrko4oE6mY0nS_noq_3zQ9y87Cd3IkMct3S5Ve-URC7D8TVBiBkvAg"

EDGE_SEED = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"
EDGE_ATTESTATION_SEED = "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb"
EDGE_PAYLOAD = {
    "version": "1.0", "receipt_id": "0f1e2d3c4b5a69788796a5b4c3d2e1f0", "job_id": "5d41402abc4b2a76b9719d911017c592",
    "provider": "gpu-berlin-01", "client": "client-3fa2c0e1d4b5", "coordinator_id": "aitbc-coordinator",
    "status": "COMPLETED", "units": 2, "unit_type": "gpu_seconds", "unit_price": 0.5, "price": 1.0,
    "started_at": 1764000000, "completed_at": 1764000002,
    "metadata": {"job_payload": {"prompt": "café – naïve ☕ 𝄞", "value": None, "list": [1, None, {"z": None, "a": []}]},
                 "job_constraints": {}, "result": {"text": "Grüße", "score": 0.1, "big": 1e16, "small": 1e-05},
                 "metrics": {"duration_ms": 2000}}}
EDGE_CANONICAL = (
    '{"client":"client-3fa2c0e1d4b5","completed_at":1764000002,"coordinator_id":"aitbc-coordinator",'
    '"job_id":"5d41402abc4b2a76b9719d911017c592","metadata":{"job_constraints":{},"job_payload":{"list":[1,{"a":[]}],'
    '"prompt":"caf\\u00e9 \\u2013 na\\u00efve \\u2615 \\ud834\\udd1e"},"metrics":{"duration_ms":2000},'
    '"result":{"big":1e+16,"score":0.1,"small":1e-05,"text":"Gr\\u00fc\\u00dfe"}},"price":1.0,'
    '"provider":"gpu-berlin-01","receipt_id":"0f1e2d3c4b5a69788796a5b4c3d2e1f0","started_at":1764000000,'
    '"status":"COMPLETED","unit_price":0.5,"unit_type":"gpu_seconds","units":2,"version":"1.0"}')
EDGE_SIGNATURE = {"alg": "Ed25519", "key_id": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo",
                  "sig": "w-hhPhhpP-t8dIucZZ44PcxWJt_LExl6r_j98wX6OHvwak7AfzL8PWcWbPyElEOA6LMUe_S_XmU3cvaQwD5hCg"}
EDGE_ATTESTATION = {"alg": "Ed25519", "key_id": "PUAXw-hDiVqStwqnTRt-vJyYLM8uxJaMwM1V8Sr0Zgw",
                    "sig": "7wBLqBImBjrT_nMqm8CQuUb-kKNsmMm1GAX-czNZbFt7Fq3Yo3dzL3BD_Ibb8KHEK1fb1SI2GeNN1Mi3A-eeCA"}

SIGNING = {"RECEIPT_SIGNING_KEY_HEX": EDGE_SEED}
SIGNING_AND_ATTESTING = {**SIGNING, "RECEIPT_ATTESTATION_KEY_HEX": EDGE_ATTESTATION_SEED}


# --- an independent verifier, written from the spec (shares no code with the server) ---

def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip(v) for v in value if v is not None]
    return value


def independent_canonical(receipt: dict[str, Any]) -> bytes:
    body = _strip({k: v for k, v in receipt.items() if k not in ("signature", "attestations")})
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def independently_valid(receipt: dict[str, Any], signing_key_id: str, attestation_key_id: str | None = None) -> bool:
    message = independent_canonical(receipt)
    sigs = [(receipt.get("signature"), signing_key_id)]
    sigs += [(a, attestation_key_id) for a in receipt.get("attestations", [])]
    try:
        for sig, expected_key in sigs:
            assert sig["alg"] == "Ed25519" and sig["key_id"] == expected_key
            VerifyKey(_b64d(sig["key_id"])).verify(message, _b64d(sig["sig"]))
    except (AssertionError, BadSignatureError, KeyError, TypeError, ValueError):
        return False
    return True


def sdk_digest(value: Any) -> str:
    """What a client holding a payload or result computes to check a 1.1 receipt's digest: SHA-256 of
    the canonical JSON bytes, as the signature's (nulls dropped, sorted keys, compact, ASCII)."""
    return hashlib.sha256(json.dumps(_strip(value), sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def has_null(value: Any) -> bool:
    if isinstance(value, dict):
        return any(v is None or has_null(v) for v in value.values())
    if isinstance(value, list):
        return any(v is None or has_null(v) for v in value)
    return value is None


def test_sample_vector_reproduces_key_canonical_bytes_and_signature() -> None:
    key = SigningKey(bytes.fromhex(SAMPLE_SEED))
    assert bytes(key.verify_key).hex() == SAMPLE_PUBLIC_HEX
    assert ac.key_id_of(key) == SAMPLE_KEY_ID
    assert ac.canonical_receipt_bytes(SAMPLE_PAYLOAD) == SAMPLE_CANONICAL.encode()
    assert ac.signature_of(key, SAMPLE_CANONICAL.encode()) == {"alg": "Ed25519", "key_id": SAMPLE_KEY_ID,
                                                                "sig": SAMPLE_SIG}
    receipt = {**SAMPLE_PAYLOAD, "signature": {"alg": "Ed25519", "key_id": SAMPLE_KEY_ID, "sig": SAMPLE_SIG}}
    assert ac.verify_receipt(receipt, {SAMPLE_KEY_ID})["valid"]


def test_edge_vector_reproduces_canonical_bytes_signature_and_attestation() -> None:
    assert ac.canonical_receipt_bytes(EDGE_PAYLOAD) == EDGE_CANONICAL.encode()
    signer = ac.Signer(SigningKey(bytes.fromhex(EDGE_SEED)), SigningKey(bytes.fromhex(EDGE_ATTESTATION_SEED)))
    sealed, text = signer.seal(EDGE_PAYLOAD)
    assert sealed["signature"] == EDGE_SIGNATURE and sealed["attestations"] == [EDGE_ATTESTATION]
    assert not has_null(sealed)  # what is returned is what was signed: nulls are gone
    assert json.loads(text) == sealed  # and the stored text is that receipt
    receipt = {**EDGE_PAYLOAD, "signature": EDGE_SIGNATURE, "attestations": [EDGE_ATTESTATION]}
    report = ac.verify_receipt(receipt, {EDGE_SIGNATURE["key_id"]})
    assert report == {"valid": True, "signature_valid": True, "attestations_valid": [True], "known_key": True,
                      "reason": None}
    assert independently_valid(receipt, EDGE_SIGNATURE["key_id"], EDGE_ATTESTATION["key_id"])


@pytest.mark.parametrize("body", [
    {"version": "1.0", "receipt_id": "a" * 32, "metadata": {"result": {"text": "no nulls here"}}, "units": 2},
    {"version": "1.0", "receipt_id": "b" * 32, "metadata": {"result": {"text": "nullable", "k": None}}, "units": 2},
    {"version": "1.0", "receipt_id": "c" * 32, "metadata": {"null": ["null", None, {"x": None}]}, "price": None},
])
def test_sealing_signs_the_canonical_bytes_with_or_without_nulls_to_drop(body: dict) -> None:
    signer = ac.Signer(SigningKey(bytes.fromhex(EDGE_SEED)), SigningKey(bytes.fromhex(EDGE_ATTESTATION_SEED)))
    sealed, text = signer.seal(body)
    assert json.loads(text) == sealed and not has_null(sealed)
    key_ids = [k for k, _ in signer.key_ids()]
    assert independently_valid(sealed, *key_ids)
    assert ac.canonical_receipt_bytes(sealed) == ac.canonical_receipt_bytes(body)


async def complete_one(h: Harness, payload: dict | None = None, result: dict | None = None,
                       metrics: dict | None = None, caps: dict | None = None, seconds: float = 2.5) -> dict:
    job = await h.submit(payload or {"prompt": "hi", "n": None})
    await h.register(capabilities=caps if caps is not None else {"price": 0.5})
    await h.take()
    h.clock.advance(seconds)
    r = await h.result(job["job_id"], result or {"text": "ok"}, metrics=metrics or {})
    assert r.status_code == 200, r.text
    return r.json()["receipt"]


async def test_completion_issues_a_receipt_with_every_field(tmp_path) -> None:
    async with harness(tmp_path, SIGNING) as h:
        receipt = await complete_one(h, {"prompt": "hi", "n": None}, {"text": "ok"}, {"duration_ms": 2500},
                                     {"price": 0.5})
        key_id = EDGE_SIGNATURE["key_id"]
        assert independently_valid(receipt, key_id)
        assert "attestations" not in receipt and not has_null(receipt)
        assert receipt["version"] == "1.1" and len(receipt["receipt_id"]) == 32
        assert receipt["provider"] == "miner-" + ac.key_digest(ac.DEV_KEYS["miner"])[:12]
        assert receipt["client"] == "client-" + ac.key_digest(ac.DEV_KEYS["client"])[:12]
        assert (receipt["coordinator_id"], receipt["status"]) == ("aitbc-coordinator", "COMPLETED")
        assert (receipt["units"], receipt["unit_type"], receipt["unit_price"], receipt["price"]) == (
            2.5, "gpu_seconds", 0.5, 1.25)
        assert (receipt["started_at"], receipt["completed_at"]) == (int(T0), int(T0 + 2.5))
        assert receipt["metadata"] == {"job_payload_sha256": sdk_digest({"prompt": "hi"}), "job_constraints": {},
                                       "result_sha256": sdk_digest({"text": "ok"}), "metrics": {"duration_ms": 2500}}


async def test_nested_nulls_leave_the_receipt_but_not_the_stored_result(tmp_path) -> None:
    async with harness(tmp_path, SIGNING) as h:
        result = {"text": "null and void", "x": [None, {"y": None}]}
        receipt = await complete_one(h, {"a": [1, None, {"b": None}]}, result, {"m": {"z": None}}, {"price": 0.5})
        assert receipt["metadata"] == {"job_payload_sha256": sdk_digest({"a": [1, {}]}), "job_constraints": {},
                                       "result_sha256": sdk_digest({"text": "null and void", "x": [{}]}),
                                       "metrics": {"m": {}}}
        assert receipt["metadata"]["result_sha256"] == sdk_digest(result)  # nulls dropped, as for signing
        assert independently_valid(receipt, EDGE_SIGNATURE["key_id"])
        job_id = receipt["job_id"]
        assert (await h.client.get(f"/v1/jobs/{job_id}/receipt", headers=CLIENT)).json() == receipt
        got = (await h.client.get(f"/v1/jobs/{job_id}/result", headers=CLIENT)).json()
        assert got == {"result": result, "receipt": receipt}  # the result as the miner posted it


@pytest.mark.parametrize(("result", "metrics", "caps", "expected"), [
    ({"units": 3}, {"units": 7, "unit_type": "tokens"}, {"price": 0.1},
     {"units": 7, "unit_type": "tokens", "unit_price": 0.1, "price": 0.7}),
    ({"units": 3, "unit_type": "images", "price": 9}, {}, {"price": 2},
     {"units": 3, "unit_type": "images", "unit_price": 2, "price": 9}),
    ({}, {"price": 4.5}, {}, {"units": 2.5, "unit_type": "gpu_seconds", "price": 4.5}),
    ({}, {}, {"price": "cheap"}, {"units": 2.5, "unit_type": "gpu_seconds"}),
    ({"units": "many"}, {"units": None}, {"price": 1}, {"units": 2.5, "unit_price": 1, "price": 2.5}),
    ({"units": 1, "unit_type": "gpu_seconds", "price": 1}, {"units": 1, "duration_ms": 500}, {"price": 1},
     {"units": 1, "unit_type": "gpu_seconds", "unit_price": 1, "price": 1}),
])
async def test_units_and_price_fallbacks(tmp_path, result: dict, metrics: dict, caps: dict, expected: dict) -> None:
    async with harness(tmp_path, SIGNING) as h:
        receipt = await complete_one(h, result=result, metrics=metrics, caps=caps)
        assert {k: receipt.get(k) for k in expected} == expected
        for absent in {"unit_price", "price"} - set(expected):
            assert absent not in receipt
        assert independently_valid(receipt, EDGE_SIGNATURE["key_id"])


async def test_receipt_routes_and_a_repeated_result(tmp_path) -> None:
    async with harness(tmp_path, SIGNING_AND_ATTESTING) as h:
        receipt = await complete_one(h)
        job_id = receipt["job_id"]
        assert independently_valid(receipt, EDGE_SIGNATURE["key_id"], EDGE_ATTESTATION["key_id"])
        again = await h.result(job_id, {"text": "ok"})
        assert again.json()["receipt"] == receipt  # the same receipt, not a new one
        assert (await h.client.get(f"/v1/jobs/{job_id}/receipt", headers=CLIENT)).json() == receipt
        assert (await h.client.get(f"/v1/jobs/{job_id}/result", headers=CLIENT)).json() == {
            "result": {"text": "ok"}, "receipt": receipt}
        page = (await h.client.get(f"/v1/jobs/{job_id}/receipts", headers=CLIENT)).json()
        assert page == {"items": [receipt], "next_offset": None, "next_cursor": None}
        stats = (await h.client.get("/v1/admin/stats", headers=ADMIN)).json()
        assert stats["receipts_total"] == 1
        miners = (await h.client.get("/v1/admin/miners", headers=ADMIN)).json()["items"]
        assert miners[0]["last_receipt_id"] == receipt["receipt_id"]


async def test_receipts_list_pages_oldest_first_with_a_cursor(tmp_path) -> None:
    async with harness(tmp_path, SIGNING) as h:
        first = await complete_one(h)
        job_id = first["job_id"]
        extra = [{**first, "receipt_id": f"{i:032x}"} for i in range(1, 4)]  # e.g. re-issued receipts
        for r in extra:
            await h.coord.db.write(ac.insert_receipt, r, first["client"], h.coord.now())
        ids, cursor = [], None
        while True:
            params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
            page = (await h.client.get(f"/v1/jobs/{job_id}/receipts", params=params, headers=CLIENT)).json()
            ids += [r["receipt_id"] for r in page["items"]]
            if (cursor := page["next_cursor"]) is None:
                break
        assert ids == [first["receipt_id"]] + [r["receipt_id"] for r in extra]
        latest = (await h.client.get(f"/v1/jobs/{job_id}/receipt", headers=CLIENT)).json()
        assert latest["receipt_id"] == extra[-1]["receipt_id"]
        r = await h.client.get(f"/v1/jobs/{job_id}/receipts", params={"cursor": "abc"}, headers=CLIENT)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "cursor"]


async def test_tampering_dropping_or_swapping_breaks_every_receipt(tmp_path) -> None:
    async with harness(tmp_path, SIGNING_AND_ATTESTING) as h:
        receipt = await complete_one(h, metrics={"units": 2, "price": 3.5})

        async def verify(r: dict) -> dict:
            return (await h.client.post("/v1/receipts/verify", json={"receipt": r})).json()

        assert (await verify(receipt))["valid"] is True
        body_keys = [k for k in receipt if k not in ("signature", "attestations")]
        variants = []
        for k in body_keys:
            value = receipt[k]
            flipped = value + 1 if isinstance(value, (int, float)) else {**value, "x": 1} if isinstance(value, dict) \
                else value + "x"
            variants += [{**receipt, k: flipped}, {k2: v for k2, v in receipt.items() if k2 != k}]
        variants.append({**receipt, "signature": receipt["attestations"][0]})  # attestation passed off as signature
        variants.append({**receipt, "attestations": [receipt["signature"]]})
        variants.append({**receipt, "metadata": {**receipt["metadata"], "result": {"text": "forged"}}})
        for variant in variants:
            report = await verify(variant)
            assert report["valid"] is False and report["reason"], variant
            assert not independently_valid(variant, EDGE_SIGNATURE["key_id"], EDGE_ATTESTATION["key_id"])
        stranger, _ = ac.Signer(SigningKey.generate()).seal({k: receipt[k] for k in body_keys})
        report = await verify(stranger)
        assert (report["signature_valid"], report["known_key"], report["valid"]) == (True, False, False)
        report = await verify({k: receipt[k] for k in body_keys})
        assert report["valid"] is False and report["reason"] == "receipt has no signature"


async def test_no_signing_key_means_no_receipts(tmp_path) -> None:
    async with harness(tmp_path, NO_RECEIPTS) as h:
        job = await h.submit()
        await h.register()
        await h.take()
        assert (await h.result(job["job_id"])).json() == {"status": "ok", "receipt": None}
        r = await h.client.get(f"/v1/jobs/{job['job_id']}/receipt", headers=CLIENT)
        assert (r.status_code, r.json()) == (404, {"detail": "receipt not available"})
        assert (await h.client.get(f"/v1/jobs/{job['job_id']}/result", headers=CLIENT)).json()["receipt"] is None
        assert (await h.client.get("/v1/receipts/keys")).json() == {"items": []}


async def test_key_rotation_keeps_old_receipts_verifiable(tmp_path) -> None:
    async with harness(tmp_path, SIGNING_AND_ATTESTING) as h:
        old = await complete_one(h)
    new_seed = SigningKey.generate().encode().hex()
    async with harness(tmp_path, {"RECEIPT_SIGNING_KEY_HEX": new_seed}) as h:
        new = await complete_one(h)
        keys = {(k["key_id"], k["role"]): k for k in (await h.client.get("/v1/receipts/keys")).json()["items"]}
        assert keys[EDGE_SIGNATURE["key_id"], "signing"] == {"key_id": EDGE_SIGNATURE["key_id"], "alg": "Ed25519",
                                                             "role": "signing", "status": "retired"}
        assert keys[EDGE_ATTESTATION["key_id"], "attestation"]["status"] == "retired"
        assert keys[new["signature"]["key_id"], "signing"]["status"] == "active"
        # the receipt key signed the log's checkpoints too: rotated with it, the log keeps its origin
        old_log, new_log = keys[EDGE_SIGNATURE["key_id"], "log"], keys[new["signature"]["key_id"], "log"]
        assert (old_log["status"], new_log["status"]) == ("retired", "active")
        assert old_log["origin"] == new_log["origin"]
        for receipt in (old, new):
            assert (await h.client.post("/v1/receipts/verify", json={"receipt": receipt})).json()["valid"] is True


async def test_a_failed_receipt_write_leaves_the_job_running(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with harness(tmp_path, SIGNING) as h:
        job = await h.submit()
        await h.register()
        await h.take()

        def broken(*args: object) -> None:
            raise ac.sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(ac, "insert_receipt", broken)
        assert (await h.result(job["job_id"])).status_code == 503
        assert (await h.job(job["job_id"]))["state"] == "RUNNING"  # never COMPLETED without its receipt
        monkeypatch.undo()
        receipt = (await h.result(job["job_id"])).json()["receipt"]
        assert receipt and (await h.job(job["job_id"]))["state"] == "COMPLETED"


async def test_non_finite_numbers_are_refused_at_the_edge(tmp_path) -> None:
    async with harness(tmp_path, SIGNING) as h:
        job = await h.submit()
        await h.register()
        await h.take()
        for body in (b'{"result": {"x": NaN}}', b'{"result": {}, "metrics": {"units": Infinity}}',
                     b'{"result": {"x": 1e400}}'):
            r = await h.client.post(f"/v1/miners/{job['job_id']}/result", content=body, headers=MINER)
            assert r.status_code == 422
        r = await h.client.post("/v1/receipts/verify", content=b'{"receipt": {"units": NaN}}')
        assert r.status_code == 422


# --- configuration of keys ---

@pytest.mark.sqlite_only  # no database in play (settings and key files)
def test_malformed_keys_and_loose_key_files_are_start_up_errors(tmp_path: Path) -> None:
    for env, name in (({"RECEIPT_SIGNING_KEY_HEX": "abc"}, "RECEIPT_SIGNING_KEY_HEX"),
                      ({"RECEIPT_ATTESTATION_KEY_HEX": "z" * 64}, "RECEIPT_ATTESTATION_KEY_HEX"),
                      ({"RECEIPT_SIGNING_KEY_HEX": EDGE_SEED, "RECEIPT_SIGNING_KEY_FILE": "x"}, "only one"),
                      ({"RECEIPT_SIGNING_KEY_FILE": str(tmp_path / "missing")}, "RECEIPT_SIGNING_KEY_FILE")):
        with pytest.raises(ac.ConfigError, match=name):
            ac.Settings.load(env)
    key_file = tmp_path / "signing.key"
    key_file.write_text(EDGE_SEED + "\n")
    key_file.chmod(0o644)
    with pytest.raises(ac.ConfigError, match="readable or writable by group or others"):
        ac.Settings.load({"RECEIPT_SIGNING_KEY_FILE": str(key_file)})
    key_file.chmod(0o600)
    assert ac.Settings.load({"RECEIPT_SIGNING_KEY_FILE": str(key_file)}).signing_seed == bytes.fromhex(EDGE_SEED)
    assert EDGE_SEED not in repr(ac.Settings.load({"RECEIPT_SIGNING_KEY_HEX": EDGE_SEED}))
    key_file.write_text("not hex\n")
    with pytest.raises(ac.ConfigError, match="RECEIPT_SIGNING_KEY_FILE: must be 64 hex"):
        ac.Settings.load({"RECEIPT_SIGNING_KEY_FILE": str(key_file)})


@pytest.mark.sqlite_only  # no database in play (the keygen command)
def test_keygen_prints_a_seed_that_works_and_writes_private_files(tmp_path: Path) -> None:
    runner = CliRunner()
    out = runner.invoke(ac.cli, ["keygen"]).output
    seed = out.split("seed: ")[1].split()[0]
    key_id = out.split("key_id: ")[1].split()[0]
    settings = ac.Settings.load({"RECEIPT_SIGNING_KEY_HEX": seed})
    assert ac.key_id_of(SigningKey(settings.signing_seed)) == key_id and len(key_id) == 43
    path = tmp_path / "k.key"
    result = runner.invoke(ac.cli, ["keygen", "--out", str(path)])
    assert result.exit_code == 0 and "seed" not in result.output and "key_id: " in result.output
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    first = path.read_text()
    refused = runner.invoke(ac.cli, ["keygen", "--out", str(path)])
    assert refused.exit_code == 1 and "--force" in refused.output and path.read_text() == first
    path.chmod(0o644)
    assert runner.invoke(ac.cli, ["keygen", "--out", str(path), "--force"]).exit_code == 0
    assert path.read_text() != first and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    loaded = ac.Settings.load({"RECEIPT_SIGNING_KEY_FILE": str(path)})
    assert loaded.signing_seed is not None


@pytest.mark.sqlite_only  # no database in play (the verify command)
def test_verify_command(tmp_path: Path) -> None:
    runner = CliRunner()
    receipt = {**EDGE_PAYLOAD, "signature": EDGE_SIGNATURE, "attestations": [EDGE_ATTESTATION]}
    good, bad, wrapped = tmp_path / "good.json", tmp_path / "bad.json", tmp_path / "wrapped.json"
    good.write_text(json.dumps(receipt))
    bad.write_text(json.dumps({**receipt, "price": 100.0}))
    wrapped.write_text(json.dumps({"status": "ok", "receipt": receipt}))
    ok = runner.invoke(ac.cli, ["verify", str(good), "--key-id", EDGE_SIGNATURE["key_id"]])
    assert ok.exit_code == 0 and ok.output.startswith("valid")
    assert runner.invoke(ac.cli, ["verify", str(wrapped)]).exit_code == 0
    tampered = runner.invoke(ac.cli, ["verify", str(bad)])
    assert tampered.exit_code == 1 and "signature does not verify" in tampered.output
    untrusted = runner.invoke(ac.cli, ["verify", str(good), "--key-id", SAMPLE_KEY_ID])
    assert untrusted.exit_code == 1 and "not among the trusted signing keys" in untrusted.output
    (tmp_path / "junk.json").write_text("{")
    assert runner.invoke(ac.cli, ["verify", str(tmp_path / "junk.json")]).exit_code == 1


# --- version 1.1: digests of the payload and result instead of the objects ---


async def test_a_1_1_receipt_verifies_as_the_sdk_does_and_its_digests_match_what_the_client_holds(tmp_path) -> None:
    """A receipt SDK written from SPEC section 8 alone: canonical bytes (nulls dropped, sorted keys,
    compact), Ed25519 over them with PyNaCl; the client hashes the payload it sent and the result it
    got the same way and compares them with the receipt's digests."""
    payload = {"prompt": "a lighthouse at dusk, 4k", "steps": 30, "seed": None, "lora": ["ink", None],
               "note": "caf\u00e9 \u2615 \U0001d11e"}
    result = {"image": "s3://bucket/out.png", "nsfw": False, "score": 0.125, "trace": None}
    async with harness(tmp_path, SIGNING_AND_ATTESTING) as h:
        receipt = await complete_one(h, payload, result, {"duration_ms": 2500, "units": 2.5})
        got = (await h.client.get(f"/v1/jobs/{receipt['job_id']}/result", headers=CLIENT)).json()
    assert receipt["version"] == "1.1" and got["receipt"] == receipt
    message = json.dumps(_strip({k: v for k, v in receipt.items() if k not in ("signature", "attestations")}),
                         sort_keys=True, separators=(",", ":")).encode("utf-8")
    for sig in (receipt["signature"], *receipt["attestations"]):
        VerifyKey(_b64d(sig["key_id"])).verify(message, _b64d(sig["sig"]))  # raises when it does not verify
    assert {sig["key_id"] for sig in (receipt["signature"], *receipt["attestations"])} == {
        EDGE_SIGNATURE["key_id"], EDGE_ATTESTATION["key_id"]}
    meta = receipt["metadata"]
    assert set(meta) == {"job_payload_sha256", "job_constraints", "result_sha256", "metrics"}
    assert meta["job_payload_sha256"] == sdk_digest(payload) and meta["result_sha256"] == sdk_digest(got["result"])
    assert got["result"] == result  # served as posted; the digest is of its canonical form
    assert meta["job_payload_sha256"] != sdk_digest({**payload, "steps": 31})
    forged = {**receipt, "metadata": {**meta, "result_sha256": sdk_digest({**result, "score": 1})}}
    assert not independently_valid(forged, EDGE_SIGNATURE["key_id"], EDGE_ATTESTATION["key_id"])


@pytest.mark.sqlite_only  # no database in play (the verify command)
def test_verify_command_accepts_a_1_1_receipt(tmp_path: Path) -> None:
    signer = ac.Signer(SigningKey(bytes.fromhex(EDGE_SEED)))
    body = {"version": "1.1", "receipt_id": "e" * 32, "job_id": "f" * 32, "provider": "rig", "client": "alice",
            "coordinator_id": "aitbc-coordinator", "status": "COMPLETED", "units": 2, "unit_type": "gpu_seconds",
            "started_at": 1, "completed_at": 3,
            "metadata": {"job_payload_sha256": sdk_digest({"p": 1}), "job_constraints": {},
                         "result_sha256": sdk_digest({"r": [1, None]}), "metrics": {}}}
    receipt, text = signer.seal(body)
    path = tmp_path / "receipt.json"
    path.write_text(text)
    out = CliRunner().invoke(ac.cli, ["verify", str(path), "--key-id", EDGE_SIGNATURE["key_id"]])
    assert out.exit_code == 0 and f"valid: receipt {'e' * 32}" in out.output, out.output
    path.write_text(json.dumps({**receipt, "metadata": {**receipt["metadata"], "result_sha256": "0" * 64}}))
    assert CliRunner().invoke(ac.cli, ["verify", str(path)]).exit_code == 1


async def test_receipts_stored_before_1_1_stay_as_they_are_and_still_verify(tmp_path) -> None:
    """A 1.0 receipt with the payload and result inside (the published edge vector) read back unchanged."""
    async with harness(tmp_path, SIGNING_AND_ATTESTING) as h:
        job = await h.submit({"prompt": "old"})
        old = {**EDGE_PAYLOAD, "job_id": job["job_id"], "client": "ignored"}
        old_receipt, text = h.coord.signer.seal(old)  # type: ignore[union-attr]
        client_id = (await h.coord.db.read(ac.get_job, job["job_id"]))["client_id"]
        await h.coord.db.write(ac.insert_receipt, old_receipt, client_id, int(T0 * 1000), text)
        served = (await h.client.get(f"/v1/jobs/{job['job_id']}/receipt", headers=CLIENT)).json()
        assert served == old_receipt and served["version"] == "1.0" and "job_payload" in served["metadata"]
        assert (await h.client.post("/v1/receipts/verify", json={"receipt": served})).json()["valid"] is True
        assert independently_valid(served, EDGE_SIGNATURE["key_id"], EDGE_ATTESTATION["key_id"])
        listed = (await h.client.get("/v1/explorer/receipts", params={"job_id": job["job_id"]})).json()["items"]
        assert listed[0]["payload"] == old_receipt


async def test_a_wall_clock_step_during_a_job_is_not_billed(tmp_path) -> None:
    """With no units reported, a receipt bills how long the miner held the job. On the wall clock
    alone, a step during the job billed the step: an hour ahead, 3,600 s at the miner's price; an
    hour back, a negative price that paid the client. Held time is measured on the monotonic clock."""
    wall, mono = FakeClock(), FakeClock(1000.0)
    async with harness(tmp_path, SIGNING, clock=wall, monotonic=mono) as h:
        for step in (3600, -3600):
            job = await h.submit({"step": step}, ttl_seconds=7200)  # (its deadline is wall-clock)
            await h.register(capabilities={"price": 0.5})
            await h.take()
            wall.advance(step)  # the wall clock jumps while the job runs; 2.5 s really pass
            mono.advance(2.5)
            r = await h.result(job["job_id"], {"text": "ok"})
            receipt = r.json()["receipt"]
            assert (receipt["units"], receipt["price"]) == (2.5, 1.25), step
        miners = (await h.client.get("/v1/admin/miners", headers=ADMIN)).json()["items"]
        assert miners[0]["average_job_duration_ms"] == 2500


async def test_a_job_claimed_before_a_restart_bills_no_negative_time(tmp_path) -> None:
    """The process that completes a job did not see its claim: the wall clock's difference is all
    there is, and a step back must not make it negative."""
    wall = FakeClock()
    async with harness(tmp_path, SIGNING, clock=wall) as h:
        job = await h.submit()
        await h.register(capabilities={"price": 0.5})
        await h.take()
    wall.advance(-60)
    async with harness(tmp_path, SIGNING, clock=wall) as h:
        r = await h.result(job["job_id"], {"text": "ok"})
        assert r.status_code == 200 and (r.json()["receipt"]["units"], r.json()["receipt"]["price"]) == (0, 0)
