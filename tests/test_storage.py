"""What a job keeps for good: receipts stored packed and served byte for byte, constraints stored
without their nulls, the upgrade of a schema 4 database, and the pages a kept job costs."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import re
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import aitbc_coord as ac
from conftest import ADMIN, CLIENT, harness
from test_db import normalised_schema
from test_receipts import EDGE_ATTESTATION_SEED, EDGE_PAYLOAD, EDGE_SEED
from test_retention import DAY, complete, get, stored

pytestmark = pytest.mark.anyio
SIGNING_AND_ATTESTING = {"RECEIPT_SIGNING_KEY_HEX": EDGE_SEED, "RECEIPT_ATTESTATION_KEY_HEX": EDGE_ATTESTATION_SEED}


def leaf_hash(data: bytes) -> bytes:
    """RFC 9162 section 2.1.1: SHA-256(0x00 || leaf)."""
    return hashlib.sha256(b"\x00" + data).digest()


@given(st.text(), st.text(max_size=40), st.text(max_size=40))
def test_a_packed_receipt_inflates_to_the_same_text(text: str, receipt_id: str, job_id: str) -> None:
    packed = ac.pack_receipt(text, receipt_id, job_id)
    assert packed[0] == ac.RECEIPT_PACKING
    assert ac.unpack_receipt(packed, receipt_id, job_id) == text


def test_a_damaged_or_unknown_packing_is_a_clear_error() -> None:
    packed = ac.pack_receipt('{"receipt_id":"r","job_id":"j"}', "r", "j")
    for bad, why in ((b"\x09" + packed[1:], "unknown packing 09"), (b"", "unknown packing (empty)"),
                     (None, "unknown packing (empty)"), (packed[:-3], "cut short"),
                     (packed[:1] + b"\xff" * 8, "does not inflate"), (packed + b"GARBAGE", "bytes after its end")):
        with pytest.raises(ac.StoredReceiptError, match=re.escape(why)):
            ac.unpack_receipt(bad, "r", "j")


def test_the_preset_dictionaries_never_change() -> None:
    """Rows were written against them: changing one would turn stored receipts into garbage."""
    assert {n: hashlib.sha256(d).hexdigest()[:16] for n, d in ac.RECEIPT_DICTIONARIES.items()} == {
        1: "c7c3479d54fb24c4"}


async def test_every_read_serves_the_packed_receipt_byte_for_byte(tmp_path: Path) -> None:
    """The receipt route, a job's receipt list, the explorer, the log's entries and leaf hashes, the
    archive: each sees exactly the signed text, while the row holds less than half of it."""
    archive = tmp_path / "archive"
    env = {**SIGNING_AND_ATTESTING, "PAYLOAD_RETENTION_DAYS": "7", "ARCHIVE_DIR": str(archive)}
    async with harness(tmp_path, env) as h:
        ids = await complete(h, 3)
        texts = {}
        for job_id in ids:
            r = await h.client.get(f"/v1/jobs/{job_id}/receipt", headers=CLIENT)
            texts[job_id] = ac.stored_receipt_text(r.json())  # the signed text, rebuilt from what a client holds
            assert r.content == texts[job_id].encode()
            listed = await h.client.get(f"/v1/jobs/{job_id}/receipts", headers=CLIENT)
            assert f'"items":[{texts[job_id]}]'.encode() in listed.content
        rows = stored(h, "SELECT receipt_id, job_id, body FROM receipts ORDER BY seq")
        for receipt_id, job_id, body in rows:
            assert isinstance(body, bytes) and len(body) < len(texts[job_id]) / 2
            assert ac.unpack_receipt(body, receipt_id, job_id) == texts[job_id]
        explorer = await get(h, "/v1/explorer/receipts")
        assert {item["jobId"]: json.dumps(item["payload"], separators=(",", ":")) for item in explorer["items"]} == {
            j: json.dumps(json.loads(t), separators=(",", ":")) for j, t in texts.items()}
        assert {item["status"] for item in explorer["items"]} == {"Attested"}
        leaves = [base64.b64decode(e["leaf"]) for e in (await get(h, "/v1/log/entries", start=0))["items"]]
        assert leaves == [texts[j].encode() for j in ids]
        assert [r[0] for r in stored(h, "SELECT leaf_hash FROM log_leaves ORDER BY leaf_index")] == [
            leaf_hash(leaf) for leaf in leaves]
        h.clock.advance(8 * DAY)
        assert (await h.coord.retain())["archived"] == 3
        lines = gzip.decompress(next(archive.iterdir()).read_bytes()).decode().splitlines()
        assert [f'"receipts":[{texts[j]}]' in line for j, line in zip(ids, lines)] == [True] * 3


async def test_constraints_are_stored_without_nulls_and_shown_with_all_six_keys(tmp_path: Path) -> None:
    async with harness(tmp_path, {"RECEIPT_SIGNING_KEY_HEX": EDGE_SEED}) as h:
        plain = await h.submit({"prompt": "any"})
        picky = await h.submit({"prompt": "eu"}, constraints={"region": "eu", "max_price": 2.5})
        assert stored(h, "SELECT constraints FROM jobs ORDER BY seq") == [("{}",), ('{"region":"eu","max_price":2.5}',)]
        unset = dict.fromkeys(ac.CONSTRAINT_KEYS)
        assert plain["constraints"] == unset and picky["constraints"] == {**unset, "region": "eu", "max_price": 2.5}
        await h.register(capabilities={"price": 1, "region": "eu"})
        for job in (plain, picky):
            assert (await h.take())["constraints"] == job["constraints"]  # what the miner is sent
            receipt = (await h.result(job["job_id"], {"text": "done"})).json()["receipt"]
            assert receipt["metadata"]["job_constraints"] == {k: v for k, v in job["constraints"].items() if v is not None}
        assert (await get(h, f"/v1/jobs/{picky['job_id']}", CLIENT))["constraints"] == picky["constraints"]
        admin = {j["job_id"]: j["constraints"] for j in (await get(h, "/v1/admin/jobs", ADMIN))["items"]}
        assert admin == {plain["job_id"]: plain["constraints"], picky["job_id"]: picky["constraints"]}


def schema_4_database(path: Path) -> tuple[str, str]:
    """A database as schema version 4 left it: text receipt bodies (a 1.0 receipt with its payload and
    result inside and an attested 1.1 one) with their log leaves and the balances its trigger kept,
    jobs with six-key constraints."""
    text = ac.schema_sql()
    conn = sqlite3.connect(path)
    conn.executescript(text[:text.index("-- Version 5:")] + "PRAGMA user_version = 4;")
    full = ac.compact_json(dict.fromkeys(ac.CONSTRAINT_KEYS))
    picky = ac.compact_json({**dict.fromkeys(ac.CONSTRAINT_KEYS), "models": ["llama"], "max_price": 1.5})
    shape = conn.execute("INSERT INTO shapes (constraints) VALUES ('{}') RETURNING shape_id").fetchone()[0]
    conn.execute("INSERT INTO addresses (address, tx_count, balance_micro, last_active) VALUES ('rig', 2, 0, 0)")
    for seq, (job_id, constraints) in enumerate((("j-old", full), ("j-new", picky)), 1):
        conn.execute("INSERT INTO jobs (seq, job_id, client_id, state, constraints, shape_id, requested_at, expires_at,"
                     " assigned_miner_id) VALUES (?, ?, 'alice', 'COMPLETED', ?, ?, 0, 1, 'rig')",
                     (seq, job_id, constraints, shape))
    signer = ac.Signer(ac.SigningKey(bytes.fromhex(EDGE_SEED)), ac.SigningKey(bytes.fromhex(EDGE_ATTESTATION_SEED)))
    old, old_text = signer.seal({**EDGE_PAYLOAD, "job_id": "j-old", "receipt_id": "rcpt-1.0"})
    new, new_text = signer.seal({"version": "1.1", "receipt_id": "f" * 32, "job_id": "j-new", "provider": "rig",
                                 "coordinator_id": "aitbc-coordinator",
                                 "client": "alice", "price": 4.2, "metadata": {"result_sha256": "e" * 64}})
    edge = ac.LogEdge()
    for receipt, body in ((old, old_text), (new, new_text)):
        conn.execute("INSERT INTO receipts (receipt_id, job_id, provider, client_id, issued_at, price, attested, body)"
                     " VALUES (?, ?, 'rig', 'alice', 0, ?, 1, ?)",
                     (receipt["receipt_id"], receipt["job_id"], receipt.get("price"), body))
        ac.append_to_log(conn, edge, receipt["receipt_id"], body.encode())
    conn.commit()
    conn.close()
    return old_text, new_text


@pytest.mark.sqlite_only  # an upgrade of a schema 4 SQLite file
async def test_an_upgrade_from_schema_4_packs_every_receipt_and_serves_the_same_bytes(tmp_path: Path) -> None:
    db, fresh = tmp_path / "coord.db", tmp_path / "fresh.db"
    texts = schema_4_database(db)
    assert ac.migrate(str(db)) == (4, ac.SCHEMA_VERSION)
    assert ac.migrate(str(fresh)) == (0, ac.SCHEMA_VERSION)
    assert normalised_schema(db) == normalised_schema(fresh)
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT r.receipt_id, r.job_id, r.body, l.leaf_hash FROM receipts AS r"
                        " JOIN log_leaves AS l USING (receipt_id) ORDER BY l.leaf_index").fetchall()
    constraints = conn.execute("SELECT constraints FROM jobs ORDER BY seq").fetchall()
    conn.close()
    assert [ac.unpack_receipt(body, rid, jid) for rid, jid, body, _ in rows] == list(texts)
    assert [digest for *_, digest in rows] == [leaf_hash(t.encode()) for t in texts]  # the log is unchanged
    assert all(isinstance(body, bytes) for _, _, body, _ in rows)
    assert constraints == [("{}",), ('{"models":["llama"],"max_price":1.5}',)]
    async with harness(tmp_path, SIGNING_AND_ATTESTING) as h:
        entries = (await get(h, "/v1/log/entries", start=0))["items"]
        assert [base64.b64decode(e["leaf"]) for e in entries] == [t.encode() for t in texts]
        for job_id, text in zip(("j-old", "j-new"), texts):
            listed = (await get(h, "/v1/explorer/receipts", job_id=job_id))["items"]
            assert [item["payload"] for item in listed] == [json.loads(text)]
            verdict = (await h.client.post("/v1/receipts/verify", json={"receipt": json.loads(text)})).json()
            assert verdict["valid"] is True, verdict
        balances = {a["address"]: a["balance"] for a in (await get(h, "/v1/explorer/addresses"))["items"]}
        # what schema 4's trigger credited when the receipts were stored (1.0 + 4.2), kept and not redone
        assert balances == {"alice": "-5.200000", "rig": "5.200000"}
        jobs = {j["job_id"]: j["constraints"] for j in (await get(h, "/v1/admin/jobs", ADMIN))["items"]}
        unset = dict.fromkeys(ac.CONSTRAINT_KEYS)
        assert jobs == {"j-old": unset, "j-new": {**unset, "models": ["llama"], "max_price": 1.5}}


def kept_bytes(db: str) -> int:
    """The bytes stored (dbstat: pages less their free space) in everything a job leaves behind for good:
    its summary, receipt, log leaf and subtree share, and their index entries."""
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT SUM(pgsize - unused) FROM dbstat WHERE name NOT IN ('job_data', 'sqlite_schema')"
                            ).fetchone()[0]
    finally:
        conn.close()


@pytest.mark.sqlite_only  # SQLite pages (dbstat)
async def test_a_job_kept_for_good_stores_less_than_1_kib(tmp_path: Path) -> None:
    """Under the default settings (receipts signed, not attested), once payloads are pruned: the bytes
    200 jobs add, per job. tests/bench.py's kept_bytes_per_job measures the pages at scale (~930)."""
    async with harness(tmp_path, {"RECEIPT_SIGNING_KEY_HEX": EDGE_SEED, "PAYLOAD_RETENTION_DAYS": "1"}) as h:
        await complete(h, 50, "warm")
        h.clock.advance(2 * DAY)
        await h.coord.retain()
        before = kept_bytes(h.coord.settings.db_path)
        await complete(h, 200, "kept")
        h.clock.advance(2 * DAY)
        assert (await h.coord.retain())["pruned"] == 200
        per_job = (kept_bytes(h.coord.settings.db_path) - before) / 200
        receipts = stored(h, "SELECT receipt_id, job_id, body FROM receipts")
    text = sum(len(ac.unpack_receipt(body, rid, jid)) for rid, jid, body in receipts)
    packed = sum(len(body) for _, _, body in receipts)
    assert packed < 0.45 * text  # a 1.1 receipt: ~740 bytes of JSON text, ~300 stored
    assert per_job <= 1024, per_job  # ~910 (~1,500 with the receipt stored as text)
