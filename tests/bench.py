"""Benchmark: the real coordinator next to the framework's own ceiling, on this machine.

    python tests/bench.py [--quick]
    python tests/bench.py --fleet N [--quick]
    python tests/bench.py --log N
    python tests/bench.py --retention [--quick]
    python tests/bench.py --instructions


Starts `aitbc-coord serve` as a subprocess (temporary database, DB_SYNCHRONOUS=FULL, a signing and
an attestation key) and, in the same run, a bare Starlette app with two routes under the same
uvicorn settings (a JSON POST that answers from memory, and one that inserts a row into SQLite with
one commit per request, as a straightforward durable endpoint does), and drives them with the same
load generator. The server and the generator share the machine's cores, so every headline figure is
a ratio measured in the same run. Prints a table, then one line `BENCH key=value ...` to track over
time. Not collected by pytest.

Shapes: the cost of an empty poll on a database whose history holds 20,000 distinct constraint sets
against a fresh one, and lifecycle throughput when every job brings a new constraint set.

The fleet (`--fleet N` alone; 10,000 miners in the full run, 1,000 with --quick): N miners in this
process, each with its own key (MINER_API_KEYS_FILE) and loopback address, one keep-alive connection
for its long-polls and a heartbeat every 15 s on a connection of its own; then the server's idle
cost, wake-up latency, RSS, and CPU per job in a burst against 10 miners, and counts that must be 0.

The receipt log (`--log N` alone): a log of 1,000 and of 1,000,000 leaves (10,000 with --quick) seeded
through the data layer, the server started on each (it signs a checkpoint of it), then the p50 of
GET /v1/log/proof/inclusion and the most rows an inclusion proof reads over a few hundred leaves;
`log_proof_reads` is that count at the larger size over ceil(log2 n) (target <= 2).
Retention: 60 simulated days in-process on an injectable clock (600 jobs a day, 20 with --quick;
4 KB payloads, 16 KB results, payloads kept 7 days, jobs and receipts 30): the database size (WAL
included) at days 7, 14, 30 and 60, retention_growth (day 60 / day 30) and kept_bytes_per_job (pages
used per job added from day 14 to day 28, when only payloads are pruned; broken down by table and
index from SQLite's dbstat where it is built in), with stats and balances
checked against what the run did. Reads at fleet size: admin miners and market stats with 100 and
100,000 miners (10,000 with --quick), in read_depth_ratio. In the full run, submit p99 on the real
server while its upkeep prunes 20,000 due payloads, against the same database with retention off.

`--instructions` is for judging a change to the hot path, where wall-clock figures on a shared
machine move more than the change: it runs the same lifecycle in-process (through the app's ASGI
channel: no sockets, no h11) under valgrind, twice with different sizes, and prints the
instructions per request, which repeat to within ~0.1%.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import platform
import random
import re
import resource
import secrets
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import aitbc_coord as ac  # noqa: E402

T = TypeVar("T")

CLIENT_KEY, ADMIN_KEY = "bench-client-key", "bench-admin-key"
CLIENT_KEYS = [CLIENT_KEY, *(f"bench-client-key-{i}" for i in range(1, 8))]  # client identities (lifecycle)
MINERS = 8
MINER_KEYS = [f"bench-miner-key-{i}" for i in range(MINERS)]


# === A minimal keep-alive HTTP/1.1 client: the generator must cost little next to the server ===

def http_request(method: str, path: str, data: bytes, key: str | None) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {len(data)}\r\n"
    head += "Content-Type: application/json\r\n" + (f"X-Api-Key: {key}\r\n" if key else "") + "\r\n"
    return head.encode() + data


def answered(raw: bytes) -> bool:
    """Whether `raw` holds a whole answer: the head, and as many body bytes as its Content-Length says."""
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        return False
    head = raw[:end].lower()
    at = head.find(b"content-length:")
    return len(raw) >= end + 4 + (int(head[at + 15:].split(b"\r\n", 1)[0]) if at >= 0 else 0)


async def one_shot(port: int, local: str, request: bytes) -> int:
    """Send `request` on a connection of its own from `local` and close it once answered; the status.
    (A bare non-blocking socket: half the client CPU of opening a stream pair.)"""
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP) as sock:
        sock.setblocking(False)
        sock.bind((local, 0))
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, request)
        raw = b""
        while not answered(raw):
            if not (chunk := await loop.sock_recv(sock, 65536)):
                raise ConnectionResetError("the server closed the connection")
            raw += chunk
    return int(raw[9:12])


class Http:
    def __init__(self, port: int, local: str | None = None) -> None:
        self.port, self.local = port, local  # local: the loopback address to connect from

    async def open(self) -> Http:
        local = None if self.local is None else (self.local, 0)
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port, local_addr=local)
        return self

    async def call(self, method: str, path: str, body: Any = None, key: str | None = None) -> tuple[int, Any]:
        status, raw = await self.exchange(method, path, b"" if body is None else json.dumps(body).encode(), key)
        return status, json.loads(raw) if raw else None

    async def exchange(self, method: str, path: str, data: bytes, key: str | None = None) -> tuple[int, bytes]:
        """One request; the status and the body as bytes."""
        self.writer.write(http_request(method, path, data, key))
        if not (line := await self.reader.readline()):
            raise ConnectionResetError("the server closed the connection")
        status = int(line.split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length) if length else b""

    def close(self) -> None:
        self.writer.close()


class Asgi:
    """Http's call(), straight through an app's ASGI channel in this process."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def open(self) -> Asgi:
        return self

    async def call(self, method: str, path: str, body: Any = None, key: str | None = None) -> tuple[int, Any]:
        data = b"" if body is None else json.dumps(body).encode()
        headers = [(b"host", b"bench"), (b"content-length", str(len(data)).encode()),
                   (b"content-type", b"application/json")] + ([(b"x-api-key", key.encode())] if key else [])
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                 "headers": headers, "client": ("127.0.0.1", 50000), "server": ("bench", 80)}
        incoming = [{"type": "http.request", "body": data, "more_body": False}]
        answered, sent = asyncio.Event(), []

        async def receive() -> dict[str, Any]:
            if incoming:
                return incoming.pop()
            await answered.wait()  # a long-poll listens for the client going away: it never does
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await self.app(scope, receive, send)
        answered.set()
        raw = b"".join(m.get("body", b"") for m in sent[1:])
        return sent[0]["status"], json.loads(raw) if raw else None

    def close(self) -> None:
        pass


# === Servers ===

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bare_server(port: int) -> None:
    """The framework ceiling: one JSON POST route that parses the body and answers a small object;
    and the durable ceiling: one that also inserts the body as a row into SQLite (its own database
    file, WAL, synchronous=FULL, a plain sqlite3 connection) and commits, once per request."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    db = sqlite3.connect(f"durable-{port}.db")  # in the working directory: the run's temporary one
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, body TEXT NOT NULL, at REAL NOT NULL)")

    async def echo(request: Any) -> JSONResponse:
        body = await request.json()
        return JSONResponse({"ok": True, "n": len(body)})

    async def durable(request: Any) -> JSONResponse:
        body = await request.json()
        row = db.execute("INSERT INTO events (body, at) VALUES (?, ?)", (json.dumps(body), time.time()))
        db.commit()  # the fsync, on the event loop's thread, before the answer
        return JSONResponse({"ok": True, "id": row.lastrowid})

    app = Starlette(routes=[Route("/echo", echo, methods=["POST"]), Route("/durable", durable, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=port, log_config=None, access_log=False, server_header=False)


async def loop_lag(lags: list[float], every: float = 0.005) -> None:
    """Append how late this event loop wakes a sleep of `every` seconds, until cancelled."""
    while True:
        due = time.perf_counter() + every
        await asyncio.sleep(every)
        lags.append(time.perf_counter() - due)


def floor_server(port: int) -> None:
    """The fleet's floor: an ASGI callable that does none of a coordinator's work (no authentication,
    validation, database, hub, access line or metrics) under the same uvicorn, uvloop and httptools
    as `serve`: 200 to a registration and a heartbeat, a poll held for its max_wait_seconds, then 204."""
    import uvicorn

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        status, answer = 200, b'{"status":"ok"}'
        if scope["path"] == "/v1/miners/poll":
            await asyncio.sleep(json.loads(body or b"{}").get("max_wait_seconds", 0))
            status, answer = 204, b""
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(answer))]})
        await send({"type": "http.response.body", "body": answer})

    uvicorn.run(app, host="127.0.0.1", port=port, http="httptools", loop="uvloop", lifespan="off", log_config=None,
                access_log=False, server_header=False, backlog=4096)


def coordinator_env(synchronous: str = "FULL") -> dict[str, str]:
    return {"APP_ENV": "prod", "CLIENT_API_KEYS": ",".join(CLIENT_KEYS), "ADMIN_API_KEYS": ADMIN_KEY,
            "MINER_API_KEYS": ",".join(f"m{i}={k}" for i, k in enumerate(MINER_KEYS)),
            "RECEIPT_SIGNING_KEY_HEX": secrets.token_hex(32), "RECEIPT_ATTESTATION_KEY_HEX": secrets.token_hex(32),
            "DB_SYNCHRONOUS": synchronous, "JOB_TTL_SECONDS": "3600",
            "RATE_LIMIT_REQUESTS": "0"}  # a stress test, not a well-behaved client


def raise_open_files_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit (a fleet holds a socket per miner); the limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


@contextmanager
def server(kind: str, workdir: Path, db: Path | str | None = None, synchronous: str = "FULL",
           extra_env: Mapping[str, str] | None = None) -> Any:
    """Start the coordinator (or the bare app) on a free port; yields (port, pid). `db`: a SQLite file,
    or a postgresql:// URL (given as DATABASE_URL)."""
    port = free_port()
    env = {**os.environ, **coordinator_env(synchronous), **(extra_env or {})}
    if kind in ("bare", "floor"):
        cmd = [sys.executable, __file__, f"--{kind}-server", str(port)]
    elif isinstance(db, str):
        cmd = [sys.executable, "-m", "aitbc_coord", "serve", "--port", str(port)]
        env["DATABASE_URL"] = db
    else:
        cmd = [sys.executable, "-m", "aitbc_coord", "serve", "--port", str(port), "--db", str(db)]
    log = open(workdir / f"{kind}-{port}.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=raise_open_files_limit)  # noqa: PLW1509 - in the child, before exec
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"{kind} server did not start; see {log.name}") from None
                time.sleep(0.05)
        yield port, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # an overloaded server may not finish its graceful shutdown
            proc.kill()
            proc.wait()
        log.close()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User + system CPU time the process (or one thread of it) has used so far."""
    stat = Path(f"/proc/{pid}/task/{thread}/stat" if thread else f"/proc/{pid}/stat")
    fields = stat.read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def work_done(port: int) -> tuple[float, float]:
    """The coordinator's units of work and group commits so far, from its GET /metrics (NaN if it
    does not answer within a minute)."""
    try:
        conn = await Http(port).open()
        try:
            async with asyncio.timeout(60):
                status, text = await conn.exchange("GET", "/metrics", b"", ADMIN_KEY)
        finally:
            conn.close()
    except (OSError, asyncio.IncompleteReadError):
        return math.nan, math.nan
    found = dict(line.split() for line in text.decode().splitlines() if line.startswith("aitbc_db_commit_units_"))
    return float(found.get("aitbc_db_commit_units_sum", math.nan)), float(found.get("aitbc_db_commit_units_count", math.nan))


def measured(pid: int, scenario: Any) -> tuple[dict[str, float], float]:
    """Run `scenario` (a coroutine returning a dict with req_per_s), and the server's CPU us per request."""
    cpu, started = cpu_seconds(pid), time.perf_counter()
    result = asyncio.run(scenario)
    elapsed, cpu = time.perf_counter() - started, cpu_seconds(pid) - cpu
    return result, cpu / (result["req_per_s"] * elapsed) * 1e6


# === Scenarios ===

def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else math.nan


def distinct_price(n: int) -> float:
    """The n-th distinct max_price (1.000001, 1.000002, ...), as the server parses it from JSON."""
    return float(f"{1 + n / 1e6:.6f}")


async def bare_rate(port: int, connections: int, seconds: float, path: str = "/echo") -> dict[str, float]:
    """Requests/s of a bare route with `connections` concurrent keep-alive clients."""
    conns = [await Http(port).open() for _ in range(connections)]
    count, stop = [0], time.perf_counter() + seconds

    async def loop(c: Http) -> None:
        while time.perf_counter() < stop:
            status, _ = await c.call("POST", path, {"prompt": "hello", "n": 1})
            assert status == 200
            count[0] += 1

    started = time.perf_counter()
    await asyncio.gather(*(loop(c) for c in conns))
    elapsed = time.perf_counter() - started
    for c in conns:
        c.close()
    return {"req_per_s": count[0] / elapsed}


