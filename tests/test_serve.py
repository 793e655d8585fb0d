"""The real `aitbc-coord serve` in a subprocess, driven over HTTP like the existing clients do."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from nacl.signing import SigningKey

import aitbc_coord as ac
from conftest import database_of, open_database

CLIENT = {"X-Api-Key": ac.DEV_KEYS["client"]}
MINER = {"X-Api-Key": ac.DEV_KEYS["miner"]}


def start_server(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """Start serve on a free port; returns the process and its base URL once it answers."""
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - closed with the process below
    proc = subprocess.Popen([sys.executable, "-m", "aitbc_coord", "serve", "--port", "0", *args],
                            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                            env={k: v for k, v in os.environ.items() if not k.endswith("_API_KEYS")} | (env or {}))
    log.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = (tmp_path / "serve.log").read_text()
        m = re.search(r"listening on (http://[\d.]+:\d+)", text)
        if m and "Application startup complete" in text:
            return proc, m.group(1)
        if proc.poll() is not None:
            raise AssertionError(f"serve exited early:\n{text}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("serve did not start")


@pytest.mark.both_backends
def test_serve_runs_a_whole_job_the_way_upstream_clients_do(tmp_path: Path) -> None:
    seed = SigningKey.generate().encode().hex()
    proc, base = start_server(tmp_path, "--db", database_of(tmp_path),
                              env={"APP_ENV": "dev", "RECEIPT_SIGNING_KEY_HEX": seed})
    try:
        with httpx.Client(base_url=base + "/v1", timeout=10) as http:
            assert http.get("/health").json()["status"] == "ok"
            r = http.post("/miners/register", params={"miner_id": "cli-miner"},
                          json={"capabilities": {"price": 1}}, headers=MINER)
            assert r.status_code == 200
            r = http.post("/jobs", json={"payload": {"task": "receipt"}}, headers=CLIENT)
            assert r.status_code == 201 and "job_id" in r.json()
            job_id = r.json()["job_id"]
            r = http.post("/miners/poll", json={"max_wait_seconds": 1},
                          headers={"Authorization": f"Bearer {ac.DEV_KEYS['miner']}"})
            assert r.status_code == 200 and r.json()["job_id"] == job_id
            r = http.post(f"/miners/{job_id}/result", headers=MINER, json={
                "result": {"units": 1, "unit_type": "gpu_seconds", "price": 1},
                "metrics": {"units": 1, "duration_ms": 500}})
            assert r.status_code == 200
            receipt = r.json()["receipt"]
            assert (receipt["units"], receipt["price"], receipt["unit_price"]) == (1, 1, 1)
            assert http.get(f"/jobs/{job_id}/receipt", headers=CLIENT).json() == receipt
            assert http.post("/receipts/verify", json={"receipt": receipt}).json()["valid"] is True
            view = http.get(f"/jobs/{job_id}", headers=CLIENT).json()
            assert view["state"] == "COMPLETED" and view["assigned_miner_id"].startswith("miner-")
            assert http.get(f"/jobs/{job_id}/result", headers=CLIENT).json()["result"]["units"] == 1
            r = http.post("/miners/poll", json={"max_wait_seconds": 0.2}, headers=MINER)
            assert r.status_code == 204
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    log = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in log
    for key in (*ac.DEV_KEYS.values(), seed):
        assert key not in log
    assert "receipt signing key" in log


def test_serve_refuses_a_newer_database_without_a_traceback(tmp_path: Path) -> None:
    import sqlite3

    db = tmp_path / "c.db"
    ac.migrate(str(db))
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = 999")
    conn.close()
    out = subprocess.run([sys.executable, "-m", "aitbc_coord", "serve", "--port", "0", "--db", str(db)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "newer" in out.stderr and "Traceback" not in out.stderr


def serve_refused(tmp_path: Path, db: Path, env: dict[str, str]) -> str:
    """Run serve on `db` expecting it to refuse to start: its last line (stderr), after checking that it
    exits 1 with no traceback and not through uvicorn's "Application startup failed" (exit 3)."""
    out = subprocess.run([sys.executable, "-m", "aitbc_coord", "serve", "--port", "0", "--db", str(db)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=30,
                         env={k: v for k, v in os.environ.items() if not k.startswith(("RECEIPT_", "APP_"))} | env)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "Application startup failed" not in out.stderr, out.stderr
    return out.stderr.splitlines()[-1]


def test_serve_refuses_a_new_origin_for_a_log_that_has_one(tmp_path: Path) -> None:
    db, seed = tmp_path / "c.db", SigningKey.generate().encode().hex()
    settings = ac.Settings.load({"RECEIPT_SIGNING_KEY_HEX": seed}, db_path=str(db), sweep_interval_seconds=0)

    async def first_start() -> str:  # publishes the log's first checkpoint, under the default origin
        app = ac.App(settings)
        async with app.lifespan():
            return app.coord.notary.origin

    origin = asyncio.run(first_start())
    line = serve_refused(tmp_path, db, {"APP_ENV": "dev", "RECEIPT_SIGNING_KEY_HEX": seed,
                                        "RECEIPT_LOG_ORIGIN": "coord.example.org/other"})
    assert line == (f"Error: RECEIPT_LOG_ORIGIN: the receipt log's checkpoints carry the origin {origin}, not "
                    f"coord.example.org/other; a log keeps its origin for life: set RECEIPT_LOG_ORIGIN={origin} or unset it")


def test_serve_refuses_a_development_key_file_it_cannot_use_in_one_line(tmp_path: Path) -> None:
    key = tmp_path / "c.db.dev-signing-key"
    key.write_text("")  # as a crash between creating and writing it once left it
    key.chmod(0o600)
    line = serve_refused(tmp_path, tmp_path / "c.db", {"APP_ENV": "dev"})
    assert line.startswith(f"Error: development signing key {key}: must be 64 hex characters") and \
        line.endswith(f"; deleting {key} makes a new development key"), line


def test_sigterm_releases_a_waiting_long_poll_and_exits_cleanly(tmp_path: Path) -> None:
    import threading

    proc, base = start_server(tmp_path, "--db", str(tmp_path / "c.db"), env={"APP_ENV": "dev"})
    outcome: dict[str, object] = {}
    try:
        with httpx.Client(base_url=base + "/v1", timeout=30) as http:
            assert http.post("/miners/register", json={"capabilities": {}}, headers=MINER).status_code == 200

            def wait() -> None:
                started = time.monotonic()
                r = http.post("/miners/poll", json={"max_wait_seconds": 25}, headers=MINER)
                outcome.update(status=r.status_code, seconds=time.monotonic() - started)

            poller = threading.Thread(target=wait)
            poller.start()
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            poller.join(timeout=20)
        assert outcome["status"] == 204 and outcome["seconds"] < 10  # not the 25 s it asked for
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.both_backends
def test_sigterm_under_load_loses_no_acknowledged_write(tmp_path: Path) -> None:
    import threading

    db = database_of(tmp_path)
    proc, base = start_server(tmp_path, "--db", db, env={"APP_ENV": "dev"})
    acked: list[str] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=base + "/v1", timeout=10) as http:
            while not stop.is_set():
                try:
                    r = http.post("/jobs", json={"payload": {"n": len(acked)}}, headers=CLIENT)
                except httpx.HTTPError:
                    return  # the server has stopped accepting
                if r.status_code == 201:
                    acked.append(r.json()["job_id"])

    workers = [threading.Thread(target=load) for _ in range(4)]
    try:
        for w in workers:
            w.start()
        deadline = time.monotonic() + 30
        while len(acked) < 100 and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert time.monotonic() - started < 10
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=15)
        if proc.poll() is None:
            proc.kill()
    conn = open_database(db)
    try:
        stored = {r[0] for r in conn.execute("SELECT job_id FROM jobs")}
        if not ac.is_postgres_url(db):
            assert tuple(conn.execute("PRAGMA integrity_check").fetchone()) == ("ok",)
    finally:
        conn.close()
    assert len(acked) >= 100 and set(acked) <= stored  # every 201 was committed


