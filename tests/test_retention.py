"""Years of service: retention of payloads, job summaries and receipts; the archive; the upgrade path."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import logging
import os
import sqlite3
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import aitbc_coord as ac
from conftest import ADMIN, CLIENT, MINER, T0, FakeClock, Harness, harness, open_database
from test_receipts import EDGE_ATTESTATION_SEED, EDGE_SEED, EDGE_SIGNATURE, independently_valid, sdk_digest

pytestmark = pytest.mark.anyio
DAY = 86_400
SIGNING = {"RECEIPT_SIGNING_KEY_HEX": EDGE_SEED}


async def complete(h: Harness, n: int, tag: str = "job", price: float = 0.5) -> list[str]:
    """`n` jobs run to COMPLETED by the dev miner (registered at `price`), each with its own payload and
    result; their ids."""
    await h.register(capabilities={"price": price})
    ids = []
    for i in range(n):
        job = await h.submit({"prompt": f"{tag} {i}", "value": str(i), "weights": [i, None]})
        assert (await h.take())["job_id"] == job["job_id"]
        h.clock.advance(2)
        r = await h.result(job["job_id"], {"text": f"{tag} {i} done", "tokens": i}, metrics={"units": 2})
        assert r.status_code == 200, r.text
        ids.append(job["job_id"])
    return ids


async def get(h: Harness, path: str, headers: dict[str, str] | None = None, **params: Any) -> Any:
    r = await h.client.get(path, headers=headers or {}, params=params)
    assert r.status_code == 200, (path, r.status_code, r.text)
    return r.json()


async def kept_totals(h: Harness) -> dict[str, Any]:
    """What must read the same with or without pruning: stats, balances, per-state counts."""
    stats = await get(h, "/v1/admin/stats", ADMIN)
    addresses = await get(h, "/v1/explorer/addresses", limit=500)
    return {"admin": stats, "market": await get(h, "/v1/marketplace/stats"),
            "addresses": {a["address"]: (a["balance"], a["txCount"], a["lastActive"]) for a in addresses["items"]}}


def stored(h: Harness, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with contextlib.closing(open_database(h.coord.settings.target)) as conn:
        return [tuple(row) for row in conn.execute(sql, args).fetchall()]


# --- payloads and results ---


async def test_a_pruned_job_keeps_its_summary_receipts_and_every_total(tmp_path: Path) -> None:
    async with harness(tmp_path, {**SIGNING, "PAYLOAD_RETENTION_DAYS": "7"}) as h:
        ids = await complete(h, 3)
        failed = await h.submit({"prompt": "fails"})
        await h.take()
        await h.client.post(f"/v1/miners/{failed['job_id']}/fail", json={"error_code": "E", "error_message": "x"},
                            headers=MINER)
        before = await kept_totals(h)
        views = [await h.job(j) for j in ids]
        receipts = [await get(h, f"/v1/jobs/{j}/receipts", CLIENT) for j in ids]
        txs = await get(h, "/v1/explorer/transactions")
        h.clock.advance(6 * DAY)
        assert (await h.coord.retain())["pruned"] == 0  # not yet
        assert (await h.client.get(f"/v1/jobs/{ids[0]}/result", headers=CLIENT)).status_code == 200
        h.clock.advance(2 * DAY)
        assert (await h.coord.retain())["pruned"] == 4
        for job_id, view, page in zip(ids, views, receipts):
            r = await h.client.get(f"/v1/jobs/{job_id}/result", headers=CLIENT)
            assert (r.status_code, r.json()) == (410, {"detail": "result pruned"})
            assert await h.job(job_id) == view  # the summary reads as before
            assert await get(h, f"/v1/jobs/{job_id}/receipts", CLIENT) == page
            check = await h.client.post("/v1/receipts/verify", json={"receipt": page["items"][0]})
            assert check.json()["valid"] is True
        assert await kept_totals(h) == before
        assert await get(h, "/v1/explorer/transactions") == txs  # values come from receipts and summaries
        assert stored(h, "SELECT COUNT(*) FROM job_data") == [(0,)]  # payloads, results and metrics are gone
        assert (await h.coord.retain())["pruned"] == 0  # nothing twice


async def test_summaries_and_receipts_go_after_their_own_retention_and_totals_count_history(tmp_path: Path) -> None:
    env = {**SIGNING, "PAYLOAD_RETENTION_DAYS": "7", "JOB_RETENTION_DAYS": "30", "RECEIPT_RETENTION_DAYS": "40"}
    async with harness(tmp_path, env) as h:
        ids = await complete(h, 4)
        h.clock.advance(20 * DAY)
        later = await complete(h, 2, "later")
        before = await kept_totals(h)
        h.clock.advance(11 * DAY)  # the first four are 31 days old, the later two 11
        done = await h.coord.retain()
        assert (done["pruned"], done["jobs_deleted"], done["receipts_deleted"]) == (6, 4, 0)
        for job_id in ids:
            assert (await h.client.get(f"/v1/jobs/{job_id}", headers=CLIENT)).status_code == 404
        assert (await h.client.get(f"/v1/jobs/{later[0]}/result", headers=CLIENT)).status_code == 410
        listed = await get(h, "/v1/explorer/receipts", limit=100)
        assert len(listed["items"]) == 6  # receipts outlive their jobs (40 days)
        assert await kept_totals(h) == before  # counts, balances and activity count history, not rows
        h.clock.advance(10 * DAY)
        assert (await h.coord.retain())["receipts_deleted"] == 4
        assert [r["jobId"] for r in (await get(h, "/v1/explorer/receipts"))["items"]] == list(reversed(later))
        assert (await get(h, "/v1/admin/stats", ADMIN))["receipts_total"] == 6
        assert await kept_totals(h) == before


async def test_a_jobs_kept_receipts_read_by_job_id_after_its_summary_is_deleted(tmp_path: Path) -> None:
    """With JOB_RETENTION_DAYS shorter than RECEIPT_RETENTION_DAYS, GET /v1/jobs/{id}/receipt once
    answered 404 "job not found" for a job whose receipts were kept: the proof a client keeps."""
    keys = {"CLIENT_API_KEYS": f"alice={ac.DEV_KEYS['client']},bob=bob-key-0123456789"}
    env = {**SIGNING, **keys, "PAYLOAD_RETENTION_DAYS": "7", "JOB_RETENTION_DAYS": "10", "RECEIPT_RETENTION_DAYS": "40"}
    async with harness(tmp_path, env) as h:
        (job_id,) = await complete(h, 1)
        latest = await h.client.get(f"/v1/jobs/{job_id}/receipt", headers=CLIENT)
        page = await get(h, f"/v1/jobs/{job_id}/receipts", CLIENT)
        h.clock.advance(11 * DAY)
        await complete(h, 1, "later")  # the newest job is kept (its seq is never named twice)
        assert (await h.coord.retain())["jobs_deleted"] == 1
        assert (await h.client.get(f"/v1/jobs/{job_id}", headers=CLIENT)).status_code == 404
        r = await h.client.get(f"/v1/jobs/{job_id}/receipt", headers=CLIENT)
        assert (r.status_code, r.content, r.headers.get(ac.LOG_INDEX_HEADER)) == (
            200, latest.content, latest.headers[ac.LOG_INDEX_HEADER])
        assert await get(h, f"/v1/jobs/{job_id}/receipts", CLIENT) == page
        r = await h.client.get(f"/v1/jobs/{job_id}/result", headers=CLIENT)  # went before the summary
        assert (r.status_code, r.json()) == (410, {"detail": "result pruned"})
        assert await get(h, f"/v1/jobs/{job_id}/receipts", CLIENT, offset=1) == {
            "items": [], "next_offset": None, "next_cursor": None}
        bob = {"X-Api-Key": "bob-key-0123456789"}
        for path in (f"/v1/jobs/{job_id}/receipt", f"/v1/jobs/{job_id}/receipts", f"/v1/jobs/{job_id}/result"):
            r = await h.client.get(path, headers=bob)
            assert (r.status_code, r.json()) == (404, {"detail": "job not found"})
        h.clock.advance(30 * DAY)
        assert (await h.coord.retain())["receipts_deleted"] == 1
        for path in (f"/v1/jobs/{job_id}/receipt", f"/v1/jobs/{job_id}/receipts", f"/v1/jobs/{job_id}/result"):
            assert (await h.client.get(path, headers=CLIENT)).status_code == 404


async def test_retention_runs_alone_in_small_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with harness(tmp_path, {"PAYLOAD_RETENTION_DAYS": "1"}) as h:
        await h.register(concurrency=200)
        jobs = [await h.submit({"n": i}) for i in range(150)]
        for _ in jobs:
            await h.take()
        for job in jobs:
            await h.result(job["job_id"])
        batches: list[list[str]] = []  # the units of each transaction
        database = type(h.coord.db)
        if isinstance(h.coord.db, ac.PgDatabase):  # a transaction a unit
            run = database._run

            def recorded_unit(db: ac.PgDatabase, fn: Any, args: tuple[Any, ...]) -> Any:
                batches.append([fn.__name__])
                return run(db, fn, args)
            monkeypatch.setattr(database, "_run", recorded_unit)
        else:
            commit = database._commit_batch

            async def recorded(db: ac.Database, batch: list[Any]) -> None:
                batches.append([fn.__name__ for fn, _, _ in batch])
                await commit(db, batch)
            monkeypatch.setattr(database, "_commit_batch", recorded)
        h.clock.advance(2 * DAY)
        done, *_ = await asyncio.gather(h.coord.retain(), *(h.submit({"during": i}) for i in range(40)))
        assert done["pruned"] == 150
        pruning = [b for b in batches if "tx_prune_due" in b]
        assert len(pruning) >= 150 // ac.Coordinator.RETENTION_BATCH and all(b == ["tx_prune_due"] for b in pruning)
        assert any("tx_submit" in b for b in batches)


@pytest.mark.sqlite_only  # an upgrade of a version 1 SQLite file
async def test_the_first_start_with_retention_counts_older_jobs_as_finished_then(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An upgrade never deletes at once: a version 1 database with jobs finished long ago."""
    db = tmp_path / "coord.db"
    conn = sqlite3.connect(db)
    conn.executescript((Path(__file__).parent / "data" / "schema_v1.sql").read_text())
    conn.execute("INSERT INTO shapes (constraints) VALUES ('{}')")
    long_ago = int((T0 - 400 * DAY) * 1000)
    for i, state in enumerate(("COMPLETED", "FAILED", "QUEUED")):
        conn.execute("INSERT INTO jobs (job_id, client_id, state, payload, constraints, shape_id, requested_at,"
                     " expires_at, finished_at, result) VALUES (?, 'c', ?, '{\"b\":1,\"a\":null}', '{}', 1, ?, ?, ?, ?)",
                     (f"{i:032x}", state, long_ago, int(T0 * 1000) + 10**7,
                      long_ago if state != "QUEUED" else None, '{"ok":1}' if state == "COMPLETED" else None))
    conn.commit()
    conn.close()
    caplog.set_level(logging.INFO, "aitbc_coord")
    async with harness(tmp_path, {"PAYLOAD_RETENTION_DAYS": "30"}) as h:
        warned = [r.getMessage() for r in caplog.records if "retention" in r.getMessage() and r.levelno == logging.WARNING]
        assert len(warned) == 1 and "2 jobs had finished before this first start" in warned[0], warned
        assert stored(h, "SELECT payload FROM job_data JOIN jobs USING (seq) WHERE state = 'QUEUED'") == [
            ('{"a":null,"b":1}',)]  # canonical now
        assert (await h.coord.retain())["pruned"] == 0
        h.clock.advance(29 * DAY)
        assert (await h.coord.retain())["pruned"] == 0
        h.clock.advance(2 * DAY)
        assert (await h.coord.retain())["pruned"] == 2
    caplog.clear()
    async with harness(tmp_path, {"PAYLOAD_RETENTION_DAYS": "30"}):  # the clock started once, for good
        assert not [r for r in caplog.records if r.levelno == logging.WARNING and "retention" in r.getMessage()]


