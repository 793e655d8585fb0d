"""`aitbc-coord copy`: a SQLite installation moved into PostgreSQL (issue 18, Operations). A real
installation is built through the API on SQLite (receipts, a failed job, a queued and a running one,
offers, bids, checkpoints, payloads pruned by retention), copied, and served again from PostgreSQL: the
API answers as before, an auditor's checkpoint from before the copy is consistent with the log after it,
and new work continues the log and the keys."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

import aitbc_coord as ac
import rfc9162 as rfc
from conftest import ADMIN, CLIENT, MINER, FakeClock, Harness, harness, open_database
from test_receipts import EDGE_SEED

pytestmark = pytest.mark.anyio
DAY = 86_400
ENV = {"RECEIPT_SIGNING_KEY_HEX": EDGE_SEED, "PAYLOAD_RETENTION_DAYS": "7"}


def copy(source: Path | str, target: str) -> Result:
    return CliRunner().invoke(ac.cli, ["copy", "--from", f"sqlite:///{source}", "--to", target])


def rows(target: str, sql: str) -> list[tuple[Any, ...]]:
    with contextlib.closing(open_database(target)) as conn:
        return [tuple(row) for row in conn.execute(sql).fetchall()]


async def get(h: Harness, path: str, headers: dict[str, str] | None = None, **params: Any) -> Any:
    r = await h.client.get(path, headers=headers or {}, params=params)
    assert r.status_code == 200, (path, r.status_code, r.text)
    return r.json()


async def complete(h: Harness, tag: str, **submit: Any) -> dict[str, Any]:
    """A job run to COMPLETED by the dev miner, paid for by units; its receipt."""
    job = await h.submit({"prompt": tag, "value": tag}, **submit)
    assert (await h.take())["job_id"] == job["job_id"]
    h.clock.advance(3)
    r = await h.result(job["job_id"], {"text": f"{tag} done"}, metrics={"units": 3})
    assert r.status_code == 200, r.text
    return r.json()["receipt"]


async def checkpoint(h: Harness) -> dict[str, Any]:
    h.clock.advance(h.coord.settings.log_checkpoint_seconds)
    await h.coord.checkpoint()
    return await get(h, "/v1/log/checkpoint")


async def answers(h: Harness, job_ids: list[str], receipt_ids: list[str], bid_ids: list[str]) -> dict[str, Any]:
    """What clients, miners' operators, explorers and auditors read: (status, body) by route."""
    seen: dict[str, Any] = {}

    async def read(path: str, headers: dict[str, str] | None = None, **params: Any) -> None:
        r = await h.client.get(path, headers=headers or {}, params=params)
        seen[f"{path} {sorted(params.items())}"] = (r.status_code, r.json())

    for path, headers in (("/v1/jobs", CLIENT), ("/v1/admin/jobs", ADMIN), ("/v1/admin/miners", ADMIN),
                          ("/v1/marketplace/offers", None), ("/v1/explorer/blocks", None),
                          ("/v1/explorer/transactions", None), ("/v1/explorer/addresses", None),
                          ("/v1/explorer/receipts", None), ("/v1/log/checkpoints", None)):
        await read(path, headers, limit=100)
    for path, headers in (("/v1/admin/stats", ADMIN), ("/v1/marketplace/stats", None), ("/v1/receipts/keys", None),
                          ("/v1/log/checkpoint", None)):
        await read(path, headers)
    for job_id in job_ids:
        for path in ("", "/result", "/receipt", "/receipts"):
            await read(f"/v1/jobs/{job_id}{path}", CLIENT)
    for receipt_id in receipt_ids:
        await read("/v1/log/proof/inclusion", receipt_id=receipt_id)
    for bid_id in bid_ids:
        await read(f"/v1/marketplace/bids/{bid_id}")
    await read("/v1/log/entries", start=0)
    return seen


