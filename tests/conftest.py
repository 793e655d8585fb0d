"""Shared fixtures: a coordinator per test on its own database under tmp_path, driven in-process; and,
for the PostgreSQL tests, a fresh database per test on the server that AITBC_TEST_POSTGRES names."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

import aitbc_coord as ac

CLIENT_KEY, MINER_KEY, ADMIN_KEY = ac.DEV_KEYS["client"], ac.DEV_KEYS["miner"], ac.DEV_KEYS["admin"]
CLIENT = {"X-Api-Key": CLIENT_KEY}
MINER = {"X-Api-Key": MINER_KEY}
ADMIN = {"X-Api-Key": ADMIN_KEY}
T0 = 1_764_000_000.0
# APP_ENV=dev signs receipts with a development key when none is configured; tests that expect no
# receipts (as outside dev without a key) say so with these settings.
NO_RECEIPTS = {"RECEIPT_DEV_SIGNING_KEY": "false"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # no developer's .env leaks into a test. (Not tmp_path: a test that takes tmp_path, itself or through
    # a fixture, is one with a database, which BOTH_BACKENDS runs on each backend; the rest run once.)
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


class FakeClock:
    """An injectable clock: leases and deadlines move only when a test says so."""

    def __init__(self, start: float = T0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@dataclasses.dataclass
class Harness:
    app: Any
    coord: ac.Coordinator
    clock: FakeClock
    client: httpx.AsyncClient

    async def submit(self, payload: dict[str, Any] | None = None, headers: dict[str, str] = CLIENT,
                     **body: Any) -> dict[str, Any]:
        r = await self.client.post("/v1/jobs", json={"payload": payload or {"task": "t"}, **body}, headers=headers)
        assert r.status_code == 201, r.text
        return r.json()

    async def register(self, headers: dict[str, str] = MINER, **body: Any) -> dict[str, Any]:
        body.setdefault("capabilities", {})
        r = await self.client.post("/v1/miners/register", json=body, headers=headers)
        assert r.status_code == 200, r.text
        return r.json()

    async def poll(self, headers: dict[str, str] = MINER, wait: float = 0) -> httpx.Response:
        return await self.client.post("/v1/miners/poll", json={"max_wait_seconds": wait}, headers=headers)

    async def take(self, headers: dict[str, str] = MINER) -> dict[str, Any]:
        r = await self.poll(headers)
        assert r.status_code == 200, r.text
        return r.json()

    async def parked(self, n: int) -> None:
        """Wait until `n` long-polls wait in the hub with their first claim done (no fixed sleeps)."""
        for _ in range(1000):
            waiters = list(self.coord.hub.waiters)
            if len(waiters) >= n and all(w.parked for w in waiters):
                return
            await asyncio.sleep(0.005)
        raise AssertionError(f"{n} long-polls never parked")

    async def job(self, job_id: str, headers: dict[str, str] = CLIENT) -> dict[str, Any]:
        r = await self.client.get(f"/v1/jobs/{job_id}", headers=headers)
        assert r.status_code == 200, r.text
        return r.json()

    async def result(self, job_id: str, result: dict[str, Any] | None = None, headers: dict[str, str] = MINER,
                     **body: Any) -> httpx.Response:
        return await self.client.post(f"/v1/miners/{job_id}/result", json={"result": result or {"ok": 1}, **body},
                                      headers=headers)

    async def rows(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """The rows of one query (`?` placeholders) on the coordinator's database, either backend, read in
        one snapshot through its own read path: what a test checks behind the API."""
        return await self.coord.db.read(lambda conn: [tuple(row) for row in conn.execute(sql, params).fetchall()])


def database_of(tmp_path: Path) -> str:
    """The test's database: tmp_path/coord.db, or in a test's [postgres] run its PostgreSQL database's URL."""
    return _pg_database(tmp_path) if _pg_database is not None else str(tmp_path / "coord.db")


def make_settings(tmp_path: Path, env: dict[str, str] | None = None, **overrides: Any) -> ac.Settings:
    overrides.setdefault("db_path", database_of(tmp_path))
    overrides.setdefault("sweep_interval_seconds", 0)  # tests sweep by hand, on the fake clock
    return ac.Settings.load({"APP_ENV": "dev", **(env or {})}, **overrides)


def open_database(target: str | Path) -> Any:
    """A connection to a test's database, the SQLite file or the PostgreSQL URL (Settings.target), for
    SQL behind the coordinator's back: `?` placeholders on both, each statement committed at once."""
    target = str(target)
    return ac.PgConnection(ac.pg_connect(target)) if ac.is_postgres_url(target) else ac.connect(target)