def test_check_against_a_running_server(tmp_path: Path) -> None:
    seed = SigningKey.generate().encode().hex()
    proc, base = start_server(tmp_path, "--db", str(tmp_path / "c.db"),
                              env={"APP_ENV": "dev", "RECEIPT_SIGNING_KEY_HEX": seed})
    try:
        cmd = [sys.executable, "-m", "aitbc_coord", "check", "--url", base]
        ok = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.startswith("check ok: 9 steps passed") and "receipt" in ok.stdout
        bad = subprocess.run([*cmd, "--client-key", "wrong-key"], capture_output=True, text=True, timeout=60,
                             cwd=tmp_path)
        assert bad.returncode == 1 and "step 'submit'" in bad.stderr and "401" in bad.stderr
        env = {**os.environ, "AITBC_URL": base, "AITBC_MINER_KEY": "wrong-key"}
        bad = subprocess.run([sys.executable, "-m", "aitbc_coord", "check"], capture_output=True, text=True,
                             timeout=60, cwd=tmp_path, env=env)
        assert bad.returncode == 1 and "step 'register'" in bad.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)


def test_check_in_process_from_an_empty_directory(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "aitbc_coord", "check"], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path, env={k: v for k, v in os.environ.items() if not k.startswith("AITBC_")})
    assert out.returncode == 0, out.stderr
    assert "9 steps passed" in out.stdout and "throwaway" in out.stdout
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_logs_never_carry_keys_and_can_be_json(tmp_path: Path) -> None:
    import json

    keys = {"CLIENT_API_KEYS": "c1=client-secret-9", "MINER_API_KEYS": "m1=miner-secret-9",
            "ADMIN_API_KEYS": "a1=admin-secret-9", "APP_ENV": "prod"}
    proc, base = start_server(tmp_path, "--db", str(tmp_path / "c.db"), "--log-format", "json", env=keys)
    try:
        out = subprocess.run([sys.executable, "-m", "aitbc_coord", "check", "--url", base, "--client-key",
                              "client-secret-9", "--miner-key", "miner-secret-9"], capture_output=True, text=True,
                             timeout=60, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        with httpx.Client(base_url=base) as http:
            http.get("/v1/admin/stats", headers={"Authorization": "Bearer client-secret-9"})
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
    lines = (tmp_path / "serve.log").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is JSON
    access = [r for r in records if r["logger"] == "aitbc_coord.access"]
    assert len(access) >= 10 and {"method", "route", "status", "duration_ms", "caller"} <= set(access[0])
    assert any(r["route"] == "/v1/admin/stats" and r["status"] == 401 for r in access)
    assert {r["caller"] for r in access} >= {"c1", "m1"}
    text = "\n".join(lines)
    for secret in ("client-secret-9", "miner-secret-9", "admin-secret-9"):
        assert secret not in text
    assert any("schema version" in r["msg"] and "c.db" in r["msg"] for r in records)


def test_the_listening_socket_is_tcp_so_responses_are_not_delayed() -> None:
    import socket

    sock = ac.bind_socket("127.0.0.1", 0)
    try:  # asyncio sets TCP_NODELAY only on IPPROTO_TCP sockets; without it responses stall ~40 ms
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()
