"""Configuration (spec section 3) and the CLI's handling of bad settings."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from click.testing import CliRunner

import aitbc_coord as ac


def load(env: dict[str, str], **kw: object) -> ac.Settings:
    return ac.Settings.load(env, **kw)


def test_defaults_in_dev_use_the_development_keys() -> None:
    s = load({})
    assert (s.app_env, s.host, s.port, s.db_path) == ("dev", "127.0.0.1", 8011, "./coordinator.db")
    assert (s.job_ttl_seconds, s.job_ttl_max_seconds, s.heartbeat_timeout_seconds) == (900, 604800, 30)
    assert (s.job_max_attempts, s.poll_max_wait_seconds, s.max_body_bytes) == (3, 30, 1048576)
    assert (s.db_synchronous, s.coordinator_id, s.allow_origins) == ("FULL", "aitbc-coordinator", ("*",))
    assert s.dev_key_roles == ("client", "miner", "admin")
    digest = hashlib.sha256(b"REDACTED_CLIENT_KEY").hexdigest()
    assert s.api_keys["client"] == {digest: f"client-{digest[:12]}"}


@pytest.mark.parametrize("raw", ['["alice=k1", "k2"]', "alice=k1,k2", " alice=k1 , k2 ,"])
def test_key_lists_accept_json_or_commas(raw: str) -> None:
    keys = load({"CLIENT_API_KEYS": raw}).api_keys["client"]
    d2 = hashlib.sha256(b"k2").hexdigest()
    assert keys == {hashlib.sha256(b"k1").hexdigest(): "alice", d2: f"client-{d2[:12]}"}


def test_keys_are_held_only_as_digests() -> None:
    s = load({"MINER_API_KEYS": "rig-1=super-secret-miner-key", "CLIENT_API_KEYS": "secret-client-key"})
    assert "super-secret-miner-key" not in repr(s) and "secret-client-key" not in repr(s)
    assert list(s.api_keys["miner"].values()) == ["rig-1"]
    assert s.dev_key_roles == ("admin",)


def test_a_base64_key_with_padding_is_a_bare_key() -> None:
    keys = load({"CLIENT_API_KEYS": "c2VjcmV0=="}).api_keys["client"]
    assert hashlib.sha256(b"c2VjcmV0==").hexdigest() in keys


def test_origins_accept_both_list_forms() -> None:
    assert load({"ALLOW_ORIGINS": "https://a.example,https://b.example"}).allow_origins == (
        "https://a.example", "https://b.example")
    assert load({"ALLOW_ORIGINS": '["https://a.example"]'}).allow_origins == ("https://a.example",)


@pytest.mark.parametrize("env", [{"APP_ENV": "prod"}, {"APP_ENV": "staging", "CLIENT_API_KEYS": "k"}])
def test_outside_dev_every_role_needs_keys(env: dict[str, str]) -> None:
    with pytest.raises(ac.ConfigError, match=r"(CLIENT|MINER)_API_KEYS"):
        load(env)
    full = {**env, "CLIENT_API_KEYS": "c", "MINER_API_KEYS": "m", "ADMIN_API_KEYS": "a"}
    assert load(full).dev_key_roles == ()


@pytest.mark.parametrize(("env", "name"), [
    ({"JOB_TTL_SECONDS": "soon"}, "JOB_TTL_SECONDS"), ({"JOB_TTL_SECONDS": "0"}, "JOB_TTL_SECONDS"),
    ({"APP_PORT": "http"}, "APP_PORT"), ({"HEARTBEAT_TIMEOUT_SECONDS": "-1"}, "HEARTBEAT_TIMEOUT_SECONDS"),
    ({"POLL_MAX_WAIT_SECONDS": "nan"}, "POLL_MAX_WAIT_SECONDS"), ({"JOB_MAX_ATTEMPTS": "0"}, "JOB_MAX_ATTEMPTS"),
    ({"DATABASE_URL": "mysql://db/x"}, "DATABASE_URL"), ({"DB_SYNCHRONOUS": "SOMETIMES"}, "DB_SYNCHRONOUS"),
    ({"CLIENT_API_KEYS": '["a",'}, "CLIENT_API_KEYS"), ({"ALLOW_ORIGINS": '["a", 1]'}, "ALLOW_ORIGINS"),
    ({"APP_ENV": "Prod!"}, "APP_ENV"), ({"MAX_BODY_BYTES": "10"}, "MAX_BODY_BYTES"),
])
def test_malformed_values_name_the_variable(env: dict[str, str], name: str) -> None:
    with pytest.raises(ac.ConfigError, match=name):
        load(env)


@pytest.mark.parametrize(("name", "raw"), [
    ("HEARTBEAT_TIMEOUT_SECONDS", "1e306"), ("HEARTBEAT_TIMEOUT_SECONDS", "inf"), ("POLL_MAX_WAIT_SECONDS", "1e20"),
    ("RECEIPT_LOG_CHECKPOINT_SECONDS", "1e306"), ("JOB_TTL_SECONDS", str(10**20)), ("JOB_TTL_MAX_SECONDS", str(10**20)),
    ("JOB_MAX_ATTEMPTS", str(2**63)), ("APP_PORT", "70000"), ("RATE_LIMIT_WINDOW_SECONDS", "315360001"),
])
def test_values_whose_arithmetic_would_overflow_stop_start_up(name: str, raw: str) -> None:
    """Once HEARTBEAT_TIMEOUT_SECONDS=1e306 made every admin read and sweep fail (ms: infinity) and
    JOB_TTL_SECONDS=1e20 every submit (past SQLite's 64-bit integers): 500s, not a start-up error."""
    with pytest.raises(ac.ConfigError, match=name):
        load({name: raw})
    assert load({"HEARTBEAT_TIMEOUT_SECONDS": str(ac.SECONDS_MAX), "JOB_TTL_MAX_SECONDS": str(ac.SECONDS_MAX),
                 "APP_PORT": "65535"}).heartbeat_timeout_seconds == 315_360_000


def test_database_url_forms() -> None:
    assert load({"DATABASE_URL": "sqlite:///./data/c.db"}).db_path == "./data/c.db"
    assert load({"DATABASE_URL": "sqlite:////var/lib/aitbc/c.db"}).db_path == "/var/lib/aitbc/c.db"
    assert load({"DATABASE_URL": "sqlite:///x.db"}, db_path="other.db").db_path == "other.db"
    assert load({"DATABASE_URL": "sqlite:///x.db"}).postgres_url is None


def test_a_postgresql_url_names_the_database_and_logs_never_show_its_password() -> None:
    s = load({"DATABASE_URL": "postgresql://coord:s3cret@db.internal:5432/aitbc?sslmode=require"})
    assert s.postgres_url == "postgresql://coord:s3cret@db.internal:5432/aitbc?sslmode=require"
    assert s.target == s.postgres_url and "s3cret" not in repr(s)
    assert s.database == "postgresql://coord:***@db.internal:5432/aitbc?sslmode=require"
    assert load({"DATABASE_URL": "postgres://coord@/aitbc?host=/run/postgresql"}).database == \
        "postgres://coord@/aitbc?host=/run/postgresql"
    # --db takes a URL as well as a file; a file given with --db wins over a PostgreSQL DATABASE_URL
    assert load({}, db_path="postgresql://coord@db/aitbc").postgres_url == "postgresql://coord@db/aitbc"
    overridden = load({"DATABASE_URL": "postgresql://coord@db/aitbc"}, db_path="local.db")
    assert (overridden.postgres_url, overridden.target) == (None, "local.db")


def test_env_file_is_read_and_the_real_environment_wins(tmp_path: Path) -> None:
    env_file = tmp_path / "coord.env"
    env_file.write_text("JOB_TTL_SECONDS=120\nCOORDINATOR_ID=from-file\nDB_SYNCHRONOUS=normal\n")
    s = load({"COORDINATOR_ID": "from-env"}, env_file=str(env_file))
    assert (s.job_ttl_seconds, s.coordinator_id, s.db_synchronous) == (120, "from-env", "NORMAL")
    (Path.cwd() / ".env").write_text("JOB_TTL_SECONDS=77\n")  # each test runs in a directory of its own: ./.env
    assert load({}).job_ttl_seconds == 77
    with pytest.raises(ac.ConfigError, match="no such file"):
        load({}, env_file=str(tmp_path / "missing.env"))


def test_cli_reports_bad_settings_in_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    runner = CliRunner()
    monkeypatch.setenv("APP_ENV", "prod")
    result = runner.invoke(ac.cli, ["serve", "--db", str(tmp_path / "c.db")])
    assert result.exit_code == 1
    assert "CLIENT_API_KEYS" in result.output and "Traceback" not in result.output
    monkeypatch.setenv("APP_ENV", "dev")
    monkeypatch.setenv("JOB_TTL_SECONDS", "forever")
    result = runner.invoke(ac.cli, ["migrate", "--db", str(tmp_path / "c.db")])
    assert result.exit_code == 1 and "JOB_TTL_SECONDS" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize(("name", "raw"), [("LOG_LEVEL", "loud"), ("LOG_FORMAT", "xml"), ("ROOT_PATH", "no-slash"),
                                         ("APP_PORT", "http"), ("DATABASE_URL", "mysql://db/x")])
def test_a_setting_that_is_also_an_option_is_reported_like_any_other(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str, raw: str) -> None:
    """A bad LOG_LEVEL once printed click's three-line usage error naming --log-level, exit 2; README
    promises one line naming the variable and exit status 1."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(name, raw)
    result = CliRunner().invoke(ac.cli, ["serve", "--port", "0"])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and name in lines[0] and "--" not in lines[0], lines
    assert not (tmp_path / "coordinator.db").exists()


def test_log_settings_come_from_the_env_file_and_options_win(tmp_path: Path) -> None:
    env_file = tmp_path / "coord.env"
    env_file.write_text("LOG_LEVEL=Warning\nLOG_FORMAT=json\n")
    s = load({}, env_file=str(env_file))
    assert (s.log_level, s.log_format) == ("warning", "json")
    assert load({"LOG_LEVEL": "error"}, log_level="debug").log_level == "debug"


def test_cli_help_has_examples_and_version() -> None:
    runner = CliRunner()
    assert set(ac.cli.commands) == {"serve", "migrate", "keygen", "verify", "audit", "check", "backup", "archive",
                                    "copy"}
    for args in ([], *([name] for name in ac.cli.commands)):
        out = runner.invoke(ac.cli, [*args, "--help"]).output
        assert "Example" in out and "aitbc-coord" in out, args
    assert ac.__version__ in runner.invoke(ac.cli, ["--version"]).output


def test_a_fleets_keys_come_from_files_one_entry_a_line(tmp_path: Path) -> None:
    """10,000 NAME=KEY entries (~560 KB) do not fit one environment variable (128 KiB)."""
    miners = tmp_path / "miners.keys"
    miners.write_text("# the fleet\n" + "".join(f"rig-{i}=key-{i:05d}-{'x' * 40}\n" for i in range(10_000)) + "\n")
    miners.chmod(0o600)
    clients = tmp_path / "clients.keys"
    clients.write_text("shop=client-key\n")
    clients.chmod(0o600)
    s = load({"APP_ENV": "prod", "MINER_API_KEYS_FILE": str(miners), "CLIENT_API_KEYS_FILE": str(clients),
              "ADMIN_API_KEYS": "a"})
    assert len(s.api_keys["miner"]) == 10_000 and s.dev_key_roles == ()
    assert s.api_keys["miner"][ac.key_digest(f"key-00042-{'x' * 40}")] == "rig-42"
    assert s.api_keys["client"][ac.key_digest("client-key")] == "shop"
    clients.chmod(0o644)
    with pytest.raises(ac.ConfigError, match="CLIENT_API_KEYS_FILE: .* readable or writable by group or others"):
        load({"CLIENT_API_KEYS_FILE": str(clients)})
    with pytest.raises(ac.ConfigError, match="set only one of MINER_API_KEYS and MINER_API_KEYS_FILE"):
        load({"MINER_API_KEYS_FILE": str(miners), "MINER_API_KEYS": "k"})
    with pytest.raises(ac.ConfigError, match="ADMIN_API_KEYS_FILE: cannot read"):
        load({"ADMIN_API_KEYS_FILE": str(tmp_path / "missing")})
    (tmp_path / "null.keys").symlink_to("/dev/null")
    for var, odd in (("ADMIN_API_KEYS_FILE", tmp_path), ("RECEIPT_SIGNING_KEY_FILE", tmp_path / "null.keys")):
        with pytest.raises(ac.ConfigError, match=f"{var}: .* is not a regular file"):  # not "readable by others"
            load({var: str(odd)})
    empty = tmp_path / "empty.keys"
    empty.write_text("# nobody yet\n")
    empty.chmod(0o600)
    with pytest.raises(ac.ConfigError, match="ADMIN_API_KEYS is empty"):
        load({"APP_ENV": "prod", "CLIENT_API_KEYS": "c", "MINER_API_KEYS": "m", "ADMIN_API_KEYS_FILE": str(empty)})


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o640, 0o604])
def test_a_key_file_others_can_write_or_read_is_refused(tmp_path: Path, mode: int) -> None:
    keys = tmp_path / "admin.keys"
    keys.write_text("ops=admin-key\n")
    keys.chmod(mode)
    with pytest.raises(ac.ConfigError, match="ADMIN_API_KEYS_FILE: .* readable or writable by group or others"):
        load({"ADMIN_API_KEYS_FILE": str(keys)})


def test_a_byte_order_mark_is_not_part_of_the_first_key(tmp_path: Path) -> None:
    keys = tmp_path / "miner.keys"
    keys.write_text("\ufeffrig-1=first-key\nrig-2=second-key\n", encoding="utf-8")
    keys.chmod(0o600)
    s = load({"MINER_API_KEYS_FILE": str(keys)})
    assert s.api_keys["miner"][ac.key_digest("first-key")] == "rig-1"
