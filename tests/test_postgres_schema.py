"""schema_pg.sql, the PostgreSQL twin of schema.sql: the same objects, and the same derived rows after the
same writes (issue 18). Needs a PostgreSQL cluster: AITBC_TEST_POSTGRES is an admin URL."""

from __future__ import annotations

import contextlib
import decimal
import random
import re
import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import aitbc_coord as ac
from conftest import harness

SCHEMA_PG = Path(__file__).resolve().parent.parent / "schema_pg.sql"


def load_pg_schema(url: str) -> None:
    """Run schema_pg.sql as the coordinator will: the whole script in one execute, one transaction."""
    import psycopg

    with psycopg.connect(url) as conn:
        conn.execute(SCHEMA_PG.read_text(encoding="utf-8"))


def pg_connect(url: str, **kwargs: Any) -> Any:
    import psycopg

    return psycopg.connect(url, autocommit=True, **kwargs)


def stripe_of(conn: Any) -> int:
    return int(conn.execute("SELECT counter_stripe()").fetchone()[0])


# --- Parity of the objects ---

# The intended differences, each for a reason schema_pg.sql's header gives.
STRIPED = {"job_counts", "counters", "fleet_totals", "addresses"}  # a `stripe` column in the primary key
PG_ONLY_TABLES = {"schema_version",  # SQLite keeps the version in PRAGMA user_version
                  "sweep_state"}  # cluster duties once a tick over N instances
PG_ONLY_COLUMNS = {("miners", "heard_at")}  # liveness on the database server's clock, shared by instances
# A bigint total a receipt's price can take past 2^63 (SQLite goes on in a REAL; bigint refused the write).
PG_WIDER = {("addresses", "balance_micro"): "numeric"}
PG_ONLY_INDEXES = {
    "miners_online_by_heard",  # the cluster sweep's look for miners gone silent
    "shapes_by_constraints",  # a hash index: lookups by constraints text of any length
    "schema_version_one_row",  # keeps schema_version to one row
}
# shapes.constraints is unique through its SHA-256: a B-tree entry over ~2,700 bytes is refused.
UNIQUE_BY_DIGEST = {"shapes_constraints_digest": ("shapes", "constraints_digest(constraints)")}
PG_ONLY_TRIGGERS = {"shapes_number": "shapes", "log_leaves_number": "log_leaves"}  # ordered, gapless keys
# SQLite rowid keys: which the database numbers (identity), which a trigger numbers in commit order,
# and which the code always gives.
IDENTITY = {("jobs", "seq"), ("receipts", "seq"), ("offers", "seq"), ("bids", "seq")}
NUMBERED = {("shapes", "shape_id"), ("log_leaves", "leaf_index")}
GIVEN = {("job_data", "seq"), ("log_nodes", "node_id"), ("log_checkpoints", "tree_size"), ("fleet_totals", "id")}
PG_TYPES = {"INTEGER": "bigint", "TEXT": "text", "REAL": "double precision", "BLOB": "bytea"}
TRIGGER_RE = re.compile(r"\b(BEFORE|AFTER) (INSERT|DELETE|UPDATE(?: OF ([\w, ]+?))?) ON (?:\w+\.)?(\w+)", re.I)


def trigger_event(sql: str) -> tuple[str, str, tuple[str, ...], str]:
    """(timing, event, columns of UPDATE OF, table) of a CREATE TRIGGER statement."""
    timing, event, columns, table = TRIGGER_RE.search(sql).groups()  # type: ignore[union-attr]
    cols = tuple(c.strip() for c in columns.split(",")) if columns else ()
    return timing.upper(), event.split()[0].upper(), cols, table