@pytest.mark.parametrize(("env", "expected"), [
    ({}, (30, None, None)),
    ({"PAYLOAD_RETENTION_DAYS": "keep"}, (None, None, None)),
    ({"PAYLOAD_RETENTION_DAYS": "7", "JOB_RETENTION_DAYS": "30", "RECEIPT_RETENTION_DAYS": "Forever"}, (7, 30, None)),
    ({"PAYLOAD_RETENTION_DAYS": "7", "JOB_RETENTION_DAYS": "7", "RECEIPT_RETENTION_DAYS": "7"}, (7, 7, 7)),
    ({"PAYLOAD_RETENTION_DAYS": "3650", "JOB_RETENTION_DAYS": "3650"}, (3650, 3650, None)),  # ten years at most
])
def test_retention_settings(env: dict[str, str], expected: tuple[Any, ...]) -> None:
    s = ac.Settings.load(env, dotenv=False)
    assert (s.payload_retention_days, s.job_retention_days, s.receipt_retention_days) == expected


@pytest.mark.parametrize(("env", "named"), [
    ({"PAYLOAD_RETENTION_DAYS": "0"}, "PAYLOAD_RETENTION_DAYS"),
    ({"PAYLOAD_RETENTION_DAYS": "1.5"}, "PAYLOAD_RETENTION_DAYS"),
    ({"JOB_RETENTION_DAYS": "-3"}, "JOB_RETENTION_DAYS"),
    ({"PAYLOAD_RETENTION_DAYS": "3651"}, "PAYLOAD_RETENTION_DAYS: must be a whole number of days from 1 to 3650"),
    ({"JOB_RETENTION_DAYS": "999999"}, "JOB_RETENTION_DAYS: must be a whole number of days from 1 to 3650"),
    ({"RECEIPT_RETENTION_DAYS": "5000"}, "RECEIPT_RETENTION_DAYS"),
    ({"JOB_RETENTION_DAYS": "10"}, "JOB_RETENTION_DAYS=10 is shorter than PAYLOAD_RETENTION_DAYS=30"),
    ({"PAYLOAD_RETENTION_DAYS": "keep", "RECEIPT_RETENTION_DAYS": "90"}, "RECEIPT_RETENTION_DAYS=90 is shorter"),
])
def test_bad_retention_settings_are_start_up_errors(env: dict[str, str], named: str) -> None:
    with pytest.raises(ac.ConfigError, match=named.replace(".", r"\.")):
        ac.Settings.load(env, dotenv=False)