async def build_installation(h: Harness) -> dict[str, Any]:
    """Every kind of row a year of service leaves, through the API; what the test needs to find them again."""
    await h.register(capabilities={"price": 0.25})
    old = [await complete(h, f"old {i}") for i in range(3)]
    failed = await h.submit({"prompt": "fails"})
    await h.take()
    r = await h.client.post(f"/v1/miners/{failed['job_id']}/fail", json={"error_code": "OOM", "error_message": "x"},
                            headers=MINER)
    assert r.status_code == 200, r.text
    h.clock.advance(8 * DAY)
    assert (await h.coord.retain())["pruned"] == 4  # their payloads and results go; summaries and receipts stay
    recent = [await complete(h, "recent 0", headers={**CLIENT, "Idempotency-Key": "order-1"}),
              await complete(h, "recent 1")]
    offer = (await h.client.post("/v1/marketplace/offers", json={"provider": "dc-1", "capacity": 4, "price": 2.125},
                                 headers=ADMIN)).json()
    bids = [(await h.client.post("/v1/marketplace/bids", json={"provider": "buyer", "capacity": c, "price": p})).json()
            for c, p in ((1, 5.0), (64, 0.01))]  # one matched, one left pending
    assert [b["status"] for b in bids] == ["matched", "pending"]
    running = await h.submit({"prompt": "held across the move"})
    assert (await h.take())["job_id"] == running["job_id"]
    queued = await h.submit({"prompt": "waits across the move"}, ttl_seconds=7 * DAY)
    audited = await checkpoint(h)
    receipts = old + recent
    return {"jobs": [r["job_id"] for r in receipts] + [failed["job_id"], running["job_id"], queued["job_id"]],
            "receipts": [r["receipt_id"] for r in receipts], "bids": [b["id"] for b in bids], "offer": offer,
            "running": running["job_id"], "queued": queued["job_id"], "audited": audited}


async def test_an_installation_copied_to_postgresql_answers_the_same_and_carries_on(tmp_path: Path, pg_url: str) -> None:
    db, clock = tmp_path / "coord.db", FakeClock()
    async with harness(tmp_path, ENV, clock=clock, db_path=str(db)) as h:
        made = await build_installation(h)
        await h.coord.sweep()  # offers up to date with their slots, as a start brings them (open_fleet)
        before = await answers(h, made["jobs"], made["receipts"], made["bids"])
        log_keys = [k for k in (await get(h, "/v1/receipts/keys"))["items"] if k["role"] == "log"]
        sqlite_rows = {t: rows(str(db), f"SELECT COUNT(*) FROM {t}")[0][0] for t in ("jobs", "receipts", "log_nodes")}
    assert not Path(f"{db}-wal").exists()

    done = copy(db, pg_url)
    assert done.exit_code == 0, done.output
    lines = done.output.splitlines()
    assert lines[0].startswith(f"copied {db} into {pg_url} in ")
    for table, n in sqlite_rows.items():
        assert any(line.split() == [table, str(n), str(n)] for line in lines), (table, done.output)
    assert "job_counts" in done.output and "addresses.balance_micro" in done.output and "not checked" not in done.output
    assert f"receipt log: 5 leaves, root {made['audited']['root_hash']} on both sides; the latest checkpoint, of 5" \
        " leaves, signs the copied tree's first 5\n" in done.output
    assert rows(pg_url, "SELECT stripe, COUNT(*) FROM job_counts GROUP BY stripe") == [(0, 6)]  # totals as they were

    async with harness(tmp_path, ENV, clock=clock, db_path=pg_url) as h:
        assert h.coord.settings.postgres_url == pg_url
        assert await answers(h, made["jobs"], made["receipts"], made["bids"]) == before

        # new work continues the keys, the queue and the log
        r = await h.result(made["running"], {"text": "finished on PostgreSQL"}, metrics={"units": 1})
        assert r.status_code == 200, r.text
        assert (await h.take())["job_id"] == made["queued"]  # the queue and its shape came across
        assert (await h.result(made["queued"], {"text": "ok"})).status_code == 200
        receipt = await complete(h, "after the move")
        heights = [b["height"] for b in (await get(h, "/v1/explorer/blocks", limit=100))["items"]]
        top = before["/v1/explorer/blocks [('limit', 100)]"][1]["items"][0]["height"]
        assert heights == list(range(top + 1, top - len(made["jobs"]), -1))  # the next seq: no collision, no gap
        r = await h.client.get(f"/v1/jobs/{receipt['job_id']}/receipt", headers=CLIENT)
        assert r.headers["receipt-log-index"] == "7"  # leaves 5 and 6 are the two jobs that crossed over
        stats = await get(h, "/v1/admin/stats", ADMIN)
        assert stats["receipts_total"] == 8 and stats["total_jobs"] == len(made["jobs"]) + 1
        new = await h.client.post("/v1/marketplace/offers", json={"provider": "dc-2", "capacity": 1, "price": 1.0},
                                  headers=ADMIN)
        assert new.status_code == 201 and new.json()["id"] != made["offer"]["id"]

        # an auditor who saved the checkpoint before the move accepts the log after it: no fork
        latest = await checkpoint(h)
        old, cp = made["audited"], latest
        verifier = ac.NoteVerifier.parse(log_keys[0]["verifier_key"])
        assert ac.Checkpoint.parse(verifier.open(cp["note"])).tree_size == cp["tree_size"] == 8
        proof = await get(h, "/v1/log/proof/consistency", first=old["tree_size"], second=cp["tree_size"])
        path = [base64.b64decode(p) for p in proof["consistency_path"]]
        old_root, new_root = base64.b64decode(old["root_hash"]), base64.b64decode(cp["root_hash"])
        assert rfc.verify_consistency(old["tree_size"], cp["tree_size"], old_root, new_root, path)
        assert ac.verify_consistency(old["tree_size"], cp["tree_size"], old_root, new_root, path)
        for receipt_id in (made["receipts"][0], receipt["receipt_id"]):  # a leaf from before, and the newest
            proof = await get(h, "/v1/log/proof/inclusion", receipt_id=receipt_id)
            entry = (await get(h, "/v1/log/entries", start=proof["leaf_index"], end=proof["leaf_index"]))["items"][0]
            leaf = rfc.hash_leaf(base64.b64decode(entry["leaf"]))
            assert rfc.verify_inclusion(leaf, proof["leaf_index"], 8, [base64.b64decode(p) for p in proof["audit_path"]],
                                        new_root)


