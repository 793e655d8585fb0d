"""The receipt log's client side (`verify --log`, `audit`) against servers that misbehave and against
its own mistakes: one exit status per kind of outcome (0 ok, 1 a check failed, 2 the server could
not be asked, 3 a local problem), always one line, never a traceback. (Break report 17 #2, #3, #9, #11.)"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from nacl.signing import SigningKey

import aitbc_coord as ac
from test_receipts import EDGE_PAYLOAD, EDGE_SEED, EDGE_SIGNATURE

# What a server that is not a coordinator (or a broken one) may send, as the break report tried it.
ANSWERS = {
    "not HTTP": b"\x00\xffgarbage not http\r\n\r\n",
    "shorter than its Content-Length": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n"
                                       b"Connection: close\r\n\r\n{\"note\": \"x",
    "closed without an answer": b"",
    "HTML": b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 13\r\nConnection: close\r\n\r\n<html></html>",
    "JSON of another shape": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
                             b"Connection: close\r\n\r\n[]",
    "a 500": b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 5\r\nConnection: close\r\n\r\noops!",
    "JSON nested too deep": b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\nConnection: close\r\n\r\n" + b"[" * 200_000,
    "a redirect to a local file": b"HTTP/1.1 302 Found\r\nLocation: file:///etc/passwd\r\nContent-Length: 0\r\n"
                                  b"Connection: close\r\n\r\n",
}


@contextlib.contextmanager
def raw_server(answer: bytes) -> Iterator[str]:
    """A TCP server on a free port that reads a request and sends `answer` as it is; yields its URL."""
    sock = socket.create_server(("127.0.0.1", 0))
    sock.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    conn.recv(65536)
                    conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        sock.close()


def run(*args: object) -> Result:
    return CliRunner().invoke(ac.cli, [str(a) for a in args])


def one_line(result: Result) -> str:
    """The command's only line of output; fails on a traceback or more lines."""
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = result.output.splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.fixture
def receipt(tmp_path: Path) -> Path:
    """A receipt whose signature verifies (the edge vector), so that verify goes on to ask the log."""
    path = tmp_path / "receipt.json"
    path.write_text(json.dumps({**EDGE_PAYLOAD, "signature": EDGE_SIGNATURE}))
    return path


@pytest.mark.parametrize("what", list(ANSWERS))
def test_a_server_that_does_not_answer_as_a_log_is_exit_2_in_one_line(what: str, receipt: Path, tmp_path: Path) -> None:
    with raw_server(ANSWERS[what]) as url:
        result = run("verify", receipt, "--log", url)
        assert result.exit_code == ac.EXIT_TRANSPORT and one_line(result).startswith("cannot check the log: "), \
            result.output
        result = run("audit", "--log", url, "--state", tmp_path / "state.json")
        assert result.exit_code == ac.EXIT_TRANSPORT and one_line(result).startswith("cannot audit: "), result.output
    assert not (tmp_path / "state.json").exists()


def test_an_answer_cut_short_is_reported_as_such_even_when_what_came_is_json() -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n{}"
    with raw_server(answer) as url, pytest.raises(ac.LogUnreachable, match=r"cut its answer short \(2 of 1000 bytes\)"):
        ac.LogClient(url).checkpoint()


def test_a_server_that_does_not_answer_in_time_is_exit_2(receipt: Path) -> None:
    listener = socket.create_server(("127.0.0.1", 0))  # accepts (the backlog does) but never answers
    try:
        client = ac.LogClient(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=0.2)
        with pytest.raises(ac.LogUnreachable, match="cannot reach .*timed out"):
            client.checkpoint()
    finally:
        listener.close()


@pytest.mark.parametrize("url", ["", "http://[::1", "ftp://coord.example.org", "file:///etc/passwd",
                                 "http://coord.example.org:99999", "http://coord.example.org/?x=1", "coord.example.org"])