# --- the archive ---


def day_file(directory: Path, at: float, part: str = "") -> Path:
    return directory / f"jobs-{time.strftime('%Y-%m-%d', time.gmtime(at))}{part}.jsonl.gz"


async def test_each_day_is_archived_before_it_is_pruned_and_its_receipts_verify_offline(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    env = {**SIGNING, "RECEIPT_ATTESTATION_KEY_HEX": EDGE_ATTESTATION_SEED, "PAYLOAD_RETENTION_DAYS": "7",
           "ARCHIVE_DIR": str(archive)}
    async with harness(tmp_path, env) as h:
        first = await complete(h, 3, "monday")
        results = {j: (await get(h, f"/v1/jobs/{j}/result", CLIENT)) for j in first}
        h.clock.advance(DAY)
        second = await complete(h, 2, "tuesday")
        h.clock.advance(7 * DAY)  # monday is 8 days old, tuesday 7 days and a few seconds: only monday is due
        done = await h.coord.retain()
        assert (done["archived"], done["pruned"]) == (3, 3)
        assert sorted(p.name for p in archive.iterdir()) == [day_file(archive, T0).name]
        assert stat.S_IMODE(day_file(archive, T0).stat().st_mode) == 0o600
        lines = list(ac.read_archive(day_file(archive, T0)))
        assert [line["job_id"] for line in lines] == first
        for line in lines:
            assert line["result"] == results[line["job_id"]]["result"]
            assert line["receipts"] == [results[line["job_id"]]["receipt"]]  # exactly as stored and served
            assert line["payload"]["prompt"].startswith("monday") and line["state"] == "COMPLETED"
            receipt = line["receipts"][0]
            assert independently_valid(receipt, EDGE_SIGNATURE["key_id"], receipt["attestations"][0]["key_id"])
            assert receipt["metadata"]["job_payload_sha256"] == sdk_digest(line["payload"])
            assert receipt["metadata"]["result_sha256"] == sdk_digest(line["result"])
            assert (await h.client.get(f"/v1/jobs/{line['job_id']}/result", headers=CLIENT)).status_code == 410
        assert (await h.client.get(f"/v1/jobs/{second[0]}/result", headers=CLIENT)).status_code == 200
        h.clock.advance(DAY)
        assert (await h.coord.retain())["archived"] == 2
        assert day_file(archive, T0 + DAY).exists()
        metrics = (await h.client.get("/metrics")).text
        assert "aitbc_archive_files_written_total 2.0" in metrics and "aitbc_archive_jobs_written_total 5.0" in metrics
    runner = CliRunner()
    checked = runner.invoke(ac.cli, ["verify", str(day_file(archive, T0)), "--key-id", EDGE_SIGNATURE["key_id"]])
    assert checked.exit_code == 0 and "valid: 3 receipts of 3 archived jobs" in checked.output, checked.output
    refused = runner.invoke(ac.cli, ["verify", str(day_file(archive, T0)), "--log", "http://127.0.0.1:25999"])
    assert refused.exit_code == ac.EXIT_LOCAL and "--log checks one receipt" in refused.output  # as README says
    one = tmp_path / "receipt.json"
    one.write_text(json.dumps(lines[0]["receipts"][0]))
    assert runner.invoke(ac.cli, ["verify", str(one), "--key-id", EDGE_SIGNATURE["key_id"]]).exit_code == 0
    lines[1]["result"]["text"] = "forged"  # an archive edited afterwards no longer matches its receipts
    forged = tmp_path / "jobs-forged.jsonl"
    forged.write_text("".join(json.dumps(line) + "\n" for line in lines))
    refused = runner.invoke(ac.cli, ["verify", str(forged)])
    assert refused.exit_code == 1 and "does not match result_sha256" in refused.output


async def test_nothing_is_pruned_that_was_not_archived(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = tmp_path / "archive"
    async with harness(tmp_path, {**SIGNING, "PAYLOAD_RETENTION_DAYS": "2", "ARCHIVE_DIR": str(archive)}) as h:
        ids = await complete(h, 2)
        h.clock.advance(4 * DAY)

        def disk_full(self: ac.ArchiveFile) -> Path:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(ac.ArchiveFile, "finish", disk_full)
        with pytest.raises(OSError):
            await h.coord.retain()
        assert list(archive.iterdir()) == []  # no partial file left behind
        assert (await h.client.get(f"/v1/jobs/{ids[0]}/result", headers=CLIENT)).status_code == 200
        assert h.coord.upkeep.archive_errors == 1 and h.coord.upkeep.pruned == 0
        monkeypatch.undo()
        assert (await h.coord.retain())["pruned"] == 2


@pytest.mark.sqlite_only  # no database in play (archive files)
def test_a_second_file_for_a_day_never_replaces_the_first(tmp_path: Path) -> None:
    day = ac.day_start(int(T0 * 1000))
    names = []
    for n in range(3):
        out = ac.ArchiveFile(tmp_path, day)
        out.write(json.dumps({"n": n}))
        names.append(out.finish().name)
    assert names == [day_file(tmp_path, T0).name, day_file(tmp_path, T0, ".2").name, day_file(tmp_path, T0, ".3").name]
    assert [line["n"] for name in names for line in ac.read_archive(tmp_path / name)] == [0, 1, 2]


@pytest.mark.sqlite_only  # no database in play (archive files)
def test_two_writers_of_one_day_each_publish_a_whole_file_of_their_own(tmp_path: Path) -> None:
    """The server's upkeep and an `aitbc-coord archive` into ARCHIVE_DIR, interleaved: each writes its own
    partial file and publishes under its own name; neither truncates nor replaces the other's."""
    day = ac.day_start(int(T0 * 1000))
    server, export = ac.ArchiveFile(tmp_path, day), ac.ArchiveFile(tmp_path, day)
    assert server.partial != export.partial and str(os.getpid()) in server.partial.name
    for n in range(200):
        server.write(json.dumps({"by": "server", "n": n, "pad": "s" * 500}))
        export.write(json.dumps({"by": "export", "n": n, "pad": "e" * 500}))
    first = server.finish()
    assert ac.ArchiveFile.remove_stale(tmp_path, time.time() + 7200) == []  # the export's partial: its writer lives
    second = export.finish()
    assert (first.name, second.name) == (day_file(tmp_path, T0).name, day_file(tmp_path, T0, ".2").name)
    for path, by in ((first, "server"), (second, "export")):
        lines = list(ac.read_archive(path))
        assert [(line["by"], line["n"]) for line in lines] == [(by, n) for n in range(200)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, second.name])


@pytest.mark.sqlite_only  # no database in play (archive files)
def test_only_partial_files_of_writers_that_are_gone_are_removed(tmp_path: Path) -> None:
    child = os.fork()
    if child == 0:
        os._exit(0)
    os.waitpid(child, 0)  # a pid that ran and is gone
    now = time.time()
    files = {name: tmp_path / name for name in (
        f".jobs-2026-01-05.{child}.ab12.partial",  # its writer is gone, untouched 20 minutes: stale
        f".jobs-2026-01-05.{child}.cd34.partial",  # its writer is gone but it was touched just now: kept
        f".jobs-2026-01-05.{os.getpid()}.ef56.partial",  # a live writer's, 20 minutes idle: kept
        f".jobs-2026-01-06.{os.getpid()}.gh78.partial",  # a live writer's, untouched for two days: stale
        ".jobs-2026-01-05.jsonl.gz.partial", ".jobs-2026-01-05.2.jsonl.gz.partial",  # an older version's: stale
        "jobs-2026-01-05.jsonl.gz", ".other.partial")}
    for path in files.values():
        path.write_bytes(b"x")
    ages = dict.fromkeys(files, 1200.0)
    ages[f".jobs-2026-01-05.{child}.cd34.partial"] = 0.0
    ages[f".jobs-2026-01-06.{os.getpid()}.gh78.partial"] = 2 * DAY
    for name, age in ages.items():
        os.utime(files[name], (now - age, now - age))
    removed = {p.name for p in ac.ArchiveFile.remove_stale(tmp_path, now)}
    assert removed == {f".jobs-2026-01-05.{child}.ab12.partial", f".jobs-2026-01-06.{os.getpid()}.gh78.partial",
                       ".jobs-2026-01-05.jsonl.gz.partial", ".jobs-2026-01-05.2.jsonl.gz.partial"}
    assert {p.name for p in tmp_path.iterdir()} == set(files) - removed


@pytest.mark.sqlite_only  # no database in play (backup files)
def test_two_backups_to_one_name_never_share_a_file(tmp_path: Path) -> None:
    db = str(tmp_path / "c.db")
    ac.migrate(db)
    dest = tmp_path / "copy.db"
    ac.backup(db, str(dest))
    with pytest.raises(ac.ConfigError, match="exists"):
        ac.backup(db, str(dest))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("copy", ".copy"))) == ["copy.db"]