async def lifecycle(port: int | Sequence[int], seconds: float, clients: int = 8, app: Any = None,
                    jobs: int | None = None, distinct: bool = False, identities: int = 1) -> dict[str, float]:
    """Clients submit, miners long-poll and post results (each completion signs a receipt), for
    `seconds` or until `jobs` jobs are done; over sockets to `port`, or in-process to `app`. Several
    ports (instances of one cluster): clients and miners are dealt across them in turn.
    `distinct`: every job has a max_price of its own (a new shape); the miners' price 0.5 meets it.
    `identities`: the clients submit under that many client keys (in turn), not all under one."""
    ports = [port] if isinstance(port, int) else list(port)

    def connect(i: int) -> Any:
        return Http(ports[i % len(ports)]).open() if app is None else Asgi(app).open()

    client_conns = [await connect(i) for i in range(clients)]
    miner_conns = [await connect(i) for i in range(MINERS)]
    for c, key in zip(miner_conns, MINER_KEYS):
        assert (await c.call("POST", "/v1/miners/register", {"capabilities": {"price": 0.5}}, key))[0] == 200
    outstanding = asyncio.Semaphore(2 * MINERS)  # a steady queue, so latency means something
    submitted: dict[str, float] = {}
    done_early: dict[str, float] = {}  # completed before its client had read the submit's answer
    completed: set[str] = set()
    latencies: list[float] = []
    requests, budget, shapes = [0], [jobs if jobs is not None else math.inf], [0]
    stop = time.perf_counter() + seconds

    async def client(c: Http, key: str) -> None:
        while time.perf_counter() < stop and budget[0] > 0:
            budget[0] -= 1
            await outstanding.acquire()
            body: dict[str, Any] = {"payload": {"prompt": "render a cat", "steps": 20}}
            if distinct:
                shapes[0] += 1
                body["constraints"] = {"max_price": distinct_price(shapes[0])}
            t = time.perf_counter()
            status, job = await c.call("POST", "/v1/jobs", body, key)
            assert status == 201, job
            if (done := done_early.pop(job["job_id"], None)) is not None:
                latencies.append(done - t)
            else:
                submitted[job["job_id"]] = t
            requests[0] += 1

    async def miner(c: Http, key: str) -> None:
        while time.perf_counter() < stop and len(latencies) < (jobs or math.inf):
            status, job = await c.call("POST", "/v1/miners/poll", {"max_wait_seconds": 0.5}, key)
            requests[0] += 1
            if status != 200:
                continue
            status, done = await c.call("POST", f"/v1/miners/{job['job_id']}/result",
                                        {"result": {"image": "ok"}, "metrics": {"units": 1.5}}, key)
            assert status == 200 and done["receipt"] is not None, done
            requests[0] += 1
            assert job["job_id"] not in completed, f"job {job['job_id']} was handed out twice"
            completed.add(job["job_id"])
            last_done[0] = time.perf_counter()
            if (sent := submitted.pop(job["job_id"], None)) is not None:
                latencies.append(last_done[0] - sent)
            else:  # the miner's poll, result and its answer all came before the client read its 201
                done_early[job["job_id"]] = last_done[0]
            outstanding.release()

    started = time.perf_counter()
    last_done = [started]
    submitting = asyncio.gather(*(client(c, CLIENT_KEYS[i % identities]) for i, c in enumerate(client_conns)))
    await asyncio.gather(*(miner(c, k) for c, k in zip(miner_conns, MINER_KEYS)))
    for _ in client_conns:  # a client still waiting for a slot the miners no longer free: let it see the time
        outstanding.release()
    await submitting
    # with a job budget, the idle miners' last long-polls outlast the work: stop the clock at the last job
    elapsed = (last_done[0] if jobs is not None else time.perf_counter()) - started
    for c in client_conns + miner_conns:
        c.close()
    return {"requests": requests[0], "jobs": len(latencies), "req_per_s": requests[0] / elapsed,
            "jobs_per_s": len(latencies) / elapsed,
            "p50_ms": pct(latencies, 0.5) * 1000, "p99_ms": pct(latencies, 0.99) * 1000,
            "connections": clients + MINERS}


async def wake(port: int, trials: int, submit_port: int | None = None, settle: float = 0.003) -> dict[str, float]:
    """A miner waits in a long-poll on `port`; a client submits a matching job (to `submit_port`:
    another instance of the cluster, or the same) `settle` seconds after the poll was sent; time until
    the miner holds it (p50, p99), and until the submit was answered (submit_p50). Jobs an earlier run
    left queued are taken first: a poll would find them at once, and time a submit, not a wake-up."""
    waiter, submitter = await Http(port).open(), await Http(port if submit_port is None else submit_port).open()
    key = MINER_KEYS[0]
    await waiter.call("POST", "/v1/miners/register", {"capabilities": {}, "region": "wake"}, key)
    while (taken := await waiter.call("POST", "/v1/miners/poll", {"max_wait_seconds": 0}, key))[0] == 200:
        await waiter.call("POST", f"/v1/miners/{taken[1]['job_id']}/result", {"result": {}}, key)
    times, submits = [], []
    for _ in range(trials):
        poll = asyncio.create_task(waiter.call("POST", "/v1/miners/poll", {"max_wait_seconds": 10}, key))
        await asyncio.sleep(settle)  # let the poll reach the server and park
        t = time.perf_counter()
        body = {"payload": {"w": 1}, "constraints": {"region": "wake"}}
        _, submitted = await submitter.call("POST", "/v1/jobs", body, CLIENT_KEY)
        submits.append(time.perf_counter() - t)
        status, job = await poll
        times.append(time.perf_counter() - t)
        assert status == 200 and job["job_id"] == submitted["job_id"], (status, job)
        await waiter.call("POST", f"/v1/miners/{job['job_id']}/result", {"result": {}}, key)
    waiter.close()
    submitter.close()
    return {"p50_ms": pct(times, 0.5) * 1000, "p99_ms": pct(times, 0.99) * 1000,
            "submit_p50_ms": pct(submits, 0.5) * 1000}


def seed(db: Path, jobs: int) -> float:
    """`jobs` QUEUED jobs pinned to region 'far', written through the data layer; seconds taken."""
    started = time.perf_counter()
    ac.migrate(str(db))
    conn = ac.connect(str(db), "OFF")
    now = int(time.time() * 1000)
    constraints = ac.compact_json({**dict.fromkeys(ac.CONSTRAINT_KEYS), "region": "far"})
    conn.execute("BEGIN")
    shape = ac.ensure_shape(conn, constraints)
    for i in range(jobs):
        ac.insert_job(conn, secrets.token_hex(16), f"client-{i % 100}", '{"prompt":"x"}', constraints, shape,
                      now + i, now + 86_400_000, None)
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return time.perf_counter() - started


READS = {"transactions": "/v1/explorer/transactions", "addresses": "/v1/explorer/addresses",
         "offers": "/v1/marketplace/offers", "market stats": "/v1/marketplace/stats", "admin stats": "/v1/admin/stats"}


async def depth(port: int, samples: int) -> dict[str, float]:
    """p50 of a poll that finds its job behind the 'far' jobs, and p50 of each first-page read."""
    miner, client = await Http(port).open(), await Http(port).open()
    key = MINER_KEYS[1]
    await miner.call("POST", "/v1/miners/register", {"capabilities": {"price": 1}, "region": "near"}, key)
    polls = []
    for _ in range(samples):
        await client.call("POST", "/v1/jobs", {"payload": {"d": 1}}, CLIENT_KEY)
        t = time.perf_counter()
        status, job = await miner.call("POST", "/v1/miners/poll", {}, key)
        polls.append(time.perf_counter() - t)
        assert status == 200, job
        await miner.call("POST", f"/v1/miners/{job['job_id']}/result", {"result": {}, "metrics": {"units": 1}}, key)
    out = {"poll": statistics.median(polls) * 1000}
    for name, path in READS.items():
        times = []
        for _ in range(samples):
            t = time.perf_counter()
            status, _ = await client.call("GET", path, key=ADMIN_KEY if "admin" in path else None)
            times.append(time.perf_counter() - t)
            assert status == 200
        out[name] = statistics.median(times) * 1000
    miner.close()
    client.close()
    return out


# === The receipt log: proofs at depth ===

class CountingConnection:
    """A connection that counts the rows its statements hand back: the storage reads of whatever
    reads through it (tests/test_log.py counts a proof's with it too)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn, self.rows = conn, 0

    def execute(self, sql: str, params: Any = ()) -> CountingCursor:
        return CountingCursor(self, self.conn.execute(sql, params))

    def executemany(self, sql: str, params: Any) -> sqlite3.Cursor:
        return self.conn.executemany(sql, params)  # writes: no rows to count


class CountingCursor:
    def __init__(self, owner: CountingConnection, cursor: sqlite3.Cursor) -> None:
        self.owner, self.cursor = owner, cursor

    def fetchone(self) -> Any:
        row = self.cursor.fetchone()
        self.owner.rows += row is not None
        return row

    def fetchall(self) -> list[Any]:
        rows = self.cursor.fetchall()
        self.owner.rows += len(rows)
        return rows

    def __iter__(self) -> Any:
        for row in self.cursor:
            self.owner.rows += 1
            yield row

    @property
    def lastrowid(self) -> int | None:
        return self.cursor.lastrowid

    def close(self) -> None:
        self.cursor.close()


def receipt_id_of(i: int) -> str:
    """The receipt id of the i-th leaf seed_log appends."""
    return f"{i:032x}"


def seed_log(db: Path, leaves: int) -> float:
    """`leaves` leaves (receipt-sized entries) appended to the receipt log through the data layer, in
    one transaction; seconds taken."""
    started = time.perf_counter()
    ac.migrate(str(db))
    conn = ac.connect(str(db), "OFF")
    edge, entry = ac.LogEdge(), b'{"receipt":"%d","pad":"' + b"x" * 600 + b'"}'
    conn.execute("BEGIN")
    for i in range(leaves):
        ac.append_to_log(conn, edge, receipt_id_of(i), entry % i)
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return time.perf_counter() - started


def proof_reads(db: Path, samples: list[int], size: int) -> int:
    """The most rows an inclusion proof (read_inclusion_proof, as the route runs it) reads among the
    leaves `samples` of a tree of `size` leaves."""
    conn = ac.connect(str(db), "OFF", readonly=True)
    most = 0
    for i in samples:
        counting = CountingConnection(conn)
        proof = ac.read_inclusion_proof(counting, receipt_id_of(i), size)  # type: ignore[arg-type]
        assert proof["leaf_index"] == i and proof["tree_size"] == size
        most = max(most, counting.rows)
    conn.close()
    return most


async def inclusion_latency(port: int, samples: list[int]) -> float:
    """p50 ms of GET /v1/log/proof/inclusion for the leaves `samples`, under the latest checkpoint."""
    client, times = await Http(port).open(), []
    for i in samples:
        t = time.perf_counter()
        status, proof = await client.call("GET", f"/v1/log/proof/inclusion?receipt_id={receipt_id_of(i)}")
        times.append(time.perf_counter() - t)
        assert status == 200 and proof["leaf_index"] == i, proof
    client.close()
    return statistics.median(times) * 1000


def log_depth(work: Path, sizes: tuple[int, ...], samples: int) -> dict[int, dict[str, float]]:
    """Per tree size: seconds to seed it, the most rows an inclusion proof read (over `samples` random
    leaves, the first and the last) and the p50 of the proof route."""
    out = {}
    for n in sizes:
        db = work / f"log-{n}.db"
        took = seed_log(db, n)
        leaves = sorted({0, n - 1, *random.Random(n).sample(range(n), min(samples, n))})
        with server("coord", work, db) as (port, _):  # its start signs a checkpoint of the seeded tree
            latency = asyncio.run(inclusion_latency(port, leaves))
        out[n] = {"seed_s": took, "rows": proof_reads(db, leaves, n), "p50_ms": latency}
    return out


# === Shapes: constraint sets the history has seen ===

def seed_history(db: Path, jobs: int) -> float:
    """`jobs` COMPLETED jobs, each with a max_price of its own and a shape of its own (the worst
    history: a database from before thresholds were bucketed into shared shapes), written through the
    data layer as submit, poll and result would leave them; seconds taken."""
    started = time.perf_counter()
    ac.migrate(str(db))
    conn = ac.connect(str(db), "OFF")
    now = int(time.time() * 1000)
    conn.execute("BEGIN")
    for i in range(1, jobs + 1):
        constraints = ac.compact_json({**dict.fromkeys(ac.CONSTRAINT_KEYS), "max_price": distinct_price(i)})
        job = ac.insert_job(conn, secrets.token_hex(16), f"client-{i % 100}", '{"prompt":"x"}', constraints,
                            ac.ensure_shape(conn, constraints), now + i, now + 86_400_000, None)
        ac.assign_job(conn, job["seq"], "history-miner", now + i)
        ac.finish_job(conn, job["seq"], ac.JobState.COMPLETED, now + i, None, '{"image":"ok"}', "{}")
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return time.perf_counter() - started


async def empty_poll(port: int, samples: int) -> float:
    """p50 ms of a poll that finds nothing (max_wait_seconds 0), by a miner whose price 0.5 meets every shape."""
    miner, key = await Http(port).open(), MINER_KEYS[2]
    assert (await miner.call("POST", "/v1/miners/register", {"capabilities": {"price": 0.5}}, key))[0] == 200
    await miner.call("POST", "/v1/miners/poll", {"max_wait_seconds": 0}, key)  # the first one learns the shapes
    times = []
    for _ in range(samples):
        t = time.perf_counter()
        status, _ = await miner.call("POST", "/v1/miners/poll", {"max_wait_seconds": 0}, key)
        times.append(time.perf_counter() - t)
        assert status == 204, status
    miner.close()
    return statistics.median(times) * 1000


def shape_history(work: Path, jobs: int, samples: int) -> dict[str, float]:
    """Empty-poll p50 on a database with `jobs` distinct shapes in its history, and on a fresh one."""
    db = work / "history.db"
    took = seed_history(db, jobs)
    with server("coord", work, db) as (port, _):
        history = asyncio.run(empty_poll(port, samples))
    conn = sqlite3.connect(db)
    shapes = conn.execute("SELECT COUNT(*) FROM shapes").fetchone()[0]
    conn.close()
    assert shapes == jobs, f"seeding left {shapes} shapes for {jobs} jobs"
    with server("coord", work, work / "fresh.db") as (port, _):
        fresh = asyncio.run(empty_poll(port, samples))
    return {"seed_s": took, "history_ms": history, "fresh_ms": fresh}


# === Reads at fleet size: the admin miner list and market stats with few and many miners ===

def seed_miners(db: Path, miners: int) -> float:
    """`miners` registered miners (a third of them with a slot or two more), through the data layer;
    seconds taken."""
    started = time.perf_counter()
    ac.migrate(str(db))
    conn = ac.connect(str(db), "OFF")
    now = int(time.time() * 1000)
    conn.execute("BEGIN")
    for i in range(miners):
        ac.upsert_miner(conn, f"rig-{i:06d}", {**FLEET_CAPS, "price": 0.5 + i % 5}, 1 + i % 3, None, "t" * 32, now + i)
    conn.execute("COMMIT")
    conn.close()
    return time.perf_counter() - started


FLEET_READS = {"admin miners": "/v1/admin/miners", "market stats (fleet)": "/v1/marketplace/stats"}


async def fleet_reads(port: int, samples: int) -> dict[str, float]:
    """p50 ms of each fleet read's first page."""
    client, out = await Http(port).open(), {}
    for name, path in FLEET_READS.items():
        times = []
        for _ in range(samples):
            t = time.perf_counter()
            status, _ = await client.call("GET", path, key=ADMIN_KEY)
            times.append(time.perf_counter() - t)
            assert status == 200
        out[name] = statistics.median(times) * 1000
    client.close()
    return out


