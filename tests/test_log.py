"""The receipt log (issue 17): every receipt a leaf of an RFC 9162 Merkle tree, signed C2SP checkpoints,
inclusion and consistency proofs, entries, and the client side (verify --log, audit).

Proofs are checked by tests/rfc9162.py, an independent verifier written from the RFC that shares no
code with the module: every leaf and every pair of sizes of trees up to 200 leaves, and random ones
up to 100,000 (hypothesis). Storage reads per proof are counted (rows, through bench.CountingConnection).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import json
import math
import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

import aitbc_coord as ac
import rfc9162 as rfc
from bench import CountingConnection
from conftest import CLIENT, NO_RECEIPTS, T0, FakeClock, Harness, database_of, harness, open_database
from test_receipts import EDGE_SEED, SIGNING, complete_one

pytestmark = pytest.mark.anyio
SMALL = 200  # every leaf and every pair of sizes up to this
LARGE = 100_000  # random ones up to this


def entry(i: int) -> bytes:
    """The i-th leaf of the synthetic logs: receipt-like bytes."""
    return json.dumps({"receipt_id": f"{i:032x}", "units": i}).encode()


def build(db: Path, n: int) -> rfc.Tree:
    """A log of `n` synthetic leaves appended through the module's data layer, with a checkpoint of all
    of them (proofs are served up to the latest checkpoint); the independent tree of the same entries."""
    ac.migrate(str(db))
    conn = ac.connect(str(db), "OFF")
    edge = ac.LogEdge()
    conn.execute("BEGIN")
    for i in range(n):
        assert ac.append_to_log(conn, edge, f"{i:032x}", entry(i)) == i
    ac.tx_checkpoint(conn, ac.Notary(SigningKey(bytes.fromhex(EDGE_SEED)), "test/log"), int(T0 * 1000), 0)
    conn.execute("COMMIT")
    conn.close()
    return rfc.Tree(entry(i) for i in range(n))


def hashes(items: list[str]) -> list[bytes]:
    return [base64.b64decode(h) for h in items]


def reads_bound(n: int) -> int:
    """The most rows an inclusion proof may read: the leaf, the checkpoint, and two per level."""
    return 2 + 2 * max(1, math.ceil(math.log2(n)))


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[sqlite3.Connection, rfc.Tree]]:
    db = tmp_path_factory.mktemp("large") / "log.db"
    tree = build(db, LARGE)
    conn = ac.connect(str(db), "OFF", readonly=True)
    yield conn, tree
    conn.close()


# --- the tree and its proofs, against the independent verifier ---

@pytest.mark.sqlite_only  # the tree in a SQLite file (the log's SQL on PostgreSQL: the harness tests)
def test_every_leaf_and_every_pair_of_sizes_up_to_200(tmp_path: Path) -> None:
    tree = build(tmp_path / "log.db", SMALL)
    conn = ac.connect(str(tmp_path / "log.db"), "OFF", readonly=True)
    assert tree.root(0) == ac.EMPTY_ROOT == ac.log_root(conn, 0)
    for n in range(1, SMALL + 1):
        root = tree.root(n)
        assert ac.log_root(conn, n) == root, n
        for i in range(n):
            counting = CountingConnection(conn)
            proof = ac.read_inclusion_proof(counting, f"{i:032x}", n)
            assert (proof["leaf_index"], proof["tree_size"]) == (i, n)
            assert base64.b64decode(proof["leaf_hash"]) == tree.levels[0][i]
            assert rfc.verify_inclusion(tree.levels[0][i], i, n, hashes(proof["audit_path"]), root), (i, n)
            assert counting.rows <= reads_bound(n), (i, n, counting.rows)
        assert ac.read_consistency_proof(conn, 0, n)["consistency_path"] == []  # the empty tree precedes all
        for m in range(1, n + 1):
            proof = ac.read_consistency_proof(conn, m, n)
            assert rfc.verify_consistency(m, n, tree.root(m), root, hashes(proof["consistency_path"])), (m, n)
    conn.close()


@pytest.mark.sqlite_only  # the tree in a SQLite file (the log's SQL on PostgreSQL: the harness tests)
def test_a_proof_proves_nothing_else(tmp_path: Path) -> None:
    tree = build(tmp_path / "log.db", 37)
    conn = ac.connect(str(tmp_path / "log.db"), "OFF", readonly=True)
    root = tree.root(37)
    path = hashes(ac.read_inclusion_proof(conn, f"{5:032x}", 37)["audit_path"])
    assert rfc.verify_inclusion(tree.levels[0][5], 5, 37, path, root)
    assert not rfc.verify_inclusion(tree.levels[0][6], 5, 37, path, root)  # another leaf
    assert not rfc.verify_inclusion(tree.levels[0][5], 4, 37, path, root)  # another index
    assert not rfc.verify_inclusion(rfc.hash_leaf(entry(5) + b" "), 5, 37, path, root)  # altered bytes
    assert not rfc.verify_inclusion(tree.levels[0][5], 5, 37, path[:-1], root)
    path = hashes(ac.read_consistency_proof(conn, 13, 37)["consistency_path"])
    assert rfc.verify_consistency(13, 37, tree.root(13), root, path)
    assert not rfc.verify_consistency(13, 37, tree.root(12), root, path)
    assert not rfc.verify_consistency(13, 37, tree.root(13), tree.root(36), path)
    # and the module's own checks (verify --log, audit) agree with the independent ones
    assert ac.verify_consistency(13, 37, tree.root(13), root, path)
    assert not ac.verify_consistency(13, 37, tree.root(13), tree.root(36), path)
    conn.close()


@given(data=st.data())
@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_random_leaves_and_pairs_up_to_100000(large: tuple[sqlite3.Connection, rfc.Tree], data: st.DataObject) -> None:
    conn, tree = large
    n = data.draw(st.integers(1, LARGE), "tree size")
    m = data.draw(st.integers(1, n), "first")
    i = data.draw(st.integers(0, n - 1), "leaf")
    counting = CountingConnection(conn)
    proof = ac.read_inclusion_proof(counting, f"{i:032x}", n)
    assert rfc.verify_inclusion(tree.levels[0][i], i, n, hashes(proof["audit_path"]), tree.root(n))
    assert counting.rows <= reads_bound(n)
    proof = ac.read_consistency_proof(conn, m, n)
    assert rfc.verify_consistency(m, n, tree.root(m), tree.root(n), hashes(proof["consistency_path"]))


@pytest.mark.sqlite_only  # SQLite VM steps
def test_appending_reads_nothing_while_its_edge_is_current(tmp_path: Path) -> None:
    """A leaf costs its own row and the subtrees it completes (O(log n) hashing, no full-tree work);
    after a rolled-back append, the next one reads the frontier once and hashes right."""
    db = tmp_path / "log.db"
    ac.migrate(str(db))
    conn = ac.connect(str(db), "OFF")
    edge = ac.LogEdge()
    conn.execute("BEGIN")
    for i in range(1000):
        ac.append_to_log(conn, edge, f"{i:032x}", entry(i))
    counting = CountingConnection(conn)
    for i in range(1000, 1024):
        ac.append_to_log(counting, edge, f"{i:032x}", entry(i))  # type: ignore[arg-type]
    assert counting.rows == 0
    conn.execute("SAVEPOINT unit")
    ac.append_to_log(conn, edge, "rolled back", b"never")
    conn.execute("ROLLBACK TO unit")
    conn.execute("RELEASE unit")
    for i in range(1024, 1100):
        ac.append_to_log(conn, edge, f"{i:032x}", entry(i))
    tree = rfc.Tree(entry(i) for i in range(1100))
    assert ac.log_root(conn, 1100) == tree.root(1100) and ac.get_log_size(conn) == 1100
    nodes = conn.execute("SELECT COUNT(*) FROM log_nodes").fetchone()[0]
    assert nodes == 1100 - bin(1100).count("1")  # every complete subtree above the leaves, once
    conn.execute("COMMIT")
    conn.close()


# --- the coordinator's log: leaves, checkpoints and routes ---

async def served(h: Harness, job_id: str) -> bytes:
    """The receipt's bytes as GET /v1/jobs/{id}/receipt serves them: the leaf."""
    r = await h.client.get(f"/v1/jobs/{job_id}/receipt", headers=CLIENT)
    assert r.status_code == 200
    return r.content


