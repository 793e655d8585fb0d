"""Connections that never finish a request: real sockets against the real `serve`, short deadlines.

Every stage of receiving a request has a deadline (head, body), a long-poll in progress is the
server's own wait, and no address outside FORWARDED_ALLOW_IPS can hold more than its share.
Honest clients (on 127.0.0.1, a trusted address) keep working meanwhile.
"""

from __future__ import annotations

import asyncio
import gc
import re
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

import aitbc_coord as ac
from test_serve import CLIENT, MINER, start_server

DEADLINES = {"APP_ENV": "dev", "REQUEST_HEADER_TIMEOUT_SECONDS": "1", "REQUEST_BODY_TIMEOUT_SECONDS": "2",
             "MAX_CONNECTIONS_PER_ADDRESS": "5", "RATE_LIMIT_REQUESTS": "0"}


@contextmanager
def server(tmp_path: Path) -> Iterator[str]:
    proc, base = start_server(tmp_path, "--db", str(tmp_path / "c.db"), env=DEADLINES)
    try:
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def connect(base: str, source: str = "127.0.0.1") -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10, source_address=(source, 0))
    return sock


def read_until_closed(sock: socket.socket, limit: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    started, data = time.monotonic(), b""
    sock.settimeout(limit)
    while chunk := sock.recv(4096):
        data += chunk
    return data, time.monotonic() - started


def open_connections(base: str) -> float:
    text = httpx.get(base + "/metrics", timeout=10).text
    return float(re.search(r"^aitbc_connections_open (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]


def honest_clients_work(base: str) -> None:
    with httpx.Client(base_url=base, timeout=10) as http:
        assert http.post("/v1/miners/register", json={"capabilities": {}}, headers=MINER).status_code == 200
        job = http.post("/v1/jobs", json={"payload": {}}, headers=CLIENT)
        assert job.status_code == 201
        got = http.post("/v1/miners/poll", json={"max_wait_seconds": 1}, headers=MINER)
        assert got.status_code == 200 and got.json()["job_id"] == job.json()["job_id"]
        assert http.post(f"/v1/miners/{got.json()['job_id']}/result", json={"result": {}}, headers=MINER).status_code == 200


def test_slow_headers_silent_connections_and_trickled_bodies_are_cut_at_their_deadlines(tmp_path: Path) -> None:
    with server(tmp_path) as base:
        baseline = open_connections(base)
        silent = connect(base)
        slow_head = connect(base)
        slow_head.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\n")
        trickle = connect(base)
        trickle.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nX-Api-Key: " + ac.DEV_KEYS["client"].encode()
                        + b"\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n{")
        for _ in range(3):  # one more header line, and one more body byte, every 0.3 s (stopping in time
            time.sleep(0.3)  # to read the 408: bytes sent after the close would reset the connection)
            slow_head.sendall(b"X-Slow: 1\r\n")
            trickle.sendall(b" ")
        honest_clients_work(base)  # meanwhile, on other connections
        for sock, deadline in ((silent, 1), (slow_head, 1), (trickle, 2)):
            data, took = read_until_closed(sock, 5)
            assert data.startswith(b"HTTP/1.1 408"), data[:80]
            assert took < deadline + 1.5, took
            sock.close()
        time.sleep(0.2)
        assert open_connections(base) == baseline
        metrics = httpx.get(base + "/metrics").text
        assert 'aitbc_connections_closed_by_deadline_total{deadline="head"} 2.0' in metrics
        assert 'aitbc_connections_closed_by_deadline_total{deadline="body"} 1.0' in metrics


def test_a_body_at_a_kilobyte_a_second_gets_the_time_it_needs(tmp_path: Path) -> None:
    with server(tmp_path) as base:
        body = b'{"payload": {"x": "' + b"a" * 3_000 + b'"}}'
        sock = connect(base)
        sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nX-Api-Key: " + ac.DEV_KEYS["client"].encode()
                     + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n")
        for i in range(0, len(body), 512):  # ~1.4 KB/s: longer than the 2 s body deadline, never slower
            sock.sendall(body[i:i + 512])
            time.sleep(0.35)
        sock.settimeout(5)
        assert sock.recv(4096).startswith(b"HTTP/1.1 201")
        sock.close()


def test_a_long_poll_in_progress_outlives_the_deadlines(tmp_path: Path) -> None:
    with server(tmp_path) as base, httpx.Client(base_url=base, timeout=10) as http:
        http.post("/v1/miners/register", json={"capabilities": {}}, headers=MINER)
        started = time.monotonic()
        r = http.post("/v1/miners/poll", json={"max_wait_seconds": 3}, headers=MINER)
        assert r.status_code == 204 and time.monotonic() - started >= 2.9


def test_one_address_cannot_hold_more_than_its_share(tmp_path: Path) -> None:
    with server(tmp_path) as base:
        held = [connect(base, "127.0.0.2") for _ in range(5)]
        for sock in held:  # admitted: a request on each still works
            sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.settimeout(5)
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        extra = connect(base, "127.0.0.2")
        data, _ = read_until_closed(extra, 5)
        assert data.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in data.lower(), data
        honest_clients_work(base)  # 127.0.0.1 is a trusted proxy address: not capped
        trusted = [connect(base) for _ in range(8)]
        metrics = httpx.get(base + "/metrics").text
        assert 'aitbc_connections_refused_total{cap="address"} 1.0' in metrics
        for sock in held + trusted + [extra]:
            sock.close()


def test_the_documented_defaults(tmp_path: Path) -> None:
    s = ac.Settings.load({}, dotenv=False)
    assert (s.request_header_timeout_seconds, s.request_body_timeout_seconds) == (10, 30)
    assert (s.max_connections_per_address, s.forwarded_allow_ips) == (1024, ("127.0.0.1", "::1"))
    guard = ac.ConnectionGuard(s, open_files=20_000)
    assert guard.total == 20_000 - ac.OPEN_FILES_HEADROOM
    assert ac.address_key("2001:db8::1") == ac.address_key("2001:db8::ffff") == "2001:db8::/64"
    assert ac.address_key("::ffff:10.0.0.1") == "10.0.0.1"
    with pytest.raises(ac.ConfigError, match="FORWARDED_ALLOW_IPS"):
        ac.Settings.load({"FORWARDED_ALLOW_IPS": "not-an-address"}, dotenv=False)


def test_the_caps_count_and_release(tmp_path: Path) -> None:
    s = ac.Settings.load({"MAX_CONNECTIONS_PER_ADDRESS": "2", "FORWARDED_ALLOW_IPS": "10.0.0.0/8"}, dotenv=False)
    guard = ac.ConnectionGuard(s, open_files=ac.OPEN_FILES_HEADROOM + 16)
    assert guard.peer("192.0.2.1") == ("192.0.2.1", False) and guard.peer("10.1.2.3") == ("10.1.2.3", True)
    assert [guard.admit(guard.peer("192.0.2.1")) for _ in range(3)] == [None, None, "address"]
    assert [guard.admit(guard.peer("10.1.2.3")) for _ in range(5)] == [None] * 5  # trusted: no per-address cap
    guard.release(guard.peer("192.0.2.1"))
    assert guard.admit(guard.peer("192.0.2.1")) is None
    assert guard.open == 7 and guard.refused == {"address": 1, "total": 0}
    assert [guard.admit(guard.peer(f"192.0.2.{i}")) for i in range(100, 111)] == [None] * 9 + ["total"] * 2


def test_pipelined_requests_and_outsized_declarations_do_not_escape_the_deadlines(tmp_path: Path) -> None:
    """A complete request with the head of another behind it in one packet; a body declared far past
    MAX_BODY_BYTES; a body still coming after the answer (413): each is cut, none is held."""
    key = ac.DEV_KEYS["client"].encode()
    with server(tmp_path) as base:
        pipelined = connect(base, "127.0.0.3")
        pipelined.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n"
                          b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nX-Api-Key: " + key + b"\r\nContent-Length: 100\r\n\r\n")
        huge = connect(base, "127.0.0.3")
        huge.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nX-Api-Key: " + key
                     + b"\r\nContent-Length: 1000000000000\r\n\r\n{")
        data, took = read_until_closed(pipelined, 10)
        assert data.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 408" in data and took < 4, (data[-60:], took)
        data, took = read_until_closed(huge, 10)
        assert b"HTTP/1.1 413" in data and took < 4, (data, took)  # answered at once, then closed
        for sock in (pipelined, huge):
            sock.close()
        honest = connect(base, "127.0.0.3")  # the address is not locked out
        honest.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        honest.settimeout(5)
        assert honest.recv(4096).startswith(b"HTTP/1.1 200")
        honest.close()


def gc_collections(base: str) -> dict[str, float]:
    text = httpx.get(base + "/metrics", timeout=10).text
    return {g: float(n) for g, n in re.findall(r'^python_gc_collections_total\{generation="(\d)"\} (\S+)$', text, re.M)}


def test_the_collector_runs_on_a_clock_not_by_allocation_counts(tmp_path: Path) -> None:
    """With 10,000 parked long-polls CPython's own rule ran a full collection every few seconds, each
    pausing the loop for most of a second, and young collections that lagged behind a count offset
    by freed old objects took 100-250 ms each; serve freezes its start-up objects, collects both
    young generations together every tick (0.1 s) and the oldest every FULL_COLLECTION_SECONDS.
    Rounds of parked polls (what promotes objects to the oldest generation) cost clocked young
    collections only: none of generation 0 alone (what allocation counts start), none of the oldest."""
    env = {"APP_ENV": "dev", "RATE_LIMIT_REQUESTS": "0", "POLL_MAX_CONCURRENT": "400"}  # default deadlines:
    # 300 connections opened at once on a busy machine may take longer than DEADLINES' 1 s to send a head
    proc, base = start_server(tmp_path, "--db", str(tmp_path / "c.db"), env=env)

    host, port = httpx.URL(base).host, httpx.URL(base).port
    body = b'{"max_wait_seconds": 0.5}'
    request = (f"POST /v1/miners/poll HTTP/1.1\r\nHost: {host}\r\nX-Api-Key: {MINER['X-Api-Key']}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body

    async def parked_poll() -> bytes:  # on a socket of its own (an httpx client per poll: 35 s of this test)
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(request)
            return await asyncio.wait_for(reader.readline(), 30)
        finally:
            writer.close()

    async def rounds_of_parked_polls(n: int, rounds: int) -> None:
        for _ in range(rounds):  # fresh connections each round: none races the server's keep-alive timeout
            answers = await asyncio.gather(*(parked_poll() for _ in range(n)))
            assert {line.split()[1] for line in answers} == {b"204"}, answers[:3]

    try:
        deadline = time.monotonic() + 10
        while "start-up objects frozen" not in (tmp_path / "serve.log").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        httpx.post(base + "/v1/miners/register", json={"capabilities": {}}, headers=MINER)
        before = gc_collections(base)
        asyncio.run(rounds_of_parked_polls(300, 8))
        after = gc_collections(base)
        assert after["1"] - before["1"] > 12, (before, after)  # enough for CPython's rule to have fired
        assert after["0"] == before["0"], (before, after)
        assert after["2"] == before["2"], (before, after)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_full_collection_comes_daily_or_after_memory_grew() -> None:
    app = ac.App(ac.Settings.load({"APP_ENV": "dev"}, dotenv=False))
    rss = [400 << 20]
    server = ac.Server(ac.uvicorn.Config(app), app.coord, app.metrics, rss=lambda: rss[0])
    server.full_collection_due, server.rss_at_collection = time.monotonic() + 3600, 400 << 20
    rss[0] = (600 << 20) - 1  # grown by half less a byte: not yet
    asyncio.run(server.on_tick(10))
    assert server.rss_at_collection == 400 << 20
    rss[0] = 600 << 20  # by half, and by 200 MiB: less than 256 MiB, not yet
    asyncio.run(server.on_tick(10))
    assert server.rss_at_collection == 400 << 20
    rss[0] = 656 << 20  # by half and by 256 MiB
    asyncio.run(server.on_tick(10))
    assert server.rss_at_collection == 656 << 20
    assert server.full_collection_due > time.monotonic() + ac.FULL_COLLECTION_SECONDS - 60
    server.full_collection_due = 0.0  # a day has passed, with no growth
    asyncio.run(server.on_tick(20))
    text = ac.generate_latest(app.metrics.registry).decode()
    assert "aitbc_gc_full_collection_seconds_count 2.0" in text


def test_the_next_full_collection_is_measured_from_the_memory_the_last_one_left() -> None:
    """The RSS now, not the peak: a peak never comes down, so the next threshold would ratchet up
    by half with every collection however much each one freed (56 -> 312 -> 568 -> 852 MiB ...)."""
    app = ac.App(ac.Settings.load({"APP_ENV": "dev"}, dotenv=False))
    readings = [656 << 20, 420 << 20]  # grown enough; then what the full collection left
    server = ac.Server(ac.uvicorn.Config(app), app.coord, app.metrics, rss=lambda: readings.pop(0))
    server.full_collection_due, server.rss_at_collection = time.monotonic() + 3600, 400 << 20
    asyncio.run(server.on_tick(10))
    assert server.rss_at_collection == 420 << 20
    readings[:] = [(676 << 20) - 1]  # less than 420 MiB + 256 MiB: not yet
    asyncio.run(server.on_tick(10))
    assert server.rss_at_collection == 420 << 20
    readings[:] = [676 << 20, 430 << 20]  # by 256 MiB (and more than half) over 420: due, long before a peak's 984
    asyncio.run(server.on_tick(10))
    assert server.rss_at_collection == 430 << 20


def test_the_rss_read_is_the_memory_in_use_now() -> None:
    before = ac.rss_bytes()
    ballast = bytearray(64 << 20)  # touched: resident
    ballast[::4096] = b"x" * len(range(0, len(ballast), 4096))
    during = ac.rss_bytes()
    del ballast
    after = ac.rss_bytes()
    assert during - before >= 60 << 20
    if sys.platform.startswith("linux"):  # /proc/self/statm: it comes back down (a peak would not)
        assert during - after >= 60 << 20


def test_a_server_run_in_a_thread_leaves_the_collector_as_it_found_it(tmp_path: Path) -> None:
    settings = ac.Settings.load({"APP_ENV": "dev", "DATABASE_URL": f"sqlite:///{tmp_path}/c.db"}, dotenv=False)
    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    with ac.running_server(settings) as base:
        assert httpx.get(base + "/v1/health", timeout=10).status_code == 200
        assert not gc.isenabled()  # the server's clock runs it meanwhile
    assert gc.isenabled() and gc.get_freeze_count() == frozen
