"""Benchmark: the real coordinator next to the framework's own ceiling, on this machine.

    python tests/bench.py [--quick]
    python tests/bench.py --instructions


Starts `aitbc-coord serve` as a subprocess (temporary database, DB_SYNCHRONOUS=FULL, a signing and
an attestation key) and, in the same run, a bare Starlette app with one JSON POST route under the
same uvicorn settings, and drives both with the same load generator. The server and the generator
share the machine's cores, so every headline figure is a ratio measured in the same run. Prints a
table, then one line `BENCH key=value ...` to track over time. Not collected by pytest.

`--instructions` is for judging a change to the hot path, where wall-clock figures on a shared
machine move more than the change: it runs the same lifecycle in-process (through the app's ASGI
channel: no sockets, no h11) under valgrind, twice with different sizes, and prints the
instructions per request, which repeat to within ~0.1%.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import aitbc_coord as ac  # noqa: E402

CLIENT_KEY, ADMIN_KEY = "bench-client-key", "bench-admin-key"
MINERS = 8
MINER_KEYS = [f"bench-miner-key-{i}" for i in range(MINERS)]


# === A minimal keep-alive HTTP/1.1 client: the generator must cost little next to the server ===

class Http:
    def __init__(self, port: int) -> None:
        self.port = port

    async def open(self) -> Http:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    async def call(self, method: str, path: str, body: Any = None, key: str | None = None) -> tuple[int, Any]:
        data = b"" if body is None else json.dumps(body).encode()
        head = f"{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {len(data)}\r\n"
        head += "Content-Type: application/json\r\n" + (f"X-Api-Key: {key}\r\n" if key else "") + "\r\n"
        self.writer.write(head.encode() + data)
        status = int((await self.reader.readline()).split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        raw = await self.reader.readexactly(length) if length else b""
        return status, json.loads(raw) if raw else None

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
    """The framework ceiling: one JSON POST route that parses the body and answers a small object."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def echo(request: Any) -> JSONResponse:
        body = await request.json()
        return JSONResponse({"ok": True, "n": len(body)})

    app = Starlette(routes=[Route("/echo", echo, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=port, log_config=None, access_log=False, server_header=False)


def coordinator_env(synchronous: str = "FULL") -> dict[str, str]:
    return {"APP_ENV": "prod", "CLIENT_API_KEYS": CLIENT_KEY, "ADMIN_API_KEYS": ADMIN_KEY,
            "MINER_API_KEYS": ",".join(f"m{i}={k}" for i, k in enumerate(MINER_KEYS)),
            "RECEIPT_SIGNING_KEY_HEX": secrets.token_hex(32), "RECEIPT_ATTESTATION_KEY_HEX": secrets.token_hex(32),
            "DB_SYNCHRONOUS": synchronous, "JOB_TTL_SECONDS": "3600",
            "RATE_LIMIT_REQUESTS": "0"}  # a stress test, not a well-behaved client


@contextmanager
def server(kind: str, workdir: Path, db: Path | None = None, synchronous: str = "FULL") -> Any:
    """Start the coordinator (or the bare app) on a free port; yields (port, pid)."""
    port = free_port()
    if kind == "bare":
        cmd = [sys.executable, __file__, "--bare-server", str(port)]
    else:
        cmd = [sys.executable, "-m", "aitbc_coord", "serve", "--port", str(port), "--db", str(db)]
    env = {**os.environ, **coordinator_env(synchronous)}
    log = open(workdir / f"{kind}-{port}.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
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
        proc.wait(timeout=30)
        log.close()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(pid: int, scenario: Any) -> tuple[dict[str, float], float]:
    """Run `scenario` (a coroutine returning a dict with req_per_s), and the server's CPU us per request."""
    cpu, started = cpu_seconds(pid), time.perf_counter()
    result = asyncio.run(scenario)
    elapsed, cpu = time.perf_counter() - started, cpu_seconds(pid) - cpu
    return result, cpu / (result["req_per_s"] * elapsed) * 1e6


# === Scenarios ===

def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def bare_rate(port: int, connections: int, seconds: float) -> dict[str, float]:
    """Requests/s of the bare route with `connections` concurrent keep-alive clients."""
    conns = [await Http(port).open() for _ in range(connections)]
    count, stop = [0], time.perf_counter() + seconds

    async def loop(c: Http) -> None:
        while time.perf_counter() < stop:
            status, _ = await c.call("POST", "/echo", {"prompt": "hello", "n": 1})
            assert status == 200
            count[0] += 1

    started = time.perf_counter()
    await asyncio.gather(*(loop(c) for c in conns))
    elapsed = time.perf_counter() - started
    for c in conns:
        c.close()
    return {"req_per_s": count[0] / elapsed}


async def lifecycle(port: int, seconds: float, clients: int = 8, app: Any = None,
                    jobs: int | None = None) -> dict[str, float]:
    """Clients submit, miners long-poll and post results (each completion signs a receipt), for
    `seconds` or until `jobs` jobs are done; over sockets to `port`, or in-process to `app`."""
    def connect() -> Any:
        return Http(port).open() if app is None else Asgi(app).open()

    client_conns = [await connect() for _ in range(clients)]
    miner_conns = [await connect() for _ in range(MINERS)]
    for c, key in zip(miner_conns, MINER_KEYS):
        assert (await c.call("POST", "/v1/miners/register", {"capabilities": {"price": 0.5}}, key))[0] == 200
    outstanding = asyncio.Semaphore(2 * MINERS)  # a steady queue, so latency means something
    submitted: dict[str, float] = {}
    latencies: list[float] = []
    requests, budget = [0], [jobs if jobs is not None else math.inf]
    stop = time.perf_counter() + seconds

    async def client(c: Http) -> None:
        while time.perf_counter() < stop and budget[0] > 0:
            budget[0] -= 1
            await outstanding.acquire()
            t = time.perf_counter()
            status, job = await c.call("POST", "/v1/jobs", {"payload": {"prompt": "render a cat", "steps": 20}},
                                       CLIENT_KEY)
            assert status == 201, job
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
            last_done[0] = time.perf_counter()
            latencies.append(last_done[0] - submitted.pop(job["job_id"]))
            outstanding.release()

    started = time.perf_counter()
    last_done = [started]
    await asyncio.gather(*(client(c) for c in client_conns), *(miner(c, k) for c, k in zip(miner_conns, MINER_KEYS)))
    # with a job budget, the idle miners' last long-polls outlast the work: stop the clock at the last job
    elapsed = (last_done[0] if jobs is not None else time.perf_counter()) - started
    for c in client_conns + miner_conns:
        c.close()
    return {"requests": requests[0], "req_per_s": requests[0] / elapsed, "jobs_per_s": len(latencies) / elapsed,
            "p50_ms": pct(latencies, 0.5) * 1000, "p99_ms": pct(latencies, 0.99) * 1000,
            "connections": clients + MINERS}


async def wake(port: int, trials: int) -> dict[str, float]:
    """A miner waits in a long-poll; a client submits a matching job; time until the miner holds it."""
    waiter, submitter = await Http(port).open(), await Http(port).open()
    key = MINER_KEYS[0]
    await waiter.call("POST", "/v1/miners/register", {"capabilities": {}, "region": "wake"}, key)
    times = []
    for _ in range(trials):
        poll = asyncio.create_task(waiter.call("POST", "/v1/miners/poll", {"max_wait_seconds": 10}, key))
        await asyncio.sleep(0.003)  # let the poll reach the server and park
        t = time.perf_counter()
        await submitter.call("POST", "/v1/jobs", {"payload": {"w": 1}, "constraints": {"region": "wake"}}, CLIENT_KEY)
        status, job = await poll
        times.append(time.perf_counter() - t)
        assert status == 200
        await waiter.call("POST", f"/v1/miners/{job['job_id']}/result", {"result": {}}, key)
    waiter.close()
    submitter.close()
    return {"p50_ms": pct(times, 0.5) * 1000, "p99_ms": pct(times, 0.99) * 1000}


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


# === The run ===

def run(quick: bool) -> None:
    seconds = 3.0 if quick else 10.0
    big, small = (10_000, 1_000) if quick else (1_000_000, 1_000)
    samples, trials = (50, 50) if quick else (300, 300)
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="aitbc-bench-") as tmp:
        work = Path(tmp)
        with server("bare", work) as (port, pid):
            bare, bare_cpu = measured(pid, bare_rate(port, 8 + MINERS, seconds))
        with server("coord", work, work / "full.db") as (port, pid):
            full, full_cpu = measured(pid, lifecycle(port, seconds))
            woke = asyncio.run(wake(port, trials))
        with server("coord", work, work / "normal.db", "NORMAL") as (port, _):
            normal = asyncio.run(lifecycle(port, seconds))
        depths, rss, size = {}, 0.0, {}
        for n in (small, big):
            db = work / f"depth-{n}.db"
            took = seed(db, n)
            rows.append((f"seeded {n:,} queued jobs through the data layer", f"{took:.1f} s"))
            with server("coord", work, db) as (port, pid):
                depths[n] = asyncio.run(depth(port, samples))
                rss = rss_mb(pid)
            size[n] = sum(p.stat().st_size for p in work.glob(f"depth-{n}.db*"))
    lifecycle_ratio = full["req_per_s"] / bare["req_per_s"]
    poll_ratio = depths[big]["poll"] / depths[small]["poll"]
    read_ratios = {name: depths[big][name] / depths[small][name] for name in READS}
    bytes_per_job = (size[big] - size[small]) / (big - small)
    rows = [
        ("bare Starlette JSON POST (framework ceiling)", f"{bare['req_per_s']:,.0f} req/s"),
        ("lifecycle, FULL: submit + poll + result (signed)", f"{full['req_per_s']:,.0f} req/s, "
         f"{full['jobs_per_s']:,.0f} jobs/s"),
        ("lifecycle submit-to-completed latency p50 / p99", f"{full['p50_ms']:.1f} / {full['p99_ms']:.1f} ms"),
        ("server CPU per request: bare / lifecycle", f"{bare_cpu:.0f} / {full_cpu:.0f} us"),
        ("lifecycle, NORMAL", f"{normal['req_per_s']:,.0f} req/s, {normal['jobs_per_s']:,.0f} jobs/s"),
        ("wake: submit until the waiting miner holds it p50 / p99", f"{woke['p50_ms']:.2f} / {woke['p99_ms']:.2f} ms"),
        *rows,
        *[(f"p50 {name} with {small:,} / {big:,} jobs",
           f"{depths[small][name]:.2f} / {depths[big][name]:.2f} ms") for name in ("poll", *READS)],
        (f"server RSS after the {big:,}-job runs", f"{rss:.0f} MB"),
        ("database bytes per job", f"{bytes_per_job:,.0f}"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"SQLite {sqlite3.sqlite_version}, {'quick' if quick else 'full'} run")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    print(f"BENCH lifecycle_ratio={lifecycle_ratio:.2f} jobs_per_s={full['jobs_per_s']:.0f} "
          f"wake_p50_ms={woke['p50_ms']:.2f} wake_p99_ms={woke['p99_ms']:.2f} poll_depth_ratio={poll_ratio:.2f} "
          f"read_depth_ratio={max(read_ratios.values()):.2f} rss_mb={rss:.0f} bytes_per_job={bytes_per_job:.0f} "
          f"full_vs_normal={full['req_per_s'] / normal['req_per_s']:.2f}")


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
    parser.add_argument("--bare-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_server:
        bare_server(args.bare_server)
    elif args.in_process:
        in_process(args.in_process)
    elif args.instructions:
        instructions()
    else:
        run(args.quick)


if __name__ == "__main__":
    main()