def fleet_depth(work: Path, sizes: tuple[int, int], samples: int) -> tuple[list[tuple[str, str]], dict[str, float]]:
    """The fleet reads on a server with `sizes[0]` and with `sizes[1]` registered miners; table rows and
    the ratio of each read (many / few)."""
    rows, found = [], {}
    for n in sizes:
        took = seed_miners(work / f"miners-{n}.db", n)
        rows.append((f"seeded {n:,} registered miners through the data layer", f"{took:.1f} s"))
        with server("coord", work, work / f"miners-{n}.db") as (port, _):
            found[n] = asyncio.run(fleet_reads(port, samples))
    rows += [(f"p50 {name} with {sizes[0]:,} / {sizes[1]:,} miners",
              f"{found[sizes[0]][name]:.2f} / {found[sizes[1]][name]:.2f} ms") for name in FLEET_READS]
    return rows, {name: found[sizes[1]][name] / found[sizes[0]][name] for name in FLEET_READS}


# === Retention: 60 days of service in-process, on a clock that moves when told ===

RETENTION_ENV = {"PAYLOAD_RETENTION_DAYS": "7", "JOB_RETENTION_DAYS": "30", "RECEIPT_RETENTION_DAYS": "30",
                 "RECEIPT_ATTESTATION_KEY_HEX": "",  # receipts as by default: signed, not attested
                 "JOB_TTL_SECONDS": "604800"}  # simulated time runs fast: no job expires between its requests
RETENTION_REPORTED = (7, 14, 30, 60)
KEPT_DAYS = (14, 28)  # kept_bytes_per_job: what the jobs of these days add, when only payloads are pruned
DAY_SECONDS = 86_400


class SimClock:
    """The coordinator's wall and monotonic clock in the retention run: it moves only when told."""

    def __init__(self, start: float) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t


def on_disk(db: Path) -> int:
    """The database file and its WAL, in bytes."""
    return sum(p.stat().st_size for p in (db, Path(f"{db}-wal")) if p.exists())


