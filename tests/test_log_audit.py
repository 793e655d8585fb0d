"""The receipt log from a client's side (issue 17): `aitbc-coord verify --log` and `aitbc-coord audit`
against the real server over HTTP, and what they report when the database is tampered with: a
rewritten receipt, a deleted one, a tree rolled back, a split view, a key that changed."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from nacl.signing import SigningKey

import aitbc_coord as ac
from conftest import CLIENT, MINER, database_of, open_database
from test_receipts import EDGE_SEED

pytestmark = pytest.mark.slow


class Log:
    """A coordinator serving on a free port (checkpoints as soon as the log grows), and a client of it."""

    def __init__(self, tmp: Path, **env: str) -> None:
        self.tmp, self.db = tmp, database_of(tmp)  # the SQLite file, or the test's PostgreSQL database
        self.settings = self.configure(**{"RECEIPT_SIGNING_KEY_HEX": EDGE_SEED, **env})
        self.base = ""
        self.files = 0

    def configure(self, **env: str) -> ac.Settings:
        return ac.Settings.load({"APP_ENV": "dev", "RATE_LIMIT_REQUESTS": "0", "RECEIPT_LOG_CHECKPOINT_SECONDS": "0",
                                 **env}, dotenv=False, db_path=self.db, sweep_interval_seconds=0.02)

    @contextlib.contextmanager
    def serving(self) -> Iterator[Log]:
        with ac.running_server(self.settings) as base:
            self.base = base
            yield self

    def issue(self, n: int = 1) -> list[Path]:
        """n receipts, each saved to a file as GET /v1/jobs/{id}/receipt serves it; once a checkpoint
        covers them."""
        files = []
        with httpx.Client(base_url=self.base, timeout=10) as http:
            assert http.post("/v1/miners/register", json={"capabilities": {"price": 1}}, headers=MINER).status_code == 200
            for _ in range(n):
                job = http.post("/v1/jobs", json={"payload": {"n": self.files}}, headers=CLIENT).json()["job_id"]
                assert http.post("/v1/miners/poll", json={}, headers=MINER).json()["job_id"] == job
                assert http.post(f"/v1/miners/{job}/result", json={"result": {"ok": 1}, "metrics": {"units": 1}},
                                 headers=MINER).status_code == 200
                self.files += 1
                path = self.tmp / f"receipt-{self.files}.json"
                path.write_bytes(http.get(f"/v1/jobs/{job}/receipt", headers=CLIENT).content)
                files.append(path)
        self.wait_for(self.size())
        return files

    def size(self) -> int:
        with contextlib.closing(open_database(self.db)) as conn:
            return conn.execute("SELECT COUNT(*) FROM log_leaves").fetchone()[0]

    def wait_for(self, size: int) -> dict[str, Any]:
        """The latest checkpoint, once it is of `size` leaves."""
        deadline = time.monotonic() + 20
        while True:
            cp = httpx.get(f"{self.base}/v1/log/checkpoint").json()
            if cp.get("tree_size") == size:
                return cp
            assert time.monotonic() < deadline, (cp, size)
            time.sleep(0.02)

    def cli(self, *args: str) -> tuple[int, str]:
        result = CliRunner().invoke(ac.cli, [str(a) for a in args])
        return result.exit_code, result.output

    def audit(self, state: Path, *more: str) -> tuple[int, str]:
        return self.cli("audit", "--log", self.base, "--state", state, *more)

    def verify(self, receipt: Path, *more: str) -> tuple[int, str]:
        return self.cli("verify", receipt, "--log", self.base, *more)

    def sql(self, *statements: tuple[str, tuple[Any, ...]]) -> None:
        """Write to the database behind the server's back, as whoever holds the file (or the database's
        owner role) could, in one transaction."""
        with contextlib.closing(open_database(self.db)) as conn:
            conn.execute("BEGIN")
            for sql, params in statements:
                conn.execute(sql, params)
            conn.execute("COMMIT")


def resealed(path: Path, **changes: Any) -> str:
    """The receipt in `path` changed and signed again with the coordinator's own key (an insider): its
    signature verifies; only the log can tell."""
    receipt = json.loads(path.read_bytes())
    body = {k: v for k, v in receipt.items() if k not in ("signature", "attestations")} | changes
    return ac.Signer(SigningKey(bytes.fromhex(EDGE_SEED))).seal(body)[1]


def test_verify_log_and_audit_follow_a_growing_log(tmp_path: Path) -> None:
    with Log(tmp_path).serving() as log:
        first = log.issue(3)
        code, out = log.verify(first[1])
        assert code == 0 and "as leaf 1 of 3" in out and "key as the log lists it" in out, out
        pretty = tmp_path / "pretty.json"  # a receipt as a client may keep it: not byte for byte
        pretty.write_text(json.dumps({"receipt": json.loads(first[2].read_bytes())}, indent=2))
        assert log.verify(pretty)[0] == 0
        state = tmp_path / "audit.json"
        code, out = log.audit(state)
        assert code == 0 and "3 leaves (first audit, key pinned from the log); 3 entries replayed" in out, out
        more = log.issue(2)
        code, out = log.audit(state)
        assert code == 0 and "5 leaves (2 new since the saved checkpoint, consistent); 2 entries replayed" in out, out
        latest = log.issue(1)
        for path, where in ((first[0], "as leaf 0 of 5, under the audited checkpoint"),
                            (more[0], "as leaf 3 of 5, under the audited checkpoint"),
                            (latest[0], "as leaf 5 of 6, under a checkpoint signed by")):
            code, out = log.verify(path, "--state", state)
            assert code == 0 and where in out, out
        assert "consistent with the audited one" in out
        assert log.audit(state, "--full")[0] == 0
        stranger = ac.NoteVerifier("aitbc-coordinator/x", bytes(SigningKey.generate().verify_key)).encode()
        code, out = log.verify(first[0], "--log-key", stranger)
        assert code == 1 and "invalid: bad checkpoint: not signed by the key" in out, out
        stranger_id = ac.b64url(bytes(SigningKey.generate().verify_key))
        code, out = log.audit(tmp_path / "fresh.json", "--key", stranger_id)
        assert code == 1 and out.startswith("audit failed: bad checkpoint") and out.count("\n") == 1, out
        code, out = log.verify(first[0], "--log", "http://127.0.0.1:9")  # nothing listens there
        assert code == 2 and "cannot check the log" in out


def test_a_rewritten_receipt_fails_verify_and_audit(tmp_path: Path) -> None:
    with Log(tmp_path).serving() as log:
        old = log.issue(2)
        state = tmp_path / "audit.json"
        assert log.audit(state)[0] == 0
        new = log.issue(2)
        for path in (old[0], new[1]):  # one the auditor has replayed, one it has not
            forged = resealed(path, units=1000)
            receipt_id = json.loads(path.read_bytes())["receipt_id"]
            log.sql(("UPDATE receipts SET body = ? WHERE receipt_id = ?", (ac.pack_receipt(forged, receipt_id, json.loads(forged)["job_id"]), receipt_id)))
            path.write_text(forged)  # what GET /v1/jobs/{id}/receipt now serves
            code, out = log.verify(path)
            assert code == 1 and "invalid: the log does not hold this receipt" in out, out
            assert ac.verify_receipt(json.loads(forged), {json.loads(forged)["signature"]["key_id"]})["valid"]
        code, out = log.audit(state)
        assert code == 1 and out == "audit failed: entry 3: its receipt does not hash to its leaf hash (rewritten)\n"
        code, out = log.audit(tmp_path / "other.json", "--full")
        assert code == 1 and "entry 0: its receipt does not hash to its leaf hash" in out, out


def drop_last(log: Log) -> None:
    """Delete the last receipt with its leaf, the subtrees it completed and the checkpoints that hold it."""
    last = log.size() - 1
    node_ids = [ac._node_id(level, last >> level) for level in range(1, 64)]
    log.sql(("DELETE FROM receipts WHERE receipt_id = (SELECT receipt_id FROM log_leaves WHERE leaf_index = ?)", (last,)),
            ("DELETE FROM log_leaves WHERE leaf_index = ?", (last,)),
            (f"DELETE FROM log_nodes WHERE node_id IN ({','.join('?' * len(node_ids))})", tuple(node_ids)),
            ("DELETE FROM log_checkpoints WHERE tree_size > ?", (last,)))


def test_a_deleted_receipt_shows_as_a_shrunk_tree_then_a_fork(tmp_path: Path) -> None:
    with Log(tmp_path).serving() as log:
        files = log.issue(4)
        state = tmp_path / "audit.json"
        assert log.audit(state)[0] == 0
        drop_last(log)
        code, out = log.audit(state)
        assert code == 1 and out.startswith("audit failed: the latest checkpoint: the tree shrank from 4 to "), out
        code, out = log.verify(files[3])
        assert code == 1 and "is not in the log" in out
        log.issue(1)  # another receipt takes its place at leaf 3
        code, out = log.audit(state)
        assert code == 1 and "fork: the tree of 4 leaves does not extend the one of 4" in out, out


def test_a_receipt_deleted_from_the_database_fails_the_audit_unless_pruning_is_allowed(tmp_path: Path) -> None:
    """Break report 17 #4: `delete from receipts where job_id = ...` passed every audit (entries served
    the leaf with "leaf": null, as for a pruned receipt)."""
    with Log(tmp_path).serving() as log:
        files = log.issue(3)
        state = tmp_path / "audit.json"
        assert log.audit(state)[0] == 0
        files += log.issue(2)
        for i in (1, 3):  # one the auditor has replayed, one it has not
            job_id = json.loads(files[i].read_bytes())["job_id"]
            log.sql(("DELETE FROM receipts WHERE job_id = ?", (job_id,)))
        code, out = log.audit(state)
        assert code == 1 and out == ("audit failed: 1 of the 2 entries replayed came without their receipt (the first: "
                                     "entry 3): deleted, or pruned by receipt retention; if this log prunes receipts, "
                                     "audit it with --allow-pruned\n"), out
        for args in (("--full",), ()):
            code, out = log.audit(tmp_path / f"fresh{len(args)}.json", *args)
            assert code == 1 and "2 of the 5 entries replayed came without their receipt (the first: entry 1)" in out, out
        code, out = log.audit(state, "--full")
        assert code == 1 and "2 of the 5 entries" in out, out
        code, out = log.audit(state, "--allow-pruned")
        assert code == 0 and "5 leaves (2 new since the saved checkpoint, consistent); 2 entries replayed " \
            "(1 without their receipt: pruned) and their root matches" in out, out
        code, out = log.audit(tmp_path / "fresh-allowing.json", "--allow-pruned")
        assert code == 0 and "5 entries replayed (2 without their receipt: pruned)" in out, out
        code, out = log.verify(files[1])  # the client's copy is still a leaf: the log holds the receipt
        assert code == 0 and "as leaf 1 of 5" in out, out


@pytest.mark.sqlite_only  # the rollback is a SQLite file backup put back
def test_a_rolled_back_database_and_a_split_view(tmp_path: Path) -> None:
    log = Log(tmp_path)
    copy = tmp_path / "copy.db"
    mine, theirs = tmp_path / "mine.json", tmp_path / "theirs.json"
    with log.serving():
        log.issue(3)
        ac.backup(str(log.db), str(copy))
        log.issue(3)
        assert log.audit(mine)[0] == 0
    for suffix in ("", "-wal", "-shm"):
        Path(f"{log.db}{suffix}").unlink(missing_ok=True)
    shutil.copy(copy, log.db)
    with log.serving():
        log.wait_for(3)
        code, out = log.audit(mine)
        assert code == 1 and "the tree shrank from 6 to 3 leaves" in out, out
        log.issue(4)
        code, out = log.audit(mine)
        assert code == 1 and "fork: the tree of 7 leaves does not extend the one of 6" in out, out
        assert log.audit(theirs)[0] == 0  # a second auditor, who only ever saw the rolled-back log
        code, out = log.cli("audit", "--log", log.base, "--state", mine, "--compare", theirs)
        assert code == 1 and "split view: fork" in out, out
        agreeing = tmp_path / "agreeing.json"
        assert log.audit(agreeing)[0] == 0
        code, out = log.cli("audit", "--log", log.base, "--state", theirs, "--compare", agreeing)
        assert code == 0 and "are consistent" in out, out


def test_a_new_log_key_fails_the_audit_until_the_operator_passes_it(tmp_path: Path) -> None:
    log = Log(tmp_path)
    state = tmp_path / "audit.json"
    with log.serving():
        log.issue(2)
        assert log.audit(state)[0] == 0
    new_key = SigningKey.generate()
    log.settings = log.configure(RECEIPT_SIGNING_KEY_HEX=EDGE_SEED, RECEIPT_LOG_SIGNING_KEY_HEX=new_key.encode().hex())
    with log.serving():
        log.issue(1)
        code, out = log.audit(state)
        assert code == 1 and "not signed by the key" in out and "pass its new key with --key" in out, out
        keys = httpx.get(f"{log.base}/v1/receipts/keys").json()["items"]
        active = next(k for k in keys if k["role"] == "log" and k["status"] == "active")
        assert active["key_id"] == ac.b64url(bytes(new_key.verify_key))
        code, out = log.audit(state, "--key", active["verifier_key"])
        assert code == 0 and "1 new since the saved checkpoint" in out, out
        assert log.audit(state)[0] == 0  # the new key is pinned now
        assert json.loads(state.read_text())["verifier_key"] == active["verifier_key"]


def test_a_state_file_that_cannot_be_saved_after_a_passing_audit_is_exit_3(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Break report 17 #3: a failed write of the state file was a traceback and exit 1 (a log fault)."""
    with Log(tmp_path).serving() as log:
        log.issue(2)
        state = tmp_path / "audit.json"
        assert log.audit(state)[0] == 0
        saved = state.read_text()
        log.issue(1)

        def disk_error(fd: int) -> None:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        with monkeypatch.context() as m:
            m.setattr(os, "fsync", disk_error)
            code, out = log.audit(state)
        assert code == ac.EXIT_LOCAL and out.count("\n") == 1, out
        assert out.startswith(f"Error: cannot write the audit state {state}: Input/output error") and \
            "(the audit itself passed: ok: " in out, out
        assert state.read_text() == saved and [p.name for p in tmp_path.glob(".audit.json.*")] == []
        code, out = log.audit(state)
        assert code == 0 and "3 leaves (1 new since the saved checkpoint" in out, out