async def checkpoint_now(h: Harness) -> dict[str, Any]:
    """Let the checkpoint interval pass and publish one; the latest checkpoint."""
    h.clock.advance(h.coord.settings.log_checkpoint_seconds)
    await h.coord.checkpoint()
    return (await h.client.get("/v1/log/checkpoint")).json()


def log_key(seed: str = EDGE_SEED) -> tuple[bytes, SigningKey]:
    key = SigningKey(bytes.fromhex(seed))
    return bytes(key.verify_key), key


async def test_every_receipt_is_a_leaf_under_a_signed_checkpoint(tmp_path: Path) -> None:
    async with harness(tmp_path, SIGNING) as h:
        start = (await h.client.get("/v1/log/checkpoint")).json()  # published at start, of the empty log
        assert start["tree_size"] == 0 and base64.b64decode(start["root_hash"]) == rfc.sha256(b"")
        receipts = [await complete_one(h) for _ in range(5)]
        leaves = [await served(h, r["job_id"]) for r in receipts]
        assert [json.loads(leaf) for leaf in leaves] == receipts
        cp = await checkpoint_now(h)
        public, _ = log_key()
        origin = cp["origin"]
        assert origin == f"aitbc-coordinator/receipt-log/{hashlib.sha256(public).hexdigest()[:16]}"
        text = rfc.open_signed_note(cp["note"], origin, public)
        assert cp["note"].endswith("\n") and "\n\n\u2014 " + origin + " " in cp["note"]
        name, size, root, extensions = rfc.parse_checkpoint(text)
        assert (name, size, root) == (origin, 5, rfc.Tree(leaves).root(5))
        assert extensions == [f"timestamp {int(h.clock() * 1000)}"] and cp["timestamp"].endswith("Z")
        assert (cp["tree_size"], base64.b64decode(cp["root_hash"])) == (size, root)
        with pytest.raises(ValueError):
            rfc.open_signed_note(cp["note"].replace("\n5\n", "\n6\n"), origin, public)
        for i, receipt in enumerate(receipts):
            r = await h.client.get(f"/v1/jobs/{receipt['job_id']}/receipt", headers=CLIENT)
            assert r.headers["receipt-log-index"] == str(i)
            proof = (await h.client.get("/v1/log/proof/inclusion", params={"receipt_id": receipt["receipt_id"]})).json()
            assert (proof["leaf_index"], proof["tree_size"], proof["checkpoint"]) == (i, 5, cp)
            assert rfc.verify_inclusion(rfc.hash_leaf(leaves[i]), i, 5, hashes(proof["audit_path"]), root)
        items = (await h.client.get("/v1/explorer/receipts")).json()["items"]
        assert [(item["receiptId"], item["logIndex"]) for item in items] == \
            [(r["receipt_id"], i) for i, r in reversed(list(enumerate(receipts)))]
        keys = [k for k in (await h.client.get("/v1/receipts/keys")).json()["items"] if k["role"] == "log"]
        hash4 = rfc.sha256(origin.encode() + b"\n\x01" + public)[:4].hex()
        typed_key = base64.b64encode(b"\x01" + public).decode()
        assert keys == [{"key_id": ac.b64url(public), "alg": "Ed25519", "role": "log", "status": "active",
                         "origin": origin, "verifier_key": f"{origin}+{hash4}+{typed_key}"}]