def sqlite_catalog(path: str) -> dict[str, Any]:
    conn = sqlite3.connect(path)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"
                                             " AND name NOT LIKE 'sqlite_%' ORDER BY name")]
        columns, keys, rowid_keys, indexes, uniques = {}, {}, set(), {}, set()
        for table in tables:
            info = conn.execute(f"PRAGMA table_info({table})").fetchall()
            columns[table] = [(name, PG_TYPES[kind], bool(notnull or pk), default)
                              for _, name, kind, notnull, default, pk in info]
            keys[table] = tuple(name for *_, name in sorted((pk, name) for _, name, _, _, _, pk in info if pk))
            if len(keys[table]) == 1 and next(c for c in info if c[1] == keys[table][0])[2] == "INTEGER":
                rowid_keys.add((table, keys[table][0]))
            for _, name, unique, origin, partial in conn.execute(f"PRAGMA index_list({table})"):
                cols = tuple(r[2] for r in conn.execute(f"PRAGMA index_info({name})"))
                if origin == "c":
                    indexes[name] = (table, cols, bool(unique), bool(partial))
                elif origin == "u":
                    uniques.add((table, cols))
        triggers = {name: trigger_event(sql) for name, sql in conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'trigger'")}
        return {"columns": columns, "keys": keys, "rowid_keys": rowid_keys, "indexes": indexes, "uniques": uniques,
                "triggers": triggers}
    finally:
        conn.close()


def pg_catalog(url: str) -> dict[str, Any]:
    with pg_connect(url) as conn:
        columns: dict[str, list[tuple[Any, ...]]] = {}
        collations, identity = {}, set()
        for table, name, kind, nullable, default, is_identity, collation in conn.execute(
                "SELECT table_name, column_name, data_type, is_nullable, column_default, is_identity, collation_name"
                " FROM information_schema.columns WHERE table_schema = current_schema()"
                " ORDER BY table_name, ordinal_position"):
            default = None if default is None else re.sub(r"::[a-z ]+$", "", default)
            columns.setdefault(table, []).append((name, kind, nullable == "NO", default))
            if kind == "text":
                collations[(table, name)] = collation
            if is_identity == "YES":
                identity.add((table, name))
        constraint_columns = ("SELECT c.conrelid::regclass::text, c.contype, array_agg(a.attname ORDER BY k.n)"
                              " FROM pg_constraint c CROSS JOIN unnest(c.conkey) WITH ORDINALITY AS k(attnum, n)"
                              " JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum"
                              " WHERE c.connamespace = current_schema()::regnamespace AND c.contype IN ('p', 'u')"
                              " GROUP BY c.oid, c.conrelid, c.contype")
        keys, uniques = {}, set()
        for table, kind, cols in conn.execute(constraint_columns):
            if kind == "p":
                keys[table] = tuple(cols)
            else:
                uniques.add((table, tuple(cols)))
        indexes = {}
        for name, table, unique, partial, cols in conn.execute(
                "SELECT i.relname, t.relname, x.indisunique, x.indpred IS NOT NULL,"
                " array(SELECT pg_get_indexdef(x.indexrelid, k, true) FROM generate_series(1, x.indnkeyatts) AS k)"
                " FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid"
                " WHERE t.relnamespace = current_schema()::regnamespace"
                " AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = x.indexrelid)"):
            indexes[name] = (table, tuple(cols), unique, partial)
        triggers = {name: trigger_event(sql) for name, sql in conn.execute(
            "SELECT tgname, pg_get_triggerdef(oid) FROM pg_trigger WHERE NOT tgisinternal"
            " AND tgrelid::regclass::text NOT LIKE 'pg_%'")}
    return {"columns": columns, "keys": keys, "uniques": uniques, "indexes": indexes, "triggers": triggers,
            "collations": collations, "identity": identity}


@pytest.fixture
def catalogs(tmp_path: Path, pg_url: str) -> tuple[dict[str, Any], dict[str, Any]]:
    db = str(tmp_path / "c.db")
    ac.migrate(db)
    load_pg_schema(pg_url)
    return sqlite_catalog(db), pg_catalog(pg_url)


def test_the_same_tables_and_columns_in_the_same_order(catalogs: tuple[dict[str, Any], dict[str, Any]]) -> None:
    lite, pg = catalogs
    assert set(pg["columns"]) - PG_ONLY_TABLES == set(lite["columns"])
    for table, expected in lite["columns"].items():
        got = [c for c in pg["columns"][table]
               if not (table in STRIPED and c[0] == "stripe") and (table, c[0]) not in PG_ONLY_COLUMNS]
        # (name, type: every integer bigint, every REAL double precision, not null, default)
        assert [c[:3] for c in got] == [(c[0], PG_WIDER.get((table, c[0]), c[1]), c[2]) for c in expected], table
        assert [(c[0], c[3]) for c in got if c[3] is not None] == [(c[0], c[3]) for c in expected if c[3]], table
    for table in STRIPED:
        assert ("stripe", "smallint", True, None) in pg["columns"][table]


def test_every_text_column_compares_bytes_as_sqlite_does(catalogs: tuple[dict[str, Any], dict[str, Any]]) -> None:
    _, pg = catalogs
    assert pg["collations"] and set(pg["collations"].values()) == {"C"}


def test_the_same_keys_with_each_rowid_numbered_deliberately(catalogs: tuple[dict[str, Any], dict[str, Any]]) -> None:
    lite, pg = catalogs
    for table, key in lite["keys"].items():
        assert pg["keys"][table] == key + (("stripe",) if table in STRIPED else ()), table
    # a rowid table added later must be put in one of the three on purpose
    assert lite["rowid_keys"] == IDENTITY | NUMBERED | GIVEN
    assert pg["identity"] == IDENTITY


def test_the_same_indexes(catalogs: tuple[dict[str, Any], dict[str, Any]]) -> None:
    lite, pg = catalogs
    named = {k: v for k, v in pg["indexes"].items() if k not in PG_ONLY_INDEXES | set(UNIQUE_BY_DIGEST)}
    assert named == lite["indexes"]  # names, columns, unique or not, partial or not
    digests = {(table, (column,)) for table, column in (("shapes", "constraints"),)}
    assert pg["uniques"] | digests == lite["uniques"]
    for name, (table, expression) in UNIQUE_BY_DIGEST.items():
        assert pg["indexes"][name] == (table, (expression,), True, False)
    assert pg["indexes"]["shapes_by_constraints"][:2] == ("shapes", ("constraints",))


def test_the_same_triggers_on_the_same_events(catalogs: tuple[dict[str, Any], dict[str, Any]]) -> None:
    lite, pg = catalogs
    assert {k: v for k, v in pg["triggers"].items() if k not in PG_ONLY_TRIGGERS} == lite["triggers"]
    assert {k: pg["triggers"][k][3] for k in PG_ONLY_TRIGGERS} == PG_ONLY_TRIGGERS


def test_the_schema_records_its_version_in_one_row(pg_url: str) -> None:
    import psycopg

    load_pg_schema(pg_url)
    with pg_connect(pg_url) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(ac.PG_SCHEMA_VERSION,)]
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("INSERT INTO schema_version (version) VALUES (7)")


def test_a_script_that_fails_leaves_nothing(pg_url: str) -> None:
    """One transaction: loading into a database that has the schema fails and changes nothing."""
    import psycopg

    load_pg_schema(pg_url)
    with pytest.raises(psycopg.errors.DuplicateFunction):
        load_pg_schema(pg_url)
    with pg_connect(pg_url) as conn:
        assert conn.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == 1


def version_6_schema() -> str:
    """schema_pg.sql as version 6 shipped it (tests/data/schema_pg_v6.sql, kept as released)."""
    return (SCHEMA_PG.parent / "tests" / "data" / "schema_pg_v6.sql").read_text(encoding="utf-8")


def pg_functions(url: str) -> dict[str, str]:
    """Each function of the schema and its definition as PostgreSQL prints it."""
    with pg_connect(url) as conn:
        return dict(conn.execute("SELECT proname, pg_get_functiondef(oid) FROM pg_proc"
                                 " WHERE pronamespace = current_schema()::regnamespace").fetchall())