def small_installation(tmp_path: Path, *, pruned: bool = False) -> Path:
    """A SQLite installation with two completed jobs and a queued one (and with `pruned`, the completed
    jobs deleted by retention); its path."""
    db, env = tmp_path / "small.db", {**ENV, "JOB_RETENTION_DAYS": "7", "RECEIPT_RETENTION_DAYS": "7"}

    async def build() -> None:
        async with harness(tmp_path, env if pruned else ENV, db_path=str(db)) as h:
            await h.register(capabilities={"price": 0.25})
            for i in range(2):
                await complete(h, f"small {i}")
            if pruned:
                h.clock.advance(8 * DAY)
                await h.coord.retain()
            await h.submit({"prompt": "queued"})
            await checkpoint(h)

    asyncio.run(build())
    return db


def tables(url: str) -> list[str]:
    return [r[0] for r in rows(url, "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")]


def test_a_target_in_use_is_refused_and_left_as_it_was(tmp_path: Path, pg_url: str) -> None:
    db = small_installation(tmp_path)
    assert copy(db, pg_url).exit_code == 0
    jobs = rows(pg_url, "SELECT seq, job_id, state FROM jobs ORDER BY seq")
    again = copy(db, pg_url)
    assert again.exit_code == 1
    assert again.output == ("Error: the PostgreSQL database is not empty: it has jobs, receipts, miners, log_leaves"
                            " rows (copy only into a new database)\n")
    assert rows(pg_url, "SELECT seq, job_id, state FROM jobs ORDER BY seq") == jobs


async def test_what_a_coordinator_that_only_started_on_the_target_wrote_is_replaced(tmp_path: Path,
                                                                                    pg_url: str) -> None:
    db = tmp_path / "small.db"
    async with harness(tmp_path, ENV, db_path=str(db)) as h:
        await h.register()
        await complete(h, "before the move")
        await checkpoint(h)
        keys, cp = await get(h, "/v1/receipts/keys"), await get(h, "/v1/log/checkpoint")
    async with harness(tmp_path, {}, db_path=pg_url) as h:  # started once by mistake, with a development key
        assert (await get(h, "/v1/log/checkpoint"))["tree_size"] == 0
    done = copy(db, pg_url)
    assert done.exit_code == 0, done.output
    async with harness(tmp_path, ENV, db_path=pg_url) as h:
        assert await get(h, "/v1/receipts/keys") == keys  # the stray key and its log origin are gone
        assert await get(h, "/v1/log/checkpoint") == cp
        assert [c["tree_size"] for c in (await get(h, "/v1/log/checkpoints"))["items"]] == [1, 0]


def test_a_source_at_an_older_schema_version_is_refused_before_the_target_is_touched(tmp_path: Path,
                                                                                       pg_url: str) -> None:
    db = tmp_path / "old.db"
    conn = sqlite3.connect(db)
    text = ac.schema_sql()
    conn.executescript(text[:text.index("-- Version 5:")] + "PRAGMA user_version = 4;")
    conn.close()
    done = copy(db, pg_url)
    assert done.exit_code == 1
    assert done.output == (f"Error: {db} has schema version 4, not {ac.SCHEMA_VERSION}: run `aitbc-coord migrate"
                           f" --db {db}` first\n")
    assert tables(pg_url) == []


def test_totals_that_disagree_with_the_rows_fail_the_check_and_nothing_is_copied(tmp_path: Path, pg_url: str) -> None:
    db = small_installation(tmp_path)
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE job_counts SET n = n + 1 WHERE state = 'QUEUED'")  # drifted, or copied wrong
    done = copy(db, pg_url)
    assert (done.exit_code, done.output) == (1, "Error: check failed: job_counts QUEUED: 2 kept, the rows imply 1\n")
    assert rows(pg_url, "SELECT COUNT(*) FROM jobs") == [(0,)]  # the schema is there, empty
    assert rows(pg_url, "SELECT SUM(n) FROM job_counts") == [(0,)]