async def test_an_archive_dir_that_cannot_be_written_stops_start_up(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file")
    with pytest.raises(ac.ConfigError, match="ARCHIVE_DIR: cannot write"):
        async with harness(tmp_path, {"ARCHIVE_DIR": str(blocker / "archive")}):
            pass
    with pytest.raises(ac.ConfigError, match=f"ARCHIVE_DIR: {blocker} is not a directory"):
        async with harness(tmp_path, {"ARCHIVE_DIR": str(blocker)}):
            pass


async def test_the_start_up_line_says_when_the_archive_will_never_be_written(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """With PAYLOAD_RETENTION_DAYS=keep nothing is ever due, so ARCHIVE_DIR gets nothing: the line said only
    the directory. With retention it says a day is written once the whole day is due."""
    archive = tmp_path / "archive"
    for days, expected in (("keep", "will never be written"), ("7", "once the whole day is 7 days old")):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="aitbc_coord"):
            async with harness(tmp_path, {"PAYLOAD_RETENTION_DAYS": days, "ARCHIVE_DIR": str(archive)}):
                pass
        (line,) = [r for r in caplog.records if r.getMessage().startswith("retention: payloads")]
        assert expected in line.getMessage() and str(archive) in line.getMessage(), line.getMessage()
        if days == "keep":
            assert line.levelno == logging.WARNING and "PAYLOAD_RETENTION_DAYS=keep" in line.getMessage()


async def test_the_archive_command_exports_every_finished_day_and_writes_nothing_else(tmp_path: Path) -> None:
    async with harness(tmp_path, {**SIGNING, "PAYLOAD_RETENTION_DAYS": "3"}) as h:
        old = await complete(h, 2, "old")
        h.clock.advance(5 * DAY)
        assert (await h.coord.retain())["pruned"] == 2  # pruned (no ARCHIVE_DIR): summaries and receipts stay
        fresh = await complete(h, 1, "fresh")
        db = h.coord.settings.target
    files = tmp_path if ac.is_postgres_url(db) else Path(db).parent
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files.iterdir() if p.is_file()}
    dest = tmp_path / "export"
    day_after = time.strftime("%Y-%m-%d", time.gmtime(T0 + 6 * DAY))
    out = CliRunner().invoke(ac.cli, ["archive", str(dest), "--db", db, "--before", day_after])
    assert out.exit_code == 0 and "3 jobs" in out.output and "2 files" in out.output, out.output
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files.iterdir() if p.is_file()}
    assert after == before  # no byte of a SQLite database changed, and no -wal or -shm appeared
    first, second = (list(ac.read_archive(day_file(dest, at))) for at in (T0, T0 + 5 * DAY))
    assert [j["job_id"] for j in first] == old and [j["job_id"] for j in second] == fresh
    assert all(j["payload"] is None and j["result"] is None and j["pruned_at"] for j in first)
    assert second[0]["payload"]["prompt"] == "fresh 0" and second[0]["result"]["text"] == "fresh 0 done"
    for name in (day_file(dest, T0), day_file(dest, T0 + 5 * DAY)):
        assert CliRunner().invoke(ac.cli, ["verify", str(name)]).exit_code == 0
    again = CliRunner().invoke(ac.cli, ["archive", str(dest), "--db", db, "--before", day_after])
    assert again.exit_code == 0 and day_file(dest, T0, ".2").exists()  # never replaces an export