def test_migrate_upgrades_a_version_6_database_in_place(pg_url: str, new_pg_database: Callable[[], str]) -> None:
    """A database version 6 made (with a miner in it) is brought to the current version by migrate_pg: the
    same catalog as a new database's, its rows kept, the new columns empty; a second migrate changes
    nothing."""
    with pg_connect(pg_url) as conn:
        conn.execute(version_6_schema())
        conn.execute("INSERT INTO miners (miner_id, offer_id, capabilities, price, sla, concurrency, status,"
                     " session_token, created_at, registered_at, last_seen, last_heartbeat)"
                     " VALUES ('m0', 'o0', '{}', 0, '', 1, 'ONLINE', 't', 1, 1, 1, 5)")
    assert ac.migrate_pg(pg_url) == (6, ac.PG_SCHEMA_VERSION)
    assert ac.migrate_pg(pg_url) == (ac.PG_SCHEMA_VERSION, ac.PG_SCHEMA_VERSION)
    fresh = new_pg_database()
    load_pg_schema(fresh)
    assert pg_catalog(pg_url) == pg_catalog(fresh)
    assert pg_functions(pg_url) == pg_functions(fresh)  # a function changed or added reaches old databases too
    with pg_connect(pg_url) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(ac.PG_SCHEMA_VERSION,)]
        assert conn.execute("SELECT miner_id, last_heartbeat, short_since, known_through FROM miners").fetchall() \
            == [("m0", 5, None, None)]


def test_migrate_refuses_a_version_it_knows_no_upgrade_from(pg_url: str) -> None:
    with pg_connect(pg_url) as conn:
        conn.execute(version_6_schema().replace("VALUES (6);", "VALUES (5);"))
    with pytest.raises(ac.ConfigError, match="schema version 5; this coordinator knows no upgrade from it"):
        ac.migrate_pg(pg_url)


def set_pg_version(url: str, version: int, compatible_from: int) -> None:
    with pg_connect(url) as conn:
        conn.execute("UPDATE schema_version SET version = %s, compatible_from = %s", (version, compatible_from))


def test_migrate_records_the_oldest_version_that_can_share_the_database(pg_url: str) -> None:
    assert ac.migrate_pg(pg_url) == (0, ac.PG_SCHEMA_VERSION)
    with pg_connect(pg_url) as conn:
        assert conn.execute("SELECT version, compatible_from FROM schema_version").fetchall() \
            == [(ac.PG_SCHEMA_VERSION, ac.SCHEMA_COMPATIBLE_FROM)]
    assert ac.SCHEMA_COMPATIBLE_FROM <= ac.PG_SCHEMA_VERSION