def test_text_postgresql_cannot_hold_is_named_and_nothing_is_copied(tmp_path: Path, pg_url: str) -> None:
    db = small_installation(tmp_path)
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:  # stored before U+0000 was refused (422)
        conn.execute("UPDATE jobs SET error = ? WHERE seq = 2", ("bad\x00byte",))
    done = copy(db, pg_url)
    assert (done.exit_code, done.output) == (1, "Error: jobs row {'seq': 2}: error holds the character U+0000, which"
                                                " PostgreSQL text cannot store\n")
    assert rows(pg_url, "SELECT COUNT(*) FROM shapes") == [(0,)]  # copied before jobs, and rolled back


def test_totals_that_count_deleted_rows_are_copied_as_they_were(tmp_path: Path, pg_url: str) -> None:
    db = small_installation(tmp_path, pruned=True)
    kept = rows(str(db), "SELECT state, n FROM job_counts ORDER BY state")
    assert rows(str(db), "SELECT COUNT(*) FROM jobs") == [(2,)]  # the first of the two completed jobs is deleted
    done = copy(db, pg_url)
    assert done.exit_code == 0, done.output
    assert "not checked: job_counts (it counts 1 jobs row retention deleted); addresses.tx_count (it counts 1 jobs" \
        " row retention deleted); counters.receipts (it counts 1 receipts row retention deleted)" in done.output
    assert "kept totals equal to what the rows imply: fleet_totals, counters.active_bids\n" in done.output
    assert rows(pg_url, "SELECT state, SUM(n) FROM job_counts GROUP BY state ORDER BY state") == kept


async def test_balances_sqlite_holds_past_a_64_bit_integer_are_copied_exactly(tmp_path: Path, pg_url: str) -> None:
    """Ten receipts at MAX_AMOUNT (10^18 millionths each) take a balance past 2^63, where SQLite goes
    on in a REAL: the copy refused it ("invalid input syntax for type bigint", then, with a numeric
    column, "read back otherwise"). Such a REAL is a whole number: it is copied as that number, and
    the explorer answers the same on PostgreSQL."""
    db = tmp_path / "rich.db"
    async with harness(tmp_path, ENV, db_path=str(db)) as h:
        await h.register(capabilities={"price": ac.MAX_AMOUNT / 3})
        for i in range(11):
            await complete(h, f"dear {i}")  # 3 units each: MAX_AMOUNT a job
        before = await get(h, "/v1/explorer/addresses")
    assert sorted(type(r[0]).__name__ for r in rows(str(db), "SELECT balance_micro FROM addresses")) == ["float"] * 2
    done = copy(db, pg_url)
    assert done.exit_code == 0, done.output
    async with harness(tmp_path, ENV, db_path=pg_url) as h:
        assert await get(h, "/v1/explorer/addresses") == before
    assert [b["balance"] for b in before["items"]] == ["11000000000000.000000", "-11000000000000.000000"]


def test_a_source_in_use_is_refused(tmp_path: Path, pg_url: str) -> None:
    db = tmp_path / "live.db"

    async def while_serving() -> Result:
        async with harness(tmp_path, ENV, db_path=str(db)) as h:
            await h.submit()
            return copy(db, pg_url)

    done = asyncio.run(while_serving())
    assert done.exit_code == 1 and done.output.startswith(f"Error: {db}-wal exists: a coordinator is running on")
    assert tables(pg_url) == []


@pytest.mark.parametrize("source, target, why", [
    ("sqlite:///{db}", "sqlite:///other.db", "Error: --to must be a PostgreSQL database (postgresql://user@host/dbname)"),
    ("{db}", "{pg}", "Error: --from must look like sqlite:///relative/path.db, sqlite:////absolute/path.db"),
    ("sqlite:///{missing}", "{pg}", "Error: no database at {missing}"),
    ("sqlite:///{db}", "postgresql://nobody@/db?host={tmp}", "Error: cannot connect to PostgreSQL: "),
])
def test_bad_arguments_and_an_unreachable_server_are_one_line(tmp_path: Path, pg_url: str, source: str, target: str,
                                                             why: str) -> None:
    db = tmp_path / "coord.db"
    ac.migrate(str(db))
    names = {"db": db, "pg": pg_url, "missing": tmp_path / "missing.db", "tmp": tmp_path}
    done = CliRunner().invoke(ac.cli, ["copy", "--from", source.format(**names), "--to", target.format(**names)])
    assert done.exit_code == 1 and done.output.startswith(why.format(**names)), done.output
    assert done.output.count("\n") == 1, done.output