@contextlib.contextmanager
def failing_commits(db: ac.Database, fail: Callable[[], bool] = lambda: True) -> Iterator[list[str]]:
    """While the block runs, each commit of the writer's transactions for which `fail()` is then true fails
    as a full disk would: nothing of its batch (SQLite) or unit (PostgreSQL) is durable. Either backend
    (SQLite: the COMMIT statement; PostgreSQL: the transaction block of each pooled writer connection).
    Yields the failed commits, one entry each."""
    pg = isinstance(db, ac.PgDatabase)
    real, failures = db._wpool if pg else db._wconn, []
    failure = database_error_of(db)

    class SqliteWriter:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def execute(self, sql: str, *args: object) -> object:
            if sql == "COMMIT" and fail():
                failures.append(sql)
                raise failure
            return real.execute(sql, *args)

    class PgWriter:
        def __init__(self, raw: Any) -> None:
            self.raw = raw

        def __getattr__(self, name: str) -> Any:
            return getattr(self.raw, name)

        @contextlib.contextmanager
        def transaction(self) -> Iterator[None]:
            with self.raw.transaction():  # an exception leaving the block rolls the transaction back
                yield
                if fail():
                    failures.append("COMMIT")
                    raise failure

    class PgWriters:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        @contextlib.contextmanager
        def connection(self) -> Iterator[PgWriter]:
            with real.connection() as raw:
                yield PgWriter(raw)

    if pg:
        db._wpool = PgWriters()
    else:
        db._wconn = SqliteWriter()
    try:
        yield failures
    finally:
        if pg:
            db._wpool = real
        else:
            db._wconn = real


def database_error(coord: ac.Coordinator) -> Exception:
    """What the coordinator's database driver raises when the database is gone (disk I/O error on
    SQLite, a lost server connection on PostgreSQL): for tests that break reads or writes."""
    return database_error_of(coord.db)


def database_error_of(db: ac.Database) -> Exception:
    if isinstance(db, ac.PgDatabase):
        return ac.load_psycopg().OperationalError("server closed the connection unexpectedly")
    return ac.sqlite3.OperationalError("disk I/O error")


def http_scope(method: str, path: str, key: str, body: bytes | None = None) -> dict[str, Any]:
    """An ASGI HTTP scope, for tests that drive the app's receive/send channel by hand."""
    headers = [(b"x-api-key", key.encode())]
    if body is not None:
        headers.append((b"content-length", str(len(body)).encode()))
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
            "client": ("127.0.0.1", 5000), "server": ("coord.test", 80)}


@contextlib.asynccontextmanager
async def harness(tmp_path: Path, env: dict[str, str] | None = None, clock: FakeClock | None = None,
                  monotonic: FakeClock | None = None, **overrides: Any) -> AsyncIterator[Harness]:
    """A coordinator on a fake clock; miner silence follows the same clock unless `monotonic` is given."""
    clock = clock or FakeClock()
    app = ac.App(make_settings(tmp_path, env, **overrides), clock, monotonic=monotonic or clock)
    async with app.lifespan():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://coord.test") as client:
            yield Harness(app, app.coord, clock, client)


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    async with harness(tmp_path) as hh:
        yield hh


# PostgreSQL. The server is the developer's or CI's (`.ci/run` starts a private one); each test gets
# new, empty databases on it, never a mock. Every test that uses these fixtures is marked `postgres`.
PG_ENV = "AITBC_TEST_POSTGRES"
PG_HOW = (f"PostgreSQL tests need {PG_ENV}=postgresql://USER@/postgres?host=SOCKETDIR (a server where USER may "
          "CREATE DATABASE); `bash .ci/run` starts a private one")
PG_FIXTURES = {"pg_server", "pg_url", "new_pg_database"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        on_postgres = getattr(getattr(item, "callspec", None), "params", {}).get("db_backend") == "postgres"
        if on_postgres or PG_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.postgres)


# Both backends. In these modules every test that takes tmp_path, itself or through a fixture (the
# harness's database lives under it), runs twice, [sqlite] and [postgres]: make_settings and database_of
# give the second a PostgreSQL database of its own (one per tmp_path, so a test that restarts its
# coordinator finds its data again). A test about SQLite itself (its files, pragmas, VM steps, the
# writer's internals), or one with no database in play (key and archive files, CLI commands), is marked
# sqlite_only; a test elsewhere may opt in with the both_backends marker.
# Modules left out have no database in play (settings, sockets, the log's client, packaging, receipt
# parsing) or test SQLite's own crash path (test_crash; PostgreSQL's is test_postgres_serve's).
BOTH_BACKENDS = {"test_authz", "test_db", "test_explorer", "test_faults", "test_fleet", "test_hostile", "test_http",
                 "test_http_details", "test_inflight", "test_inputs", "test_jobs", "test_lifecycle", "test_limits",
                 "test_log", "test_log_audit", "test_market", "test_miners", "test_ops", "test_paging",
                 "test_receipts", "test_retention", "test_storage", "test_wire"}