@pytest.mark.anyio
async def test_an_instance_one_rollout_behind_serves_from_a_newer_compatible_schema(
        tmp_path: Path, pg_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """A rolling restart: instances already upgraded migrated the database to the next version, which
    says this version still works on it. This instance runs on it as it is, changes nothing in it, and
    says so; the next version's own objects (here a column) stay."""
    ac.migrate_pg(pg_url)
    newer = ac.PG_SCHEMA_VERSION + 1
    with pg_connect(pg_url) as conn:
        conn.execute("ALTER TABLE jobs ADD COLUMN next_version_note text")  # what the newer step added
    set_pg_version(pg_url, newer, ac.PG_SCHEMA_VERSION)
    with caplog.at_level("WARNING", logger="aitbc_coord"):
        assert ac.migrate_pg(pg_url) == (newer, newer)
    assert f"schema version {newer} is newer than this coordinator's {ac.PG_SCHEMA_VERSION}" in caplog.text
    async with harness(tmp_path, db_path=pg_url) as h:
        await h.register(capabilities={"gpu": "a100"})
        job = await h.submit({"n": 1})
        assert (await h.take())["job_id"] == job["job_id"]
        assert (await h.result(job["job_id"])).status_code == 200
    with pg_connect(pg_url) as conn:
        assert conn.execute("SELECT version, compatible_from FROM schema_version").fetchall() \
            == [(newer, ac.PG_SCHEMA_VERSION)]
        assert conn.execute("SELECT COUNT(*) FROM jobs WHERE state = 'COMPLETED'").fetchone()[0] == 1


def test_a_schema_this_coordinator_cannot_work_on_is_refused_with_what_to_do(pg_url: str) -> None:
    ac.migrate_pg(pg_url)
    set_pg_version(pg_url, ac.PG_SCHEMA_VERSION + 2, ac.PG_SCHEMA_VERSION + 1)
    expected = (f"the PostgreSQL database has schema version {ac.PG_SCHEMA_VERSION + 2}, which needs a coordinator"
                f" of schema version {ac.PG_SCHEMA_VERSION + 1} or newer (this one's is {ac.PG_SCHEMA_VERSION});"
                f" upgrade aitbc-coord")
    with pytest.raises(ac.ConfigError) as refused:
        ac.migrate_pg(pg_url)
    assert str(refused.value) == expected
    done = CliRunner().invoke(ac.cli, ["migrate", "--db", pg_url])
    assert done.exit_code == 1 and done.output == f"Error: {expected}\n"
    with pg_connect(pg_url) as conn:  # refused, and left as it was
        assert conn.execute("SELECT version FROM schema_version").fetchone()[0] == ac.PG_SCHEMA_VERSION + 2


def test_a_role_that_may_not_create_the_tables_is_told_what_it_needs(pg_url: str) -> None:
    """A newcomer's database owned by postgres, the URL naming another role: the error said only
    "permission denied for schema public"."""
    role = f"aitbc_guest_{secrets.token_hex(4)}"
    with pg_connect(pg_url) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
    try:
        as_guest = re.sub(r"^postgresql://[^@/]*@", f"postgresql://{role}@", pg_url)
        assert as_guest != pg_url
        done = CliRunner().invoke(ac.cli, ["migrate", "--db", as_guest])
        assert done.exit_code == 1
        assert "permission denied for schema public" in done.output
        assert done.output.rstrip().endswith("the URL's role must own the database (createdb -O ROLE) or hold"
                                             " CREATE on its public schema")
    finally:
        with pg_connect(pg_url) as conn:
            conn.execute(f"DROP ROLE {role}")


@pytest.mark.parametrize("damage", ["DELETE FROM schema_version", "ALTER TABLE schema_version DROP COLUMN compatible_from"])
def test_a_damaged_version_record_is_refused_in_a_line_or_read_as_version_6_left_it(pg_url: str, damage: str) -> None:
    """A breaker emptied schema_version: migrate and serve ended in a TypeError traceback."""
    ac.migrate_pg(pg_url)
    with pg_connect(pg_url) as conn:
        conn.execute(damage)
    if damage.startswith("DELETE"):
        with pytest.raises(ac.ConfigError, match="schema_version table does not hold one version"):
            ac.migrate_pg(pg_url)
        done = CliRunner().invoke(ac.cli, ["migrate", "--db", pg_url])
        assert done.exit_code == 1 and done.output.startswith("Error: the PostgreSQL database's schema_version")
    else:  # as a version 6 database's record reads: its own version is its floor
        assert ac.migrate_pg(pg_url) == (ac.PG_SCHEMA_VERSION, ac.PG_SCHEMA_VERSION)


def test_an_upgraded_version_6_database_records_its_floor(pg_url: str) -> None:
    with pg_connect(pg_url) as conn:
        conn.execute(version_6_schema())
    ac.migrate_pg(pg_url)
    with pg_connect(pg_url) as conn:
        assert conn.execute("SELECT version, compatible_from FROM schema_version").fetchall() \
            == [(ac.PG_SCHEMA_VERSION, ac.SCHEMA_COMPATIBLE_FROM)]


# --- The same writes give the same derived rows ---

def ints(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Rows with their numbers as int (PostgreSQL sums bigints as numeric)."""
    return [tuple(int(v) if isinstance(v, (int, decimal.Decimal)) else v for v in row) for row in rows]


class Engine:
    """Raw SQL on one engine: `?` or `:name` parameters, as the module writes them."""

    def run(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def views(self) -> dict[str, list[tuple[Any, ...]]]:
        """What the triggers keep, read as the module will read it (summed over any stripes), and rows."""
        return {
            "job_counts": ints(self.run("SELECT state, SUM(n), SUM(busy_ms) FROM job_counts"
                                        " GROUP BY state ORDER BY state")),
            "counters": ints(self.run("SELECT name, SUM(n) FROM counters GROUP BY name ORDER BY name")),
            "fleet_totals": ints(self.run(
                "SELECT SUM(offers), SUM(open_offers), SUM(open_capacity), SUM(open_price_units),"
                " SUM(open_price_micro), SUM(online_miners) FROM fleet_totals GROUP BY id")),
            "addresses": ints(self.run("SELECT address, SUM(tx_count), SUM(balance_micro), MAX(last_active)"
                                       " FROM addresses GROUP BY address ORDER BY address")),
            "shapes": self.run("SELECT shape_id, constraints FROM shapes ORDER BY shape_id"),
            "jobs": self.run("SELECT seq, job_id, state, assigned_miner_id, attempts, finished_at FROM jobs"
                             " ORDER BY seq"),
            "rows": ints(self.run(
                "SELECT 'jobs ' || state, COUNT(*) FROM jobs GROUP BY state UNION ALL"
                " SELECT 'receipts', COUNT(*) FROM receipts UNION ALL"
                " SELECT 'active_bids', COUNT(*) FROM bids WHERE status IN ('pending', 'matched') ORDER BY 1")),
        }


class SqliteEngine(Engine):
    def __init__(self, path: str) -> None:
        self.conn = ac.connect(path, "OFF")

    def run(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self.conn.execute(sql, params).fetchall()]


class PgEngine(Engine):
    """Each statement on the next of several connections (backends), so the writes land in several stripes."""

    def __init__(self, url: str, stripes: int = 3) -> None:
        self.conns: list[Any] = []
        for _ in range(32):  # connections until `stripes` distinct stripes (backend ids are mostly consecutive)
            conn = pg_connect(url)
            if len(self.conns) == stripes or stripe_of(conn) in map(stripe_of, self.conns):
                conn.close()
            else:
                self.conns.append(conn)
        if len(self.conns) < stripes:
            self.close()
            raise AssertionError(f"32 connections fell into fewer than {stripes} stripes")
        self.turn = 0

    def run(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[tuple[Any, ...]]:
        sql = re.sub(r":(\w+)", r"%(\1)s", sql) if isinstance(params, dict) else sql.replace("?", "%s")
        conn = self.conns[self.turn % len(self.conns)]
        self.turn += 1
        cursor = conn.execute(sql, params or None)
        return [tuple(r) for r in cursor.fetchall()] if cursor.description else []

    def close(self) -> None:
        for conn in self.conns:
            conn.close()


# The module's own statements where it has one for the change (release_running, expire_due_jobs).
RELEASE = ("UPDATE jobs SET state = CASE WHEN attempts >= :max THEN 'FAILED' ELSE 'QUEUED' END,"
           " error = CASE WHEN attempts >= :max THEN 'miner ' || assigned_miner_id || :reason END,"
           " finished_at = CASE WHEN attempts >= :max THEN :now END,"
           " assigned_miner_id = CASE WHEN attempts >= :max THEN assigned_miner_id END,"
           " assigned_at = CASE WHEN attempts >= :max THEN assigned_at END"
           " WHERE state = 'RUNNING' AND assigned_miner_id = :miner RETURNING job_id")
EXPIRE = ("UPDATE jobs SET state = 'EXPIRED', error = 'job expired', finished_at = ?"
          " WHERE state IN ('QUEUED', 'RUNNING') AND expires_at <= ? RETURNING assigned_miner_id")
REGISTER = ("INSERT INTO miners (miner_id, offer_id, capabilities, price, price_units, price_micro, sla, concurrency,"
            " region, status, session_token, created_at, registered_at, last_seen, online, offer_status)"
            " VALUES (?, ?, '{}', ?, ?, ?, '', ?, NULL, 'ONLINE', 't', ?, ?, ?, ?, ?)"
            " ON CONFLICT (miner_id) DO UPDATE SET price = excluded.price, price_units = excluded.price_units,"
            " price_micro = excluded.price_micro, concurrency = excluded.concurrency, status = 'ONLINE', online = 1,"
            " registered_at = excluded.registered_at, last_seen = excluded.last_seen")
# Prices whose millionths round differently by method: 0.0000025 is 2.5 millionths exactly (SQLite and
# numeric: 3; round(double precision), half to even: 2); 12.0011215 is 1121.4999999999975 millionths in
# double arithmetic (SQLite: 1121; round(x::numeric): 1122, as the cast keeps 15 digits).
TRICKY_PRICES = (0.0000025, 12.0011215, 0.0000005, 2.7, 3.75, 1e12, 0.0)
MINERS = ("m-a", "m-b", "m-c", "m-d")
CLIENTS = ("c-a", "c-b", "c-c")


def sqlite_split(price: float) -> tuple[int, int]:
    """A price as whole units and millionths, as schema.sql's triggers split it (ROUND: half away from zero)."""
    units = int(price)
    micro = (price - units) * 1_000_000
    return units, int(micro + (0.5 if micro >= 0 else -0.5))


def scenario(seed: int, steps: int, states_of: Callable[[], dict[int, str]]
             ) -> Iterator[tuple[str, Sequence[Any] | dict[str, Any]]]:
    """A random walk of writes over jobs, receipts, bids, miners and offers, the same for every engine:
    every transition the module makes, and the same-value writes that fire a trigger with no change.
    A statement whose effect on job states the walk does not work out is followed by states_of()."""
    rnd = random.Random(seed)
    now = 1_764_000_000_000
    states: dict[int, str] = {}
    bids = offers = 0
    yield "INSERT INTO shapes (constraints) VALUES (?)", ("{}",)
    yield "INSERT INTO shapes (constraints) VALUES (?)", ('{"gpu":"A100"}',)
    for price, miner in zip(TRICKY_PRICES, MINERS * 2):
        now += 1
        yield REGISTER, (miner, f"o-{miner}", price, *sqlite_split(price), rnd.randint(1, 4), now, now, now,
                         rnd.randint(0, 1), rnd.choice(("open", "reserved", "closed")))
    for step in range(steps):
        # now and then the wall clock steps back, as a real one can
        now += rnd.randint(-20_000, 5_000) if rnd.random() < 0.1 else rnd.randint(1, 5_000)
        seqs = {state: [s for s, st in states.items() if st == state] for state in ("QUEUED", "RUNNING")}
        op = rnd.choice(("submit", "submit", "claim", "claim", "finish", "release", "requeue", "cancel", "expire",
                         "receipt", "bid", "bid_status", "miner", "offer", "offer_status", "same"))
        if op == "submit" or not states:
            states[len(states) + 1] = "QUEUED"
            yield ("INSERT INTO jobs (job_id, client_id, state, constraints, shape_id, requested_at, expires_at)"
                   " VALUES (?, ?, 'QUEUED', '{}', ?, ?, ?)",
                   (f"j{step}", rnd.choice(CLIENTS), rnd.randint(1, 2), now, now + rnd.randint(1_000, 60_000)))
        elif op == "claim" and seqs["QUEUED"]:
            seq = rnd.choice(seqs["QUEUED"])
            states[seq] = "RUNNING"
            yield ("UPDATE jobs SET state = 'RUNNING', assigned_miner_id = ?, assigned_at = ?, attempts = attempts + 1"
                   " WHERE seq = ?", (rnd.choice(MINERS), now, seq))
        elif op == "finish" and seqs["RUNNING"]:
            seq = rnd.choice(seqs["RUNNING"])
            states[seq] = rnd.choice(("COMPLETED", "COMPLETED", "FAILED"))
            yield "UPDATE jobs SET state = ?, finished_at = ?, error = NULL WHERE seq = ?", (states[seq], now, seq)
        elif op == "release":
            yield RELEASE, {"max": 2, "now": now, "reason": " went silent", "miner": rnd.choice(MINERS)}
            states = states_of()  # which were re-queued and which failed follows their attempts
        elif op == "requeue" and seqs["RUNNING"]:
            seq = rnd.choice(seqs["RUNNING"])
            states[seq] = "QUEUED"
            yield "UPDATE jobs SET state = 'QUEUED', assigned_miner_id = NULL, assigned_at = NULL WHERE seq = ?", (seq,)
        elif op == "cancel" and seqs["QUEUED"] + seqs["RUNNING"]:
            seq = rnd.choice(seqs["QUEUED"] + seqs["RUNNING"])
            states[seq] = "CANCELED"
            yield "UPDATE jobs SET state = 'CANCELED', finished_at = ?, error = 'canceled by client' WHERE seq = ?", \
                (now, seq)
        elif op == "expire":
            yield EXPIRE, (now, now)
            states = states_of()
        elif op == "receipt":
            price = rnd.choice((None, *TRICKY_PRICES))
            yield ("INSERT INTO receipts (receipt_id, job_id, issued_at, price, body) VALUES (?, ?, ?, ?, ?)",
                   (f"r{step}", f"j{rnd.randint(0, step)}", now, price, b"\x01packed"))
        elif op == "bid":
            bids += 1
            yield ("INSERT INTO bids (bid_id, provider, capacity, price, status, created_at)"
                   " VALUES (?, 'p', 1, ?, ?, ?)",
                   (f"b{bids}", rnd.choice(TRICKY_PRICES), rnd.choice(("pending", "matched", "closed")), now))
        elif op == "bid_status" and bids:
            yield "UPDATE bids SET status = ? WHERE bid_id = ?", \
                (rnd.choice(("pending", "matched", "closed")), f"b{rnd.randint(1, bids)}")
        elif op == "miner":
            miner = rnd.choice(MINERS)
            change = rnd.choice(("offer_status", "online", "register"))
            if change == "register":
                price = rnd.choice(TRICKY_PRICES)
                yield REGISTER, (miner, f"o-{miner}", price, *sqlite_split(price), rnd.randint(1, 4), now, now, now,
                                 1, "open")
            elif change == "online":
                yield "UPDATE miners SET online = ? WHERE miner_id = ?", (rnd.randint(0, 1), miner)
            else:
                yield "UPDATE miners SET offer_status = ? WHERE miner_id = ?", \
                    (rnd.choice(("open", "reserved", "closed")), miner)
        elif op == "offer":
            offers += 1
            yield ("INSERT INTO offers (offer_id, provider, capacity, price, sla, status, created_at)"
                   " VALUES (?, 'p', ?, ?, '', ?, ?)",
                   (f"of{offers}", rnd.randint(1, 8), rnd.choice(TRICKY_PRICES), rnd.choice(("open", "closed")), now))
        elif op == "offer_status" and offers:
            yield "UPDATE offers SET status = ? WHERE offer_id = ?", \
                (rnd.choice(("open", "reserved", "closed")), f"of{rnd.randint(1, offers)}")
        elif op == "same" and states:
            seq = rnd.choice(list(states))
            yield "UPDATE jobs SET state = state, assigned_miner_id = assigned_miner_id WHERE seq = ?", (seq,)
        else:
            continue
        if rnd.random() < 0.03:  # the totals must hold at any point, not only at the end
            yield "CHECK", ()


def play(engine: Engine, seed: int, steps: int) -> list[dict[str, list[tuple[Any, ...]]]]:
    """Run the scenario; the views at each CHECK and at the end."""
    seen = []
    states_of = lambda: dict(engine.run("SELECT seq, state FROM jobs ORDER BY seq"))  # noqa: E731
    for sql, params in scenario(seed, steps, states_of):
        if sql == "CHECK":
            seen.append(engine.views())
        else:
            engine.run(sql, params)
    return [*seen, engine.views()]


def implied(views: dict[str, list[tuple[Any, ...]]]) -> None:
    """The kept totals equal what the rows imply."""
    rows = dict(views["rows"])
    counts = {state: n for state, n, _ in views["job_counts"]}
    assert {s: n for s, n in counts.items() if n} == {k[5:]: n for k, n in rows.items() if k.startswith("jobs ")}
    assert dict(views["counters"]) == {"receipts": rows.get("receipts", 0), "active_bids": rows.get("active_bids", 0)}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_same_writes_give_the_same_totals(tmp_path: Path, pg_url: str, seed: int) -> None:
    db = str(tmp_path / "c.db")
    ac.migrate(db)
    load_pg_schema(pg_url)
    lite, pg = SqliteEngine(db), PgEngine(pg_url)
    try:
        expected, got = play(lite, seed, 300), play(pg, seed, 300)
        assert len(got) == len(expected) > 1
        for want, have in zip(expected, got):
            implied(want)
            assert have == want
        assert {n for _, n, _ in got[-1]["job_counts"]} != {0}  # the walk did move jobs
        # the writes were spread over the PostgreSQL stripes, and no key has a stripe twice
        spread = pg.run("SELECT COUNT(DISTINCT stripe), COUNT(*), COUNT(DISTINCT (state, stripe)) FROM job_counts")[0]
        assert spread[0] >= 2 and spread[1] == spread[2]
    finally:
        lite.conn.close()
        pg.close()


def test_fleet_totals_hold_tricky_prices_as_sqlite_splits_them(tmp_path: Path, pg_url: str) -> None:
    """An open offer's price is added as whole units and millionths, rounded as SQLite's ROUND does."""
    db = str(tmp_path / "c.db")
    ac.migrate(db)
    load_pg_schema(pg_url)
    lite, pg = SqliteEngine(db), PgEngine(pg_url, stripes=1)
    try:
        for engine in (lite, pg):
            for i, price in enumerate(TRICKY_PRICES):
                engine.run("INSERT INTO offers (offer_id, provider, capacity, price, sla, status, created_at)"
                           " VALUES (?, 'p', 1, ?, '', 'open', 0)", (f"o{i}", price))
        units = sum(sqlite_split(p)[0] for p in TRICKY_PRICES)
        micro = sum(sqlite_split(p)[1] for p in TRICKY_PRICES)
        assert micro == 3 + 1121 + 1 + 700_000 + 750_000
        assert lite.views()["fleet_totals"] == pg.views()["fleet_totals"] == [(7, 7, 7, units, micro, 0)]
        for engine in (lite, pg):
            engine.run("UPDATE offers SET status = 'closed'")
        assert lite.views()["fleet_totals"] == pg.views()["fleet_totals"] == [(7, 0, 0, 0, 0, 0)]
    finally:
        lite.conn.close()
        pg.close()


def test_price_splitting_matches_sqlite_bit_for_bit(pg_url: str) -> None:
    load_pg_schema(pg_url)
    rnd = random.Random(7)
    prices = [round(rnd.uniform(0, 1000), rnd.randint(0, 9)) for _ in range(3000)]
    prices += [k / 10_000_000 + 12 for k in range(0, 30_000, 7)] + [x + 0.5e-6 for x in range(20)]
    lite = sqlite3.connect(":memory:")
    want = [lite.execute("SELECT CAST(? AS INTEGER), CAST(ROUND((? - CAST(? AS INTEGER)) * 1000000) AS INTEGER)",
                         (p, p, p)).fetchone() for p in prices]
    with pg_connect(pg_url) as conn:
        got = conn.execute("SELECT price_whole_units(p), price_millionths(p) FROM unnest(%s::float8[])"
                           " WITH ORDINALITY AS t(p, n) ORDER BY n", (prices,)).fetchall()
        # the reason for sqlite_round: PostgreSQL's own roundings both miss some of these
        half_even, numeric = conn.execute("SELECT round(2.5::float8),"
                                          " round(((12.0011215::float8 - 12) * 1000000)::numeric)").fetchone()
    assert [tuple(r) for r in got] == want
    assert (half_even, int(numeric)) == (2, 1122) and sqlite_split(12.0011215)[1] == 1121


# --- What only PostgreSQL has to get right: keys in commit order, uniqueness, stripes ---

def blocked(conn: Any, pid: int) -> bool:
    """Whether backend `pid` waits for a lock."""
    return bool(conn.execute("SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = %s AND NOT granted)",
                             (pid,)).fetchone()[0])


@contextlib.contextmanager
def in_thread(fn: Any) -> Iterator[dict[str, Any]]:
    """Run fn() in a thread; yields a dict that holds its 'result' (or 'error') once it has returned."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = fn()
        except Exception as exc:  # noqa: BLE001 - handed to the test
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    try:
        yield out
    finally:
        thread.join()


def wait_until_blocked(watcher: Any, pid: int) -> None:
    for _ in range(100_000):
        if blocked(watcher, pid):
            return
    raise AssertionError(f"backend {pid} never waited")


@pytest.mark.parametrize(("table", "column", "first", "values"), [
    ("shapes", "shape_id", 1, ("constraints", ["{}", '{"gpu":"A"}', '{"gpu":"B"}', '{"gpu":"C"}'])),
    ("log_leaves", "leaf_index", 0, ("receipt_id, leaf_hash", [(f"r{i}", bytes([i])) for i in range(4)])),
])
def test_keys_the_code_relies_on_follow_commit_order_without_gaps(pg_url: str, table: str, column: str, first: int,
                                                                  values: tuple[str, list[Any]]) -> None:
    """A second insert waits for the first to commit or roll back, then takes the next key: ids become
    visible in id order (the Matcher's shape watermark) and a rolled-back insert leaves no gap (the
    receipt log's leaves)."""
    load_pg_schema(pg_url)
    names, rows = values
    marks = ", ".join(["%s"] * len(names.split(",")))
    insert = f"INSERT INTO {table} ({names}) VALUES ({marks}) RETURNING {column}"
    row = lambda v: v if isinstance(v, tuple) else (v,)  # noqa: E731
    with pg_connect(pg_url) as a, pg_connect(pg_url) as b, pg_connect(pg_url) as watcher:
        b_pid = b.info.backend_pid
        a.execute("BEGIN")
        assert a.execute(insert, row(rows[0])).fetchone()[0] == first
        with in_thread(lambda: b.execute(insert, row(rows[1])).fetchone()[0]) as out:
            wait_until_blocked(watcher, b_pid)
            a.execute("ROLLBACK")
        assert out == {"result": first}  # the rolled-back key is taken again: no gap
        a.execute("BEGIN")
        assert a.execute(insert, row(rows[2])).fetchone()[0] == first + 1
        with in_thread(lambda: b.execute(insert, row(rows[3])).fetchone()[0]) as out:
            wait_until_blocked(watcher, b_pid)
            a.execute("COMMIT")
        assert out == {"result": first + 2}
        assert [r[0] for r in watcher.execute(f"SELECT {column} FROM {table} ORDER BY {column}")] == \
            [first, first + 1, first + 2]


def test_constraints_of_any_length_are_one_shape(pg_url: str) -> None:
    """Stored constraints have no length limit; past a B-tree entry's ~2,700 bytes they stay unique,
    an insert of one already there does nothing under ON CONFLICT DO NOTHING, and lookups by the text
    find it."""
    import psycopg

    load_pg_schema(pg_url)
    long = '{"gpu":"' + secrets.token_hex(8000) + '","models":["' + "x" * 5000 + '"]}'
    with pg_connect(pg_url) as conn:
        insert = "INSERT INTO shapes (constraints) VALUES (%s) ON CONFLICT DO NOTHING RETURNING shape_id"
        assert conn.execute(insert, (long,)).fetchall() == [(1,)]
        assert conn.execute(insert, (long,)).fetchall() == []
        assert conn.execute(insert, (long[:-3] + 'y"]}',)).fetchall() == [(2,)]  # differs in its last bytes
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("INSERT INTO shapes (constraints) VALUES (%s)", (long,))
        assert conn.execute("SELECT shape_id FROM shapes WHERE constraints = %s", (long,)).fetchall() == [(1,)]


def test_concurrent_first_submits_of_a_shape_make_one(pg_url: str) -> None:
    """The second of two transactions inserting the same new shape waits, then does nothing; its
    SELECT then finds the first's row."""
    load_pg_schema(pg_url)
    insert = "INSERT INTO shapes (constraints) VALUES ('{\"gpu\":\"H100\"}') ON CONFLICT DO NOTHING RETURNING shape_id"
    with pg_connect(pg_url) as a, pg_connect(pg_url) as b, pg_connect(pg_url) as watcher:
        a.execute("BEGIN")
        assert a.execute(insert).fetchall() == [(1,)]
        with in_thread(lambda: b.execute(insert).fetchall()) as out:
            wait_until_blocked(watcher, b.info.backend_pid)
            a.execute("COMMIT")
        assert out == {"result": []}
        assert b.execute("SELECT shape_id FROM shapes").fetchall() == [(1,)]


def lifecycle_writes(conn: Any, client: str, job: str) -> None:
    """What a job's lifecycle writes to the kept totals and the client's and miner's addresses rows, in
    one open transaction: a submit, a claim, a completion and its receipt (and its balance moves, as
    insert_receipt makes them), an admin offer and a bid."""
    conn.execute("INSERT INTO jobs (job_id, client_id, state, constraints, shape_id, requested_at, expires_at)"
                 " VALUES (%s, %s, 'QUEUED', '{}', 1, 1, 2)", (job, client))
    conn.execute("UPDATE jobs SET state = 'RUNNING', assigned_miner_id = %s, assigned_at = 1 WHERE job_id = %s",
                 (f"m-{client}", job))
    conn.execute("UPDATE jobs SET state = 'COMPLETED', finished_at = 2 WHERE job_id = %s", (job,))
    conn.execute("INSERT INTO receipts (receipt_id, job_id, issued_at, price) VALUES (%s, %s, 2, 1.5)", (job, job))
    conn.execute("SELECT addresses_add(%s, 0, 1500000, 0), addresses_add(%s, 0, -1500000, 0)", (f"m-{client}", client))
    conn.execute("INSERT INTO offers (offer_id, provider, capacity, price, sla, status, created_at)"
                 " VALUES (%s, 'p', 1, 1.5, '', 'open', 0)", (job,))
    conn.execute("INSERT INTO bids (bid_id, provider, capacity, price, status, created_at)"
                 " VALUES (%s, 'p', 1, 1.5, 'pending', 0)", (job,))


def test_writers_on_different_stripes_never_wait_for_each_other(pg_url: str) -> None:
    """Two jobs' lifecycles of one client and one miner in two open transactions: on different stripes
    neither waits for the other, not even on the client's and miner's addresses rows (each writer adds
    to the address's row in its own stripe); on one stripe the second waits for the first."""
    import psycopg

    load_pg_schema(pg_url)
    conns = [pg_connect(pg_url) for _ in range(17)]  # 17 backends: two of them share one of 16 stripes
    try:
        conns[0].execute("INSERT INTO shapes (constraints) VALUES ('{}')")
        by_stripe: dict[int, list[Any]] = {}
        for conn in conns:
            by_stripe.setdefault(stripe_of(conn), []).append(conn)
        shared = next(group for group in by_stripe.values() if len(group) > 1)
        apart = [group[0] for group in by_stripe.values()][:2]
        assert len(apart) == 2
        for turn, (a, b, waits) in enumerate(((apart[0], apart[1], False), (shared[0], shared[1], True))):
            for conn in (a, b):
                conn.execute("BEGIN")
                conn.execute("SET LOCAL lock_timeout = '2s'")  # a wait fails the statement (no wait: no effect)
            lifecycle_writes(a, "c-1", f"j{turn}-a")
            if waits:
                with pytest.raises(psycopg.errors.LockNotAvailable):
                    lifecycle_writes(b, "c-1", f"j{turn}-b")
            else:
                lifecycle_writes(b, "c-1", f"j{turn}-b")
            for conn in (a, b):
                conn.execute("COMMIT" if not waits else "ROLLBACK")
        totals = conns[0].execute("SELECT SUM(n) FROM job_counts WHERE state = 'COMPLETED'").fetchone()[0]
        assert totals == 2  # the two that did not wait, summed over their stripes
        assert conns[0].execute("SELECT SUM(tx_count), SUM(balance_micro), MAX(last_active) FROM addresses"
                                " WHERE address = 'c-1'").fetchone() == (2, -3_000_000, 2)
    finally:
        for conn in conns:
            conn.close()


def test_rows_read_as_sqlite3_rows_do(pg_url: str, tmp_path: Path) -> None:
    """By position and by name (the first of a repeated name), keys() in column order (a breaker found
    them reversed), and the same through both backends' connections."""
    sql = "SELECT 1 AS b, 2 AS a, 3 AS b, 'x' AS c"
    with contextlib.closing(sqlite3.connect(tmp_path / "rows.db")) as lite:
        lite.row_factory = sqlite3.Row
        expected = lite.execute(sql).fetchone()
        want = (tuple(expected), expected.keys(), [expected[k] for k in ("a", "b", "c")])
    with contextlib.closing(ac.connect_reader(pg_url)) as conn:
        row = conn.execute(sql).fetchone()
        assert (tuple(row), row.keys(), [row[k] for k in ("a", "b", "c")]) == want
    assert want == ((1, 2, 3, "x"), ["b", "a", "b", "c"], [2, 1, "x"])


def test_an_address_page_reads_its_own_rows_not_every_address(pg_url: str) -> None:
    """The explorer's addresses are striped on PostgreSQL (a row per writer's stripe): a page summed
    every stripe of every address before paging. Now a page holds the same addresses, sums and order
    as that aggregate (by keyset and by offset, across ties), and reads a bounded number of rows."""
    ac.migrate_pg(pg_url)
    rng = random.Random(18)
    rows = [(f"addr-{n:04d}", stripe, rng.randrange(5), rng.randrange(-9, 9), rng.randrange(40))
            for n in range(3000) for stripe in rng.sample(range(16, 40), rng.randint(1, 4))]
    with pg_connect(pg_url) as raw:
        with raw.cursor() as cursor:
            cursor.executemany("INSERT INTO addresses (address, stripe, tx_count, balance_micro, last_active)"
                               " VALUES (%s, %s, %s, %s, %s)", rows)
        raw.execute("ANALYZE addresses")
    whole: dict[str, list[int]] = {}
    for address, _, jobs, micro, at in rows:
        sums = whole.setdefault(address, [0, 0, -1])
        sums[0], sums[1], sums[2] = sums[0] + jobs, sums[1] + micro, max(sums[2], at)
    expected = sorted(((a, j, m, at) for a, (j, m, at) in whole.items()), key=lambda r: (r[3], r[0]), reverse=True)
    seen: list[tuple[str, int]] = []

    class Watched(ac.PgConnection):
        def execute(self, sql: str, params: Any = ()) -> Any:
            seen.append((ac.pg_sql(sql), params))
            return super().execute(sql, params)
    with contextlib.closing(Watched(ac.pg_connect(pg_url))) as conn:
        got, before = [], None
        while page := [tuple(r) for r in ac.list_addresses(conn, 50, 0, before)]:
            got += page
            before = (page[-1][3], page[-1][0])
        assert got == expected
        assert [tuple(r) for r in ac.list_addresses(conn, 20, 1000)] == expected[1000:1020]
        sql, params = seen[1]  # the second page: past a keyset
        plan = conn.raw.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, params).fetchone()[0][0]["Plan"]

    def rows_read(node: dict[str, Any]) -> float:
        own = node.get("Actual Rows", 0) * node.get("Actual Loops", 1) if "Scan" in node["Node Type"] else 0
        return own + sum(rows_read(child) for child in node.get("Plans", []))
    assert 50 <= rows_read(plan) < 1000 < len(rows)  # ~50 addresses' few stripes each, not 3,000 addresses'