def test_audits_under_a_tight_rate_limit_wait_as_asked(tmp_path: Path) -> None:
    """Break report 17 #6: with RATE_LIMIT_REQUESTS=30 a first audit got a 429 and exit 2; a first audit
    (or --full) of a big log makes a request per page of entries."""
    with Log(tmp_path).serving() as log:
        files = log.issue(5)
    with Log(tmp_path, RATE_LIMIT_REQUESTS="2", RATE_LIMIT_WINDOW_SECONDS="1").serving() as log:
        state = tmp_path / "audit.json"
        for args in ((), ("--full",), ()):  # 3, 3 and 1 requests: past 2 a second, each waits for the next second
            code, out = log.audit(state, *args)
            assert code == 0 and "5 leaves" in out, out
        code, out = log.verify(files[0], "--state", state)
        assert code == 0 and "as leaf 0 of 5" in out, out


def test_a_state_file_of_another_log_is_a_local_problem_and_a_renamed_log_a_fault(tmp_path: Path) -> None:
    """Break report 17 #9: auditing log B with log A's state suggested a key rotation, and verify --log B
    --state A said "404 no checkpoint of 20 leaves": the state's origin and URL were never compared."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = Log(tmp_path / "a")
    b = Log(tmp_path / "b", RECEIPT_SIGNING_KEY_HEX=SigningKey.generate().encode().hex())
    with a.serving(), b.serving():
        a.issue(3)
        receipt_b = b.issue(1)[0]
        state_a, state_b = tmp_path / "a.json", tmp_path / "b.json"
        assert a.audit(state_a)[0] == 0 and b.audit(state_b)[0] == 0
        origin_a, origin_b = (json.loads(p.read_text())["checkpoint"].split("\n")[0] for p in (state_a, state_b))
        wrong = (f"Error: the --state file is the audit of {a.base} (origin {origin_a}), not of {b.base} "
                 f"(origin {origin_b}): give this log's state file\n")
        assert b.audit(state_a) == (ac.EXIT_LOCAL, wrong)
        assert b.verify(receipt_b, "--state", state_a) == (ac.EXIT_LOCAL, wrong)
        code, out = b.cli("audit", "--log", b.base, "--state", state_b, "--compare", state_a)
        assert code == ac.EXIT_LOCAL and "audits of different logs" in out, out
        code, out = a.cli("audit", "--log", b.base, "--state", state_a, "--compare", state_a)
        assert (code, out) == (ac.EXIT_LOCAL, wrong)
        moved = tmp_path / "moved.json"  # the same log reached under another name: still its state
        moved.write_text(json.dumps({**json.loads(state_a.read_text()), "log": a.base.replace("127.0.0.1", "localhost")}))
        code, out = a.audit(moved)
        assert code == 0 and json.loads(moved.read_text())["log"] == a.base, out
        renamed = tmp_path / "renamed.json"  # saved from B's URL, where another origin now answers
        renamed.write_text(json.dumps({**json.loads(state_a.read_text()), "log": b.base + "/"}))
        code, out = b.audit(renamed)
        assert (code, out) == (ac.EXIT_FAILED, f"audit failed: the log's origin is now {origin_b}, not {origin_a} as "
                                               f"audited: a log keeps its origin for life\n")