async def test_a_pruned_archive_line_keeps_the_summary(tmp_path: Path) -> None:
    """A day archived after its jobs were pruned (ARCHIVE_DIR set later) still holds their summaries."""
    async with harness(tmp_path, {**SIGNING, "PAYLOAD_RETENTION_DAYS": "1"}) as h:
        await complete(h, 1)
        h.clock.advance(2 * DAY)
        await h.coord.retain()
        conn = open_database(h.coord.settings.target)
        rows = ac.get_jobs_by_seq(conn, [1])
        line = json.loads(ac.archive_lines(conn, rows)[0])
        conn.close()
    assert line["payload"] is None and line["state"] == "COMPLETED" and len(line["receipts"]) == 1
    assert line["finished_at"] == int((T0 + 2) * 1000) and isinstance(line["pruned_at"], int)


@pytest.mark.sqlite_only  # no database in play (archive files)
def test_a_gzip_archive_is_read_as_it_was_written(tmp_path: Path) -> None:
    path = tmp_path / "jobs.jsonl.gz"
    with gzip.open(path, "wb") as f:
        f.write(b'{"job_id": "a", "n": 123456789012345678901234567890}\n\n{"job_id": "b"}\n')
    assert [j["job_id"] for j in ac.read_archive(path)] == ["a", "b"]
    assert [j["job_id"] for j in ac.read_archive(str(path))] == ["a", "b"]  # README's users pass a str
    os.chmod(path, 0o600)