async def simulate_days(app: Any, clock: SimClock, days: int, per_day: int, workers: int = 8) -> dict[str, Any]:
    """`days` days of `per_day` jobs (4 KB payloads, 16 KB results, each completed and signed), the
    clock moving evenly through each day; after each day, a retention pass and a WAL checkpoint as the
    server's upkeep runs them. Sizes at the end of each day, and what the run did (to check totals)."""
    db = Path(app.coord.settings.db_path)
    conns = [await Asgi(app).open() for _ in range(workers)]
    for c, key in zip(conns, MINER_KEYS):
        assert (await c.call("POST", "/v1/miners/register", {"capabilities": {"price": 0.5}}, key))[0] == 200
    done: dict[str, int] = {}
    sizes, used, objects = {}, {}, {}

    async def worker(c: Asgi, key: str, jobs: int, day: int) -> None:
        for n in range(jobs):
            payload = {"prompt": f"day {day} job {n} " + "p" * 4_096}
            assert (await c.call("POST", "/v1/jobs", {"payload": payload}, CLIENT_KEY))[0] == 201
            status, job = await c.call("POST", "/v1/miners/poll", {}, key)
            assert status == 200, status
            result = {"result": {"text": "r" * 16_384, "job": job["job_id"]}, "metrics": {"units": 2}}
            status, answer = await c.call("POST", f"/v1/miners/{job['job_id']}/result", result, key)
            assert status == 200 and answer["receipt"]["version"] == "1.1", answer
            done[key] = done.get(key, 0) + 1
            clock.t += DAY_SECONDS / per_day

    for day in range(1, days + 1):
        share = [per_day // workers + (i < per_day % workers) for i in range(workers)]
        await asyncio.gather(*(worker(c, k, n, day) for c, k, n in zip(conns, MINER_KEYS, share)))
        await app.coord.retain()
        await app.coord.wal_checkpoint()
        sizes[day] = on_disk(db)
        page_size, pages, free = await app.coord.db.read(ac.get_db_space)
        used[day] = (pages - free) * page_size
        if day in KEPT_DAYS:
            objects[day] = await app.coord.db.read(pages_by_object)
    return {"sizes": sizes, "used": used, "done": done, "objects": objects}


def pages_by_object(conn: sqlite3.Connection) -> dict[str, int]:
    """Bytes of pages per table and index (SQLite's dbstat virtual table; empty where it is not built in)."""
    try:
        return dict(conn.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name").fetchall())
    except sqlite3.OperationalError:  # no such table: dbstat (SQLITE_ENABLE_DBSTAT_VTAB)
        return {}


def kept_breakdown(objects: dict[int, dict[str, int]], jobs: int) -> str:
    """The largest objects' share of kept_bytes_per_job: their pages added from day 14 to day 28, per job."""
    first, last = (objects.get(day, {}) for day in KEPT_DAYS)
    grown = {name: (last[name] - first.get(name, 0)) / jobs for name in last}
    return ", ".join(f"{name} {size:,.0f}" for name, size in sorted(grown.items(), key=lambda kv: -kv[1])
                     if size >= 10) or "(no dbstat)"


async def retention_totals(app: Any, run: dict[str, Any], jobs: int) -> bool:
    """Whether stats and balances equal what the run did (as without retention: every job completed at
    a price of 1, units 2 at 0.5)."""
    client = await Asgi(app).open()
    _, stats = await client.call("GET", "/v1/admin/stats", key=ADMIN_KEY)
    _, addresses = await client.call("GET", "/v1/explorer/addresses")  # (nine: the client and eight miners)
    balances = {a["address"]: (a["balance"], a["txCount"]) for a in addresses["items"]}
    expected = {"client-" + ac.key_digest(CLIENT_KEY)[:12]: (f"-{jobs}.000000", jobs)}
    expected.update({f"m{i}": (f"{run['done'][key]}.000000", run["done"][key]) for i, key in enumerate(MINER_KEYS)
                     if key in run["done"]})
    return (stats["total_jobs"] == stats["jobs_by_state"]["COMPLETED"] == stats["receipts_total"] == jobs
            and balances == expected)


def retention_scenario(work: Path, per_day: int, days: int = 60) -> tuple[list[tuple[str, str]], dict[str, float]]:
    """The retention run; table rows and BENCH figures: retention_growth (size at day 60 / day 30) and
    kept_bytes_per_job (pages used, days 14 to 28, when only payloads are pruned, per job added)."""
    clock = SimClock(time.time())
    env = {**coordinator_env(), **RETENTION_ENV, "DATABASE_URL": f"sqlite:///{work}/retention.db"}
    app = ac.App(ac.Settings.load(env, None, sweep_interval_seconds=0), clock, monotonic=clock)

    async def drive() -> tuple[dict[str, Any], bool, float]:
        async with app.lifespan():
            started = time.perf_counter()
            run = await simulate_days(app, clock, days, per_day)
            took = time.perf_counter() - started
            return run, await retention_totals(app, run, days * per_day), took

    run, totals_ok, took = asyncio.run(drive())
    sizes, used = run["sizes"], run["used"]
    growth = sizes[60] / sizes[30]
    kept = (used[KEPT_DAYS[1]] - used[KEPT_DAYS[0]]) / ((KEPT_DAYS[1] - KEPT_DAYS[0]) * per_day)
    rows = [(f"retention: {days} days x {per_day:,} jobs (4 KB payload, 16 KB result), payloads 7 days, jobs and "
             "receipts 30", f"{took:.0f} s in-process"),
            ("retention: database + WAL at day " + " / ".join(map(str, RETENTION_REPORTED)),
             " / ".join(f"{sizes[d] / 1e6:.1f}" for d in RETENTION_REPORTED) + " MB"),
            ("retention: growth from day 30 to day 60 (target <= 1.1)", f"{growth:.2f}"),
            ("retention: kept bytes per job once its payload and result are gone (target <= 1,024)", f"{kept:,.0f}"),
            ("retention: of which, by table and index (dbstat, bytes of pages per job)",
             kept_breakdown(run["objects"], (KEPT_DAYS[1] - KEPT_DAYS[0]) * per_day)),
            ("retention: stats and balances equal to a run without retention", "yes" if totals_ok else "NO")]
    return rows, {"retention_growth": growth, "kept_bytes_per_job": kept}


def seed_prunable(db: Path, jobs: int) -> float:
    """`jobs` jobs (4 KB payloads, 16 KB results) that finished 40 days ago, in a database whose
    retention clock started long before; seconds taken."""
    started = time.perf_counter()
    ac.migrate(str(db))
    conn = ac.connect(str(db), "OFF")
    now = int(time.time() * 1000)
    then = now - 40 * DAY_SECONDS * 1000
    constraints = ac.compact_json(dict.fromkeys(ac.CONSTRAINT_KEYS))
    conn.execute("BEGIN")
    ac.start_retention_clock(conn, then - DAY_SECONDS * 1000)
    shape = ac.ensure_shape(conn, constraints)
    for i in range(jobs):
        job = ac.insert_job(conn, secrets.token_hex(16), "client-seed", ac.compact_json({"prompt": "p" * 4096}),
                            constraints, shape, then + i, then + 10**9)
        ac.assign_job(conn, job["seq"], "seed-miner", then + i)
        ac.finish_job(conn, job["seq"], ac.JobState.COMPLETED, then + i, None, ac.compact_json({"t": "r" * 16384}), "{}")
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return time.perf_counter() - started


async def submit_latency(port: int, seconds: float, prune: int = 0, clients: int = 4) -> dict[str, float]:
    """Submit p99 with `clients` submitting one after another for `seconds`, or (with `prune`) until
    the server has pruned that many payloads, whichever comes first; how long it ran and what it pruned."""
    conns = [await Http(port).open() for _ in range(clients)]
    times: list[float] = []
    started = time.perf_counter()
    stop = [started + seconds]
    pruned_before = await pruned_so_far(port)

    async def loop(c: Http) -> None:
        while time.perf_counter() < stop[0]:
            t = time.perf_counter()
            status, _ = await c.call("POST", "/v1/jobs", {"payload": {"prompt": "during pruning"}}, CLIENT_KEY)
            times.append(time.perf_counter() - t)
            assert status == 201

    async def watch() -> None:
        while prune and time.perf_counter() < stop[0]:
            await asyncio.sleep(0.2)
            if await pruned_so_far(port) - pruned_before >= prune:
                stop[0] = time.perf_counter()

    await asyncio.gather(watch(), *(loop(c) for c in conns))
    for c in conns:
        c.close()
    return {"p99_ms": pct(times, 0.99) * 1000, "submits": len(times), "s": time.perf_counter() - started,
            "pruned": await pruned_so_far(port) - pruned_before}


async def pruned_so_far(port: int) -> float:
    conn = await Http(port).open()
    _, text = await conn.exchange("GET", "/metrics", b"", ADMIN_KEY)
    conn.close()
    return next((float(line.split()[1]) for line in text.decode().splitlines()
                 if line.startswith("aitbc_retention_payloads_pruned_total ")), math.nan)


def pruning_impact(work: Path, jobs: int, seconds: float) -> tuple[list[tuple[str, str]], dict[str, float]]:
    """Submit p99 on the real server while its upkeep prunes `jobs` due payloads (measured until they
    are all pruned), against the same database served with retention off for as long."""
    out = {}
    for mode, days in (("on", "30"), ("off", "keep")):
        db = work / f"prune-{mode}.db"
        seed_prunable(db, jobs)
        with server("coord", work, db, extra_env={"PAYLOAD_RETENTION_DAYS": days}) as (port, _):
            window = seconds if mode == "on" else out["on"]["s"]
            out[mode] = asyncio.run(submit_latency(port, window, jobs if mode == "on" else 0))
    ratio = out["on"]["p99_ms"] / out["off"]["p99_ms"]
    rows = [(f"submit p99 without / while pruning ({out['on']['pruned']:,.0f} of {jobs:,} due payloads pruned in "
             f"{out['on']['s']:.1f} s, {out['on']['submits']:,} submits)",
             f"{out['off']['p99_ms']:.2f} / {out['on']['p99_ms']:.2f} ms (target ratio <= 2)")]
    return rows, {"prune_submit_p99_ratio": ratio}


# === The fleet: thousands of miners on raw connections in this one process ===

FLEET_CAPS = {"gpus": [{"name": "A100", "memory_mb": 81920}], "price": 0.5}
FLEET_RESULT = {"result": {"image": "ok"}, "metrics": {"units": 1.5}}
HEARTBEAT_SECONDS = 15.0  # each miner's interval, with ±10% jitter
FIRST_BEATS = HEARTBEAT_SECONDS * 1.1 + 2  # every miner's first heartbeat is in (and the last first-polls)
MIN_WAIT = 3.0  # each long-poll asks U[MIN_WAIT, plan.max_wait] seconds, drawn afresh
REGISTERING = 64  # registrations in flight at once while the fleet starts
BURST_SECONDS = 180.0  # a burst not worked off by then is reported as it stands
WAKE_TIMEOUT = 60.0  # a wake-phase submit unanswered, or job no miner holds, by then counts as failed
MUST_BE_ZERO = ("late polls", "5xx", "offline while heartbeating", "404/409 to results or heartbeats",
                "never picked up", "admin check failed")


@dataclasses.dataclass(frozen=True)
class FleetPlan:
    miners: int
    max_wait: float  # the top of each long-poll's max_wait_seconds
    idle: float  # seconds of heartbeats and renewals only, measured before any job and (`after`) once they are done
    after: float
    burst: int  # jobs submitted as fast as a few connections allow, worked off by the fleet
    wake_jobs: int  # submitted one at a time, evenly over `wake_span` seconds
    wake_span: float
    floor: bool = False  # also the same fleet idle against a do-nothing ASGI app (floor_server)


def fleet_plan(miners: int, quick: bool) -> FleetPlan:
    """Idle window and wake phase together span two renewal cycles (quick: long-polls capped at 10 s)."""
    if quick:
        return FleetPlan(miners, max_wait=10.0, idle=20.0, after=5.0, burst=500, wake_jobs=300, wake_span=12.0)
    return FleetPlan(miners, max_wait=30.0, idle=25.0, after=10.0, burst=5000, wake_jobs=300, wake_span=36.0, floor=True)


def miner_address(i: int) -> str:
    """Miner i's own loopback address, as if on a host of its own: heartbeat connections closed every
    15 s leave TIME_WAIT sockets behind, and one address's ephemeral ports would run out."""
    return f"127.1.{i // 250}.{1 + i % 250}"


def write_fleet_keys(path: Path, miners: int) -> list[str]:
    """A key per miner, named fleet0, fleet1, ... in a 0600 file for MINER_API_KEYS_FILE."""
    keys = [f"fleet-{i}-{secrets.token_hex(12)}" for i in range(miners)]
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.writelines(f"fleet{i}={key}\n" for i, key in enumerate(keys))
    return keys


async def settle(tasks: list[asyncio.Task[None]], seconds: float = 10) -> None:
    """Wait for cancelled tasks to end, at most `seconds`: on Python 3.11 a task waiting in a stream
    read can lose its cancellation, and the benchmark must not hang on it."""
    if tasks:
        await asyncio.wait(tasks, timeout=seconds)


class Fleet:
    """Miners that long-poll on one keep-alive connection each (reconnecting when it drops), post a
    result at once on it, and heartbeat on a connection opened and closed around each heartbeat."""

    def __init__(self, port: int, keys: list[str], max_wait: float, seconds: float) -> None:
        self.port, self.keys, self.max_wait = port, keys, max_wait
        self.deadline = time.perf_counter() + seconds  # every loop ends by then, even if not cancelled
        self.conns: list[Http | None] = [None] * len(keys)
        self.beats: HeartbeatProcess | None = None  # the fleet's heartbeats, once every miner is parked
        self.received: dict[str, float] = {}  # job id -> when a miner held it
        self.waiting: dict[str, asyncio.Future[None]] = {}
        self.counts: dict[str, int] = dict.fromkeys(("registered", "register failed", "polls", "beats", "results",
                                                     "reconnects", "timeouts", "beat errors", "submit errors",
                                                     "submit timeouts", *MUST_BE_ZERO), 0)
        self.latest = 0.0  # the worst lateness of a poll past its max_wait_seconds
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        gate = asyncio.Semaphore(REGISTERING)
        self.tasks = [asyncio.create_task(self.miner(i, gate)) for i in range(len(self.keys))]

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await settle(self.tasks)
        for conn in self.conns:
            if conn is not None:
                conn.close()

    async def connect(self, i: int) -> None:
        """(Re)open miner i's long-poll connection, retrying while the server does not accept."""
        while time.perf_counter() < self.deadline:
            try:
                async with asyncio.timeout(10):
                    self.conns[i] = await Http(self.port, miner_address(i)).open()
                return
            except OSError:
                self.counts["reconnects"] += 1
                await asyncio.sleep(0.5)

    async def request(self, i: int, path: str, body: Any, limit: float) -> tuple[int, Any]:
        """A request on miner i's keep-alive connection: (status, answer), or (0, None) and a new
        connection when it dropped or `limit` seconds passed."""
        try:
            async with asyncio.timeout(limit):
                status, answer = await self.conns[i].call("POST", path, body, self.keys[i])  # type: ignore[union-attr]
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            self.counts["timeouts" if isinstance(exc, TimeoutError) else "reconnects"] += 1
            self.conns[i].close()  # type: ignore[union-attr]
            await self.connect(i)
            return 0, None
        self.counts["5xx"] += status >= 500
        return status, answer

    async def miner(self, i: int, gate: asyncio.Semaphore) -> None:
        async with gate:
            await self.connect(i)
            for _ in range(3):
                if (await self.request(i, "/v1/miners/register", {"capabilities": FLEET_CAPS}, 60))[0] == 200:
                    break
            else:
                self.counts["register failed"] += 1
                return
        self.counts["registered"] += 1  # and about to park in its first long-poll
        while time.perf_counter() < self.deadline:
            await self.poll(i)

    async def poll(self, i: int) -> None:
        """One long-poll; a job it brings is recorded as held and its result posted at once."""
        wait = round(random.uniform(MIN_WAIT, self.max_wait), 2)
        started = time.perf_counter()
        status, job = await self.request(i, "/v1/miners/poll", {"max_wait_seconds": wait}, wait + 60)
        if (late := time.perf_counter() - started - wait) > 1:
            self.counts["late polls"] += 1
            self.latest = max(self.latest, late)
        self.counts["polls"] += status != 0
        if status == 200:
            self.hold(job["job_id"])
            status, _ = await self.request(i, f"/v1/miners/{job['job_id']}/result", FLEET_RESULT, 60)
            self.counts["results"] += status == 200
            self.counts["404/409 to results or heartbeats"] += status in (404, 409)
        elif status not in (0, 204):
            await asyncio.sleep(1)  # refused (counted above if 5xx): do not spin

    def hold(self, job_id: str) -> None:
        self.received[job_id] = time.perf_counter()
        if (waiter := self.waiting.pop(job_id, None)) is not None and not waiter.done():
            waiter.set_result(None)

    async def parked(self, timeout: float) -> float:
        """Seconds until every miner has registered and sent its first long-poll (or `timeout`)."""
        started = time.perf_counter()
        while (self.counts["registered"] + self.counts["register failed"] < len(self.keys)
               and time.perf_counter() - started < timeout):
            await asyncio.sleep(0.1)
        return time.perf_counter() - started

    async def idle(self, pid: int, seconds: float, name: str) -> dict[str, float]:
        """The server's CPU and the background request rate while the fleet only heartbeats and renews;
        keys start with `name`."""
        assert self.beats is not None
        answered, (units, commits) = self.counts["polls"] + await self.beats.sent(), await work_done(self.port)
        cpu, own, started = cpu_seconds(pid), self.generator_cpu(), time.perf_counter()
        await asyncio.sleep(seconds)
        elapsed = time.perf_counter() - started
        cpu, own = cpu_seconds(pid) - cpu, self.generator_cpu() - own
        answered = self.counts["polls"] + await self.beats.sent() - answered
        units_after, commits_after = await work_done(self.port)
        figures = {"s": elapsed, "cpu_pct": cpu / elapsed * 100, "req_per_s": answered / elapsed,
                   "us_per_req": cpu / answered * 1e6 if answered else math.nan,
                   "units_per_s": (units_after - units) / elapsed, "commits_per_s": (commits_after - commits) / elapsed,
                   "generator_cpu_pct": own / elapsed * 100, "rss_mb": rss_mb(pid)}
        return {f"{name}_{k}": v for k, v in figures.items()}

    def generator_cpu(self) -> float:
        """CPU seconds of this process and of the heartbeat process."""
        return time.process_time() + (cpu_seconds(self.beats.proc.pid) if self.beats is not None else 0.0)

    async def submit(self, budget: list[int]) -> None:
        """Submit jobs back to back on one connection while `budget` lasts."""
        conn = await Http(self.port).open()
        try:
            while budget[0] > 0:
                budget[0] -= 1
                status, _ = await conn.call("POST", "/v1/jobs", {"payload": {"prompt": "render a cat"}}, CLIENT_KEY)
                self.counts["submit errors"] += status != 201
                self.counts["5xx"] += status >= 500
        finally:
            conn.close()

    async def burst(self, pid: int, jobs: int, idle_cpu_pct: float) -> dict[str, float]:
        """Server CPU per job while the fleet works off `jobs` submitted on 4 connections, net of the
        background CPU rate measured just before."""
        done, budget, (units, commits) = self.counts["results"], [jobs], await work_done(self.port)
        cpu, started = cpu_seconds(pid), time.perf_counter()
        submitters = [asyncio.create_task(self.submit(budget)) for _ in range(4)]
        while self.counts["results"] - done < jobs and time.perf_counter() - started < BURST_SECONDS:
            await asyncio.sleep(0.01)
        elapsed, cpu = time.perf_counter() - started, cpu_seconds(pid) - cpu
        for task in submitters:
            task.cancel()
        await asyncio.gather(*submitters, return_exceptions=True)
        done = self.counts["results"] - done
        net = cpu - idle_cpu_pct / 100 * elapsed
        units_after, commits_after = await work_done(self.port)
        return {"burst_s": elapsed, "burst_jobs": done, "burst_jobs_per_s": done / elapsed,
                "burst_units_per_job": (units_after - units) / done if done else math.nan,
                "burst_commits_per_job": (commits_after - commits) / done if done else math.nan,
                "burst_ms_per_job": net / done * 1000 if done else math.nan,
                "burst_gross_ms_per_job": cpu / done * 1000 if done else math.nan}

    async def woken(self, job_id: str, sent: float) -> float | None:
        """Seconds from `sent` until a miner held the job; None if none did within WAKE_TIMEOUT."""
        if job_id not in self.received:
            self.waiting[job_id] = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(WAKE_TIMEOUT):
                    await self.waiting[job_id]
            except TimeoutError:
                self.waiting.pop(job_id, None)
                return None
        return self.received[job_id] - sent

    async def wake(self, jobs: int, span: float) -> dict[str, float]:
        """Submit `jobs` one at a time evenly over `span` seconds; submit latency, and time until held."""
        conn, submits, woken, lags = await Http(self.port).open(), [], [], []
        probe = asyncio.create_task(loop_lag(lags))  # this process's own delays are in every figure below
        started = time.perf_counter()
        for k in range(jobs):
            if time.perf_counter() > started + span + 2 * WAKE_TIMEOUT:  # a server this slow has told enough
                self.counts["submit errors"] += jobs - k
                break
            await asyncio.sleep(max(0.0, started + k * span / jobs - time.perf_counter()))
            sent = time.perf_counter()
            try:
                async with asyncio.timeout(WAKE_TIMEOUT):
                    status, job = await conn.call("POST", "/v1/jobs", {"payload": {"wake": k}}, CLIENT_KEY)
                submits.append(time.perf_counter() - sent)
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                self.counts["submit timeouts"] += isinstance(exc, TimeoutError)
                conn.close()
                conn, status = await Http(self.port).open(), 0
            self.counts["submit errors"] += status != 201
            self.counts["5xx"] += status >= 500
            if status == 201:
                woken.append(asyncio.create_task(self.woken(job["job_id"], sent)))
        conn.close()
        times = await asyncio.gather(*woken)
        probe.cancel()
        held = [t for t in times if t is not None]
        self.counts["never picked up"] += len(times) - len(held)
        return {"wake_p50_ms": pct(held, 0.5) * 1000, "wake_p99_ms": pct(held, 0.99) * 1000,
                "submit_p50_ms": pct(submits, 0.5) * 1000, "submit_p99_ms": pct(submits, 0.99) * 1000,
                "lag_p50_ms": pct(lags, 0.5) * 1000, "lag_p99_ms": pct(lags, 0.99) * 1000,
                "lag_max_ms": max(lags, default=0.0) * 1000}

    async def offline(self) -> dict[str, float]:
        """Miners the server shows offline (GET /v1/admin/miners, every page), and those of them whose
        last heartbeat was sent on time."""
        items, path, status = [], "/v1/admin/miners?limit=500", 200
        try:
            conn = await Http(self.port).open()
            try:
                async with asyncio.timeout(120):
                    while path and status == 200:
                        status, listed = await conn.call("GET", path, key=ADMIN_KEY)
                        items += listed["items"] if status == 200 else []
                        cursor = listed.get("next_cursor") if status == 200 else None
                        path = f"/v1/admin/miners?limit=500&cursor={cursor}" if cursor else ""
            finally:
                conn.close()
        except (OSError, asyncio.IncompleteReadError, ValueError):
            status = 0
        if status != 200:
            self.counts["admin check failed"] += 1
            return {"offline": math.nan, "listed": 0}
        last_beat = (await self.beats.report())["last_beat"] if self.beats is not None else [0.0] * len(self.keys)
        now, index = time.monotonic(), {f"fleet{i}": i for i in range(len(self.keys))}
        offline = [index[m["miner_id"]] for m in items if not m["online"] and m["miner_id"] in index]
        on_time = [i for i in offline if now - last_beat[i] <= HEARTBEAT_SECONDS * 1.1 + 1]
        self.counts["offline while heartbeating"] += len(on_time)
        return {"offline": len(offline), "listed": len(items)}


ATTACKER = "127.0.0.2"  # not a trusted proxy address: the per-address cap applies to it
ATTACK_CONNECTIONS = 2_000


class Slowloris:
    """Connections from ATTACKER that send a request line and then one header line every 2 s, never
    finishing the head; each reconnects when the server closes it (408) or refuses it (503)."""

    def __init__(self, port: int, connections: int) -> None:
        self.port, self.connections = port, connections
        self.counts = {"opened": 0, "refused": 0, "cut": 0, "open": 0, "most open": 0}
        self.tasks: list[asyncio.Task[None]] = []
        self.writers: set[asyncio.StreamWriter] = set()

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self.client()) for _ in range(self.connections)]

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        for writer in self.writers:
            writer.transport.abort()
        await settle(self.tasks)

    async def client(self) -> None:
        while True:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port, local_addr=(ATTACKER, 0))
            except OSError:
                await asyncio.sleep(1)
                continue
            self.counts["opened"] += 1
            self.counts["open"] += 1
            self.counts["most open"] = max(self.counts["most open"], self.counts["open"])
            self.writers.add(writer)
            try:
                await self.trickle(reader, writer)
            finally:
                self.writers.discard(writer)
                self.counts["open"] -= 1
                writer.close()
            await asyncio.sleep(0.5)

    async def trickle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"POST /v1/jobs HTTP/1.1\r\nHost: bench\r\n")
        while True:
            try:
                async with asyncio.timeout(2):
                    answer = await reader.read(64)
            except TimeoutError:
                writer.write(b"X-Slow: 1\r\n")
                continue
            except OSError:
                return
            if answer.startswith(b"HTTP/1.1 503"):
                self.counts["refused"] += 1
            elif answer.startswith(b"HTTP/1.1 408"):
                self.counts["cut"] += 1
            return


