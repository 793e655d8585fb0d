"""Operations: metrics, access log, JSON logs, backup and restore (in-process)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sqlite3
import sys

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

import aitbc_coord as ac
from conftest import CLIENT, MINER, Harness, harness
from test_receipts import EDGE_SEED

pytestmark = pytest.mark.anyio
NAMED = {"CLIENT_API_KEYS": "alice=secret-client-key-1", "MINER_API_KEYS": "rig=secret-miner-key-1",
         "ADMIN_API_KEYS": "ops=secret-admin-key-1", "RECEIPT_SIGNING_KEY_HEX": EDGE_SEED}
ALICE, RIG, OPS = ({"X-Api-Key": k} for k in ("secret-client-key-1", "secret-miner-key-1", "secret-admin-key-1"))


async def scrape(h: Harness, headers: dict[str, str] | None = None) -> dict[str, list]:
    r = await h.client.get("/metrics", headers=headers or {})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {f.name: f.samples for f in text_string_to_metric_families(r.text)}


def value(families: dict[str, list], name: str, **labels: str) -> float:
    return sum(s.value for fam in families.values() for s in fam
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


async def run_one_job(h: Harness, client: dict = CLIENT, miner: dict = MINER) -> str:
    job = await h.submit(headers=client)
    await h.register(miner)
    await h.take(miner)
    assert (await h.result(job["job_id"], headers=miner)).status_code == 200
    return job["job_id"]


async def test_metrics_families_are_present_and_move(tmp_path) -> None:
    async with harness(tmp_path, NAMED) as h:
        before = await scrape(h)
        for name in ("aitbc_http_requests", "aitbc_http_request_duration_seconds", "aitbc_jobs", "aitbc_queue_depth",
                     "aitbc_miners_online", "aitbc_receipts_issued", "aitbc_polls_waiting", "aitbc_db_commit_seconds",
                     "aitbc_db_commit_units", "aitbc_db_bytes", "aitbc_db_free_bytes", "aitbc_db_wal_bytes",
                     "aitbc_db_checkpoints", "aitbc_retention_payloads_pruned", "aitbc_retention_jobs_deleted",
                     "aitbc_retention_receipts_deleted", "aitbc_archive_files_written", "aitbc_archive_jobs_written",
                     "aitbc_archive_errors"):
            assert name in before, name
        await run_one_job(h, ALICE, RIG)
        await h.submit(headers=ALICE)
        taken = await h.client.post("/v1/miners/poll", json={"max_wait_seconds": 10}, headers=RIG)
        assert taken.status_code == 200
        after = await scrape(h)
        assert value(after, "aitbc_http_requests_total", route="/v1/jobs", status="201") == 2
        assert value(after, "aitbc_http_requests_total", route="/v1/miners/{job_id}/result", status="200") == 1
        assert value(after, "aitbc_http_request_duration_seconds_count", route="/v1/jobs") == 2
        assert value(after, "aitbc_receipts_issued_total") == 1 == value(before, "aitbc_receipts_issued_total") + 1
        assert value(after, "aitbc_jobs", state="COMPLETED") == 1 and value(after, "aitbc_miners_online") == 1
        assert value(after, "aitbc_db_commit_seconds_count") > value(before, "aitbc_db_commit_seconds_count")
        for i in range(3):  # made-up methods share one label value: the series stay bounded
            assert (await h.client.request(f"BREW{i}", "/v1/nowhere")).status_code == 404
        after = await scrape(h)
        assert value(after, "aitbc_http_requests_total", method="OTHER", route="unmatched", status="404") == 3
        await h.client.post("/v1/jobs", json={"payload": {}, "constraints": {"region": "mars"}}, headers=ALICE)
        blocked = asyncio.create_task(h.client.post("/v1/miners/poll", json={"max_wait_seconds": 0.5}, headers=RIG))
        await h.parked(1)
        now = await scrape(h)
        assert value(now, "aitbc_polls_waiting") == 1 and value(now, "aitbc_queue_depth") == 1
        assert (await blocked).status_code == 204


async def test_metrics_can_require_the_admin_key(tmp_path) -> None:
    async with harness(tmp_path, {**NAMED, "METRICS_REQUIRE_ADMIN_KEY": "true"}) as h:
        assert (await h.client.get("/metrics")).status_code == 401
        assert (await h.client.get("/metrics", headers=ALICE)).status_code == 401
        assert "aitbc_jobs" in await scrape(h, OPS)


async def test_one_access_line_per_request_with_identity_never_key(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with harness(tmp_path, NAMED) as h:
        await run_one_job(h, ALICE, RIG)
        await h.client.get("/v1/jobs/nope", headers=ALICE)
        await h.client.get("/v1/admin/stats", headers={"Authorization": "Bearer secret-client-key-1"})
        await h.client.get("/v1/nowhere")
    access = [r for r in caplog.records if r.name == "aitbc_coord.access"]
    assert [(r.method, r.route, r.status, r.caller) for r in access] == [
        ("POST", "/v1/jobs", 201, "alice"), ("POST", "/v1/miners/register", 200, "rig"),
        ("POST", "/v1/miners/poll", 200, "rig"), ("POST", "/v1/miners/{job_id}/result", 200, "rig"),
        ("GET", "/v1/jobs/{job_id}", 404, "alice"), ("GET", "/v1/admin/stats", 401, "-"),
        ("GET", "unmatched", 404, "-")]
    assert all(r.duration_ms >= 0 for r in access)
    text = caplog.text + "".join(json.dumps(r.__dict__, default=str) for r in caplog.records)
    for secret in ("secret-client-key-1", "secret-miner-key-1", "secret-admin-key-1", EDGE_SEED):
        assert secret not in text
    assert any("receipt signing key" in r.getMessage() for r in caplog.records)  # key ids are logged instead


async def test_lines_logged_on_the_loop_go_out_once_per_iteration_and_warnings_at_once() -> None:
    class Stream(io.StringIO):
        flushed: list[str] = []

        def flush(self) -> None:
            self.flushed.append(self.getvalue())

    stream = Stream()
    handler = ac.BurstHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("burst-test")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        for i in range(3):
            logger.info("line %d", i)
        assert stream.flushed == []  # a burst of access lines...
        await asyncio.sleep(0)
        assert stream.flushed == ["line 0\nline 1\nline 2\n"]  # ...is written once, an iteration later
        logger.warning("trouble")
        assert stream.flushed[-1].endswith("trouble\n")  # warnings do not wait
        await asyncio.to_thread(logger.info, "from a thread")
        assert stream.flushed[-1].endswith("from a thread\n")  # nor lines from other threads
    finally:
        logger.removeHandler(handler)


def test_text_lines_read_as_the_documented_format() -> None:
    fast = ac.TextFormatter()
    general = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    general.formatTime = fast.formatTime  # type: ignore[method-assign]
    access = ac.AccessRecord("POST", "/v1/jobs", 201, 0.00123, "client-x")
    other = logging.LogRecord("aitbc_coord", logging.WARNING, __file__, 1, "disk %s", ("full",), None)
    for record in (access, other):
        assert fast.format(record) == general.format(record)
    assert fast.format(access).endswith(" INFO aitbc_coord.access: POST /v1/jobs 201 1.2ms caller=client-x")
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.LogRecord("aitbc_coord", logging.ERROR, __file__, 1, "unhandled", (), sys.exc_info())
    assert fast.format(failed).splitlines()[-1] == "ValueError: boom"  # the traceback follows the line


def test_json_log_lines() -> None:
    record = logging.LogRecord("aitbc_coord.access", logging.INFO, __file__, 1, "GET %s", ("/x",), None)
    record.route, record.status, record.caller = "/v1/jobs", 200, "alice"
    line = json.loads(ac.JsonFormatter().format(record))
    assert (line["level"], line["logger"], line["msg"], line["route"], line["status"], line["caller"]) == (
        "info", "aitbc_coord.access", "GET /x", "/v1/jobs", 200, "alice")
    assert line["ts"].endswith("Z")


@pytest.mark.sqlite_only  # `aitbc-coord backup` copies the SQLite file (PostgreSQL: pg_dump)
async def test_backup_under_write_load_holds_every_earlier_job(tmp_path) -> None:
    async with harness(tmp_path) as h:
        acked: list[str] = []
        stop = asyncio.Event()

        async def load() -> None:
            while not stop.is_set():
                acked.append((await h.submit({"n": len(acked)}))["job_id"])

        writers = [asyncio.create_task(load()) for _ in range(4)]
        while len(acked) < 200:
            await asyncio.sleep(0.01)
        before = list(acked)
        dest = tmp_path / "backup.db"
        done = await asyncio.to_thread(ac.backup, h.coord.settings.db_path, str(dest))
        after = len(acked)
        stop.set()
        await asyncio.gather(*writers)
        assert after > len(before)  # writes went on around the copy
    copy = sqlite3.connect(dest)
    try:
        assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        have = {r[0] for r in copy.execute("SELECT job_id FROM jobs")}
    finally:
        copy.close()
    assert set(before) <= have and done["jobs"] == len(have) >= len(before)
    assert oct(dest.stat().st_mode & 0o777) == "0o600"


@pytest.mark.sqlite_only  # `aitbc-coord backup` copies the SQLite file (PostgreSQL: pg_dump)
async def test_a_backup_restores(tmp_path) -> None:
    async with harness(tmp_path, {"RECEIPT_SIGNING_KEY_HEX": EDGE_SEED}) as h:
        job_id = await run_one_job(h)
        receipt = (await h.client.get(f"/v1/jobs/{job_id}/receipt", headers=CLIENT)).json()
    runner = CliRunner()
    out = runner.invoke(ac.cli, ["backup", "--db", str(tmp_path / "coord.db"), str(tmp_path / "b.db")])
    assert out.exit_code == 0 and "integrity ok" in out.output and "1 jobs" in out.output
    again = runner.invoke(ac.cli, ["backup", "--db", str(tmp_path / "coord.db"), str(tmp_path / "b.db")])
    assert again.exit_code == 1 and "exists" in again.output
    missing = runner.invoke(ac.cli, ["backup", "--db", str(tmp_path / "none.db"), str(tmp_path / "c.db")])
    assert missing.exit_code == 1 and "no database" in missing.output
    restored = tmp_path / "restored"
    restored.mkdir()
    (restored / "coord.db").write_bytes((tmp_path / "b.db").read_bytes())
    async with harness(restored, {"RECEIPT_SIGNING_KEY_HEX": EDGE_SEED}) as h:
        assert (await h.job(job_id))["state"] == "COMPLETED"
        assert (await h.client.get(f"/v1/jobs/{job_id}/receipt", headers=CLIENT)).json() == receipt