async def test_a_receipt_not_yet_under_a_checkpoint_is_425_with_retry_after(tmp_path: Path) -> None:
    async with harness(tmp_path, {**SIGNING, "RECEIPT_LOG_CHECKPOINT_SECONDS": "5"}) as h:
        receipt = await complete_one(h)
        r = await h.client.get("/v1/log/proof/inclusion", params={"receipt_id": receipt["receipt_id"]})
        assert (r.status_code, r.json()["detail"]) == (425, "receipt not yet under a checkpoint")
        assert 1 <= int(r.headers["retry-after"]) <= 5
        assert not await h.coord.checkpoint()  # 2.5 s after the one at start: at most every 5 s
        assert (await h.client.get("/v1/log/proof/inclusion", params={"receipt_id": receipt["receipt_id"]})).status_code == 425
        h.clock.advance(2.5)
        assert await h.coord.checkpoint()
        h.clock.advance(5)
        assert not await h.coord.checkpoint()  # the log has not grown
        assert (await h.client.get("/v1/log/proof/inclusion", params={"receipt_id": receipt["receipt_id"]})).status_code == 200
        assert [c["tree_size"] for c in (await h.client.get("/v1/log/checkpoints")).json()["items"]] == [1, 0]


async def test_inclusion_after_a_restart_and_without_a_key_is_never_a_500(tmp_path: Path) -> None:
    """Break report 17 #1: a server restarted on a log its last run had checkpointed (no checkpoint made
    by this process yet), or one without a log key, answered every inclusion request 500."""
    async with harness(tmp_path, SIGNING) as h:
        covered = await complete_one(h)
        await checkpoint_now(h)
        pending = await complete_one(h)  # logged, but this run ends before a checkpoint covers it
    async with harness(tmp_path, {**SIGNING, "RECEIPT_LOG_CHECKPOINT_SECONDS": "30"}) as h:
        get = h.client.get
        assert (await get("/v1/log/proof/inclusion", params={"receipt_id": "nope"})).status_code == 404
        assert (await get("/v1/log/proof/inclusion", params={"receipt_id": covered["receipt_id"]})).status_code == 200
        late = await complete_one(h)  # the start-up checkpoint covered `pending`; this one waits for the next
        assert (await get("/v1/log/proof/inclusion", params={"receipt_id": pending["receipt_id"]})).status_code == 200
        r = await get("/v1/log/proof/inclusion", params={"receipt_id": late["receipt_id"]})
        assert (r.status_code, r.headers["retry-after"]) == (425, "28")  # complete_one took 2.5 s of the 30
        h.clock.advance(30)
        assert await h.coord.checkpoint()
    async with harness(tmp_path, {**SIGNING}) as h:  # restarted once the log is covered: no checkpoint at start
        assert not await h.coord.checkpoint() and h.coord.checkpoint_due == -math.inf
        r = await h.client.get("/v1/log/proof/inclusion", params={"receipt_id": "nope"})
        assert (r.status_code, r.json()) == (404, {"detail": "receipt not in the log"})
        assert (await h.client.get("/v1/log/proof/inclusion", params={"receipt_id": late["receipt_id"]})).status_code == 200
        newest = await complete_one(h)
        r = await h.client.get("/v1/log/proof/inclusion", params={"receipt_id": newest["receipt_id"]})
        assert (r.status_code, r.headers["retry-after"]) == (425, "1")  # the next tick may checkpoint it
    async with harness(tmp_path, NO_RECEIPTS) as h:  # no key: no checkpoint will ever cover `newest`
        assert h.coord.notary is None
        r = await h.client.get("/v1/log/proof/inclusion", params={"receipt_id": "nope"})
        assert r.status_code == 404
        assert (await h.client.get("/v1/log/proof/inclusion", params={"receipt_id": covered["receipt_id"]})).status_code == 200
        r = await h.client.get("/v1/log/proof/inclusion", params={"receipt_id": newest["receipt_id"]})
        assert r.status_code == 503 and "no log signing key" in r.json()["detail"] and "retry-after" not in r.headers
    prod = {"APP_ENV": "prod", "CLIENT_API_KEYS": "c", "MINER_API_KEYS": "m", "ADMIN_API_KEYS": "a"}
    (tmp_path / "fresh").mkdir()
    async with harness(tmp_path / "fresh", prod) as h:  # outside dev without a key: an empty log, no checkpoint
        r = await h.client.get("/v1/log/proof/inclusion", params={"receipt_id": "nope"})
        assert (r.status_code, r.json()) == (404, {"detail": "receipt not in the log"})