# --- heights and sequences, stalls, values that outlive their receipt ---


async def test_a_height_or_receipt_seq_never_names_a_second_job_after_the_newest_rows_are_deleted(
        tmp_path: Path) -> None:
    """The break report's example: everything 1 day, the clock 2 days on, then new jobs. Without AUTOINCREMENT
    SQLite reuses max(seq) + 1, so the newest job and receipt are never deleted."""
    env = {**SIGNING, "PAYLOAD_RETENTION_DAYS": "1", "JOB_RETENTION_DAYS": "1", "RECEIPT_RETENTION_DAYS": "1"}
    async with harness(tmp_path, env) as h:
        old = await complete(h, 3, "old")
        blocks = {b["height"]: b["hash"] for b in (await get(h, "/v1/explorer/blocks"))["items"]}
        receipt_seqs = dict(stored(h, "SELECT seq, job_id FROM receipts"))
        cursor = ac.make_cursor("blocks", max(blocks) - ac.HEIGHT_BASE)
        h.clock.advance(2 * DAY)
        done = await h.coord.retain()
        assert (done["jobs_deleted"], done["receipts_deleted"]) == (2, 2)  # all but the newest of each
        new = await complete(h, 3, "new")
        after = {b["height"]: b["hash"] for b in (await get(h, "/v1/explorer/blocks", limit=200))["items"]}
        assert set(after.values()) == {old[-1], *new}
        assert all(after.get(height, job) == job for height, job in blocks.items())  # no height names another job
        assert min(height for height, job in after.items() if job in new) > max(blocks)
        assert all(receipt_seqs.get(seq, job) == job for seq, job in stored(h, "SELECT seq, job_id FROM receipts"))
        older = (await get(h, "/v1/explorer/blocks", cursor=cursor))["items"]
        assert [b["hash"] for b in older] == []  # an old cursor walks into nothing new
        h.clock.advance(2 * DAY)
        await h.coord.retain()
        assert stored(h, "SELECT job_id FROM jobs") == [(new[-1],)]  # the kept newest goes once a newer one exists


async def test_unfinished_old_jobs_do_not_hold_up_job_retention(tmp_path: Path) -> None:
    """300 jobs that can never run (longer than the old 256-row window), then completed ones: the completed
    ones are deleted when due, found through the jobs_pruned index."""
    env = {"PAYLOAD_RETENTION_DAYS": "1", "JOB_RETENTION_DAYS": "1", "RECEIPT_RETENTION_DAYS": "1"}
    async with harness(tmp_path, env) as h:
        for i in range(300):
            await h.submit({"n": i}, constraints={"region": "nowhere"}, ttl_seconds=7 * DAY)
        done = await complete(h, 50)
        h.clock.advance(2 * DAY)
        result = await h.coord.retain()
        assert (result["pruned"], result["jobs_deleted"]) == (50, 49)  # the newest stays (seq never reused)
        assert stored(h, "SELECT COUNT(*) FROM jobs WHERE state = 'QUEUED'") == [(300,)]
        assert stored(h, "SELECT job_id FROM jobs WHERE state = 'COMPLETED'") == [(done[-1],)]
        if not h.coord.settings.postgres_url:  # (SQLite's plan: PostgreSQL's planner goes by statistics)
            with sqlite3.connect(h.coord.settings.db_path) as conn:
                plan = " ".join(r[3] for r in conn.execute(
                    "EXPLAIN QUERY PLAN SELECT seq FROM jobs WHERE pruned_at IS NOT NULL AND finished_at < 1"
                    " AND seq < (SELECT MAX(seq) FROM jobs) ORDER BY finished_at LIMIT 16"))
            assert "USING INDEX jobs_pruned" in plan


async def test_a_transaction_keeps_its_value_when_its_receipt_is_deleted(tmp_path: Path) -> None:
    """Payload value "3", receipt price 1.0: the explorer shows 1.0 before and after receipt retention."""
    env = {**SIGNING, "PAYLOAD_RETENTION_DAYS": "1", "RECEIPT_RETENTION_DAYS": "1"}
    async with harness(tmp_path, env) as h:
        await h.register(capabilities={"price": 1.0})
        for i in range(3):
            job = await h.submit({"prompt": i, "value": "3"})
            await h.take()
            assert (await h.result(job["job_id"], {"ok": i}, metrics={"units": 1})).status_code == 200
        before = (await get(h, "/v1/explorer/transactions"))["items"]
        assert {t["value"] for t in before} == {"1.0"}
        totals = await kept_totals(h)
        h.clock.advance(2 * DAY)
        assert (await h.coord.retain())["receipts_deleted"] == 2
        assert (await get(h, "/v1/explorer/transactions"))["items"] == before
        assert await kept_totals(h) == totals


async def test_bids_go_after_job_retention_and_their_total_counts_history(tmp_path: Path) -> None:
    async with harness(tmp_path, {"PAYLOAD_RETENTION_DAYS": "1", "JOB_RETENTION_DAYS": "2"}) as h:
        ids = []
        for i in range(4):
            r = await h.client.post("/v1/marketplace/bids", json={"provider": f"p{i}", "capacity": 1, "price": 1.0})
            assert r.status_code == 202
            ids.append(r.json()["id"])
        stats = await get(h, "/v1/marketplace/stats")
        h.clock.advance(DAY)
        assert (await h.coord.retain())["bids_deleted"] == 0
        h.clock.advance(2 * DAY)
        assert (await h.coord.retain())["bids_deleted"] == 3  # never the newest: its seq is never reused
        for bid_id in ids[:3]:
            assert (await h.client.get(f"/v1/marketplace/bids/{bid_id}")).status_code == 404
        assert (await h.client.get(f"/v1/marketplace/bids/{ids[3]}")).status_code == 200
        assert await get(h, "/v1/marketplace/stats") == stats