class AttackProcess:
    """A Slowloris in a process of its own, as an attacker is another machine: 2,000 clients on the
    fleet generator's own event loop would delay the submits and wake-ups it measures."""

    def __init__(self, port: int, connections: int) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--slowloris", f"{port}:{connections}"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.counts: dict[str, int] = {}

    async def stop(self) -> None:
        """End the attack (its stdin closes); its counts."""
        out, _ = await asyncio.to_thread(self.proc.communicate, "", 60)
        self.counts = json.loads(out.strip().splitlines()[-1])


class Heartbeats:
    """Every miner's heartbeat, each HEARTBEAT_SECONDS ±10% on a connection opened and closed around
    it (an HTTP client pool whose idle connection the server closed does so). They run in a process of
    their own (--heartbeats), as 10,000 miners are 10,000 machines: on the long-polls' event loop
    their connection set-ups came in bunches (80-130 ms of busy loop) that delayed the very wake-ups
    being measured, and reached the server as bursts. A miner posts its result the moment a job
    arrives, so it reports 0 jobs in flight."""

    def __init__(self, port: int, keys: list[str]) -> None:
        self.port, self.keys = port, keys
        self.last_beat = [0.0] * len(keys)  # time.monotonic(): CLOCK_MONOTONIC, one clock for every process
        self.counts = dict.fromkeys(("beats", "beat errors", "5xx", "404/409 to results or heartbeats"), 0)
        self.errors: collections.Counter[str] = collections.Counter()  # beat errors by kind

    async def run(self, i: int) -> None:
        due = time.monotonic() + random.uniform(0, HEARTBEAT_SECONDS)  # spread over the first interval
        while True:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            self.last_beat[i] = time.monotonic()
            await self.beat(i)
            due += HEARTBEAT_SECONDS * random.uniform(0.9, 1.1)

    async def beat(self, i: int) -> None:
        """One heartbeat on a connection of its own, opened and closed around it."""
        try:
            async with asyncio.timeout(HEARTBEAT_SECONDS):
                status = await one_shot(self.port, miner_address(i),
                                        http_request("POST", "/v1/miners/heartbeat", b'{"inflight": 0}', self.keys[i]))
        except (OSError, ValueError) as exc:
            self.counts["beat errors"] += 1
            self.errors[f"{type(exc).__name__} {getattr(exc, 'errno', None) or ''}".strip()] += 1
            return
        self.counts["beats"] += status == 200
        self.counts["5xx"] += status >= 500
        self.counts["404/409 to results or heartbeats"] += status in (404, 409)

    def report(self) -> dict[str, Any]:
        return {"counts": self.counts, "last_beat": self.last_beat}


def heartbeats_process(spec: str) -> None:
    """--heartbeats PORT:KEYFILE: heartbeat for every miner of KEYFILE (`fleetI=KEY` lines, in order)
    until stdin closes; each line read from stdin, and the end, are answered with Heartbeats.report()
    as a JSON line."""
    port, keyfile = spec.split(":", 1)
    keys = [line.partition("=")[2] for line in Path(keyfile).read_text().splitlines() if line]
    raise_open_files_limit()

    async def beat_until_stdin_closes() -> dict[str, Any]:
        collector = asyncio.create_task(collect_on_a_clock())
        beats = Heartbeats(int(port), keys)
        tasks = [asyncio.create_task(beats.run(i)) for i in range(len(keys))]
        while await asyncio.to_thread(sys.stdin.readline):
            print(json.dumps(beats.report()), flush=True)
        for task in tasks:
            task.cancel()
        await settle(tasks)
        collector.cancel()
        if beats.errors:
            print(f"heartbeat errors by kind: {dict(beats.errors.most_common())}", file=sys.stderr, flush=True)
        return beats.report()

    print(json.dumps(run_fast(beat_until_stdin_closes())), flush=True)