def test_a_log_url_that_is_not_a_coordinators_is_a_usage_error_exit_3(url: str, receipt: Path, tmp_path: Path) -> None:
    for args in (("verify", receipt, "--log", url), ("audit", "--log", url, "--state", tmp_path / "s.json")):
        result = run(*args)
        assert result.exit_code == ac.EXIT_LOCAL and "Invalid value for '--log'" in result.output, result.output
        assert "Traceback" not in result.output


def test_usage_errors_of_verify_and_audit_are_exit_3_not_click_s_2(receipt: Path, tmp_path: Path) -> None:
    assert run("audit", "--state", tmp_path / "s.json").exit_code == ac.EXIT_LOCAL  # --log missing
    assert run("audit", "--log", "http://127.0.0.1:9", "--bogus").exit_code == ac.EXIT_LOCAL
    assert run("verify", tmp_path / "missing.json").exit_code == ac.EXIT_LOCAL  # cannot be read
    assert run("verify", "--help").exit_code == 0
    assert run("migrate", "--bogus").exit_code == 2  # other commands keep click's usual status


def test_a_state_file_that_cannot_be_written_is_exit_3_before_the_log_is_asked(tmp_path: Path) -> None:
    """Break report 17 #3: --state /nonexistent/dir/s.json crashed with mkstemp's traceback, exit 1."""
    (tmp_path / "a-file").write_text("x")
    for state, why in ((tmp_path / "nonexistent" / "dir" / "s.json", "no directory"),
                       (tmp_path / "a-file" / "s.json", "")):
        result = run("audit", "--log", "http://127.0.0.1:9", "--state", state)  # port 9: asked, it would be 2
        line = one_line(result)
        assert result.exit_code == ac.EXIT_LOCAL and str(state) in line and why in line, result.output
    (tmp_path / "dir.json").mkdir()
    result = run("audit", "--log", "http://127.0.0.1:9", "--state", tmp_path / "dir.json")
    assert result.exit_code == ac.EXIT_LOCAL and "is a directory" in result.output  # click's usage error
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        result = run("audit", "--log", "http://127.0.0.1:9", "--state", locked / "s.json")
        assert result.exit_code == ac.EXIT_LOCAL and "is not writable" in one_line(result)


def test_keygen_writes_a_key_whole_or_not_at_all(tmp_path: Path) -> None:
    out = tmp_path / "nowhere" / "k.key"
    result = run("keygen", "--out", out)
    assert result.exit_code == 1 and one_line(result).startswith(f"Error: cannot write {out}")
    key = tmp_path / "k.key"
    assert run("keygen", "--out", key).exit_code == 0 and oct(key.stat().st_mode & 0o777) == "0o600"
    first = key.read_text()
    assert run("keygen", "--out", key, "--force").exit_code == 0 and key.read_text() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.key"]  # no temporary file left


@contextlib.contextmanager
def scripted_server(answers: list[tuple[int, dict[str, str], object]]) -> Iterator[tuple[str, list[str]]]:
    """An HTTP server that gives `answers` (status, headers, JSON body) in turn, the last one from then
    on; yields its URL and the paths asked for."""
    asked: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
            status, headers, body = answers[min(len(asked), len(answers) - 1)]
            asked.append(self.path)
            raw = json.dumps(body).encode()
            self.send_response(status)
            for name, value in {**headers, "Content-Length": str(len(raw))}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", asked
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


LIMITED = {"detail": "rate limit exceeded"}
CHECKPOINT = {"note": "a note\n"}


def test_the_client_waits_as_a_429_s_retry_after_asks_a_few_times_in_a_row() -> None:
    """Break report 17 #6: the audit gave up on the first 429 (exit 2) instead of honouring Retry-After."""
    slept: list[float] = []
    answers = [(429, {"Retry-After": "2"}, LIMITED), (429, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, LIMITED),
               (200, {}, CHECKPOINT)]
    with scripted_server(answers) as (url, asked):
        assert ac.LogClient(url, sleep=slept.append).checkpoint() == "a note\n"
    assert slept == [2.0, 0.0] and asked == ["/v1/log/checkpoint"] * 3  # an HTTP-date in the past: at once
    slept.clear()
    with scripted_server([(429, {"Retry-After": "1"}, LIMITED)]) as (url, asked):
        with pytest.raises(ac.LogUnreachable) as gave_up:
            ac.LogClient(url, sleep=slept.append).checkpoint()
    assert str(gave_up.value) == "GET /v1/log/checkpoint: 429 rate limit exceeded (after 5 waits as its Retry-After asked)"
    assert slept == [1.0] * ac.LogClient.RETRIES and len(asked) == ac.LogClient.RETRIES + 1