async def test_a_repeated_result_after_pruning_gets_the_same_receipt_while_the_receipt_is_kept(
        tmp_path: Path) -> None:
    """The result is gone, but its receipt's result_sha256 says whether the repeat is the same result."""
    async with harness(tmp_path, {**SIGNING, "PAYLOAD_RETENTION_DAYS": "1"}) as h:
        [job_id] = await complete(h, 1)
        first = await h.result(job_id, {"text": "job 0 done", "tokens": 0}, metrics={"units": 2})
        h.clock.advance(2 * DAY)
        assert (await h.coord.retain())["pruned"] == 1
        again = await h.result(job_id, {"tokens": 0, "text": "job 0 done"}, metrics={"units": 2})
        assert (again.status_code, again.json()) == (200, first.json())
        other = await h.result(job_id, {"text": "something else", "tokens": 0}, metrics={"units": 2})
        assert other.status_code == 409


async def test_verify_refuses_archive_lines_whose_receipts_are_not_receipts_of_that_job(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    env = {**SIGNING, "PAYLOAD_RETENTION_DAYS": "1", "ARCHIVE_DIR": str(archive)}
    async with harness(tmp_path, env) as h:
        await complete(h, 2)
        h.clock.advance(2 * DAY)
        assert (await h.coord.retain())["archived"] == 2
    good = list(ac.read_archive(day_file(archive, T0)))
    runner = CliRunner()

    def verify(name: str, *lines: Any, raw: bytes | None = None) -> Any:
        path = tmp_path / f"{name}.jsonl.gz"
        path.write_bytes(gzip.compress(raw if raw is not None else b"".join(json.dumps(line).encode() + b"\n"
                                                                            for line in lines)))
        return runner.invoke(ac.cli, ["verify", str(path)])

    for name, line, message in (
            ("string", {**good[0], "receipts": "x" * 3000}, "receipts is not a list"),
            ("missing", {k: v for k, v in good[0].items() if k != "receipts"}, "receipts is not a list"),
            ("other-job", {**good[0], "job_id": "someone-else"}, "not this line's"),
            ("swapped", {**good[0], "receipts": good[1]["receipts"]}, "not this line's"),
            ("no-id", {**good[0], "job_id": 7}, "job_id is not a string"),
            ("no-result", {**good[0], "result": None}, "holds no result")):
        checked = verify(name, good[1], line)
        assert checked.exit_code == 1 and message in checked.output, (name, checked.output)
    for raw in (b"[" * 100_000 + b"\n", b'{"a":' * 200 + b"1" + b"}" * 200 + b"\n"):
        checked = verify("deep", raw=raw)
        assert checked.exit_code == 1 and "is not a readable archive" in checked.output, checked.output
        assert "Traceback" not in checked.output and checked.output.count("\n") == 1
    pruned = {**good[0], "payload": None, "result": None, "metrics": None, "pruned_at": T0 * 1000}
    assert verify("fine", good[1], pruned).exit_code == 0  # a pruned export line holds no result


async def test_a_run_stopped_between_publishing_and_pruning_is_not_archived_twice(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kill -9 after jobs-D.jsonl.gz is in place, before its jobs are pruned: the next pass recognises the
    published lines (exactly what it would write) and prunes those jobs instead of writing the day again;
    a job whose line no longer matches (the file edited) is archived again, alone."""
    archive = tmp_path / "archive"
    async with harness(tmp_path, {**SIGNING, "PAYLOAD_RETENTION_DAYS": "1", "ARCHIVE_DIR": str(archive)}) as h:
        ids = await complete(h, 40)
        h.clock.advance(2 * DAY)

        def killed(*args: Any) -> Any:
            raise RuntimeError("killed")

        with monkeypatch.context() as patched:
            patched.setattr(ac, "tx_prune", killed)
            with pytest.raises(RuntimeError):
                await h.coord.retain()
        first = day_file(archive, T0)
        assert [line["job_id"] for line in ac.read_archive(first)] == ids
        assert stored(h, "SELECT COUNT(*) FROM jobs WHERE pruned_at IS NULL") == [(40,)]
        done = await h.coord.retain()
        assert (done["archived"], done["pruned"]) == (0, 40)
        assert sorted(p.name for p in archive.iterdir()) == [first.name]

        later = await complete(h, 3, "later")
        h.clock.advance(2 * DAY)
        with monkeypatch.context() as patched:
            patched.setattr(ac, "tx_prune", killed)
            with pytest.raises(RuntimeError):
                await h.coord.retain()
        [second] = [p for p in archive.iterdir() if p.name != first.name]
        raw = gzip.decompress(second.read_bytes()).splitlines(keepends=True)
        edited = json.loads(raw[1])
        edited["result"] = {"text": "edited"}
        raw[1] = json.dumps(edited).encode() + b"\n"
        second.write_bytes(gzip.compress(b"".join(raw)))  # the other lines byte for byte as written
        done = await h.coord.retain()
        assert (done["archived"], done["pruned"]) == (1, 3)  # two recognised, the edited one archived again
        third = sorted(set(archive.iterdir()) - {first, second})
        assert [[line["job_id"] for line in ac.read_archive(p)] for p in third] == [[later[1]]]


@pytest.mark.sqlite_only  # an immutable reader of a SQLite file
async def test_an_export_of_a_stopped_database_that_a_server_starts_writing_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without -wal/-shm the export reads the file as immutable (no locks, no change seen): a server that
    starts and writes meanwhile is detected and named, never 'malformed', and no file of what was read
    after is published."""
    async with harness(tmp_path, SIGNING) as h:
        await complete(h, 3, "first")
        h.clock.advance(DAY)
        await complete(h, 3, "second")
        db = h.coord.settings.db_path
    assert not Path(db + "-wal").exists()
    real, calls = ac.archive_lines, []

    def server_starts(conn: sqlite3.Connection, rows: Any) -> list[str]:
        calls.append(1)
        if len(calls) == 1:
            writer = sqlite3.connect(db)  # a server starting on the file: a write, checkpointed into it
            writer.execute("UPDATE counters SET n = n + 1 WHERE name = 'active_bids'")
            writer.commit()
            writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            writer.close()
        return real(conn, rows)

    monkeypatch.setattr(ac, "archive_lines", server_starts)
    dest = tmp_path / "export"
    out = CliRunner().invoke(ac.cli, ["archive", str(dest), "--db", db,
                                      "--before", time.strftime("%Y-%m-%d", time.gmtime(T0 + 3 * DAY))])
    assert out.exit_code == 1 and "the database changed during the export" in out.output, out.output
    assert "malformed" not in out.output
    assert [p.name for p in dest.iterdir()] == []  # nothing read after the change was published


# --- wall-clock steps ---


async def test_a_wall_clock_step_ahead_pauses_retention_until_it_steps_back_or_holds_a_day(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The break report's case: JOB_RETENTION_DAYS=35 and a clock 40 days ahead for a moment deleted every
    job. A pass now trusts the wall clock only as far as the monotonic clock went since the last pass
    (plus a day); a step that holds for a day is taken as right."""
    monotonic = FakeClock(1000.0)
    env = {**SIGNING, "PAYLOAD_RETENTION_DAYS": "30", "JOB_RETENTION_DAYS": "35"}
    async with harness(tmp_path, env, monotonic=monotonic) as h:
        ids = await complete(h, 5)
        assert (await h.coord.retain())["refused"] == 0
        h.clock.advance(40 * DAY)  # the wall clock steps; a minute passes
        monotonic.advance(60)
        done = await h.coord.retain()
        assert (done["refused"], done["pruned"], done["jobs_deleted"]) == (1, 0, 0)
        assert "retention paused: the wall clock" in caplog.text and "40.0 days ahead" in caplog.text
        metrics = (await h.client.get("/metrics")).text
        assert "aitbc_retention_passes_refused_total 1.0" in metrics
        assert "aitbc_retention_clock_step_seconds 3.45" in metrics  # 40 days less the minute, in seconds
        h.clock.advance(-40 * DAY)  # set right again: nothing was lost
        monotonic.advance(60)
        assert (await h.coord.retain())["refused"] == 0
        assert len(stored(h, "SELECT job_id FROM jobs")) == 5
        assert "aitbc_retention_clock_step_seconds 0.0" in (await h.client.get("/metrics")).text
        h.clock.advance(40 * DAY)  # a step that stays: paused for a day of monotonic time, then trusted
        for _ in range(24):  # first seen at the first hour: held 23 hours at the last
            h.clock.advance(3600)
            monotonic.advance(3600)
            assert (await h.coord.retain())["refused"] == 1
        h.clock.advance(3600)
        monotonic.advance(3600)
        done = await h.coord.retain()
        assert (done["refused"], done["pruned"], done["jobs_deleted"]) == (0, 5, 4)
        assert stored(h, "SELECT job_id FROM jobs") == [(ids[-1],)]


async def test_a_restart_after_a_long_stop_waits_and_a_stored_clock_in_the_future_is_restarted(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ahead = FakeClock(T0 + 3650 * DAY)  # the first start with retention on a clock ten years ahead
    async with harness(tmp_path, {"PAYLOAD_RETENTION_DAYS": "1"}, clock=ahead) as h:
        await complete(h, 2, "ahead")
        await h.coord.retain()
    async with harness(tmp_path, {"PAYLOAD_RETENTION_DAYS": "1"}) as h:  # the clock is right again
        assert "its clock was stored as started at" in caplog.text and "restarting it now" in caplog.text
        assert h.coord.retention_clock == int(T0 * 1000)
        assert "aitbc_retention_clock_resets_total 1.0" in (await h.client.get("/metrics")).text
        ids = await complete(h, 3, "now")
        h.clock.advance(2 * DAY)
        assert (await h.coord.retain())["pruned"] == 3  # (those stamped ten years ahead are due then)
        assert {r[0] for r in stored(h, "SELECT job_id FROM jobs WHERE pruned_at IS NOT NULL")} == set(ids)
    later = FakeClock(T0 + 5 * DAY)  # stopped for three days: as good as a step, until it holds a day
    monotonic = FakeClock(0.0)
    async with harness(tmp_path, {"PAYLOAD_RETENTION_DAYS": "1"}, clock=later, monotonic=monotonic) as h:
        await h.register()
        job = await h.submit({"n": 1})
        await h.take()
        await h.result(job["job_id"], {"ok": 1})
        assert (await h.coord.retain())["refused"] == 1  # it cannot tell a long stop from a step
        later.advance(DAY + 3600)
        monotonic.advance(DAY + 3600)
        done = await h.coord.retain()
        assert (done["refused"], done["pruned"]) == (0, 1)
