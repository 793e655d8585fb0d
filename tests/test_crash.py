"""Crash safety (issue 7.1): kill -9 the real server under load, restart it, account for everything.

Also the receipt log's guarantees (issue 17): every acknowledged receipt has a leaf, leaf indexes are
consecutive, and the latest checkpoint after the restarts is consistent with every checkpoint that was
published before a crash (checked with the independent verifier of tests/rfc9162.py).

CRASH_CYCLES sets the number of kills (default 3; the README's figures come from 20).
"""

from __future__ import annotations

import base64
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from nacl.signing import SigningKey

import aitbc_coord as ac
import rfc9162 as rfc

SEED = SigningKey.generate().encode().hex()
KEYS = {"CLIENT_API_KEYS": "c1=crash-client", "MINER_API_KEYS": ",".join(f"m{i}=crash-miner-{i}" for i in range(3)),
        "ADMIN_API_KEYS": "ops=crash-admin"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, tmp: Path, port: int) -> None:
        self.tmp, self.port, self.proc = tmp, port, None
        self.env = {**os.environ, **KEYS, "APP_ENV": "prod", "RECEIPT_SIGNING_KEY_HEX": SEED,
                    "JOB_MAX_ATTEMPTS": "1000", "HEARTBEAT_TIMEOUT_SECONDS": "3", "RATE_LIMIT_REQUESTS": "0"}

    def start(self) -> None:
        log = open(self.tmp / "serve.log", "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen([sys.executable, "-m", "aitbc_coord", "serve", "--port", str(self.port), "--db",
                                      str(self.tmp / "crash.db"), "--log-level", "warning"],
                                     cwd=self.tmp, env=self.env, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/v1/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert self.proc.poll() is None and time.monotonic() < deadline, (self.tmp / "serve.log").read_text()
            time.sleep(0.05)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=20) == 0