async def test_errors_of_the_proof_routes(tmp_path: Path) -> None:
    async with harness(tmp_path, SIGNING) as h:
        receipts = [await complete_one(h) for _ in range(3)]
        await checkpoint_now(h)
        rid = receipts[2]["receipt_id"]

        async def get(path: str, **params: Any) -> tuple[int, Any]:
            r = await h.client.get(path, params=params)
            return r.status_code, r.json()

        assert await get("/v1/log/proof/inclusion", receipt_id="0" * 32) == (404, {"detail": "receipt not in the log"})
        status, body = await get("/v1/log/proof/inclusion", receipt_id=rid, tree_size=2)
        assert status == 422 and body["detail"][0]["loc"] == ["query", "tree_size"]
        assert (await get("/v1/log/proof/inclusion", receipt_id=rid, tree_size=4))[0] == 404
        status, body = await get("/v1/log/proof/inclusion", receipt_id=receipts[0]["receipt_id"], tree_size=2)
        assert status == 200 and body["checkpoint"] is None  # a size no checkpoint was made of: still proven
        status, body = await get("/v1/log/proof/consistency", first=3, second=2)
        assert status == 422 and body["detail"][0]["loc"] == ["query", "first"]
        assert (await get("/v1/log/proof/consistency", first=1, second=4))[0] == 404
        assert await get("/v1/log/proof/consistency", first=3, second=3) == (200, {"first": 3, "second": 3,
                                                                                  "consistency_path": []})
        status, body = await get("/v1/log/entries", start=2, end=1)
        assert status == 422 and body["detail"][0]["loc"] == ["query", "end"]
        for params in ({"first": "x", "second": 1}, {"first": -1, "second": 1}, {"second": 1}):
            assert (await get("/v1/log/proof/consistency", **params))[0] == 422


def damage(db: str, *statements: str) -> None:
    """Change the log's rows behind the coordinator's back, as whoever holds the database could."""
    conn = open_database(db)
    for sql in statements:
        conn.execute(sql)
    conn.close()


def damage_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("the receipt log is damaged")]


async def test_a_log_missing_a_subtree_refuses_completions_clearly_and_says_so_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Break report 17 #8: a missing node made completions 500 (KeyError in append_to_log)."""
    async with harness(tmp_path, SIGNING) as h:
        receipts = [await complete_one(h) for _ in range(3)]
        await checkpoint_now(h)
    damage(database_of(tmp_path), f"DELETE FROM log_nodes WHERE node_id = {ac._node_id(1, 0)}")
    async with harness(tmp_path, SIGNING) as h:  # a new process: its first append reads the frontier
        job = await h.submit()
        await h.register()
        await h.take()
        for _ in range(2):  # the miner retries: refused alike, logged once
            r = await h.result(job["job_id"])
            assert (r.status_code, r.headers.get("retry-after")) == (503, "60"), (r.text, r.headers)
            assert r.json()["detail"] == ("the receipt log is damaged: subtree (1, 0) (level, index) is missing: rows "
                                          "were deleted; an operator must repair it (see the service log)")
            assert (await h.job(job["job_id"]))["state"] == "RUNNING"  # not completed without its receipt
        r = await h.client.get("/v1/log/proof/inclusion", params={"receipt_id": receipts[2]["receipt_id"]})
        assert r.status_code == 503 and r.json()["detail"].startswith("the receipt log is damaged: subtree (1, 0)")
        r = await h.client.get("/v1/log/proof/consistency", params={"first": 2, "second": 3})
        assert r.status_code == 200  # its path is leaf 2 alone: a proof that needs no missing row still works
        assert (await h.client.get("/v1/log/proof/inclusion", params={"receipt_id": receipts[0]["receipt_id"]})).status_code == 200
        assert (await h.client.get("/v1/log/checkpoint")).status_code == 200
    assert len(damage_logged(caplog)) == 1, damage_logged(caplog)
    assert not [r for r in caplog.records if r.levelname == "ERROR" and not r.getMessage().startswith("the receipt log")]