_pg_database: Callable[[Path], str] | None = None  # the [postgres] run's database for a tmp_path


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    both = (metafunc.module.__name__.rpartition(".")[2] in BOTH_BACKENDS
            or metafunc.definition.get_closest_marker("both_backends") is not None)
    if both and "tmp_path" in metafunc.fixturenames and metafunc.definition.get_closest_marker("sqlite_only") is None:
        metafunc.parametrize("db_backend", ["sqlite", "postgres"], indirect=True)


@pytest.fixture(autouse=True)
def db_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """Which database the harness runs on: sqlite, or postgres (skipped without a server, see PG_HOW)."""
    global _pg_database
    backend = getattr(request, "param", "sqlite")
    if backend != "postgres":
        yield backend
        return
    create = request.getfixturevalue("new_pg_database")
    databases: dict[Path, str] = {}
    _pg_database = lambda tmp_path: (databases.get(tmp_path)  # noqa: E731
                                     or databases.setdefault(tmp_path, create(migrated=True)))
    try:
        yield backend
    finally:
        _pg_database = None


def pg_database_url(server_url: str, dbname: str) -> str:
    """`server_url` (a libpq URI) with its database replaced by `dbname`; host, user and options kept."""
    parts = urlsplit(server_url)
    query = "&".join(p for p in parts.query.split("&") if p and not p.startswith("dbname="))  # kept verbatim
    return urlunsplit(parts._replace(path="/" + dbname, query=query))


@pytest.fixture(scope="session")
def pg_server() -> str:
    """The URL of the PostgreSQL server for the tests, from AITBC_TEST_POSTGRES (a libpq URI of a role that
    may CREATE DATABASE). Skips the test when it is unset or psycopg is not installed; a server named but
    not answering fails it."""
    url = os.environ.get(PG_ENV, "")
    if not url:
        pytest.skip(f"{PG_ENV} is not set. {PG_HOW}")
    try:
        import psycopg
    except ImportError:
        pytest.skip(f"psycopg is not installed (pip install -e '.[test]'). {PG_HOW}")
    if urlsplit(url).scheme not in ("postgresql", "postgres"):
        pytest.fail(f"{PG_ENV} is not a postgresql:// URL. {PG_HOW}", pytrace=False)
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as e:
        pytest.fail(f"the PostgreSQL server in {PG_ENV} does not answer: {e}", pytrace=False)
    return url


@pytest.fixture(scope="session")
def pg_migrated_template(pg_server: str) -> Iterator[str]:
    """The name of a database on the test server that holds the current schema (migrate_pg) and nothing
    else, made once a session and dropped at its end: a copy of it (CREATE DATABASE ... TEMPLATE) costs
    about half of creating a database and its schema anew, for each of the hundreds of tests that run a
    coordinator on PostgreSQL. Nothing may connect to it while it is copied: only migrate_pg ever has."""
    import psycopg
    from psycopg import sql

    name = f"aitbc_test_template_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING 'UTF8'").format(sql.Identifier(name)))
    try:
        ac.migrate_pg(pg_database_url(pg_server, name))
        yield name
    finally:
        with psycopg.connect(pg_server, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def new_pg_database(pg_server: str, request: pytest.FixtureRequest) -> Iterator[Callable[..., str]]:
    """A function that creates a new database (under a unique name) on the test server and returns its
    URL: empty (from template0), or with `migrated=True` already holding the current schema (a copy of
    pg_migrated_template, as `migrate` would leave it). All it made are dropped when the test ends,
    passed or failed, connections still open to them included (DROP DATABASE ... WITH (FORCE))."""
    import psycopg
    from psycopg import sql

    made: list[str] = []

    def create(migrated: bool = False) -> str:
        name = f"aitbc_test_{uuid.uuid4().hex[:16]}"
        template = request.getfixturevalue("pg_migrated_template") if migrated else "template0"
        with psycopg.connect(pg_server, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {} ENCODING 'UTF8'").format(
                sql.Identifier(name), sql.Identifier(template)))
        made.append(name)
        return pg_database_url(pg_server, name)

    yield create
    with psycopg.connect(pg_server, autocommit=True) as conn:
        for name in made:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def pg_url(new_pg_database: Callable[[], str]) -> str:
    """The URL of a new, empty PostgreSQL database of this test's own, dropped when the test ends."""
    return new_pg_database()