class Load:
    """Clients submitting and miners taking and finishing jobs, riding out the crashes."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.acked: set[str] = set()
        self.results: dict[str, list[dict]] = {}  # job id -> receipts of results that got 200
        self.stop_clients, self.stop_miners = threading.Event(), threading.Event()
        self.lock = threading.Lock()
        self.checkpoints: dict[int, str] = {}  # tree size -> the signed note, as published

    def watcher(self) -> None:
        """Read the published checkpoint over and over, as a monitor would, keeping each one seen."""
        with httpx.Client(base_url=self.base, timeout=5) as http:
            while not self.stop_miners.is_set():
                try:
                    r = http.get("/v1/log/checkpoint")
                except httpx.TransportError:
                    time.sleep(0.05)
                    continue
                if r.status_code == 200:
                    cp = r.json()
                    seen = self.checkpoints.setdefault(cp["tree_size"], cp["note"])
                    assert seen == cp["note"], f"two checkpoints of {cp['tree_size']} leaves"
                time.sleep(0.05)

    def client(self) -> None:
        with httpx.Client(base_url=self.base, timeout=5, headers={"X-Api-Key": "crash-client"}) as http:
            while not self.stop_clients.is_set():
                try:
                    r = http.post("/v1/jobs", json={"payload": {"n": random.random()}, "ttl_seconds": 3600})
                except httpx.TransportError:
                    time.sleep(0.05)
                    continue
                if r.status_code == 201:
                    with self.lock:
                        self.acked.add(r.json()["job_id"])

    def miner(self, i: int) -> None:
        registered = False
        with httpx.Client(base_url=self.base, timeout=5, headers={"X-Api-Key": f"crash-miner-{i}"}) as http:
            while not self.stop_miners.is_set():
                try:
                    if not registered:
                        registered = http.post("/v1/miners/register", json={"capabilities": {"price": 1},
                                                                             "concurrency": 1}).status_code == 200
                        continue
                    r = http.post("/v1/miners/poll", json={"max_wait_seconds": 0.3})
                    if r.status_code == 404:  # a fresh database would not know it; never happens here
                        registered = False
                    if r.status_code != 200:
                        continue
                    job_id = r.json()["job_id"]
                    done = http.post(f"/v1/miners/{job_id}/result", json={"result": {"job": job_id},
                                                                           "metrics": {"units": 1}})
                    if done.status_code == 200:
                        with self.lock:
                            self.results.setdefault(job_id, []).append(done.json()["receipt"])
                except httpx.TransportError:
                    registered = False  # the server died: after its restart, register again
                    time.sleep(0.05)


@pytest.mark.slow
def test_kill_9_under_load_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    cycles = int(os.environ.get("CRASH_CYCLES", "3"))
    rng = random.Random(os.environ.get("CRASH_SEED", "7"))
    server = Server(tmp_path, free_port())
    server.start()
    load = Load(f"http://127.0.0.1:{server.port}")
    threads = [threading.Thread(target=load.client) for _ in range(2)]
    threads += [threading.Thread(target=load.miner, args=(i,)) for i in range(3)]
    threads.append(threading.Thread(target=load.watcher))
    for t in threads:
        t.start()
    try:
        for _ in range(cycles):
            time.sleep(rng.uniform(0.3, 1.2))
            server.kill()
            server.start()
        time.sleep(0.5)
        load.stop_clients.set()
        deadline = time.monotonic() + 60  # drain: every acknowledged job must end up completed
        while time.monotonic() < deadline:
            with sqlite3.connect(tmp_path / "crash.db") as conn:
                queued = conn.execute("SELECT COUNT(*) FROM jobs WHERE state != 'COMPLETED'").fetchone()[0]
            if queued == 0:
                break
            time.sleep(0.2)
        load.stop_miners.set()
        for t in threads:
            t.join(timeout=30)
        check_checkpoints(load, tmp_path / "crash.db")
    finally:
        load.stop_clients.set()
        load.stop_miners.set()
        for t in threads:
            t.join(timeout=30)
        server.stop()
    account(tmp_path / "crash.db", load, cycles)


def check_checkpoints(load: Load, db: Path) -> None:
    """Once a checkpoint covers every leaf: each checkpoint published during the run, before and after
    the crashes, is signed by the log key and is a prefix of that latest one (consistency proofs)."""
    public = bytes(SigningKey(bytes.fromhex(SEED)).verify_key)
    with sqlite3.connect(db) as conn:
        leaves = conn.execute("SELECT COUNT(*) FROM log_leaves").fetchone()[0]
    conn.close()
    deadline = time.monotonic() + 30
    while (latest := httpx.get(f"{load.base}/v1/log/checkpoint").json())["tree_size"] != leaves:
        assert time.monotonic() < deadline, (latest, leaves)
        time.sleep(0.1)
    origin = latest["origin"]
    _, size, root, _ = rfc.parse_checkpoint(rfc.open_signed_note(latest["note"], origin, public))
    for first, note in sorted(load.checkpoints.items()):
        _, first_size, first_root, _ = rfc.parse_checkpoint(rfc.open_signed_note(note, origin, public))
        proof = httpx.get(f"{load.base}/v1/log/proof/consistency", params={"first": first, "second": size}).json()
        path = [base64.b64decode(h) for h in proof["consistency_path"]]
        assert first_size == 0 or rfc.verify_consistency(first_size, size, first_root, root, path), first
    print(f"crash: checkpoints_seen={len(load.checkpoints)} latest_size={size} all consistent with the latest")
    assert len(load.checkpoints) > 1


def account(db: Path, load: Load, cycles: int) -> None:
    key_id = ac.key_id_of(SigningKey(bytes.fromhex(SEED)))
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        states = dict(conn.execute("SELECT job_id, state FROM jobs").fetchall())
        receipts: dict[str, list[str]] = {}
        for job_id, receipt_id, body in conn.execute("SELECT job_id, receipt_id, body FROM receipts ORDER BY seq"):
            receipts.setdefault(job_id, []).append(ac.unpack_receipt(body, receipt_id, job_id))
        leaves = conn.execute("SELECT l.leaf_index, l.receipt_id, l.leaf_hash, r.body, r.job_id FROM log_leaves AS l"
                              " LEFT JOIN receipts AS r USING (receipt_id) ORDER BY l.leaf_index").fetchall()
    finally:
        conn.close()
    logged = {receipt_id for _, receipt_id, _, _, _ in leaves}
    assert [index for index, _, _, _, _ in leaves] == list(range(len(leaves)))  # consecutive from 0, no gap
    assert len(leaves) == sum(map(len, receipts.values()))  # a leaf per receipt, no more
    assert all(body is not None and digest == rfc.hash_leaf(ac.unpack_receipt(body, receipt_id, job_id).encode())
               for _, receipt_id, digest, body, job_id in leaves)
    unlogged = [r["receipt_id"] for returned in load.results.values() for r in returned if r["receipt_id"] not in logged]
    lost = [j for j in load.acked if j not in states]
    unfinished = [j for j in load.acked if states.get(j) != "COMPLETED"]
    duplicated = [j for j, bodies in receipts.items() if len(bodies) > 1]
    missing_receipt = [j for j, s in states.items() if s == "COMPLETED" and j not in receipts]
    bad_results = []
    for job_id, returned in load.results.items():
        stored = [ac.json.loads(b) for b in receipts.get(job_id, [])]
        if states.get(job_id) != "COMPLETED" or any(r not in stored for r in returned) or not all(
                ac.verify_receipt(r, {key_id})["valid"] for r in returned):
            bad_results.append(job_id)
    print(f"crash: cycles={cycles} acked={len(load.acked)} results_200={len(load.results)} jobs={len(states)} "
          f"lost={len(lost)} duplicated={len(duplicated)} unfinished={len(unfinished)} "
          f"bad_results={len(bad_results)} missing_receipts={len(missing_receipt)} leaves={len(leaves)} "
          f"unlogged={len(unlogged)} integrity=ok")
    assert len(load.acked) > 0 and len(load.results) > 0
    assert lost == [] and duplicated == [] and unfinished == [] and bad_results == [] and missing_receipt == []
    assert unlogged == []
