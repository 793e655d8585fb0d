"""The PostgreSQL test fixtures (conftest.py) against the real server AITBC_TEST_POSTGRES names: every
test gets new, empty databases of its own, dropped when it ends even if it failed; and without a server
the PostgreSQL tests skip with a reason that says how to run them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import PG_ENV

ROOT = Path(__file__).resolve().parent.parent


def user_relations(url: str) -> list[str]:
    """Every table, view, sequence and index in the database that PostgreSQL did not make itself."""
    import psycopg

    with psycopg.connect(url) as conn:
        return [row[0] for row in conn.execute(
            "SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_toast%'")]


def databases(server_url: str) -> set[str]:
    import psycopg

    with psycopg.connect(server_url) as conn:
        return {row[0] for row in conn.execute("SELECT datname FROM pg_database")}


def dbname(url: str) -> str:
    import psycopg

    return psycopg.conninfo.conninfo_to_dict(url)["dbname"]


def test_each_database_is_new_empty_and_apart_from_the_others(
        pg_server: str, pg_url: str, new_pg_database: Callable[[], str]) -> None:
    import psycopg

    other = new_pg_database()
    assert dbname(pg_url) != dbname(other)
    assert {dbname(pg_url), dbname(other)} <= databases(pg_server)
    assert user_relations(pg_url) == [] and user_relations(other) == []
    server = psycopg.conninfo.conninfo_to_dict(pg_server)
    for url in (pg_url, other):  # the same server and role, only the database differs
        assert {k: v for k, v in psycopg.conninfo.conninfo_to_dict(url).items() if k != "dbname"} == \
            {k: v for k, v in server.items() if k != "dbname"}

    with psycopg.connect(pg_url) as conn:
        conn.execute("CREATE TABLE jobs (job_id text PRIMARY KEY)")
        conn.execute("INSERT INTO jobs VALUES ('j1')")
    assert "public.jobs" in user_relations(pg_url)
    assert user_relations(other) == []
    with psycopg.connect(other) as conn, pytest.raises(psycopg.errors.UndefinedTable):
        conn.execute("SELECT job_id FROM jobs")


CHILD_TEST = '''
import json, os
import psycopg

HELD = []  # connections left open through the fixture's teardown


def test_fails_with_its_databases_in_use(pg_url, new_pg_database):
    urls = [pg_url, new_pg_database()]
    for url in urls:
        conn = psycopg.connect(url, autocommit=True)
        conn.execute("CREATE TABLE t (x int)")
        HELD.append(conn)
    with open(os.environ["AITBC_CHILD_OUT"], "w") as f:
        json.dump(urls, f)
    assert False, "fails on purpose"
'''


def test_the_databases_are_dropped_after_a_failed_test_with_connections_open(
        pg_server: str, tmp_path: Path) -> None:
    child = tmp_path / "child"
    child.mkdir()
    shutil.copy(Path(__file__).with_name("conftest.py"), child / "conftest.py")
    (child / "test_child.py").write_text(CHILD_TEST)
    out = tmp_path / "urls.json"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(child)], cwd=child,
                         env={**os.environ, "AITBC_CHILD_OUT": str(out)}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "1 failed" in run.stdout and "fails on purpose" in run.stdout, run.stdout + run.stderr
    assert "error" not in run.stdout.splitlines()[-1]  # the teardown itself went through
    names = {dbname(url) for url in json.loads(out.read_text())}
    assert len(names) == 2 and all(name.startswith("aitbc_test_") for name in names)
    assert names.isdisjoint(databases(pg_server))


def test_without_a_server_the_postgres_tests_skip_saying_how_to_run_them(tmp_path: Path) -> None:
    report = tmp_path / "junit.xml"
    env = {k: v for k, v in os.environ.items() if k != PG_ENV}
    run = subprocess.run([sys.executable, "-m", "pytest", "-m", "postgres", f"--junitxml={report}", __file__],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    cases = ET.parse(report).getroot().iter("testcase")
    reasons = {case.get("name"): [s.get("message", "") for s in case.iter("skipped")] for case in cases}
    assert set(reasons) == {"test_each_database_is_new_empty_and_apart_from_the_others",
                            "test_the_databases_are_dropped_after_a_failed_test_with_connections_open"}
    for name, skipped in reasons.items():
        assert len(skipped) == 1, name
        assert f"{PG_ENV} is not set" in skipped[0] and f"{PG_ENV}=postgresql://" in skipped[0], skipped[0]
        assert "bash .ci/run" in skipped[0], skipped[0]