async def test_leaves_rolled_back_under_their_subtrees_or_checkpoint_refuse_completions_clearly(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Break report 17 #8: leaves removed but not the subtrees they made (a partial rollback) gave
    'UNIQUE constraint failed: log_nodes.node_id' as a 503 'database unavailable' on every completion."""
    async with harness(tmp_path, SIGNING) as h:
        for _ in range(4):
            await complete_one(h)
        await checkpoint_now(h)
        damage(database_of(tmp_path), "DELETE FROM log_leaves WHERE leaf_index >= 2")
        job = await h.submit()
        await h.register()
        await h.take()
        r = await h.result(job["job_id"])
        assert r.status_code == 503 and r.json()["detail"].startswith(
            "the receipt log is damaged: it has 2 leaves, fewer than its checkpoint of 4: leaves were removed"), r.text
        h.clock.advance(1)
        with pytest.raises(ac.LogDamaged, match="fewer than its checkpoint of 4"):  # the checkpoint duty sees it too
            await h.coord.checkpoint()
        damage(database_of(tmp_path), "DELETE FROM log_checkpoints WHERE tree_size > 2")  # the checkpoints too
        assert (await h.result(job["job_id"])).status_code == 200  # leaf 2 completes no subtree
        job = await h.submit()
        await h.take()
        r = await h.result(job["job_id"])  # leaf 3 would complete (1, 1) and (2, 0): both still stored
        assert r.status_code == 503 and r.json()["detail"].startswith(
            "the receipt log is damaged: leaf 3 completes subtrees that are stored already"), r.text
    assert len(damage_logged(caplog)) == 1, damage_logged(caplog)
    async with harness(tmp_path, SIGNING) as h:  # its start-up checkpoint covers the 3 leaves there are
        assert (await h.client.get("/v1/log/checkpoint")).json()["tree_size"] == 3
    damage(database_of(tmp_path), "DELETE FROM log_leaves WHERE leaf_index >= 1")  # under the checkpoint of 3
    async with harness(tmp_path, SIGNING) as h:  # a damaged log at start: it starts, says so, refuses appends
        assert h.coord.log_damage == "it has 1 leaves, fewer than its checkpoint of 3: leaves were removed"
        assert (await h.client.get("/v1/log/checkpoint")).json()["tree_size"] == 3
        await h.submit()
        await h.register()
        taken = await h.take()
        assert (await h.result(taken["job_id"])).status_code == 503
    assert len(damage_logged(caplog)) == 2, damage_logged(caplog)  # once for each of the two processes
    assert not any("UNIQUE constraint" in r.getMessage() or "database error" in r.getMessage() for r in caplog.records)


async def test_entries_replay_the_tree_and_a_pruned_receipt_keeps_its_leaf_hash(tmp_path: Path) -> None:
    async with harness(tmp_path, SIGNING) as h:
        receipts = [await complete_one(h) for _ in range(7)]
        leaves = [await served(h, r["job_id"]) for r in receipts]
        await checkpoint_now(h)
        got = (await h.client.get("/v1/log/entries", params={"start": 2, "end": 4})).json()["items"]
        assert [(e["leaf_index"], base64.b64decode(e["leaf"])) for e in got] == [(i, leaves[i]) for i in (2, 3, 4)]
        assert all(base64.b64decode(e["leaf_hash"]) == rfc.hash_leaf(leaves[e["leaf_index"]]) for e in got)
        assert [e["leaf_index"] for e in (await h.client.get("/v1/log/entries", params={"start": 5})).json()["items"]] \
            == [5, 6]
        assert (await h.client.get("/v1/log/entries", params={"start": 7})).json() == {"items": []}
        # pruning a receipt's body (as RECEIPT_RETENTION_DAYS will) leaves its leaf hash: proofs still work
        with contextlib.closing(open_database(database_of(tmp_path))) as conn:
            conn.execute("DELETE FROM receipts WHERE receipt_id = ?", (receipts[3]["receipt_id"],))
        got = (await h.client.get("/v1/log/entries", params={"start": 3, "end": 3})).json()["items"]
        assert got == [{"leaf_index": 3, "leaf_hash": base64.b64encode(rfc.hash_leaf(leaves[3])).decode(), "leaf": None}]
        proof = (await h.client.get("/v1/log/proof/inclusion", params={"receipt_id": receipts[3]["receipt_id"]})).json()
        assert rfc.verify_inclusion(rfc.hash_leaf(leaves[3]), 3, 7, hashes(proof["audit_path"]), rfc.Tree(leaves).root(7))


async def test_entries_come_in_pages(tmp_path: Path) -> None:
    async with harness(tmp_path, SIGNING) as h:
        db = open_database(database_of(tmp_path))
        edge = ac.LogEdge()
        db.execute("BEGIN")
        for i in range(ac.LOG_ENTRIES_MAX + 5):
            ac.append_to_log(db, edge, f"{i:032x}", entry(i))
        db.execute("COMMIT")
        db.close()
        got = (await h.client.get("/v1/log/entries", params={"start": 0, "end": 10**6})).json()["items"]
        assert [e["leaf_index"] for e in got] == list(range(ac.LOG_ENTRIES_MAX))
        assert all(e["leaf"] is None for e in got)  # leaves without a receipt row, as once pruned


async def test_checkpoint_history_pages_and_thins_to_one_an_hour(tmp_path: Path) -> None:
    async with harness(tmp_path, {**SIGNING, "RECEIPT_LOG_CHECKPOINT_SECONDS": "600"}) as h:
        start = h.clock()
        made = []
        db = open_database(database_of(tmp_path))
        edge = ac.LogEdge()
        for i in range(6 * 30):  # every 10 minutes for 30 hours, each after a new leaf
            db.execute("BEGIN")
            ac.append_to_log(db, edge, f"{i:032x}", entry(i))
            db.execute("COMMIT")
            h.clock.advance(600)
            assert await h.coord.checkpoint()
            made.append((h.clock(), (await h.client.get("/v1/log/checkpoint")).json()["tree_size"]))
        db.close()
        sizes, cursor = [], None
        while True:
            page = (await h.client.get("/v1/log/checkpoints", params={"limit": 50, **({"cursor": cursor} if cursor else {})})).json()
            sizes += [c["tree_size"] for c in page["items"]]
            if (cursor := page["next_cursor"]) is None:
                break
        now = h.clock()
        last_of_hour: dict[int, int] = {}
        for t, size in [(start, 0), *made]:
            last_of_hour[int(t * 1000) // 3_600_000] = size
        kept = {size for t, size in [(start, 0), *made] if (now - t) * 1000 < 86_400_000 + 600_000}
        assert set(sizes) >= {size for t, size in made if (now - t) * 1000 < 86_400_000}  # the last day: all
        assert set(sizes) <= kept | set(last_of_hour.values())  # before: the last of each hour
        assert set(last_of_hour.values()) <= set(sizes)
        assert sizes == sorted(sizes, reverse=True) and len(sizes) < len(made)
        r = await h.client.get("/v1/log/checkpoints", params={"cursor": ac.make_cursor("jobs", 5)})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["query", "cursor"]


# --- keys and start-up ---

@pytest.mark.sqlite_only  # the key is a file beside the SQLite file; on PostgreSQL it lives in memory
async def test_dev_makes_a_signing_key_beside_the_database_and_keeps_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with harness(tmp_path) as h:  # APP_ENV=dev, no key configured
        first = await complete_one(h)
        cp = await checkpoint_now(h)
    key_file = tmp_path / "coord.db.dev-signing-key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert any("development key made now" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    gitignore = (Path(__file__).parent.parent / ".gitignore").read_text().split()
    assert any(Path(key_file.name).match(pattern) for pattern in gitignore)
    async with harness(tmp_path) as h:  # reused: the same key signs, the log goes on
        second = await complete_one(h)
        assert second["signature"]["key_id"] == first["signature"]["key_id"]
        assert (await checkpoint_now(h))["origin"] == cp["origin"]
        assert ac.verify_receipt(second, {first["signature"]["key_id"]})["valid"]
    assert any("development key kept in" in r.getMessage() for r in caplog.records)


async def test_on_postgresql_the_dev_key_warning_says_each_start_makes_a_new_one(
        pg_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A newcomer's two starts left two retired signing and log keys behind: the warning only said
    "made now in memory"."""
    async with harness(tmp_path, db_path=pg_url):  # APP_ENV=dev, no key configured
        pass
    warned = [r.getMessage() for r in caplog.records if "development key made now in memory" in r.getMessage()]
    assert len(warned) == 1 and warned[0].endswith(
        "; on PostgreSQL a new one at every start, and the receipt log keeps the first one's name: give every"
        " instance one key from the start (aitbc-coord keygen --out FILE, RECEIPT_SIGNING_KEY_FILE=FILE)")


def spoil(path: Path, how: str) -> None:
    """Leave at `path` a development key file as the break report found them."""
    if how == "directory":
        path.mkdir()
    elif how == "symlink to /dev/null":
        path.symlink_to("/dev/null")
    else:
        path.write_bytes({"empty": b"", "corrupt": b"not a key\n", "binary": b"\xff\xfe\x00" * 30,
                          "loose": (SigningKey.generate().encode().hex() + "\n").encode()}[how])
        path.chmod(0o644 if how == "loose" else 0o600)


@pytest.mark.parametrize(("how", "why"), [
    ("empty", "must be 64 hex characters"), ("corrupt", "must be 64 hex characters"), ("binary", "cannot read"),
    ("loose", "is readable or writable by group or others; chmod 600 it"), ("directory", "is not a regular file"),
    ("symlink to /dev/null", "is not a regular file"),
])
@pytest.mark.sqlite_only  # a key file beside the SQLite file
def test_a_development_key_file_that_cannot_be_used_says_why_and_how_to_start_afresh(tmp_path: Path, how: str,
                                                                                   why: str) -> None:
    """Break report 17 #7: these made uvicorn exit 3 ("Application startup failed"); a directory or
    /dev/null was blamed on its mode."""
    path = tmp_path / "coord.db.dev-signing-key"
    spoil(path, how)
    with pytest.raises(ac.ConfigError) as refused:
        ac.load_dev_seed(str(tmp_path / "coord.db"))
    assert why in str(refused.value) and str(refused.value).endswith(f"; deleting {path} makes a new development key")
    path.rmdir() if how == "directory" else path.unlink()
    seed, kept, made = ac.load_dev_seed(str(tmp_path / "coord.db"))  # deleted: a new one
    assert made and kept == path and ac.load_dev_seed(str(tmp_path / "coord.db")) == (seed, path, False)


@pytest.mark.sqlite_only  # a key file beside the SQLite file
def test_the_development_key_is_made_whole_or_not_at_all_and_a_racing_start_uses_the_winner(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Break report 17 #7: the key file was created (O_EXCL) and then written, so a concurrent start read
    it empty (3 of 30 races of 4 processes failed) and a crash between left an empty file for good."""
    db, path = str(tmp_path / "coord.db"), tmp_path / "coord.db.dev-signing-key"
    real_fsync = os.fsync

    def crash(fd: int) -> None:
        raise OSError(errno.EIO, "crash before the key was on disk")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(ac.ConfigError, match="cannot write the development signing key"):
        ac.load_dev_seed(db)
    assert list(tmp_path.iterdir()) == []  # no key file, empty or partial, and no temporary one
    monkeypatch.setattr(os, "fsync", real_fsync)
    winner = SigningKey.generate().encode()
    real_link = os.link

    def another_start_links_first(src: str, dst: str) -> None:  # the other start's whole file lands first
        monkeypatch.setattr(os, "link", real_link)
        ac.write_file_atomically(dst, winner.hex() + "\n", replace=False)
        real_link(src, dst)

    monkeypatch.setattr(os, "link", another_start_links_first)
    assert ac.load_dev_seed(db) == (winner, path, False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


async def test_outside_dev_no_key_means_no_receipts_and_no_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    keys = {"APP_ENV": "prod", "CLIENT_API_KEYS": ac.DEV_KEYS["client"], "MINER_API_KEYS": ac.DEV_KEYS["miner"],
            "ADMIN_API_KEYS": ac.DEV_KEYS["admin"]}
    async with harness(tmp_path, keys) as h:
        job = await h.submit()
        await h.register()
        await h.take()
        assert (await h.result(job["job_id"])).json()["receipt"] is None
        assert (await h.client.get("/v1/log/checkpoint")).status_code == 404
    assert not list(tmp_path.glob("*.dev-signing-key"))
    warnings = [r.getMessage() for r in caplog.records if "completed jobs get no receipts" in r.getMessage()]
    assert len(warnings) == 1


async def test_a_separate_log_key_and_origin(tmp_path: Path) -> None:
    log_seed = SigningKey.generate().encode().hex()
    env = {**SIGNING, "RECEIPT_LOG_SIGNING_KEY_HEX": log_seed, "RECEIPT_LOG_ORIGIN": "coord.example.org/receipts"}
    async with harness(tmp_path, env) as h:
        await complete_one(h)
        cp = await checkpoint_now(h)
        public, _ = log_key(log_seed)
        assert rfc.parse_checkpoint(rfc.open_signed_note(cp["note"], "coord.example.org/receipts", public))[1] == 1
        roles = {(k["key_id"], k["role"]) for k in (await h.client.get("/v1/receipts/keys")).json()["items"]}
        assert roles == {(ac.b64url(log_key()[0]), "signing"), (ac.b64url(public), "log")}
    for bad in ("has space", "a+b", "x" * 256, "caf\u00e9"):
        with pytest.raises(ac.ConfigError, match="RECEIPT_LOG_ORIGIN"):
            ac.Settings.load({"RECEIPT_LOG_ORIGIN": bad})


async def test_a_log_keeps_its_origin_a_new_one_configured_refuses_to_start(tmp_path: Path) -> None:
    """Break report 17 #5: setting RECEIPT_LOG_ORIGIN on a log with checkpoints silently renamed it (and
    the key's listed origin with it): every auditor failed from then on."""
    async with harness(tmp_path, SIGNING) as h:
        await complete_one(h)
        origin = (await checkpoint_now(h))["origin"]
    settings = ac.Settings.load({"APP_ENV": "dev", **SIGNING, "RECEIPT_LOG_ORIGIN": "coord.example.org/renamed"},
                                db_path=database_of(tmp_path), sweep_interval_seconds=0)
    app = ac.App(settings)
    with pytest.raises(ac.ConfigError) as refused:
        async with app.lifespan():
            pass
    assert str(refused.value) == (f"RECEIPT_LOG_ORIGIN: the receipt log's checkpoints carry the origin {origin}, "
                                  f"not coord.example.org/renamed; a log keeps its origin for life: set "
                                  f"RECEIPT_LOG_ORIGIN={origin} or unset it")
    assert not app.coord.db.open  # what start() opened, it closed
    for env in (SIGNING, {**SIGNING, "RECEIPT_LOG_ORIGIN": origin}):  # unset, or the same: the log goes on
        async with harness(tmp_path, env) as h:
            await complete_one(h)
            cp = await checkpoint_now(h)
            assert cp["origin"] == origin
            keys = (await h.client.get("/v1/receipts/keys")).json()["items"]
            assert [(k["origin"], k["status"]) for k in keys if k["role"] == "log"] == [(origin, "active")]


@pytest.mark.sqlite_only  # an upgrade of a SQLite file
def test_an_upgrade_appends_the_receipts_issued_before_it_once_in_issue_order(tmp_path: Path) -> None:
    db = tmp_path / "v2.db"
    text = ac.schema_sql()
    conn = sqlite3.connect(db)
    conn.executescript(text[:text.index("-- Version 3:")] + "PRAGMA user_version = 2;")
    bodies = [json.dumps({"receipt_id": f"{i:032x}", "n": i}, separators=(",", ":")) for i in range(11)]
    order = [3, 0, 7, 1, 10, 2, 9, 4, 8, 5, 6]  # issue order (seq) differs from the ids' order
    for seq, i in enumerate(order, 1):
        conn.execute("INSERT INTO receipts (seq, receipt_id, job_id, provider, client_id, issued_at, attested, body)"
                     " VALUES (?, ?, 'j', 'p', 'c', 0, 0, ?)", (seq, f"{i:032x}", bodies[i]))
    conn.commit()
    conn.close()
    assert ac.migrate(str(db)) == (2, ac.SCHEMA_VERSION)
    assert ac.migrate(str(db)) == (ac.SCHEMA_VERSION, ac.SCHEMA_VERSION)  # once
    conn = ac.connect(str(db))
    rows = conn.execute("SELECT leaf_index, receipt_id, leaf_hash FROM log_leaves ORDER BY leaf_index").fetchall()
    assert [(r[0], r[1]) for r in rows] == [(n, f"{i:032x}") for n, i in enumerate(order)]
    tree = rfc.Tree(bodies[i].encode() for i in order)
    assert [r[2] for r in rows] == tree.levels[0] and ac.log_root(conn, 11) == tree.root(11)
    conn.close()


async def test_a_wall_clock_step_ahead_thins_no_checkpoint_of_the_day_that_passed(tmp_path: Path) -> None:
    """Checkpoints are kept all for a day, then one an hour. A step of the wall clock two days ahead
    with no time passing must not thin the day's checkpoints (auditors who pinned one could no
    longer fetch it); the day still ends by the time that really passes."""
    wall, mono = FakeClock(), FakeClock(1000.0)
    async with harness(tmp_path, {**SIGNING, "RECEIPT_LOG_CHECKPOINT_SECONDS": "600"}, clock=wall, monotonic=mono) as h:
        db = open_database(database_of(tmp_path))
        edge = ac.LogEdge()

        async def leaf_and_checkpoint(i: int) -> None:
            db.execute("BEGIN")
            ac.append_to_log(db, edge, f"{i:032x}", entry(i))
            db.execute("COMMIT")
            assert await h.coord.checkpoint()

        async def sizes() -> list[int]:
            page = (await h.client.get("/v1/log/checkpoints", params={"limit": 500})).json()
            return [c["tree_size"] for c in page["items"]]

        for i in range(12):  # every 10 minutes for two hours
            wall.advance(600)
            mono.advance(600)
            await leaf_and_checkpoint(i)
        before = await sizes()
        wall.advance(2 * 86_400)  # two days ahead; no time has passed
        mono.advance(600)
        await leaf_and_checkpoint(12)
        assert set(before) <= set(await sizes())  # none of the day's checkpoints thinned
        wall.advance(86_400)  # a day that really passed
        mono.advance(86_400)
        await leaf_and_checkpoint(13)
        assert len(await sizes()) < len(before)  # now they are old: one an hour is kept
        db.close()