class HeartbeatProcess:
    """The fleet's Heartbeats in a process of their own."""

    def __init__(self, port: int, keyfile: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--heartbeats", f"{port}:{keyfile}"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    async def report(self) -> dict[str, Any]:
        def ask() -> dict[str, Any]:
            self.proc.stdin.write("report\n")  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
            return json.loads(self.proc.stdout.readline())  # type: ignore[union-attr, no-any-return]
        return await asyncio.to_thread(ask)

    async def sent(self) -> int:
        """Heartbeats answered 200 so far."""
        return int((await self.report())["counts"]["beats"])

    async def stop(self) -> dict[str, int]:
        """End the heartbeats (stdin closes); their counts."""
        out, _ = await asyncio.to_thread(self.proc.communicate, "", 60)
        return json.loads(out.strip().splitlines()[-1])["counts"]  # type: ignore[no-any-return]


def slowloris_process(spec: str) -> None:
    """--slowloris PORT:N: hold the attack until stdin closes, then print its counts as JSON."""
    port, connections = map(int, spec.split(":"))
    raise_open_files_limit()

    async def attack() -> dict[str, int]:
        collector = asyncio.create_task(collect_on_a_clock())
        slowloris = Slowloris(port, connections)
        slowloris.start()
        await asyncio.to_thread(sys.stdin.read)
        await slowloris.stop()
        collector.cancel()
        return slowloris.counts

    print(json.dumps(run_fast(attack())), flush=True)


async def collect_on_a_clock() -> None:
    """Run the cycle collector as the server does (ac.Server): young generations every 0.1 s, automatic
    collection off, until cancelled. The generator holds as many objects as the server, and its own
    collection pauses (100-350 ms at 10,000 miners) would be read as the server's latency."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        while True:
            await asyncio.sleep(0.1)
            gc.collect(1)
    finally:
        gc.enable()
        gc.unfreeze()


def run_fast(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run on uvloop (uvicorn's production loop, installed with the server) where there is one:
    10,000 miners' connections on the default loop cost the generator ~40% of a core, and its own stalls
    (100-250 ms at 10,000) would be read as the server's wake-up latency."""
    try:
        import uvloop
    except ImportError:  # (not on Windows)
        return asyncio.run(main)
    return uvloop.run(main)


async def fleet_run(port: int, pid: int, keyfile: Path, keys: list[str], plan: FleetPlan) -> dict[str, Any]:
    """Start the fleet, wait until it is parked and every miner has sent its first heartbeat, then: idle
    window, burst, wake phase, offline check."""
    park_timeout = 120 + len(keys) / 100
    lasts = (park_timeout + FIRST_BEATS + 2 * plan.idle + BURST_SECONDS + plan.wake_span + 3 * WAKE_TIMEOUT
             + plan.after + 305)
    fleet = Fleet(port, keys, plan.max_wait, lasts)
    collector = asyncio.create_task(collect_on_a_clock())
    fleet.start()
    try:
        out: dict[str, Any] = {"parked_s": await fleet.parked(park_timeout)}
        fleet.beats = HeartbeatProcess(port, keyfile)
        await asyncio.sleep(FIRST_BEATS)  # first heartbeats change each miner's reported status: a write each
        out.update(await fleet.idle(pid, plan.idle, "idle"))
        out.update(await fleet.burst(pid, plan.burst, out["idle_cpu_pct"]))
        if plan.wake_jobs:  # the wake phase runs under a slowloris attack from another address
            attack = AttackProcess(port, ATTACK_CONNECTIONS)
            try:
                await asyncio.sleep(5)  # the attack settles at its cap
                out.update(await fleet.idle(pid, plan.idle, "attacked"))
                out.update(await fleet.wake(plan.wake_jobs, plan.wake_span))
            finally:
                await attack.stop()
            out["attack"] = dict(attack.counts)
        out.update(await fleet.idle(pid, plan.after, "after"))  # every job done: as quiet as before?
        out.update(await fleet.offline())
    finally:
        await fleet.stop()
        collector.cancel()
        if fleet.beats is not None:
            for name, n in (await fleet.beats.stop()).items():
                fleet.counts[name] += n
    return {**out, "counts": fleet.counts, "worst_late_s": fleet.latest}


async def floor_run(port: int, pid: int, keyfile: Path, keys: list[str], plan: FleetPlan) -> dict[str, Any]:
    """The same fleet, parked and heartbeating, against floor_server: its idle window only."""
    fleet = Fleet(port, keys, plan.max_wait, 120 + len(keys) / 100 + FIRST_BEATS + plan.idle + 60)
    collector = asyncio.create_task(collect_on_a_clock())
    fleet.start()
    try:
        await fleet.parked(120 + len(keys) / 100)
        fleet.beats = HeartbeatProcess(port, keyfile)
        await asyncio.sleep(FIRST_BEATS)
        return await fleet.idle(pid, plan.idle, "floor")
    finally:
        await fleet.stop()
        collector.cancel()
        if fleet.beats is not None:
            await fleet.beats.stop()


def fleet_scenario(work: Path, plan: FleetPlan) -> tuple[list[tuple[str, str]], dict[str, float]]:
    """The fleet on its own server, then 10 such miners on a separate short server run (the baseline
    of the cost ratio); table rows and BENCH figures."""
    limit = raise_open_files_limit()
    if plan.miners + 1000 > limit:
        raise SystemExit(f"{plan.miners:,} miners need more open files than the hard limit {limit:,}")
    runs = {}
    small = dataclasses.replace(plan, miners=10, idle=5.0, after=1.0, wake_jobs=0)
    for n, current in ((plan.miners, plan), (10, small)):
        keys = write_fleet_keys(work / f"fleet-keys-{n}.txt", n)
        env = {"MINER_API_KEYS": "", "MINER_API_KEYS_FILE": str(work / f"fleet-keys-{n}.txt")}
        with server("coord", work, work / f"fleet-{n}.db", extra_env=env) as (port, pid):
            runs[n] = run_fast(fleet_run(port, pid, work / f"fleet-keys-{n}.txt", keys, current))
    if plan.floor:  # what the server stack alone costs under the same fleet: the idle target's floor
        keys = write_fleet_keys(work / "fleet-keys-floor.txt", plan.miners)
        with server("floor", work) as (port, pid):
            runs[plan.miners].update(run_fast(floor_run(port, pid, work / "fleet-keys-floor.txt", keys, plan)))
    return fleet_rows(plan, runs[plan.miners], runs[10])


def fleet_rows(plan: FleetPlan, big: dict[str, Any], small: dict[str, Any]) -> tuple[list[tuple[str, str]],
                                                                                    dict[str, float]]:
    counts, n = big["counts"], f"{plan.miners:,}"
    zeros = [counts[k] + small["counts"][k] for k in MUST_BE_ZERO]
    failed = [f"{k} {v:,}" for k, v in zip(MUST_BE_ZERO, zeros) if v]
    ratio = big["burst_ms_per_job"] / small["burst_ms_per_job"]
    rows = [
        (f"fleet: {n} miners, polls ask U[{MIN_WAIT:g}, {plan.max_wait:g}] s"
         + (" (quick cap)" if plan.max_wait < 30 else "") + f", heartbeat {HEARTBEAT_SECONDS:g} s ±10%",
         f"{counts['registered']:,} registered and parked in {big['parked_s']:.1f} s"),
        (f"fleet idle {big['idle_s']:.0f} s: server CPU, background answers, CPU per answer",
         f"{big['idle_cpu_pct']:.1f}% of a core, {big['idle_req_per_s']:,.0f} req/s, {big['idle_us_per_req']:.0f} us"),
        *([(f"fleet idle floor: a do-nothing ASGI app under the same uvicorn, uvloop, httptools, {n} miners",
            f"{big['floor_cpu_pct']:.1f}% of a core, {big['floor_req_per_s']:,.0f} req/s, "
            f"{big['floor_us_per_req']:.0f} us")] if "floor_cpu_pct" in big else []),
        ("fleet idle: server units of work / group commits (GET /metrics)", f"{big['idle_units_per_s']:,.0f} / "
         f"{big['idle_commits_per_s']:,.0f} a second"),
        ("fleet generator CPU while idle (this process and the heartbeats process)", f"{big['idle_generator_cpu_pct']:.1f}% of a core"),
        (f"fleet server RSS with {n} miners connected", f"{big['idle_rss_mb']:.0f} MB"),
        (f"fleet burst: {plan.burst:,} jobs, {n} / 10 miners", f"{big['burst_jobs']:,} done in {big['burst_s']:.1f} s "
         f"({big['burst_jobs_per_s']:,.0f} jobs/s) / {small['burst_jobs']:,} in {small['burst_s']:.1f} s "
         f"({small['burst_jobs_per_s']:,.0f} jobs/s)"),
        (f"fleet server CPU per job net of background, {n} / 10 miners (separate server run)",
         f"{big['burst_ms_per_job']:.2f} / {small['burst_ms_per_job']:.2f} ms (gross "
         f"{big['burst_gross_ms_per_job']:.2f} / {small['burst_gross_ms_per_job']:.2f})"),
        (f"fleet burst: units of work / commits per job, {n} / 10 miners",
         f"{big['burst_units_per_job']:.1f} / {big['burst_commits_per_job']:.2f}, "
         f"{small['burst_units_per_job']:.1f} / {small['burst_commits_per_job']:.2f}"),
        (f"fleet idle with {ATTACK_CONNECTIONS:,} slowloris connections from {ATTACKER}: server CPU, answers",
         f"{big['attacked_cpu_pct']:.1f}% of a core, {big['attacked_req_per_s']:,.0f} req/s"),
        ("slowloris: connections opened / refused 503 / cut 408 / most open at once",
         " / ".join(f"{big['attack'][k]:,}" for k in ("opened", "refused", "cut", "most open"))),
        (f"fleet wake under the attack: submit until a miner holds it p50 / p99 ({plan.wake_jobs} over "
         f"{plan.wake_span:g} s)",
         f"{big['wake_p50_ms']:.2f} / {big['wake_p99_ms']:.2f} ms"),
        ("fleet wake phase: the load generator's own loop lag p50 / p99 / most (in every figure above)",
         f"{big['lag_p50_ms']:.2f} / {big['lag_p99_ms']:.2f} / {big['lag_max_ms']:.1f} ms"),
        ("fleet wake-phase submit latency p50 / p99", f"{big['submit_p50_ms']:.2f} / {big['submit_p99_ms']:.2f} ms"
         + (f" ({counts['submit timeouts']:,} unanswered in {WAKE_TIMEOUT:g} s)" if counts["submit timeouts"] else "")),
        (f"fleet idle again {big['after_s']:.0f} s after every job: server CPU, background answers",
         f"{big['after_cpu_pct']:.1f}% of a core, {big['after_req_per_s']:,.0f} req/s"),
        ("fleet idle again: server units of work / group commits", f"{big['after_units_per_s']:,.0f} / "
         f"{big['after_commits_per_s']:,.0f} a second"),
        ("fleet answers: polls / heartbeats / results", f"{counts['polls']:,} / {counts['beats']:,} / "
         f"{counts['results']:,}"),
        ("fleet reconnects / timeouts / heartbeat errors / submit errors",
         " / ".join(f"{counts[k]:,}" for k in ("reconnects", "timeouts", "beat errors", "submit errors"))),
        (f"fleet shown offline at the end (of {big['listed']:,} listed)", f"{big['offline']:,}"),
        ("fleet must be 0: " + " / ".join(MUST_BE_ZERO), " / ".join(f"{v:,}" for v in zeros)
         + (f" (worst poll {big['worst_late_s']:.1f} s past its wait)" if counts["late polls"] else "")),
        ("fleet scenario", "FAILED: " + ", ".join(failed) if failed else "ok"),
    ]
    bench = {"fleet_wake_p50_ms": big["wake_p50_ms"], "fleet_wake_p99_ms": big["wake_p99_ms"],
             "fleet_submit_p99_ms": big["submit_p99_ms"], "fleet_idle_cpu_pct": big["idle_cpu_pct"],
             "fleet_rss_mb": big["idle_rss_mb"], "fleet_cost_ratio": ratio,
             "fleet_attacked_idle_cpu_pct": big["attacked_cpu_pct"]}
    if "floor_cpu_pct" in big:
        bench["fleet_floor_idle_cpu_pct"] = big["floor_cpu_pct"]
    return rows, bench


def fleet_bench(bench: dict[str, float]) -> str:
    return (f"fleet_wake_p50_ms={bench['fleet_wake_p50_ms']:.2f} fleet_wake_p99_ms={bench['fleet_wake_p99_ms']:.2f} "
            f"fleet_submit_p99_ms={bench['fleet_submit_p99_ms']:.2f} fleet_idle_cpu_pct={bench['fleet_idle_cpu_pct']:.1f} "
            f"fleet_rss_mb={bench['fleet_rss_mb']:.0f} fleet_cost_ratio={bench['fleet_cost_ratio']:.2f} "
            f"fleet_attacked_idle_cpu_pct={bench['fleet_attacked_idle_cpu_pct']:.1f}"
            + (f" fleet_floor_idle_cpu_pct={bench['fleet_floor_idle_cpu_pct']:.1f}" if "fleet_floor_idle_cpu_pct" in bench else ""))


# === PostgreSQL: the lifecycle on a private cluster, one instance and two ===

PG_WAKE_WARMUP = 10  # cross-instance wake-ups before the measured ones: both instances listen by then
PG_WAKE_SETTLE = 0.01  # s from a poll sent to the submit: its first claim (a round trip or two) is done, it waits
PG_STATEMENTS_SHOWN = 5


@dataclasses.dataclass
class PgCluster:
    """A private PostgreSQL cluster started for this run: its directory (data/, the Unix socket, the
    server log), binaries, and whether pg_stat_statements is loaded."""

    root: Path
    bindir: Path
    owner: list[str]  # the command prefix that runs its tools as the postgres user (as root), or nothing
    statements: bool

    def url(self, dbname: str) -> str:
        return f"postgresql://postgres@/{dbname}?host={urllib.parse.quote(str(self.root), safe='')}"

    def admin(self) -> Any:
        """A new autocommit connection to the `postgres` database (psycopg)."""
        import psycopg
        return psycopg.connect(self.url("postgres"), autocommit=True)

    def create_database(self, name: str) -> str:
        with self.admin() as conn:
            conn.execute(f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8'")
        return self.url(name)

    def postmaster(self) -> int:
        return int((self.root / "data" / "postmaster.pid").read_text().split()[0])

    def cpu_seconds(self) -> float:
        """User + system CPU the cluster has used so far: the postmaster's, its live processes' (backends,
        checkpointer, WAL writer, autovacuum...), and those of its processes that ended (in the
        postmaster's cutime and cstime once it reaped them)."""
        postmaster, ticks = self.postmaster(), 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rpartition(")")[2].split()
            except OSError:  # ended meanwhile
                continue
            if int(stat.parent.name) == postmaster:
                ticks += sum(int(f) for f in fields[11:15])
            elif int(fields[1]) == postmaster:
                ticks += int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")

    def transactions(self, dbname: str) -> tuple[int, int]:
        """Transactions committed in `dbname` so far, and deadlocks detected there (pg_stat_database's
        xact_commit and deadlocks; each backend reports at least once a second while busy)."""
        with self.admin() as conn:
            return conn.execute("SELECT xact_commit, deadlocks FROM pg_stat_database WHERE datname = %s",
                                (dbname,)).fetchone()

    def wal_flushes(self) -> int:
        """Times the cluster has flushed its WAL to disk so far (pg_stat_wal.wal_sync): durable commits,
        several to a flush when they come together."""
        with self.admin() as conn:
            return conn.execute("SELECT wal_sync FROM pg_stat_wal").fetchone()[0]

    def reset_statements(self) -> None:
        if self.statements:
            with self.admin() as conn:
                conn.execute("SELECT pg_stat_statements_reset()")

    def top_statements(self, dbname: str, n: int = PG_STATEMENTS_SHOWN) -> list[tuple[int, float, float, str]]:
        """The `n` statements of `dbname` with the most total execution time since the last reset:
        (calls, total ms, mean ms, text)."""
        if not self.statements:
            return []
        with self.admin() as conn:
            return conn.execute(
                "SELECT calls, total_exec_time, mean_exec_time, query FROM pg_stat_statements"
                " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = %s)"
                " ORDER BY total_exec_time DESC LIMIT %s", (dbname, n)).fetchall()

    def settings(self) -> dict[str, str]:
        with self.admin() as conn:
            return {name: conn.execute(f"SHOW {name}").fetchone()[0]
                    for name in ("server_version", "fsync", "synchronous_commit", "full_page_writes",
                                 "wal_sync_method", "max_connections", "shared_buffers")}


def pg_tools() -> tuple[Path, bool]:
    """The directory of PostgreSQL's server binaries (pg_config --bindir) and whether pg_stat_statements
    can be loaded; raises SystemExit saying what is missing."""
    why = "(Debian: apt-get install postgresql postgresql-contrib)"
    if shutil.which("pg_config") is None:
        raise SystemExit(f"--postgres needs PostgreSQL: pg_config is not on PATH {why}")
    try:
        import psycopg  # noqa: F401 - the bench's own queries
        import psycopg_pool  # noqa: F401 - the coordinator's
    except ImportError:
        raise SystemExit("--postgres needs the PostgreSQL driver: pip install -e '.[postgres]'") from None

    def config(flag: str) -> Path:
        return Path(subprocess.run(["pg_config", flag], capture_output=True, text=True, check=True).stdout.strip())
    bindir = config("--bindir")
    missing = [tool for tool in ("initdb", "pg_ctl", "postgres") if not (bindir / tool).is_file()]
    if missing:
        raise SystemExit(f"--postgres needs PostgreSQL's server: no {', '.join(missing)} in {bindir} {why}")
    return bindir, (config("--pkglibdir") / "pg_stat_statements.so").is_file()


@contextmanager
def pg_cluster() -> Iterator[PgCluster]:
    """A private PostgreSQL cluster for the run: initdb into a new temporary directory (as the postgres
    user when run as root: the server refuses root), listening on a Unix socket there only, with the
    server's default durability (fsync, synchronous_commit and full_page_writes on), max_connections
    100 and pg_stat_statements loaded where postgresql-contrib is installed. Stopped and removed on
    the way out, whatever ends the run; raises SystemExit when it cannot start."""
    bindir, statements = pg_tools()
    root = Path(tempfile.mkdtemp(prefix="aitbc-pg-"))  # short: the socket's path must stay under 108 bytes
    owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    cluster = PgCluster(root, bindir, owner, statements)
    data, log = root / "data", root / "server.log"
    try:
        if owner:
            shutil.chown(root, "postgres", "postgres")
        # --no-sync: initdb's files are not flushed before the server starts (a benchmark's cluster is
        # thrown away); the server's own durability settings are untouched
        made = subprocess.run([*owner, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                               "-E", "UTF8", "--no-locale", "--no-sync"], capture_output=True, text=True)
        if made.returncode:
            raise SystemExit(f"initdb failed:\n{made.stdout[-2000:]}{made.stderr[-2000:]}")
        options = f"-c listen_addresses= -k {root} -c max_connections=100"
        if statements:
            options += " -c shared_preload_libraries=pg_stat_statements"
        started = subprocess.run([*owner, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-s",
                                  "-t", "60", "-o", options, "start"], capture_output=True, text=True)
        if started.returncode:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else started.stderr
            raise SystemExit(f"PostgreSQL did not start:\n{tail}")
        if statements:
            with cluster.admin() as conn:
                conn.execute("CREATE EXTENSION pg_stat_statements")
        yield cluster
    finally:
        interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave it running
        try:
            stopped = not (data / "postmaster.pid").exists()
            for mode in () if stopped else ("fast", "immediate"):
                stop = subprocess.run([*owner, str(bindir / "pg_ctl"), "-D", str(data), "-m", mode, "-w", "-s",
                                       "-t", "60", "stop"], capture_output=True, text=True)
                if stopped := stop.returncode == 0:
                    break
                print(f"PostgreSQL in {root}: pg_ctl stop -m {mode} failed: {stop.stderr.strip()}", file=sys.stderr)
            if stopped:  # (a server still running keeps its directory: it is its to remove)
                shutil.rmtree(root, ignore_errors=True)
        finally:
            signal.signal(signal.SIGINT, interrupt)


class WaitSampler:
    """What the coordinator's backends are doing, from pg_stat_activity every 50 ms in a thread of its
    own: on the CPU, waiting on a lock (a hot row), on WAL (the commit's flush), or idle inside a
    transaction (waiting for the coordinator's next statement). (Its own backend is not counted; its
    CPU, ~1% of the cluster's, is.)"""

    def __init__(self, cluster: PgCluster, dbname: str) -> None:
        self.cluster, self.dbname = cluster, dbname
        self.counts: collections.Counter[str] = collections.Counter()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wait-sampler", daemon=True)

    def __enter__(self) -> WaitSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with self.cluster.admin() as conn:
            while not self._stop.wait(0.05):
                rows = conn.execute(
                    "SELECT state, coalesce(wait_event_type || ':' || wait_event, 'CPU'), count(*)"
                    " FROM pg_stat_activity WHERE datname = %s AND state IN ('active', 'idle in transaction')"
                    " GROUP BY 1, 2", (self.dbname,)).fetchall()
                self.samples += 1
                for state, wait, n in rows:
                    self.counts[wait if state == "active" else "idle in transaction"] += n

    def summary(self, shown: int = 5) -> str:
        """The busiest states as backends on average (e.g. 'CPU 1.2, Lock:transactionid 0.3')."""
        return ", ".join(f"{name} {n / max(1, self.samples):.2f}" for name, n in self.counts.most_common(shown)) or "-"


def machine_cpu() -> tuple[int, int]:
    """(busy, all) CPU ticks of the whole machine so far, every core, from /proc/stat."""
    ticks = [int(t) for t in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)  # less idle and iowait


def pg_lifecycle(cluster: PgCluster | None, dbname: str, ports: list[int], pids: list[int], seconds: float,
                 warmup_jobs: int, identities: int = 1) -> dict[str, Any]:
    """The lifecycle for `seconds` against the coordinator processes `pids` on `ports` (clients and
    miners dealt across them; the clients under `identities` keys), after `warmup_jobs` jobs to warm
    up; its figures with the CPU per job each side used in the window (ms): the coordinators
    (`coord_ms`; their event loop threads alone `loop_ms`), the cluster's processes (`server_ms`;
    none on SQLite) and this process (the load generator); the machine's busy share and ours; the
    commits, WAL flushes, backend states and top statements of the database `dbname`."""
    asyncio.run(lifecycle(ports, math.inf, jobs=warmup_jobs, identities=identities))  # prepared, caches warm

    def coordinators() -> tuple[float, float]:
        return sum(cpu_seconds(pid) for pid in pids), sum(cpu_seconds(pid, pid) for pid in pids)
    if cluster is not None:
        cluster.reset_statements()
        (commits, deadlocks), flushes = cluster.transactions(dbname), cluster.wal_flushes()
        server_cpu = cluster.cpu_seconds()
    (coord_cpu, loop_cpu), generator_cpu, machine = coordinators(), time.thread_time(), machine_cpu()
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        waits = stack.enter_context(WaitSampler(cluster, dbname)) if cluster is not None else None
        result: dict[str, Any] = asyncio.run(lifecycle(ports, seconds, identities=identities))
    elapsed = time.perf_counter() - started
    (coord_after, loop_after), (busy, ticks) = coordinators(), machine_cpu()
    jobs = result["jobs"]
    result["coord_ms"] = (coord_after - coord_cpu) / jobs * 1000
    result["loop_ms"] = (loop_after - loop_cpu) / jobs * 1000
    result["generator_ms"] = (time.thread_time() - generator_cpu) / jobs * 1000  # its event loop's thread
    result["server_ms"] = 0.0
    if cluster is not None:
        result["server_ms"] = (cluster.cpu_seconds() - server_cpu) / jobs * 1000
        commits_after, deadlocks_after = cluster.transactions(dbname)
        result["commits_per_s"] = (commits_after - commits) / elapsed
        result["deadlocks"] = deadlocks_after - deadlocks
        result["flushes_per_s"] = (cluster.wal_flushes() - flushes) / elapsed
        result["waits"] = waits.summary() if waits is not None else "-"
        result["statements"] = cluster.top_statements(dbname)
    ours = (result["coord_ms"] + result["server_ms"] + result["generator_ms"]) * jobs / 1000  # CPU seconds
    result["machine_pct"] = (busy - machine[0]) / (ticks - machine[1]) * 100
    result["ours_pct"] = ours / (elapsed * (os.cpu_count() or 1)) * 100
    return result


def postgres_run(quick: bool) -> None:
    """`--postgres`: the lifecycle against one `serve` and against two on one database of a private
    PostgreSQL cluster (and two again with eight client identities instead of one), with SQLite in the
    same run for reference; wake-ups within an instance and across; the CPU per job on each side; the
    BENCH line."""
    seconds, trials, warmup = (3.0, 50, 100) if quick else (15.0, 200, 400)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the cluster is stopped on a kill too
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="aitbc-bench-") as tmp, pg_cluster() as cluster:
        work = Path(tmp)
        cluster_up = time.perf_counter() - began
        shown = cluster.settings()
        with server("coord", work, work / "sqlite.db") as (port, pid):
            sqlite = pg_lifecycle(None, "", [port], [pid], seconds, warmup)
        # the instances of one cluster share the keys that sign receipts and checkpoints
        keys = {k: secrets.token_hex(32) for k in ("RECEIPT_SIGNING_KEY_HEX", "RECEIPT_ATTESTATION_KEY_HEX")}
        runs: dict[str, dict[str, Any]] = {}
        for name, instances, identities in (("1 instance", 1, 1), ("2 instances", 2, 1),
                                            ("2 instances, 8 client identities", 2, len(CLIENT_KEYS))):
            dbname = f"lifecycle_{len(runs)}"
            url = cluster.create_database(dbname)
            with contextlib.ExitStack() as stack:
                started = [stack.enter_context(server("coord", work, url, extra_env=keys)) for _ in range(instances)]
                runs[name] = pg_lifecycle(cluster, dbname, [port for port, _ in started], [pid for _, pid in started],
                                          seconds, warmup, identities)
        url = cluster.create_database("wake")
        with server("coord", work, url, extra_env=keys) as (a, _), server("coord", work, url, extra_env=keys) as (b, _):
            asyncio.run(wake(b, PG_WAKE_WARMUP, submit_port=a))  # B listens by then; both have prepared
            same = asyncio.run(wake(a, trials, submit_port=a, settle=PG_WAKE_SETTLE))
            cross = asyncio.run(wake(b, trials, submit_port=a, settle=PG_WAKE_SETTLE))
    took = time.perf_counter() - began
    one, two = runs["1 instance"], runs["2 instances"]
    ratio = one["jobs_per_s"] / sqlite["jobs_per_s"]
    rows = [
        ("PostgreSQL (private cluster, Unix socket): fsync / synchronous_commit / full_page_writes",
         f"{shown['server_version'].split()[0]}: {shown['fsync']} / {shown['synchronous_commit']} / "
         f"{shown['full_page_writes']} ({shown['wal_sync_method']}, shared_buffers {shown['shared_buffers']}, "
         f"max_connections {shown['max_connections']}); up in {cluster_up:.1f} s"),
        *pg_rows("SQLite, 1 instance", sqlite, seconds),
        *[row for name, r in runs.items() for row in pg_rows(f"PostgreSQL, {name}", r, seconds)],
        ("pg_ratio_1: PostgreSQL 1 instance / SQLite jobs/s (target >= 0.25)", f"{ratio:.2f}"),
        (f"wake, same instance: submit to A until the miner polling A holds it p50 / p99 ({trials} jobs; "
         "the submit's own p50)", f"{same['p50_ms']:.2f} / {same['p99_ms']:.2f} ms ({same['submit_p50_ms']:.2f})"),
        (f"wake, across: submit to A until the miner polling B holds it p50 / p99 (target p99 <= 50; the submit's "
         "p50)", f"{cross['p50_ms']:.2f} / {cross['p99_ms']:.2f} ms ({cross['submit_p50_ms']:.2f})"),
        ("the whole --postgres run", f"{took:.0f} s"),
    ]
    print_table(rows, quick)
    for name, r in runs.items():
        print(f"top {PG_STATEMENTS_SHOWN} statements by total time, PostgreSQL {name} "
              "(calls a job, total ms, mean ms):")
        for calls, total, mean, text in r["statements"]:
            print(f"  {calls / r['jobs']:>6.2f} {total:>9,.0f} {mean:>8.3f}  {' '.join(text.split())[:110]}")
        if not r["statements"]:
            print("  (pg_stat_statements is not available: install postgresql-contrib)")
    print(f"BENCH pg_jobs_per_s_1={one['jobs_per_s']:.0f} pg_jobs_per_s_2={two['jobs_per_s']:.0f} "
          f"sqlite_jobs_per_s={sqlite['jobs_per_s']:.0f} pg_ratio_1={ratio:.2f} "
          f"pg_wake_same_p50_ms={same['p50_ms']:.2f} pg_wake_same_p99_ms={same['p99_ms']:.2f} "
          f"pg_wake_cross_p50_ms={cross['p50_ms']:.2f} pg_wake_cross_p99_ms={cross['p99_ms']:.2f} "
          f"pg_coord_cpu_ms_per_job={two['coord_ms']:.2f} pg_server_cpu_ms_per_job={two['server_ms']:.2f}")


def pg_rows(name: str, r: dict[str, Any], seconds: float) -> list[tuple[str, str]]:
    """Table rows for one lifecycle window of postgres_run."""
    rows = [(f"{name}: lifecycle ({seconds:g} s): jobs/s, submit-to-completed p50 / p99",
             f"{r['jobs_per_s']:,.0f} jobs/s, {r['p50_ms']:.1f} / {r['p99_ms']:.1f} ms"),
            (f"{name}: CPU per job: coordinator (its event loop) / PostgreSQL / load generator",
             f"{r['coord_ms']:.2f} ({r['loop_ms']:.2f}) / {r['server_ms']:.2f} / {r['generator_ms']:.2f} ms"),
            (f"{name}: the machine's cores busy, of which this run's",
             f"{r['machine_pct']:.0f}%, {r['ours_pct']:.0f}%")]
    if "commits_per_s" in r:
        rows.append((f"{name}: commits, WAL flushes (a job), deadlocks; backends by state, on average",
                     f"{r['commits_per_s']:,.0f}/s ({r['commits_per_s'] / r['jobs_per_s']:.2f}), "
                     f"{r['flushes_per_s']:,.0f}/s ({r['flushes_per_s'] / r['jobs_per_s']:.2f}), {r['deadlocks']}; "
                     f"{r['waits']}"))
    return rows


# === The run ===

def print_table(rows: list[tuple[str, str]], quick: bool) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"SQLite {sqlite3.sqlite_version}, {'quick' if quick else 'full'} run")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