@pytest.mark.parametrize(("status", "retry_after", "waits"), [
    (429, "3600", False), (429, "soon", False), (429, None, False),  # too long, unreadable, absent: reported
    (503, "1", True), (503, "60", False),  # a blip (database busy) is waited out; a damaged log is not
    (404, "1", False),
])
def test_which_answers_are_waited_out(status: int, retry_after: str | None, waits: bool) -> None:
    slept: list[float] = []
    headers = {} if retry_after is None else {"Retry-After": retry_after}
    with scripted_server([(status, headers, {"detail": "no"}), (200, {}, CHECKPOINT)]) as (url, _):
        client = ac.LogClient(url, sleep=slept.append)
        if waits:
            assert client.checkpoint() == "a note\n" and slept == [float(retry_after)]
        else:
            with pytest.raises(ac.LogUnreachable, match=f"GET /v1/log/checkpoint: {status} no"):
                client.checkpoint()
            assert slept == []


def audit_state(size: int = 4, url: str = "http://127.0.0.1:9") -> dict[str, object]:
    """A state file as `audit` writes it, of a log of `size` leaves signed with the edge vector's key."""
    frontier: list[bytes] = []
    for i in range(size):
        ac.frontier_append(frontier, i, ac.leaf_hash(b"leaf %d" % i))
    notary = ac.Notary(SigningKey(bytes.fromhex(EDGE_SEED)), "coord.example.org/receipts")
    note = notary.sign(ac.Checkpoint(notary.origin, size, ac.frontier_root(frontier), ("timestamp 1",)))
    return {"log": url, "verifier_key": notary.verifier.encode(), "checkpoint": note,
            "frontier": [ac.b64(h) for h in frontier]}


GOOD = audit_state()
SPOILT = {  # as the break report left them in /work/scratch17 (s_*.json)
    "a frontier hash that is not base64": ({**GOOD, "frontier": ["!!"]}, "is not an audit state file"),
    "a frontier that is not the checkpoint's": ({**GOOD, "frontier": ["A" * 43 + "="]},
                                                "its frontier does not make its checkpoint's root"),
    "a frontier of numbers": ({**GOOD, "frontier": [1, 2]}, "is not an audit state file"),
    "a frontier hash of 31 bytes": ({**GOOD, "frontier": [ac.b64(bytes(31))] * 1}, "not 32 bytes"),
    "a checkpoint altered after it was signed": ({**GOOD, "checkpoint": str(GOOD["checkpoint"]).replace("\n4\n", "\n3\n")},
                                                 "does not verify"),
    "a checkpoint that is a number": ({**GOOD, "checkpoint": 7}, "is not an audit state file"),
    "a verifier key that is not one": ({**GOOD, "verifier_key": "x"}, "not an Ed25519 verifier key"),
    "no frontier": ({k: v for k, v in GOOD.items() if k != "frontier"}, "(no 'frontier')"),
    "no URL": ({k: v for k, v in GOOD.items() if k != "log"}, "the log's URL"),
    "a list": ([], "is not an audit state file"), "null": (None, "is not an audit state file"),
}