def run(quick: bool) -> None:
    seconds = 3.0 if quick else 10.0
    big, small = (10_000, 1_000) if quick else (1_000_000, 1_000)
    samples, trials = (50, 50) if quick else (300, 300)
    history_jobs, history_samples = (2_000, 30) if quick else (20_000, 30)
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="aitbc-bench-") as tmp:
        work = Path(tmp)
        with server("bare", work) as (port, pid):
            bare, bare_cpu = measured(pid, bare_rate(port, 8 + MINERS, seconds))
            durable, durable_cpu = measured(pid, bare_rate(port, 8 + MINERS, seconds, "/durable"))
        with server("coord", work, work / "full.db") as (port, pid):
            full, full_cpu = measured(pid, lifecycle(port, seconds))
            woke = asyncio.run(wake(port, trials))
        with server("coord", work, work / "normal.db", "NORMAL") as (port, _):
            normal = asyncio.run(lifecycle(port, seconds))
        with server("coord", work, work / "distinct.db") as (port, _):
            distinct = asyncio.run(lifecycle(port, seconds, distinct=True))
        history = shape_history(work, history_jobs, history_samples)
        fleet_read_rows, fleet_read_ratios = fleet_depth(work, (100, 10_000 if quick else 100_000), samples)
        retention_rows, retention_figures = retention_scenario(work, 20 if quick else 600)
        prune_rows = [] if quick else pruning_impact(work, 20_000, 30.0)[0]
        depths, rss, size = {}, 0.0, {}
        for n in (small, big):
            db = work / f"depth-{n}.db"
            took = seed(db, n)
            rows.append((f"seeded {n:,} queued jobs through the data layer", f"{took:.1f} s"))
            with server("coord", work, db) as (port, pid):
                depths[n] = asyncio.run(depth(port, samples))
                rss = rss_mb(pid)
            size[n] = sum(p.stat().st_size for p in work.glob(f"depth-{n}.db*"))
        logs = log_depth(work, (small, big), samples)
        fleet, fleet_figures = fleet_scenario(work, fleet_plan(1_000 if quick else 10_000, quick))
    lifecycle_ratio = full["req_per_s"] / bare["req_per_s"]
    durable_ratio = full["req_per_s"] / durable["req_per_s"]
    history_ratio = history["history_ms"] / history["fresh_ms"]
    distinct_ratio = distinct["jobs_per_s"] / full["jobs_per_s"]
    poll_ratio = depths[big]["poll"] / depths[small]["poll"]
    read_ratios = {name: depths[big][name] / depths[small][name] for name in READS} | fleet_read_ratios
    bytes_per_job = (size[big] - size[small]) / (big - small)
    log_proof_reads = logs[big]["rows"] / math.ceil(math.log2(big))
    rows = [
        ("bare Starlette JSON POST (framework ceiling)", f"{bare['req_per_s']:,.0f} req/s"),
        ("bare Starlette POST + SQLite insert, commit each (WAL, FULL)", f"{durable['req_per_s']:,.0f} req/s, "
         f"{durable_cpu:.0f} us server CPU a request"),
        ("lifecycle, FULL: submit + poll + result (signed)", f"{full['req_per_s']:,.0f} req/s, "
         f"{full['jobs_per_s']:,.0f} jobs/s"),
        ("lifecycle submit-to-completed latency p50 / p99", f"{full['p50_ms']:.1f} / {full['p99_ms']:.1f} ms"),
        ("server CPU per request: bare / lifecycle", f"{bare_cpu:.0f} / {full_cpu:.0f} us"),
        ("lifecycle, NORMAL", f"{normal['req_per_s']:,.0f} req/s, {normal['jobs_per_s']:,.0f} jobs/s"),
        ("wake: submit until the waiting miner holds it p50 / p99", f"{woke['p50_ms']:.2f} / {woke['p99_ms']:.2f} ms"),
        ("lifecycle, FULL, every job a new max_price (shape)", f"{distinct['req_per_s']:,.0f} req/s, "
         f"{distinct['jobs_per_s']:,.0f} jobs/s"),
        (f"seeded {history_jobs:,} completed jobs, each its own shape", f"{history['seed_s']:.1f} s"),
        (f"p50 empty poll (price 0.5 meets every shape): fresh / {history_jobs:,} shapes",
         f"{history['fresh_ms']:.2f} / {history['history_ms']:.2f} ms"),
        *rows,
        *[(f"p50 {name} with {small:,} / {big:,} jobs",
           f"{depths[small][name]:.2f} / {depths[big][name]:.2f} ms") for name in ("poll", *READS)],
        (f"server RSS after the {big:,}-job runs", f"{rss:.0f} MB"),
        ("database bytes per job", f"{bytes_per_job:,.0f}"),
        *[(f"seeded a receipt log of {n:,} leaves through the data layer", f"{logs[n]['seed_s']:.1f} s")
          for n in (small, big)],
        (f"p50 inclusion proof (GET /v1/log/proof/inclusion) at {small:,} / {big:,} leaves",
         f"{logs[small]['p50_ms']:.2f} / {logs[big]['p50_ms']:.2f} ms"),
        (f"rows an inclusion proof reads at {small:,} / {big:,} leaves (most over {samples} leaves)",
         f"{logs[small]['rows']:.0f} / {logs[big]['rows']:.0f} (log_proof_reads = rows / ceil(log2 n))"),
        *fleet_read_rows,
        *retention_rows,
        *prune_rows,
        *fleet,
    ]
    print_table(rows, quick)
    print(f"BENCH lifecycle_ratio={lifecycle_ratio:.2f} jobs_per_s={full['jobs_per_s']:.0f} "
          f"wake_p50_ms={woke['p50_ms']:.2f} wake_p99_ms={woke['p99_ms']:.2f} poll_depth_ratio={poll_ratio:.2f} "
          f"read_depth_ratio={max(read_ratios.values()):.2f} rss_mb={rss:.0f} bytes_per_job={bytes_per_job:.0f} "
          f"full_vs_normal={full['req_per_s'] / normal['req_per_s']:.2f} durable_ratio={durable_ratio:.2f} "
          f"shape_history_ratio={history_ratio:.2f} distinct_shape_ratio={distinct_ratio:.2f} "
          + fleet_bench(fleet_figures) + f" log_proof_reads={log_proof_reads:.2f} "
          + retention_bench(retention_figures))