@pytest.mark.parametrize("what", list(SPOILT))
def test_a_spoilt_state_file_is_a_local_problem_not_the_log_s_fault(what: str, receipt: Path, tmp_path: Path) -> None:
    """Break report 17 #9: a corrupt frontier was reported as "the log sent a hash that is not 32 bytes",
    exit 1 (a log fault), and other unreadable state files exited 1 as well."""
    state, why = SPOILT[what]
    path = tmp_path / "state.json"
    path.write_text(json.dumps(state))
    for args in (("audit", "--log", "http://127.0.0.1:9", "--state", path),
                 ("verify", receipt, "--log", "http://127.0.0.1:9", "--state", path)):
        result = run(*args)
        line = one_line(result)
        assert result.exit_code == ac.EXIT_LOCAL and line.startswith(f"Error: {path} is not an audit state file") \
            and why in line, (what, line)


def test_state_files_that_cannot_be_read_are_exit_3(tmp_path: Path) -> None:
    for name, content in (("empty", b""), ("binary", b"\xff\xfe"), ("truncated", json.dumps(GOOD).encode()[:200])):
        path = tmp_path / f"{name}.json"
        path.write_bytes(content)
        result = run("audit", "--log", "http://127.0.0.1:9", "--state", path)
        assert result.exit_code == ac.EXIT_LOCAL and str(path) in one_line(result), (name, result.output)
    good = tmp_path / "good.json"
    good.write_text(json.dumps(GOOD))
    result = run("audit", "--log", "http://127.0.0.1:9", "--state", good)  # read and accepted: then the log is asked
    assert result.exit_code == ac.EXIT_TRANSPORT and one_line(result).startswith("cannot audit: cannot reach")


def test_key_options_are_checked_when_parsed_and_named_as_given(receipt: Path, tmp_path: Path) -> None:
    """Break report 17 #11: --log-key garbage was reported as "Invalid value for --key", after asking the log."""
    result = run("verify", receipt, "--log", "http://127.0.0.1:9", "--log-key", "garbage")
    assert result.exit_code == ac.EXIT_LOCAL and "Invalid value for '--log-key': not an Ed25519 verifier key" \
        in result.output, result.output
    result = run("audit", "--log", "http://127.0.0.1:9", "--state", tmp_path / "s.json", "--key", "garbage")
    assert result.exit_code == ac.EXIT_LOCAL and "Invalid value for '--key'" in result.output, result.output
    key_id = ac.b64url(bytes(SigningKey(bytes.fromhex(EDGE_SEED)).verify_key))  # a key_id is taken, then the log asked
    assert run("verify", receipt, "--log", "http://127.0.0.1:9", "--log-key", key_id).exit_code == ac.EXIT_TRANSPORT


def test_log_options_without_log_are_a_usage_error(receipt: Path, tmp_path: Path) -> None:
    """Break report 17 #11: verify --state or --log-key without --log were silently ignored."""
    (tmp_path / "s.json").write_text(json.dumps(GOOD))
    for extra in (("--state", tmp_path / "s.json"), ("--log-key", GOOD["verifier_key"])):
        result = run("verify", receipt, *extra)
        assert result.exit_code == ac.EXIT_LOCAL and "--log-key and --state only apply with --log URL" in result.output


def test_a_receipt_not_yet_under_a_checkpoint_says_when_the_log_said(receipt: Path) -> None:
    """Break report 17 #11: the CLI said "try again in a second or two" where the server sent Retry-After: 28;
    a wait of a few seconds (the default: a checkpoint a second) is now waited out."""
    not_yet = {"detail": "receipt not yet under a checkpoint"}
    receipt_data = json.loads(receipt.read_text())
    with scripted_server([(425, {"Retry-After": "28"}, not_yet)]) as (url, _):
        result = run("verify", receipt, "--log", url)
        assert (result.exit_code, one_line(result)) == (ac.EXIT_TRANSPORT, "cannot check the log: the receipt is not "
                                                        "under a checkpoint yet; try again in 28 s (the log's Retry-After)")
    slept: list[float] = []
    with scripted_server([(425, {"Retry-After": "1"}, not_yet), (404, {}, {"detail": "receipt not in the log"})]) as (url, _):
        with pytest.raises(ac.LogFault, match="is not in the log"):
            ac.log_inclusion(ac.LogClient(url, sleep=slept.append), receipt_data, receipt.read_bytes(), None, None)
    assert slept == [1.0]