def retention_bench(figures: dict[str, float]) -> str:
    return f"retention_growth={figures['retention_growth']:.2f} kept_bytes_per_job={figures['kept_bytes_per_job']:.0f}"


def retention_only(quick: bool) -> None:
    """The retention run alone (for development), with the fleet reads and (full) the pruning impact."""
    with tempfile.TemporaryDirectory(prefix="aitbc-bench-") as tmp:
        work = Path(tmp)
        rows, figures = retention_scenario(work, 20 if quick else 600)
        fleet_rows_, ratios = fleet_depth(work, (100, 10_000 if quick else 100_000), 50 if quick else 300)
        prune_rows = [] if quick else pruning_impact(work, 20_000, 30.0)[0]
    print_table(rows + fleet_rows_ + prune_rows, quick)
    print(f"BENCH {retention_bench(figures)} fleet_read_depth_ratio={max(ratios.values()):.2f}")


def fleet_only(miners: int, quick: bool) -> None:
    """The fleet scenario alone (for development): its table rows and BENCH figures."""
    with tempfile.TemporaryDirectory(prefix="aitbc-bench-") as tmp:
        rows, figures = fleet_scenario(Path(tmp), fleet_plan(miners, quick))
    print_table(rows, quick)
    print("BENCH " + fleet_bench(figures))


def log_only(leaves: int) -> None:
    """The receipt-log scenario alone (for development): its figures and the BENCH figure."""
    with tempfile.TemporaryDirectory(prefix="aitbc-bench-") as tmp:
        logs = log_depth(Path(tmp), (1_000, leaves), 300)
    for n, figures in logs.items():
        print(f"  {n:>9,} leaves: seeded in {figures['seed_s']:.1f} s, an inclusion proof reads at most "
              f"{figures['rows']:.0f} rows, p50 {figures['p50_ms']:.2f} ms")
    print(f"BENCH log_proof_reads={logs[leaves]['rows'] / math.ceil(math.log2(leaves)):.2f}")


def in_process(jobs: int) -> None:
    """The lifecycle in this process, through the app's ASGI channel, until `jobs` jobs are done."""
    ac.setup_logging("info")
    logging.getLogger().handlers[0].setStream(open(os.devnull, "w"))  # noqa: SIM115 - lines made, not shown
    with tempfile.TemporaryDirectory(prefix="aitbc-bench-") as tmp:
        app = ac.App(ac.Settings.load({**coordinator_env(), "DATABASE_URL": f"sqlite:///{tmp}/in-process.db"}, None))

        async def drive() -> tuple[dict[str, float], float]:
            async with app.lifespan():
                cpu = time.thread_time()
                result = await lifecycle(0, math.inf, app=app, jobs=jobs)
                return result, time.thread_time() - cpu

        result, cpu = asyncio.run(drive())
    print(f"in-process lifecycle: {jobs} jobs, {result['requests']:.0f} requests, {result['req_per_s']:,.0f} req/s, "
          f"{cpu / result['requests'] * 1e6:.0f} us of main-thread CPU a request")


def instructions(small: int = 200, big: int = 1200) -> None:
    """Instructions per in-process lifecycle request, counted by valgrind: the difference between a
    run of `big` jobs and one of `small` (start-up and shutdown cancel out)."""
    if shutil.which("valgrind") is None:
        raise SystemExit("--instructions needs valgrind (Debian: apt-get install valgrind)")
    counts = []
    for jobs in (small, big):
        run = subprocess.run(["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
                              sys.executable, __file__, "--in-process", str(jobs)],
                             capture_output=True, text=True, check=True)
        refs = re.search(r"I\s+refs:\s+([\d,]+)", run.stderr)
        requests = re.search(r"(\d+) requests", run.stdout)
        if refs is None or requests is None:
            raise SystemExit(f"unexpected valgrind output:\n{run.stdout}\n{run.stderr[-2000:]}")
        counts.append((int(refs.group(1).replace(",", "")), int(requests.group(1))))
    (refs_small, requests_small), (refs_big, requests_big) = counts
    print(f"instructions per in-process lifecycle request: "
          f"{(refs_big - refs_small) / (requests_big - requests_small) / 1000:,.1f}k "
          f"(the {requests_big - requests_small} requests between a {small}-job and a {big}-job run)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and a few seconds per scenario")
    parser.add_argument("--instructions", action="store_true",
                        help="instructions per request of the lifecycle run in-process under valgrind")
    parser.add_argument("--in-process", type=int, metavar="JOBS",
                        help="run the lifecycle in this process (no sockets) for JOBS jobs and print its CPU a request")
    parser.add_argument("--fleet", type=int, metavar="N",
                        help="only the fleet scenario, with N miners (with --quick: its short durations)")
    parser.add_argument("--log", type=int, metavar="N",
                        help="only the receipt-log scenario: proofs at 1,000 and at N leaves, and log_proof_reads")
    parser.add_argument("--retention", action="store_true",
                        help="only the retention scenario, the fleet-size reads and (without --quick) pruning's impact")
    parser.add_argument("--postgres", action="store_true",
                        help="only the PostgreSQL scenario: a private cluster, the lifecycle on 1 and 2 instances"
                             " beside SQLite, wake-ups within and across instances, CPU per job on each side")
    parser.add_argument("--bare-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--floor-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--slowloris", metavar="PORT:N", help=argparse.SUPPRESS)
    parser.add_argument("--heartbeats", metavar="PORT:KEYFILE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_server:
        bare_server(args.bare_server)
    elif args.floor_server:
        floor_server(args.floor_server)
    elif args.slowloris:
        slowloris_process(args.slowloris)
    elif args.heartbeats:
        heartbeats_process(args.heartbeats)
    elif args.postgres:
        postgres_run(args.quick)
    elif args.fleet:
        fleet_only(args.fleet, args.quick)
    elif args.log:
        log_only(args.log)
    elif args.retention:
        retention_only(args.quick)
    elif args.in_process:
        in_process(args.in_process)
    elif args.instructions:
        instructions()
    else:
        run(args.quick)


if __name__ == "__main__":
    main()
