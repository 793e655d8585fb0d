"""AITBC Coordinator: a single-file, SQLite-backed job coordinator for GPU miners.

Clients submit compute jobs; miners register, heartbeat and long-poll for work; the coordinator
matches each job to a miner whose capabilities satisfy its constraints and tracks it to its end.

Run it:   aitbc-coord serve [--host 127.0.0.1] [--port 8011] [--db PATH]   (or python -m aitbc_coord)
Schema:   aitbc-coord migrate [--db PATH]
Audit:    aitbc-coord audit --log URL --state FILE   (the receipt log: RFC 9162, C2SP checkpoints)
Export:   aitbc-coord archive DEST [--before YYYY-MM-DD] [--db PATH]   (reads only)
Move:     aitbc-coord copy --from sqlite:///PATH --to postgresql://...   (offline, into a new database)

Transactions: every write is a unit of work run by the one writer; units that arrive while a
commit is in flight share the next BEGIN IMMEDIATE ... COMMIT (group commit), each inside its own
SAVEPOINT, and no response is sent before its commit. Background duties (retention) run as units of
their own, never in a request's transaction. Reads use their own connection and never wait on the
writer (WAL). On PostgreSQL each unit is a transaction of its own on one of a few writer connections
(the server merges concurrent commits' WAL flushes itself), and units take their locks in one order
(LOCK ORDER), so that units on any number of instances never deadlock.

Map (sections in this order; each uses only what stands above it, so a request read from the ASGI
app at the bottom down to the database near the top, and back, scrolls one way each time):

    Settings          one frozen Settings, built from env/.env/flags
    Errors            ApiError and its kinds, each with its HTTP status
    Domain types      JobState, amounts, MinerProfile, Wake, Outcome
    Database          connect (the pragmas), migrate, backup, Database (group commit, reads, checkpoints)
    Data layer        named SQL functions, the connection first
    Domain logic      time, matching, receipts (canonical JSON, Ed25519), the receipt log (RFC 9162
                      Merkle tree and proofs, C2SP checkpoints), the archive format, rate limiter,
                      poll hub
    Units of work     tx_*: one transaction's worth of data-layer calls each; archive exports; the
                      SQLite -> PostgreSQL copy
    Coordinator       the service: runs units, wakes pollers, sweeps, keeps up (retention, WAL)
    Wire models       request models; each response model beside the function that builds it
    Request parsing   JSON bodies, validation, keys, the Endpoint registry and its runner
    Handlers          one per route, registered with @endpoint
    OpenAPI           the document, generated from the registry and the models
    ASGI app          router, CORS, errors, access log, metrics, App
    Serving           log formatters, the socket, the uvicorn server
    Smoke check       `aitbc-coord check`
    CLI               click commands, with the receipt log's client side (verify --log, audit)
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime
import email.utils
import enum
import functools
import gc
import graphlib
import gzip
import hashlib
import heapq
import http
import http.client
import ipaddress
import itertools
import json
import logging
import math
import os
import queue
import re
import resource
import secrets
import signal
import socket
import sqlite3
import stat
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, NamedTuple, TypeVar

import click
import uvicorn
from dotenv import dotenv_values
from nacl.exceptions import CryptoError
from nacl.signing import SigningKey, VerifyKey
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, GCCollector, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, RootModel, ValidationError,
                      field_validator)
from pydantic.json_schema import models_json_schema
from pydantic_core import PydanticCustomError
from starlette.requests import Request
from starlette.responses import Response
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__version__ = "0.1.0"
log = logging.getLogger("aitbc_coord")
T = TypeVar("T")


# === Settings ===

ROLES = ("client", "miner", "admin")
DEV_KEYS = {"client": "REDACTED_CLIENT_KEY", "miner": "REDACTED_MINER_KEY", "admin": "REDACTED_ADMIN_KEY"}
KEY_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")


class ConfigError(Exception):
    """A setting is missing or malformed; reported at start-up as one line, never a traceback."""


def url_without_password(url: str) -> str:
    """A libpq URI as messages may show it: a password in it (user:password@, or ?password=) as ***."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc if parts.password is None else parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    query = re.sub(r"(^|&)password=[^&]*", r"\1password=***", parts.query)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every tunable in one place; built once by `Settings.load` and passed down."""

    app_env: str = "dev"
    host: str = "127.0.0.1"
    port: int = 8011
    db_path: str = "./coordinator.db"
    # DATABASE_URL=postgresql://...: the database is PostgreSQL (a libpq URI; its password may be left
    # to PGPASSFILE), and db_path is unused
    postgres_url: str | None = dataclasses.field(default=None, repr=False)
    api_keys: Mapping[str, Mapping[str, str]] = dataclasses.field(default_factory=dict)
    dev_key_roles: tuple[str, ...] = ()
    allow_origins: tuple[str, ...] = ("*",)
    job_ttl_seconds: int = 900
    job_ttl_max_seconds: int = 604800
    heartbeat_timeout_seconds: float = 30.0
    job_max_attempts: int = 3
    poll_max_wait_seconds: float = 30.0
    max_body_bytes: int = 1048576
    coordinator_id: str = "aitbc-coordinator"
    db_synchronous: str = "FULL"
    sweep_interval_seconds: float = 0.5  # 0 turns the background sweeper off (tests drive it)
    idempotency_ttl_seconds: int = 86400
    metrics_require_admin: bool = False
    rate_limit_requests: int = 6000  # per caller and window; 0 turns rate limiting off
    rate_limit_window_seconds: float = 60.0
    poll_max_concurrent: int = 32  # long-polls one miner may hold open at once
    root_path: str = ""  # the prefix a reverse proxy serves the API under, e.g. /coordinator
    request_header_timeout_seconds: float = 10.0  # a request head must be complete this soon
    request_body_timeout_seconds: float = 30.0  # a body must arrive this soon, or at 1 KB/s if that is longer
    max_connections_per_address: int = 1024  # 0: no cap; IPv6 addresses count by /64
    forwarded_allow_ips: tuple[str, ...] = ("127.0.0.1", "::1")  # trusted proxies: X-Forwarded-For, no cap
    payload_retention_days: int | None = 30  # a finished job's payload and result go after this; None: keep
    job_retention_days: int | None = None  # whole job summaries; None: keep
    receipt_retention_days: int | None = None  # receipts; None: keep
    archive_dir: str | None = None  # with it, each day's finished jobs are archived here before pruning
    log_level: str = "info"  # debug, info, warning or error (serve --log-level)
    log_format: str = "text"  # text, or json: one object per line (serve --log-format)
    signing_seed: bytes | None = dataclasses.field(default=None, repr=False)
    attestation_seed: bytes | None = dataclasses.field(default=None, repr=False)
    dev_signing_key: bool = True  # APP_ENV=dev without a signing key: make one beside the database
    log_seed: bytes | None = dataclasses.field(default=None, repr=False)  # signs checkpoints (else the signing key)
    log_origin: str | None = None  # the checkpoints' origin line (else derived from coordinator_id and the key)
    log_checkpoint_seconds: float = 1.0  # a new checkpoint at most this often, when the log has grown

    @classmethod
    def load(
        cls, environ: Mapping[str, str], env_file: str | None = None, dotenv: bool = True, **overrides: Any
    ) -> Settings:
        """Build settings from `environ` over the .env file (unless not `dotenv`), then non-None `overrides`.

        Raises ConfigError.
        """
        file_values = _read_env_file(env_file) if dotenv else {}
        env = {k.upper(): v for k, v in file_values.items() if v is not None}
        env.update({k.upper(): v for k, v in environ.items()})
        values: dict[str, Any] = {}
        for name, (field, parse) in ENV_VARS.items():
            raw = env.get(name, "").strip()
            if raw:
                try:
                    values[field] = parse(raw)
                except (ValueError, TypeError) as exc:
                    raise ConfigError(f"{name}: {exc}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        if is_postgres_url(values.get("db_path", "")):  # DATABASE_URL, or --db, names PostgreSQL
            values["postgres_url"] = values.pop("db_path")
        app_env = values.get("app_env", cls.app_env)
        values["api_keys"], values["dev_key_roles"] = _load_api_keys(env, app_env)
        values["signing_seed"] = load_seed(env, "RECEIPT_SIGNING_KEY")
        values["attestation_seed"] = load_seed(env, "RECEIPT_ATTESTATION_KEY")
        values["log_seed"] = load_seed(env, "RECEIPT_LOG_SIGNING_KEY")
        settings = cls(**values)
        settings.check_retention()
        return settings

    @property
    def target(self) -> str:
        """What a connection opens: the SQLite path, or the PostgreSQL URL."""
        return self.postgres_url or self.db_path

    @property
    def database(self) -> str:
        """The database as logs and messages name it: the SQLite path, or the PostgreSQL URL without
        its password."""
        return self.db_path if self.postgres_url is None else url_without_password(self.postgres_url)

    def check_retention(self) -> None:
        """Raises ConfigError unless a job's payload and result are the first thing retention drops:
        deleting a job or its receipts first would prune what was never archived or pruned in order."""
        keep = math.inf
        payload = self.payload_retention_days or keep
        for name, days in (("JOB_RETENTION_DAYS", self.job_retention_days),
                           ("RECEIPT_RETENTION_DAYS", self.receipt_retention_days)):
            if (days or keep) < payload:
                raise ConfigError(f"{name}={days} is shorter than PAYLOAD_RETENTION_DAYS="
                                  f"{self.payload_retention_days or 'keep'}; a job's payload and result go first")


def _read_env_file(env_file: str | None) -> dict[str, str | None]:
    """The .env file's values (or none); raises ConfigError when a named file is missing."""
    if env_file is None:
        return dotenv_values(".env") if Path(".env").is_file() else {}
    if not Path(env_file).is_file():
        raise ConfigError(f"--env-file: no such file: {env_file}")
    return dotenv_values(env_file)


def parse_list(raw: str) -> list[str]:
    """A JSON array of strings or a comma-separated list; raises ValueError."""
    if raw.startswith("["):
        try:
            items = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a valid JSON array ({exc.msg})") from None
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ValueError("must be a JSON array of strings")
        return [i.strip() for i in items if i.strip()]
    return [i.strip() for i in raw.split(",") if i.strip()]


# Bounds on numeric settings: past them, millisecond arithmetic overflows a float to infinity or an
# SQLite integer, which would fail every request that uses the value instead of start-up.
SECONDS_MAX = 10 * 365 * 86_400  # ten years: "never" for any duration setting
COUNT_MAX = 2**31 - 1


def _parse_int(low: int, high: int = COUNT_MAX) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = int(raw)
        if not low <= value <= high:
            raise ValueError(f"must be from {low} to {high}, got {value}")
        return value

    return parse


def _parse_seconds(raw: str) -> float:
    value = float(raw)
    if not 0 <= value <= SECONDS_MAX:  # NaN fails this too
        raise ValueError(f"must be a number of seconds from 0 to {SECONDS_MAX} (ten years), got {raw}")
    return value


def _parse_database_url(raw: str) -> str:
    if is_postgres_url(raw):
        return raw
    if not raw.startswith("sqlite:///") or raw == "sqlite:///":
        raise ValueError("must look like sqlite:///relative/path.db, sqlite:////absolute/path.db"
                         " or postgresql://user@host/dbname")
    return raw[len("sqlite:///") :]


def _parse_choice(choices: Sequence[str], case: Callable[[str], str] = str.upper) -> Callable[[str], str]:
    """A parser accepting one of `choices` in any case, returning it as `case` writes it."""
    def parse(raw: str) -> str:
        if case(raw) not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {raw!r}")
        return case(raw)

    return parse


LOG_LEVELS, LOG_FORMATS = ("debug", "info", "warning", "error"), ("text", "json")


def _parse_bool(raw: str) -> bool:
    if raw.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise ValueError(f"must be true or false, got {raw!r}")
    return raw.lower() in ("1", "true", "yes", "on")


def _parse_root_path(raw: str) -> str:
    if raw == "/":
        return ""
    if not re.fullmatch(r"(/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)+", raw):
        raise ValueError(f"must be a URL path prefix such as /coordinator (no trailing slash), got {raw!r}")
    return raw


def _parse_networks(raw: str) -> tuple[str, ...]:
    items = tuple(parse_list(raw))
    for item in items:
        if item != "*":
            ipaddress.ip_network(item, strict=False)  # raises ValueError
    return items


# A checkpoint's origin line doubles as its signed-note key name (C2SP signed-note): printable ASCII
# without spaces or "+".
ORIGIN_RE = re.compile(r"[!-*,-~]{1,255}")


def _parse_origin(raw: str) -> str:
    if not ORIGIN_RE.fullmatch(raw):
        raise ValueError(f"must be 1-255 printable ASCII characters without spaces or '+', e.g. "
                         f"example.org/aitbc/receipts, got {raw!r}")
    return raw


RETENTION_DAYS_MAX = SECONDS_MAX // 86_400  # 3650: durations are at most ten years; past that, say keep


def _parse_retention_days(raw: str) -> int | None:
    """A whole number of days from 1 to RETENTION_DAYS_MAX, or `keep` (None: nothing is dropped)."""
    if raw.lower() in ("keep", "forever", "never"):
        return None
    if not re.fullmatch(r"[0-9]{1,6}", raw) or not 1 <= int(raw) <= RETENTION_DAYS_MAX:
        raise ValueError(f"must be a whole number of days from 1 to {RETENTION_DAYS_MAX} (ten years), or keep,"
                         f" got {raw!r}")
    return int(raw)


def _parse_app_env(raw: str) -> str:
    if not re.fullmatch(r"[a-z][a-z0-9_-]{0,31}", raw):
        raise ValueError(f"must be a short lower-case name such as dev or prod, got {raw!r}")
    return raw


ENV_VARS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "APP_ENV": ("app_env", _parse_app_env),
    "APP_HOST": ("host", str),
    "APP_PORT": ("port", _parse_int(0, 65535)),
    "DATABASE_URL": ("db_path", _parse_database_url),
    "ALLOW_ORIGINS": ("allow_origins", lambda raw: tuple(parse_list(raw))),
    "JOB_TTL_SECONDS": ("job_ttl_seconds", _parse_int(1, SECONDS_MAX)),
    "JOB_TTL_MAX_SECONDS": ("job_ttl_max_seconds", _parse_int(1, SECONDS_MAX)),
    "HEARTBEAT_TIMEOUT_SECONDS": ("heartbeat_timeout_seconds", _parse_seconds),
    "JOB_MAX_ATTEMPTS": ("job_max_attempts", _parse_int(1)),
    "POLL_MAX_WAIT_SECONDS": ("poll_max_wait_seconds", _parse_seconds),
    "MAX_BODY_BYTES": ("max_body_bytes", _parse_int(1024)),
    "COORDINATOR_ID": ("coordinator_id", str),
    "DB_SYNCHRONOUS": ("db_synchronous", _parse_choice(SYNCHRONOUS_MODES)),
    "METRICS_REQUIRE_ADMIN_KEY": ("metrics_require_admin", _parse_bool),
    "RATE_LIMIT_REQUESTS": ("rate_limit_requests", _parse_int(0)),
    "RATE_LIMIT_WINDOW_SECONDS": ("rate_limit_window_seconds", _parse_seconds),
    "POLL_MAX_CONCURRENT": ("poll_max_concurrent", _parse_int(1)),
    "ROOT_PATH": ("root_path", _parse_root_path),
    "REQUEST_HEADER_TIMEOUT_SECONDS": ("request_header_timeout_seconds", _parse_seconds),
    "REQUEST_BODY_TIMEOUT_SECONDS": ("request_body_timeout_seconds", _parse_seconds),
    "MAX_CONNECTIONS_PER_ADDRESS": ("max_connections_per_address", _parse_int(0)),
    "FORWARDED_ALLOW_IPS": ("forwarded_allow_ips", _parse_networks),
    "RECEIPT_DEV_SIGNING_KEY": ("dev_signing_key", _parse_bool),
    "RECEIPT_LOG_ORIGIN": ("log_origin", _parse_origin),
    "RECEIPT_LOG_CHECKPOINT_SECONDS": ("log_checkpoint_seconds", _parse_seconds),
    "PAYLOAD_RETENTION_DAYS": ("payload_retention_days", _parse_retention_days),
    "JOB_RETENTION_DAYS": ("job_retention_days", _parse_retention_days),
    "RECEIPT_RETENTION_DAYS": ("receipt_retention_days", _parse_retention_days),
    "ARCHIVE_DIR": ("archive_dir", str),
    "LOG_LEVEL": ("log_level", _parse_choice(LOG_LEVELS, str.lower)),
    "LOG_FORMAT": ("log_format", _parse_choice(LOG_FORMATS, str.lower)),
}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomically(path: str | Path, text: str, replace: bool) -> None:
    """Write `text` to `path` whole or not at all, mode 0600: into a temporary file beside it, fsynced,
    then renamed over `path` (`replace`) or linked to its name (not `replace`: FileExistsError when
    it exists, so that of two writers racing one wins and both read the winner's file), then the
    directory fsynced. A crash leaves the old file or the new one, never a part. Raises OSError."""
    target = Path(path)
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")  # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(partial, target)
        else:
            os.link(partial, target)
    finally:
        with contextlib.suppress(FileNotFoundError):  # renamed: already gone
            os.unlink(partial)
    _fsync(target.parent)


def parse_seed(text: str) -> bytes:
    """A 32-byte Ed25519 seed from 64 hex chars; raises ValueError."""
    text = text.strip()
    if not re.fullmatch(r"[0-9a-fA-F]{64}", text):
        raise ValueError("must be 64 hex characters (an Ed25519 seed, as `aitbc-coord keygen` prints)")
    return bytes.fromhex(text)


def read_secret_file(file_var: str, path: str, encoding: str = "ascii") -> str:
    """The text of a secret file named by `file_var`; raises ConfigError when it is not a regular file,
    is readable by group or others, or cannot be read."""
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):  # a directory, a device (/dev/null), a FIFO that would block
            raise ConfigError(f"{file_var}: {path} is not a regular file")
        if mode & 0o077:
            raise ConfigError(f"{file_var}: {path} is readable or writable by group or others; chmod 600 it")
        return Path(path).read_text(encoding=encoding).removeprefix("\ufeff")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file_var}: cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None


def load_seed(env: Mapping[str, str], prefix: str) -> bytes | None:
    """The seed from PREFIX_HEX or the file named by PREFIX_FILE, or None; raises ConfigError."""
    hex_var, file_var = f"{prefix}_HEX", f"{prefix}_FILE"
    raw, path = env.get(hex_var, "").strip(), env.get(file_var, "").strip()
    if raw and path:
        raise ConfigError(f"set only one of {hex_var} and {file_var}")
    if path:
        raw = read_secret_file(file_var, path)
    if not raw:
        return None
    try:
        return parse_seed(raw)
    except ValueError as exc:
        raise ConfigError(f"{file_var if path else hex_var}: {exc}") from None


def load_dev_seed(db_path: str) -> tuple[bytes, Path | None, bool]:
    """The development signing key's seed: (seed, the file beside the database that keeps it, whether it
    was made now). Made on first use, mode 0600, whole or not at all (of concurrent starts, one makes
    it and all use it), and reused; an in-memory database gets one that lives as long as the process
    (file None). Raises ConfigError when the file cannot be written, read or used; the message says
    it can be deleted to make a new one."""
    if db_path == ":memory:":
        return secrets.token_bytes(32), None, True
    path = Path(f"{db_path}.dev-signing-key")
    seed = secrets.token_bytes(32)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomically(path, seed.hex() + "\n", replace=False)
        return seed, path, True
    except FileExistsError:
        pass  # made by an earlier start (or a concurrent one): keep using it
    except OSError as exc:
        raise ConfigError(f"cannot write the development signing key {path}: {exc.strerror or exc}") from None
    try:
        return parse_seed(read_secret_file("development signing key", str(path))), path, False
    except (ConfigError, ValueError) as exc:
        why = str(exc) if isinstance(exc, ConfigError) else f"development signing key {path}: {exc}"
        raise ConfigError(f"{why}; deleting {path} makes a new development key") from None


def key_digest(key: str) -> str:
    """The SHA-256 hex digest under which a key is held in memory."""
    return hashlib.sha256(key.encode()).hexdigest()


def parse_key_entry(role: str, entry: str) -> tuple[str, str]:
    """(digest, identity) of one `KEY` or `NAME=KEY` entry; raises ValueError."""
    name, sep, key = entry.partition("=")
    if not sep or not KEY_NAME_RE.fullmatch(name) or not key.strip("="):
        name, key = "", entry  # no usable NAME= prefix: the whole entry is the key (e.g. base64 "ab==")
    if not key:
        raise ValueError("empty key")
    digest = key_digest(key)
    return digest, name or f"{role}-{digest[:12]}"


def _load_api_keys(env: Mapping[str, str], app_env: str) -> tuple[dict[str, dict[str, str]], tuple[str, ...]]:
    """Per role, digest -> identity; dev keys fill empty roles only in dev; raises ConfigError."""
    keys: dict[str, dict[str, str]] = {}
    dev_roles: list[str] = []
    for role in ROLES:
        var = file_var = f"{role.upper()}_API_KEYS"
        raw, path = env.get(var, "").strip(), env.get(f"{var}_FILE", "").strip()
        if raw and path:
            raise ConfigError(f"set only one of {var} and {var}_FILE")
        try:
            if path:  # a fleet's keys outgrow an environment variable (128 KiB): one entry a line
                var = f"{var}_FILE"
                text = read_secret_file(var, path, "utf-8")
                entries = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
            else:
                entries = parse_list(raw)
            keys[role] = dict(parse_key_entry(role, e) for e in entries)
        except ValueError as exc:
            raise ConfigError(f"{var}: {exc}") from None
        if not keys[role]:
            if app_env != "dev":
                raise ConfigError(f"{file_var} is empty; APP_ENV={app_env} needs at least one {role} key")
            keys[role] = dict([parse_key_entry(role, DEV_KEYS[role])])
            dev_roles.append(role)
    return keys, tuple(dev_roles)


# === Errors ===

class ApiError(Exception):
    """A handled error: rendered by `error_response` as {"detail": ...} with `status`."""

    status = 400
    default = "bad request"

    def __init__(self, detail: Any = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail or self.default)
        self.detail = detail or self.default
        self.headers = dict(headers or {})


class BadRequest(ApiError):
    status, default = 400, "bad request"


class Unauthorized(ApiError):
    status, default = 401, "invalid api key"


class NotFound(ApiError):
    status, default = 404, "not found"


class MethodNotAllowed(ApiError):
    status, default = 405, "Method Not Allowed"


class Conflict(ApiError):
    status, default = 409, "conflict"


class PayloadTooLarge(ApiError):
    status, default = 413, "request body too large"


class Unprocessable(ApiError):
    """422 with a plain message (validation errors use `Invalid`)."""

    status, default = 422, "unprocessable request"


class Invalid(ApiError):
    """422 with pydantic's error list: [{"type", "loc", "msg", "input"}, ...]."""

    status = 422

    @classmethod
    def one(cls, loc: Sequence[str | int], msg: str, value: Any, kind: str = "value_error") -> Invalid:
        return cls([{"type": kind, "loc": list(loc), "msg": msg, "input": value}])


class Gone(ApiError):
    status, default = 410, "gone"


class NotReady(ApiError):
    status, default = 425, "job not ready"


class TooManyRequests(ApiError):
    status, default = 429, "rate limit exceeded"

    def __init__(self, detail: Any = None, retry_after: float = 1) -> None:
        super().__init__(detail, headers={"Retry-After": str(max(1, math.ceil(retry_after)))})


class Unavailable(ApiError):
    status, default = 503, "database unavailable"

    def __init__(self, detail: Any = None, retry_after: int | None = 1) -> None:
        super().__init__(detail, headers={} if retry_after is None else {"Retry-After": str(retry_after)})


class InternalError(ApiError):
    status, default = 500, "Internal Server Error"


class LogDamaged(ApiError):
    """The receipt log's rows contradict each other (deleted or rolled back behind the coordinator's
    back): no receipt can be appended, nor a proof served from what is missing, until an operator
    repairs it. 503: a miner's result is not lost if it retries after the repair."""

    status = 503

    def __init__(self, why: str) -> None:
        super().__init__(f"the receipt log is damaged: {why}; an operator must repair it (see the service log)",
                         headers={"Retry-After": "60"})
        self.why = why


# === Domain types ===

class JobState(enum.StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"
    EXPIRED = "EXPIRED"


ACTIVE_STATES = (JobState.QUEUED, JobState.RUNNING)
# Prices and units above this are refused or ignored: sums and averages of them stay finite.
MAX_AMOUNT = 1e12
MAX_GPU_MEMORY_GB = 1_000_000  # a GPU's memory, declared by a miner or asked for by a job


def first_of(kind: type | tuple[type, ...], *values: Any) -> Any:
    """The first value of `kind` (never a bool, never a non-finite float), or None."""
    for value in values:
        if isinstance(value, kind) and not isinstance(value, bool):
            if not isinstance(value, float) or math.isfinite(value):
                return value
    return None


def amount(*values: Any) -> float | int | None:
    """The first value that is a number from 0 to MAX_AMOUNT, or None."""
    for value in values:
        number = first_of((int, float), value)
        if number is not None and 0 <= number <= MAX_AMOUNT:
            return number
    return None


NO_WORK_STATUSES = ("DRAINING", "OFFLINE")
CONSTRAINT_KEYS = ("gpu", "cuda", "min_vram_gb", "models", "region", "max_price")


@dataclasses.dataclass(frozen=True)
class Caller:
    role: str
    identity: str


@dataclasses.dataclass(frozen=True)
class MinerProfile:
    """What matching needs to know about a registered miner."""

    miner_id: str
    capabilities: dict[str, Any]
    region: str | None
    concurrency: int
    status: str
    session_token: str
    fit_key: str = ""  # equal for miners that satisfy the same constraints (fit_key_of)

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> MinerProfile:
        """From a miners row with (at least) PROFILE_COLUMNS. Remembered by those columns' values: a
        fleet's polls read the same rows again and again, and parsing the capabilities was a tenth of
        a renewal's work (the profile and its capabilities are never changed in place)."""
        key = (row["miner_id"], row["capabilities"], row["region"], row["concurrency"], row["status"],
               row["session_token"])
        known = KNOWN_PROFILES.get(key)
        if known is None:
            if len(KNOWN_PROFILES) >= MAX_KNOWN_PROFILES:
                KNOWN_PROFILES.clear()
            capabilities = load_json(key[1])
            known = KNOWN_PROFILES[key] = cls(key[0], capabilities, key[2], key[3], key[4], key[5],
                                              fit_key_of(capabilities, key[2]))
        return known


def fit_key_of(capabilities: Mapping[str, Any], region: str | None) -> str:
    """MinerProfile.fit_key: every value of a miner that matching reads (satisfies, fit_of), as JSON
    text, so that miners with the same key meet the same jobs, and miners that may not never share
    one (a region "None" and none at all included). Nothing else of the capabilities: they are
    free-form (a hostname, a driver's version), and a key of all of them makes each miner a kind of
    its own, which every newly queued job then examines (PollHub.notify)."""
    gpus = capabilities.get("gpus")
    cuda = capabilities.get("cuda")
    return compact_json([region, [[g.get("name"), g.get("memory_mb")] for g in gpus if isinstance(g, dict)]
                         if isinstance(gpus, list) else None, None if cuda is None else str(cuda),
                         capabilities.get("models"), capabilities.get("price")])


KNOWN_PROFILES: dict[tuple[Any, ...], MinerProfile] = {}  # (PROFILE_COLUMNS' values) -> MinerProfile
MAX_KNOWN_PROFILES = 1 << 16  # then forgotten all at once


PROFILE_COLUMNS = "miner_id, capabilities, region, concurrency, status, session_token"


QueuedJob = tuple[str, str, int]  # a newly QUEUED job: (job_id, constraints as stored, shape_id)
Beat = tuple[int, int | None]  # a heartbeat: (wall-clock ms it arrived, the `inflight` it reported)


@dataclasses.dataclass
class Wake:
    """Who may have work after a commit: newly QUEUED jobs, and miners with a freed slot."""

    queued: list[QueuedJob] = dataclasses.field(default_factory=list)
    miners: set[str] = dataclasses.field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.queued or self.miners)

    def add_rows(self, rows: Iterable[sqlite3.Row]) -> Wake:
        """Add the QUEUED ones of rows with job_id, state, constraints and shape_id."""
        for row in rows:
            if row["state"] == JobState.QUEUED:
                self.queued.append((row["job_id"], row["constraints"], row["shape_id"]))
        return self


@dataclasses.dataclass
class Outcome:
    """What a unit of work hands back: its value, whom to wake, and an error to raise after commit."""

    value: Any = None
    wake: Wake = dataclasses.field(default_factory=Wake)
    error: ApiError | ConfigError | None = None


# === Database ===

SCHEMA_VERSION = 7
MIN_SQLITE = (3, 35, 0)  # RETURNING
# The -wal file is cut back to this once a checkpoint lets the log restart (SQLite's
# journal_size_limit): a reader that pinned a snapshot (a backup, a slow read) grows it only for as
# long as it reads. Commits between checkpoints (1,000 pages, ~4 MB) stay well inside it.
WAL_SIZE_LIMIT_BYTES = 16 * 1024 * 1024


def schema_sql(name: str = "schema") -> str:
    """The text of schema.sql (or `name`.sql: schema_pg), beside the module in a checkout or installed
    with the wheel (as aitbc_coord_`name`.sql)."""
    here = Path(__file__).resolve().parent
    for file in (f"{name}.sql", f"aitbc_coord_{name}.sql"):
        if (here / file).is_file():
            return (here / file).read_text(encoding="utf-8")
    raise ConfigError(f"{name}.sql not found beside {__file__}")


def schema_section(version: int, name: str = "schema") -> str:
    """The part of schema.sql (or `name`.sql) headed `-- Version N:`: the additive upgrade step to
    version N, up to the next version's heading, the schema's version (PRAGMA user_version) or the end."""
    text = schema_sql(name)
    start = text.index(f"-- Version {version}:")
    ends = [i for i in (text.find(f"-- Version {version + 1}:", start), text.find("PRAGMA user_version", start))
            if i >= 0]
    return text[start:min(ends, default=len(text))]


# Upgrade steps: UPGRADES[n] takes a version n-1 database to version n. Steps that only add objects
# are the tail sections of schema.sql; one that must alter existing tables is written out here.
UPGRADES: dict[int, Callable[[], str]] = {
    2: lambda: schema_section(2),  # receipts, signing_keys, counters
    3: lambda: schema_section(3),  # the receipt log
    # retention, fleet totals, paging indexes; liveness no longer needs last_seen indexed
    4: lambda: "DROP INDEX IF EXISTS miners_by_last_seen;\n" + schema_section(4),
    5: lambda: schema_section(5),  # packed receipts (filled in by BACKFILLS[5]), constraints without nulls
    6: lambda: schema_section(6),  # the text bodies go, and the columns only the balance trigger read
    7: lambda: schema_section(7),  # claims that never reached their miner: miners.short_since, known_through
}
# What an upgrade step must also compute in Python (hashes SQLite has no function for), run after its
# SQL in the same transaction: BACKFILLS[n](conn). Registered where their logic lives (Units of work).
BACKFILLS: dict[int, Callable[[sqlite3.Connection], None]] = {}


def check_sqlite_version(version: str = sqlite3.sqlite_version) -> None:
    """Raises ConfigError when the SQLite library is older than 3.35 (no RETURNING)."""
    if tuple(int(p) for p in version.split(".")[:3]) < MIN_SQLITE:
        raise ConfigError(f"SQLite {version} is too old; the coordinator needs 3.35 or newer")


def connect(path: str, synchronous: str = "FULL", readonly: bool = False) -> sqlite3.Connection:
    """Open `path` with every pragma the coordinator relies on; transactions are managed by hand. A
    database this creates is mode 0600, like backups and archives (and so are its -wal and -shm files:
    SQLite gives them the database file's mode)."""
    if not readonly and path != ":memory:" and not path.startswith("file:"):
        with contextlib.suppress(OSError):  # exists already, or cannot be made: sqlite3 says why below
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout = 5000")  # wait out other processes (migrate, backup) briefly
    if not readonly:
        conn.execute("PRAGMA journal_mode = WAL")  # readers never block the writer, nor it them
        conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT_BYTES}")  # a WAL that grew shrinks back
    conn.execute(f"PRAGMA synchronous = {_parse_choice(SYNCHRONOUS_MODES)(synchronous)}")  # FULL: acked = durable
    conn.execute("PRAGMA foreign_keys = ON")  # jobs.shape_id must name a shape
    if readonly:
        conn.execute("PRAGMA query_only = ON")  # a read path can never write by mistake
    return conn


def split_statements(script: str) -> list[str]:
    """Split an SQL script into whole statements (trigger bodies included)."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    if current.strip() and not all(ln.strip().startswith("--") for ln in current.strip().splitlines()):
        raise ConfigError("schema.sql ends with an incomplete statement")
    return statements


def migrate(path: str) -> tuple[int, int]:
    """Create or upgrade the database at `path` in one transaction; (before, after); raises ConfigError."""
    check_sqlite_version()
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = None
    try:
        conn = connect(path)
        conn.execute("BEGIN IMMEDIATE")
        before = conn.execute("PRAGMA user_version").fetchone()[0]
        if before > SCHEMA_VERSION:
            raise ConfigError(f"database {path} has schema version {before}, newer than this "
                              f"coordinator's {SCHEMA_VERSION}; upgrade aitbc-coord")
        steps = [(0, schema_sql())] if before == 0 else [(v, UPGRADES[v]()) for v in range(before + 1, SCHEMA_VERSION + 1)]
        for version, script in steps:
            for statement in split_statements(script):
                conn.execute(statement)
            if version in BACKFILLS:
                BACKFILLS[version](conn)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
        return before, SCHEMA_VERSION
    except sqlite3.Error as exc:
        raise ConfigError(f"cannot migrate {path}: {exc}") from None
    finally:
        if conn is not None:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            conn.close()


def backup(path: str, dest: str) -> dict[str, Any]:
    """Copy the database at `path` to the new file `dest` while it is in use; raises ConfigError.

    VACUUM INTO reads one consistent snapshot (a WAL reader: writers carry on). The copy is written
    beside `dest` under a name of its own (two backups at once never share it), checked with PRAGMA
    integrity_check, synced, and only then linked into place, which never replaces a file.
    """
    target = Path(dest)
    if not Path(path).is_file():
        raise ConfigError(f"no database at {path}")
    if target.exists():
        raise ConfigError(f"{dest} exists; give the backup a new name")
    try:  # empty, mode 0600 (the copy holds everything the database does): VACUUM INTO may fill it
        fd, name = tempfile.mkstemp(dir=target.resolve().parent, prefix=f".{target.name}.", suffix=".partial")
    except OSError as exc:
        raise ConfigError(f"cannot write beside {dest}: {exc.strerror or exc}") from None
    os.close(fd)
    partial = Path(name)
    try:
        conn = connect(path)
        try:
            conn.execute("VACUUM INTO ?", (str(partial),))
        except sqlite3.Error as exc:
            raise ConfigError(f"backup of {path} failed: {exc}") from None
        finally:
            conn.close()
        copy = sqlite3.connect(partial)
        try:
            verdict = copy.execute("PRAGMA integrity_check").fetchone()[0]
            version = copy.execute("PRAGMA user_version").fetchone()[0]
            jobs = copy.execute("SELECT COALESCE(SUM(n), 0) FROM job_counts").fetchone()[0]
        finally:
            copy.close()
        if verdict != "ok":
            raise ConfigError(f"the copy of {path} failed its integrity check: {verdict}")
        _fsync(partial)
        try:
            os.link(partial, target)
        except FileExistsError:
            raise ConfigError(f"{dest} exists; give the backup a new name") from None
    finally:
        partial.unlink(missing_ok=True)
    _fsync(target.resolve().parent)
    return {"dest": str(target), "schema_version": version, "jobs": jobs, "bytes": target.stat().st_size}


class DatabaseChanged(sqlite3.DatabaseError):
    """The database file changed under a reader that cannot see changes (an immutable one)."""


def database_stamp(path: str) -> tuple[int, int, int, bytes]:
    """What a write to the database file changes: its inode, size, mtime (ns) and SQLite's file change
    counter (header bytes 24-27, SQLite docs "Database File Format" 1.3.7)."""
    with open(path, "rb") as file:
        file.seek(24)
        counter = file.read(4)
        st = os.fstat(file.fileno())
    return st.st_ino, st.st_size, st.st_mtime_ns, counter


def open_readonly(path: str) -> tuple[sqlite3.Connection, Callable[[], None]]:
    """The database at `path` for reading only, creating nothing beside it (a command run by another
    user, e.g. root from cron, must leave no -wal/-shm files the service cannot open): through the
    running server's -wal/-shm when they exist, else as an immutable file (SQLite URI parameters
    mode=ro and immutable=1). With it, a check to call before trusting what was read: an immutable
    reader sees no change and takes no lock, so a server that starts on the file meanwhile can make
    it read wrong rows or "malformed" pages; the check raises DatabaseChanged when the file changed
    since it was opened. Raises sqlite3.Error."""
    uri = Path(path).resolve().as_uri()
    live = Path(path + "-wal").exists() and Path(path + "-shm").exists()
    stamp = None if live else database_stamp(path)

    def unchanged() -> None:
        if stamp is not None and database_stamp(path) != stamp:
            raise DatabaseChanged("the database changed during the export (a server started on it?): nothing read"
                                  " since is kept; run it again (with the server running, an export reads"
                                  " through its WAL and is not disturbed)")

    conn = sqlite3.connect(f"{uri}?mode=ro" if live else f"{uri}?immutable=1", uri=True, isolation_level=None)
    conn.row_factory = sqlite3.Row
    return conn, unchanged


def _settle_all(outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for fut, result, exc in outcomes:
        if fut.done():  # its awaiter went away (a request, or the writer as the loop closes)
            continue
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)


class Database:
    """The one writer, which group-commits units of work, and a read-only connection for reads.

    Units run on the event loop's thread, a batch at a time inside BEGIN IMMEDIATE ... COMMIT, each
    in its own SAVEPOINT; only the COMMIT (the fsync) goes to a helper thread, and the units that
    arrive meanwhile form the next batch. (Running units on a writer thread cost a GIL hand-over
    per statement: ~2 ms per batch of six under load.) Reads run on the loop's thread too: in WAL
    mode a read never waits for the writer, and an indexed page costs less than a hop to a thread.
    """

    MAX_BATCH = 256
    BUSY_RETRY_SECONDS = 5.0  # another process holding the write lock (e.g. migrate) is waited out

    def __init__(self, path: str, synchronous: str = "FULL") -> None:
        self.path, self.synchronous = path, synchronous
        self.abort_hooks: list[Callable[[], None]] = []  # run after a batch failed to commit
        self.commit_hooks: list[Callable[[], None]] = []  # run once a batch has committed, before its units' answers
        self.commit_observer: Callable[[int, float], None] | None = None  # (units, seconds) per commit
        self._pending: list[tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future[Any]]] = []
        self._alone: list[tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future[Any]]] = []
        self._closing = False
        self.open = False  # between start() and close(): the app's lifespan runs them

    async def start(self) -> None:
        """Open both connections and start the writer task."""
        self._loop = asyncio.get_running_loop()
        self._wconn = connect(self.path, self.synchronous)
        self._wconn.execute("PRAGMA busy_timeout = 0")  # never block the loop: BEGIN retries instead
        self._rconn = connect(self.path, self.synchronous, readonly=True)
        self._cconn = connect(self.path, self.synchronous)  # checkpoints, from a worker thread
        self._commits: queue.SimpleQueue[asyncio.Future[None] | None] = queue.SimpleQueue()
        self._committer = threading.Thread(target=self._commit_forever, name="aitbc-commit", daemon=True)
        self._committer.start()
        self._wake = asyncio.Event()
        self._writer = asyncio.create_task(self._run_writer())
        self.open = True

    async def close(self) -> None:
        """Commit what is queued, then close both connections."""
        self.open, self._closing = False, True
        self._wake.set()
        await self._writer
        self._commits.put(None)
        self._committer.join()
        self._wconn.close()
        self._rconn.close()
        self._cconn.close()

    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(conn, *args) as one unit of work; returns once it is committed. Raises what fn raised,
        or Unavailable when the database is not open."""
        return await self._enqueue(self._pending, fn, args)

    async def write_alone(self, fn: Callable[..., T], *args: Any) -> T:
        """As `write`, but in a transaction of its own: background duties (retention) never share a
        request's commit, and between two of them the requests waiting meanwhile have theirs."""
        return await self._enqueue(self._alone, fn, args)

    def _enqueue(self, queue: list[Any], fn: Callable[..., T], args: tuple[Any, ...]) -> asyncio.Future[T]:
        if not self.open:
            raise Unavailable("database not open")
        fut: asyncio.Future[T] = self._loop.create_future()
        queue.append((fn, args, fut))
        self._wake.set()
        return fut

    @contextlib.asynccontextmanager
    async def cluster_lock(self, key: int) -> AsyncIterator[bool]:
        """Whether this process may run a duty that must run in one place at a time (a retention pass):
        on SQLite always (one process writes the file); PostgreSQL: PgDatabase.cluster_lock."""
        yield True

    async def wal_checkpoint(self) -> tuple[int, int, int]:
        """A PASSIVE WAL checkpoint on a connection of its own, in a worker thread: it copies what no
        reader still needs into the database file and never waits for or blocks the writer (SQLite
        docs, wal_checkpoint). Returns (busy, frames in the log, frames checkpointed); raises
        sqlite3.Error."""
        def run() -> tuple[int, int, int]:
            return tuple(self._cconn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone())  # type: ignore[return-value]
        return await asyncio.to_thread(run)

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(conn, *args) on the read connection inside one read snapshot; raises Unavailable when
        the database is not open (an app mounted without its lifespan run, or shutting down)."""
        if not self.open:
            raise Unavailable("database not open")
        conn = self._rconn
        conn.execute("BEGIN")  # one snapshot for every statement of this read
        try:
            return fn(conn, *args)
        finally:
            conn.execute("ROLLBACK")

    async def peek(self, fn: Callable[..., T], *args: Any) -> T:
        """As `read`, without the transaction around it: each statement reads its own snapshot. For reads
        that are advice, not answers (a poll's look before it parks), where BEGIN and ROLLBACK would
        cost as much as the query. Raises Unavailable as `read` does."""
        if not self.open:
            raise Unavailable("database not open")
        return fn(self._rconn, *args)

    async def _run_writer(self) -> None:
        while not (self._closing and not self._pending and not self._alone):
            await self._wake.wait()
            self._wake.clear()
            while self._pending or self._alone:
                if self._pending:
                    batch, self._pending = self._pending[:self.MAX_BATCH], self._pending[self.MAX_BATCH:]
                    await self._commit_batch(batch)
                if self._alone:  # one at a time, between the requests' batches
                    await self._commit_batch([self._alone.pop(0)])

    async def _begin(self) -> None:
        deadline = time.monotonic() + self.BUSY_RETRY_SECONDS
        while True:
            try:
                self._wconn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if getattr(exc, "sqlite_errorname", "") != "SQLITE_BUSY" or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.01)

    async def _commit_batch(self, batch: list[tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        started = time.perf_counter()
        outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        fut = None
        try:
            await self._begin()
            for fn, args, fut in batch:  # (not a comprehension: its frame would keep the last future)
                outcomes.append((fut, *self._run_unit(self._wconn, fn, args)))
            committed = self._loop.create_future()
            self._commits.put(committed)
            await committed  # raises what COMMIT raised
            for hook in self.commit_hooks:  # (not the units' awaiters: one may have gone, its request cancelled)
                hook()
            if self.commit_observer is not None:
                self.commit_observer(len(batch), time.perf_counter() - started)
        except sqlite3.Error as exc:  # nothing of this batch is durable, so nothing is acknowledged
            log.error("write batch of %d aborted: %s", len(batch), exc)
            if self._wconn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._wconn.execute("ROLLBACK")
            for hook in self.abort_hooks:
                hook()
            outcomes = [(fut, None, Unavailable()) for _, _, fut in batch]
        _settle_all(outcomes)
        # A unit's error carries a traceback whose frames lead back to this one: were it to keep the
        # futures (which hold the errors), every refused unit would be a reference cycle, left to the
        # cycle collector, which `serve` runs on a clock (what lives past a tick waits for the daily one).
        del batch, outcomes, fut

    def _commit_forever(self) -> None:
        """The commit thread: COMMIT each batch handed over (the fsync happens here), then tell the loop.
        (A thread of its own and a queue: run_in_executor's work items and future chaining cost the
        loop ~5 us a request more.)"""
        while (committed := self._commits.get()) is not None:
            try:
                self._wconn.execute("COMMIT")
                error = None
            except Exception as exc:  # noqa: BLE001 - handed to the batch, which aborts
                error = exc
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting
                self._loop.call_soon_threadsafe(_settle_all, [(committed, None, error)])

    @staticmethod
    def _run_unit(conn: sqlite3.Connection, fn: Callable[..., Any], args: tuple[Any, ...]) -> tuple[Any, BaseException | None]:
        conn.execute("SAVEPOINT unit")
        try:
            result = fn(conn, *args)
        except Exception as exc:  # this unit's writes are undone; the rest of the batch commits
            conn.execute("ROLLBACK TO unit")
            conn.execute("RELEASE unit")
            if isinstance(exc, sqlite3.OperationalError):
                log.error("unit %s failed: %s", fn.__name__, exc)
                exc = Unavailable()
            return None, exc
        conn.execute("RELEASE unit")
        return result, None


# --- PostgreSQL: the same data layer and units over psycopg 3 (DATABASE_URL=postgresql://...) ---
# The data layer's SQL is SQLite's; PgConnection translates each distinct text once (placeholders,
# the few SQLite-only forms) and returns rows indexable by position and by name, as sqlite3.Row.
# psycopg is imported on first use: the default install (SQLite only) does without it.

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
# The database errors of the backends in use: sqlite3's, and psycopg's once PostgreSQL is opened.
DB_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error,)
INTEGRITY_ERRORS: tuple[type[Exception], ...] = (sqlite3.IntegrityError,)  # a constraint refused a write


def is_postgres_url(url: str) -> bool:
    """Whether `url` names a PostgreSQL database (a libpq connection URI), not a SQLite file."""
    return url.startswith(POSTGRES_SCHEMES)


PSYCOPG_MIN = (3, 2, 4)  # earlier ones drop notifications that arrive while a LISTEN connection runs a statement


def load_psycopg() -> Any:
    """The psycopg module, imported on first use; raises ConfigError when the extra is not installed or
    is older than PSYCOPG_MIN."""
    global DB_ERRORS, INTEGRITY_ERRORS
    try:
        import psycopg
        import psycopg_pool  # noqa: F401 - checked here, used by PgDatabase
    except ImportError:
        raise ConfigError("DATABASE_URL names PostgreSQL, but its driver is not installed:"
                          " pip install 'aitbc-coordinator[postgres]'") from None
    if tuple(int(n) for n in re.findall(r"\d+", psycopg.__version__)[:3]) < PSYCOPG_MIN:
        raise ConfigError(f"psycopg {psycopg.__version__} drops wake-ups between instances (a notification that"
                          f" arrives while the listener's connection runs a statement): pip install"
                          f" 'psycopg[binary]>={'.'.join(map(str, PSYCOPG_MIN))}'")
    DB_ERRORS = (sqlite3.Error, psycopg.Error)
    INTEGRITY_ERRORS = (sqlite3.IntegrityError, psycopg.IntegrityError)
    return psycopg


# SQLite-only forms in the data layer's SQL, and what they are on PostgreSQL.
PG_REWRITES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r" INDEXED BY \w+"), ""),  # a planner hint
    (re.compile(r"\bMAX\(((?:[^(),]|\([^()]*\))+), ((?:[^(),]|\([^()]*\))+)\)"), r"GREATEST(\1, \2)"),  # SQLite's two-argument max
    (re.compile(r"\bjson_each\((\?|:\w+)\)"), r"json_array_elements_text(CAST(\1 AS json))"),  # a JSON array's values
    (re.compile(r"\bjson_extract\((\w+), '\$\.(\w+)'\)"), r"CAST(CAST(\1 AS json) ->> '\2' AS double precision)"),
    (re.compile(r"/\*(FOR UPDATE(?: SKIP LOCKED)?)\*/"), r"\1"),  # lock markers: comments on SQLite
    # SQLite's ROUND (half away from zero) and 64-bit INTEGER (schema_pg.sql has sqlite_round)
    (re.compile(r"CAST\(ROUND\(([^()]+)\) AS INTEGER\)"), r"CAST(sqlite_round(\1) AS BIGINT)"),
]
_PG_TOKENS = re.compile(r"'(?:[^']|'')*'|::|\?|:(\w+)|%")


@functools.lru_cache(maxsize=4096)
def pg_sql(sql: str) -> str:
    """The PostgreSQL text of one of the data layer's statements: PG_REWRITES applied, then `?` and
    `:name` placeholders as psycopg's `%s` and `%(name)s` (every `%` doubled, in literals too; what
    looks like a placeholder inside a string literal, and `::` casts, left alone)."""
    for pattern, replacement in PG_REWRITES:
        sql = pattern.sub(replacement, sql)

    def placeholder(match: re.Match[str]) -> str:
        token = match.group(0)
        if token == "?":
            return "%s"
        if token == "%":
            return "%%"
        if token.startswith("'"):
            return token.replace("%", "%%")  # psycopg reads placeholders inside literals too
        return f"%({match.group(1)})s" if match.group(1) else token
    return _PG_TOKENS.sub(placeholder, sql)


class PgRow(tuple):  # type: ignore[type-arg]
    """A result row indexable by position and by column name, with keys(): what sqlite3.Row offers."""

    __slots__ = ()
    names: Mapping[str, int] = {}
    columns: tuple[str, ...] = ()  # in order, a repeated name repeated (as sqlite3.Row's keys())

    def __getitem__(self, key: Any) -> Any:
        return tuple.__getitem__(self, self.names[key] if isinstance(key, str) else key)

    def keys(self) -> list[str]:
        return list(self.columns)


@functools.lru_cache(maxsize=1024)
def _pg_row_class(names: tuple[bytes, ...]) -> type[PgRow]:
    """The PgRow class for a result's column names (as the server sent them)."""
    columns = tuple(name.decode() for name in names)
    positions = {name: i for i, name in reversed(list(enumerate(columns)))}  # the first of a repeated name
    return type("PgRow", (PgRow,), {"__slots__": (), "names": positions, "columns": columns})


def _pg_row_maker(cursor: Any) -> Callable[[Sequence[Any]], PgRow]:
    """psycopg's row factory for PgRow. The names are read from the result itself (psycopg's
    `description` makes an object of each column: a quarter of a wide row's statement)."""
    result = cursor.pgresult
    if result is None or result.status not in (2, 9, 12):  # rows: PGRES_TUPLES_OK, _SINGLE_TUPLE, _TUPLES_CHUNK
        return _pg_row_class(())  # (a COPY's result has fields without names)
    return _pg_row_class(tuple(result.fname(i) for i in range(result.nfields)))


class PgConnection:
    """The part of sqlite3.Connection the data layer and units use (`execute`, `executemany`, both
    returning a cursor with fetchone/fetchall/rowcount/iteration), over one psycopg connection."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    def execute(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> Any:
        return self.raw.execute(pg_sql(sql), params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any] | Mapping[str, Any]]) -> Any:
        rows = list(rows)
        if len(rows) == 1:  # psycopg's executemany pipelines: dearer than one statement for one row
            return self.execute(sql, rows[0])
        cursor = self.raw.cursor()
        cursor.executemany(pg_sql(sql), rows)
        return cursor

    def close(self) -> None:
        self.raw.close()


def connect_reader(target: str) -> Any:
    """A connection for reading (transactions by hand, BEGIN ... ROLLBACK) to the SQLite file or the
    PostgreSQL URL `target`; raises a database error."""
    return PgConnection(pg_connect(target)) if is_postgres_url(target) else connect(target, readonly=True)


def pg_connect(url: str, **kwargs: Any) -> Any:
    """A psycopg connection to `url` (autocommit: transactions are opened explicitly) that returns
    PgRow rows, and whole numbers for numeric values (SUM over bigint) as sqlite3 does; raises
    psycopg.Error."""
    psycopg = load_psycopg()
    raw = psycopg.Connection.connect(url, autocommit=True, row_factory=_pg_row_maker, **kwargs)
    _configure_pg(raw)
    return raw


def _configure_pg(raw: Any) -> None:
    from psycopg.adapt import Loader
    from psycopg.types.numeric import Int8Dumper

    class NumberLoader(Loader):  # numeric: int when whole, else float (never Decimal, which JSON refuses)
        def load(self, data: Any) -> int | float:
            text = bytes(data)
            return float(text) if b"." in text or b"N" in text else int(text)
    raw.adapters.register_loader("numeric", NumberLoader)
    # a Python int is a bigint, as SQLite's INTEGER is 64 bits: psycopg would send a small one as int4
    # or int2, and PostgreSQL multiplies those in 32 bits (a price of 1,000,000 times 1,000,000 overflows)
    raw.adapters.register_dumper(int, Int8Dumper)
    raw.row_factory = _pg_row_maker


def claim_counter_stripe(raw: Any) -> int:
    """Give a writer's connection a stripe of the striped totals no other live session adds to
    (schema_pg.sql's claim_counter_stripe: a session-level advisory lock, held until the connection
    closes): its transactions then never wait for another's on a total (LOCK ORDER). Returns the
    stripe; raises psycopg.Error."""
    return int(raw.execute("SELECT claim_counter_stripe()").fetchone()[0])


MIGRATE_LOCK = 0x61697462_63000001  # pg_advisory_xact_lock key ("aitbc" and 1): one migration at a time
# PostgreSQL upgrade steps, as UPGRADES: PG_UPGRADES[n] takes a version n-1 database to version n (the
# first PostgreSQL schema was version 6). Its versions follow SQLite's, and go past them where only
# PostgreSQL's schema changes: PG_SCHEMA_VERSION is the one this code makes and works on.
PG_UPGRADES: dict[int, Callable[[], str]] = {
    7: lambda: schema_section(7, "schema_pg"),  # claims that never reached their miner
    8: lambda: schema_section(8, "schema_pg"),  # the per-job helpers in PL/pgSQL (plans kept)
    9: lambda: schema_section(9, "schema_pg"),  # balances that pass a bigint (addresses.balance_micro numeric)
}
PG_SCHEMA_VERSION = max(PG_UPGRADES)


# Rolling upgrades (PostgreSQL, where N instances share a database): the oldest schema version whose
# coordinator can still work on a database at PG_SCHEMA_VERSION, recorded beside the version. Upgrade steps
# stay additive (expand, then contract in a later release) so that this can stay one version behind;
# raise it with a step older code cannot live with (a dropped or renamed column, a NOT NULL column
# without a default, a column whose meaning changed). Version 7 cannot be shared with version 6 code
# on PostgreSQL: it stripes the addresses rows, which version 6's balance updates would each hit.
SCHEMA_COMPATIBLE_FROM = 7


def read_pg_version(raw: Any) -> tuple[int, int]:
    """(the schema version, the oldest version whose code can work on it) of a PostgreSQL database;
    (0, 0) when it has no schema. A version 6 database recorded no floor: its own version."""
    if not raw.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()[0]:
        return 0, 0
    rows = raw.execute("SELECT to_jsonb(v) FROM schema_version v").fetchall()
    if len(rows) != 1 or not isinstance(rows[0][0].get("version"), int):
        raise ConfigError("the PostgreSQL database's schema_version table does not hold one version: not a"
                          " coordinator's database, or a damaged one; restore it from a backup")
    row = rows[0][0]
    floor = row.get("compatible_from")
    return row["version"], floor if isinstance(floor, int) and floor > 0 else row["version"]


def migrate_pg(url: str) -> tuple[int, int]:
    """Create, upgrade or check the PostgreSQL schema (schema_pg.sql) in one transaction; (before,
    after). Instances that start together wait on one transaction-level advisory lock, so exactly one
    of them creates or upgrades it. A database one rollout ahead (a newer schema whose
    compatible_from is at most PG_SCHEMA_VERSION) is used as it is: (before, before). Raises ConfigError
    (server unreachable, a schema this coordinator cannot work on or knows no upgrade from)."""
    psycopg = load_psycopg()
    try:
        raw = pg_connect(url, connect_timeout=10)
    except psycopg.Error as exc:
        raise ConfigError(f"cannot connect to PostgreSQL: {exc}".strip()) from None
    try:
        with raw.transaction():
            raw.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
            before, floor = read_pg_version(raw)
            if floor > PG_SCHEMA_VERSION:
                raise ConfigError(f"the PostgreSQL database has schema version {before}, which needs a coordinator"
                                  f" of schema version {floor} or newer (this one's is {PG_SCHEMA_VERSION});"
                                  f" upgrade aitbc-coord")
            if before > PG_SCHEMA_VERSION:
                log.warning("the PostgreSQL database's schema version %d is newer than this coordinator's %d and"
                            " works with it (from version %d): using it as it is; upgrade this instance to"
                            " finish the rollout", before, PG_SCHEMA_VERSION, floor)
                return before, before
            if before == 0:
                raw.execute(schema_sql("schema_pg"))
            elif before < min(PG_UPGRADES) - 1:
                raise ConfigError(f"the PostgreSQL database has schema version {before}; this coordinator"
                                  f" knows no upgrade from it to {PG_SCHEMA_VERSION}")
            elif before < PG_SCHEMA_VERSION:
                for version in range(before + 1, PG_SCHEMA_VERSION + 1):
                    raw.execute(PG_UPGRADES[version]())
            if before < PG_SCHEMA_VERSION:
                raw.execute("UPDATE schema_version SET version = %s, compatible_from = %s",
                            (PG_SCHEMA_VERSION, SCHEMA_COMPATIBLE_FROM))
        return before, PG_SCHEMA_VERSION
    except psycopg.errors.InsufficientPrivilege as exc:
        raise ConfigError(f"cannot migrate the PostgreSQL database: {exc}: the URL's role must own the database"
                          f" (createdb -O ROLE) or hold CREATE on its public schema") from None
    except psycopg.Error as exc:
        raise ConfigError(f"cannot migrate the PostgreSQL database: {exc}") from None
    finally:
        raw.close()


def migrate_database(settings: Settings) -> tuple[int, int]:
    """migrate() or migrate_pg(), whichever database the settings name; raises ConfigError."""
    return migrate_pg(settings.postgres_url) if settings.postgres_url else migrate(settings.db_path)


class PgDatabase(Database):
    """Database's interface on PostgreSQL. Each unit of work runs in a transaction of its own, on one
    of WRITERS connections, each used by a thread of its own (every statement is a network round trip
    the event loop must not wait through); units start in the order they were written and commit in
    any order. No group commit: PostgreSQL merges the WAL flushes of concurrent commits itself, and a
    batch would hold every unit's locks until the last one's commit (LOCK ORDER says why units never
    wait for each other in a cycle). A unit that deadlocks anyway (a safety net) or fails
    serialisation runs again, RETRIES runs in all, each counted in `retried` by the error's name (a
    metric). Reads take a connection from a pool in a worker thread, each
    read one READ ONLY REPEATABLE READ transaction (one snapshot, as SQLite's BEGIN gives). Raises
    what Database raises; database errors are psycopg.Error.

    The abort hooks are not run: what they reset holds nothing a rolled-back unit could leave wrong
    here (the Matcher reads which shapes hold jobs afresh, and learns only committed shapes; LogEdge
    checks itself against the leaf before each append)."""

    WRITERS = 3  # connections writing at once, per instance
    RETRIES = 3  # runs of a unit that deadlocked or failed serialisation, in all
    READ_POOL = 4  # connections for reads

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self._pool: Any = None
        self.retried: collections.Counter[str] = collections.Counter()  # runs again, by the error's name
        self._retried_lock = threading.Lock()  # writer threads count into it

    async def start(self) -> None:
        """Open the writers' and the readers' pools; raises psycopg.Error when the server cannot be
        reached."""
        load_psycopg()
        from psycopg_pool import ConnectionPool
        self._loop = asyncio.get_running_loop()
        self._wpool = ConnectionPool(self.path, min_size=self.WRITERS, max_size=self.WRITERS, open=False,
                                     kwargs={"autocommit": True}, configure=self._configure_writer)
        self._pool = ConnectionPool(self.path, min_size=1, max_size=self.READ_POOL, open=False,
                                    kwargs={"autocommit": True}, configure=self._configure_reader)
        try:
            await asyncio.to_thread(self._wpool.open, True, 10.0)
            await asyncio.to_thread(self._pool.open, True, 10.0)
        except BaseException:
            await asyncio.to_thread(self._wpool.close)
            await asyncio.to_thread(self._pool.close)
            raise
        self._writers = concurrent.futures.ThreadPoolExecutor(self.WRITERS, "aitbc-pg-writer")
        self.open = True

    @staticmethod
    def _configure_writer(raw: Any) -> None:
        _configure_pg(raw)
        claim_counter_stripe(raw)

    @staticmethod
    def _configure_reader(raw: Any) -> None:
        _configure_pg(raw)
        raw.read_only = True
        raw.isolation_level = load_psycopg().IsolationLevel.REPEATABLE_READ

    async def close(self) -> None:
        """Commit what was written before, then close the connections."""
        self.open = False
        await asyncio.to_thread(self._writers.shutdown)  # the units queued run first
        await asyncio.to_thread(self._wpool.close)
        await asyncio.to_thread(self._pool.close)

    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        if not self.open:
            raise Unavailable("database not open")
        started = time.perf_counter()
        try:
            result = await self._loop.run_in_executor(self._writers, self._run, fn, args)
        except DB_ERRORS as exc:  # rolled back: nothing of it is durable, so nothing is acknowledged
            log.error("unit %s failed: %s", fn.__name__, exc)
            raise Unavailable() from None
        if self.commit_observer is not None:
            self.commit_observer(1, time.perf_counter() - started)
        return result

    async def write_alone(self, fn: Callable[..., T], *args: Any) -> T:
        """As `write`: every unit has a transaction of its own here."""
        return await self.write(fn, *args)

    def _run(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        """A writer thread: fn in a transaction of its own, run again (RETRIES runs in all) when it
        deadlocked or failed serialisation. Raises what fn raised (its transaction rolled back),
        psycopg.Error."""
        psycopg = load_psycopg()
        again = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)
        with self._wpool.connection() as raw:
            conn = PgConnection(raw)
            for attempt in range(1, self.RETRIES + 1):
                try:
                    with raw.transaction():
                        return fn(conn, *args)
                except again as exc:
                    with self._retried_lock:
                        self.retried[type(exc).__name__] += 1
                    if attempt == self.RETRIES:
                        raise
                    log.warning("unit %s ran into another's locks (%s): running it again", fn.__name__,
                                str(exc).partition("\n")[0])
        raise AssertionError("unreachable")

    async def wal_checkpoint(self) -> tuple[int, int, int]:
        """Nothing to do: PostgreSQL checkpoints its own WAL."""
        return 0, 0, 0

    @contextlib.asynccontextmanager
    async def cluster_lock(self, key: int) -> AsyncIterator[bool]:
        """Hold the session-level advisory lock `key` for the block, on a connection of its own, when no
        other instance holds it (yields whether it does). A duty that spans many transactions (a
        retention pass) runs on one instance at a time; an instance that dies loses the lock with its
        session. Raises psycopg.Error when the server cannot be reached."""
        raw = await asyncio.to_thread(pg_connect, self.path)
        held = False
        try:
            held = await asyncio.to_thread(
                lambda: bool(raw.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]))
            yield held
        finally:
            if held:  # released now: a session's locks go only once the server has ended it, after close
                with contextlib.suppress(*DB_ERRORS):  # returns (a next pass found it held ~1 time in 20)
                    await asyncio.to_thread(raw.execute, "SELECT pg_advisory_unlock(%s)", (key,))
            await asyncio.to_thread(raw.close)  # the session ends: the lock is released (if still held)

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        if not self.open:
            raise Unavailable("database not open")
        return await asyncio.to_thread(self._read, fn, args, True)

    async def peek(self, fn: Callable[..., T], *args: Any) -> T:
        if not self.open:
            raise Unavailable("database not open")
        return await asyncio.to_thread(self._read, fn, args, False)

    def notify(self, channel: str, payloads: list[str]) -> None:
        """Send NOTIFYs on `channel` (one per payload) from a pooled connection, outside any transaction;
        blocking. Raises psycopg.Error."""
        with self._pool.connection() as raw:
            for payload in payloads:
                raw.execute("SELECT pg_notify(%s, %s)", (channel, payload))

    def _read(self, fn: Callable[..., T], args: tuple[Any, ...], snapshot: bool) -> T:
        with self._pool.connection() as raw:
            if not snapshot:
                return fn(PgConnection(raw), *args)
            with raw.transaction():
                return fn(PgConnection(raw), *args)


# === Data layer ===
# Named SQL, the connection first: helpers take an open transaction and never commit; the units of
# work further down are what Database.write runs.

JOB_VIEW_COLUMNS = ("seq, job_id, client_id, state, constraints, requested_at, expires_at, attempts, "
                    "assigned_miner_id, assigned_at, finished_at, error, pruned_at")


# JSON text. Python will not turn an integer of more than 4,300 digits into an int or back
# (sys.get_int_max_str_digits: the conversion is quadratic), yet a client may send one. Such a number
# is kept as its digits (BigInt): never a number where one is read, so it counts as out of range, and
# written back exactly as it came.


class BigInt:
    """A JSON integer too long for int(): `text` is its digits (and sign) as received."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BigInt) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def __repr__(self) -> str:
        return f"BigInt({self.text[:12]}...: {len(self.text)} characters)"


def int_or_big(text: str) -> int | BigInt:
    """A JSON integer's value: an int, or a BigInt past int()'s digit limit."""
    try:
        return int(text)
    except ValueError:
        return BigInt(text)


STORED_JSON = json.JSONDecoder(parse_int=int_or_big)


def load_json(text: str | bytes) -> Any:
    """Parse JSON text (as stored, or from a file); integers past int()'s digit limit come back as BigInt.
    Raises ValueError for text that is not JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except ValueError:  # an integer past the digit limit: parse again, keeping it as text (rare)
        return STORED_JSON.decode(text if isinstance(text, str) else text.decode("utf-8"))


# Deeper documents parse, but re-encoding them for a miner (one level deeper) can hit Python's
# recursion limit; nothing legitimate nests this far.
MAX_JSON_DEPTH = 64


def nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether a parsed JSON value nests more than `limit` arrays/objects deep (iterative)."""
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        for child in item.values() if isinstance(item, dict) else item:
            if isinstance(child, (dict, list)):  # scalars cannot nest: not worth a stack entry
                stack.append((child, depth + 1))
    return False


def is_utf8_text(text: str) -> bool:
    """Whether `text` encodes as UTF-8: not when it holds a lone surrogate (JSON's "\\ud800" escape
    decodes to one), which SQLite cannot take as a text parameter (UnicodeEncodeError)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def json_text(sort_keys: bool = False, ensure_ascii: bool = True, allow_nan: bool = True,
              separators: tuple[str, str] = (",", ":")) -> Callable[[Any], str]:
    """An encoder to JSON text with fixed options, made once (json.dumps builds a new encoder on every
    call), that also writes BigInt numbers as their digits. It raises TypeError for what JSON cannot
    hold, and ValueError for NaN or Infinity where `allow_nan` is false."""
    encoder = json.JSONEncoder(sort_keys=sort_keys, ensure_ascii=ensure_ascii, allow_nan=allow_nan,
                               separators=separators)
    comma, colon = separators

    def walk(value: Any) -> str:
        if isinstance(value, BigInt):
            return value.text
        if isinstance(value, dict):
            items = sorted(value.items()) if sort_keys else value.items()
            return "{" + comma.join(f"{encoder.encode(k)}{colon}{walk(v)}" for k, v in items) + "}"
        if isinstance(value, (list, tuple)):
            return "[" + comma.join(walk(v) for v in value) + "]"
        return encoder.encode(value)

    def encode(value: Any) -> str:
        try:
            return encoder.encode(value)
        except TypeError:  # a BigInt somewhere, or something JSON cannot hold (raised again by walk)
            return walk(value)

    return encode


canonical_json = json_text(sort_keys=True)  # the stored form of results, and what equality is judged on
compact_json = json_text()


def spliced_json(fields: Mapping[str, Any], stored: Mapping[str, str | None],
                 encode: Callable[[Any], str] = compact_json) -> str:
    """A JSON object of `fields` plus members whose values are JSON text as stored (None: null),
    spliced in as they are: payloads, results and receipts are not decoded only to be re-encoded."""
    members = [encode(fields)[1:-1]] if fields else []
    members += [f'"{name}":{"null" if text is None else text}' for name, text in stored.items()]
    return f"{{{','.join(members)}}}"


def ensure_shape(conn: sqlite3.Connection, constraints_json: str) -> int:
    """The shape id of a canonical constraints object, created if new. (On PostgreSQL two instances may
    create the same new shape at once: the second insert waits for the first, then does nothing and
    reads the first one's row.)"""
    row = conn.execute("SELECT shape_id FROM shapes WHERE constraints = ?", (constraints_json,)).fetchone()
    if row is None:
        row = conn.execute("INSERT INTO shapes (constraints) VALUES (?) ON CONFLICT DO NOTHING RETURNING shape_id",
                           (constraints_json,)).fetchone()
    if row is None:
        row = conn.execute("SELECT shape_id FROM shapes WHERE constraints = ?", (constraints_json,)).fetchone()
    return int(row[0])


def list_shapes_after(conn: sqlite3.Connection, shape_id: int) -> list[sqlite3.Row]:
    return conn.execute("SELECT shape_id, constraints FROM shapes WHERE shape_id > ? ORDER BY shape_id",
                        (shape_id,)).fetchall()


def get_shape(conn: sqlite3.Connection, shape_id: int) -> str:
    """A shape's constraints (JSON text)."""
    return conn.execute("SELECT constraints FROM shapes WHERE shape_id = ?", (shape_id,)).fetchone()[0]


QUEUED_SHAPES_PG = (
    "WITH RECURSIVE queued (shape_id) AS ("
    " (SELECT shape_id FROM jobs WHERE state = 'QUEUED' ORDER BY shape_id LIMIT 1)"
    " UNION ALL SELECT (SELECT jobs.shape_id FROM jobs WHERE jobs.state = 'QUEUED' AND jobs.shape_id > queued.shape_id"
    " ORDER BY jobs.shape_id LIMIT 1) FROM queued WHERE queued.shape_id IS NOT NULL)"
    " SELECT shape_id FROM queued WHERE shape_id IS NOT NULL")


def list_queued_shapes(conn: sqlite3.Connection) -> list[int]:
    """Ids of the shapes that hold QUEUED jobs: one seek of the queue index per shape (a loose index
    scan), not a walk of every queued job. (INDEXED BY: without ANALYZE statistics the planner
    prefers jobs_by_state, which holds no shape order.) On PostgreSQL the same seeks in one statement,
    a recursive query (a round trip is dearer there than a statement)."""
    if isinstance(conn, PgConnection):
        return [row[0] for row in conn.execute(QUEUED_SHAPES_PG)]
    shapes, after = [], -1
    while (row := conn.execute("SELECT shape_id FROM jobs INDEXED BY jobs_queued WHERE state = 'QUEUED'"
                               " AND shape_id > ? ORDER BY shape_id LIMIT 1", (after,)).fetchone()) is not None:
        shapes.append(after := row[0])
    return shapes


INSERT_JOB = ("INSERT INTO jobs (job_id, client_id, state, constraints, shape_id, requested_at, expires_at, value)"
              " VALUES (?, ?, 'QUEUED', ?, ?, ?, ?, ?)")


def insert_job(conn: sqlite3.Connection, job_id: str, client_id: str, payload: str, constraints: str,
               shape_id: int, requested_at: int, expires_at: int, value: str | None = None) -> dict[str, Any]:
    """Queue a job (its payload in job_data); returns its JOB_VIEW_COLUMNS, made from what was inserted
    (RETURNING them costs a fifth of the statement)."""
    params = (job_id, client_id, constraints, shape_id, requested_at, expires_at, value)
    if isinstance(conn, PgConnection):  # both rows in one statement (a round trip less)
        seq = conn.execute(f"WITH job AS ({INSERT_JOB} RETURNING seq) INSERT INTO job_data (seq, payload)"
                           " SELECT seq, ? FROM job RETURNING seq", (*params, payload)).fetchone()[0]
    else:  # lastrowid: RETURNING seq costs SQLite ~17k instructions a job more
        seq = conn.execute(INSERT_JOB, params).lastrowid
        conn.execute("INSERT INTO job_data (seq, payload) VALUES (?, ?)", (seq, payload))
    return {"seq": seq, "job_id": job_id, "client_id": client_id, "state": JobState.QUEUED.value,
            "constraints": constraints, "requested_at": requested_at, "expires_at": expires_at, "attempts": 0,
            "assigned_miner_id": None, "assigned_at": None, "finished_at": None, "error": None, "pruned_at": None}


def list_active_payloads(conn: sqlite3.Connection) -> list[tuple[int, str]]:
    """(seq, payload) of every QUEUED or RUNNING job."""
    return [(r[0], r[1]) for r in conn.execute("SELECT seq, payload FROM jobs JOIN job_data USING (seq)"
                                               " WHERE state IN ('QUEUED', 'RUNNING')")]


def set_payloads(conn: sqlite3.Connection, payloads: Sequence[tuple[str, int]]) -> None:
    """Replace the payloads of these (payload, seq) jobs."""
    conn.executemany("UPDATE job_data SET payload = ? WHERE seq = ?", payloads)


def get_report(conn: sqlite3.Connection, miner_id: str, job_id: str) -> sqlite3.Row:
    """In one statement, what a miner's report on a job needs: `registered` (whether the miner is),
    its `miner_capabilities`, and the job's row as get_job reads it (seq None: no such job)."""
    return conn.execute(
        "SELECT miners.miner_id IS NOT NULL AS registered, miners.capabilities AS miner_capabilities, jobs.*,"
        " job_data.payload, job_data.result, job_data.metrics FROM (SELECT :miner AS id) AS caller"
        " LEFT JOIN miners ON miners.miner_id = caller.id LEFT JOIN jobs ON jobs.job_id = :job"
        " LEFT JOIN job_data ON job_data.seq = jobs.seq", {"miner": miner_id, "job": job_id}).fetchone()


def lock_job(conn: sqlite3.Connection, job_id: str, miner_id: str | None = None) -> None:
    """Lock a job's row until the unit commits, before a unit reads it to decide what to write (a
    result racing another instance's sweep must not complete a job the sweep took back); with
    `miner_id`, the row of the miner reporting on it first (LOCK ORDER). On SQLite the one writer runs
    one unit at a time already: nothing to do."""
    if isinstance(conn, PgConnection):
        if miner_id is not None:
            lock_miners(conn, [miner_id])
        conn.execute("SELECT 1 FROM jobs WHERE job_id = ? FOR UPDATE", (job_id,))


# LOCK ORDER. On PostgreSQL units of work run concurrently, each in a transaction of its own, on the
# writers of every instance (PgDatabase). Units that wait for each other's locks in a cycle deadlock:
# PostgreSQL aborts one after deadlock_timeout (1 s by default) and it runs again. No cycle can form,
# because every unit takes its locks in this one order, and those of one kind in key order:
#   1. an advisory lock a unit waits for before anything else: a new shape's numbering (tx_submit's
#      ensure_shape; a second insert of the same shape waits for it, then finds the first's row),
#      publishing a checkpoint (tx_checkpoint);
#   2. miners' rows, by miner_id (lock_miners; a poll's first statement updates its own miner's row,
#      a registration's inserts or updates it);
#   3. jobs' rows, by seq (lock_job, lock_jobs, lock_sweep_rows; a claim skips what is locked);
#   4. idempotency keys (a submit's own key; a sweep's deletions, its last writes);
#   5. the striped totals and the explorer's addresses: each writer adds to a stripe no other live
#      session adds to (claim_counter_stripe), so no unit ever waits for another on them;
#   6. the receipt log's numbering lock (the log_leaves trigger), last: a result appends its leaf as
#      its last write, and the holder then waits for nothing but its own commit.
# A unit waits only for a lock ranked after every lock it holds (or for a higher key of the kind it
# holds last), so a cycle of waits would need one wait that goes back down the order: there is none.
# What a unit would need to lock out of order it leaves alone: a job due to expire that a claim gave a
# miner while the sweep waited for the job's row waits for the next sweep (its miner's row would come
# after the job's). What a unit inserts has a key nobody
# else holds, save an idempotency key, the only one of its
# kind the unit writes; a lock the unit holds already is never waited for. Retention's units (one pass
# in the cluster at a time) take finished jobs' rows, which other units take one at a time, and want
# nothing those hold; sweep_state is written only under a lock tried, never waited for (SWEEP_LOCK).
# On SQLite the one writer runs one unit at a time, and every lock_* below does
# nothing.


def lock_miners(conn: sqlite3.Connection, miner_ids: Iterable[str]) -> None:
    """PostgreSQL: lock these miners' rows (those that exist) until the unit commits, in id order
    (LOCK ORDER). Nothing on SQLite."""
    if not isinstance(conn, PgConnection) or not (miner_ids := sorted(set(miner_ids))):
        return
    if len(miner_ids) == 1:  # a result's or a heartbeat's: the key's own plan (a JSON array costs 0.1 ms more)
        conn.execute("SELECT 1 FROM miners WHERE miner_id = ? FOR NO KEY UPDATE", miner_ids)
    else:
        conn.execute("SELECT 1 FROM miners WHERE miner_id IN (SELECT value FROM json_each(?)) ORDER BY miner_id"
                     " FOR NO KEY UPDATE", (json.dumps(miner_ids),))


def lock_jobs_where(conn: sqlite3.Connection, where: str, params: Mapping[str, Any]) -> None:
    """PostgreSQL: lock the jobs matching `where` (SQL over jobs' columns, `params` its :names) in seq
    order (LOCK ORDER: their miners' rows are locked already), before a statement changes them.
    Nothing on SQLite."""
    if isinstance(conn, PgConnection):
        conn.execute(f"SELECT 1 FROM jobs WHERE {where} ORDER BY seq FOR UPDATE", params)


def lock_jobs(conn: sqlite3.Connection, seqs: Iterable[int]) -> None:
    """PostgreSQL: lock these jobs' rows, as lock_jobs_where. Nothing on SQLite."""
    if isinstance(conn, PgConnection) and (seqs := sorted(set(seqs))):
        lock_jobs_where(conn, "seq IN (SELECT CAST(value AS INTEGER) FROM json_each(:seqs))", {"seqs": json.dumps(seqs)})


def lock_sweep_rows(conn: sqlite3.Connection, now: int, silent_holders: Sequence[str],
                    miner_ids: Iterable[str], judged: Iterable[str] = ()) -> list[int] | None:
    """PostgreSQL: lock, before a sweep writes anything, the rows it may write, in LOCK ORDER: the
    miners named, those holding RUNNING jobs due at `now`, and `silent_holders`; then the active jobs
    due at `now` and the RUNNING jobs of `silent_holders` and of the miners whose heartbeats it judges
    (`judged`, among those named: release_unreceived may put them back). (A unit waiting for a row the sweep holds then holds no row the sweep still
    needs.) Returns the seqs of the due jobs to expire, for expire_due_jobs: a due job whose holder was
    not locked first (a claim committed while the sweep waited for the job's row) is left to the next
    sweep, as its miner's row cannot be locked now without breaking the order. None on SQLite, where
    it does nothing."""
    if not isinstance(conn, PgConnection):
        return None
    due = [r[0] for r in conn.execute("SELECT DISTINCT assigned_miner_id FROM jobs WHERE state = 'RUNNING'"
                                      " AND expires_at <= ?", (now,))]
    locked = {*miner_ids, *silent_holders, *due}
    lock_miners(conn, locked)
    rows = conn.execute("SELECT seq, client_id, assigned_miner_id, state IN ('QUEUED', 'RUNNING') AND expires_at <= :now"
                        " FROM jobs WHERE (state IN ('QUEUED', 'RUNNING') AND expires_at <= :now)"
                        " OR (state = 'RUNNING' AND assigned_miner_id IN (SELECT value FROM json_each(:held)))"
                        " ORDER BY seq FOR UPDATE",
                        {"now": now, "held": json.dumps([*silent_holders, *judged])}).fetchall()
    return [r[0] for r in rows if r[3] and (r[2] is None or r[2] in locked)]


def get_job(conn: sqlite3.Connection, job_id: str) -> sqlite3.Row | None:
    """A job's row with its payload, result and metrics (None once pruned)."""
    return conn.execute("SELECT jobs.*, job_data.payload, job_data.result, job_data.metrics FROM jobs"
                        " LEFT JOIN job_data USING (seq) WHERE job_id = ?", (job_id,)).fetchone()


def list_jobs(conn: sqlite3.Connection, client_id: str | None, state: str | None,
              limit: int, offset: int, before: int | None = None) -> list[sqlite3.Row]:
    """Jobs newest first, optionally of one client and/or one state; `before` is a keyset cursor
    (only jobs with a lower seq)."""
    where, params = [], []
    for column, value in (("client_id = ?", client_id), ("state = ?", state), ("seq < ?", before)):
        if value is not None:
            where.append(column)
            params.append(value)
    sql = (f"SELECT {JOB_VIEW_COLUMNS} FROM jobs {'WHERE ' + ' AND '.join(where) if where else ''}"
           " ORDER BY seq DESC LIMIT ? OFFSET ?")
    return conn.execute(sql, (*params, limit, offset)).fetchall()


def oldest_queued_in_shape(conn: sqlite3.Connection, shape_id: int, now: int, price: float | None = None,
                           vram_gb: float | None = None, lock: bool = False) -> int | None:
    """The oldest live QUEUED job of a shape; with `price` (`vram_gb`), only among jobs whose own
    max_price (min_vram_gb) a miner of that price (memory) meets: a shape spans a range of them.
    `lock` (a claim): on PostgreSQL the row is locked, and rows other instances' claims hold locked
    are skipped (FOR UPDATE SKIP LOCKED), so concurrent claims take different jobs, none empty-handed."""
    locking = " /*FOR UPDATE SKIP LOCKED*/" if lock else ""
    if price is None and vram_gb is None:
        row = conn.execute("SELECT seq FROM jobs WHERE state = 'QUEUED' AND shape_id = ? AND expires_at > ?"
                           " ORDER BY seq LIMIT 1" + locking, (shape_id, now)).fetchone()
    else:
        row = conn.execute(
            "SELECT seq FROM jobs WHERE state = 'QUEUED' AND shape_id = :shape AND expires_at > :now"
            " AND (CAST(:price AS DOUBLE PRECISION) IS NULL OR json_extract(constraints, '$.max_price') >= :price)"
            " AND (CAST(:vram AS DOUBLE PRECISION) IS NULL OR json_extract(constraints, '$.min_vram_gb') <= :vram)"
            " ORDER BY seq LIMIT 1" + locking,
            {"shape": shape_id, "now": now, "price": price, "vram": vram_gb}).fetchone()
    return None if row is None else int(row[0])


def get_queued_job(conn: sqlite3.Connection, job_id: str, now: int, lock: bool = False) -> sqlite3.Row | None:
    """seq and constraints of a job if it is live and QUEUED, else None; `lock` as in oldest_queued_in_shape
    (a row another instance's claim holds is not QUEUED for this one)."""
    return conn.execute("SELECT seq, constraints FROM jobs WHERE job_id = ? AND state = 'QUEUED' AND expires_at > ?"
                        + (" /*FOR UPDATE SKIP LOCKED*/" if lock else ""), (job_id, now)).fetchone()


def list_queue_heads(conn: sqlite3.Connection, now: int) -> list[QueuedJob]:
    """(job_id, constraints, shape_id) of the oldest live QUEUED job of each shape that has one."""
    heads = []
    for shape_id in list_queued_shapes(conn):
        row = conn.execute("SELECT job_id, constraints FROM jobs WHERE state = 'QUEUED' AND shape_id = ?"
                           " AND expires_at > ? ORDER BY seq LIMIT 1", (shape_id, now)).fetchone()
        if row is not None:
            heads.append((row[0], row[1], shape_id))
    return heads


def get_constraints_of(conn: sqlite3.Connection, job_ids: Sequence[str]) -> dict[str, str]:
    """The stored constraints of those of `job_ids` that exist."""
    marks = ",".join("?" * len(job_ids))
    return {r[0]: r[1] for r in conn.execute(f"SELECT job_id, constraints FROM jobs WHERE job_id IN ({marks})",
                                             job_ids)} if job_ids else {}


def list_queued_among(conn: sqlite3.Connection, job_ids: Sequence[str]) -> set[str]:
    """Which of `job_ids` are QUEUED."""
    if not job_ids:
        return set()
    marks = ",".join("?" * len(job_ids))
    return {r[0] for r in conn.execute(f"SELECT job_id FROM jobs WHERE job_id IN ({marks}) AND state = 'QUEUED'",
                                       job_ids)}


def assign_job(conn: sqlite3.Connection, seq: int, miner_id: str, now: int) -> sqlite3.Row | None:
    """Claim one QUEUED job for a miner; None if it is no longer QUEUED."""
    return conn.execute(
        "UPDATE jobs SET state = 'RUNNING', assigned_miner_id = ?, assigned_at = ?, attempts = attempts + 1"
        " WHERE seq = ? AND state = 'QUEUED' RETURNING job_id,"
        " (SELECT payload FROM job_data WHERE job_data.seq = jobs.seq) AS payload, constraints, attempts, expires_at",
        (miner_id, now, seq)).fetchone()


def count_running(conn: sqlite3.Connection, miner_id: str) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM jobs WHERE state = 'RUNNING' AND assigned_miner_id = ?",
                            (miner_id,)).fetchone()[0])


def list_running_miners(conn: sqlite3.Connection) -> list[str]:
    """Every miner that holds a RUNNING job (a walk of the running index)."""
    return [r[0] for r in conn.execute("SELECT DISTINCT assigned_miner_id FROM jobs WHERE state = 'RUNNING'")]


def count_running_by_miner(conn: sqlite3.Connection) -> dict[str, int]:
    rows = conn.execute("SELECT assigned_miner_id, COUNT(*) FROM jobs WHERE state = 'RUNNING'"
                        " GROUP BY assigned_miner_id").fetchall()
    return {r[0]: r[1] for r in rows}


def finish_job(conn: sqlite3.Connection, seq: int, state: str, now: int, error: str | None = None,
               result: str | None = None, metrics: str | None = None) -> None:
    """Move an active job to a terminal state, with the result and metrics given (None: as they are).
    (No RETURNING: the row is rarely wanted, and returning 13 columns costs a third of the statement.)
    On PostgreSQL both rows in one statement (a round trip less)."""
    if isinstance(conn, PgConnection) and (result is not None or metrics is not None):
        conn.execute("WITH job AS (UPDATE jobs SET state = ?, finished_at = ?, error = ? WHERE seq = ?)"
                     " UPDATE job_data SET result = COALESCE(?, result), metrics = COALESCE(?, metrics) WHERE seq = ?",
                     (state, now, error, seq, result, metrics, seq))
        return
    conn.execute("UPDATE jobs SET state = ?, finished_at = ?, error = ? WHERE seq = ?", (state, now, error, seq))
    if result is not None or metrics is not None:
        conn.execute("UPDATE job_data SET result = COALESCE(?, result), metrics = COALESCE(?, metrics) WHERE seq = ?",
                     (result, metrics, seq))


def requeue_job(conn: sqlite3.Connection, job_id: str, holder: str, *, count_attempt: bool) -> sqlite3.Row | None:
    """Put the RUNNING job that `holder` holds back in the queue; None when it holds no such job.

    A miner that gave the job up has used an attempt (`count_attempt`); a claim that never reached
    its miner is undone as if it had not happened, its attempt given back.
    """
    return conn.execute(
        "UPDATE jobs SET state = 'QUEUED', assigned_miner_id = NULL, assigned_at = NULL,"
        " attempts = attempts - :undo WHERE job_id = :job AND state = 'RUNNING' AND assigned_miner_id = :holder"
        " RETURNING job_id, state, constraints, shape_id",
        {"undo": 0 if count_attempt else 1, "job": job_id, "holder": holder}).fetchone()


def release_running(conn: sqlite3.Connection, where: str, params: Mapping[str, Any], max_attempts: int,
                    now: int, reason: str) -> list[sqlite3.Row]:
    """Re-queue RUNNING jobs matching `where`, or fail those that used up their attempts.

    The failure error is 'miner <id> <reason>'.
    """
    return conn.execute(
        "UPDATE jobs SET"
        " state = CASE WHEN attempts >= :max THEN 'FAILED' ELSE 'QUEUED' END,"
        " error = CASE WHEN attempts >= :max THEN 'miner ' || assigned_miner_id || :reason END,"
        " finished_at = CASE WHEN attempts >= :max THEN :now END,"
        " assigned_miner_id = CASE WHEN attempts >= :max THEN assigned_miner_id END,"
        " assigned_at = CASE WHEN attempts >= :max THEN assigned_at END"
        f" WHERE state = 'RUNNING' AND {where} RETURNING job_id, state, constraints, shape_id",
        {"max": max_attempts, "now": now, "reason": " " + reason, **params}).fetchall()


def expire_due_jobs(conn: sqlite3.Connection, now: int, seqs: Sequence[int] | None = None) -> list[sqlite3.Row]:
    """Expire every active job at or past its deadline (of `seqs` only, when given: those
    lock_sweep_rows locked); returns the miners whose slots were freed."""
    if seqs is not None:
        return conn.execute(
            "UPDATE jobs SET state = 'EXPIRED', error = 'job expired', finished_at = ?"
            " WHERE seq IN (SELECT CAST(value AS INTEGER) FROM json_each(?))"
            " AND state IN ('QUEUED', 'RUNNING') AND expires_at <= ? RETURNING assigned_miner_id",
            (now, json.dumps(list(seqs)), now)).fetchall()
    return conn.execute(
        "UPDATE jobs SET state = 'EXPIRED', error = 'job expired', finished_at = ?"
        " WHERE state IN ('QUEUED', 'RUNNING') AND expires_at <= ? RETURNING assigned_miner_id",
        (now, now)).fetchall()


def get_idempotency(conn: sqlite3.Connection, client_id: str, key: str, since: int) -> sqlite3.Row | None:
    return conn.execute("SELECT request_hash, job_id FROM idempotency_keys"
                        " WHERE client_id = ? AND key = ? AND created_at >= ?", (client_id, key, since)).fetchone()


def put_idempotency(conn: sqlite3.Connection, client_id: str, key: str, request_hash: str,
                    job_id: str, now: int) -> None:
    conn.execute(
        "INSERT INTO idempotency_keys (client_id, key, request_hash, job_id, created_at) VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT (client_id, key) DO UPDATE SET request_hash = excluded.request_hash,"
        " job_id = excluded.job_id, created_at = excluded.created_at",
        (client_id, key, request_hash, job_id, now))


def delete_idempotency_before(conn: sqlite3.Connection, cutoff: int) -> None:
    conn.execute("DELETE FROM idempotency_keys WHERE created_at < ?", (cutoff,))


def get_miner(conn: sqlite3.Connection, miner_id: str) -> sqlite3.Row | None:
    return conn.execute("SELECT * FROM miners WHERE miner_id = ?", (miner_id,)).fetchone()


def upsert_miner(conn: sqlite3.Connection, miner_id: str, capabilities: dict[str, Any], concurrency: int,
                 region: str | None, token: str, now: int) -> None:
    """Create or replace a registration; the miner's history (counters, offer id) survives re-registration."""
    price = amount(capabilities.get("price")) or 0
    units = int(price)  # the price as whole units and millionths, for exact totals of open offers
    micro = round((price - units) * 1_000_000)
    sla = first_of(str, capabilities.get("sla")) or ""
    conn.execute(
        "INSERT INTO miners (miner_id, offer_id, capabilities, price, price_units, price_micro, sla, concurrency,"
        " region, status, session_token, created_at, registered_at, last_seen)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'ONLINE', ?, ?, ?, ?)"
        " ON CONFLICT (miner_id) DO UPDATE SET capabilities = excluded.capabilities, price = excluded.price,"
        " price_units = excluded.price_units, price_micro = excluded.price_micro,"
        " sla = excluded.sla, concurrency = excluded.concurrency, region = excluded.region, status = 'ONLINE', online = 1,"
        " reported_inflight = NULL, metadata = NULL, short_since = NULL, known_through = NULL,"
        " session_token = excluded.session_token,"
        " registered_at = excluded.registered_at, last_seen = excluded.last_seen",
        (miner_id, secrets.token_hex(16), compact_json(capabilities), price, units, micro, sla, concurrency, region,
         token, now, now, now))


def touch_miner(conn: sqlite3.Connection, miner_id: str, now: int) -> sqlite3.Row | None:
    """Mark a miner alive; what MinerProfile needs of its row and its RUNNING jobs (`running`), or None
    when it is not registered. (On PostgreSQL `running` is counted by a statement of its own, after the
    row lock the update took: a statement sees the database as it was when it began, and a poll of the
    same miner on another instance may have committed a claim while this update waited for its lock.)"""
    if isinstance(conn, PgConnection):
        if conn.execute("UPDATE miners SET last_seen = MAX(last_seen, ?) WHERE miner_id = ? RETURNING 1",
                        (now, miner_id)).fetchone() is None:
            return None
        return get_profile(conn, miner_id)
    return conn.execute("UPDATE miners SET last_seen = MAX(last_seen, ?) WHERE miner_id = ?"
                        f" RETURNING {PROFILE_COLUMNS}, (SELECT COUNT(*) FROM jobs WHERE state = 'RUNNING'"
                        " AND assigned_miner_id = miners.miner_id) AS running", (now, miner_id)).fetchone()


def touch_miners(conn: sqlite3.Connection, seen: Mapping[str, int], beats: Mapping[str, Beat]) -> None:
    """Record when each miner was last heard from and last heartbeated (wall-clock ms), never moving
    either back."""
    lock_miners(conn, [*seen, *beats])  # in id order, before any is written (LOCK ORDER)
    conn.executemany("UPDATE miners SET last_seen = MAX(last_seen, ?) WHERE miner_id = ?",
                     [(at, miner_id) for miner_id, at in seen.items()])
    conn.executemany("UPDATE miners SET last_heartbeat = MAX(COALESCE(last_heartbeat, 0), ?) WHERE miner_id = ?",
                     [(at, miner_id) for miner_id, (at, _) in beats.items()])


def list_inflight_evidence(conn: sqlite3.Connection, miner_ids: Sequence[str]) -> list[sqlite3.Row]:
    """What a heartbeat of these miners is judged by (judge_inflight): a row per RUNNING job of each
    (seq, job_id, assigned_at) with its miner's last_heartbeat, short_since and known_through. A miner
    that holds none has nothing to judge and no row. The ids drive the join (CROSS JOIN fixes SQLite's
    order, INDEXED BY its index): a probe of the running index each, and the miner's row read only for
    those that hold jobs. (At 10,000 miners and 5,000 running jobs, 0.9 us a miner that holds none;
    SQLite's own choice walked every RUNNING job, 29 us a miner, or read every miner's row, 3.4 us.)"""
    return conn.execute(
        "SELECT jobs.assigned_miner_id AS miner_id, jobs.seq, jobs.job_id, jobs.assigned_at, miners.last_heartbeat,"
        " miners.short_since, miners.known_through FROM json_each(?) AS ids CROSS JOIN jobs INDEXED BY jobs_running"
        " CROSS JOIN miners WHERE jobs.assigned_miner_id = ids.value AND jobs.state = 'RUNNING'"
        " AND miners.miner_id = jobs.assigned_miner_id", (json.dumps(list(miner_ids)),)).fetchall()


def set_inflight_marks(conn: sqlite3.Connection, marks: Iterable[tuple[int | None, int | None, str]]) -> None:
    """Store (short_since, known_through, miner_id) of each miner judge_inflight changed them for."""
    conn.executemany("UPDATE miners SET short_since = ?, known_through = ? WHERE miner_id = ?", list(marks))


def touch_heard(conn: sqlite3.Connection, heard: Mapping[str, int]) -> None:
    """PostgreSQL: record when an instance heard from each miner, on the database server's clock (ms;
    Coordinator.db_time), never moving it back."""
    conn.executemany("UPDATE miners SET heard_at = MAX(heard_at, ?) WHERE miner_id = ?",
                     [(at, miner_id) for miner_id, at in heard.items()])


def tx_record_heard(conn: sqlite3.Connection, heard: Mapping[str, int], cutoff: int, slots: Iterable[str] = ()) -> Outcome:
    """PostgreSQL, an instance's part of a tick: record when it heard from these miners (touch_heard),
    mark those among them heard since `cutoff` (not silent) that were found silent online again, and
    bring the offers of those and of the miners whose slots changed here (`slots`) up to date."""
    slots = list(slots)
    lock_miners(conn, [*heard, *slots])  # in id order, before any is written (LOCK ORDER)
    touch_heard(conn, heard)
    alive = [miner_id for miner_id, at in heard.items() if at >= cutoff]
    back = [r[0] for r in conn.execute("UPDATE miners SET online = 1 WHERE online = 0 AND miner_id IN"
                                       " (SELECT value FROM json_each(?)) RETURNING miner_id", (json.dumps(alive),))]
    refresh_offers(conn, {*back, *slots})
    return Outcome(len(back))


def get_profile(conn: sqlite3.Connection, miner_id: str) -> sqlite3.Row | None:
    """What MinerProfile needs of a miner's row and its RUNNING jobs (`running`), in one statement, or
    None when it is not registered."""
    return conn.execute(f"SELECT {PROFILE_COLUMNS}, (SELECT COUNT(*) FROM jobs WHERE state = 'RUNNING'"
                        " AND assigned_miner_id = miners.miner_id) AS running FROM miners WHERE miner_id = ?",
                        (miner_id,)).fetchone()


def update_heartbeat(conn: sqlite3.Connection, miner_id: str, inflight: int | None, status: str,
                     metadata: str | None, now: int) -> sqlite3.Row | None:
    return conn.execute(
        "UPDATE miners SET reported_inflight = ?, status = ?, metadata = COALESCE(?, metadata),"
        " last_heartbeat = ?, last_seen = MAX(last_seen, ?), online = 1 WHERE miner_id = ? RETURNING miner_id",
        (inflight, status, metadata, now, now, miner_id)).fetchone()


def add_miner_outcome(conn: sqlite3.Connection, miner_id: str, now: int, completed: int, failed: int, busy_ms: int,
                      receipt_id: str | None = None) -> None:
    """Count a finished job (and its receipt) on the miner that ran it; the report also marks it alive."""
    conn.execute("UPDATE miners SET last_seen = MAX(last_seen, ?), jobs_completed = jobs_completed + ?,"
                 " jobs_failed = jobs_failed + ?, busy_ms_total = busy_ms_total + ?,"
                 " last_receipt_id = COALESCE(?, last_receipt_id) WHERE miner_id = ?",
                 (now, completed, failed, busy_ms, receipt_id, miner_id))


def list_miners(conn: sqlite3.Connection, limit: int = 1 << 62, offset: int = 0,
                after: tuple[int, str] | None = None) -> list[sqlite3.Row]:
    """Miners in registration order (first registration, then id: a key that never moves); `after` is
    a keyset cursor (created_at, miner_id)."""
    where = "WHERE (created_at, miner_id) > (?, ?)" if after is not None else ""
    return conn.execute(f"SELECT * FROM miners {where} ORDER BY created_at, miner_id LIMIT ? OFFSET ?",
                        (*(after or ()), limit, offset)).fetchall()


def list_miner_ids(conn: sqlite3.Connection, online_only: bool = False) -> list[str]:
    """Every miner's id (only those the last sweep judged alive with `online_only`); read at start-up."""
    return [r[0] for r in conn.execute(f"SELECT miner_id FROM miners {'WHERE online = 1' if online_only else ''}")]


def mark_miners_online(conn: sqlite3.Connection, miner_ids: Iterable[str], online: bool) -> list[str]:
    """Record the sweep's judgement of these miners' liveness; the ones whose flag changed."""
    changed = []
    for miner_id in miner_ids:
        if conn.execute("UPDATE miners SET online = ? WHERE miner_id = ? AND online <> ? RETURNING miner_id",
                        (int(online), miner_id, int(online))).fetchone() is not None:
            changed.append(miner_id)
    return changed


# A miner's offer status (SPEC section 10) from its liveness, reported status and RUNNING jobs.
OFFER_STATUS_SQL = ("CASE WHEN online = 0 OR upper(status) IN ('DRAINING', 'OFFLINE') THEN 'closed'"
                    " WHEN (SELECT COUNT(*) FROM jobs WHERE state = 'RUNNING' AND assigned_miner_id = miners.miner_id)"
                    " >= concurrency THEN 'reserved' ELSE 'open' END")


def refresh_offers(conn: sqlite3.Connection, miner_ids: Iterable[str]) -> None:
    """Set these miners' offer status from what decides it, writing only those that change (the
    fleet_totals triggers follow)."""
    miner_ids = list(miner_ids)
    if not miner_ids:
        return
    conn.execute(f"UPDATE miners SET offer_status = {OFFER_STATUS_SQL} WHERE miner_id IN"
                 f" (SELECT value FROM json_each(?)) AND offer_status <> {OFFER_STATUS_SQL}", (json.dumps(miner_ids),))


def get_fleet_totals(conn: sqlite3.Connection) -> sqlite3.Row:
    """The fleet totals: offers and open offers, open capacity and price, online miners. (Summed over the
    rows a key is spread over on PostgreSQL, so that writers need not wait on one row; one on SQLite.)"""
    return conn.execute("SELECT SUM(offers) AS offers, SUM(open_offers) AS open_offers, SUM(open_capacity)"
                        " AS open_capacity, SUM(open_price_units) AS open_price_units, SUM(open_price_micro)"
                        " AS open_price_micro, SUM(online_miners) AS online_miners FROM fleet_totals").fetchone()


# How a receipt's JSON text is stored: deflated (RFC 1951, raw: no zlib header or checksum) against a
# preset dictionary, after one byte naming it. The dictionary is the text every receipt this
# coordinator signs shares (its keys and fixed values), then the row's own job_id and receipt_id
# as the receipt spells them: the columns hold the ids, so the body only refers back to them. A
# ~740-byte 1.1 receipt takes ~280 bytes, nearly all of them its digests and signature, which no
# dictionary can predict. Inflating gives back the signed text byte for byte (what is served,
# archived and hashed into the receipt log). A dictionary in use never changes, as rows were
# written against it: a better one is added under the next number.
RECEIPT_DICTIONARIES: dict[int, bytes] = {
    # a 1.1 receipt's template, the most common text last (nearest, so the cheapest to refer to)
    1: b'{"attestations":[{"alg":"Ed25519","key_id":"","sig":""}],"signature":{"alg":"Ed25519","key_id":"","sig":""}}'
       b'{"client":"client-","completed_at":1700000000,"coordinator_id":"aitbc-coordinator","job_id":"",'
       b'"metadata":{"job_constraints":{},"job_payload_sha256":"","metrics":{"units":0},"result_sha256":""},'
       b'"price":0.0,"provider":"","receipt_id":"","started_at":1700000000,"status":"COMPLETED","unit_price":0.0,'
       b'"unit_type":"gpu_seconds","units":0,"version":"1.1","signature":{"alg":"Ed25519","key_id":"","sig":""}}',
}
RECEIPT_PACKING = 1  # the dictionary new rows are written with


class StoredReceiptError(InternalError):
    """A stored receipt names no known dictionary or does not inflate: its row was changed behind the
    coordinator's back. (500: the database needs restoring from a backup, not the request changing.)"""


def receipt_dictionary(packing: int, receipt_id: str, job_id: str) -> bytes:
    """The preset dictionary of a receipt stored with `packing`, for the row with these ids."""
    return RECEIPT_DICTIONARIES[packing] + f'"job_id":"{job_id}","receipt_id":"{receipt_id}"'.encode("utf-8")


def pack_receipt(text: str, receipt_id: str, job_id: str) -> bytes:
    """A receipt's JSON text as stored in the row with these ids: the dictionary's number, then the
    raw deflate stream. A 4 KB window (more than the dictionary and an attested receipt) and small
    hash tables: setting up a stream costs in proportion to them, and this runs on every completion."""
    deflate = zlib.compressobj(3, zlib.DEFLATED, -12, 4, zlib.Z_DEFAULT_STRATEGY,
                               receipt_dictionary(RECEIPT_PACKING, receipt_id, job_id))
    return bytes((RECEIPT_PACKING,)) + deflate.compress(text.encode("utf-8")) + deflate.flush()


def unpack_receipt(stored: bytes | str | None, receipt_id: str, job_id: str) -> str:
    """The JSON text of the receipt stored in the row with these ids, byte for byte as signed; raises
    StoredReceiptError. (A str is a body from before schema version 5, met only by the upgrade steps
    that convert it.)"""
    if isinstance(stored, str):
        return stored
    if not stored or stored[0] not in RECEIPT_DICTIONARIES:  # (None: a row whose body was lost)
        raise StoredReceiptError(f"receipt {receipt_id}: unknown packing {(stored or b'')[:1].hex() or '(empty)'}")
    inflate = zlib.decompressobj(-15, zdict=receipt_dictionary(stored[0], receipt_id, job_id))
    try:
        text = inflate.decompress(stored[1:]) + inflate.flush()
    except zlib.error as exc:
        raise StoredReceiptError(f"receipt {receipt_id} does not inflate: {exc}") from None
    if not inflate.eof:
        raise StoredReceiptError(f"receipt {receipt_id} is cut short")
    if inflate.unused_data:
        raise StoredReceiptError(f"receipt {receipt_id} has bytes after its end")
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError:
        raise StoredReceiptError(f"receipt {receipt_id} does not inflate to UTF-8 text") from None


def insert_receipt(conn: sqlite3.Connection, receipt: dict[str, Any], client_id: str, issued_at: int,
                   text: str | None = None) -> str:
    """Store a sealed receipt (as `text` when its JSON text is at hand) and move its price, if any, from
    the client's balance to the provider's (in millionths, as the explorer's addresses keep them);
    returns the JSON text stored. Expects an open transaction."""
    body = text or compact_json(receipt)
    price = receipt.get("price")
    conn.execute("INSERT INTO receipts (receipt_id, job_id, issued_at, price, body) VALUES (?, ?, ?, ?, ?)",
                 (receipt["receipt_id"], receipt["job_id"], issued_at, price,
                  pack_receipt(body, receipt["receipt_id"], receipt["job_id"])))
    if price is not None and isinstance(conn, PgConnection):  # each row in this writer's stripe (schema_pg.sql)
        conn.execute("SELECT addresses_add(?, 0, CAST(ROUND(? * 1000000) AS INTEGER), 0),"
                     " addresses_add(?, 0, -CAST(ROUND(? * 1000000) AS INTEGER), 0)",
                     (receipt["provider"], price, client_id, price))
    elif price is not None:  # two statements, not a trigger: a trigger costs its sub-program on every firing
        for address, sign in ((receipt["provider"], 1), (client_id, -1)):
            conn.execute("UPDATE addresses SET balance_micro = balance_micro + ? * CAST(ROUND(? * 1000000)"
                         " AS INTEGER) WHERE address = ?", (sign, price, address))
    return body


def get_latest_receipt(conn: sqlite3.Connection, job_id: str) -> str | None:
    """The job's latest receipt (JSON text), or None."""
    row = conn.execute("SELECT receipt_id, body FROM receipts WHERE job_id = ? ORDER BY seq DESC LIMIT 1",
                       (job_id,)).fetchone()
    return None if row is None else unpack_receipt(row["body"], row["receipt_id"], job_id)


def get_job_owner(conn: sqlite3.Connection, job_id: str) -> str | None:
    """The client a job is of: its summary's, or once retention deleted the summary, the `client` its
    latest kept receipt names; None without either."""
    if (row := conn.execute("SELECT client_id FROM jobs WHERE job_id = ?", (job_id,)).fetchone()) is not None:
        return str(row[0])
    receipt = get_latest_receipt(conn, job_id)
    client = None if receipt is None else load_json(receipt).get("client")
    return client if isinstance(client, str) else None


def list_receipts_for_job(conn: sqlite3.Connection, job_id: str, after_seq: int, limit: int,
                          offset: int = 0) -> list[sqlite3.Row]:
    """A job's receipts (seq, receipt_id, body as stored: unpack_receipt) oldest first, after the cursor
    `after_seq`, skipping `offset`."""
    return conn.execute("SELECT seq, receipt_id, body FROM receipts WHERE job_id = ? AND seq > ? ORDER BY seq"
                        " LIMIT ? OFFSET ?", (job_id, after_seq, limit, offset)).fetchall()


def add_signing_keys(conn: sqlite3.Connection, keys: Sequence[tuple[str, str]], now: int) -> None:
    conn.executemany("INSERT INTO signing_keys (key_id, role, first_seen_at) VALUES (?, ?, ?)"
                     " ON CONFLICT (key_id) DO NOTHING", [(k, role, now) for k, role in keys])


def list_signing_keys(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    return conn.execute("SELECT key_id, role FROM signing_keys ORDER BY first_seen_at, key_id").fetchall()


def get_counter(conn: sqlite3.Connection, name: str) -> int:
    """A kept total by name, 0 if it has none (summed as get_fleet_totals sums)."""
    return int(conn.execute("SELECT COALESCE(SUM(n), 0) FROM counters WHERE name = ?", (name,)).fetchone()[0])


# The receipt log. Leaves and the hashes of complete subtrees are only ever added; checkpoints are
# pruned by age. A node is (level, idx): level 0 is a leaf (log_leaves), higher ones are in log_nodes.

def insert_log_leaf(conn: sqlite3.Connection, receipt_id: str, leaf_hash: bytes) -> tuple[int, bytes | None]:
    """Append a leaf one past the last, so indexes have no gap; returns its index and, on PostgreSQL,
    the hash of the leaf before it (b"" when there is none, or when it was committed while this insert
    waited for its turn: the statement does not see it). (SQLite numbers an INTEGER PRIMARY KEY left
    out one more than the largest, or 1 in an empty table: the log's very first leaf is moved to 0. A
    plain insert costs half of one that asks for MAX() itself. The one writer does not read the leaf
    before: None.) On PostgreSQL, where instances append concurrently and a rolled-back identity would
    leave a gap, a trigger numbers the leaf under a transaction-level advisory lock held until the unit
    commits: appends take turns across instances."""
    if isinstance(conn, PgConnection):  # numbered by schema_pg.sql's log_leaves_number
        index, before = conn.execute(
            "INSERT INTO log_leaves (receipt_id, leaf_hash) VALUES (?, ?) RETURNING leaf_index, (SELECT"
            " before.leaf_hash FROM log_leaves AS before WHERE before.leaf_index = log_leaves.leaf_index - 1)",
            (receipt_id, leaf_hash)).fetchone()
        return int(index), bytes(before or b"")
    index = int(conn.execute("INSERT INTO log_leaves (receipt_id, leaf_hash) VALUES (?, ?)",
                             (receipt_id, leaf_hash)).lastrowid)
    if index == 1 and conn.execute("SELECT 1 FROM log_leaves WHERE leaf_index = 0").fetchone() is None:
        conn.execute("UPDATE log_leaves SET leaf_index = 0 WHERE leaf_index = 1")
        index = 0
    return index, None


def _node_id(level: int, idx: int) -> int:
    """The log_nodes key of the subtree (level, idx): its in-order position."""
    return (idx << (level + 1)) | ((1 << level) - 1)


def insert_log_nodes(conn: sqlite3.Connection, nodes: Iterable[tuple[int, int, bytes]]) -> None:
    """Store (level, idx, hash) of complete subtrees above the leaves (level >= 1)."""
    conn.executemany("INSERT INTO log_nodes (node_id, hash) VALUES (?, ?)",
                     [(_node_id(level, idx), digest) for level, idx, digest in nodes])


def get_log_nodes(conn: sqlite3.Connection, keys: Collection[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
    """The stored hashes of the nodes (level, idx) `keys` names, one row each (a node not stored is absent)."""
    found: dict[tuple[int, int], bytes] = {}
    leaves = [idx for level, idx in keys if level == 0]
    inner = {_node_id(*key): key for key in keys if key[0] > 0}
    if leaves:
        rows = conn.execute(f"SELECT leaf_index, leaf_hash FROM log_leaves WHERE leaf_index IN"
                            f" ({','.join('?' * len(leaves))})", leaves)
        found.update(((0, index), digest) for index, digest in rows)
    if inner:
        rows = conn.execute(f"SELECT node_id, hash FROM log_nodes WHERE node_id IN ({','.join('?' * len(inner))})",
                            list(inner))
        found.update((inner[node_id], digest) for node_id, digest in rows)
    return found


def get_stored_log_nodes(conn: sqlite3.Connection, keys: Sequence[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
    """get_log_nodes, all of `keys` (distinct); raises LogDamaged naming one the log lacks."""
    found = get_log_nodes(conn, keys)
    if len(found) < len(keys):
        missing = next(key for key in keys if key not in found)
        raise LogDamaged(f"subtree {missing} (level, index) is missing: rows were deleted")
    return found


def get_log_size(conn: sqlite3.Connection) -> int:
    """The number of leaves."""
    return int(conn.execute("SELECT COALESCE(MAX(leaf_index) + 1, 0) FROM log_leaves").fetchone()[0])


def get_log_leaf(conn: sqlite3.Connection, receipt_id: str) -> sqlite3.Row | None:
    """(leaf_index, leaf_hash) of a receipt's leaf, or None."""
    return conn.execute("SELECT leaf_index, leaf_hash FROM log_leaves WHERE receipt_id = ?", (receipt_id,)).fetchone()


def get_log_indexes(conn: sqlite3.Connection, receipt_ids: Sequence[str]) -> dict[str, int]:
    """The leaf index of each of `receipt_ids` that has a leaf."""
    if not receipt_ids:
        return {}
    rows = conn.execute(f"SELECT receipt_id, leaf_index FROM log_leaves WHERE receipt_id IN"
                        f" ({','.join('?' * len(receipt_ids))})", receipt_ids)
    return {r[0]: r[1] for r in rows}


def get_latest_receipt_log_index(conn: sqlite3.Connection, job_id: str) -> int | None:
    """The leaf index of the job's latest receipt, or None."""
    row = conn.execute("SELECT leaf_index FROM log_leaves WHERE receipt_id ="
                       " (SELECT receipt_id FROM receipts WHERE job_id = ? ORDER BY seq DESC LIMIT 1)",
                       (job_id,)).fetchone()
    return None if row is None else int(row[0])


def list_log_entries(conn: sqlite3.Connection, start: int, end: int) -> sqlite3.Cursor:
    """Leaves start..end (inclusive) in order, lazily: leaf_index, leaf_hash, and the receipt's body as
    stored with its ids (unpack_receipt; NULL once pruned)."""
    return conn.execute("SELECT l.leaf_index, l.leaf_hash, r.body, r.receipt_id, r.job_id FROM log_leaves AS l"
                        " LEFT JOIN receipts AS r ON r.receipt_id = l.receipt_id"
                        " WHERE l.leaf_index BETWEEN ? AND ? ORDER BY l.leaf_index", (start, end))


def list_receipts_in_issue_order(conn: sqlite3.Connection) -> Iterable[sqlite3.Row]:
    """Every receipt's id and body, oldest first, lazily (for the upgrade to version 3: bodies were text)."""
    return conn.execute("SELECT receipt_id, body FROM receipts ORDER BY seq")


def list_text_receipts(conn: sqlite3.Connection, after_seq: int, limit: int) -> list[sqlite3.Row]:
    """Upgrade step 5: (seq, receipt_id, job_id, body) of receipts stored as text, after `after_seq` in
    issue order."""
    return conn.execute("SELECT seq, receipt_id, job_id, body FROM receipts WHERE seq > ? ORDER BY seq LIMIT ?",
                        (after_seq, limit)).fetchall()


def set_packed_receipts(conn: sqlite3.Connection, packed: Iterable[tuple[bytes, int]]) -> None:
    """Upgrade step 5: store (packed body, seq) pairs in the column version 6 makes the body."""
    conn.executemany("UPDATE receipts SET packed = ? WHERE seq = ?", packed)


def list_constraints_with_nulls(conn: sqlite3.Connection, after_seq: int, limit: int) -> list[sqlite3.Row]:
    """Upgrade step 5: (seq, constraints) of jobs whose stored constraints may hold nulls, after `after_seq`."""
    return conn.execute("SELECT seq, constraints FROM jobs WHERE seq > ? AND constraints LIKE '%null%' ORDER BY seq"
                        " LIMIT ?", (after_seq, limit)).fetchall()


def set_job_constraints(conn: sqlite3.Connection, constraints: Iterable[tuple[str, int]]) -> None:
    conn.executemany("UPDATE jobs SET constraints = ? WHERE seq = ?", constraints)


def insert_checkpoint(conn: sqlite3.Connection, tree_size: int, root_hash: bytes, created_at: int, note: str) -> None:
    conn.execute("INSERT INTO log_checkpoints (tree_size, root_hash, created_at, note) VALUES (?, ?, ?, ?)",
                 (tree_size, root_hash, created_at, note))


def get_latest_checkpoint(conn: sqlite3.Connection) -> sqlite3.Row | None:
    return conn.execute("SELECT * FROM log_checkpoints ORDER BY tree_size DESC LIMIT 1").fetchone()


def get_checkpoint(conn: sqlite3.Connection, tree_size: int) -> sqlite3.Row | None:
    return conn.execute("SELECT * FROM log_checkpoints WHERE tree_size = ?", (tree_size,)).fetchone()


def list_checkpoints(conn: sqlite3.Connection, below_size: int | None, limit: int, offset: int = 0) -> list[sqlite3.Row]:
    """Checkpoints newest first, of trees smaller than `below_size` (the cursor) when given, skipping `offset`."""
    return conn.execute("SELECT * FROM log_checkpoints WHERE tree_size < ? ORDER BY tree_size DESC LIMIT ? OFFSET ?",
                        (2**63 - 1 if below_size is None else below_size, limit, offset)).fetchall()


def prune_checkpoints(conn: sqlite3.Connection, since: int, cutoff: int, period: int) -> None:
    """Of the checkpoints made from `since` to before `cutoff`, keep only the last of each `period`
    (ms, counted from the epoch; `since` is the start of one)."""
    conn.execute("DELETE FROM log_checkpoints WHERE created_at >= :since AND created_at < :cutoff"
                 " AND tree_size NOT IN (SELECT MAX(tree_size) FROM log_checkpoints"
                 " WHERE created_at >= :since AND created_at < :cutoff GROUP BY created_at / :period)",
                 {"since": since, "cutoff": cutoff, "period": period})


def upsert_log_key(conn: sqlite3.Connection, key_id: str, origin: str, now: int) -> None:
    conn.execute("INSERT INTO log_keys (key_id, origin, first_seen_at) VALUES (?, ?, ?)"
                 " ON CONFLICT (key_id) DO UPDATE SET origin = excluded.origin", (key_id, origin, now))


def list_log_keys(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    return conn.execute("SELECT key_id, origin FROM log_keys ORDER BY first_seen_at, key_id").fetchall()


# Marketplace. Every miner is an offer whose status the triggers keep; admin offers are rows of their
# own. A list is one index range per kind, merged: its cost follows the page, not the fleet.
MINER_OFFER = ("SELECT offer_id AS id, miner_id AS provider, concurrency AS capacity, price, sla, created_at,"
               " 'miner' AS kind, offer_status AS status FROM miners")
ADMIN_OFFER = "SELECT offer_id AS id, provider, capacity, price, sla, created_at, 'admin' AS kind, status FROM offers"


def list_offers(conn: sqlite3.Connection, status: str | None, limit: int, offset: int,
                before: tuple[int, str] | None = None) -> list[sqlite3.Row]:
    """Offers of both kinds, newest first (created_at, then id, both descending); `before` is a keyset
    cursor (created_at, id)."""
    terms = [t for t, on in ((" AND {status} = :status", status is not None),
                             (" AND (created_at, offer_id) < (:at, :id)", before is not None)) if on]
    miners_where = "".join(terms).format(status="offer_status")
    admin_where = "".join(terms).format(status="status")
    branch = " WHERE true{} ORDER BY created_at DESC, offer_id DESC LIMIT :n"
    sql = (f"SELECT * FROM ({MINER_OFFER}{branch.format(miners_where)}) AS mined UNION ALL"
           f" SELECT * FROM ({ADMIN_OFFER}{branch.format(admin_where)}) AS made ORDER BY created_at DESC, id DESC"
           " LIMIT :limit OFFSET :offset")
    at, offer_id = before or (0, "")
    return conn.execute(sql, {"status": status, "at": at, "id": offer_id, "n": limit + offset, "limit": limit,
                              "offset": offset}).fetchall()


def get_offer(conn: sqlite3.Connection, offer_id: str) -> sqlite3.Row | None:
    return conn.execute(f"{MINER_OFFER} WHERE offer_id = :id UNION ALL {ADMIN_OFFER} WHERE offer_id = :id",
                        {"id": offer_id}).fetchone()


def cheapest_open_offer(conn: sqlite3.Connection, price: float, capacity: int) -> sqlite3.Row | None:
    """The cheapest open offer of at least `capacity` at no more than `price` (ties: the oldest): a walk
    up the open offers' price index until one is big enough. (INDEXED BY: without ANALYZE statistics
    the planner prefers the status index, which holds no price order.)"""
    branch = (" INDEXED BY {index} WHERE {status} = 'open' AND price <= :price AND {capacity} >= :capacity"
              " ORDER BY price, created_at, offer_id LIMIT 1")
    miners = branch.format(index="miners_open_by_price", status="offer_status", capacity="concurrency")
    admin = branch.format(index="offers_open_by_price", status="status", capacity="capacity")
    return conn.execute(f"SELECT * FROM ({MINER_OFFER}{miners}) AS mined UNION ALL SELECT * FROM ({ADMIN_OFFER}{admin}) AS made"
                        " ORDER BY price, created_at, id LIMIT 1", {"price": price, "capacity": capacity}).fetchone()


def insert_offer(conn: sqlite3.Connection, provider: str, capacity: int, price: float, sla: str, status: str,
                 now: int) -> str:
    offer_id = secrets.token_hex(16)
    conn.execute("INSERT INTO offers (offer_id, provider, capacity, price, sla, status, created_at)"
                 " VALUES (?, ?, ?, ?, ?, ?, ?)", (offer_id, provider, capacity, price, sla, status, now))
    return offer_id


def update_offer_status(conn: sqlite3.Connection, offer_id: str, status: str) -> bool:
    """Set an admin offer's status; False when no admin offer has that id."""
    return conn.execute("UPDATE offers SET status = ? WHERE offer_id = ? RETURNING offer_id",
                        (status, offer_id)).fetchone() is not None


def insert_bid(conn: sqlite3.Connection, provider: str, capacity: int, price: float, notes: str | None,
               status: str, offer_id: str | None, now: int) -> sqlite3.Row:
    return conn.execute("INSERT INTO bids (bid_id, provider, capacity, price, notes, status, offer_id, created_at)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING *",
                        (secrets.token_hex(16), provider, capacity, price, notes, status, offer_id, now)).fetchone()


def get_bid(conn: sqlite3.Connection, bid_id: str) -> sqlite3.Row | None:
    return conn.execute("SELECT * FROM bids WHERE bid_id = ?", (bid_id,)).fetchone()


# Explorer: every list reads one page through an index; `before` is a keyset cursor (the sort key of
# the last row of the previous page).

def list_job_page(conn: sqlite3.Connection, limit: int, offset: int, before: int | None = None) -> list[sqlite3.Row]:
    return conn.execute("SELECT seq, job_id, client_id, assigned_miner_id, state, requested_at, expires_at, value"
                        f" FROM jobs {'WHERE seq < :before' if before is not None else ''}"
                        " ORDER BY seq DESC LIMIT :limit OFFSET :offset",
                        {"before": before, "limit": limit, "offset": offset}).fetchall()


def get_receipt_prices(conn: sqlite3.Connection, job_ids: Sequence[str]) -> dict[str, float | None]:
    """The latest receipt price of each job that has a receipt."""
    if not job_ids:
        return {}
    marks = ",".join("?" * len(job_ids))
    rows = conn.execute(f"SELECT job_id, price FROM receipts WHERE job_id IN ({marks}) ORDER BY seq", job_ids)
    return {r[0]: r[1] for r in rows}


def list_addresses(conn: sqlite3.Connection, limit: int, offset: int,
                   before: tuple[int, str] | None = None) -> list[sqlite3.Row]:
    """Addresses by last activity, newest first; `before` is (last_active, address). On PostgreSQL an
    address is the sum of its stripes (schema_pg.sql) and its activity their latest: the page walks
    the stripes' rows by activity (addresses_by_activity) and takes each address at its latest row
    (the highest stripe among equals), whose sums are read for the rows on the page alone; a page
    reads about its own rows times the stripes an address has, not every address."""
    if isinstance(conn, PgConnection):
        keyset = "(a.last_active, a.address) < (?, ?) AND " if before is not None else ""
        return conn.execute(
            "SELECT a.address, sums.tx_count, sums.balance_micro, a.last_active FROM addresses AS a"
            " CROSS JOIN LATERAL (SELECT SUM(s.tx_count) AS tx_count, SUM(s.balance_micro) AS balance_micro"
            f" FROM addresses AS s WHERE s.address = a.address) AS sums WHERE {keyset}NOT EXISTS (SELECT 1"
            " FROM addresses AS s WHERE s.address = a.address AND (s.last_active, s.stripe) > (a.last_active, a.stripe))"
            " ORDER BY a.last_active DESC, a.address DESC LIMIT ? OFFSET ?", (*(before or ()), limit, offset)).fetchall()
    where = "WHERE (last_active, address) < (?, ?)" if before is not None else ""
    return conn.execute(f"SELECT * FROM addresses {where} ORDER BY last_active DESC, address DESC LIMIT ? OFFSET ?",
                        (*(before or ()), limit, offset)).fetchall()


def list_recent_job_ids(conn: sqlite3.Connection, address: str, limit: int) -> list[str]:
    """Ids of the newest jobs an identity submitted or holds, newest first."""
    rows = conn.execute("SELECT seq, job_id FROM jobs WHERE client_id = ? ORDER BY seq DESC LIMIT ?",
                        (address, limit)).fetchall()
    rows += conn.execute("SELECT seq, job_id FROM jobs WHERE assigned_miner_id = ? ORDER BY seq DESC LIMIT ?",
                         (address, limit)).fetchall()
    return [job_id for _, job_id in sorted(set(map(tuple, rows)), reverse=True)[:limit]]


def list_receipts(conn: sqlite3.Connection, job_id: str | None, limit: int, offset: int,
                  before: int | None = None) -> list[sqlite3.Row]:
    """Receipts newest first, of one job or of all; `before` is a seq."""
    terms = [t for t, on in (("job_id = :job", job_id is not None), ("seq < :before", before is not None)) if on]
    where = f"WHERE {' AND '.join(terms)}" if terms else ""
    return conn.execute(f"SELECT seq, receipt_id, job_id, issued_at, body FROM receipts {where} ORDER BY seq DESC"
                        " LIMIT :limit OFFSET :offset",
                        {"job": job_id, "before": before, "limit": limit, "offset": offset}).fetchall()


def get_job_counts(conn: sqlite3.Connection) -> dict[str, int]:
    """Jobs per state (summed as get_fleet_totals sums)."""
    return {r[0]: r[1] for r in conn.execute("SELECT state, SUM(n) FROM job_counts GROUP BY state")}


def get_completed_busy_ms(conn: sqlite3.Connection) -> int:
    """The summed run time (ms) of every job ever completed."""
    return int(conn.execute("SELECT SUM(busy_ms) FROM job_counts WHERE state = 'COMPLETED'").fetchone()[0])


# Retention: pruning walks finished jobs by age through jobs_unpruned; deleting walks jobs and
# receipts from the oldest (the head of seq), a bounded window at a time.

ARCHIVE_COLUMNS = ("seq, job_id, client_id, state, assigned_miner_id, attempts, requested_at, expires_at, assigned_at,"
                   " finished_at, error, value, constraints, payload, result, metrics, pruned_at")
ARCHIVE_FROM = "jobs LEFT JOIN job_data USING (seq)"  # a pruned job has no job_data: payload, result null


def start_retention_clock(conn: sqlite3.Connection, now: int) -> tuple[int, bool]:
    """When retention's clock started (started now if never): (at, whether it started now)."""
    started = conn.execute("INSERT INTO retention (name, at) VALUES ('clock_started', ?) ON CONFLICT (name) DO NOTHING"
                           " RETURNING at", (now,)).fetchone()
    if started is not None:
        return int(started[0]), True
    return int(conn.execute("SELECT at FROM retention WHERE name = 'clock_started'").fetchone()[0]), False


def get_retention_mark(conn: sqlite3.Connection, name: str) -> int | None:
    """A time retention keeps (Unix ms: 'clock_started', 'last_pass'), or None."""
    row = conn.execute("SELECT at FROM retention WHERE name = ?", (name,)).fetchone()
    return None if row is None else int(row[0])


def set_retention_mark(conn: sqlite3.Connection, name: str, at: int) -> None:
    conn.execute("INSERT INTO retention (name, at) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET at = excluded.at",
                 (name, at))


def oldest_unpruned_finish(conn: sqlite3.Connection, before: int) -> int | None:
    """finished_at of the oldest finished job that finished before `before` and still holds its payload."""
    row = conn.execute("SELECT finished_at FROM jobs WHERE finished_at IS NOT NULL AND pruned_at IS NULL"
                       " AND finished_at < ? ORDER BY finished_at LIMIT 1", (before,)).fetchone()
    return None if row is None else int(row[0])


def list_prunable(conn: sqlite3.Connection, before: int, limit: int) -> list[int]:
    """Seqs of up to `limit` finished jobs that finished before `before` and still hold their payload, oldest first."""
    return [r[0] for r in conn.execute(
        "SELECT seq FROM jobs WHERE finished_at IS NOT NULL AND pruned_at IS NULL AND finished_at < ?"
        " ORDER BY finished_at LIMIT ?", (before, limit))]


def list_unpruned_finished(conn: sqlite3.Connection, after: tuple[int, int], before: int, limit: int) -> list[sqlite3.Row]:
    """ARCHIVE_COLUMNS of finished jobs that still hold their payload, in (finished_at, seq) order after
    the key `after`, finished before `before`."""
    return conn.execute(
        f"SELECT {ARCHIVE_COLUMNS} FROM {ARCHIVE_FROM} WHERE finished_at IS NOT NULL AND pruned_at IS NULL"
        " AND finished_at >= :at AND finished_at < :before AND (finished_at > :at OR seq > :seq)"
        " ORDER BY finished_at, seq LIMIT :limit",
        {"at": after[0], "seq": after[1], "before": before, "limit": limit}).fetchall()


def list_finished_keys(conn: sqlite3.Connection, before: int) -> sqlite3.Cursor:
    """(seq, finished_at) of every finished job that finished before `before`, oldest first, as a cursor
    to stream (a sort of keys only: no index covers pruned jobs, and an export is a one-off)."""
    return conn.execute("SELECT seq, finished_at FROM jobs WHERE finished_at IS NOT NULL AND finished_at < ?"
                        " ORDER BY finished_at, seq", (before,))


def get_jobs_by_seq(conn: sqlite3.Connection, seqs: Sequence[int]) -> list[sqlite3.Row]:
    """ARCHIVE_COLUMNS of the jobs with these seqs, in the order given."""
    marks = ",".join("?" * len(seqs))
    rows = {r["seq"]: r for r in conn.execute(f"SELECT {ARCHIVE_COLUMNS} FROM {ARCHIVE_FROM} WHERE seq IN ({marks})",
                                              seqs)}
    return [rows[seq] for seq in seqs if seq in rows]


def list_receipt_bodies(conn: sqlite3.Connection, job_ids: Sequence[str]) -> dict[str, list[str]]:
    """Each job's receipts (JSON text, as signed), oldest first."""
    found: dict[str, list[str]] = {}
    if job_ids:
        marks = ",".join("?" * len(job_ids))
        for job_id, receipt_id, body in conn.execute(f"SELECT job_id, receipt_id, body FROM receipts"
                                                     f" WHERE job_id IN ({marks}) ORDER BY seq", job_ids):
            found.setdefault(job_id, []).append(unpack_receipt(body, receipt_id, job_id))
    return found


def prune_jobs(conn: sqlite3.Connection, seqs: Sequence[int], now: int) -> int:
    """Drop the payload, result and metrics (job_data) of those of these jobs that are finished and not
    pruned yet, and mark them pruned; the number pruned. Their summaries stay."""
    marks = json.dumps(list(seqs))
    conn.execute("DELETE FROM job_data WHERE seq IN (SELECT seq FROM jobs WHERE seq IN (SELECT CAST(value AS INTEGER) FROM json_each(?))"
                 " AND finished_at IS NOT NULL AND pruned_at IS NULL)", (marks,))
    return conn.execute("UPDATE jobs SET pruned_at = ? WHERE seq IN (SELECT CAST(value AS INTEGER) FROM json_each(?))"
                        " AND finished_at IS NOT NULL AND pruned_at IS NULL", (now, marks)).rowcount


# A deletion never takes the row with the highest seq of its table: without AUTOINCREMENT, SQLite gives
# a new row max(seq) + 1 (SQLite docs, "ROWIDs and the INTEGER PRIMARY KEY"), so with the newest row
# kept a seq (a block height, a receipt's place, a cursor's key, an archived job's seq) never names a
# second row. (AUTOINCREMENT would rebuild the tables and write sqlite_sequence on every insert.)

def delete_old_jobs(conn: sqlite3.Connection, before: int, limit: int) -> int:
    """Delete up to `limit` pruned jobs that finished before `before`, oldest first through the index
    jobs_pruned (jobs that never finish hold nothing up), never the newest job; the number deleted.
    The kept totals have no delete triggers: they count history, not rows."""
    return conn.execute(
        "DELETE FROM jobs WHERE seq IN (SELECT seq FROM jobs WHERE pruned_at IS NOT NULL AND finished_at < ?"
        " AND seq < (SELECT MAX(seq) FROM jobs) ORDER BY finished_at LIMIT ?)", (before, limit)).rowcount


def list_due_receipts(conn: sqlite3.Connection, before: int, window: int, limit: int) -> list[sqlite3.Row]:
    """(seq, job_id, price, latest: whether it is its job's latest receipt) of up to `limit` receipts
    issued before `before` among the `window` oldest (by seq; receipts are issued finished, so the head
    of seq is the oldest), whose job has been pruned or deleted, never the newest receipt."""
    return conn.execute(
        "SELECT seq, job_id, price, seq = (SELECT MAX(seq) FROM receipts AS r WHERE r.job_id = head.job_id) AS latest"
        " FROM (SELECT seq, issued_at, job_id, price FROM receipts ORDER BY seq LIMIT ?) AS head WHERE issued_at < ?"
        " AND seq < (SELECT MAX(seq) FROM receipts) AND NOT EXISTS"
        " (SELECT 1 FROM jobs WHERE jobs.job_id = head.job_id AND jobs.pruned_at IS NULL) LIMIT ?",
        (window, before, limit)).fetchall()


def set_job_values(conn: sqlite3.Connection, values: Sequence[tuple[str, str]]) -> None:
    """Set the value (as the explorer shows it) of each job of (value, job_id) that still exists."""
    conn.executemany("UPDATE jobs SET value = ? WHERE job_id = ?", values)


def delete_receipts(conn: sqlite3.Connection, seqs: Sequence[int]) -> int:
    """Delete the receipts with these seqs (their log leaves stay); the number deleted. The kept
    totals have no delete triggers: they count history, not rows."""
    return conn.execute("DELETE FROM receipts WHERE seq IN (SELECT CAST(value AS INTEGER) FROM json_each(?))",
                        (json.dumps(list(seqs)),)).rowcount


def delete_old_bids(conn: sqlite3.Connection, before: int, window: int, limit: int) -> int:
    """Delete up to `limit` bids placed before `before` among the `window` oldest (by seq: a bid is
    matched or left pending when placed, and never changes after), never the newest; the number
    deleted. The active-bid total counts history, as the job totals do."""
    return conn.execute(
        "DELETE FROM bids WHERE seq IN (SELECT seq FROM (SELECT seq, created_at FROM bids ORDER BY seq LIMIT ?) AS head"
        " WHERE created_at < ? AND seq < (SELECT MAX(seq) FROM bids) LIMIT ?)", (window, before, limit)).rowcount


def get_db_space(conn: sqlite3.Connection) -> tuple[int, int, int]:
    """(page_size, page_count, freelist_count) of the database file (PostgreSQL: of the database, in
    its 8 KiB blocks, the free space inside them not counted)."""
    if isinstance(conn, PgConnection):
        return 8192, -(-conn.execute("SELECT pg_database_size(current_database())").fetchone()[0] // 8192), 0
    return tuple(conn.execute(f"PRAGMA {name}").fetchone()[0]  # type: ignore[return-value]
                 for name in ("page_size", "page_count", "freelist_count"))


# === Domain logic ===
# Time, matching, receipts, the receipt log, the rate limiter and the poll hub: no SQL here.

def now_ms(clock: Callable[[], float]) -> int:
    return int(clock() * 1000)


@functools.lru_cache(maxsize=4096)  # the timestamps of one view, or of one busy second, repeat
def _iso_second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def iso(ms: int | None) -> str | None:
    """Unix milliseconds as ISO 8601 UTC with a Z suffix."""
    if ms is None:
        return None
    return f"{_iso_second(ms // 1000)}.{ms % 1000:03d}Z"


DISPLAY_JSON = json_text(separators=(", ", ": "))  # as json.dumps writes by default


def display_value(value: Any) -> str | None:
    """A JSON value as the explorer shows it: strings as they are (U+0000 as U+FFFD: it is stored as a
    text column of its own), anything else as JSON."""
    if value is None:
        return None
    return value.replace("\x00", "\ufffd") if isinstance(value, str) else DISPLAY_JSON(value)


# --- Claims that never reached their miner (issue 18) ---
# A claim commits before its poll is answered: an instance that dies in between (or an answer lost on
# the way) leaves a RUNNING job its miner never heard of. The miner's heartbeats say how many jobs it
# runs (`inflight`, counted from a poll's answer until its result or failure is answered), and a job
# assigned before the miner's previous heartbeat has had a whole interval to reach it.

CLAIM_GRACE_MS = 5_000  # a claim younger than this is never judged: its answer may still be on its way


@dataclasses.dataclass(frozen=True)
class InflightVerdict:
    """What one heartbeat changes: the miner's short_since and known_through, and the jobs (job ids)
    to put back in the queue."""

    short_since: int | None
    known_through: int | None
    release: tuple[str, ...] = ()


def judge_inflight(beat: Beat, last_heartbeat: int | None, short_since: int | None, known_through: int | None,
                   held: Sequence[tuple[int, int, str]]) -> InflightVerdict:
    """Judge a heartbeat (arrived at `beat[0]`, Unix ms, reporting `beat[1]` jobs in flight, None: not
    said) of a miner that holds the RUNNING jobs `held` ((assigned_at, seq, job_id) each), given what
    its row says (its previous heartbeat, when a shortfall was first seen, how far its heartbeats have
    counted every job it held).

    Eligible: the jobs assigned before the previous heartbeat (and CLAIM_GRACE_MS before this one). The
    heartbeat is short when it reports fewer. A result or failure on its way makes a shortfall of one
    heartbeat, so one releases nothing: it is recorded (short_since = its time), and the next puts back
    the difference if the previous recorded heartbeat was that short one (short_since equals
    last_heartbeat: a heartbeat that was not short, or one another instance recorded meanwhile, moved
    last_heartbeat on, so nothing needs clearing). Which go back: first the jobs no heartbeat has yet
    counted (assigned after known_through), oldest first (the miner's retry of a lost poll is answered
    by a newer claim), then the newest (a job held through earlier heartbeats is one it knows). A
    heartbeat that counts every job assigned up to it moves known_through there."""
    at, inflight = beat
    if inflight is None:
        return InflightVerdict(short_since, known_through)
    if inflight >= sum(1 for assigned, _, _ in held if assigned <= at) and any(
            assigned > (known_through or 0) for assigned, _, _ in held if assigned <= at):
        known_through = at
    cutoff = min(last_heartbeat if last_heartbeat is not None else -1, at - CLAIM_GRACE_MS)
    eligible = [job for job in held if job[0] < cutoff]
    short = len(eligible) - inflight
    if short <= 0:
        return InflightVerdict(short_since, known_through)
    if short_since is None or short_since != last_heartbeat:
        return InflightVerdict(at, known_through)
    counted = known_through or 0
    order = sorted(eligible, key=lambda job: (0, job[:2]) if job[0] > counted else (1, (-job[0], -job[1])))
    return InflightVerdict(short_since, known_through, tuple(job_id for _, _, job_id in order[:short]))


# --- Matching (spec section 7) ---

def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def normalise_capabilities(caps: dict[str, Any]) -> dict[str, Any]:
    """Bring the later CLI's `gpu: {model, memory_gb, cuda_version}` into `gpus: [{name, memory_mb}]`, `cuda`."""
    caps = dict(caps)
    gpu = caps.get("gpu")
    if isinstance(gpu, dict) and not isinstance(caps.get("gpus"), list):
        entry: dict[str, Any] = {"name": gpu.get("model")}
        if _is_number(gpu.get("memory_gb")):
            entry["memory_mb"] = int(gpu["memory_gb"] * 1024)
        caps["gpus"] = [entry]
        if caps.get("cuda") is None and gpu.get("cuda_version") is not None:
            caps["cuda"] = gpu["cuda_version"]
    return caps


def satisfies(constraints: Mapping[str, Any], miner: MinerProfile) -> bool:
    """Whether a miner meets every set constraint of a job (spec section 7)."""
    caps = miner.capabilities
    gpus = [g for g in caps.get("gpus") or [] if isinstance(g, dict)] if isinstance(caps.get("gpus"), list) else []
    c = constraints
    if c.get("region") is not None and c["region"] != miner.region:
        return False
    if c.get("gpu") is not None and not any(g.get("name") == c["gpu"] for g in gpus):
        return False
    if c.get("min_vram_gb") and not any(
            _is_number(g.get("memory_mb")) and g["memory_mb"] >= c["min_vram_gb"] * 1024 for g in gpus):
        return False
    if c.get("cuda") is not None and (caps.get("cuda") is None or c["cuda"] not in str(caps["cuda"])):
        return False
    if c.get("models"):
        offered = caps.get("models") if isinstance(caps.get("models"), list) else []
        if not all(m in offered for m in c["models"]):
            return False
    if c.get("max_price") is not None:
        price = caps.get("price")
        if not _is_number(price) or price > c["max_price"]:
            return False
    return True


# A job's numeric thresholds are ranges, not identities: a shape holds max_price and min_vram_gb as
# buckets of THRESHOLD_STEPS per doubling (~4.4% wide), so jobs that each name their own price share
# a few shapes instead of making one each. A miner meets every job of a bucket, none, or (when its
# own price or memory falls inside the bucket) some: those it finds by each job's exact value.
THRESHOLD_STEPS = 16
BUCKETED = {"max_price": "max_price_bucket", "min_vram_gb": "min_vram_gb_bucket"}
NONE, SOME, ALL = 0, 1, 2  # how much of a shape a miner can run


def bucket_bounds(bucket: int) -> tuple[float, float]:
    """[low, high) of a threshold bucket."""
    return 2 ** (bucket / THRESHOLD_STEPS), 2 ** ((bucket + 1) / THRESHOLD_STEPS)


def threshold_bucket(value: float) -> int:
    """The bucket of a positive threshold: low <= value < high, exactly as bucket_bounds computes them."""
    bucket = math.floor(math.log2(value) * THRESHOLD_STEPS)
    while bucket_bounds(bucket)[1] <= value:
        bucket += 1
    while bucket_bounds(bucket)[0] > value:
        bucket -= 1
    return bucket


def shape_of(constraints: Mapping[str, Any]) -> str:
    """A job's shape: its constraints with positive numeric thresholds replaced by their buckets (JSON)."""
    shape = dict(constraints)
    for key, bucket_key in BUCKETED.items():
        if shape.get(key):  # 0 and None ask for nothing
            shape[bucket_key] = threshold_bucket(shape.pop(key))
    return canonical_json(shape)


def stored_constraints(constraints: Mapping[str, Any]) -> str:
    """How a job's constraints (all six keys) are stored: only those set, as compact JSON ("{}" for
    none), the form its receipt's job_constraints takes. A job kept for years holds ~2 bytes here, not ~95."""
    return compact_json({key: value for key, value in constraints.items() if value is not None})


UNCONSTRAINED = compact_json(dict.fromkeys(CONSTRAINT_KEYS))


def shown_constraints(stored: str) -> str:
    """A job's stored constraints as clients and miners see them: all six keys, null where unset."""
    if stored == "{}":  # nearly every job
        return UNCONSTRAINED
    return compact_json({**dict.fromkeys(CONSTRAINT_KEYS), **load_json(stored)})


def gpu_memory_gb(miner: MinerProfile) -> float | None:
    """The largest GPU memory a miner declares, in GB (SPEC section 7 compares memory_mb / 1024)."""
    gpus = miner.capabilities.get("gpus")
    sizes = [g["memory_mb"] for g in gpus if isinstance(g, dict) and _is_number(g.get("memory_mb"))] \
        if isinstance(gpus, list) else []
    return max(sizes) / 1024 if sizes else None


def fit_of(shape: Mapping[str, Any], miner: MinerProfile) -> tuple[int, float | None, float | None]:
    """(NONE, SOME or ALL, the price and the memory to compare each job's own threshold with when SOME)."""
    plain = {k: v for k, v in shape.items() if k not in BUCKETED.values()}
    if not satisfies(plain, miner):
        return NONE, None, None
    fit, exact = ALL, {}
    for bucket_key, mine in (("max_price_bucket", miner.capabilities.get("price")),
                             ("min_vram_gb_bucket", gpu_memory_gb(miner))):
        if bucket_key not in shape:
            continue
        if not _is_number(mine):
            return NONE, None, None
        low, high = bucket_bounds(shape[bucket_key])
        # a price may not exceed a job's max_price; a memory must reach a job's min_vram_gb
        meets_all, meets_none = (mine <= low, mine >= high) if bucket_key == "max_price_bucket" else \
            (mine >= high, mine < low)
        if meets_none:
            return NONE, None, None
        if not meets_all:
            fit, exact[bucket_key] = SOME, mine
    return fit, exact.get("max_price_bucket"), exact.get("min_vram_gb_bucket")


class Matcher:
    """Which shapes with QUEUED jobs a miner can run. What a poll costs follows the shapes queued now,
    not every shape there ever was. On SQLite it is used on the loop's thread only (units of work and
    reads) and remembers which shapes may hold QUEUED jobs; with `cache_queue` False (PostgreSQL,
    where other instances queue jobs and units run on threads) it reads them afresh each time, and
    what it remembers (shapes' constraints, fits) never changes once known; there, `likely` says
    whether a poll should claim at once (worth_claiming)."""

    MAX_FITS = 1 << 16  # remembered (miner kind, shape) answers; forgotten all at once past this

    def __init__(self, cache_queue: bool = True) -> None:
        self.cache_queue = cache_queue
        self.reset()

    def reset(self) -> None:
        """Forget everything (after an aborted batch, a cached shape or queue may not be so)."""
        self.shapes: dict[int, dict[str, Any]] = {}
        self.seen = 0
        self.queued: set[int] | None = None  # shapes that may hold QUEUED jobs; None: not read yet
        self.fits: dict[tuple[str, int], tuple[int, float | None, float | None]] = {}
        self.likely = True  # PostgreSQL: the last claim with a free slot found a job, or jobs were queued since

    def worth_claiming(self) -> bool:
        """Whether a poll should claim at once (a unit of work) rather than read whether a job waits
        first (so that renewals of an idle fleet cost no write): on SQLite while a shape may hold QUEUED
        jobs; on PostgreSQL, which other instances also queue into, while `likely` (a hint: a claim
        that finds nothing costs a transaction that writes nothing, a read that finds a job costs a
        read, a thread hop and four statements more than the claim)."""
        return self.queued != set() if self.cache_queue else self.likely

    def claimed(self, found: bool) -> None:
        """A claim by a miner with a free slot found a job, or nothing it can run (PostgreSQL's hint)."""
        self.likely = found

    def queue(self, shape_ids: Iterable[int]) -> None:
        """Shapes that newly QUEUED jobs were committed into (here or, on PostgreSQL, by another instance)."""
        self.likely = True
        if self.queued is not None and self.cache_queue:
            self.queued.update(shape_ids)

    def drained(self, shape_id: int) -> None:
        """A probe found no live QUEUED job in the shape."""
        if self.queued is not None:
            self.queued.discard(shape_id)

    def candidates(self, conn: sqlite3.Connection, miner: MinerProfile) -> list[tuple[int, float | None, float | None]]:
        """(shape id, price, memory) of each queued shape the miner can run (price and memory set where
        only some of its jobs suit the miner)."""
        queued = self.queued
        if queued is None or not self.cache_queue:
            queued = set(list_queued_shapes(conn))
            if self.cache_queue:
                self.queued = queued
        out = []
        for shape_id in queued:
            fit = self.fits.get((miner.fit_key, shape_id))
            if fit is None:
                fit = self._fit(conn, miner, shape_id)
            if fit[0] != NONE:
                out.append((shape_id, fit[1], fit[2]))
        return out

    def _fit(self, conn: sqlite3.Connection, miner: MinerProfile, shape_id: int) -> tuple[int, float | None, float | None]:
        if shape_id not in self.shapes:
            for row in list_shapes_after(conn, self.seen):
                self.shapes[row["shape_id"]] = load_json(row["constraints"])
                self.seen = max(self.seen, row["shape_id"])
            if shape_id not in self.shapes:  # committed after a higher id was seen (PostgreSQL)
                self.shapes[shape_id] = load_json(get_shape(conn, shape_id))
        if len(self.fits) >= self.MAX_FITS:
            self.fits.clear()
        fit = self.fits[(miner.fit_key, shape_id)] = fit_of(self.shapes[shape_id], miner)
        return fit

    def oldest(self, conn: sqlite3.Connection, miner: MinerProfile, now: int, lock: bool = False) -> int | None:
        """Seq of the oldest live QUEUED job the miner can run, or None; forgets shapes found empty.
        `lock`: for a claim (oldest_queued_in_shape)."""
        best = None
        for shape_id, price, vram in self.candidates(conn, miner):
            seq = oldest_queued_in_shape(conn, shape_id, now, price, vram, lock)
            if seq is None and price is None and vram is None:
                self.drained(shape_id)
            elif seq is not None and (best is None or seq < best):
                best = seq
        return best


# --- Receipts: canonical JSON and Ed25519 signatures (spec section 8) ---

# 1.1: metadata carries SHA-256 digests of the payload and result instead of the objects (a receipt
# is a proof, not a copy); canonical bytes and signatures are as in 1.0, so 1.0 verifiers accept it.
RECEIPT_VERSION = "1.1"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Raises ValueError (or TypeError for a non-string)."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def drop_nulls(value: Any) -> Any:
    """`value` without null dict values and null list elements, recursively."""
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value if v is not None]
    return value


def without_nulls(value: Any, text: str) -> Any:
    """drop_nulls(value), skipping the walk when `text`, the JSON of `value`, has no null in it."""
    return drop_nulls(value) if "null" in text else value


def canonical_digest(text: str, canonical: bool = False) -> str:
    """Hex SHA-256 of the canonical JSON bytes of the value JSON `text` holds, the form receipts are
    signed in (SPEC section 8: nulls dropped, keys sorted, compact, ASCII escapes). `canonical` says
    `text` is canonical_json already: without a null in it, it is hashed as it is (no parse)."""
    if not canonical or "null" in text:
        text = canonical_json(drop_nulls(load_json(text)))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def receipt_result_digest(stored: str) -> str | None:
    """The result digest (canonical_digest) a stored receipt vouches for: metadata.result_sha256 of a
    1.1 receipt, the digest of metadata.result of a 1.0 one; None when it holds neither."""
    metadata = load_json(stored).get("metadata")
    if not isinstance(metadata, dict):
        return None
    if isinstance(metadata.get("result_sha256"), str):
        return metadata["result_sha256"]
    return canonical_digest(compact_json(metadata["result"])) if "result" in metadata else None


def canonical_receipt_bytes(receipt: Mapping[str, Any]) -> bytes:
    """The signed bytes: the receipt without its signatures, nulls dropped, sorted compact ASCII JSON."""
    body = {k: v for k, v in receipt.items() if k not in ("signature", "attestations")}
    return canonical_json(drop_nulls(body)).encode("utf-8")


def key_id_of(key: SigningKey | VerifyKey) -> str:
    """The public key, base64url without padding (43 chars)."""
    return b64url(bytes(key.verify_key if isinstance(key, SigningKey) else key))


def signature_of(key: SigningKey, message: bytes, key_id: str | None = None) -> dict[str, str]:
    return {"alg": "Ed25519", "key_id": key_id or key_id_of(key), "sig": b64url(key.sign(message).signature)}


def splice_signatures(canonical: str, signatures: Mapping[str, Any]) -> str:
    """A receipt's stored text: its signed canonical JSON (an object with members), then its signatures."""
    return f"{canonical[:-1]},{canonical_json(signatures)[1:]}"


def stored_receipt_text(receipt: Mapping[str, Any]) -> str:
    """The text this coordinator stores and serves for a receipt it sealed, rebuilt from the receipt
    (as a client holds it, in any layout): the leaf the receipt log holds for it."""
    signatures = {k: receipt[k] for k in ("signature", "attestations") if k in receipt}
    return splice_signatures(canonical_receipt_bytes(receipt).decode(), signatures)


def check_signature(sig: Any, message: bytes) -> bool:
    """Whether `sig` ({alg, key_id, sig}) is a valid Ed25519 signature of `message` by its own key_id."""
    if not isinstance(sig, dict) or sig.get("alg") != "Ed25519":
        return False
    try:
        VerifyKey(b64url_decode(sig["key_id"])).verify(message, b64url_decode(sig["sig"]))
    except (KeyError, TypeError, ValueError, CryptoError):
        return False
    return True


@dataclasses.dataclass(frozen=True)
class Signer:
    """The receipt signing key and the optional coordinator attestation key."""

    signing: SigningKey
    attestation: SigningKey | None = None
    ids: tuple[str, ...] = dataclasses.field(init=False)  # key ids in the order of key_ids()

    def __post_init__(self) -> None:
        keys = (self.signing,) if self.attestation is None else (self.signing, self.attestation)
        object.__setattr__(self, "ids", tuple(key_id_of(k) for k in keys))

    @classmethod
    def from_settings(cls, settings: Settings, signing_seed: bytes | None = None) -> Signer | None:
        """The configured keys (`signing_seed` standing in for an unset signing key), or None."""
        seed = settings.signing_seed or signing_seed
        if seed is None:
            return None
        att = settings.attestation_seed
        return cls(SigningKey(seed), None if att is None else SigningKey(att))

    def key_ids(self) -> list[tuple[str, str]]:
        """(key_id, role) of every configured key."""
        return list(zip(self.ids, ("signing", "attestation")))

    def seal(self, body: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
        """`body` without nulls, signed (and attested), and its JSON text: what is stored and returned."""
        receipt = {k: v for k, v in body.items()  # top-level nulls (e.g. no price) are the common ones
                   if v is not None and k not in ("signature", "attestations")}
        canonical = canonical_json(receipt)
        if "null" in canonical:  # only then can a value deeper down be null: walk and drop them
            receipt = drop_nulls(receipt)
            canonical = canonical_json(receipt)  # = canonical_receipt_bytes(receipt)
        message = canonical.encode("utf-8")
        receipt["signature"] = signature_of(self.signing, message, self.ids[0])
        if self.attestation is not None:
            receipt["attestations"] = [signature_of(self.attestation, message, self.ids[1])]
        signatures = {k: receipt[k] for k in ("signature", "attestations") if k in receipt}
        return receipt, splice_signatures(canonical, signatures)


def build_receipt(job: sqlite3.Row, provider: str, capabilities: Mapping[str, Any], result: Mapping[str, Any],
                  metrics: Mapping[str, Any], now: int, coordinator_id: str, result_sha256: str,
                  busy_ms: int) -> dict[str, Any]:
    """The unsigned version 1.1 receipt of a job completing at `now` (table in spec section 8; the
    payload and result as their canonical_digest); `busy_ms` is how long the miner held it, the
    units when the miner reports none."""
    units = amount(metrics.get("units"), result.get("units"))
    if units is None:
        units = busy_ms / 1000
    unit_price = amount(capabilities.get("price"))
    price = amount(metrics.get("price"), result.get("price"))
    if price is None and unit_price is not None:
        price = amount(round(units * unit_price, 6))
    return {"version": RECEIPT_VERSION, "receipt_id": secrets.token_hex(16), "job_id": job["job_id"],
            "provider": provider, "client": job["client_id"], "coordinator_id": coordinator_id,
            "status": "COMPLETED", "units": units,
            "unit_type": first_of(str, metrics.get("unit_type"), result.get("unit_type")) or "gpu_seconds",
            "unit_price": unit_price, "price": price,
            "started_at": job["assigned_at"] // 1000, "completed_at": now // 1000,
            "metadata": {"job_payload_sha256": canonical_digest(job["payload"], canonical=True),
                         "job_constraints": without_nulls(load_json(job["constraints"]), job["constraints"]),
                         "result_sha256": result_sha256, "metrics": dict(metrics)}}


def signature_problem(sig: Any, where: str) -> str | None:
    """Why `sig` is not an {alg, key_id, sig} object of strings, naming the field (None when it is one)."""
    if not isinstance(sig, dict):
        return f"{where} is not an object"
    for field in ("alg", "key_id", "sig"):
        if not isinstance(sig.get(field), str):
            return f"{where}.{field} is missing or not a string"
    return None


def verify_receipt(receipt: Mapping[str, Any], signing_keys: set[str],
                   attestation_keys: set[str] | None = None) -> dict[str, Any]:
    """Check a receipt's signature and attestations, and whether its signing key is one of `signing_keys`.

    Any field may hold any JSON type (the receipt is untrusted): a wrong one makes the receipt invalid
    with a reason naming it. An attestation counts only if it verifies, is not by the signing key
    itself, and (when `attestation_keys` is given) is by one of those keys. Returns the VerifyResult
    shape: {valid, signature_valid, attestations_valid, known_key, reason}.
    """
    message = canonical_receipt_bytes(receipt)
    sig, atts = receipt.get("signature"), receipt.get("attestations", [])
    sig_problem = "receipt has no signature" if sig is None else signature_problem(sig, "signature")
    signing_key_id = sig["key_id"] if sig_problem is None else None
    signature_valid = sig_problem is None and check_signature(sig, message)
    listed = atts if isinstance(atts, list) else []
    att_problems = [signature_problem(a, f"attestations[{i}]") for i, a in enumerate(listed)]

    def attests(att: Any, problem: str | None) -> bool:
        trusted = problem is None and (attestation_keys is None or att["key_id"] in attestation_keys)
        return trusted and att["key_id"] != signing_key_id and check_signature(att, message)

    attestations_valid = [attests(a, p) for a, p in zip(listed, att_problems)]
    known = signing_key_id in signing_keys if signing_key_id is not None else False
    reasons = [sig_problem,
               None if signature_valid else "signature does not verify (receipt altered or wrong key)",
               None if isinstance(atts, list) else "attestations is not a list",
               *att_problems,
               *(f"attestation {i} does not verify with an attestation key"
                 for i, ok in enumerate(attestations_valid) if not ok),
               None if known else "signed by a key that is not among the trusted signing keys"]
    reason = next((r for r in reasons if r is not None), None)
    return {"valid": reason is None, "signature_valid": signature_valid, "attestations_valid": attestations_valid,
            "known_key": known, "reason": reason}


# --- The receipt log: RFC 9162 Merkle tree hashes and proofs, C2SP signed-note checkpoints ---
# A node (level, idx) is the complete subtree over leaves [idx * 2^level, (idx + 1) * 2^level); level 0
# is a leaf. Every hash a proof needs is one such node or a right edge made of a few of them.

EMPTY_ROOT = hashlib.sha256(b"").digest()  # RFC 9162 2.1.1: MTH({}) = SHA-256()


def leaf_hash(leaf: bytes) -> bytes:
    """RFC 9162 2.1.1: SHA-256(0x00 || leaf)."""
    return hashlib.sha256(b"\x00" + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 9162 2.1.1: SHA-256(0x01 || left || right)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(size: int) -> int:
    """k of RFC 9162 2.1.1: the largest power of two smaller than `size` (> 1)."""
    return 1 << ((size - 1).bit_length() - 1)


def subtrees(start: int, end: int) -> list[tuple[int, int]]:
    """The complete subtrees (level, idx) that make up leaves [start, end), largest first. `start` must
    be a multiple of the largest of them, as in every range RFC 9162's MTH splits off."""
    parts = []
    while start < end:
        level = (end - start).bit_length() - 1
        parts.append((level, start >> level))
        start += 1 << level
    return parts


def range_hash(parts: Sequence[bytes]) -> bytes:
    """MTH of a range of leaves from the hashes of its subtrees, largest first (see `subtrees`): each
    is the left child of a node whose right child is the rest."""
    digest = parts[-1]
    for part in reversed(parts[:-1]):
        digest = node_hash(part, digest)
    return digest


def inclusion_ranges(index: int, size: int) -> list[tuple[int, int]]:
    """The leaf ranges whose MTHs are the audit path of leaf `index` in a tree of `size` leaves, in path
    order, nearest the leaf first (RFC 9162 2.1.3.1 PATH(m, D[n]))."""
    ranges, start, end = [], 0, size
    while end - start > 1:
        k = _split(end - start)
        if index < start + k:
            ranges.append((start + k, end))
            end = start + k
        else:
            ranges.append((start, start + k))
            start += k
    return ranges[::-1]


def consistency_ranges(first: int, second: int) -> list[tuple[int, int]]:
    """The leaf ranges whose MTHs are the consistency proof from a tree of `first` leaves to one of
    `second`, in proof order (RFC 9162 2.1.4.1 PROOF(m, D[n])); none when first is 0 or second."""
    if not 0 < first < second:
        return []
    ranges, start, end, m, whole = [], 0, second, first, True  # whole: SUBPROOF's b
    while m != end - start:
        k = _split(end - start)
        if m <= k:
            ranges.append((start + k, end))
            end = start + k
        else:
            ranges.append((start, start + k))
            start, m, whole = start + k, m - k, False
    if not whole:
        ranges.append((start, end))
    return ranges[::-1]


def proof_nodes(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Every node the MTHs of `ranges` are made of (each once)."""
    return list(dict.fromkeys(node for start, end in ranges for node in subtrees(start, end)))


def proof_hashes(ranges: Sequence[tuple[int, int]], nodes: Mapping[tuple[int, int], bytes]) -> list[bytes]:
    """The MTH of each range, from the stored hashes of `proof_nodes(ranges)` (all of them)."""
    return [range_hash([nodes[node] for node in subtrees(start, end)]) for start, end in ranges]


def root_from_inclusion(index: int, size: int, leaf: bytes, path: Sequence[bytes]) -> bytes | None:
    """The root an audit path leads to from a leaf hash (RFC 9162 2.1.3.2), or None when it cannot be the
    path of leaf `index` in a tree of `size` leaves."""
    if not 0 <= index < size:
        return None
    fn, sn, digest = index, size - 1, leaf
    for sibling in path:
        if sn == 0:
            return None
        if fn & 1 or fn == sn:
            digest = node_hash(sibling, digest)
            while fn and not fn & 1:
                fn, sn = fn >> 1, sn >> 1
        else:
            digest = node_hash(digest, sibling)
        fn, sn = fn >> 1, sn >> 1
    return digest if sn == 0 else None


def verify_consistency(first: int, second: int, first_root: bytes, second_root: bytes,
                       path: Sequence[bytes]) -> bool:
    """Whether `path` proves the tree of `first` leaves with `first_root` a prefix of the one of `second`
    leaves with `second_root` (RFC 9162 2.1.4.2; equal sizes need equal roots and an empty path, and the
    empty tree precedes every tree)."""
    if first == second:
        return not path and first_root == second_root
    if first == 0:
        return not path
    if not 0 < first < second or not path:
        return False
    path = [first_root, *path] if first & (first - 1) == 0 else list(path)
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            while fn and not fn & 1:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    return fr == first_root and sr == second_root and sn == 0


def frontier_append(frontier: list[bytes], size: int, leaf: bytes) -> list[tuple[int, int, bytes]]:
    """Add a leaf hash to `frontier`, the hashes of the subtrees that make up a tree of `size` leaves
    (largest first: what a monitor keeps to replay a log without holding it, and what an append needs
    of the tree). Returns (level, idx, hash) of each subtree the leaf completes: O(log n) hashing."""
    completed, digest, level = [], leaf, 0
    while size >> level & 1:
        digest = node_hash(frontier.pop(), digest)
        level += 1
        completed.append((level, size >> level, digest))
    frontier.append(digest)
    return completed


def frontier_root(frontier: Sequence[bytes]) -> bytes:
    return range_hash(frontier) if frontier else EMPTY_ROOT


class LogEdge:
    """The receipt log's right edge as this process last appended to it: the frontier of its first
    `size` leaves, so that an append finds the siblings of the subtrees it completes without reading
    them back. Each append checks `size` against the index it was given and, on PostgreSQL (where other
    instances append too), `last` (the hash of the leaf at size - 1) against the leaf before its own, so
    an append that was rolled back, or one made elsewhere, costs one read of the frontier, never a
    wrong hash. Used by units of work, one at a time: on PostgreSQL, where an instance's writers run
    units at once, the log's numbering lock lets one append at a time (the next waits in
    insert_log_leaf until the first commits), and an append is its unit's last write."""

    def __init__(self) -> None:
        self.size, self.frontier, self.last = -1, [], b""

    def reset(self) -> None:
        """Forget the edge (after an aborted batch)."""
        self.size, self.frontier, self.last = -1, [], b""


def b64(data: bytes) -> str:
    """Standard base64 with padding, as signed notes and checkpoints write hashes."""
    return base64.b64encode(data).decode("ascii")


def b64_decode(text: str) -> bytes:
    """Raises ValueError (binascii.Error) for anything but standard base64."""
    return base64.b64decode(text, validate=True)


def default_origin(coordinator_id: str, public_key: bytes) -> str:
    """An origin line no other coordinator's log shares: COORDINATOR_ID (as an origin may spell it),
    /receipt-log/, and 16 hex chars of the log key's SHA-256."""
    name = re.sub(r"[^!-*,-~]", "-", coordinator_id)[:200] or "aitbc-coordinator"
    return f"{name}/receipt-log/{hashlib.sha256(public_key).hexdigest()[:16]}"


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A signed tree head's body in the C2SP tlog-checkpoint format: origin, tree size and base64 root
    hash lines, then extension lines (this log writes `timestamp <Unix ms>`), each ending in a newline."""

    origin: str
    tree_size: int
    root_hash: bytes
    extensions: tuple[str, ...] = ()

    def body(self) -> str:
        return "".join(f"{line}\n" for line in (self.origin, self.tree_size, b64(self.root_hash), *self.extensions))

    @classmethod
    def parse(cls, body: str) -> Checkpoint:
        """Raises ValueError saying what is malformed."""
        lines = body.split("\n")
        if len(lines) < 4 or lines[-1] != "" or not all(lines[:-1]):
            raise ValueError("a checkpoint is an origin, a size and a root hash line, each ending in a newline")
        origin, size, root, *extensions = lines[:-1]
        if not re.fullmatch(r"0|[1-9][0-9]{0,18}", size):
            raise ValueError(f"tree size {size[:30]!r} is not a decimal number")
        try:
            root_hash = b64_decode(root)
        except ValueError:
            root_hash = b""
        if len(root_hash) != 32:
            raise ValueError("the root hash is not 32 bytes of base64")
        return cls(origin, int(size), root_hash, tuple(extensions))


NOTE_DASH = "\u2014"  # each signature line of a signed note starts with an em dash and a space
SIGNATURE_LINE_RE = re.compile(NOTE_DASH + r" ([^\s+]+) ([A-Za-z0-9+/]+=*)")


ED25519_NOTE_KEY = b"\x01"  # the signature type byte of an Ed25519 signed-note key


def note_key_hash(name: str, public_key: bytes) -> bytes:
    """C2SP signed-note key ID of an Ed25519 key: SHA-256(name || 0x0A || 0x01 || key)[:4]."""
    return hashlib.sha256(name.encode() + b"\n" + ED25519_NOTE_KEY + public_key).digest()[:4]


@dataclasses.dataclass(frozen=True)
class NoteVerifier:
    """An Ed25519 signed-note verifier key (C2SP signed-note): a key name and a public key."""

    name: str
    public_key: bytes

    @property
    def key_hash(self) -> bytes:
        return note_key_hash(self.name, self.public_key)

    def encode(self) -> str:
        """The verifier key string: <name>+<key ID, 8 hex>+<base64(0x01 || key)>."""
        return f"{self.name}+{self.key_hash.hex()}+{b64(ED25519_NOTE_KEY + self.public_key)}"

    @classmethod
    def parse(cls, text: str) -> NoteVerifier:
        """From a verifier key string; raises ValueError."""
        parts = text.strip().split("+", 2)  # a name has no "+"; base64 may
        name, key_hash, key = parts if len(parts) == 3 else ("", "", "")
        try:
            raw = b64_decode(key)
        except ValueError:
            raw = b""
        if not ORIGIN_RE.fullmatch(name) or len(raw) != 33 or raw[:1] != ED25519_NOTE_KEY:
            raise ValueError("not an Ed25519 verifier key (<name>+<8 hex>+<base64 of 0x01 and the key>)")
        verifier = cls(name, raw[1:])
        if verifier.key_hash.hex() != key_hash.lower():
            raise ValueError("the verifier key's ID does not match its name and key")
        return verifier

    def open(self, note: str) -> str:
        """The text of a signed note that carries a valid signature by this key; raises ValueError
        saying why not (malformed, unsigned by this key, or a signature that does not verify)."""
        split = note.rfind("\n\n")
        if split < 0 or not note.endswith("\n"):
            raise ValueError("not a signed note (text, a blank line, signature lines)")
        text, ours = note[:split + 1], []
        for line in note[split + 2:-1].split("\n"):
            match = SIGNATURE_LINE_RE.fullmatch(line)
            try:
                signature = b64_decode(match[2]) if match is not None else b""
            except ValueError:
                signature = b""
            if len(signature) < 5:
                raise ValueError(f"malformed signature line {line[:60]!r}")
            if match[1] == self.name and signature[:4] == self.key_hash:
                ours.append(signature[4:])
        if not ours:
            raise ValueError(f"not signed by the key {self.encode()}")
        try:
            VerifyKey(self.public_key).verify(text.encode(), ours[0])
        except (CryptoError, ValueError):
            raise ValueError(f"the signature by {self.name} does not verify (note altered or forged)") from None
        return text


@dataclasses.dataclass(frozen=True)
class Notary:
    """Signs checkpoints as C2SP signed notes with an Ed25519 key named after the log's origin."""

    key: SigningKey
    origin: str

    @property
    def verifier(self) -> NoteVerifier:
        return NoteVerifier(self.origin, bytes(self.key.verify_key))

    def sign(self, checkpoint: Checkpoint) -> str:
        """The signed note of a checkpoint: its body, a blank line, one signature line."""
        text = checkpoint.body()
        signature = self.verifier.key_hash + self.key.sign(text.encode()).signature
        return f"{text}\n{NOTE_DASH} {self.origin} {b64(signature)}\n"
# --- The archive: each day's finished jobs as gzip JSON Lines ---

DAY_MS = 86_400_000
ARCHIVE_FIELDS = ("job_id", "seq", "client_id", "state", "assigned_miner_id", "attempts", "requested_at",
                  "expires_at", "assigned_at", "finished_at", "error", "value", "pruned_at")


def day_start(ms: int) -> int:
    """The start (Unix ms) of the UTC day holding `ms`."""
    return ms - ms % DAY_MS


def day_name(ms: int) -> str:
    """The UTC day holding `ms` as YYYY-MM-DD."""
    return time.strftime("%Y-%m-%d", time.gmtime(ms // 1000))


def archive_line(row: Mapping[str, Any], receipts: Sequence[str]) -> str:
    """One archived job as a JSON object: its summary (timestamps in Unix ms), constraints, payload,
    result and metrics, and its receipts, their signed JSON texts spliced in byte for byte (so each
    receipt still verifies). A pruned job's payload, result and metrics are null."""
    return spliced_json({name: row[name] for name in ARCHIVE_FIELDS},
                        {"constraints": shown_constraints(row["constraints"]), "payload": row["payload"],
                         "result": row["result"], "metrics": row["metrics"], "receipts": f"[{','.join(receipts)}]"})


class ArchiveFile:
    """One day's archive as it is written: gzip JSON Lines (one job a line) in a hidden file of its own
    (a unique name per writer, holding the writer's pid), made durable (fsync) and published by
    `finish` under the first free archive name with a hard link, which never replaces a file: so a
    file under an archive name is always whole, and two writers of one day (the server and an
    `aitbc-coord archive` into the same directory) each publish their own. A second file for a day
    (written after a restart, by another writer, or for jobs that finished late on a wall clock that
    stepped back) is named jobs-YYYY-MM-DD.2.jsonl.gz, .3, and so on."""

    STALE_SECONDS = 600.0  # a partial file untouched this long whose writer is gone is an interrupted run's
    ABANDONED_SECONDS = 86_400.0  # ... and one untouched this long is stale whoever wrote it
    # .jobs-DAY.<pid>.<random>.partial, or an older version's .jobs-DAY[.N].jsonl.gz.partial (no pid)
    PARTIAL_RE = re.compile(r"\.jobs-[0-9-]+(?:\.(\d+)\.[^.]*|(?:\.\d+)?\.jsonl\.gz)\.partial")

    def __init__(self, directory: Path, day: int) -> None:
        self.directory, self.day = directory, day
        self.stem = f"jobs-{day_name(day)}"
        fd, partial = tempfile.mkstemp(dir=directory, prefix=f".{self.stem}.{os.getpid()}.", suffix=".partial")
        self.partial = Path(partial)  # mode 0600
        self.raw = os.fdopen(fd, "wb")
        self.gzip = gzip.GzipFile(filename=f"{self.stem}.jsonl", mode="wb", compresslevel=6, fileobj=self.raw)
        self.jobs = 0

    def write(self, line: str) -> None:
        self.gzip.write(line.encode("utf-8") + b"\n")
        self.jobs += 1

    def finish(self) -> Path:
        """Close, sync and publish the file under the first free name; its final path. Raises OSError."""
        self.gzip.close()
        self.raw.flush()
        os.fsync(self.raw.fileno())
        self.raw.close()
        for n in itertools.count(1):
            path = self.directory / f"{self.stem}{f'.{n}' if n > 1 else ''}.jsonl.gz"
            try:
                os.link(self.partial, path)  # fails if the name is taken: never replaces an archive
            except FileExistsError:
                continue
            break
        self.partial.unlink()
        _fsync(self.directory)
        return path

    def abandon(self) -> None:
        """Give up: close and remove the partial file."""
        with contextlib.suppress(OSError):
            self.gzip.close()
            self.raw.close()
        self.partial.unlink(missing_ok=True)

    @classmethod
    def remove_stale(cls, directory: Path, now: float) -> list[Path]:
        """Remove the partial files of interrupted runs from `directory`: untouched for STALE_SECONDS
        with their writer (the pid in the name) gone from this host, or for ABANDONED_SECONDS. A
        partial file another writer is still writing stays. The files removed."""
        removed = []
        for partial in directory.glob(".jobs-*.partial"):
            match = cls.PARTIAL_RE.fullmatch(partial.name)
            try:
                idle = now - partial.stat().st_mtime
                if match is None or idle < cls.STALE_SECONDS:
                    continue
                if idle < cls.ABANDONED_SECONDS and match[1] is not None and process_alive(int(match[1])):
                    continue
                partial.unlink()
            except FileNotFoundError:  # its writer published or abandoned it meanwhile
                continue
            removed.append(partial)
        return removed


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (signal 0: nothing is sent)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    except OverflowError:  # an id no process can have
        return False
    return True


def read_archive(path: str | os.PathLike[str]) -> Iterable[dict[str, Any]]:
    """The jobs of an archive file (a str or Path naming gzip or plain JSON Lines), one dict a line;
    raises OSError or ValueError."""
    path = Path(path)
    with path.open("rb") as probe:
        zipped = probe.read(2) == b"\x1f\x8b"
    with (gzip.open(path, "rb") if zipped else path.open("rb")) as lines:
        for line in lines:
            if line.strip():
                try:
                    job = load_json(line)
                except RecursionError:
                    raise ValueError("a line nests too deeply") from None
                # a line is a job whose payload and result nest MAX_JSON_DEPTH deep at most (as submitted)
                if line.count(b"[") + line.count(b"{") > MAX_JSON_DEPTH and nested_deeper_than(job, 2 * MAX_JSON_DEPTH):
                    raise ValueError(f"a line nests deeper than {2 * MAX_JSON_DEPTH} levels")
                yield job


# --- Rate limits and the poll hub ---

class RateLimiter:
    """Fixed-window request counts per caller key (an identity, or a client address).

    O(1) a call with any number of callers: counts live in insertion order, a caller's entry moves to
    the back when its window starts, and each call drops at most two entries of ended windows from
    the front, so the table holds about the callers of the current window.
    """

    def __init__(self, limit: int, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.window, self.clock = limit, window, clock
        self.counts: collections.OrderedDict[str, list[float]] = collections.OrderedDict()

    def hit(self, key: str) -> None:
        """Count one request of `key`; raises TooManyRequests past the limit (off when limit is 0)."""
        if self.limit <= 0 or self.window <= 0:
            return
        now = self.clock()
        start = now - now % self.window
        counts = self.counts
        entry = counts.get(key)
        if entry is None or entry[0] != start:
            entry = counts[key] = [start, 0]
            counts.move_to_end(key)
            for _ in range(2):
                oldest = next(iter(counts.values()))
                if oldest[0] == start:
                    break
                counts.popitem(last=False)
        entry[1] += 1
        if entry[1] > self.limit:
            raise TooManyRequests(retry_after=start + self.window - now)


@dataclasses.dataclass(eq=False)  # compared and hashed by identity
class Waiter:
    """One long-poll in the hub."""

    miner_id: str
    event: asyncio.Event
    since: int  # the order polls started waiting in: the longest-waiting able miner is picked first
    profile: MinerProfile | None = None  # known once its first claim has read the miner
    parked: bool = False  # waiting on its event (not claiming)
    kind: str | None = None  # the miner kind whose queue it waits in for a new job (None: only its miner's)
    ticket: int = 0  # its live entry in that queue's heap (KindQueue.earlier); 0 while in none
    woken_for: list[QueuedJob] = dataclasses.field(default_factory=list)  # jobs it was picked for
    handed: Any = None  # a job claimed for it in a submit's own transaction, once committed (PollHub.take)


class KindQueue:
    """The ready parked polls of one miner kind, the longest-waiting first (by when each poll began).

    A poll that began after every poll parked here (a renewal, nearly all of them) goes to the back
    of `fifo` in O(1). One that began earlier (back from a claim that missed, as during a burst, or
    from a claim that ended out of order) goes into `earlier`, a heap, in O(log n) however many
    parked after it: kept in one ordered list, each such return walked them, which at 10,000 miners
    was half the server's time in a burst. The head is the older of the two fronts. A poll that
    leaves `earlier` is dropped lazily: skipped once at the front, the heap rebuilt when stale
    entries outnumber the live ones (a rebuild is as long as the polls that came back, never the
    whole kind: no stall of the loop in a fleet's steady renewals)."""

    __slots__ = ("earlier", "fifo", "profile", "stale")
    SLACK = 32  # stale entries tolerated beyond the live ones before a rebuild

    def __init__(self, profile: MinerProfile) -> None:
        self.fifo: collections.OrderedDict[Waiter, None] = collections.OrderedDict()
        self.earlier: list[tuple[int, int, Waiter]] = []  # (since, ticket, waiter): live while the ticket is its own
        self.stale = 0
        self.profile = profile  # one profile of the kind: all of them satisfy the same constraints

    def __len__(self) -> int:
        return len(self.fifo) + len(self.earlier) - self.stale

    def push(self, waiter: Waiter, ticket: int) -> None:
        """Add `waiter` in its place by `since`; `ticket`: unique, > 0."""
        fifo = self.fifo
        if not fifo or next(reversed(fifo)).since < waiter.since:
            fifo[waiter] = None
        else:
            waiter.ticket = ticket
            heapq.heappush(self.earlier, (waiter.since, ticket, waiter))

    def drop(self, waiter: Waiter) -> None:
        """`waiter` (in this queue) leaves it."""
        if not waiter.ticket:
            del self.fifo[waiter]
            return
        waiter.ticket = 0
        self.stale += 1
        if 2 * self.stale > len(self.earlier) + self.SLACK:
            self.earlier = [entry for entry in self.earlier if entry[1] == entry[2].ticket]
            heapq.heapify(self.earlier)
            self.stale = 0

    def head(self) -> Waiter:
        """The longest-waiting poll (the queue holds at least one)."""
        earlier = self.earlier
        while earlier and earlier[0][1] != earlier[0][2].ticket:
            heapq.heappop(earlier)
            self.stale -= 1
        if earlier and (not self.fifo or earlier[0][0] < next(iter(self.fifo)).since):
            return earlier[0][2]
        return next(iter(self.fifo))


class PollHub:
    """Long-polling miners, indexed by what wakes them, so an event costs the waiters it concerns.

    A poll parks after a claim that found nothing: under its miner (a freed slot or a status change
    wakes that miner's polls, and only them) and, when the miner has a free slot, in the queue of its
    miner kind (miners with the same fit_key_of satisfy the same jobs), oldest first. A
    newly queued job is matched against each parked kind once (cached) and wakes the longest-waiting
    poll among the kinds that can run it: never one that cannot, never more than one. A poll that is
    claiming is not parked; it compares marks when its claim is done (changed_since), so a job
    queued or a slot freed meanwhile is not missed. Every call is O(kinds parked), not O(polls),
    with O(log polls) more to park or pick in a kind's queue (KindQueue).
    """

    RECENT = 64  # newly queued jobs remembered for claims that overlapped them
    MAX_FITS = 1 << 16  # remembered (miner kind, constraints) answers; forgotten all at once past this

    def __init__(self) -> None:
        self.by_miner: dict[str, dict[Waiter, None]] = {}
        self.kinds: dict[str, KindQueue] = {}  # ready and parked, the longest-waiting first
        self.tickets = 0  # entries made in the kinds' queues
        # taken for a hand-off whose transaction is not committed yet: the job claimed for each (None while claiming)
        self.handing: dict[Waiter, Any] = {}
        self.fits: dict[tuple[str, str], bool] = {}
        self.queued_version = 0  # newly queued jobs notified so far
        self.recent: collections.deque[tuple[int, str]] = collections.deque(maxlen=self.RECENT)
        self.slot_versions: dict[str, int] = {}  # per miner with polls: freed slots and status changes notified
        self.started = 0
        self.count = 0
        self.examined = 0  # parked polls looked at to place a job (tests count it)
        self.closing = False

    @property
    def waiters(self) -> list[Waiter]:
        return [w for polls in self.by_miner.values() for w in polls]

    def polls_of(self, miner_id: str) -> int:
        return len(self.by_miner.get(miner_id, ()))

    def add(self, miner_id: str) -> Waiter:
        """A new long-poll of `miner_id` (not parked until its first claim finds nothing)."""
        self.started += 1
        self.count += 1
        waiter = Waiter(miner_id, asyncio.Event(), self.started)
        self.by_miner.setdefault(miner_id, {})[waiter] = None
        return waiter

    def remove(self, waiter: Waiter) -> None:
        """The poll has ended (a second call changes nothing)."""
        polls = self.by_miner.get(waiter.miner_id, {})
        if waiter not in polls:
            return
        self.unpark(waiter)
        del polls[waiter]
        self.count -= 1
        if not polls:  # nothing of a miner without polls is kept: a fleet's churn does not grow the hub
            del self.by_miner[waiter.miner_id]
            self.slot_versions.pop(waiter.miner_id, None)

    def mark(self, miner_id: str) -> tuple[int, int]:
        """Where the hub stands for a claim about to start."""
        return self.queued_version, self.slot_versions.get(miner_id, 0)

    def changed_since(self, mark: tuple[int, int], profile: MinerProfile, ready: bool) -> bool:
        """Whether, since `mark`, the miner's slots or status changed or (when it has a free slot) a job
        it can run was queued: its claim may have missed it."""
        queued, slots = mark
        if self.slot_versions.get(profile.miner_id, 0) != slots:
            return True
        if not ready or self.queued_version == queued:
            return False
        if self.queued_version - queued > len(self.recent):
            return True  # more than is remembered: claim again to be sure
        return any(self.can_run(profile, text) for version, text in self.recent if version > queued)

    def can_run(self, profile: MinerProfile, constraints: str) -> bool:
        key = (profile.fit_key, constraints)
        fit = self.fits.get(key)
        if fit is None:
            if len(self.fits) >= self.MAX_FITS:
                self.fits.clear()
            fit = self.fits[key] = satisfies(load_json(constraints), profile)
        return fit

    def park(self, waiter: Waiter, profile: MinerProfile, ready: bool) -> None:
        """Wait for work: under its miner always, in its kind's queue when the miner has a free slot."""
        waiter.profile, waiter.parked = profile, True
        waiter.event.clear()
        if not ready:
            return
        kind = waiter.kind = profile.fit_key
        kind_queue = self.kinds.get(kind)
        if kind_queue is None:
            kind_queue = self.kinds[kind] = KindQueue(profile)
        # ordered by when the poll began, not by when its claim ended: one back from a claim that
        # missed keeps its place, and claims that end out of order (PostgreSQL's run on threads) too
        self.tickets += 1
        kind_queue.push(waiter, self.tickets)

    def unpark(self, waiter: Waiter) -> None:
        waiter.parked = False
        if waiter.kind is not None:
            kind_queue = self.kinds[waiter.kind]
            kind_queue.drop(waiter)
            if not kind_queue:
                del self.kinds[waiter.kind]
            waiter.kind = None

    def _wake(self, waiter: Waiter) -> None:
        if waiter.parked:
            self.unpark(waiter)
            waiter.event.set()

    def notify(self, wake: Wake) -> None:
        """Wake the polls a committed change concerns: those of miners whose slot freed or status
        changed, and for each newly queued job the longest-waiting poll able to run it."""
        for miner_id in wake.miners:
            polls = self.by_miner.get(miner_id)
            if polls is None:  # no poll of it holds a mark to compare (its versions go with its last poll)
                continue
            self.slot_versions[miner_id] = self.slot_versions.get(miner_id, 0) + 1
            for waiter in list(polls):
                if waiter.kind is None:  # a ready poll already waits for any job: it keeps its place
                    self._wake(waiter)
        for job in wake.queued:
            self.queued_version += 1
            self.recent.append((self.queued_version, job[1]))
            best = self.longest_able(job[1])
            if best is not None:
                best.woken_for.append(job)
                self._wake(best)

    def longest_able(self, constraints: str) -> Waiter | None:
        """The longest-waiting parked poll able to run a job with `constraints` (stored text), or None."""
        best = None
        for kind_queue in self.kinds.values():
            if self.can_run(kind_queue.profile, constraints):
                head = kind_queue.head()
                self.examined += 1
                if best is None or head.since < best.since:
                    best = head
        return best

    def take(self, constraints: str) -> Waiter | None:
        """For a submit's own transaction: the longest-waiting parked poll able to run its job, taken out
        of every queue without waking it, until deliver() or give_back(); None when there is none."""
        waiter = self.longest_able(constraints)
        if waiter is not None:
            self.unpark(waiter)
            self.handing[waiter] = None
        return waiter

    def hold(self, waiter: Waiter, job: Any) -> None:
        """`job` was claimed for the taken `waiter`: it is the poll's once the transaction commits."""
        self.handing[waiter] = job

    def deliver_all(self) -> list[tuple[str, Any]]:
        """The transaction that claimed the held jobs has committed: each poll answers with its job.
        Returns (miner id, job) for each whose poll ended meanwhile (its client gone): nobody holds those."""
        orphans = []
        for waiter, job in self.handing.items():
            if waiter in self.by_miner.get(waiter.miner_id, ()):
                waiter.handed = job
                waiter.event.set()
            else:
                orphans.append((waiter.miner_id, job))
        self.handing.clear()
        return orphans

    def give_back(self, waiter: Waiter) -> None:
        """No job was claimed for a taken poll (or its transaction was undone): it claims for itself."""
        if waiter in self.handing:
            del self.handing[waiter]
            waiter.event.set()

    def give_back_all(self) -> None:
        """A batch failed to commit: every hand-off in it is undone."""
        for waiter in list(self.handing):
            self.give_back(waiter)

    def wake_all(self) -> None:
        """Wake every parked poll to claim again (what may have been queued is not known: another
        instance's wake-ups were lost while the listener reconnected)."""
        for waiter in self.waiters:
            self._wake(waiter)

    def close(self) -> None:
        """Release every waiter at once (shutdown)."""
        self.closing = True
        for waiter in self.waiters:
            waiter.event.set()


class Peers:
    """Wake-ups between coordinator instances that share one PostgreSQL database (LISTEN/NOTIFY on one
    channel). What one instance commits that may give a miner work (Wake: jobs newly QUEUED, with their
    constraints; miners whose slot freed or status changed) is sent to the others after the commit,
    never inside the write transaction (a NOTIFY there serialises every commit of the cluster); a
    loop turn's wakes go out together, in payloads under PostgreSQL's 8,000 bytes. A listener thread
    on a connection of its own hands what the others sent to `on_wake` on the event loop; it
    reconnects when the connection drops and then calls `on_connect` (what was sent meanwhile is lost:
    the caller wakes its polls to claim again). A notification lost on the way costs at most one sweep
    tick: the sweep re-announces the heads of the queue (Coordinator.reannounce).

    Nothing is sent while no other instance listens (one instance on PostgreSQL has no one to wake):
    the listener's session carries LISTENER_NAME as its application_name, and the listener counts the
    other such sessions of the database (pg_stat_activity) every LISTEN_SECONDS, and at once when an
    instance announces that it started or stops (a payload with no wake-up in it, sent on both). An
    instance that starts listening is counted only some time after, so wake-ups held back (since the
    last count that found nobody began) are kept, as are those whose NOTIFY failed, and sent once a
    count finds others: the sweep's re-announcement covers queued jobs, but not a freed slot."""

    CHANNEL = "aitbc_wake"
    LISTENER_NAME = "aitbc-coord wake-up listener"  # the listener's application_name
    LISTEN_SECONDS = 0.5  # a wait for notifications, between counts of the other instances
    MAX_PAYLOAD = 7900  # bytes; PostgreSQL refuses a payload of 8,000 or more
    MAX_UNSENT = 1000  # queued jobs kept for another instance while none is counted (_keep)
    RECONNECT_SECONDS = (0.05, 2.0)  # first and longest wait between attempts

    def __init__(self, url: str, on_wake: Callable[[Wake], None], on_connect: Callable[[], None],
                 notify: Callable[[str, list[str]], None] | None = None) -> None:
        # notify(channel, payloads) sends, blocking (PgDatabase.notify, on its pool)
        self.url, self.on_wake, self.on_connect, self.notify = url, on_wake, on_connect, notify
        self.instance = secrets.token_hex(8)  # payloads from this process are not for it
        self.pending = Wake()
        self.connected = False
        self.others: int | None = None  # other instances listening; None: not counted (send)
        self._counts = 0  # counts of the others begun (the listener's)
        self.unsent = Wake()  # held back or failed: for the next count that finds others (_counted)
        self._unsent_at = 0  # the count in force when the last of them was kept
        self.sent = self.received = self.reconnects = 0
        self._stop = threading.Event()
        self._conn: Any = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start listening (a daemon thread) and sending (on `loop`)."""
        self._loop = loop
        self._flushing: asyncio.Task[None] | None = None
        self._thread = threading.Thread(target=self._listen_forever, name="aitbc-peers", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Send what is pending, then stop listening: a notification of this instance's own (which every
        instance ignores) ends the listener's wait at once, rather than at its next timeout."""
        self._stop.set()
        while self._flushing is not None:
            await self._flushing
        await self._flush()
        if self.connected and self.notify is not None:
            with contextlib.suppress(*DB_ERRORS):
                await asyncio.to_thread(self.notify, self.CHANNEL, [compact_json({"i": self.instance})])
        await asyncio.to_thread(self._thread.join, 5.0)

    def send(self, wake: Wake) -> None:
        """Queue `wake` for the other instances; sent once this loop turn's commits are all handled
        (nothing is sent once stop() has begun)."""
        if self._stop.is_set():
            return
        self.pending.queued += wake.queued
        self.pending.miners |= wake.miners
        if self._flushing is None:
            self._flushing = self._loop.create_task(self._flush_soon())

    async def _flush_soon(self) -> None:
        await asyncio.sleep(0)  # the rest of this turn's commits join the same payloads
        try:
            await self._flush()
        finally:
            self._flushing = None

    async def _flush(self) -> None:
        wake, self.pending = self.pending, Wake()
        if not wake or self.notify is None:
            return
        if self.others == 0:  # nobody listens, as of the last count: kept in case one has just begun to
            self._keep(wake)
            return
        try:
            await asyncio.to_thread(self.notify, self.CHANNEL, self.payloads(wake))
            self.sent += 1
        except DB_ERRORS as exc:
            log.warning("wake-ups for other instances not sent: %s (again once the listener counts them)", exc)
            self._keep(wake)

    def _keep(self, wake: Wake) -> None:
        """Keep wake-ups not sent, for _counted: every miner named, and up to MAX_UNSENT jobs (the sweep
        re-announces the queue's heads, which covers the rest)."""
        self.unsent.queued += wake.queued[:max(0, self.MAX_UNSENT - len(self.unsent.queued))]
        self.unsent.miners |= wake.miners
        self._unsent_at = self._counts

    def _counted(self, others: int, count: int) -> None:
        """On the loop: count number `count` found `others` other instances listening. The wake-ups kept
        (_keep) go out once a count finds others: one may have listened already when they were held
        back (it started or reconnected, and was not counted yet), or their NOTIFY failed. A count that
        found nobody, begun after the last was kept, makes them moot: an instance that begins to listen
        later has its polls claim afresh (on_connect)."""
        if not self.unsent:
            return
        if others:
            wake, self.unsent = self.unsent, Wake()
            self.send(wake)
        elif self._unsent_at < count:
            self.unsent = Wake()

    def payloads(self, wake: Wake) -> list[str]:
        """`wake` as JSON payloads of at most MAX_PAYLOAD bytes: {"i": sender, "q": [[job_id,
        constraints, shape_id], ...], "m": [miner_id, ...]}; a job whose constraints do not fit is sent
        without them (null: the receiver reads them). ({"i": sender} alone: an instance starting or
        stopping.)"""
        items = [("q", [job_id, text if len(text) < self.MAX_PAYLOAD // 2 else None, shape_id])
                 for job_id, text, shape_id in wake.queued] + [("m", miner) for miner in sorted(wake.miners)]
        out: list[str] = []
        batch: dict[str, list[Any]] = {"q": [], "m": []}
        size = 0
        for key, item in items:
            cost = len(compact_json(item).encode()) + 1
            if size + cost > self.MAX_PAYLOAD - 64 and size:
                out.append(compact_json({"i": self.instance, **batch}))
                batch, size = {"q": [], "m": []}, 0
            batch[key].append(item)
            size += cost
        if size:
            out.append(compact_json({"i": self.instance, **batch}))
        return out

    def _listen_forever(self) -> None:
        wait = self.RECONNECT_SECONDS[0]
        while not self._stop.is_set():
            try:
                self._conn = conn = pg_connect(self.url, application_name=self.LISTENER_NAME)
                conn.execute(f"LISTEN {self.CHANNEL}")
                conn.execute("SELECT pg_notify(%s, %s)", (self.CHANNEL, compact_json({"i": self.instance})))  # started
                self.connected, wait = True, self.RECONNECT_SECONDS[0]
                self._loop.call_soon_threadsafe(self.on_connect)
                while not self._stop.is_set():
                    self._counts += 1
                    count = self._counts
                    self.others = others = self._count_others(conn)
                    self._loop.call_soon_threadsafe(self._counted, others, count)
                    # until the next count is due or an instance started or stops; a packet's notifications
                    # are all handled (leaving the generator amid one drops the rest)
                    deadline, recount = time.monotonic() + self.LISTEN_SECONDS, False
                    while not recount and not self._stop.is_set() and (left := deadline - time.monotonic()) > 0:
                        for note in conn.notifies(timeout=left, stop_after=1):
                            recount = not self._receive(note.payload) or recount
            except DB_ERRORS as exc:
                if self._stop.is_set():
                    break
                self.connected = False
                self.reconnects += 1
                log.warning("listening for other instances' wake-ups failed (%s): again in %.2f s", exc, wait)
                self._stop.wait(wait)
                wait = min(wait * 2, self.RECONNECT_SECONDS[1])
            except RuntimeError:  # the loop has closed
                break
            finally:
                self.connected, self.others = False, None
                if self._conn is not None:
                    with contextlib.suppress(*DB_ERRORS):
                        self._conn.close()

    def _count_others(self, conn: Any) -> int:
        """The other instances' listeners on this database (application_name is shown for every role's
        sessions); raises psycopg.Error."""
        return int(conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                                " AND application_name = %s AND pid <> pg_backend_pid()",
                                (self.LISTENER_NAME,)).fetchone()[0])

    def _receive(self, payload: str) -> bool:
        """Hand another instance's wake-up to the loop; False for an instance starting or stopping."""
        try:
            note = json.loads(payload)
            if note.get("i") == self.instance:
                return True
            wake = Wake(queued=[(job_id, text, shape_id) for job_id, text, shape_id in note.get("q", [])],
                        miners=set(note.get("m", [])))
        except (ValueError, TypeError, AttributeError) as exc:
            log.warning("a wake-up payload that does not read (%s): ignored", exc)
            return True
        if not wake:  # another instance starting or stopping (see _listen_forever, stop)
            return False
        self.received += 1
        self._loop.call_soon_threadsafe(self.on_wake, wake)
        return True


# === Units of work ===
# Each runs inside the writer's transaction (Database.write), in its own SAVEPOINT (PostgreSQL: in a
# transaction of its own, taking its locks in LOCK ORDER), and returns an Outcome: its value, whom to
# wake after the commit, and an error to raise after it.

def tx_submit(conn: sqlite3.Connection, client_id: str, payload: str, constraints: str, shape: str, ttl_ms: int,
              now: int, idem: tuple[str, str] | None, idem_since: int, value: str | None = None,
              hand_off: tuple[PollHub, Matcher] | None = None) -> Outcome:
    """Queue a job, or return the job an earlier request with the same Idempotency-Key made.

    `hand_off` (SQLite, where units run on the loop's thread): the longest-waiting parked poll able
    to run the job claims in this same transaction, as its own claim would (the oldest job it can
    run), and is given that job once this commits: one commit and a claim's round of the event loop
    fewer between a submit and a miner holding its job."""
    if idem is not None:
        seen = get_idempotency(conn, client_id, idem[0], idem_since)
        if seen is not None:
            if seen["request_hash"] != idem[1]:
                raise Unprocessable("idempotency key reused with a different request")
            return Outcome(get_job(conn, seen["job_id"]))
    job_id = secrets.token_hex(16)
    shape_id = ensure_shape(conn, shape)
    row = insert_job(conn, job_id, client_id, payload, constraints, shape_id, now, now + ttl_ms, value)
    if idem is not None:
        put_idempotency(conn, client_id, idem[0], idem[1], job_id, now)
    out = Outcome(row, Wake(queued=[(job_id, constraints, shape_id)]))
    if hand_off is not None:
        hand_to_parked(conn, out, now, *hand_off)
    return out


def hand_to_parked(conn: sqlite3.Connection, out: Outcome, now: int, hub: PollHub, matcher: Matcher) -> None:
    """tx_submit's hand-off (the unit's last step: nothing after it can undo the claim): the job `out`
    queues goes to the poll hub.take picks, if its claim takes it; a job still queued is announced
    as usual. A poll whose claim found nothing claims again for itself."""
    job_id, constraints, shape_id = out.wake.queued[0]
    waiter = hub.take(constraints)
    if waiter is None:
        return
    try:
        matcher.queue([shape_id])  # committed with this unit, or Matcher.reset if the batch is not
        claimed = claim(conn, waiter.miner_id, now, matcher)
    except BaseException:
        hub.give_back(waiter)
        # the unit is undone, the shape it may have made too, whose id the next new shape takes: the
        # matcher read it inside this unit and must not keep it
        matcher.reset()
        raise
    if claimed is None or claimed[0] is None:
        hub.give_back(waiter)
        return
    hub.hold(waiter, claimed[0])  # delivered by the commit (Coordinator.deliver_hand_offs)
    if claimed[0]["job_id"] == job_id:
        out.wake.queued.clear()


def tx_cancel(conn: sqlite3.Connection, client_id: str, job_id: str, now: int) -> Outcome:
    """Cancel a client's QUEUED or RUNNING job; raises NotFound; returns Conflict when not cancelable."""
    lock_job(conn, job_id)
    job = get_job(conn, job_id)
    if job is None or job["client_id"] != client_id:
        raise NotFound("job not found")
    wake = Wake(miners={job["assigned_miner_id"]} if job["assigned_miner_id"] else set())
    if job["state"] in ACTIVE_STATES and job["expires_at"] <= now:
        finish_job(conn, job["seq"], JobState.EXPIRED, now, "job expired")
        return Outcome(wake=wake, error=Conflict("job not cancelable"))
    if job["state"] not in ACTIVE_STATES:
        raise Conflict("job not cancelable")
    finish_job(conn, job["seq"], JobState.CANCELED, now, "canceled by client")
    return Outcome(get_job(conn, job_id), wake)


def tx_register(conn: sqlite3.Connection, miner_id: str, capabilities: dict[str, Any], concurrency: int,
                region: str | None, now: int, max_attempts: int, heard_at: int | None = None) -> Outcome:
    """Create or replace a registration; jobs the miner still held go back to the queue. `heard_at`
    (PostgreSQL): now on the database server's clock, for touch_heard."""
    token = secrets.token_hex(16)
    upsert_miner(conn, miner_id, capabilities, concurrency, region, token, now)  # its row before its jobs' (LOCK ORDER)
    lock_jobs_where(conn, "state = 'RUNNING' AND assigned_miner_id = :miner", {"miner": miner_id})
    released = release_running(conn, "assigned_miner_id = :miner", {"miner": miner_id}, max_attempts,
                               now, "re-registered")
    if heard_at is not None:
        touch_heard(conn, {miner_id: heard_at})
    refresh_offers(conn, [miner_id])
    return Outcome(token, Wake(miners={miner_id}).add_rows(released))


def release_unreceived(conn: sqlite3.Connection, beats: Mapping[str, Beat]) -> Wake:
    """Judge heartbeats (miner -> (Unix ms, inflight)) not yet recorded, before their last_heartbeat is
    written (judge_inflight), and put back in the queue the jobs found never to have reached their
    miner, as if never claimed (the attempt given back); whom that wakes. A beat no newer than the
    miner's recorded heartbeat (another instance recorded a later one) is not judged. Expects an open
    transaction with the miners' rows locked (lock_miners), and locks the jobs' (LOCK ORDER)."""
    if not beats:
        return Wake()
    evidence: dict[str, list[sqlite3.Row]] = {}
    for row in list_inflight_evidence(conn, list(beats)):
        evidence.setdefault(row["miner_id"], []).append(row)
    marks, release = [], []
    for miner_id, rows in evidence.items():
        first, (at, inflight) = rows[0], beats[miner_id]
        if first["last_heartbeat"] is not None and first["last_heartbeat"] >= at:
            continue
        if inflight is not None and inflight >= len(rows) and all(r["assigned_at"] <= (first["known_through"] or 0)
                                                                   for r in rows):
            continue  # the usual beat: it counts every job, each counted before (judge_inflight would agree)
        held = [(r["assigned_at"], r["seq"], r["job_id"]) for r in rows]
        verdict = judge_inflight(beats[miner_id], first["last_heartbeat"], first["short_since"],
                                 first["known_through"], held)
        if (verdict.short_since, verdict.known_through) != (first["short_since"], first["known_through"]):
            marks.append((verdict.short_since, verdict.known_through, miner_id))
        release += [(seq, job_id, miner_id) for _, seq, job_id in held if job_id in verdict.release]
    set_inflight_marks(conn, marks)
    lock_jobs(conn, [seq for seq, _, _ in release])
    wake = Wake()
    for _, job_id, miner_id in release:
        if (row := requeue_job(conn, job_id, miner_id, count_attempt=False)) is not None:
            log.warning("job %s went back to the queue: miner %s's heartbeats did not count it (a claim"
                        " whose answer never reached it)", job_id, miner_id)
            wake.miners.add(miner_id)
            wake.add_rows([row])
    return wake


def tx_refresh_offers(conn: sqlite3.Connection, miner_ids: Sequence[str]) -> None:
    """Bring these miners' offers up to date (refresh_offers), their rows locked first (LOCK ORDER)."""
    lock_miners(conn, miner_ids)
    refresh_offers(conn, miner_ids)


def tx_heartbeat(conn: sqlite3.Connection, miner_id: str, inflight: int | None, status: str,
                 metadata: str | None, now: int) -> Outcome:
    """Record a heartbeat, putting back the jobs it shows never reached the miner (release_unreceived);
    raises NotFound for an unregistered miner."""
    lock_miners(conn, [miner_id])  # before its jobs are read (LOCK ORDER)
    before = conn.execute("SELECT status FROM miners WHERE miner_id = ?", (miner_id,)).fetchone()
    wake = release_unreceived(conn, {miner_id: (now, inflight)})
    if before is None or update_heartbeat(conn, miner_id, inflight, status, metadata, now) is None:
        raise NotFound("miner not registered")
    refresh_offers(conn, [miner_id])  # a DRAINING miner's offer closes
    if before["status"] != status:  # a status change may let its own poll take work (a job put back woke it)
        wake.miners.add(miner_id)  # (not otherwise: a woken poll claims for itself, ahead of older polls)
    return Outcome("ok", wake)


def tx_record_liveness(conn: sqlite3.Connection, seen: Mapping[str, int], beats: Mapping[str, Beat]) -> Outcome:
    """Record when miners were last heard from (`seen`) and the heartbeats kept in memory (`beats`,
    those that repeated the last one written), judging these as tx_heartbeat judges one. The value is
    the number of jobs put back."""
    lock_miners(conn, [*seen, *beats])  # in id order, before any is written (LOCK ORDER)
    wake = release_unreceived(conn, beats)
    touch_miners(conn, seen, beats)
    return Outcome(len(wake.queued), wake)


def read_poll(conn: sqlite3.Connection, miner_id: str, now: int,
              matcher: Matcher) -> tuple[MinerProfile | None, bool, bool]:
    """What a claim would find, read on the read connection (no write, no commit): (the miner, or None
    when it is not registered; whether it has a free slot; whether a job it can run is queued)."""
    row = get_profile(conn, miner_id)
    if row is None:
        return None, False, False
    miner = MinerProfile.from_row(row)
    ready = miner.status.upper() not in NO_WORK_STATUSES and row["running"] < miner.concurrency
    return miner, ready, ready and matcher.oldest(conn, miner, now) is not None


def tx_poll(conn: sqlite3.Connection, miner_id: str, now: int, matcher: Matcher,
            picked: Sequence[str] = ()) -> Outcome:
    """Claim, if the miner has a free slot, the first of `picked` (the jobs the poll hub woke this
    poll for) that is still QUEUED and that it can run, else the oldest QUEUED job it can run;
    raises NotFound. Polls woken together for different jobs may claim in any order (PostgreSQL runs
    claims on threads): each takes its own, so that the one woken for the newer job, claiming first,
    does not take the older job the other was woken for, which the other may be alone in able to run.

    The value is (job or None, the miner, whether it could take work).
    """
    claimed = claim(conn, miner_id, now, matcher, picked)
    if claimed is None:
        raise NotFound("miner not registered")
    return Outcome(claimed)


def claim(conn: sqlite3.Connection, miner_id: str, now: int, matcher: Matcher,
          picked: Sequence[str] = ()) -> tuple[sqlite3.Row | None, MinerProfile, bool] | None:
    """A poll's claim (tx_poll's, or one a submit makes for a parked poll): (the job claimed, assigned
    to the miner, or None; the miner; whether it had a free slot), or None when it is not registered."""
    row = touch_miner(conn, miner_id, now)
    if row is None:
        return None
    miner = MinerProfile.from_row(row)
    if miner.status.upper() in NO_WORK_STATUSES or row["running"] >= miner.concurrency:
        return None, miner, False
    for job_id in picked:
        queued = get_queued_job(conn, job_id, now, lock=True)
        if queued is not None and satisfies(load_json(queued["constraints"]), miner):
            return assign_job(conn, queued["seq"], miner_id, now), miner, True
    seq = matcher.oldest(conn, miner, now, lock=True)
    return (None if seq is None else assign_job(conn, seq, miner_id, now)), miner, True


def tx_release(conn: sqlite3.Connection, miner_id: str, job_id: str) -> Outcome:
    """Put back a job just claimed for a poll whose client had gone; the assignment never counted."""
    row = requeue_job(conn, job_id, miner_id, count_attempt=False)
    return Outcome(row is not None, Wake(miners={miner_id}).add_rows([row] if row else []))


def _check_holder(conn: sqlite3.Connection, miner_id: str, job: sqlite3.Row, now: int) -> ApiError | None:
    """Why `miner_id` may not report on `job` (None if it may); expires a job found past its deadline."""
    state = job["state"]
    if state == JobState.RUNNING and job["expires_at"] <= now:
        finish_job(conn, job["seq"], JobState.EXPIRED, now, "job expired")
        return Conflict("job expired")
    if state == JobState.RUNNING and job["assigned_miner_id"] != miner_id:
        return Conflict("job is assigned to another miner")
    if state == JobState.QUEUED:
        return Conflict("job is not assigned to this miner (stale assignment)")
    if state != JobState.RUNNING:
        return Conflict(f"job already {state.lower()}")
    return None


def _load_reported_job(conn: sqlite3.Connection, miner_id: str, job_id: str) -> sqlite3.Row:
    """The job a miner reports on (get_report: with the miner's capabilities), locked; raises NotFound."""
    lock_job(conn, job_id, miner_id)
    job = get_report(conn, miner_id, job_id)
    if not job["registered"]:
        raise NotFound("miner not registered")
    if job["seq"] is None:
        raise NotFound("job not found")
    return job


def _refused(conn: sqlite3.Connection, miner_id: str, job: sqlite3.Row, now: int, error: ApiError) -> Outcome:
    touch_miner(conn, miner_id, now)  # a refused report is still a sign of life
    # the job's own holder too: a report found the job past its deadline, and that freed its slot
    return Outcome(error=error, wake=Wake(miners={miner_id, job["assigned_miner_id"] or miner_id}))


def tx_result(conn: sqlite3.Connection, miner_id: str, job_id: str, result: dict[str, Any], metrics: dict[str, Any],
              now: int, signer: Signer | None, coordinator_id: str, edge: LogEdge | None = None,
              held_ms: int | None = None) -> Outcome:
    """Complete a RUNNING job held by `miner_id` and issue its receipt in the same transaction, the
    receipt appended to the receipt log. `held_ms`: how long the miner held the job, by the monotonic
    clock (Coordinator.held_ms); unknown, the wall clock's `now` less its assigned_at, never below 0.

    Returns the receipt as stored (JSON text; None without a signing key). A repeat of the same
    result returns the same receipt; any other report is a Conflict.
    """
    job = _load_reported_job(conn, miner_id, job_id)
    result_json = canonical_json(result)
    if job["state"] == JobState.COMPLETED and job["assigned_miner_id"] == miner_id:
        # the result as stored, or once pruned the digest its receipt keeps (no receipt: nothing to compare)
        receipt = get_latest_receipt(conn, job_id)
        if job["result"] == result_json or (job["result"] is None and receipt is not None
                                            and receipt_result_digest(receipt) == canonical_digest(result_json, True)):
            touch_miner(conn, miner_id, now)
            return Outcome(receipt)
    error = _check_holder(conn, miner_id, job, now)
    if error is not None:
        return _refused(conn, miner_id, job, now, error)
    metrics_json = compact_json(metrics)
    busy_ms = held_ms if held_ms is not None else max(0, now - job["assigned_at"])
    finish_job(conn, job["seq"], JobState.COMPLETED, now, None, result_json, metrics_json)
    receipt_id = stored = None
    if signer is not None:
        capabilities = load_json(job["miner_capabilities"])
        # nulls dropped part by part (metrics without any are not walked), so seal finds "null" only
        # where a string holds the word
        receipt, text = signer.seal(build_receipt(job, miner_id, capabilities, result,
                                                  without_nulls(metrics, metrics_json), now, coordinator_id,
                                                  canonical_digest(result_json, canonical=True), busy_ms))
        receipt_id, stored = receipt["receipt_id"], insert_receipt(conn, receipt, job["client_id"], now, text)
    add_miner_outcome(conn, miner_id, now, 1, 0, busy_ms, receipt_id)
    if receipt_id is not None:  # the last write: the log's numbering lock is held only to the commit (LOCK ORDER)
        append_to_log(conn, edge or LogEdge(), receipt_id, stored.encode())
    return Outcome(stored, Wake(miners={miner_id}))


def append_to_log(conn: sqlite3.Connection, edge: LogEdge, receipt_id: str, stored: bytes) -> int:
    """Append a receipt (its bytes as stored and served) as the next leaf of the receipt log, with the
    subtrees it completes: O(log n) hashing, two rows on average, no read while `edge` is current.
    Returns its leaf index. Raises LogDamaged when the log's rows contradict each other (leaves
    removed from under a checkpoint or from under the subtrees they made, a subtree missing): the
    coordinator would otherwise sign a fork of its own log."""
    digest = leaf_hash(stored)
    index, before = insert_log_leaf(conn, receipt_id, digest)
    # first append here, or the edge went past an append rolled back, or (PostgreSQL) the leaf before
    # this one is not the one this edge last appended: rolled back, and another instance's took its index
    if edge.size != index or (before is not None and index > 0 and before != edge.last):
        latest = get_latest_checkpoint(conn)
        if latest is not None and latest["tree_size"] > index:
            raise LogDamaged(f"it has {index} leaves, fewer than its checkpoint of {latest['tree_size']}: "
                             f"leaves were removed")
        parts = subtrees(0, index)
        nodes = get_stored_log_nodes(conn, parts)
        edge.frontier = [nodes[node] for node in parts]
    edge.size = -1  # until the frontier below is whole again
    if completed := frontier_append(edge.frontier, index, digest):
        try:
            insert_log_nodes(conn, completed)
        except INTEGRITY_ERRORS:
            raise LogDamaged(f"leaf {index} completes subtrees that are stored already: leaves were removed "
                             f"from under them") from None
    edge.size, edge.last = index + 1, digest
    return index


def backfill_receipt_log(conn: sqlite3.Connection) -> None:
    """Upgrade step 3: every receipt issued before the log existed becomes a leaf, once, in issue order."""
    edge = LogEdge()
    for receipt_id, body in list_receipts_in_issue_order(conn):
        append_to_log(conn, edge, receipt_id, body.encode())  # text: version 5 packs them


BACKFILLS[3] = backfill_receipt_log


def backfill_smaller_rows(conn: sqlite3.Connection, batch: int = 1000) -> None:
    """Upgrade step 5: pack every receipt's text (the bytes inflate back to it exactly, so leaves,
    signatures and archives are unchanged), and store every job's constraints without nulls."""
    after = 0
    while rows := list_text_receipts(conn, after, batch):
        set_packed_receipts(conn, [(pack_receipt(body, receipt_id, job_id), seq)
                                   for seq, receipt_id, job_id, body in rows])
        after = rows[-1][0]
    after = 0
    while rows := list_constraints_with_nulls(conn, after, batch):
        set_job_constraints(conn, [(stored_constraints(load_json(text)), seq) for seq, text in rows])
        after = rows[-1][0]


BACKFILLS[5] = backfill_smaller_rows


def tx_fail(conn: sqlite3.Connection, miner_id: str, job_id: str, error_text: str, metrics: str,
            retryable: bool, now: int, max_attempts: int) -> Outcome:
    """A miner gives up a job: re-queued when retryable with attempts left, else FAILED. Conflict if not held."""
    job = _load_reported_job(conn, miner_id, job_id)
    if job["state"] == JobState.FAILED and job["assigned_miner_id"] == miner_id and job["error"] == error_text:
        touch_miner(conn, miner_id, now)
        return Outcome()
    error = _check_holder(conn, miner_id, job, now)
    if error is not None:
        return _refused(conn, miner_id, job, now, error)
    add_miner_outcome(conn, miner_id, now, 0, 1, 0)
    wake = Wake(miners={miner_id})
    if retryable and job["attempts"] < max_attempts:
        wake.add_rows([requeue_job(conn, job_id, miner_id, count_attempt=True)])  # held: checked above
    else:
        finish_job(conn, job["seq"], JobState.FAILED, now, error_text, None, metrics)
    return Outcome(wake=wake)


def tx_sweep(conn: sqlite3.Connection, now: int, is_silent: Callable[[str], bool], heartbeat_timeout_ms: int,
             max_attempts: int, idem_cutoff: int, seen: Mapping[str, int] | None = None,
             beats: Mapping[str, Beat] | None = None, silent: Iterable[str] = (), back: Iterable[str] = (),
             slots: Iterable[str] = ()) -> Outcome:
    """Expire jobs past their deadline (wall clock: clients set them) and take running jobs back from
    the miners `is_silent` names (the Coordinator measures silence on a monotonic clock); record the
    last_seen of miners heard from since the last sweep (`seen`: miner -> wall-clock ms) and the
    last_heartbeat of those whose heartbeats changed nothing else (`beats`: miner -> (ms, inflight),
    judged as tx_heartbeat judges one); mark the miners newly found `silent` offline and those heard
    from again (`back`) online. Then bring the offers of every
    miner this touched, and of those whose slots changed since the last sweep (`slots`), up to date.
    The value is the number of jobs taken back."""
    silent, back, slots = list(silent), list(back), list(slots)
    silent_holders = [m for m in list_running_miners(conn) if is_silent(m)]
    beats = beats or {}
    due = lock_sweep_rows(conn, now, silent_holders, [*(seen or ()), *beats, *back, *silent, *slots], beats)
    wake = release_unreceived(conn, beats)  # judged before their last_heartbeat is written
    if seen or beats:
        touch_miners(conn, seen or {}, beats)
    changed = mark_miners_online(conn, back, True) + mark_miners_online(conn, silent, False)
    wake.miners.update(r[0] for r in expire_due_jobs(conn, now, due) if r[0] is not None)
    lost = []
    for miner_id in silent_holders:
        lost += release_running(conn, "assigned_miner_id = :miner", {"miner": miner_id}, max_attempts, now,
                                f"lost (no request for {heartbeat_timeout_ms / 1000:g}s)")
    refresh_offers(conn, {*changed, *wake.miners, *silent_holders, *slots})
    wake.add_rows(lost)
    delete_idempotency_before(conn, idem_cutoff)
    return Outcome(len(lost), wake)


DB_CLOCK_ANCHOR_SECONDS = 3600.0  # how often an instance re-reads the database server's clock (db_time)
# PostgreSQL advisory lock keys ("aitbc" and a number): one cluster sweep at a time, checkpoints
# published in turn, one retention pass in the cluster at a time
SWEEP_LOCK = 0x61697462_63000002
CHECKPOINT_LOCK = 0x61697462_63000003
RETENTION_LOCK = 0x61697462_63000004


def tx_cluster_sweep(conn: sqlite3.Connection, now: int, db_now: int, tick_ms: int, heartbeat_timeout_ms: int,
                     max_attempts: int, idem_cutoff: int) -> Outcome:
    """PostgreSQL, the duties of the whole cluster, run by one instance a tick: the instance whose tick
    takes the advisory lock SWEEP_LOCK runs them if sweep_state says they last ran at least 0.9 of a
    tick (`tick_ms`) ago, and stamps it. Expire jobs past their deadline (wall clock: clients set
    them); take running jobs back from miners no instance heard from for `heartbeat_timeout_ms` on
    the database server's clock (`db_now`: Coordinator.db_time), and mark them offline; forget
    idempotency keys made before `idem_cutoff`. The value is the number of jobs taken back, or None
    when it was not this instance's turn."""
    if not conn.execute("SELECT pg_try_advisory_xact_lock(?)", (SWEEP_LOCK,)).fetchone()[0]:
        return Outcome(None)
    if db_now - conn.execute("SELECT last_run FROM sweep_state WHERE id = 1").fetchone()[0] < tick_ms * 0.9:
        return Outcome(None)
    conn.execute("UPDATE sweep_state SET last_run = ? WHERE id = 1", (db_now,))
    cutoff = db_now - heartbeat_timeout_ms
    silent_holders = [r[0] for r in conn.execute(
        "SELECT DISTINCT jobs.assigned_miner_id FROM jobs JOIN miners ON miners.miner_id = jobs.assigned_miner_id"
        " WHERE jobs.state = 'RUNNING' AND miners.heard_at < ?", (cutoff,))]
    silent = [r[0] for r in conn.execute("SELECT miner_id FROM miners WHERE online = 1 AND heard_at < ?", (cutoff,))]
    due = lock_sweep_rows(conn, now, silent_holders, silent)  # what it may write, up front (LOCK ORDER)
    wake = Wake()
    wake.miners.update(r[0] for r in expire_due_jobs(conn, now, due) if r[0] is not None)
    lost = []
    for miner_id in silent_holders:
        lost += release_running(conn, "assigned_miner_id = :miner", {"miner": miner_id}, max_attempts, now,
                                f"lost (no request for {heartbeat_timeout_ms / 1000:g}s)")
    offline = [r[0] for r in conn.execute("UPDATE miners SET online = 0 WHERE online = 1 AND heard_at < ? AND miner_id"
                                          " IN (SELECT value FROM json_each(?)) RETURNING miner_id",
                                          (cutoff, json.dumps(silent)))]  # those locked: another tick takes the rest
    refresh_offers(conn, {*offline, *wake.miners, *silent_holders})
    wake.add_rows(lost)
    delete_idempotency_before(conn, idem_cutoff)
    return Outcome(len(lost), wake)


def tx_fresh_cluster(conn: sqlite3.Connection, db_now: int, heartbeat_timeout_ms: int) -> Outcome:
    """PostgreSQL, at start-up: when no instance has run the cluster duties for `heartbeat_timeout_ms`
    (the whole cluster was down, and its miners could reach nobody), every miner gets a fresh timeout
    from `db_now` before it can be found silent. The value is whether it did."""
    if db_now - conn.execute("SELECT last_run FROM sweep_state WHERE id = 1").fetchone()[0] < heartbeat_timeout_ms:
        return Outcome(False)
    conn.execute("SELECT 1 FROM miners WHERE heard_at < ? ORDER BY miner_id FOR NO KEY UPDATE", (db_now,))  # LOCK ORDER
    conn.execute("UPDATE miners SET heard_at = ? WHERE heard_at < ?", (db_now, db_now))
    return Outcome(True)


CHECKPOINTS_KEPT_MS = 86_400_000  # every checkpoint is kept this long,
CHECKPOINT_PERIOD_MS = 3_600_000  # then the last of each hour


def log_root(conn: sqlite3.Connection, size: int) -> bytes:
    """The root hash of the log's first `size` leaves: from at most log2(size) stored subtrees."""
    parts = subtrees(0, size)
    nodes = get_stored_log_nodes(conn, parts)
    return range_hash([nodes[node] for node in parts]) if parts else EMPTY_ROOT


def log_has_grown(conn: sqlite3.Connection) -> bool:
    """Whether the log has leaves no checkpoint covers, or no checkpoint at all (a read). Fewer leaves
    than the latest checkpoint's counts too, so that tx_checkpoint reports the damage."""
    latest = get_latest_checkpoint(conn)
    return latest is None or get_log_size(conn) != latest["tree_size"]


def tx_open_log(conn: sqlite3.Connection, key_id: str, configured: str | None, default: str, now: int) -> Outcome:
    """Record the key that signs checkpoints and settle the log's origin (the value): the one its
    checkpoints carry (a rotated key keeps the log), else the configured one, else `default`. The
    error is a ConfigError when the configured origin is not the one the log already has: an origin
    is a log's identity for life (auditors pin it), so a new one would strand every auditor."""
    latest = get_latest_checkpoint(conn)
    current = latest["note"].split("\n", 1)[0] if latest is not None else None
    if configured is not None and current is not None and configured != current:
        return Outcome(error=ConfigError(
            f"RECEIPT_LOG_ORIGIN: the receipt log's checkpoints carry the origin {current}, not {configured}; "
            f"a log keeps its origin for life: set RECEIPT_LOG_ORIGIN={current} or unset it"))
    origin = current or configured or default
    upsert_log_key(conn, key_id, origin, now)
    return Outcome(origin)


def tx_checkpoint(conn: sqlite3.Connection, notary: Notary, now: int, pruned_to: int, paced: int | None = None) -> Outcome:
    """Sign and store a checkpoint of the log as it stands, unless the latest one covers it already; then
    keep, of the checkpoints older than a day and made since `pruned_to` (ms), the last of each hour;
    a day counted to `paced` (Coordinator.paced_now) when that is earlier, so that a step ahead of
    the wall clock thins no checkpoint of the day that really passed. The value is (tree size, what
    pruning reached) of a new checkpoint, or None. Raises LogDamaged (fewer leaves than the latest
    checkpoint, a subtree missing). On PostgreSQL instances publish in turn (an advisory lock held to
    the commit): the second finds the first's checkpoint covers the log."""
    if isinstance(conn, PgConnection):
        conn.execute("SELECT pg_advisory_xact_lock(?)", (CHECKPOINT_LOCK,))
    latest = get_latest_checkpoint(conn)
    size = get_log_size(conn)
    if latest is not None and size <= latest["tree_size"]:
        if size < latest["tree_size"]:
            raise LogDamaged(f"it has {size} leaves, fewer than its checkpoint of {latest['tree_size']}: "
                             f"leaves were removed")
        return Outcome()
    created = now if latest is None else max(now, latest["created_at"])  # never before the one it follows
    root = log_root(conn, size)
    insert_checkpoint(conn, size, root, created, notary.sign(Checkpoint(notary.origin, size, root,
                                                                        (f"timestamp {created}",))))
    cutoff = (created if paced is None else min(created, paced)) - CHECKPOINTS_KEPT_MS
    prune_checkpoints(conn, pruned_to - pruned_to % CHECKPOINT_PERIOD_MS, cutoff, CHECKPOINT_PERIOD_MS)
    return Outcome((size, cutoff))


def tx_create_offer(conn: sqlite3.Connection, provider: str, capacity: int, price: float, sla: str, status: str,
                    now: int) -> Outcome:
    """An admin offer; the value is the offer as listed."""
    return Outcome(get_offer(conn, insert_offer(conn, provider, capacity, price, sla, status, now)))


def tx_set_offer_status(conn: sqlite3.Connection, offer_id: str, status: str) -> Outcome:
    """Set an admin offer's status (the value: the offer as listed); raises NotFound, or Conflict for a
    miner's offer (it follows the miner)."""
    if not update_offer_status(conn, offer_id, status):
        if get_offer(conn, offer_id) is None:
            raise NotFound("offer not found")
        raise Conflict("a miner's offer follows the miner; its status cannot be set")
    return Outcome(get_offer(conn, offer_id))


def tx_place_bid(conn: sqlite3.Connection, provider: str, capacity: int, price: float, notes: str | None,
                 now: int) -> Outcome:
    """Record a bid, matched at once to the cheapest open offer that fits it, else pending; the value is
    the bid's row."""
    offer = cheapest_open_offer(conn, price, capacity)
    status, offer_id = ("matched", offer["id"]) if offer is not None else ("pending", None)
    return Outcome(insert_bid(conn, provider, capacity, price, notes, status, offer_id, now))


# Retention's units run alone (Database.write_alone), never in a request's transaction, each a small
# batch so that the writer is never held for long.

def tx_start_retention_clock(conn: sqlite3.Connection, now: int) -> Outcome:
    """Start retention's clock unless it runs already; the value is (when it started, whether now)."""
    return Outcome(start_retention_clock(conn, now))


def tx_set_retention_mark(conn: sqlite3.Connection, name: str, at: int) -> Outcome:
    """Record a time retention keeps (see set_retention_mark)."""
    set_retention_mark(conn, name, at)
    return Outcome()


def tx_canonical_payloads(conn: sqlite3.Connection) -> Outcome:
    """Store the payloads of QUEUED and RUNNING jobs as canonical JSON, as submits since this version
    do (a receipt's payload digest is then the hash of the stored text); the value is how many changed."""
    changed = [(text, seq) for seq, payload in list_active_payloads(conn)
               if (text := canonical_json(load_json(payload))) != payload]
    set_payloads(conn, changed)
    return Outcome(len(changed))


def tx_prune(conn: sqlite3.Connection, seqs: Sequence[int], now: int) -> Outcome:
    """Drop these finished jobs' payloads, results and metrics; the value is the number pruned."""
    return Outcome(prune_jobs(conn, seqs, now))


def tx_prune_due(conn: sqlite3.Connection, before: int, now: int, limit: int) -> Outcome:
    """Prune up to `limit` of the oldest finished jobs that finished before `before`; the value is the
    number pruned."""
    return Outcome(prune_jobs(conn, list_prunable(conn, before, limit), now))


def tx_delete_jobs(conn: sqlite3.Connection, before: int, limit: int) -> Outcome:
    """Delete old pruned job summaries (see delete_old_jobs); the value is the number deleted."""
    return Outcome(delete_old_jobs(conn, before, limit))


def tx_delete_receipts(conn: sqlite3.Connection, before: int, window: int, limit: int) -> Outcome:
    """Delete old receipts of pruned jobs (see list_due_receipts); a job whose latest receipt goes keeps
    that receipt's price as its value, so the explorer shows the same value after (transaction_view).
    The value is the number deleted."""
    due = list_due_receipts(conn, before, window, limit)
    set_job_values(conn, [(display_value(r["price"]), r["job_id"]) for r in due if r["latest"] and r["price"] is not None])
    return Outcome(delete_receipts(conn, [r["seq"] for r in due]))


def tx_delete_bids(conn: sqlite3.Connection, before: int, window: int, limit: int) -> Outcome:
    """Delete old bids (see delete_old_bids); the value is the number deleted."""
    return Outcome(delete_old_bids(conn, before, window, limit))


# Exports read on a connection of their own (a worker thread, or the CLI) and write archive files.

ARCHIVE_CHUNK = 256  # jobs read per short read transaction


def archive_lines(conn: sqlite3.Connection, rows: Sequence[sqlite3.Row]) -> list[str]:
    """archive_line of each of these ARCHIVE_COLUMNS rows, with its receipts read."""
    receipts = list_receipt_bodies(conn, [r["job_id"] for r in rows])
    return [archive_line(row, receipts.get(row["job_id"], [])) for row in rows]


def export_unpruned_day(path: str, directory: Path, day: int,
                        stop: threading.Event | None = None) -> tuple[list[int], Path | None]:
    """Archive the finished jobs of the UTC day starting at `day` that still hold their payloads, in
    chunks of short reads (no snapshot is held for long); (their seqs, the file written, or None when
    there were none, or `stop` was set meanwhile). `path`: the SQLite file or PostgreSQL URL. Raises
    OSError or a database error, leaving no file behind."""
    conn = connect_reader(path)
    out = ArchiveFile(directory, day)
    seqs: list[int] = []
    try:
        after = (day, 0)
        while True:
            conn.execute("BEGIN")
            try:
                rows = list_unpruned_finished(conn, after, day + DAY_MS, ARCHIVE_CHUNK)
                lines = archive_lines(conn, rows)
            finally:
                conn.execute("ROLLBACK")
            for line in lines:
                out.write(line)
            seqs += [r["seq"] for r in rows]
            if len(rows) < ARCHIVE_CHUNK:
                break
            if stop is not None and stop.is_set():
                seqs = []
                break
            after = (rows[-1]["finished_at"], rows[-1]["seq"])
        if not seqs:
            out.abandon()
            return seqs, None
        return seqs, out.finish()
    except BaseException:
        out.abandon()
        raise
    finally:
        conn.close()


def find_archived(path: str, directory: Path, day: int) -> list[int]:
    """Seqs of the finished, unpruned jobs of the UTC day starting at `day` that an archive file of that
    day in `directory` already holds, line for line as archive_line writes them from the database now:
    what a run stopped between publishing a file and pruning its jobs (a kill, a power cut) left, to be
    pruned without a second copy. A file that does not read to its end (gzip CRC and length checked)
    counts for nothing. `path`: the SQLite file or PostgreSQL URL. Raises a database error."""
    name = day_name(day)
    files = sorted(directory.glob(f"jobs-{name}.jsonl.gz")) + sorted(directory.glob(f"jobs-{name}.*.jsonl.gz"))
    if not files:
        return []
    conn = connect_reader(path)
    found: list[int] = []
    try:
        for file in files:
            held: list[int] = []
            try:
                with gzip.open(file, "rb") as lines:
                    for chunk in iter(lambda: list(itertools.islice(lines, ARCHIVE_CHUNK)), []):
                        stored = {load_json(raw)["seq"]: raw.rstrip(b"\n") for raw in chunk if raw.strip()}
                        conn.execute("BEGIN")
                        try:
                            rows = [r for r in get_jobs_by_seq(conn, [q for q in stored if isinstance(q, int)])
                                    if r["pruned_at"] is None and r["finished_at"] is not None
                                    and day_start(r["finished_at"]) == day]
                            held += [row["seq"] for row, line in zip(rows, archive_lines(conn, rows))
                                     if line.encode("utf-8") == stored[row["seq"]]]
                        finally:
                            conn.execute("ROLLBACK")
            except (OSError, EOFError, ValueError, TypeError, KeyError, RecursionError) as exc:
                log.warning("%s does not read as an archive (%r): its jobs are archived again", file, exc)
                continue
            found += held
    finally:
        conn.close()
    return found


def export_finished(conn: sqlite3.Connection, directory: Path, before: int,
                    unchanged: Callable[[], None] = lambda: None) -> list[tuple[Path, int]]:
    """Archive every job that finished before `before` (pruned ones too), a file per UTC day, from one
    read snapshot of `conn`; [(file, jobs)]. `unchanged` (open_readonly's check) runs before each file
    is published. Raises OSError or sqlite3.Error (the day being written is left out; DatabaseChanged
    when the database changed under an immutable reader, also in place of the error that caused)."""
    written: list[tuple[Path, int]] = []
    out: ArchiveFile | None = None
    conn.execute("BEGIN")
    try:
        keys = list_finished_keys(conn, before)
        while chunk := keys.fetchmany(ARCHIVE_CHUNK):
            rows = get_jobs_by_seq(conn, [k[0] for k in chunk])
            for row, line in zip(rows, archive_lines(conn, rows)):
                day = day_start(row["finished_at"])
                if out is None or out.day != day:
                    if out is not None:
                        unchanged()
                        written.append((out.finish(), out.jobs))
                    out = ArchiveFile(directory, day)
                out.write(line)
        if out is not None:
            unchanged()
            written.append((out.finish(), out.jobs))
            out = None
        return written
    except sqlite3.Error:
        unchanged()  # "malformed" from a file written under an immutable reader: say what happened
        raise
    finally:
        if out is not None:
            out.abandon()
        conn.execute("ROLLBACK")


# --- Copy: a SQLite installation moved into PostgreSQL (aitbc-coord copy) ---
# Offline: the coordinator is stopped. Every table is copied in one PostgreSQL transaction, rows in key
# order with their keys as they are and their values as SQLite holds them (receipts' packed bodies, the
# receipt log's leaves, subtrees and signed checkpoints: byte for byte), then read back and checked
# before the commit. The kept totals are copied as they are, into stripe 0 of the striped tables: they
# count history that retention may have deleted from the rows, so they are checked against the rows only
# where retention deleted none of the rows they count. While rows go in, the tables' triggers are
# disabled (ALTER TABLE ... DISABLE TRIGGER USER, undone in the same transaction): on a bulk insert each
# would add its row to the totals copied as they are (a second count), and make every copied job update
# one stripe row and one address row again and again in one transaction. The keys are given, so the two
# numbering triggers (shapes, log leaves) have nothing to number.

# A row in any of these, and the target holds an installation of its own: refused. (What a coordinator
# that only started there wrote, its keys, retention clock and empty log's checkpoint, is replaced.)
COPY_IN_USE = ("jobs", "receipts", "miners", "offers", "bids", "log_leaves")
PG_STRIPE = "stripe"  # the column the striped totals have on PostgreSQL (schema_pg.sql); the copy is stripe 0
# Columns only PostgreSQL has (liveness on the database server's clock): a copy leaves them to their
# defaults (tx_fresh_cluster gives every miner a fresh timeout at the first start).
PG_ONLY_COLUMNS = {("miners", "heard_at")}
# The rows retention deletes, oldest first and never the newest (delete_old_jobs): numbered by seq from 1,
# a table that lost rows has fewer than its highest seq.
RETENTION_DELETES = ("jobs", "receipts", "bids")


class CopyFailed(Exception):
    """Why `aitbc-coord copy` copied nothing (one line); the target is as it was, but for its schema."""


class CopyTable(NamedTuple):
    """A table as the copy moves it."""

    name: str
    columns: tuple[str, ...]  # the source's, in order
    key: tuple[str, ...]  # its primary key: rows are copied and compared in this order
    striped: bool  # PostgreSQL's table has PG_STRIPE too
    # the positions of INTEGER columns PostgreSQL holds as numeric (a sum past 2^63: schema_pg.sql's
    # version 9), where SQLite has gone on in a REAL: such a REAL, a whole number, is copied as an int
    wide: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class CopyReport:
    """What a copy did and checked."""

    rows: dict[str, tuple[int, int]]  # table: (rows in the source, rows in the target)
    checked: list[str]  # the kept totals found equal to what the rows imply
    unchecked: list[str]  # those not checked, each with why
    log_size: int
    log_root: bytes
    checkpoint: int | None  # the tree size of the latest checkpoint (checked against the copied tree)


def open_copy_source(path: str) -> tuple[sqlite3.Connection, Callable[[], None]]:
    """The stopped installation at `path`, read as open_readonly reads it (immutable), with its check
    that the file did not change; raises CopyFailed when it is missing, in use, not a coordinator's
    database or not at SCHEMA_VERSION."""
    if not Path(path).is_file():
        raise CopyFailed(f"no database at {path}")
    if Path(f"{path}-wal").exists():  # a coordinator's connections remove it when they close
        raise CopyFailed(f"{path}-wal exists: a coordinator is running on {path}, or it stopped without closing"
                         f" the database; stop it (after a crash, `aitbc-coord migrate --db {path}` closes it"
                         f" cleanly) and copy again")
    try:
        conn, unchanged = open_readonly(path)
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        except BaseException:
            conn.close()
            raise
    except sqlite3.Error as exc:
        raise CopyFailed(f"cannot read {path}: {exc}") from None
    if version != SCHEMA_VERSION:
        conn.close()
        raise CopyFailed(f"{path} is not a coordinator's database (schema version 0)" if version == 0 else
                         f"{path} has schema version {version}, newer than this coordinator's {SCHEMA_VERSION};"
                         f" upgrade aitbc-coord" if version > SCHEMA_VERSION else
                         f"{path} has schema version {version}, not {SCHEMA_VERSION}: run `aitbc-coord migrate"
                         f" --db {path}` first")
    return conn, unchanged


def plan_copy(src: sqlite3.Connection, raw: Any) -> list[CopyTable]:
    """The source's tables, each after those its foreign keys name; raises CopyFailed unless PostgreSQL
    has each with the same columns (schema_pg.sql is schema.sql's twin: PG_STRIPE aside)."""
    names = sorted(r[0] for r in src.execute("SELECT name FROM sqlite_master WHERE type = 'table'"
                                             " AND name NOT LIKE 'sqlite%'"))
    target: dict[str, list[str]] = {}
    numeric: set[tuple[str, str]] = set()
    for table, column, kind in raw.execute(
            "SELECT table_name, column_name, data_type FROM information_schema.columns JOIN information_schema.tables"
            " USING (table_schema, table_name) WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'"
            " ORDER BY table_name, ordinal_position"):
        target.setdefault(table, []).append(column)
        if kind == "numeric":
            numeric.add((table, column))
    if missing := [name for name in names if name not in target]:  # PostgreSQL's own (schema_version) stay
        raise CopyFailed(f"the PostgreSQL database has no table {', '.join(missing)} (a coordinator's schema of"
                         f" another version?)")
    tables, parents = {}, {}
    for name in names:
        info = src.execute(f'PRAGMA table_info("{name}")').fetchall()  # (cid, name, type, notnull, default, pk)
        columns = tuple(r[1] for r in info)
        striped = PG_STRIPE in target[name] and PG_STRIPE not in columns
        if [c for c in target[name] if not (striped and c == PG_STRIPE) and (name, c) not in PG_ONLY_COLUMNS] \
                != list(columns):
            raise CopyFailed(f"table {name} has the columns ({', '.join(target[name])}) in PostgreSQL, but"
                             f" ({', '.join(columns)}) in the source")
        key = tuple(r[1] for r in sorted(info, key=lambda r: r[5]) if r[5])
        wide = tuple(i for i, r in enumerate(info) if r[2].upper() == "INTEGER" and (name, r[1]) in numeric)
        tables[name] = CopyTable(name, columns, key or columns, striped, wide)
        parents[name] = {r[2] for r in src.execute(f'PRAGMA foreign_key_list("{name}")')}
    return [tables[name] for name in graphlib.TopologicalSorter(parents).static_order()]


def copy_table(src: sqlite3.Connection, raw: Any, table: CopyTable) -> tuple[int, bytes]:
    """COPY one table's rows in key order, values as read (a whole REAL in a `wide` column as its int);
    (rows, the SHA-256 of their reprs in that order: what read_back must find). Raises CopyFailed for text PostgreSQL cannot hold (U+0000),
    sqlite3.Error or psycopg.Error."""
    from psycopg import sql
    columns = table.columns + ((PG_STRIPE,) if table.striped else ())
    extra = (0,) if table.striped else ()
    statement = sql.SQL("COPY {} ({}) FROM STDIN").format(sql.Identifier(table.name),
                                                           sql.SQL(", ").join(map(sql.Identifier, columns)))
    cursor = src.cursor()
    cursor.row_factory = None  # plain tuples
    rows, digest = 0, hashlib.sha256()
    quoted = ", ".join(f'"{c}"' for c in table.columns)
    with raw.cursor() as pg, pg.copy(statement) as copy:
        key = ", ".join(f'"{c}"' for c in table.key)
        for row in cursor.execute(f'SELECT {quoted} FROM "{table.name}" ORDER BY {key}'):
            if any(type(row[i]) is float and row[i].is_integer() for i in table.wide):
                row = tuple(int(v) if i in table.wide and type(v) is float and v.is_integer() else v
                            for i, v in enumerate(row))
            if any(type(value) is str and "\x00" in value for value in row):
                held = ", ".join(c for c, v in zip(table.columns, row) if type(v) is str and "\x00" in v)
                raise CopyFailed(f"{table.name} row {dict(zip(table.key, row[:len(table.key)]))}: {held} holds the"
                                 f" character U+0000, which PostgreSQL text cannot store")
            copy.write_row(row + extra)
            digest.update(repr(row).encode())
            rows += 1
    return rows, digest.digest()


def read_back(raw: Any, table: CopyTable) -> tuple[int, bytes]:
    """(rows, their digest as copy_table makes it) of a table as PostgreSQL now holds it, in key order."""
    from psycopg import sql
    from psycopg.rows import tuple_row
    query = sql.SQL("SELECT {} FROM {} ORDER BY {}").format(
        sql.SQL(", ").join(map(sql.Identifier, table.columns)), sql.Identifier(table.name),
        sql.SQL(", ").join(sql.SQL("{} NULLS FIRST").format(sql.Identifier(c)) for c in table.key))  # as SQLite
    rows, digest = 0, hashlib.sha256()
    with raw.cursor(name=f"copy_read_{table.name}", row_factory=tuple_row) as cursor:
        cursor.itersize = 2000
        for row in cursor.execute(query):
            digest.update(repr(row).encode())
            rows += 1
    return rows, digest.digest()


def reset_identities(raw: Any) -> None:
    """Set every identity column's sequence past the highest key copied (the next row gets max + 1, as
    SQLite numbers a row)."""
    from psycopg import sql
    for table, column in raw.execute("SELECT table_name, column_name FROM information_schema.columns"
                                     " WHERE table_schema = current_schema() AND is_identity = 'YES'").fetchall():
        raw.execute(sql.SQL("SELECT setval(pg_get_serial_sequence({}, {}), COALESCE(MAX({}), 0) + 1, false)"
                            " FROM {}").format(sql.Literal(table), sql.Literal(column), sql.Identifier(column),
                                               sql.Identifier(table)))


def _difference(what: str, kept: Mapping[Any, Any], implied: Mapping[Any, Any], missing: Any = 0) -> str | None:
    """How the first key of `kept` or `implied` whose values differ differs, or None."""
    for key in sorted(set(kept) | set(implied), key=str):
        if kept.get(key, missing) != implied.get(key, missing):
            return f"{what} {key}: {kept.get(key, missing)} kept, the rows imply {implied.get(key, missing)}"
    return None


FLEET_IMPLIED = (
    "SELECT m.n + o.n, m.open_n + o.open_n, m.capacity + o.capacity, m.units + o.units, m.micro + o.micro, m.online"
    "  FROM (SELECT COUNT(*) AS n, COUNT(*) FILTER (WHERE offer_status = 'open') AS open_n,"
    "               COALESCE(SUM(concurrency) FILTER (WHERE offer_status = 'open'), 0) AS capacity,"
    "               COALESCE(SUM(price_units) FILTER (WHERE offer_status = 'open'), 0) AS units,"
    "               COALESCE(SUM(price_micro) FILTER (WHERE offer_status = 'open'), 0) AS micro,"
    "               COALESCE(SUM(online), 0) AS online FROM miners) AS m,"
    "       (SELECT COUNT(*) AS n, COUNT(*) FILTER (WHERE status = 'open') AS open_n,"
    "               COALESCE(SUM(capacity) FILTER (WHERE status = 'open'), 0) AS capacity,"
    "               COALESCE(SUM(price_whole_units(price)) FILTER (WHERE status = 'open'), 0) AS units,"
    "               COALESCE(SUM(price_millionths(price)) FILTER (WHERE status = 'open'), 0) AS micro"
    "          FROM offers) AS o")
FLEET_FIELDS = ("offers", "open_offers", "open_capacity", "open_price_units", "open_price_micro", "online_miners")
TX_COUNTS_IMPLIED = (
    "SELECT address, COUNT(*) FROM (SELECT client_id AS address FROM jobs UNION ALL"
    " SELECT assigned_miner_id FROM jobs WHERE assigned_miner_id IS NOT NULL) AS touched GROUP BY address")


def fleet_totals_differ(raw: Any) -> str | None:
    kept, implied = get_fleet_totals(PgConnection(raw)), raw.execute(FLEET_IMPLIED).fetchone()
    return _difference("fleet_totals", dict(zip(FLEET_FIELDS, kept)), dict(zip(FLEET_FIELDS, implied)))


def job_counts_differ(raw: Any) -> str | None:
    return _difference("job_counts", get_job_counts(PgConnection(raw)),
                       dict(raw.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()))


def tx_counts_differ(raw: Any) -> str | None:
    return _difference("tx_count of", dict(raw.execute("SELECT address, SUM(tx_count) FROM addresses GROUP BY address").fetchall()),
                       dict(raw.execute(TX_COUNTS_IMPLIED).fetchall()))


def balances_differ(raw: Any) -> str | None:
    """Whether each address's balance is what its receipts move (the price, in millionths as
    insert_receipt rounds it, from the receipt's client to its provider). Raises CopyFailed for a
    receipt that does not unpack."""
    from psycopg.rows import tuple_row
    moves: dict[str, int] = {}
    with raw.cursor(name="copy_read_balances", row_factory=tuple_row) as cursor:
        cursor.itersize = 2000
        for receipt_id, job_id, body, micro in cursor.execute(
                "SELECT receipt_id, job_id, body, CAST(sqlite_round(price * 1000000) AS bigint) FROM receipts"
                " WHERE price IS NOT NULL ORDER BY seq"):
            try:
                receipt = load_json(unpack_receipt(body, receipt_id, job_id))
                provider, client = receipt["provider"], receipt["client"]
            except (StoredReceiptError, ValueError, KeyError, TypeError) as exc:
                raise CopyFailed(f"check failed: receipt {receipt_id} does not read as a receipt: {exc}") from None
            moves[provider] = moves.get(provider, 0) + micro
            moves[client] = moves.get(client, 0) - micro
    kept = dict(raw.execute("SELECT address, SUM(balance_micro) FROM addresses GROUP BY address").fetchall())
    return _difference("balance_micro of", kept, {a: m for a, m in moves.items() if a in kept or m})


def counter_differs(name: str, rows: str) -> Callable[[Any], str | None]:
    def differs(raw: Any) -> str | None:
        return _difference("counters", {name: get_counter(PgConnection(raw), name)},
                           {name: raw.execute(f"SELECT COUNT(*) FROM {rows}").fetchone()[0]})
    return differs


# (the total, the table retention may have deleted rows of that it counts, how it may differ from the rows)
KEPT_TOTALS: tuple[tuple[str, str | None, Callable[[Any], str | None]], ...] = (
    ("fleet_totals", None, fleet_totals_differ),
    ("job_counts", "jobs", job_counts_differ),
    ("addresses.tx_count", "jobs", tx_counts_differ),
    ("counters.receipts", "receipts", counter_differs("receipts", "receipts")),
    ("addresses.balance_micro", "receipts", balances_differ),
    ("counters.active_bids", "bids", counter_differs("active_bids", "bids WHERE status IN ('pending', 'matched')")),
)
# Not checked at all: job_counts.busy_ms (an upgrade to schema 4 seeded it from the miners' own totals,
# not from the jobs) and addresses.last_active (it keeps times of assignments a requeue undid).


def check_kept_totals(raw: Any) -> tuple[list[str], list[str]]:
    """Check the copy's kept totals against what its rows imply, each where retention deleted none of the
    rows it counts; (totals checked, totals not checked with why). Raises CopyFailed naming the first
    that differs."""
    deleted = {table: raw.execute(f"SELECT COALESCE(MAX(seq), 0) - COUNT(*) FROM {table}").fetchone()[0]
               for table in RETENTION_DELETES}
    checked, unchecked = [], []
    for name, rows, differs in KEPT_TOTALS:
        if rows is not None and deleted[rows]:
            n = deleted[rows]
            unchecked.append(f"{name} (it counts {n} {rows} row{'s' * (n != 1)} retention deleted)")
        elif (why := differs(raw)) is not None:
            raise CopyFailed(f"check failed: {why}")
        else:
            checked.append(name)
    return checked, unchecked


def check_copied_log(src: sqlite3.Connection, raw: Any) -> tuple[int, bytes, int | None]:
    """Check that the receipt log's root at its size, computed from the target's rows, is the source's,
    and that the latest checkpoint signed that tree; (size, root, the checkpoint's size or None). Raises
    CopyFailed. Expects `src` inside its read transaction."""
    target = PgConnection(raw)
    try:
        size, root = get_log_size(src), log_root(src, get_log_size(src))
        copied = get_log_size(target), log_root(target, get_log_size(target))
        latest = get_latest_checkpoint(target)
        if latest is not None and bytes(latest["root_hash"]) != log_root(target, latest["tree_size"]):
            raise CopyFailed(f"check failed: the latest checkpoint ({latest['tree_size']} leaves) does not sign"
                             f" the copied tree")
    except LogDamaged as exc:
        raise CopyFailed(f"the source's receipt log is damaged: {exc.why}") from None
    if copied != (size, root):
        raise CopyFailed(f"check failed: the receipt log's root is {b64(copied[1])} at {copied[0]} leaves in the"
                         f" copy, {b64(root)} at {size} in the source")
    return size, root, None if latest is None else int(latest["tree_size"])


def copy_tables(src: sqlite3.Connection, raw: Any) -> CopyReport:
    """Copy and check every table inside `raw`'s open transaction (see the section's head); raises
    CopyFailed, sqlite3.Error or psycopg.Error, and the caller rolls back."""
    from psycopg import sql
    tables = plan_copy(src, raw)
    raw.execute("SET LOCAL lock_timeout = '10s'")
    raw.execute(sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(  # no writer meanwhile; readers may read
        sql.SQL(", ").join(sql.Identifier(t.name) for t in tables)))
    if in_use := [t for t in COPY_IN_USE if raw.execute(f"SELECT EXISTS (SELECT 1 FROM {t})").fetchone()[0]]:
        raise CopyFailed(f"the PostgreSQL database is not empty: it has {', '.join(in_use)} rows (copy only into a"
                         f" new database)")
    copied: dict[str, tuple[int, bytes]] = {}
    src.execute("BEGIN")  # one snapshot of the source
    try:
        for table in tables:
            name = sql.Identifier(table.name)
            raw.execute(sql.SQL("ALTER TABLE {} DISABLE TRIGGER USER").format(name))
            raw.execute(sql.SQL("DELETE FROM {}").format(name))
            copied[table.name] = copy_table(src, raw, table)
            raw.execute(sql.SQL("ALTER TABLE {} ENABLE TRIGGER USER").format(name))
        reset_identities(raw)
        rows = {}
        for table in tables:
            rows[table.name] = (copied[table.name][0], (back := read_back(raw, table))[0])
            if back[0] != copied[table.name][0]:
                raise CopyFailed(f"check failed: table {table.name} has {back[0]} rows in the copy,"
                                 f" {copied[table.name][0]} in the source")
            if back != copied[table.name]:
                raise CopyFailed(f"check failed: the rows of table {table.name} read back otherwise than the source"
                                 f" holds them")
        size, root, checkpoint = check_copied_log(src, raw)
    finally:
        src.execute("ROLLBACK")
    checked, unchecked = check_kept_totals(raw)
    raw.execute(sql.SQL("ANALYZE {}").format(sql.SQL(", ").join(sql.Identifier(t.name) for t in tables)))
    return CopyReport(rows, checked, unchecked, size, root, checkpoint)


def copy_to_postgres(path: str, url: str) -> CopyReport:
    """Copy the stopped SQLite installation at `path` into the PostgreSQL database at `url` (its schema
    created from schema_pg.sql when it has none) in one transaction, checked before it commits (see
    `aitbc-coord copy`). Raises CopyFailed or ConfigError; then nothing was copied (a schema created
    stays, empty)."""
    src, unchanged = open_copy_source(path)
    changed = (f"{path} changed during the copy (a coordinator started on it?): nothing was copied; stop it"
               f" and copy again")
    try:
        if (version := migrate_pg(url)[1]) != PG_SCHEMA_VERSION:
            raise CopyFailed(f"the PostgreSQL database has schema version {version}, newer than this coordinator's"
                             f" {PG_SCHEMA_VERSION}: copy with the aitbc-coord that made it")
        psycopg = load_psycopg()
        try:
            raw = pg_connect(url, connect_timeout=10)
        except psycopg.Error as exc:
            raise ConfigError(f"cannot connect to PostgreSQL: {exc}") from None
        try:
            with raw.transaction():
                report = copy_tables(src, raw)
                unchanged()  # nothing was written to the source meanwhile
            return report
        except DatabaseChanged:
            raise CopyFailed(changed) from None
        except psycopg.errors.LockNotAvailable:
            raise CopyFailed("the PostgreSQL database's tables are in use (a coordinator running on it?):"
                             " nothing was copied") from None
        except psycopg.errors.InsufficientPrivilege as exc:
            raise CopyFailed(f"{exc}: run the copy as the role that owns the coordinator's tables (the copy"
                             f" disables their triggers while rows go in)") from None
        except (psycopg.Error, sqlite3.Error) as exc:
            with contextlib.suppress(DatabaseChanged):
                unchanged()  # "malformed" from a file written under an immutable reader: say what happened
                raise CopyFailed(f"nothing was copied: {exc}") from None
            raise CopyFailed(changed) from None
        finally:
            raw.close()
    finally:
        src.close()


# === Coordinator ===

def ensure_archive_dir(directory: str) -> Path:
    """ARCHIVE_DIR, created (mode 0700) if missing, with the stale partial files of interrupted runs
    removed (ArchiveFile.remove_stale); raises ConfigError when it is not a directory or cannot be written."""
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"ARCHIVE_DIR: {directory} is not a directory")
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        for partial in ArchiveFile.remove_stale(path, time.time()):
            log.info("removed %s, the partial archive file of an interrupted run", partial)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"ARCHIVE_DIR: cannot write {directory}: {exc.strerror or exc}") from None
    return path


@dataclasses.dataclass
class Upkeep:
    """What the background duties have done (the metrics show it)."""

    pruned: int = 0
    jobs_deleted: int = 0
    receipts_deleted: int = 0
    bids_deleted: int = 0
    passes_refused: int = 0  # retention passes not run: the wall clock stepped ahead (Coordinator.clock_agrees)
    clock_step_ms: int = 0  # how far ahead the wall clock is of what the monotonic clock implies, while refused
    clock_resets: int = 0  # a retention clock found stored in the future, restarted at start-up
    archive_files: int = 0
    archive_jobs: int = 0
    archive_errors: int = 0
    checkpoint: tuple[int, int, int] | None = None  # (busy, log frames, checkpointed frames) of the last one
    checkpoint_at: float = 0.0  # Unix seconds
    checkpoints: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)  # by outcome


CLAIMS_TIMED = 1 << 16  # claims whose monotonic time Coordinator.held_ms remembers
LIVENESS_UNIT = 256  # miners whose last_seen / last_heartbeat one unit of work records (liveness_units)


def liveness_units(seen: dict[str, int], beats: dict[str, Beat],
                   size: int = LIVENESS_UNIT) -> list[tuple[dict[str, int], dict[str, Beat]]]:
    """`seen` (miner -> wall-clock ms) and `beats` (miner -> (wall-clock ms, inflight)) cut into units of
    work of at most `size` miners together; at least one, maybe empty. A unit runs on the event loop
    and an update of a miner row costs ~7 us: at 10,000 miners a sweep records ~1,000, which in one
    unit held the loop 12-56 ms, a stall every request arriving meanwhile waited out."""
    items = [(True, item) for item in seen.items()] + [(False, item) for item in beats.items()]
    units = []
    for at in range(0, max(len(items), 1), size):
        part = items[at:at + size]
        units.append(({m: t for is_seen, (m, t) in part if is_seen}, {m: t for is_seen, (m, t) in part if not is_seen}))
    return units


class Coordinator:
    """The domain service behind the HTTP edge: owns the database, the poll hub and the sweeper."""

    RETENTION_BATCH = 16  # jobs pruned or deleted per unit of work: a few ms of the writer each
    RETENTION_WINDOW = 256  # oldest receipts or bids a deletion looks at: what is not due yet there is skipped
    RETENTION_IDLE_SECONDS = 30.0  # between retention passes once one has caught up
    # A wall clock more than this ahead of the last retention pass plus the monotonic time since pauses
    # retention (a pass would delete at once everything the step makes due) ...
    CLOCK_STEP_LIMIT_MS = DAY_MS
    # ... until the stepped clock has held this long on the monotonic clock (or steps back)
    CLOCK_SETTLE_SECONDS = 86_400.0
    WAL_CHECKPOINT_SECONDS = 10.0  # between background WAL checkpoints

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time,
                 migrated: tuple[int, int] | None = None, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.settings, self.clock, self.migrated, self.monotonic = settings, clock, migrated, monotonic
        # Miner silence is measured on the monotonic clock (a wall-clock step must not reap a healthy
        # miner): when each miner was last heard from, since this process started.
        self.heard: dict[str, float] = {}
        self.started = monotonic()
        self.claimed_at: collections.OrderedDict[str, float] = collections.OrderedDict()  # job -> monotonic claim
        self.started_at = now_ms(clock)  # the wall clock then (Unix ms): idempotency_cutoff paces it
        self.unrecorded: dict[str, int] = {}  # wall-clock ms of requests since the last sweep recorded them
        self.unrecorded_beats: dict[str, Beat] = {}  # likewise, heartbeats that changed nothing else
        self.reported: dict[str, tuple[int | None, str]] = {}  # (inflight, status) last written per miner
        self.db = (PgDatabase(settings.postgres_url) if settings.postgres_url
                   else Database(settings.db_path, settings.db_synchronous))
        self.hub = PollHub()
        # On PostgreSQL other instances queue jobs too: no shape is known to be empty for long
        self.matcher = Matcher(cache_queue=settings.postgres_url is None)
        # a submit hands its job to a parked poll in its own transaction where units run on the
        # loop's thread (SQLite); on PostgreSQL they run on threads, and polls claim when woken
        self.hand_off = None if settings.postgres_url else (self.hub, self.matcher)
        self.limiter = RateLimiter(settings.rate_limit_requests, settings.rate_limit_window_seconds)
        self.signer = Signer.from_settings(settings)
        self.notary: Notary | None = None  # signs the receipt log's checkpoints, once start() has one
        self.checkpoint_due = -math.inf  # monotonic time when the log may have its next checkpoint
        self.pruned_to = 0  # how far (wall-clock ms) old checkpoints have been thinned to one an hour
        self.log_edge = LogEdge()
        self.log_damage: str | None = None  # why the receipt log is damaged, as first found (logged once)
        self.db.abort_hooks += [self.matcher.reset, self.log_edge.reset, self.hub.give_back_all]
        if self.hand_off is not None:
            self.db.commit_hooks.append(self.deliver_hand_offs)
        # On PostgreSQL other instances may share the database: wake-ups go to them and come from them
        self.peers = (Peers(settings.postgres_url, self.peer_wake, self.hub.wake_all, self.db.notify)  # type: ignore[attr-defined]
                      if settings.postgres_url else None)
        self._peer_reads: set[asyncio.Task[None]] = set()
        self._releases: set[asyncio.Task[None]] = set()  # jobs handed to polls that had ended (deliver_hand_offs)
        # PostgreSQL: silence is judged on the database server's clock, the one clock instances share,
        # estimated here as its reading at an anchor plus the monotonic time since (db_time)
        self.db_anchor = (0, 0.0)  # (database clock, Unix ms; monotonic s) when it was last read
        # miners heard from, and those parked here since: monotonic time their heard_at was last written, in that order
        self.stamped: dict[str, float] = {}
        self.cluster_duties = 0  # ticks in which this instance ran the cluster's duties
        self._sweeper: asyncio.Task[None] | None = None
        self.running = False  # between start() and stop()
        self.silent_unmarked: list[str] = []  # found silent by a sweep that failed: marked by the next
        self.back: set[str] = set()  # heard from after being found silent: marked online by the next sweep
        # Miners whose slots changed (a claim, a job ending): the next sweep brings their offers up to
        # date, so a busy fleet's claims and completions cost no offer write each (SPEC section 10).
        self.slots_changed: set[str] = set()
        self.retention_clock = 0  # when retention's clock started (Unix ms; set at start)
        # (wall ms, monotonic s) of the last retention pass that ran (at start: the stored one's wall
        # time and the start, so a stop longer than CLOCK_STEP_LIMIT_MS counts as a step), or None
        self.retention_anchor: tuple[int, float] | None = None
        self.clock_step: tuple[int, float] | None = None  # (ms ahead, monotonic s when first seen) while refused
        self.upkeep = Upkeep()
        self._upkeep_task: asyncio.Task[None] | None = None
        self._next_retention = self._next_wal_checkpoint = 0.0  # on the monotonic clock
        self._stopping = threading.Event()  # asks an archive being written in a worker thread to stop

    def now(self) -> int:
        return now_ms(self.clock)

    def paced_now(self) -> int:
        """The wall clock (Unix ms) held to the monotonic clock's pace since start-up: what expiry by
        age reads (idempotency keys, checkpoint thinning), so that a step ahead of the wall clock (a
        VM restored with a bad RTC) does not age everything at once. A step back, or time the
        monotonic clock did not count (a suspended VM), only keeps things longer. (Job deadlines stay
        on the wall clock: clients set them in wall time.)"""
        return min(self.now(), self.started_at + int((self.monotonic() - self.started) * 1000))

    def held_ms(self, job_id: str) -> int | None:
        """How long ago (ms, monotonic clock) this process handed `job_id` to a miner, or None when it
        did not (or forgot: it remembers the CLAIMS_TIMED latest). What a receipt bills when the
        miner reports no units: on the wall clock alone, a step during the job would bill the step
        (ahead) or a negative time (back) at the miner's price."""
        at = self.claimed_at.get(job_id)
        return None if at is None else max(0, int((self.monotonic() - at) * 1000))

    def idempotency_cutoff(self) -> int:
        """Idempotency keys made before this (Unix ms) have expired: IDEMPOTENCY_TTL_SECONDS before
        paced_now. On the wall clock alone, a step ahead would expire every key at once, and a client
        retrying a submit meanwhile would get its job made twice."""
        return self.paced_now() - self.settings.idempotency_ttl_seconds * 1000

    async def start(self) -> None:
        """Migrate (unless `migrated` says it was done), open the database, settle the keys and the
        receipt log, and start the background sweeper; raises ConfigError, having closed what it
        opened. Once started, a second call does nothing (the server starts the coordinator before
        uvicorn's lifespan does, so that a ConfigError ends `serve` with one line)."""
        if self.running:
            return
        before, after = self.migrated or migrate_database(self.settings)
        log.info("aitbc-coord %s database %s schema version %d (was %d)",
                 __version__, self.settings.database, after, before)
        for role in self.settings.dev_key_roles:
            log.warning("no %s keys configured: accepting the development key (APP_ENV=dev only)", role)
        await self.db.start()
        if self.peers is not None:
            self.peers.start(asyncio.get_running_loop())
        try:
            if self.peers is not None:
                await self.anchor_db_clock()
            await self.open_keys()
            await self.open_log()
            await self.open_fleet()
            await self.start_retention()
        except BaseException:
            if self.peers is not None:
                await self.peers.stop()
            await self.db.close()
            raise
        self.running = True
        if self.settings.sweep_interval_seconds > 0:
            self._sweeper = asyncio.create_task(self._sweep_forever())

    async def open_keys(self) -> None:
        """Settle the receipt keys (a development one in dev when none is configured) and record them;
        raises ConfigError (a development key file that cannot be used)."""
        s = self.settings
        if self.signer is None and s.app_env == "dev" and s.dev_signing_key:
            seed, path, made = load_dev_seed(":memory:" if s.postgres_url else s.db_path)
            self.signer = Signer.from_settings(s, seed)
            log.warning("no RECEIPT_SIGNING_KEY_HEX/_FILE: receipts are signed with a development key %s %s "
                        "(APP_ENV=dev only; it proves nothing to anyone else)%s",
                        "made now in" if made else "kept in", path or "memory",
                        "; on PostgreSQL a new one at every start, and the receipt log keeps the first one's"
                        " name: give every instance one key from the start (aitbc-coord keygen --out FILE,"
                        " RECEIPT_SIGNING_KEY_FILE=FILE)" if s.postgres_url else "")
        if self.signer is not None:
            await self.db.write(add_signing_keys, self.signer.key_ids(), self.now())
            for key_id, role in self.signer.key_ids():
                log.info("receipt %s key %s", role, key_id)
        else:
            log.warning("no RECEIPT_SIGNING_KEY_HEX/_FILE: completed jobs get no receipts")

    async def open_fleet(self) -> None:
        """Give every miner the last sweep judged alive a fresh timeout from now (on PostgreSQL: when the
        whole cluster was down, tx_fresh_cluster), and bring every offer up to date (the slots that
        changed after the last sweep before a stop are not known)."""
        for miner_id in await self.db.read(list_miner_ids, True):
            self.heard.setdefault(miner_id, self.started)
        if self.peers is not None and await self.apply(tx_fresh_cluster, self.db_time(),
                                                       int(self.settings.heartbeat_timeout_seconds * 1000)):
            log.info("no instance ran the cluster's duties for HEARTBEAT_TIMEOUT_SECONDS: every miner gets a fresh"
                     " timeout")
        miners = await self.db.read(list_miner_ids)
        for i in range(0, len(miners), 1000):
            await self.db.write(tx_refresh_offers, miners[i:i + 1000])

    async def open_log(self) -> None:
        """Settle the receipt log's key and origin, and publish a checkpoint if it has none of its size."""
        s = self.settings
        seed = s.log_seed or (self.signer.signing.encode() if self.signer is not None else None)
        if seed is None:
            return
        key = SigningKey(seed)
        origin = await self.apply(tx_open_log, key_id_of(key), s.log_origin,
                                  default_origin(s.coordinator_id, bytes(key.verify_key)), self.now())
        self.notary = Notary(key, origin)
        log.info("receipt log %s: checkpoints signed by %s", origin, self.notary.verifier.encode())
        with contextlib.suppress(LogDamaged):  # noted (logged once) by apply: serve all that needs no append
            await self.checkpoint()

    async def checkpoint(self) -> bool:
        """Publish a checkpoint of the receipt log if it has grown since the last one and that is at least
        RECEIPT_LOG_CHECKPOINT_SECONDS old (monotonic clock); whether one was made."""
        if self.notary is None or self.monotonic() < self.checkpoint_due:
            return False
        if not await self.db.read(log_has_grown):
            return False  # the common case when idle: a read, no write
        made = await self.apply(tx_checkpoint, self.notary, self.now(), self.pruned_to, self.paced_now())
        if made is None:
            return False
        self.pruned_to = made[1]
        self.checkpoint_due = self.monotonic() + self.settings.log_checkpoint_seconds
        return True

    def checkpoint_retry_after(self) -> int | None:
        """Seconds until a receipt logged now is under a checkpoint (at least 1): for 425's Retry-After.
        None when this process signs no checkpoints (no log key): none will come."""
        if self.notary is None:
            return None
        # checkpoint_due is -inf until this process has made a checkpoint: then the next tick may
        wait = max(self.checkpoint_due - self.monotonic(), 0.0) + self.settings.sweep_interval_seconds
        return max(1, math.ceil(wait))

    async def start_retention(self) -> None:
        """Check ARCHIVE_DIR, start retention's clock on the first start that has one (jobs finished
        before count as finished now: an upgrade never prunes at once) and say what will be kept."""
        s = self.settings
        if s.archive_dir is not None:
            ensure_archive_dir(s.archive_dir)
        now = self.now()
        self.retention_clock, started = await self.apply(tx_start_retention_clock, now)
        if self.retention_clock > now + self.CLOCK_STEP_LIMIT_MS:
            log.error("retention: its clock was stored as started at %s, %.1f days ahead of now (%s): the wall clock "
                      "was wrong at the first start; restarting it now, so nothing finished since is kept forever",
                      iso(self.retention_clock), (self.retention_clock - now) / DAY_MS, iso(now))
            await self.apply(tx_set_retention_mark, "clock_started", now)
            self.retention_clock = now
            self.upkeep.clock_resets += 1
        if (last := await self.db.read(get_retention_mark, "last_pass")) is not None:
            self.retention_anchor = (last, self.monotonic())
        if started:  # the first start of this version: jobs still to run get canonical payloads
            await self.apply(tx_canonical_payloads)
        finished = sum(n for state, n in (await self.db.read(get_job_counts)).items() if state not in ACTIVE_STATES)
        if started and finished:
            log.warning("retention: %d jobs had finished before this first start with retention; their retention "
                        "clock starts now (%s), so none of them is pruned before %s", finished, iso(self.retention_clock),
                        iso(self.retention_clock + (s.payload_retention_days or 0) * DAY_MS)
                        if s.payload_retention_days else "ever (PAYLOAD_RETENTION_DAYS=keep)")
        days = {"payloads": s.payload_retention_days, "jobs": s.job_retention_days, "receipts": s.receipt_retention_days}
        retention = ", ".join(f"{k} {'kept' if v is None else f'{v} days'}" for k, v in days.items())
        if s.archive_dir is None:
            log.info("retention: %s; archive: off (ARCHIVE_DIR unset)", retention)
        elif s.payload_retention_days is None:  # a day is archived just before its payloads are pruned: never
            log.warning("retention: %s; archive: %s will never be written: a day is archived just before its "
                        "payloads are pruned, and PAYLOAD_RETENTION_DAYS=keep prunes none", retention, s.archive_dir)
        else:
            log.info("retention: %s; archive: %s (each UTC day once the whole day is %d days old)", retention,
                     s.archive_dir, s.payload_retention_days)

    async def stop(self) -> None:
        self.running = False
        self.hub.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self.unrecorded or self.unrecorded_beats:  # what the sweeper would have recorded next
            try:
                await self.record_liveness(self.take_liveness())
            except Exception:
                log.exception("liveness heard since the last sweep not recorded at stop")
        self._stopping.set()  # retention stops between batches, an archive between chunks
        if self._upkeep_task is not None:
            await self._upkeep_task
        if self.peers is not None:
            await self.peers.stop()
        await self.db.close()

    def note_log_damage(self, exc: LogDamaged) -> None:
        """Log, once for the life of the process, that the receipt log is damaged (repairing it means
        restoring the database, and so a restart)."""
        if self.log_damage is None:
            log.error("the receipt log is damaged: %s. Completions (which must log their receipts) and proofs "
                      "that need the missing rows answer 503 until an operator restores the database from "
                      "its latest backup; auditors will report what changed", exc.why)
            self.log_damage = exc.why

    async def apply(self, fn: Callable[..., Outcome], *args: Any) -> Any:
        """Run a unit of work; wake the pollers it concerns; raise the error it returned, else its value."""
        try:
            out = await self.db.write(fn, *args)
        except LogDamaged as exc:
            self.note_log_damage(exc)
            raise
        self.slots_changed.update(out.wake.miners)
        if out.wake:  # nothing changed that could give anyone work: nobody to wake
            if out.wake.queued:  # (a slot freed alone queues nothing: PostgreSQL's hint stays as it is)
                self.matcher.queue(job[2] for job in out.wake.queued)
            self.hub.notify(out.wake)
            if self.peers is not None:
                self.peers.send(out.wake)
        if out.error is not None:
            try:
                raise out.error
            finally:
                del out  # the traceback holds this frame: the frame must not hold the error (a cycle)
        return out.value

    def deliver_hand_offs(self) -> None:
        """A batch committed (Database.commit_hooks): its hand-offs reach their polls. A job handed to a
        poll that ended before the commit goes back to the queue, as miner_poll's does for a poll whose
        client has gone."""
        for miner_id, job in self.hub.deliver_all():
            log.info("poll of %s ended before its hand-off committed; job %s back in the queue", miner_id, job["job_id"])
            task = asyncio.get_running_loop().create_task(self._release_orphan(miner_id, job["job_id"]))
            self._releases.add(task)
            task.add_done_callback(self._releases.discard)

    async def _release_orphan(self, miner_id: str, job_id: str) -> None:
        try:
            await self.apply(tx_release, miner_id, job_id)
        except Exception as exc:  # noqa: BLE001 - its lease ends it, as any job whose miner went away
            log.warning("job %s, handed to a poll of %s that had ended, not put back (%s): its lease ends it",
                        job_id, miner_id, exc)

    def peer_wake(self, wake: Wake) -> None:
        """What another instance committed (Peers): wake the polls here it concerns. A job sent without
        its constraints (too long for a payload) has them read first."""
        if wake.queued:
            self.matcher.queue(shape for _, _, shape in wake.queued)
        if all(text is not None for _, text, _ in wake.queued):
            self.hub.notify(wake)
            return
        task = asyncio.get_running_loop().create_task(self._peer_wake_read(wake))
        self._peer_reads.add(task)
        task.add_done_callback(self._peer_reads.discard)

    async def _peer_wake_read(self, wake: Wake) -> None:
        try:
            texts = await self.db.read(get_constraints_of, [job for job, text, _ in wake.queued if text is None])
        except (*DB_ERRORS, Unavailable) as exc:  # the sweep's re-announcement covers it
            log.warning("constraints of jobs another instance queued not read: %s", exc)
            return
        wake.queued = [(job, text if text is not None else texts[job], shape) for job, text, shape in wake.queued
                       if text is not None or job in texts]
        self.hub.notify(wake)

    async def reannounce(self) -> int:
        """On PostgreSQL, the oldest live job of each shape with QUEUED jobs, announced to this instance's
        parked polls as if newly queued: a wake-up another instance sent and this one missed (a listener
        reconnecting, a notification that could not be sent) costs at most one sweep tick. Only while
        polls here wait for work; the number of jobs announced."""
        if self.peers is None or not self.hub.kinds:
            return 0
        heads = await self.db.read(list_queue_heads, self.now())
        if heads:
            self.hub.notify(Wake(queued=heads))
        return len(heads)

    def heard_from(self, miner_id: str) -> None:
        """An authenticated miner request arrived (a sign of life, whatever its answer). Silence is
        judged from memory; the wall-clock last_seen reads show is written by the next sweep, with
        every other miner heard from meanwhile, in one statement."""
        heard = self.heard
        if heard.pop(miner_id, None) is None:  # kept in the order heard: the silent are found at the front
            self.back.add(miner_id)  # silent until now (or new): the sweep marks it online
        heard[miner_id] = self.monotonic()
        self.unrecorded[miner_id] = self.now()

    def is_silent(self, miner_id: str) -> bool:
        """Whether a miner has gone HEARTBEAT_TIMEOUT_SECONDS without a request, by the monotonic clock.
        A miner parked in a long-poll is not; after a restart each miner has a fresh timeout."""
        if miner_id in self.hub.by_miner:
            return False
        return self.monotonic() - self.heard.get(miner_id, self.started) > self.settings.heartbeat_timeout_seconds

    def newly_silent(self) -> list[str]:
        """The miners that went silent since the last sweep (oldest first), forgotten until heard again;
        O(those), not O(fleet): `heard` is in the order miners were heard. One parked in a long-poll is
        alive, and goes to the back."""
        now = self.monotonic()
        cutoff = now - self.settings.heartbeat_timeout_seconds
        expired = list(itertools.takewhile(lambda item: item[1] < cutoff, self.heard.items()))
        silent = []
        for miner_id, _ in expired:
            del self.heard[miner_id]
            if miner_id in self.hub.by_miner:
                self.heard[miner_id] = now
            else:
                silent.append(miner_id)
                self.reported.pop(miner_id, None)  # (its next heartbeat is written: a miner gone for good is not kept)
        return silent

    async def anchor_db_clock(self) -> None:
        """Read the database server's clock (PostgreSQL) to estimate it from the monotonic clock (db_time)."""
        at = await self.db.read(lambda conn: conn.execute("SELECT db_now_ms()").fetchone()[0])
        self.db_anchor = (int(at), self.monotonic())

    def db_time(self, at: float | None = None) -> int:
        """The database server's clock (Unix ms) at monotonic time `at` (default now): its reading at the
        anchor plus the monotonic time since, re-read every DB_CLOCK_ANCHOR_SECONDS. Instances on
        different machines share no monotonic clock; this is what they compare miners' silence on."""
        anchor_ms, anchor_mono = self.db_anchor
        return anchor_ms + int(((self.monotonic() if at is None else at) - anchor_mono) * 1000)

    async def sweep(self) -> int:
        """One pass of expiry, lost-miner recovery and offer liveness, then the liveness of the miners
        heard from since the last pass (liveness_units); the number of jobs taken back. (PostgreSQL:
        sweep_shared.)"""
        if self.peers is not None:
            return await self.sweep_shared()
        s, now = self.settings, self.now()
        units = self.take_liveness()
        silent = [m for m in self.silent_unmarked if m not in self.heard] + self.newly_silent()
        back, self.back, self.silent_unmarked = [m for m in self.back if m in self.heard], set(), []
        slots, self.slots_changed = self.slots_changed, set()
        try:
            taken_back = int(await self.apply(tx_sweep, now, self.is_silent, int(s.heartbeat_timeout_seconds * 1000),
                                              s.job_max_attempts, self.idempotency_cutoff(), *units[0],
                                              silent, back, slots))
        except BaseException:  # recorded by the next sweep instead (or, cancelled, by stop)
            self.put_back_liveness(units)
            self.silent_unmarked, self.back, self.slots_changed = silent, {*back, *self.back}, {*slots, *self.slots_changed}
            raise
        await self.record_liveness(units[1:])
        return taken_back

    async def sweep_shared(self) -> int:
        """PostgreSQL, one tick: this instance records when it heard from miners on the database
        server's clock (those heard since the last tick, and those parked in its long-polls once a third
        of HEARTBEAT_TIMEOUT_SECONDS), and their last_seen as on SQLite; then, on one instance a tick,
        the cluster's duties (tx_cluster_sweep). The number of jobs taken back."""
        s = self.settings
        if self.monotonic() - self.db_anchor[1] > DB_CLOCK_ANCHOR_SECONDS:
            await self.anchor_db_clock()
        mono = self.monotonic()
        timeout_ms = int(s.heartbeat_timeout_seconds * 1000)
        units = self.take_liveness()
        heard = {m: self.db_time(self.heard.get(m, mono)) for seen, beats in units for m in {*seen, *beats}}
        stale = mono - s.heartbeat_timeout_seconds / 3
        # stamped is in the order stamped: the due are at the front, and a tick walks them only, not
        # every parked miner (each was heard by the request that parked it, and stamped by the next tick)
        due = list(itertools.takewhile(lambda item: item[1] < stale, self.stamped.items()))
        parked = self.hub.by_miner
        heard.update({m: self.db_time(mono) for m, _ in due if m in parked and m not in heard})
        slots, self.slots_changed = self.slots_changed, set()
        try:
            names = list(heard)
            for i in range(0, max(len(names), 1), 1000):
                await self.apply(tx_record_heard, {m: heard[m] for m in names[i:i + 1000]}, self.db_time() - timeout_ms,
                                 slots if i == 0 else ())
            await self.record_liveness(units)
        except BaseException:
            self.put_back_liveness(units)
            self.slots_changed |= slots
            raise
        for m, _ in due:
            self.stamped.pop(m, None)
        for m in heard:  # due again in a third of the timeout, when it may be parked (its poll's body still came in)
            self.stamped.pop(m, None)
            self.stamped[m] = mono
        taken = await self.apply(tx_cluster_sweep, self.now(), self.db_time(), int(s.sweep_interval_seconds * 1000),
                                 timeout_ms, s.job_max_attempts, self.idempotency_cutoff())
        if taken is None:
            return 0
        self.cluster_duties += 1
        return int(taken)

    def take_liveness(self) -> list[tuple[dict[str, int], dict[str, Beat]]]:
        """The liveness heard since it was last taken, as liveness_units, no longer kept in memory."""
        units = liveness_units(self.unrecorded, self.unrecorded_beats)
        self.unrecorded, self.unrecorded_beats = {}, {}
        return units

    async def record_liveness(self, units: list[tuple[dict[str, int], dict[str, Beat]]]) -> None:
        """Record `units` one unit of work at a time (tx_record_liveness), each committed before the
        next is queued, so that requests are served between them. What is not recorded is put back and
        the error raised: a failed commit (the next sweep records it), or a stop cancelling the sweep
        (stop records it)."""
        for k, unit in enumerate(units):
            try:
                await self.apply(tx_record_liveness, *unit)
            except BaseException:
                self.put_back_liveness(units[k:])
                raise

    def put_back_liveness(self, units: list[tuple[dict[str, int], dict[str, Beat]]]) -> None:
        """Liveness that was not recorded waits for the next sweep (newer readings kept)."""
        for seen, beats in units:
            self.unrecorded, self.unrecorded_beats = {**seen, **self.unrecorded}, {**beats, **self.unrecorded_beats}

    async def heartbeat(self, miner_id: str, inflight: int | None, status: str, metadata: str | None) -> None:
        """Record a heartbeat; raises NotFound for an unregistered miner. One that repeats what the last
        written one said is kept in memory and recorded by the next sweep: a fleet's steady heartbeats
        cost no write each. Either way its `inflight` is judged (release_unreceived). On PostgreSQL every
        heartbeat is written: another instance may have changed the row (a status, a registration) since
        this one last wrote it, and what this one remembers would then hide a change."""
        now = self.now()
        remembered = not self.settings.postgres_url  # one writer: what this process wrote is what is stored
        if remembered and metadata is None and self.reported.get(miner_id) == (inflight, status):
            self.unrecorded_beats[miner_id] = (now, inflight)
            return
        await self.apply(tx_heartbeat, miner_id, inflight, status, metadata, now)
        if remembered:
            self.reported[miner_id] = (inflight, status)

    def registered(self, miner_id: str) -> None:
        """A (re-)registration reset what the miner had reported."""
        self.reported.pop(miner_id, None)

    async def read_log(self, fn: Callable[..., T], *args: Any) -> T:
        """db.read for the receipt log's routes: a damaged log is noted (logged once) and raised."""
        try:
            return await self.db.read(fn, *args)
        except LogDamaged as exc:
            self.note_log_damage(exc)
            raise

    async def _sweep_forever(self) -> None:
        """The background tick: expiry, lost-miner recovery and offer liveness, then the receipt log's checkpoint,
        then (not waited for) the upkeep: retention and WAL checkpoints."""
        while True:
            await asyncio.sleep(self.settings.sweep_interval_seconds)
            for duty in (self.sweep, self.checkpoint, self.reannounce):
                try:
                    await duty()
                except LogDamaged:  # noted, and logged once, by apply
                    pass
                except Exception:  # keep ticking; the next pass retries
                    log.exception("%s failed", duty.__name__)
            self.tend()

    def tend(self) -> None:
        """Start the background upkeep (a WAL checkpoint, a retention pass) when one is due and none is
        running; the sweep never waits for it."""
        if self._upkeep_task is not None and not self._upkeep_task.done():
            return
        now = self.monotonic()
        checkpoint, retention = now >= self._next_wal_checkpoint, now >= self._next_retention
        if checkpoint or retention:
            self._upkeep_task = asyncio.create_task(self._upkeep(checkpoint, retention))

    async def _upkeep(self, checkpoint: bool, retention: bool) -> None:
        if retention:
            try:
                await self.retain()
            except Exception:  # the next pass retries
                log.exception("retention pass failed")
            self._next_retention = self.monotonic() + self.RETENTION_IDLE_SECONDS
        if checkpoint:
            await self.wal_checkpoint()
            self._next_wal_checkpoint = self.monotonic() + self.WAL_CHECKPOINT_SECONDS

    async def wal_checkpoint(self) -> str:
        """A passive WAL checkpoint (Database.checkpoint); its outcome: complete (the log can restart and
        shrink to WAL_SIZE_LIMIT_BYTES), partial (a reader still needs older frames), busy or error."""
        try:
            busy, frames, done = await self.db.wal_checkpoint()
        except (*DB_ERRORS, Unavailable) as exc:
            log.warning("WAL checkpoint failed: %s", exc)
            outcome = "error"
        else:
            outcome = "busy" if busy else "complete" if done >= frames else "partial"
            self.upkeep.checkpoint, self.upkeep.checkpoint_at = (busy, frames, done), self.clock()
        self.upkeep.checkpoints[outcome] += 1
        return outcome

    async def maintain(self, fn: Callable[..., Outcome], *args: Any) -> Any:
        """Run a background unit of work in a transaction of its own; its value."""
        out = await self.db.write_alone(fn, *args)
        if out.error is not None:
            try:
                raise out.error
            finally:
                del out  # as in apply
        return out.value

    def retention_cutoff(self, days: int | None, now: int) -> int | None:
        """What finished before this is due (Unix ms), or None when nothing is: retention is off, or its
        clock started too recently (a job that finished before then counts as finished then)."""
        if days is None or self.retention_clock > now - days * DAY_MS:
            return None
        return now - days * DAY_MS

    def clock_agrees(self, now: int, mono: float) -> bool:
        """Whether a retention pass may trust the wall clock `now` (Unix ms): not when it is more than
        CLOCK_STEP_LIMIT_MS ahead of the last pass plus the monotonic time since (a step ahead, e.g. a
        VM restored with a bad RTC, would make everything due at once and delete it), until that step
        has held for CLOCK_SETTLE_SECONDS. A step back is always trusted (it only delays retention).
        Logs a refused step once, and keeps it in the metrics."""
        if self.retention_anchor is None:
            return True
        wall, at = self.retention_anchor
        ahead = now - wall - int((mono - at) * 1000)
        step, self.upkeep.clock_step_ms = self.clock_step, 0
        if ahead <= self.CLOCK_STEP_LIMIT_MS:
            if step is not None:
                log.warning("retention: the wall clock agrees with the monotonic clock again; retention resumes")
            self.clock_step = None
            return True
        if step is None or abs(ahead - step[0]) > self.CLOCK_STEP_LIMIT_MS:  # a new step
            log.error("retention paused: the wall clock (%s) is %.1f days ahead of the last retention pass (%s) plus "
                      "the time since on the monotonic clock (the clock stepped ahead, or the service was stopped that "
                      "long); nothing is pruned or deleted until it steps back or has held for %.0f hours",
                      iso(now), ahead / DAY_MS, iso(wall), self.CLOCK_SETTLE_SECONDS / 3600)
            self.clock_step = step = (ahead, mono)
        if mono - step[1] >= self.CLOCK_SETTLE_SECONDS:
            log.warning("retention: the wall clock has held %.1f days ahead for %.0f hours: taking it as right",
                        ahead / DAY_MS, (mono - step[1]) / 3600)
            self.clock_step = None
            return True
        self.upkeep.passes_refused += 1
        self.upkeep.clock_step_ms = ahead
        return False

    async def retain(self) -> dict[str, int]:
        """One retention pass, until nothing is due: (with ARCHIVE_DIR) archive each due day and prune
        it, else prune due payloads; then delete job summaries, bids and receipts past their retention.
        Each unit runs alone and small. Nothing runs while the wall clock is not trusted (clock_agrees:
        the value has "refused": 1). On PostgreSQL one instance of the cluster runs a pass at a time
        (cluster_lock: another's pass meanwhile does nothing). Returns what it did; raises what
        archiving or the database raised (what was done stays done)."""
        s, now, mono = self.settings, self.now(), self.monotonic()
        done = {"archived": 0, "pruned": 0, "jobs_deleted": 0, "receipts_deleted": 0, "bids_deleted": 0, "refused": 0}
        if (s.payload_retention_days, s.job_retention_days, s.receipt_retention_days) == (None, None, None):
            return done  # all kept: nothing to do, nothing to record
        if not self.clock_agrees(now, mono):
            done["refused"] = 1
            return done
        async with self.db.cluster_lock(RETENTION_LOCK) as mine:
            if mine:  # (PostgreSQL: else another instance is running a pass)
                await self._retain(now, mono, done)
        return done

    async def _retain(self, now: int, mono: float, done: dict[str, int]) -> None:
        s = self.settings
        await self.apply(tx_set_retention_mark, "last_pass", now)
        self.retention_anchor = (now, mono)
        before = self.retention_cutoff(s.payload_retention_days, now)
        if before is not None and s.archive_dir is not None:
            await self._archive_and_prune(Path(s.archive_dir), day_start(before), now, done)
        elif before is not None:
            done["pruned"] += await self._until_done(tx_prune_due, before, now, self.RETENTION_BATCH)
        if (before := self.retention_cutoff(s.job_retention_days, now)) is not None:
            done["jobs_deleted"] += await self._until_done(tx_delete_jobs, before, self.RETENTION_BATCH)
            done["bids_deleted"] += await self._until_done(tx_delete_bids, before, self.RETENTION_WINDOW,
                                                           self.RETENTION_BATCH)
        if (before := self.retention_cutoff(s.receipt_retention_days, now)) is not None:
            done["receipts_deleted"] += await self._until_done(tx_delete_receipts, before, self.RETENTION_WINDOW,
                                                               self.RETENTION_BATCH)
        self.upkeep.pruned += done["pruned"]
        self.upkeep.jobs_deleted += done["jobs_deleted"]
        self.upkeep.receipts_deleted += done["receipts_deleted"]
        self.upkeep.bids_deleted += done["bids_deleted"]

    async def _until_done(self, unit: Callable[..., Outcome], *args: Any) -> int:
        """Run `unit` (whose last argument is its batch size) until a batch is not full; the total."""
        total, batch = 0, args[-1]
        while not self._stopping.is_set():
            n = await self.maintain(unit, *args)
            total += n
            if n < batch:
                break
        return total

    async def _archive_and_prune(self, directory: Path, before: int, now: int, done: dict[str, int]) -> None:
        """Archive, then prune, each whole UTC day of finished jobs before `before`, oldest first."""
        for partial in ArchiveFile.remove_stale(directory, time.time()):
            log.info("removed %s, the partial archive file of an interrupted run", partial)
        checked: set[int] = set()  # days whose published files were looked at this pass
        while not self._stopping.is_set() and (first := await self.db.read(oldest_unpruned_finish, before)) is not None:
            if day_start(first) not in checked:
                checked.add(day_start(first))
                held = await asyncio.to_thread(find_archived, self.settings.target, directory, day_start(first))
                if held:
                    log.warning("%d jobs that finished on %s are in its archive files already but were not pruned"
                                " (a run was stopped in between): pruning them", len(held), day_name(first))
                    for i in range(0, len(held), self.RETENTION_BATCH):
                        done["pruned"] += await self.maintain(tx_prune, held[i:i + self.RETENTION_BATCH], now)
                    continue
            try:
                seqs, path = await asyncio.to_thread(export_unpruned_day, self.settings.target, directory,
                                                     day_start(first), self._stopping)
            except (OSError, *DB_ERRORS) as exc:
                self.upkeep.archive_errors += 1
                log.error("archiving %s failed, nothing of it is pruned: %s", day_name(first), exc)
                raise
            if path is None:
                return
            log.info("archived %d jobs that finished on %s to %s", len(seqs), day_name(first), path)
            done["archived"] += len(seqs)
            self.upkeep.archive_files += 1
            self.upkeep.archive_jobs += len(seqs)
            for i in range(0, len(seqs), self.RETENTION_BATCH):
                done["pruned"] += await self.maintain(tx_prune, seqs[i:i + self.RETENTION_BATCH], now)

    async def poll(self, miner_id: str, max_wait: float) -> tuple[sqlite3.Row | None, bool]:
        """Assign a job now, or wait up to `max_wait` seconds for one: (job or None, whether it waited)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(max_wait, self.settings.poll_max_wait_seconds)
        if self.hub.polls_of(miner_id) >= self.settings.poll_max_concurrent:
            raise TooManyRequests("too many concurrent polls for this miner")
        waiter = self.hub.add(miner_id)
        waited = False
        try:
            while True:
                job = await self._claim(waiter)
                if job is not None or loop.time() >= deadline or self.hub.closing:
                    return job, waited
                waited = True
                timer = loop.call_at(deadline, waiter.event.set)  # cheaper than wait_for's task
                try:
                    await waiter.event.wait()
                    while waiter in self.hub.handing:  # taken for a hand-off: its commit decides
                        waiter.event.clear()
                        await waiter.event.wait()
                finally:
                    timer.cancel()
                    self.hub.unpark(waiter)
                if waiter.handed is not None:
                    job, waiter.handed = waiter.handed, None
                    self.claimed(waiter.miner_id, job)
                    return job, waited
                if self.hub.closing or (loop.time() >= deadline and not waiter.woken_for):
                    return None, waited  # shutting down, or its time is up with nothing picked for it
        finally:
            self.hub.remove(waiter)
            self.heard_from(miner_id)  # a poll in progress kept it alive until now
            if waiter.woken_for:  # picked while it was leaving: the next able miner
                self.hub.notify(Wake(queued=waiter.woken_for))

    def claimed(self, miner_id: str, job: sqlite3.Row) -> None:
        """A poll of `miner_id` got `job`: its slots changed, and the claim's time is kept for billing."""
        self.slots_changed.add(miner_id)
        self.claimed_at.pop(job["job_id"], None)  # (claimed again: now the latest)
        self.claimed_at[job["job_id"]] = self.monotonic()
        if len(self.claimed_at) > CLAIMS_TIMED:
            self.claimed_at.popitem(last=False)

    async def _claim(self, waiter: Waiter) -> sqlite3.Row | None:
        """One claim for a poll; parks it when there was nothing (and nothing changed meanwhile)."""
        while True:
            picked_for, waiter.woken_for = waiter.woken_for, []
            mark = self.hub.mark(waiter.miner_id)
            job = None
            if self.matcher.worth_claiming():  # jobs may be queued: claim at once
                job, profile, ready = await self.apply(tx_poll, waiter.miner_id, self.now(), self.matcher,
                                                       [p[0] for p in picked_for])
                if ready:
                    self.matcher.claimed(job is not None)
            else:  # nothing queued: a read, so that renewals of an idle fleet cost no write or commit
                profile, ready, available = await self.db.peek(read_poll, waiter.miner_id, self.now(), self.matcher)
                if profile is None:
                    raise NotFound("miner not registered")
                if available:  # queued since the set was read
                    job, profile, ready = await self.apply(tx_poll, waiter.miner_id, self.now(), self.matcher,
                                                           [p[0] for p in picked_for])
                    self.matcher.claimed(job is not None)
            if job is not None:
                self.claimed(waiter.miner_id, job)
            missed = [p for p in picked_for if job is None or p[0] != job["job_id"]]
            if missed:  # picked for jobs it did not get: those still queued go to the next able miner
                still = await self.db.read(list_queued_among, [p[0] for p in missed])
                self.hub.notify(Wake(queued=[p for p in missed if p[0] in still]))
            if job is not None or self.hub.closing:
                return job
            if not self.hub.changed_since(mark, profile, ready):
                self.hub.park(waiter, profile, ready)
                return None


# === Wire models ===
# Request models validate what comes in; each response model (Out) sits beside the function that
# builds its data, and /openapi.json is generated from them.

class Model(BaseModel):
    """Request models: unknown fields are ignored (clients send extras); NaN and Infinity refused."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


def _echo(value: Any) -> Any:
    """A refused input as an error repeats it; an integer few clients could parse is described instead."""
    if isinstance(value, BigInt):
        return f"an integer of {len(value.text.lstrip('-'))} digits"
    return value


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain U+0000")
    return value


# A string stored as a text column of its own (not inside a JSON object, where U+0000 stays escaped):
# U+0000 is refused, so that every backend stores what SQLite does (PostgreSQL's text cannot hold it).
NO_NUL_PATTERN = "^[^\u0000]*$"
Text = Annotated[str, AfterValidator(_no_nul), Field(json_schema_extra={"pattern": NO_NUL_PATTERN})]


class Constraints(Model):
    gpu: Text | None = None
    cuda: Text | None = None
    min_vram_gb: int | None = Field(None, ge=0, le=MAX_GPU_MEMORY_GB)
    models: list[Text] | None = None
    region: Text | None = None
    max_price: float | None = Field(None, ge=0, le=MAX_AMOUNT)


class JobSubmit(Model):
    payload: dict[str, Any]
    constraints: Constraints | None = None
    ttl_seconds: int | None = Field(None, description="values below 1 count as 1; above JOB_TTL_MAX_SECONDS: 422")


DECIMAL_RE = re.compile(r"-?[0-9]+")


def _decimal_digits(value: Any) -> Any:
    """A query parameter's integer in decimal digits only: int() and pydantic's lax mode would take
    "3_0" as 30, "1.0" as 1 and " 7" or "+7" as 7, which a cache or proxy keyed by the query does not."""
    if isinstance(value, str) and not DECIMAL_RE.fullmatch(value):
        raise PydanticCustomError("int_parsing", "Input should be a whole number in decimal digits")
    return value


QueryInt = Annotated[int, BeforeValidator(_decimal_digits)]  # every integer a query string carries
# A keyset cursor: the next_cursor of the previous page, beside the offsets existing clients send.
Cursor = Annotated[str | None, Field(min_length=1, max_length=400, pattern=r"^[A-Za-z0-9_-]+$",
                                     description="next_cursor of the previous page (opaque; not with offset)")]


class JobListQuery(Model):
    state: JobState | None = None
    limit: QueryInt = Field(50, ge=1, le=500)
    offset: QueryInt = Field(0, ge=0, le=2**53)
    cursor: Cursor = None

    @field_validator("state", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class ReceiptListQuery(Model):
    limit: QueryInt = Field(100, ge=1, le=500)
    offset: QueryInt = Field(0, ge=0, le=2**53)
    cursor: Cursor = None


class ReceiptVerify(Model):
    receipt: dict[str, Any]


class CheckpointListQuery(ReceiptListQuery):
    """A page of the receipt log's checkpoints, newest first."""


# Leaf counts and indexes fit a signed 64-bit column. (The bounds go before the digits check: after
# it, pydantic would write them into the JSON schema as "ge"/"le", which JSON Schema does not know.)
LogIndex = Annotated[int, Field(ge=0, le=2**62), BeforeValidator(_decimal_digits)]


class InclusionQuery(Model):
    receipt_id: Text = Field(min_length=1, max_length=128)
    tree_size: LogIndex | None = Field(None, description="default: the latest checkpoint's")


class ConsistencyQuery(Model):
    first: LogIndex = Field(description="the smaller tree size (a checkpoint the client holds)")
    second: LogIndex = Field(description="the larger tree size")


class EntriesQuery(Model):
    start: LogIndex = Field(description="index of the first leaf")
    end: LogIndex | None = Field(None, description="index of the last leaf (inclusive, as RFC 9162's "
                                                  "get-entries); fewer may come back")


OFFER_STATUSES = ("open", "reserved", "closed")
# The three statuses in any case, as a JSON-schema pattern (no inline flags in ECMA regexes).
OFFER_STATUS_PATTERN = "^(" + "|".join("".join(f"[{c.upper()}{c}]" for c in s) for s in OFFER_STATUSES) + ")$"


class OfferStatusBody(Model):
    status: str = Field("open", description="open, reserved or closed (any case)",
                        json_schema_extra={"pattern": OFFER_STATUS_PATTERN})

    @field_validator("status")
    @classmethod
    def _known(cls, value: str) -> str:
        if value.lower() not in OFFER_STATUSES:
            raise ValueError(f"must be one of {', '.join(OFFER_STATUSES)}")
        return value.lower()


class OfferCreate(OfferStatusBody):
    provider: Text = Field(min_length=1, max_length=256)
    capacity: int = Field(gt=0, le=1_000_000_000)
    price: float = Field(gt=0, le=MAX_AMOUNT)
    sla: Text = Field("", max_length=256)


class BidCreate(Model):
    provider: Text = Field(min_length=1, max_length=256)
    capacity: int = Field(gt=0, le=1_000_000_000)
    price: float = Field(gt=0, le=MAX_AMOUNT)
    notes: Text | None = Field(None, max_length=1024)


class OfferQuery(Model):
    # Documented as the three values in any case; anything else is the spec's 400, not a 422.
    status: str | None = Field(None, json_schema_extra={"pattern": OFFER_STATUS_PATTERN})
    limit: QueryInt = Field(100, ge=1, le=500)
    offset: QueryInt = Field(0, ge=0, le=2**53)
    cursor: Cursor = None  # from the previous page's Link rel="next" (the list is a bare array)


class BlockQuery(Model):
    limit: QueryInt = Field(20, ge=1, le=200)
    offset: QueryInt = Field(0, ge=0, le=2**53)
    cursor: Cursor = None


class ExplorerQuery(Model):
    limit: QueryInt = Field(50, ge=1, le=500)
    offset: QueryInt = Field(0, ge=0, le=2**53)
    cursor: Cursor = None


class MinerListQuery(Model):
    limit: QueryInt = Field(100, ge=1, le=500)
    offset: QueryInt = Field(0, ge=0, le=2**53)
    cursor: Cursor = None


class ExplorerReceiptQuery(ExplorerQuery):
    job_id: Text | None = Field(None, max_length=128)


# What a registration's capabilities declare that the coordinator reads as a number: (where, highest).
CAPABILITY_NUMBERS = ((("price",), MAX_AMOUNT), (("gpu", "memory_gb"), MAX_GPU_MEMORY_GB),
                      (("gpus", "*", "memory_mb"), MAX_GPU_MEMORY_GB * 1024))
CAPABILITY_TEXTS = ("region", "sla")  # stored as text columns of their own


def capabilities_schema() -> dict[str, Any]:
    """The JSON schema of what capability_errors checks. Range keywords bind numbers only and
    `pattern` strings only, so values of other types stay free, as they are."""
    schema: dict[str, Any] = {"type": "object", "properties": {k: {"pattern": NO_NUL_PATTERN} for k in CAPABILITY_TEXTS}}
    for path, highest in CAPABILITY_NUMBERS:
        node = schema
        for step in path:
            node = node.setdefault("items", {}) if step == "*" else node.setdefault("properties", {}).setdefault(step, {})
        node.update(minimum=0, maximum=highest)
    return schema


class MinerRegister(Model):
    capabilities: dict[str, Any] = Field(json_schema_extra=capabilities_schema())
    concurrency: int = Field(1, ge=1, le=4096)
    region: Text | None = Field(None, max_length=128)


def _found_at(value: Any, path: tuple[str, ...], loc: tuple[str | int, ...] = ()) -> Iterable[tuple[tuple[str | int, ...], Any]]:
    """(loc, value) of what stands at `path` in nested objects; "*" steps into every list item."""
    if not path:
        yield loc, value
    elif path[0] == "*" and isinstance(value, list):
        for i, item in enumerate(value):
            yield from _found_at(item, path[1:], (*loc, i))
    elif isinstance(value, dict) and path[0] in value:
        yield from _found_at(value[path[0]], path[1:], (*loc, path[0]))


def capability_errors(caps: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Validation errors (as Invalid lists them) for what is out of range in declared capabilities:
    a number the coordinator reads below 0 or above its bound, U+0000 in a string stored on its own.
    Values of other types are left alone (the layout is free-form), as are the keys it does not read."""
    errors = []
    for path, highest in CAPABILITY_NUMBERS:
        for loc, value in _found_at(caps, path):
            if isinstance(value, BigInt) or (_is_number(value) and not 0 <= value <= highest):
                errors.append({"type": "value_error", "loc": ["body", "capabilities", *loc],
                               "msg": f"must be a number from 0 to {highest:g}", "input": _echo(value)})
    for key in CAPABILITY_TEXTS:
        if isinstance(caps.get(key), str) and "\x00" in caps[key]:
            errors.append({"type": "value_error", "loc": ["body", "capabilities", key],
                           "msg": "must not contain U+0000", "input": caps[key]})
    return errors


class MinerHeartbeat(Model):
    inflight: int | None = Field(None, ge=0, le=1_000_000)
    status: Text = Field("ONLINE", min_length=1, max_length=32)
    metadata: dict[str, Any] | None = None


class MinerPoll(Model):
    max_wait_seconds: float = Field(0, ge=0)


class MinerResult(Model):
    result: dict[str, Any]
    metrics: dict[str, Any] = Field(default_factory=dict)


class MinerFail(Model):
    error_code: Text = Field(max_length=256)
    error_message: Text = Field(max_length=8192)
    metrics: dict[str, Any] = Field(default_factory=dict)
    retryable: bool = False


class Out(BaseModel):
    """Response models: they document the wire shapes in /openapi.json."""


response_json = json_text(ensure_ascii=False, allow_nan=False)


def json_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(response_json(data).encode(), status, headers, "application/json")


def stored_json_response(fields: Mapping[str, Any], stored: Mapping[str, str | None]) -> Response:
    """spliced_json of `fields` and `stored` (JSON texts as stored) as a 200 response."""
    return Response(spliced_json(fields, stored, response_json).encode(), 200, None, "application/json")


class Detail(Out):
    detail: str


class ValidationItem(Out):
    type: str
    loc: list[str | int]
    msg: str
    input: Any = None


class ValidationDetail(Out):
    detail: list[ValidationItem]


class ValidationOrMessage(Out):
    """A 422 that is either validation errors or, for a reused Idempotency-Key, a message (SPEC section 5)."""

    detail: list[ValidationItem] | str


def make_cursor(*key: str | int) -> str:
    """An opaque keyset cursor: base64url of the JSON array of the sort key of a page's last row."""
    return b64url(compact_json(list(key)).encode())


def read_cursor(text: str, *types: type) -> list[Any]:
    """The sort key a cursor holds, one value of each of `types` exactly; raises Invalid (422 naming
    the cursor) for anything else. Whether the key is a position in the list is the caller's to check."""
    try:
        if len(text) > 400 or not re.fullmatch(r"[A-Za-z0-9_-]+", text):
            raise ValueError("not base64url")
        key = json.loads(b64url_decode(text))
        if not isinstance(key, list) or [type(v) for v in key] != list(types):
            raise ValueError("not a key of this list")
        if any(not -2**63 <= v < 2**63 if isinstance(v, int) else "\x00" in v or not is_utf8_text(v) for v in key):
            raise ValueError("not a value a column holds")  # a lone surrogate would fail as an SQL parameter
    except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
        raise Invalid.one(["query", "cursor"], "not a cursor this server issued for this list", text) from None
    return key


def read_list_cursor(query: Any, tag: str, *types: type) -> list[Any] | None:
    """The sort key the `cursor` of a list query holds (None without one): a cursor this server issued
    for the list named `tag`, with no negative number in it. Raises Invalid (422 naming the cursor, or
    the offset when both are given) otherwise."""
    if query.cursor is None:
        return None
    if "offset" in query.model_fields_set:  # offset=0 too: README says the two together are a 422
        raise Invalid.one(["query", "offset"], "page by offset or by cursor, not both", query.offset)
    key = read_cursor(query.cursor, str, *types)
    if key[0] != tag or any(isinstance(v, int) and v < 0 for v in key[1:]):
        raise Invalid.one(["query", "cursor"], "not a cursor this server issued for this list", query.cursor)
    return key[1:]


def keyset_page(rows: Sequence[Any], query: Any, view: Callable[[Any], Any], tag: str,
                key: Callable[[Any], Sequence[str | int]]) -> dict[str, Any]:
    """{"items", "next_offset", "next_cursor"} from up to limit + 1 rows of a list read at the query's
    offset or after its cursor. next_offset = offset + limit when the page is full and it was read by
    offset (as always), else null; next_cursor holds the last item's sort key when more rows follow."""
    return {"items": [view(r) for r in rows[:query.limit]], **next_page(rows, query, tag, key)}


def next_page(rows: Sequence[Any], query: Any, tag: str, key: Callable[[Any], Sequence[str | int]]) -> dict[str, Any]:
    """keyset_page's {"next_offset", "next_cursor"} for up to limit + 1 rows."""
    limit = query.limit
    full, more = len(rows) >= limit, len(rows) > limit
    return {"next_offset": query.offset + limit if full and query.cursor is None else None,
            "next_cursor": make_cursor(tag, *key(rows[limit - 1])) if more else None}


# --- Receipts ---

class Signature(Out):
    alg: str
    key_id: str
    sig: str


class Receipt(Out):
    version: str
    receipt_id: str
    job_id: str
    provider: str
    client: str
    coordinator_id: str
    status: str
    units: float
    unit_type: str
    unit_price: float | None = None
    price: float | None = None
    started_at: int
    completed_at: int
    metadata: dict[str, Any]
    signature: Signature
    attestations: list[Signature] | None = None


class ReceiptPage(Out):
    items: list[Receipt]
    next_offset: int | None
    next_cursor: str | None


def receipt_page_response(job_id: str, rows: Sequence[sqlite3.Row], query: Any) -> Response:
    """A page of a job's receipts as signed from up to limit + 1 rows (seq, body as stored), read at the
    query's offset or after its cursor (which names the job and the last receipt's seq), as keyset_page pages."""
    texts = [unpack_receipt(r["body"], r["receipt_id"], job_id) for r in rows[:query.limit]]
    return stored_json_response(next_page(rows, query, job_id, lambda r: (r["seq"],)), {"items": f"[{','.join(texts)}]"})


class KeyInfo(Out):
    key_id: str
    alg: str
    role: str
    status: str
    origin: str | None = Field(None, description="role log: the origin of the checkpoints it signs")
    verifier_key: str | None = Field(None, description="role log: its C2SP signed-note verifier key")


def key_info_view(row: sqlite3.Row, active: set[tuple[str, str]]) -> dict[str, Any]:
    """A signing_keys row; `active` holds the (key_id, role) pairs this server signs with now."""
    return {"key_id": row["key_id"], "alg": "Ed25519", "role": row["role"],
            "status": "active" if (row["key_id"], row["role"]) in active else "retired"}


def log_key_info_view(row: sqlite3.Row, active: str | None) -> dict[str, Any]:
    """A log_keys row; `active` is the key_id that signs checkpoints now."""
    verifier = NoteVerifier(row["origin"], b64url_decode(row["key_id"]))
    return {"key_id": row["key_id"], "alg": "Ed25519", "role": "log",
            "status": "active" if row["key_id"] == active else "retired", "origin": row["origin"],
            "verifier_key": verifier.encode()}


class KeyList(Out):
    items: list[KeyInfo]


class VerifyResult(Out):
    """What verify_receipt returns (Domain logic), as it is."""

    valid: bool
    signature_valid: bool
    attestations_valid: list[bool]
    known_key: bool
    reason: str | None


# --- Jobs ---

def effective_state(row: sqlite3.Row | Mapping[str, Any], now: int) -> str:
    """A job's state as reads show it: past its deadline, an active job is EXPIRED even before the sweep."""
    return JobState.EXPIRED.value if row["state"] in ACTIVE_STATES and row["expires_at"] <= now else row["state"]


class JobView(Out):
    job_id: str
    state: JobState
    assigned_miner_id: str | None
    requested_at: str
    expires_at: str
    error: str | None
    attempts: int
    constraints: dict[str, Any]
    assigned_at: str | None
    finished_at: str | None


def job_view(row: sqlite3.Row | Mapping[str, Any], now: int) -> dict[str, Any]:
    """The public job view."""
    state = effective_state(row, now)
    error = "job expired" if state != row["state"] else row["error"]
    return {"job_id": row["job_id"], "state": state, "assigned_miner_id": row["assigned_miner_id"],
            "requested_at": iso(row["requested_at"]), "expires_at": iso(row["expires_at"]), "error": error,
            "attempts": row["attempts"],
            "constraints": {**dict.fromkeys(CONSTRAINT_KEYS), **load_json(row["constraints"])},  # stored_constraints
            "assigned_at": iso(row["assigned_at"]), "finished_at": iso(row["finished_at"])}


class JobPage(Out):
    items: list[JobView]
    next_offset: int | None
    next_cursor: str | None


class JobResultView(Out):
    result: dict[str, Any] | None
    receipt: Receipt | None


def job_result_response(result: str | None, receipt: str | None) -> Response:
    """A finished job's result and latest receipt, both as stored (JSON text or None)."""
    return stored_json_response({}, {"result": result, "receipt": receipt})


class AdminJob(JobView):
    client_id: str


def admin_job_view(row: sqlite3.Row, now: int) -> dict[str, Any]:
    return {**job_view(row, now), "client_id": row["client_id"]}


class AdminJobPage(Out):
    items: list[AdminJob]
    next_offset: int | None
    next_cursor: str | None


# --- Miners ---

class StatusOk(Out):
    status: str


STATUS_OK = {"status": "ok"}
STATUS_OK_BODY = response_json(STATUS_OK).encode()  # rendered once: every heartbeat answers it


def ok_response() -> Response:
    return Response(STATUS_OK_BODY, 200, None, "application/json")


class Registered(Out):
    status: str
    session_token: str


def registered_view(session_token: str) -> dict[str, Any]:
    return {"status": "ok", "session_token": session_token}


class Assignment(Out):
    job_id: str
    payload: dict[str, Any]
    constraints: dict[str, Any]
    attempts: int
    expires_at: str


def assignment_response(job: sqlite3.Row) -> Response:
    """A claimed job for its miner, payload and constraints as stored."""
    return stored_json_response({"job_id": job["job_id"], "attempts": job["attempts"], "expires_at": iso(job["expires_at"])},
                                {"payload": job["payload"], "constraints": shown_constraints(job["constraints"])})


class ResultAccepted(Out):
    status: str
    receipt: Receipt | None


def result_accepted_response(receipt: str | None) -> Response:
    """A completion's answer: its receipt as stored (JSON text), or null without a signing key."""
    return stored_json_response(STATUS_OK, {"receipt": receipt})


class AdminMiner(Out):
    miner_id: str
    status: str
    online: bool
    inflight: int
    reported_inflight: int | None
    concurrency: int
    region: str | None
    capabilities: dict[str, Any]
    last_heartbeat: str | None
    last_seen: str | None
    jobs_completed: int
    jobs_failed: int
    average_job_duration_ms: float
    last_receipt_id: str | None


def miner_view(row: sqlite3.Row, inflight: int) -> dict[str, Any]:
    """A miners row and its RUNNING jobs; online is the sweep's judgement (silent past the timeout: not)."""
    completed = row["jobs_completed"]
    return {"miner_id": row["miner_id"], "status": row["status"], "online": bool(row["online"]),
            "inflight": inflight, "reported_inflight": row["reported_inflight"],
            "concurrency": row["concurrency"], "region": row["region"],
            "capabilities": load_json(row["capabilities"]),
            "last_heartbeat": iso(row["last_heartbeat"]), "last_seen": iso(row["last_seen"]),
            "jobs_completed": completed, "jobs_failed": row["jobs_failed"],
            "average_job_duration_ms": row["busy_ms_total"] / completed if completed else 0.0,
            "last_receipt_id": row["last_receipt_id"]}


class AdminMinerList(Out):
    items: list[AdminMiner]
    next_offset: int | None
    next_cursor: str | None


# --- Health and totals ---

class Health(Out):
    status: str
    env: str
    db: str
    version: str


def health_view(settings: Settings, db_ok: bool) -> dict[str, Any]:
    return {"status": "ok" if db_ok else "degraded", "env": settings.app_env, "db": "ok" if db_ok else "error",
            "version": __version__}


class AdminStats(Out):
    total_jobs: int
    active_jobs: int
    online_miners: int
    avg_miner_job_duration_ms: float
    jobs_by_state: dict[str, int]
    receipts_total: int


def read_admin_stats(conn: sqlite3.Connection) -> dict[str, Any]:
    """From the kept totals only: the same cost with any number of jobs and miners."""
    counts = get_job_counts(conn)
    fleet = get_fleet_totals(conn)
    busy_ms, completed = get_completed_busy_ms(conn), counts.get(JobState.COMPLETED, 0)
    return {"total_jobs": sum(counts.values()),
            "active_jobs": counts.get(JobState.QUEUED, 0) + counts.get(JobState.RUNNING, 0),
            "online_miners": fleet["online_miners"],
            "avg_miner_job_duration_ms": busy_ms / completed if completed else 0.0,
            "jobs_by_state": {s.value: counts.get(s.value, 0) for s in JobState},
            "receipts_total": get_counter(conn, "receipts")}


# --- Marketplace ---

class Offer(Out):
    id: str
    provider: str
    capacity: int
    price: float
    sla: str
    status: str
    created_at: str
    source: str


def offer_view(row: sqlite3.Row) -> dict[str, Any]:
    return {"id": row["id"], "provider": row["provider"], "capacity": row["capacity"], "price": row["price"],
            "sla": row["sla"], "status": row["status"], "created_at": iso(row["created_at"]), "source": row["kind"]}


class OfferList(RootModel[list[Offer]]):
    """The offers list: a bare JSON array, as the marketplace dashboard reads it."""


class MarketStats(Out):
    totalOffers: int
    openCapacity: int
    averagePrice: float
    activeBids: int


def market_stats_view(fleet: sqlite3.Row, active_bids: int) -> dict[str, Any]:
    """From the fleet_totals row and the active-bid counter (open prices summed as units and millionths)."""
    open_offers = fleet["open_offers"]
    micro = fleet["open_price_units"] * 1_000_000 + fleet["open_price_micro"]
    return {"totalOffers": fleet["offers"], "openCapacity": fleet["open_capacity"],
            "averagePrice": round(micro / 1_000_000 / open_offers, 4) if open_offers else 0.0,
            "activeBids": active_bids}


class BidAccepted(Out):
    id: str
    status: str
    offer_id: str | None


def bid_accepted_view(row: sqlite3.Row) -> dict[str, Any]:
    return {"id": row["bid_id"], "status": row["status"], "offer_id": row["offer_id"]}


class Bid(Out):
    id: str
    provider: str
    capacity: int
    price: float
    notes: str | None
    status: str
    offer_id: str | None
    created_at: str


def bid_view(row: sqlite3.Row) -> dict[str, Any]:
    return {"id": row["bid_id"], "provider": row["provider"], "capacity": row["capacity"], "price": row["price"],
            "notes": row["notes"], "status": row["status"], "offer_id": row["offer_id"],
            "created_at": iso(row["created_at"])}


# --- Explorer ---

def micro_str(micro: int) -> str:
    """Millionths as a decimal string with 6 places, exactly."""
    micro = int(micro)  # SQLite turns an overflowing integer sum into a REAL
    sign = "-" if micro < 0 else ""
    return f"{sign}{abs(micro) // 1_000_000}.{abs(micro) % 1_000_000:06d}"


EXPLORER_STATUS = {"QUEUED": "Queued", "RUNNING": "Running", "COMPLETED": "Succeeded", "FAILED": "Failed",
                   "CANCELED": "Canceled", "EXPIRED": "Expired"}
HEIGHT_BASE = 100000


class Block(Out):
    height: int
    hash: str
    timestamp: str
    txCount: int
    proposer: str


def block_view(row: sqlite3.Row) -> dict[str, Any]:
    """One block per job (a list_job_page row)."""
    return {"height": HEIGHT_BASE + row["seq"], "hash": row["job_id"], "timestamp": iso(row["requested_at"]),
            "txCount": 1, "proposer": row["assigned_miner_id"] or "unassigned"}


class BlockPage(Out):
    items: list[Block]
    next_offset: int | None
    next_cursor: str | None


class Transaction(Out):
    hash: str
    block: int
    from_: str = Field(alias="from")
    to: str
    value: str
    status: str
    timestamp: str


def transaction_view(row: sqlite3.Row, price: float | None, now: int) -> dict[str, Any]:
    """One transaction per job (a list_job_page row); value is the receipt price, else payload.value, else "0"."""
    return {"hash": row["job_id"], "block": HEIGHT_BASE + row["seq"], "from": row["client_id"],
            "to": row["assigned_miner_id"] or "unassigned", "value": display_value(price) or row["value"] or "0",
            "status": EXPLORER_STATUS[effective_state(row, now)], "timestamp": iso(row["requested_at"])}


class TransactionPage(Out):
    items: list[Transaction]
    next_offset: int | None
    next_cursor: str | None


class Address(Out):
    address: str
    balance: str
    txCount: int
    lastActive: str
    recentTransactions: list[str]


def address_view(row: sqlite3.Row, recent: list[str]) -> dict[str, Any]:
    """An addresses row and the ids of its newest jobs."""
    return {"address": row["address"], "balance": micro_str(row["balance_micro"]), "txCount": row["tx_count"],
            "lastActive": iso(row["last_active"]), "recentTransactions": recent}


class AddressPage(Out):
    items: list[Address]
    next_offset: int | None
    next_cursor: str | None


class ExplorerReceipt(Out):
    jobId: str
    receiptId: str
    miner: str
    coordinator: str
    issuedAt: str
    status: str
    payload: Receipt
    logIndex: int | None = Field(description="the receipt's leaf index in the receipt log")


def explorer_receipt_view(row: sqlite3.Row) -> dict[str, Any]:
    """A list_receipts row (ids, issued_at, body as stored); logIndex is filled in by read_explorer_receipts."""
    receipt = load_json(unpack_receipt(row["body"], row["receipt_id"], row["job_id"]))
    return {"jobId": receipt["job_id"], "receiptId": receipt["receipt_id"], "miner": receipt["provider"],
            "coordinator": receipt["coordinator_id"], "issuedAt": iso(row["issued_at"]),
            "status": "Attested" if "attestations" in receipt else "Signed", "payload": receipt, "logIndex": None}


def read_explorer_receipts(conn: sqlite3.Connection, job_id: str | None, page: int, offset: int,
                           before: int | None = None) -> list[tuple[int, dict[str, Any] | None]]:
    """A page of explorer receipt items (list_receipts' rows, `before` its keyset cursor), each with its
    leaf index, as (seq, item); then (seq, None) for the next row when there is one (read, not unpacked:
    it only says that more follow)."""
    rows = list_receipts(conn, job_id, page + 1, offset, before)
    items = [explorer_receipt_view(r) for r in rows[:page]]
    indexes = get_log_indexes(conn, [item["receiptId"] for item in items])
    for item in items:
        item["logIndex"] = indexes.get(item["receiptId"])
    return [(row["seq"], item) for row, item in itertools.zip_longest(rows, items)]


class ExplorerReceiptPage(Out):
    jobId: str
    items: list[ExplorerReceipt]
    next_offset: int | None
    next_cursor: str | None


# --- The receipt log ---

LOG_ENTRIES_MAX = 1000  # leaves per entries page (a monitor replays a million in a thousand requests),
LOG_ENTRIES_MAX_BYTES = 4 << 20  # and about this many bytes of receipts (fewer leaves when they are big)


class LogCheckpoint(Out):
    origin: str
    tree_size: int
    root_hash: str = Field(description="base64, as in the note")
    timestamp: str
    note: str = Field(description="the signed note (C2SP tlog-checkpoint), exactly as signed")


def checkpoint_view(row: sqlite3.Row) -> dict[str, Any]:
    """A log_checkpoints row."""
    return {"origin": row["note"].split("\n", 1)[0], "tree_size": row["tree_size"], "root_hash": b64(row["root_hash"]),
            "timestamp": iso(row["created_at"]), "note": row["note"]}


class LogCheckpointPage(Out):
    items: list[LogCheckpoint]
    next_offset: int | None
    next_cursor: str | None


def _published_size(conn: sqlite3.Connection) -> tuple[sqlite3.Row | None, int]:
    """The latest checkpoint and its tree size (0 without one)."""
    latest = get_latest_checkpoint(conn)
    return latest, latest["tree_size"] if latest is not None else 0


def _proof(conn: sqlite3.Connection, ranges: Sequence[tuple[int, int]]) -> list[str]:
    """The MTHs of `ranges` (base64), from one read of the nodes they are made of. Raises LogDamaged
    when the log lacks one (rows deleted behind its back: never by the coordinator)."""
    return [b64(h) for h in proof_hashes(ranges, get_stored_log_nodes(conn, proof_nodes(ranges)))]


class InclusionProof(Out):
    receipt_id: str
    leaf_index: int
    tree_size: int
    leaf_hash: str = Field(description="base64 of SHA-256(0x00 || the receipt's bytes as served)")
    audit_path: list[str] = Field(description="base64 hashes, nearest the leaf first (RFC 9162 2.1.3)")
    checkpoint: LogCheckpoint | None = Field(description="the checkpoint of tree_size, when one is kept")


def read_inclusion_proof(conn: sqlite3.Connection, receipt_id: str, tree_size: int | None) -> dict[str, Any]:
    """A receipt's leaf index and audit path in the tree of `tree_size` leaves (default: the latest
    checkpoint's), from O(log n) rows. Raises NotFound (no such leaf, or no checkpoint of `tree_size` or
    more), NotReady (not under a checkpoint yet; the caller adds when one may come) or Invalid (the leaf
    is not in a tree of `tree_size`)."""
    leaf = get_log_leaf(conn, receipt_id)
    if leaf is None:
        raise NotFound("receipt not in the log")
    latest, published = _published_size(conn)
    index, size = leaf["leaf_index"], published if tree_size is None else tree_size
    if tree_size is not None and index >= tree_size:
        raise Invalid.one(["query", "tree_size"], f"the receipt is leaf {index}: not in a tree of {tree_size}",
                          tree_size)
    if size > published:
        raise NotFound(f"no checkpoint of {size} leaves or more")
    if index >= size:
        raise NotReady("receipt not yet under a checkpoint")
    checkpoint = latest if size == published else get_checkpoint(conn, size)
    return {"receipt_id": receipt_id, "leaf_index": index, "tree_size": size, "leaf_hash": b64(leaf["leaf_hash"]),
            "audit_path": _proof(conn, inclusion_ranges(index, size)),
            "checkpoint": None if checkpoint is None else checkpoint_view(checkpoint)}


class ConsistencyProof(Out):
    first: int
    second: int
    consistency_path: list[str] = Field(description="base64 hashes (RFC 9162 2.1.4); empty when first is 0 or second")


def read_consistency_proof(conn: sqlite3.Connection, first: int, second: int) -> dict[str, Any]:
    """The consistency proof between two tree sizes, from O(log n) rows. Raises Invalid (first > second)
    or NotFound (second is past the latest checkpoint)."""
    if first > second:
        raise Invalid.one(["query", "first"], "must not be larger than second", first)
    if second > _published_size(conn)[1]:
        raise NotFound(f"no checkpoint of {second} leaves or more")
    return {"first": first, "second": second, "consistency_path": _proof(conn, consistency_ranges(first, second))}


class LogEntry(Out):
    leaf_index: int
    leaf_hash: str = Field(description="base64 of SHA-256(0x00 || leaf)")
    leaf: str | None = Field(description="base64 of the receipt's bytes as stored and served; null once pruned")


class LogEntries(Out):
    items: list[LogEntry]


def read_log_entries(conn: sqlite3.Connection, start: int, end: int | None) -> dict[str, Any]:
    """Leaves start..end (inclusive), at most LOG_ENTRIES_MAX and about LOG_ENTRIES_MAX_BYTES of them; none
    past the last. Raises Invalid when end < start."""
    if end is not None and end < start:
        raise Invalid.one(["query", "end"], "must not be smaller than start", end)
    last = start + LOG_ENTRIES_MAX - 1 if end is None else min(end, start + LOG_ENTRIES_MAX - 1)
    items, size = [], 0
    rows = list_log_entries(conn, start, last)
    try:
        for index, digest, stored, receipt_id, job_id in rows:
            leaf = None if stored is None else unpack_receipt(stored, receipt_id, job_id).encode()
            items.append({"leaf_index": index, "leaf_hash": b64(digest), "leaf": None if leaf is None else b64(leaf)})
            size += len(leaf or b"")
            if size >= LOG_ENTRIES_MAX_BYTES:
                break
    finally:
        rows.close()
    return {"items": items}


# === Request parsing ===

SURROGATE_ESCAPE_RE = re.compile(rb"\\u[dD][89abAB]|\\u[dD][c-fC-F]")
def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid JSON number here")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number out of range: {text[:40]}")
    return value


REQUEST_JSON = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)
REQUEST_JSON_BIG = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float, parse_int=int_or_big)


def decode_json(raw: bytes) -> Any:
    """Parse a request body; raises Invalid for malformed JSON, NaN/Infinity and lone surrogates."""
    try:  # as json.loads does for bytes, with one decoder made once
        text = raw.decode(json.detect_encoding(raw))  # strict: a surrogate encoded in UTF-8 is not UTF-8
        try:
            value = REQUEST_JSON.decode(text)
        except json.JSONDecodeError:
            raise
        except ValueError:  # maybe an integer past int()'s digit limit: again, keeping such as BigInt (rare)
            value = REQUEST_JSON_BIG.decode(text)
        if SURROGATE_ESCAPE_RE.search(raw):  # an escaped surrogate: make sure they all pair up
            response_json(value).encode("utf-8")
        if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and nested_deeper_than(value, MAX_JSON_DEPTH):
            raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    except (ValueError, RecursionError) as exc:
        msg = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc) or "JSON nested too deeply"
        pos = exc.pos if isinstance(exc, json.JSONDecodeError) else 0
        raise Invalid.one(["body", pos], f"JSON decode error: {msg}"[:200], None, "json_invalid") from None
    return value


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past `limit` bytes whether or not Content-Length says so."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge()
    chunks, size, more = [], 0, True
    while more:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise BadRequest("client disconnected before the body was complete")
        chunk, more = message.get("body", b""), message.get("more_body", False)
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge()
        chunks.append(chunk)
    return b"".join(chunks)


def validate(model: type[Model], data: Any, where: str) -> Any:
    """Validate `data` with `model`; raises Invalid with `loc` starting with `where`."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise Invalid([{"type": e["type"], "loc": [where, *e["loc"]], "msg": e["msg"], "input": _echo(e.get("input"))}
                       for e in exc.errors(include_url=False, include_context=False)]) from None


def authenticate(request: Request, settings: Settings, role: str) -> Caller:
    """The caller behind X-Api-Key or Authorization: Bearer; raises Unauthorized."""
    key = request.headers.get("x-api-key")
    if key is None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        key = token.strip() if scheme.lower() == "bearer" else None
    identity = settings.api_keys.get(role, {}).get(key_digest(key)) if key else None
    if identity is None:
        raise Unauthorized()
    return Caller(role, identity)


def client_address(request: Request) -> str:
    client = request.scope.get("client")
    return f"address:{client[0] if client else '-'}"


def route_path(scope: Mapping[str, Any]) -> str:
    """The request's path below the prefix it is served under: servers and mounts put the prefix in
    root_path and (ASGI 3) at the front of path too."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


CALLER = "aitbc.caller"  # the scope key under which a request's authenticated identity is logged


@dataclasses.dataclass
class Call:
    """One parsed request as handlers see it."""

    request: Request
    coord: Coordinator
    caller: Caller | None
    body: Any
    query: Any

    def path(self, name: str) -> str:
        return str(self.request.path_params[name])


Handler = Callable[[Call], Awaitable[Response]]
Runner = Callable[[Request], Awaitable[Response]]  # what the router calls: parses, then runs a Handler


@dataclasses.dataclass(frozen=True)
class Endpoint:
    method: str
    path: str
    handler: Handler
    role: str | None
    body: type[Model] | None
    query: type[Model] | None
    responses: Mapping[int, type[BaseModel] | None]
    optional_body: bool = False
    headers: Mapping[int, tuple[str, ...]] = dataclasses.field(default_factory=dict)  # per status, RESPONSE_HEADERS


ENDPOINTS: list[Endpoint] = []


def endpoint(method: str, path: str, *, role: str | None = None, body: type[Model] | None = None,
             query: type[Model] | None = None, responses: Mapping[int, type[BaseModel] | None],
             optional_body: bool = False, headers: Mapping[int, tuple[str, ...]] | None = None
             ) -> Callable[[Handler], Handler]:
    """Register a handler with what /openapi.json and the request parser need to know: its responses'
    models and the headers they may carry (by status)."""
    def register(handler: Handler) -> Handler:
        every = {429: Detail, 503: Detail}  # rate limits and an unavailable database apply to all
        every_header = {429: ("Retry-After",), 503: ("Retry-After",)}
        ENDPOINTS.append(Endpoint(method, path, handler, role, body, query, {**every, **responses}, optional_body,
                                  {**every_header, **(headers or {})}))
        return handler
    return register


def endpoint_runner(ep: Endpoint, coord: Coordinator) -> Runner:
    """What serves `ep`: authenticate, count against the rate limit, parse and validate, call the handler."""
    async def run(request: Request) -> Response:
        caller = None
        if ep.role is not None:
            try:
                caller = authenticate(request, coord.settings, ep.role)
            except Unauthorized:
                coord.limiter.hit(client_address(request))  # guessing keys is throttled per address
                raise
            request.scope[CALLER] = caller.identity
            if ep.role == "miner":
                coord.heard_from(caller.identity)
        coord.limiter.hit(f"{caller.role}:{caller.identity}" if caller else client_address(request))
        body = None
        if ep.body is not None:
            raw = await read_body(request, coord.settings.max_body_bytes)
            data = {} if ep.optional_body and not raw.strip() else decode_json(raw)
            body = validate(ep.body, data, "body")
        query = validate(ep.query, dict(request.query_params), "query") if ep.query else None
        return await ep.handler(Call(request, coord, caller, body, query))

    return run


# === Handlers ===

ERRORS = {401: Detail, 404: Detail, 409: Detail, 410: Detail, 413: Detail, 422: ValidationDetail, 425: Detail,
          429: Detail, 503: Detail}


def _errors(*codes: int) -> dict[int, type[BaseModel]]:
    return {c: ERRORS[c] for c in codes}


@endpoint("GET", "/v1/health", responses={200: Health, 503: Health})
async def health(call: Call) -> Response:
    """Liveness and database readability."""
    try:
        await call.coord.db.read(get_job_counts)
        ok = True
    except (*DB_ERRORS, Unavailable):
        ok = False
    return json_response(health_view(call.coord.settings, ok), 200 if ok else 503)


async def _client_job(call: Call, pruned_if_receipts_kept: bool = False) -> sqlite3.Row:
    """The caller's job's row; raises NotFound, or with `pruned_if_receipts_kept`, Gone when retention
    deleted the summary but kept the caller's receipts of it (its result went before the summary)."""
    row = await call.coord.db.read(get_job, call.path("job_id"))
    if row is None or row["client_id"] != call.caller.identity:  # type: ignore[union-attr]
        if row is None and pruned_if_receipts_kept and (
                await call.coord.db.read(get_job_owner, call.path("job_id")) == call.caller.identity):  # type: ignore[union-attr]
            raise Gone("result pruned")
        raise NotFound("job not found")
    return row


async def _client_receipts_job(call: Call) -> str:
    """The id of the caller's job whose receipts are asked for: a receipt is the proof the client keeps,
    so its job's receipts read by job id while they are kept, whether or not the summary still is."""
    job_id = call.path("job_id")
    if await call.coord.db.read(get_job_owner, job_id) != call.caller.identity:  # type: ignore[union-attr]
        raise NotFound("job not found")
    return job_id


@endpoint("POST", "/v1/jobs", role="client", body=JobSubmit,
          responses={201: JobView, **_errors(401, 413), 422: ValidationOrMessage})
async def submit_job(call: Call) -> Response:
    """Queue a job (Idempotency-Key makes a retry return the original)."""
    coord, body, settings = call.coord, call.body, call.coord.settings
    ttl = settings.job_ttl_seconds if body.ttl_seconds is None else max(1, body.ttl_seconds)
    if ttl > settings.job_ttl_max_seconds:
        raise Invalid.one(["body", "ttl_seconds"], f"Input should be less than or equal to "
                          f"{settings.job_ttl_max_seconds}", body.ttl_seconds, "less_than_equal")
    constraints = (body.constraints or Constraints()).model_dump()
    idem = None
    if (key := call.request.headers.get("idempotency-key")) is not None:
        if not 1 <= len(key) <= 255 or "\x00" in key:
            raise Invalid.one(["header", "idempotency-key"], "must be 1-255 characters, without U+0000", key)
        idem = (key, hashlib.sha256(canonical_json(body.model_dump()).encode()).hexdigest())
    now = coord.now()
    # stored canonical (keys sorted): its receipt's digest is then the SHA-256 of the text as stored
    row = await coord.apply(tx_submit, call.caller.identity, canonical_json(body.payload),  # type: ignore[union-attr]
                            stored_constraints(constraints), shape_of(constraints), ttl * 1000, now, idem,
                            coord.idempotency_cutoff(), display_value(body.payload.get("value")), coord.hand_off)
    return json_response(job_view(row, coord.now()), 201)


async def _job_page(call: Call, client_id: str | None, view: Callable[[sqlite3.Row, int], dict[str, Any]],
                    tag: str) -> Response:
    q = call.query
    before = read_list_cursor(q, tag, int)
    rows = await call.coord.db.read(list_jobs, client_id, q.state, q.limit + 1, q.offset, before and before[0])
    now = call.coord.now()
    return json_response(keyset_page(rows, q, lambda r: view(r, now), tag, lambda r: (r["seq"],)))


@endpoint("GET", "/v1/jobs", role="client", query=JobListQuery, responses={200: JobPage, **_errors(401, 422)})
async def list_client_jobs(call: Call) -> Response:
    """The caller's jobs, newest first; by offset or by cursor."""
    return await _job_page(call, call.caller.identity, job_view, "jobs")  # type: ignore[union-attr]


@endpoint("GET", "/v1/jobs/{job_id}", role="client", responses={200: JobView, **_errors(401, 404)})
async def get_client_job(call: Call) -> Response:
    """One of the caller's jobs."""
    return json_response(job_view(await _client_job(call), call.coord.now()))


@endpoint("GET", "/v1/jobs/{job_id}/result", role="client",
          responses={200: JobResultView, **_errors(401, 404, 410, 425)})
async def get_job_result(call: Call) -> Response:
    """The result (and receipt) of a finished job; 425 until there is one, 410 once retention pruned it."""
    row = await _client_job(call, pruned_if_receipts_kept=True)
    if row["pruned_at"] is not None:
        raise Gone("result pruned")
    finished = job_view(row, call.coord.now())["state"] not in ACTIVE_STATES
    receipt = await call.coord.db.read(get_latest_receipt, row["job_id"]) if finished else None
    if not finished or (row["result"] is None and receipt is None):
        raise NotReady()
    return job_result_response(row["result"], receipt)


@endpoint("POST", "/v1/jobs/{job_id}/cancel", role="client", responses={200: JobView, **_errors(401, 404, 409)})
async def cancel_job(call: Call) -> Response:
    """Cancel a QUEUED or RUNNING job; 409 otherwise."""
    coord = call.coord
    row = await coord.apply(tx_cancel, call.caller.identity, call.path("job_id"), coord.now())  # type: ignore[union-attr]
    return json_response(job_view(row, coord.now()))


@endpoint("DELETE", "/v1/jobs/{job_id}", role="client", responses={200: JobView, **_errors(401, 404, 409)})
async def delete_job(call: Call) -> Response:
    """Same as POST /v1/jobs/{job_id}/cancel."""
    return await cancel_job(call)


LOG_INDEX_HEADER = "Receipt-Log-Index"


@endpoint("GET", "/v1/jobs/{job_id}/receipt", role="client", responses={200: Receipt, **_errors(401, 404)},
          headers={200: (LOG_INDEX_HEADER,)})
async def get_job_receipt(call: Call) -> Response:
    """The job's latest signed receipt, its leaf index in the receipt log in a Receipt-Log-Index header."""
    job_id = await _client_receipts_job(call)

    def read(conn: sqlite3.Connection) -> tuple[str | None, int | None]:
        return get_latest_receipt(conn, job_id), get_latest_receipt_log_index(conn, job_id)

    receipt, index = await call.coord.db.read(read)
    if receipt is None:
        raise NotFound("receipt not available")
    headers = {} if index is None else {LOG_INDEX_HEADER: str(index), "Access-Control-Expose-Headers": LOG_INDEX_HEADER}
    return Response(receipt.encode(), headers=headers, media_type="application/json")


@endpoint("GET", "/v1/jobs/{job_id}/receipts", role="client", query=ReceiptListQuery,
          responses={200: ReceiptPage, **_errors(401, 404, 422)})
async def list_job_receipts(call: Call) -> Response:
    """Every receipt of the job, oldest first."""
    job_id, q = await _client_receipts_job(call), call.query
    # a position in this job's list, whether or not retention has deleted the receipt it names
    after = read_list_cursor(q, job_id, int)
    rows = await call.coord.db.read(list_receipts_for_job, job_id, after[0] if after else 0, q.limit + 1, q.offset)
    return receipt_page_response(job_id, rows, q)


@endpoint("GET", "/v1/receipts/keys", responses={200: KeyList})
async def receipt_keys(call: Call) -> Response:
    """Every public key this coordinator has signed receipts or receipt-log checkpoints with, current and retired."""
    coord = call.coord

    def read(conn: sqlite3.Connection) -> tuple[list[sqlite3.Row], list[sqlite3.Row]]:
        return list_signing_keys(conn), list_log_keys(conn)

    rows, log_rows = await coord.db.read(read)
    active = set(coord.signer.key_ids()) if coord.signer else set()
    active_log = key_id_of(coord.notary.key) if coord.notary else None
    return json_response({"items": [key_info_view(r, active) for r in rows]
                          + [log_key_info_view(r, active_log) for r in log_rows]})


@endpoint("POST", "/v1/receipts/verify", body=ReceiptVerify, responses={200: VerifyResult, **_errors(413, 422)})
async def verify_receipt_route(call: Call) -> Response:
    """Check a receipt's signatures and whether this coordinator signed it."""
    rows = await call.coord.db.read(list_signing_keys)
    keys = {role: {r["key_id"] for r in rows if r["role"] == role} for role in ("signing", "attestation")}
    return json_response(verify_receipt(call.body.receipt, keys["signing"], keys["attestation"]))


@endpoint("POST", "/v1/miners/register", role="miner", body=MinerRegister,
          responses={200: Registered, **_errors(401, 413, 422)})
async def register_miner(call: Call) -> Response:
    """Create or replace the caller's registration."""
    coord, body = call.coord, call.body
    if errors := capability_errors(body.capabilities):
        raise Invalid(errors)
    caps = normalise_capabilities(body.capabilities)
    region = body.region if body.region is not None else (caps.get("region") if isinstance(caps.get("region"), str) else None)
    token = await coord.apply(tx_register, call.caller.identity, caps, body.concurrency,  # type: ignore[union-attr]
                              region, coord.now(), coord.settings.job_max_attempts,
                              coord.db_time() if coord.peers is not None else None)
    coord.registered(call.caller.identity)  # type: ignore[union-attr]
    return json_response(registered_view(token))


@endpoint("POST", "/v1/miners/heartbeat", role="miner", body=MinerHeartbeat, optional_body=True,
          responses={200: StatusOk, **_errors(401, 404, 413, 422)})
async def miner_heartbeat(call: Call) -> Response:
    """Record liveness, reported in-flight count, status and metadata."""
    b = call.body
    await call.coord.heartbeat(call.caller.identity, b.inflight, b.status.upper(),  # type: ignore[union-attr]
                               None if b.metadata is None else compact_json(b.metadata))
    return ok_response()


@endpoint("POST", "/v1/miners/poll", role="miner", body=MinerPoll, optional_body=True,
          responses={200: Assignment, 204: None, **_errors(401, 404, 413, 422)})
async def miner_poll(call: Call) -> Response:
    """Take the oldest matching job, waiting up to max_wait_seconds for one; 204 if none."""
    job, waited = await call.coord.poll(call.caller.identity, call.body.max_wait_seconds)  # type: ignore[union-attr]
    # A poll that parked may have outlived its client; one answered at once has not (and the check
    # costs ~7% of a busy miner's throughput).
    if job is not None and waited and await call.request.is_disconnected():  # nobody would read it
        log.info("poll of %s went away; job %s back in the queue", call.caller.identity, job["job_id"])
        await call.coord.apply(tx_release, call.caller.identity, job["job_id"])  # type: ignore[union-attr]
        job = None
    if job is None:
        return Response(status_code=204)
    return assignment_response(job)


@endpoint("POST", "/v1/miners/{job_id}/result", role="miner", body=MinerResult,
          responses={200: ResultAccepted, **_errors(401, 404, 409, 413, 422)})
async def miner_result(call: Call) -> Response:
    """Complete a job the caller holds."""
    b, coord = call.body, call.coord
    job_id = call.path("job_id")
    receipt = await coord.apply(tx_result, call.caller.identity, job_id,  # type: ignore[union-attr]
                                b.result, b.metrics, coord.now(), coord.signer, coord.settings.coordinator_id,
                                coord.log_edge, coord.held_ms(job_id))
    coord.claimed_at.pop(job_id, None)  # done: only jobs in hand are remembered (and CLAIMS_TIMED at most)
    return result_accepted_response(receipt)


@endpoint("POST", "/v1/miners/{job_id}/fail", role="miner", body=MinerFail,
          responses={200: StatusOk, **_errors(401, 404, 409, 413, 422)})
async def miner_fail(call: Call) -> Response:
    """Give up a job the caller holds (re-queued if retryable and attempts remain)."""
    b, coord = call.body, call.coord
    await coord.apply(tx_fail, call.caller.identity, call.path("job_id"),  # type: ignore[union-attr]
                      f"{b.error_code}: {b.error_message}", compact_json(b.metrics), b.retryable,
                      coord.now(), coord.settings.job_max_attempts)
    return ok_response()


@endpoint("GET", "/v1/admin/stats", role="admin", responses={200: AdminStats, **_errors(401)})
async def admin_stats(call: Call) -> Response:
    """Job, miner and duration totals."""
    return json_response(await call.coord.db.read(read_admin_stats))


@endpoint("GET", "/v1/admin/jobs", role="admin", query=JobListQuery, responses={200: AdminJobPage, **_errors(401, 422)})
async def admin_jobs(call: Call) -> Response:
    """Every client's jobs, newest first; by offset or by cursor."""
    return await _job_page(call, None, admin_job_view, "admin-jobs")


@endpoint("GET", "/v1/admin/miners", role="admin", query=MinerListQuery,
          responses={200: AdminMinerList, **_errors(401, 422)})
async def admin_miners(call: Call) -> Response:
    """Registered miners in registration order, with their derived in-flight counts and history."""
    q = call.query
    after = read_list_cursor(q, "miners", int, str)

    def read(conn: sqlite3.Connection) -> list[tuple[sqlite3.Row, int]]:
        return [(r, count_running(conn, r["miner_id"])) for r in list_miners(conn, q.limit + 1, q.offset, after)]

    rows = await call.coord.db.read(read)
    return json_response(keyset_page(rows, q, lambda r: miner_view(*r), "miners",
                                     lambda r: (r[0]["created_at"], r[0]["miner_id"])))


# Marketplace (public, except creating and changing offers)

def next_link(request: Request, cursor: str) -> str:
    """An RFC 8288 Link header value naming the next page: this request's URL (as the client sent it,
    under any prefix it is served at) with `cursor` in place of its cursor and offset."""
    query = [(k, v) for k, v in request.query_params.multi_items() if k not in ("cursor", "offset")]
    path = request.scope.get("root_path", "") + route_path(request.scope)
    return f'<{path}?{urllib.parse.urlencode([*query, ("cursor", cursor)])}>; rel="next"'


@endpoint("GET", "/v1/marketplace/offers", query=OfferQuery,
          responses={200: OfferList, 400: Detail, 422: ValidationDetail}, headers={200: ("Link",)})
async def list_market_offers(call: Call) -> Response:
    """Offers newest first, as a bare JSON array; `status` filter (any case); the next page by offset,
    or by the cursor in the `Link: <...>; rel="next"` header (RFC 8288)."""
    q = call.query
    status = q.status.lower() if q.status is not None else None
    if status is not None and status not in OFFER_STATUSES:
        raise BadRequest("invalid status filter")
    before = read_list_cursor(q, "offers", int, str)
    rows = await call.coord.db.read(list_offers, status, q.limit + 1, q.offset, before)
    listed = keyset_page(rows, q, offer_view, "offers", lambda r: (r["created_at"], r["id"]))
    link = {"Link": next_link(call.request, listed["next_cursor"])} if listed["next_cursor"] else None
    return json_response(listed["items"], headers=link)


@endpoint("GET", "/v1/marketplace/stats", responses={200: MarketStats})
async def market_stats(call: Call) -> Response:
    """Offer count, open capacity, mean open price and active bids (kept totals: one row read)."""
    def read(conn: sqlite3.Connection) -> tuple[sqlite3.Row, int]:
        return get_fleet_totals(conn), get_counter(conn, "active_bids")
    return json_response(market_stats_view(*await call.coord.db.read(read)))


@endpoint("POST", "/v1/marketplace/bids", body=BidCreate, responses={202: BidAccepted, **_errors(413, 422)})
async def place_bid(call: Call) -> Response:
    """A bid, matched at once to the cheapest open offer that fits, else pending."""
    b, coord = call.body, call.coord
    row = await coord.apply(tx_place_bid, b.provider, b.capacity, b.price, b.notes, coord.now())
    return json_response(bid_accepted_view(row), 202)


@endpoint("GET", "/v1/marketplace/bids/{bid_id}", responses={200: Bid, 404: Detail})
async def get_market_bid(call: Call) -> Response:
    """One bid."""
    row = await call.coord.db.read(get_bid, call.path("bid_id"))
    if row is None:
        raise NotFound("bid not found")
    return json_response(bid_view(row))


@endpoint("POST", "/v1/marketplace/offers", role="admin", body=OfferCreate,
          responses={201: Offer, **_errors(401, 413, 422)})
async def create_offer(call: Call) -> Response:
    """An admin-made offer."""
    b, coord = call.body, call.coord
    row = await coord.apply(tx_create_offer, b.provider, b.capacity, b.price, b.sla, b.status, coord.now())
    return json_response(offer_view(row), 201)


@endpoint("POST", "/v1/marketplace/offers/{offer_id}/status", role="admin", body=OfferStatusBody,
          responses={200: Offer, **_errors(401, 404, 409, 413, 422)})
async def set_offer_status(call: Call) -> Response:
    """Open, reserve or close an admin-made offer."""
    coord = call.coord
    row = await coord.apply(tx_set_offer_status, call.path("offer_id"), call.body.status)
    return json_response(offer_view(row))


# Explorer (public, read-only): one block and one transaction per job.

def _seq_key(row: sqlite3.Row) -> tuple[int]:
    return (row["seq"],)


@endpoint("GET", "/v1/explorer/blocks", query=BlockQuery, responses={200: BlockPage, 422: ValidationDetail})
async def explorer_blocks(call: Call) -> Response:
    """One block per job, newest (highest) first."""
    q = call.query
    before = read_list_cursor(q, "blocks", int)
    rows = await call.coord.db.read(list_job_page, q.limit + 1, q.offset, before and before[0])
    return json_response(keyset_page(rows, q, block_view, "blocks", _seq_key))


@endpoint("GET", "/v1/explorer/transactions", query=ExplorerQuery,
          responses={200: TransactionPage, 422: ValidationDetail})
async def explorer_transactions(call: Call) -> Response:
    """One transaction per job, newest first."""
    q = call.query
    before = read_list_cursor(q, "transactions", int)

    def read(conn: sqlite3.Connection) -> tuple[list[sqlite3.Row], dict[str, float | None]]:
        rows = list_job_page(conn, q.limit + 1, q.offset, before and before[0])
        return rows, get_receipt_prices(conn, [r["job_id"] for r in rows[:q.limit]])

    rows, prices = await call.coord.db.read(read)
    now = call.coord.now()
    return json_response(keyset_page(rows, q, lambda r: transaction_view(r, prices.get(r["job_id"]), now),
                                     "transactions", _seq_key))


@endpoint("GET", "/v1/explorer/addresses", query=ExplorerQuery, responses={200: AddressPage, 422: ValidationDetail})
async def explorer_addresses(call: Call) -> Response:
    """Every client and miner identity seen in jobs, most recently active first. (By cursor, an address
    whose last activity changes during the walk moves: it may be seen twice or not at all.)"""
    q = call.query
    before = read_list_cursor(q, "addresses", int, str)

    def read(conn: sqlite3.Connection) -> list[tuple[sqlite3.Row, list[str]]]:
        rows = list_addresses(conn, q.limit + 1, q.offset, before)
        return [(r, list_recent_job_ids(conn, r["address"], 5) if i < q.limit else []) for i, r in enumerate(rows)]

    rows = await call.coord.db.read(read)
    return json_response(keyset_page(rows, q, lambda r: address_view(*r), "addresses",
                                     lambda r: (r[0]["last_active"], r[0]["address"])))


@endpoint("GET", "/v1/explorer/receipts", query=ExplorerReceiptQuery,
          responses={200: ExplorerReceiptPage, 422: ValidationDetail})
async def explorer_receipts(call: Call) -> Response:
    """Receipts newest first, of every job or of `job_id`."""
    q = call.query
    job_id = q.job_id or None  # ?job_id= (empty) is every job's, as the answer says
    before = read_list_cursor(q, "receipts", int)
    rows = await call.coord.db.read(read_explorer_receipts, job_id, q.limit, q.offset, before and before[0])
    return json_response({"jobId": job_id or "all", **keyset_page(rows, q, lambda r: r[1], "receipts",
                                                                  lambda r: (r[0],))})


# The receipt log (public, read-only): each answer costs O(log n) rows, entries one per leaf.

@endpoint("GET", "/v1/log/checkpoint", responses={200: LogCheckpoint, 404: Detail})
async def log_checkpoint(call: Call) -> Response:
    """The receipt log's latest signed checkpoint (C2SP tlog-checkpoint note)."""
    row = await call.coord.db.read(get_latest_checkpoint)
    if row is None:
        raise NotFound("the receipt log has no checkpoint (no signing key)")
    return json_response(checkpoint_view(row))


@endpoint("GET", "/v1/log/checkpoints", query=CheckpointListQuery, responses={200: LogCheckpointPage, 422: ValidationDetail})
async def log_checkpoints(call: Call) -> Response:
    """Checkpoints newest first: every one of the last day, then one an hour."""
    q = call.query
    below = read_list_cursor(q, "checkpoints", int)
    rows = await call.coord.db.read(list_checkpoints, below and below[0], q.limit + 1, q.offset)
    return json_response(keyset_page(rows, q, checkpoint_view, "checkpoints", lambda r: (r["tree_size"],)))


@endpoint("GET", "/v1/log/proof/inclusion", query=InclusionQuery,
          responses={200: InclusionProof, 404: Detail, 422: ValidationDetail, 425: Detail}, headers={425: ("Retry-After",)})
async def log_inclusion_proof(call: Call) -> Response:
    """A receipt's leaf index and audit path under a checkpoint; 425 until one covers it."""
    q, coord = call.query, call.coord
    try:
        return json_response(await coord.read_log(read_inclusion_proof, q.receipt_id, q.tree_size))
    except NotReady as exc:
        retry_after = coord.checkpoint_retry_after()
        if retry_after is None:
            raise Unavailable("no checkpoint will cover this receipt: this server has no log signing key",
                              retry_after=None) from None
        exc.headers["Retry-After"] = str(retry_after)
        raise


@endpoint("GET", "/v1/log/proof/consistency", query=ConsistencyQuery,
          responses={200: ConsistencyProof, 404: Detail, 422: ValidationDetail})
async def log_consistency_proof(call: Call) -> Response:
    """Proof that the tree of `first` leaves is a prefix of the tree of `second` (both at most the latest
    checkpoint's size)."""
    q = call.query
    return json_response(await call.coord.read_log(read_consistency_proof, q.first, q.second))


@endpoint("GET", "/v1/log/entries", query=EntriesQuery, responses={200: LogEntries, 422: ValidationDetail})
async def log_entries(call: Call) -> Response:
    """Leaves start..end, so a monitor can replay the tree (a pruned receipt's leaf comes as its hash)."""
    q = call.query
    return json_response(await call.coord.db.read(read_log_entries, q.start, q.end))


# === OpenAPI ===

RESPONSE_HEADERS: dict[str, dict[str, Any]] = {  # every header a response may carry beside its framing
    "Retry-After": {"description": "seconds to wait before asking again (RFC 9110 10.2.3)",
                    "schema": {"type": "integer", "minimum": 1}},
    LOG_INDEX_HEADER: {"description": "the receipt's leaf index in the receipt log (when it has one)",
                       "schema": {"type": "integer", "minimum": 0}},
    "Link": {"description": 'the next page, `<URL>; rel="next"` (RFC 8288), when one follows',
             "schema": {"type": "string"}},
}


def openapi_document(settings: Settings, root_path: str = "") -> dict[str, Any]:
    """An OpenAPI 3.1 description of every endpoint, generated from the pydantic models.

    Limits that are settings (the largest ttl_seconds) are filled in from `settings`; `root_path`, the
    prefix the app is served under, is listed in `servers`.
    """
    models = {m for ep in ENDPOINTS for m in (ep.body, ep.query, *ep.responses.values()) if m is not None}
    keyed = sorted(models, key=lambda m: m.__name__)
    refs, top = models_json_schema([(m, "validation") for m in keyed], ref_template="#/components/schemas/{model}")
    schemas = top.get("$defs", {})
    for branch in schemas["JobSubmit"]["properties"]["ttl_seconds"]["anyOf"]:
        if branch.get("type") == "integer":
            branch["maximum"] = settings.job_ttl_max_seconds
    paths: dict[str, dict[str, Any]] = {}
    for ep in ENDPOINTS:
        summary = " ".join((ep.handler.__doc__ or "").split("\n\n")[0].split())  # its first paragraph, one line
        op: dict[str, Any] = {"operationId": ep.handler.__name__, "summary": summary, "responses": {}, "parameters": []}
        for code, model in sorted(ep.responses.items()):
            resp: dict[str, Any] = {"description": http.HTTPStatus(code).phrase}
            if code in ep.headers:
                resp["headers"] = {name: RESPONSE_HEADERS[name] for name in ep.headers[code]}
            if model is not None:
                resp["content"] = {"application/json": {"schema": refs[(model, "validation")]}}
            elif code != 204:
                resp["content"] = {"application/json": {"schema": {"type": "object"}}}
            op["responses"][str(code)] = resp
        op["parameters"] += [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                             for n in re.findall(r"{(\w+)}", ep.path)]
        if ep.query is not None:
            props, required = schemas[ep.query.__name__]["properties"], schemas[ep.query.__name__].get("required", [])
            op["parameters"] += [{"name": n, "in": "query", "required": n in required, "schema": s}
                                 for n, s in props.items()]
        if ep.body is not None:
            op["requestBody"] = {"required": not ep.optional_body,
                                 "content": {"application/json": {"schema": refs[(ep.body, "validation")]}}}
        if ep.role is not None:
            op["security"] = [{"ApiKey": []}, {"Bearer": []}]
            op["description"] = f"Needs a {ep.role} key."
        paths.setdefault(ep.path, {})[ep.method.lower()] = op
    return {"openapi": "3.1.0", "info": {"title": "AITBC Coordinator", "version": __version__},
            **({"servers": [{"url": root_path}]} if root_path else {}), "paths": paths, "components": {"schemas": schemas, "securitySchemes": {
                "ApiKey": {"type": "apiKey", "in": "header", "name": "X-Api-Key"},
                "Bearer": {"type": "http", "scheme": "bearer"}}}}


# === ASGI app ===

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class Router:
    """Method and path to (route template, runner): a dict for fixed paths, patterns for the rest."""

    def __init__(self) -> None:
        self.fixed: dict[str, dict[str, tuple[str, Runner]]] = {}
        self.patterns: list[tuple[re.Pattern[str], dict[str, tuple[str, Runner]]]] = []

    def add(self, method: str, path: str, run: Runner) -> None:
        """Serve `method path` with `run`; `{name}` in `path` matches one segment (a GET serves HEAD too)."""
        if "{" not in path:
            methods = self.fixed.setdefault(path, {})
        else:
            regex = re.compile(re.sub(r"\\{(\w+)\\}", r"(?P<\1>[^/]+)", re.escape(path)) + r"\Z")
            methods = next((m for r, m in self.patterns if r.pattern == regex.pattern), {})
            if not methods:
                self.patterns.append((regex, methods))
        methods[method] = (path, run)
        if method == "GET":
            methods["HEAD"] = (path, run)

    def find(self, method: str, path: str) -> tuple[str, Runner, dict[str, str]]:
        """The route template, runner and path parameters; raises NotFound or MethodNotAllowed."""
        params: dict[str, str] = {}
        methods = self.fixed.get(path)
        if methods is None:
            for regex, candidate in self.patterns:
                if (match := regex.match(path)) is not None:
                    methods, params = candidate, match.groupdict()
                    if "\x00" in path:  # (%00) names nothing stored; PostgreSQL refuses such text outright
                        raise NotFound("Not Found")
                    break
            else:
                raise NotFound("Not Found")
        found = methods.get(method)
        if found is None:
            raise MethodNotAllowed(headers={"Allow": ", ".join(sorted(methods))})
        return found[0], found[1], params


class Cors:
    """CORS for the dashboards: preflights answered, allowed origins told so on every response."""

    METHODS = ("GET", "POST", "DELETE", "OPTIONS")
    # the spec's list plus the CORS-safelisted request headers
    HEADERS = ("accept", "accept-language", "authorization", "cache-control", "content-language", "content-type",
               "idempotency-key", "x-api-key")
    MAX_AGE_SECONDS = 600

    def __init__(self, origins: Sequence[str]) -> None:
        self.any_origin = "*" in origins
        self.origins = frozenset(origins)

    def allow(self, origin: str | None) -> list[tuple[bytes, bytes]]:
        """Headers every response carries: whether a page from `origin` (None: no Origin header) may read
        it, and Vary: Origin whenever that depends on the origin, so no shared cache hands one origin's
        answer to another."""
        if self.any_origin:
            return [(b"access-control-allow-origin", b"*")] if origin is not None else []
        if origin in self.origins:
            return [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
        return [(b"vary", b"Origin")]

    def preflight(self, origin: str, method: str, requested: str) -> Response:
        """The answer to an OPTIONS preflight: 200, or 400 naming what is not allowed."""
        refused = [what for what, bad in (
            ("origin", not self.any_origin and origin not in self.origins),
            ("method", method not in self.METHODS),
            ("headers", bool(requested) and any(h.strip().lower() not in self.HEADERS for h in requested.split(","))),
        ) if bad]
        asked = "Access-Control-Request-Method, Access-Control-Request-Headers"  # the answer depends on them
        headers = {"Access-Control-Allow-Methods": ", ".join(self.METHODS),
                   "Access-Control-Allow-Headers": ", ".join(self.HEADERS),
                   "Access-Control-Max-Age": str(self.MAX_AGE_SECONDS),
                   "Vary": asked if self.any_origin else f"Origin, {asked}"}
        if refused:
            return json_response({"detail": f"Disallowed CORS {', '.join(refused)}"}, 400, headers)
        response = Response("OK", 200, headers, "text/plain")
        response.raw_headers += [h for h in self.allow(origin) if h[0] != b"vary"]
        return response


def error_response(exc: Exception, where: str) -> Response:
    """The one place errors become responses: {"detail": ...} with the error's status."""
    if isinstance(exc, DB_ERRORS):  # e.g. disk I/O on a read: retryable, never a 500
        log.error("database error on %s: %s", where, exc)
        exc = Unavailable()
    elif not isinstance(exc, ApiError):
        log.error("unhandled error on %s", where, exc_info=exc)
        exc = InternalError()
    return json_response({"detail": exc.detail}, exc.status, exc.headers)


access_log = logging.getLogger("aitbc_coord.access")
LOG_HAS_TASKS = hasattr(logging, "logAsyncioTasks")  # Python 3.12+: records name their asyncio task
_START_NS = time.time_ns()


class AccessRecord(logging.LogRecord):
    """One request's access line, with every attribute a LogRecord has, so that any logging format works.

    The busiest record by far: where the logging flags say records carry no thread or process
    (`serve` sets them so), it is filled in directly, as LogRecord's constructor would with those
    flags; otherwise that constructor makes it.
    """

    FORMAT = "%s %s %d %.1fms caller=%s"

    def __init__(self, method: str, route: str, status: int, seconds: float, caller: str) -> None:  # noqa: PLW0231
        args = (method, route, status, seconds * 1000, caller)
        if (logging.logThreads or logging.logProcesses or logging.logMultiprocessing
                or (LOG_HAS_TASKS and logging.logAsyncioTasks)):
            super().__init__(access_log.name, logging.INFO, "(unknown file)", 0, self.FORMAT, args, None,
                             "(unknown function)")
        else:
            ns = time.time_ns()
            self.name, self.levelno, self.levelname = access_log.name, logging.INFO, "INFO"
            self.msg, self.args = self.FORMAT, args
            self.created, self.msecs = ns / 1e9, (ns % 1_000_000_000) // 1_000_000
            self.relativeCreated = (ns - _START_NS) / 1e6
            self.pathname = self.filename = self.module = "(unknown file)"  # as LogRecord says with no caller
            self.lineno, self.funcName, self.taskName = 0, "(unknown function)", None
            self.exc_info = self.exc_text = self.stack_info = None
            self.thread = self.threadName = self.process = self.processName = None
        self.method, self.route, self.status, self.caller = method, route, status, caller
        self.duration_ms = round(seconds * 1000, 2)



KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "DELETE", "OPTIONS"})


def address_key(host: str) -> str:
    """What the per-address connection cap counts by: an IPv4 address, or an IPv6 address's /64."""
    try:
        return key_of_address(ipaddress.ip_address(host))
    except ValueError:
        return host  # a Unix socket or a name


def key_of_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


class Peer(NamedTuple):
    """What the guard knows of a connection's address, worked out once when it opens."""

    key: str  # what the per-address cap counts by (address_key)
    exempt: bool  # a trusted proxy (FORWARDED_ALLOW_IPS): no per-address cap, X-Forwarded-For believed


OPEN_FILES_HEADROOM = 320  # file descriptors kept free for the database, logs and a few hundred spare


class ConnectionGuard:
    """The connection caps and the deadlines for receiving a request, kept per server (OWASP API4).

    A connection over a cap is answered 503 with Retry-After and closed at once: a miner retries a
    503, while a refused connection looks like a transport error after which it re-registers. Trusted
    proxies (FORWARDED_ALLOW_IPS) are exempt from the per-address cap.
    """

    PEERS_KEPT = 1 << 16  # addresses remembered, then forgotten all at once

    def __init__(self, settings: Settings, open_files: int | None = None) -> None:
        self.header_timeout = settings.request_header_timeout_seconds
        self.max_body = settings.max_body_bytes  # a declared length past it buys no more time
        self.body_timeout = settings.request_body_timeout_seconds
        self.per_address = settings.max_connections_per_address
        if open_files is None:
            open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.total = max(open_files - OPEN_FILES_HEADROOM, 16)
        self.any_exempt = "*" in settings.forwarded_allow_ips
        self.exempt = [ipaddress.ip_network(n, strict=False) for n in settings.forwarded_allow_ips if n != "*"]
        self.by_address: dict[str, int] = {}
        self.open = 0
        self.refused = {"address": 0, "total": 0}  # 503s per cap
        self.closed = {"head": 0, "body": 0}  # connections closed by each deadline
        self.peers: dict[str, Peer] = {}  # host -> Peer, for the addresses seen lately

    def peer(self, host: str) -> Peer:
        """The cap key of `host` and whether it is exempt, from one parse of the address (remembered:
        a fleet reconnects from the same addresses)."""
        if (known := self.peers.get(host)) is not None:
            return known
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return Peer(host, self.any_exempt)  # a Unix socket or a name
        if len(self.peers) >= self.PEERS_KEPT:
            self.peers.clear()
        known = self.peers[host] = Peer(key_of_address(address), self.any_exempt or any(address in n for n in self.exempt))
        return known

    def admit(self, peer: Peer) -> str | None:
        """Count a new connection from `peer`; the cap it would exceed ("address", "total"), or None."""
        count = self.by_address.get(peer.key, 0)
        if self.open >= self.total:
            cap: str | None = "total"
        elif self.per_address and not peer.exempt and count >= self.per_address:
            cap = "address"
        else:
            self.by_address[peer.key] = count + 1
            self.open += 1
            return None
        self.refused[cap] += 1  # type: ignore[index]
        return cap

    def release(self, peer: Peer) -> None:
        """An admitted connection from `peer` has closed."""
        left = self.by_address.pop(peer.key) - 1
        if left:
            self.by_address[peer.key] = left
        self.open -= 1


class Metrics:
    """Prometheus metrics of one app, in its own registry (several apps may share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("aitbc_http_requests", "HTTP requests by route template and status",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("aitbc_http_request_duration_seconds", "HTTP request latency by route template",
                                 ["method", "route"], registry=self.registry,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.commit_seconds = Histogram("aitbc_db_commit_seconds",
                                        "Duration of one group commit (PostgreSQL: of one unit's transaction)",
                                        registry=self.registry,
                                        buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, 1))
        self.full_collection = Histogram("aitbc_gc_full_collection_seconds",
                                         "Pause of one scheduled full garbage collection (serve only)",
                                         registry=self.registry, buckets=(.01, .05, .1, .25, .5, 1, 2.5, 5))
        self.commit_units = Histogram("aitbc_db_commit_units", "Units of work sharing one commit",
                                      registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        GCCollector(registry=self.registry)  # collections per generation: serve collects the oldest on a clock
        self.snapshot: dict[str, Any] = {}
        self.guard: ConnectionGuard | None = None  # set when a server guards the connections
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self.registry.register(self)

    @staticmethod
    def collect_storage(snap: Mapping[str, Any]) -> Iterable[Metric]:
        """The database file, its WAL, the last checkpoint, and what retention and the archive did."""
        if "db_bytes" not in snap:
            return
        for name, key, help_text in (
                ("aitbc_db_bytes", "db_bytes", "Size of the database file"),
                ("aitbc_db_free_bytes", "free_bytes", "Free pages in the database file, reused before it grows"),
                ("aitbc_db_wal_bytes", "wal_bytes", "Size of the -wal file (cut back to the journal_size_limit "
                                                    "once a checkpoint lets the log restart)")):
            yield GaugeMetricFamily(name, help_text, value=snap[key])
        upkeep: Upkeep = snap["upkeep"]
        if upkeep.checkpoint is not None:
            busy, frames, done = upkeep.checkpoint
            for name, value, help_text in (
                    ("busy", busy, "1 when the last WAL checkpoint could not run (another was running)"),
                    ("log_frames", frames, "Frames in the WAL at the last checkpoint"),
                    ("checkpointed_frames", done, "Frames the last checkpoint copied into the database file "
                                                  "(fewer than log_frames: a reader still needed them)"),
                    ("timestamp_seconds", upkeep.checkpoint_at, "When the last WAL checkpoint ran")):
                yield GaugeMetricFamily(f"aitbc_db_last_checkpoint_{name}", help_text, value=value)
        outcomes = CounterMetricFamily("aitbc_db_checkpoints", "Background WAL checkpoints by outcome "
                                       "(complete, partial: a reader held older frames, busy, error)", labels=["outcome"])
        for outcome in ("complete", "partial", "busy", "error"):
            outcomes.add_metric([outcome], upkeep.checkpoints[outcome])
        yield outcomes
        for name, value, help_text in (
                ("aitbc_retention_payloads_pruned", upkeep.pruned, "Finished jobs whose payload and result were dropped"),
                ("aitbc_retention_jobs_deleted", upkeep.jobs_deleted, "Job summaries deleted (JOB_RETENTION_DAYS)"),
                ("aitbc_retention_receipts_deleted", upkeep.receipts_deleted, "Receipts deleted (RECEIPT_RETENTION_DAYS)"),
                ("aitbc_archive_files_written", upkeep.archive_files, "Archive files written to ARCHIVE_DIR"),
                ("aitbc_archive_jobs_written", upkeep.archive_jobs, "Jobs written to archive files"),
                ("aitbc_archive_errors", upkeep.archive_errors, "Archive runs that failed (nothing of them was pruned)"),
                ("aitbc_retention_bids_deleted", upkeep.bids_deleted, "Bids deleted (JOB_RETENTION_DAYS)"),
                ("aitbc_retention_passes_refused", upkeep.passes_refused,
                 "Retention passes not run: the wall clock stepped ahead of the monotonic clock"),
                ("aitbc_retention_clock_resets", upkeep.clock_resets,
                 "Retention clocks found stored in the future at start-up, restarted")):
            yield CounterMetricFamily(name, help_text, value=value)
        yield GaugeMetricFamily("aitbc_retention_clock_step_seconds", "How far the wall clock is ahead of the last "
                                "retention pass plus the monotonic time since, while that pauses retention (else 0)",
                                value=upkeep.clock_step_ms / 1000)

    @staticmethod
    def collect_cluster(snap: Mapping[str, Any]) -> Iterable[Metric]:
        """PostgreSQL: what this instance does for the cluster (its duty ticks, its wake-up listener)."""
        peers: Peers | None = snap.get("peers")
        if peers is None:
            return
        yield CounterMetricFamily("aitbc_cluster_duty_ticks", "Sweep ticks in which this instance ran the "
                                  "cluster's duties (summed over instances: one a tick)", value=snap["duties"])
        yield GaugeMetricFamily("aitbc_peer_listener_connected", "1 while this instance listens for the other "
                                "instances' wake-ups", value=int(peers.connected))
        yield GaugeMetricFamily("aitbc_peer_instances", "Other instances listening on this database (no wake-ups "
                                "are sent while there are none; -1 until counted)",
                                value=-1 if peers.others is None else peers.others)
        for name, value, help_text in (
                ("aitbc_peer_listener_reconnects", peers.reconnects, "Times the wake-up listener lost its connection"),
                ("aitbc_peer_wakeups_sent", peers.sent, "Batches of wake-ups sent to the other instances"),
                ("aitbc_peer_wakeups_received", peers.received, "Wake-up payloads received from other instances")):
            yield CounterMetricFamily(name, help_text, value=value)

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one HTTP request (methods no route serves are counted as OTHER: labels stay bounded)."""
        key = (method if method in KNOWN_METHODS else "OTHER", route, status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (self.requests.labels(key[0], route, str(status)),
                                              self.latency.labels(key[0], route))
        children[0].inc()
        children[1].observe(seconds)

    def observe_commit(self, units: int, seconds: float) -> None:
        """Called by the writer after every commit."""
        self.commit_units.observe(units)
        self.commit_seconds.observe(seconds)

    def describe(self) -> list[Metric]:
        return []  # the families below come and go with the snapshot

    def collect(self) -> Iterable[Metric]:
        """The database-derived families, from the snapshot the /metrics handler just read."""
        snap = self.snapshot
        jobs = GaugeMetricFamily("aitbc_jobs", "Jobs by state", labels=["state"])
        for state, n in snap.get("jobs", {}).items():
            jobs.add_metric([state], n)
        yield jobs
        yield GaugeMetricFamily("aitbc_queue_depth", "Jobs waiting in the queue", value=snap.get("queued", 0))
        yield GaugeMetricFamily("aitbc_miners_online", "Miners heard from within the heartbeat timeout",
                                value=snap.get("online", 0))
        yield GaugeMetricFamily("aitbc_polls_waiting", "Miner long-polls waiting for work", value=snap.get("waiting", 0))
        yield CounterMetricFamily("aitbc_receipts_issued", "Signed receipts issued", value=snap.get("receipts", 0))
        yield from self.collect_storage(snap)
        if (retried := snap.get("retried")) is not None:  # PostgreSQL
            again = CounterMetricFamily("aitbc_db_unit_retries", "Units of work run again after a deadlock or a "
                                        "serialisation failure (LOCK ORDER: none expected)",
                                        labels=["error"])
            for error in ("DeadlockDetected", "SerializationFailure"):
                again.add_metric([error], retried[error])
            yield again
        yield from self.collect_cluster(snap)
        guard = self.guard
        if guard is not None:
            yield GaugeMetricFamily("aitbc_connections_open", "Client connections open", value=guard.open)
            closed = CounterMetricFamily("aitbc_connections_closed_by_deadline",
                                         "Connections closed because a request head or body came too slowly",
                                         labels=["deadline"])
            for stage, n in guard.closed.items():
                closed.add_metric([stage], n)
            yield closed
            refused = CounterMetricFamily("aitbc_connections_refused", "Connections answered 503 over a cap",
                                          labels=["cap"])
            for cap, n in guard.refused.items():
                refused.add_metric([cap], n)
            yield refused


class App:
    """The ASGI application, in one layer: routing, CORS, error rendering, access log and metrics.

    Handlers get Starlette's Request and return its Responses. (Starlette's application, router and
    middleware stack cost ~80 us a request on the benchmark machine, about as much as the unit of
    work behind a request; here routing is a dict lookup and the rest is a few lines.)
    """

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time,
                 migrated: tuple[int, int] | None = None, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.coord = Coordinator(settings, clock, migrated, monotonic)
        self.metrics = Metrics()
        self.guard = self.metrics.guard = ConnectionGuard(settings)
        self.coord.db.commit_observer = self.metrics.observe_commit
        self.openapi: dict[str, bytes] = {}  # per prefix served under (root_path)
        self.cors = Cors(settings.allow_origins)
        self.router = Router()
        for ep in ENDPOINTS:
            self.router.add(ep.method, ep.path, endpoint_runner(ep, self.coord))
        for prefix in ("", "/v1"):
            self.router.add("GET", f"{prefix}/openapi.json", self.serve_openapi)
            self.router.add("GET", f"{prefix}/metrics", self.serve_metrics)

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """Migrate, open the database and run the sweeper for the duration."""
        await self.coord.start()
        try:
            yield
        finally:
            await self.coord.stop()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.serve_http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self.serve_lifespan(receive, send)

    async def serve_lifespan(self, receive: Receive, send: Send) -> None:
        for phase, step in (("startup", self.coord.start), ("shutdown", self.coord.stop)):
            await receive()  # lifespan.startup, then lifespan.shutdown
            try:
                await step()
            except BaseException as exc:
                await send({"type": f"lifespan.{phase}.failed", "message": str(exc)})
                raise
            await send({"type": f"lifespan.{phase}.complete"})

    async def serve_http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        request = Request(scope, receive)
        method, route, headers = scope["method"], "unmatched", request.headers
        # (a miner's request has no Origin: a scan of the raw names, not a KeyError caught in Headers.get)
        origin = next((value.decode("latin-1") for name, value in scope["headers"] if name == b"origin"), None)
        cors = self.cors.allow(origin)
        try:
            if origin is not None and method == "OPTIONS" and "access-control-request-method" in headers:
                response, cors = self.cors.preflight(origin, headers["access-control-request-method"],
                                                     headers.get("access-control-request-headers", "")), []
            else:
                route, run, scope["path_params"] = self.router.find(method, route_path(scope))
                response = await run(request)
        except Exception as exc:
            response = error_response(exc, scope["path"])
        status = response.status_code
        try:
            await send({"type": "http.response.start", "status": status, "headers": response.raw_headers + cors})
            await send({"type": "http.response.body", "body": response.body})
        finally:
            seconds = time.perf_counter() - started
            caller = scope.get(CALLER, "-")
            self.metrics.observe_request(method, route, status, seconds)
            if access_log.isEnabledFor(logging.INFO):
                if (handler := BurstHandler.sole_text_handler()) is not None:
                    handler.write_access(method, route, status, seconds, caller)
                else:
                    access_log.handle(AccessRecord(method, route, status, seconds, caller))

    async def serve_openapi(self, request: Request) -> Response:
        """The OpenAPI document, its `servers` naming the prefix the app is served under (if any)."""
        root = request.scope.get("root_path", "")
        if root not in self.openapi:
            self.openapi[root] = response_json(openapi_document(self.coord.settings, root)).encode()
        return Response(self.openapi[root], media_type="application/json")

    async def serve_metrics(self, request: Request) -> Response:
        """Prometheus text format; needs an admin key when METRICS_REQUIRE_ADMIN_KEY is set."""
        coord = self.coord
        if coord.settings.metrics_require_admin:
            request.scope[CALLER] = authenticate(request, coord.settings, "admin").identity
        stats, (page_size, pages, free) = await coord.db.read(lambda conn: (read_admin_stats(conn), get_db_space(conn)))
        try:
            wal_bytes = 0 if coord.settings.postgres_url else os.stat(coord.settings.db_path + "-wal").st_size
        except FileNotFoundError:
            wal_bytes = 0
        self.metrics.snapshot = {"jobs": stats["jobs_by_state"], "queued": stats["jobs_by_state"][JobState.QUEUED],
                                 "receipts": stats["receipts_total"], "online": stats["online_miners"],
                                 "waiting": coord.hub.count, "db_bytes": page_size * pages,
                                 "free_bytes": page_size * free, "wal_bytes": wal_bytes,
                                 "upkeep": coord.upkeep, "retried": getattr(coord.db, "retried", None),
                                 "peers": coord.peers, "duties": coord.cluster_duties}
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


# === Serving: logging, the socket, the server ===

class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    FIELDS = ("method", "route", "status", "duration_ms", "caller")

    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": iso(int(record.created * 1000)), "level": record.levelname.lower(), "logger": record.name,
                "msg": record.getMessage()}
        line.update({k: getattr(record, k) for k in self.FIELDS if hasattr(record, k)})
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line)


class TextFormatter(logging.Formatter):
    """`time level logger: message`, the time formatted once per second rather than per line."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._second, self._stamp = -1, ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        second = int(record.created)
        if second != self._second:
            self._second, self._stamp = second, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return f"{self._stamp},{int(record.msecs):03d}"

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            return super().format(record)
        record.message = record.getMessage()  # the format above, without its general machinery
        return f"{self.formatTime(record)} {record.levelname} {record.name}: {record.message}"


class BurstHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes lines logged on the event loop's thread once per loop iteration: a burst of access lines
    costs one write, not one each. Warnings and errors, and lines from other threads, go out at once."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._flush_queued = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + self.terminator)
            loop = asyncio._get_running_loop()
            if record.levelno >= logging.WARNING or loop is None:
                self.flush()
            elif not self._flush_queued:
                self._flush_queued = True
                loop.call_soon(self._flush_queued_lines)
        except Exception:
            self.handleError(record)

    def _flush_queued_lines(self) -> None:
        self._flush_queued = False
        self.flush()

    @staticmethod
    def sole_text_handler() -> BurstHandler | None:
        """The handler an access line would reach, when that is only a BurstHandler with the
        TextFormatter and nothing filters on the way (as `serve` sets logging up); else None."""
        root = logging.root
        if (access_log.filters or access_log.handlers or not access_log.propagate or log.filters or log.handlers
                or not log.propagate or root.filters or len(root.handlers) != 1):
            return None
        handler = root.handlers[0]
        if (type(handler) is BurstHandler and type(handler.formatter) is TextFormatter and not handler.filters
                and handler.level <= logging.INFO):
            return handler
        return None

    def write_access(self, method: str, route: str, status: int, seconds: float, caller: str) -> None:
        """An access line exactly as access_log.handle(AccessRecord(...)) would write it through this
        handler, without the record and the logging machinery (the busiest line by far)."""
        ns = time.time_ns()
        stamp = self.formatter.formatTime(_Stamp(ns / 1e9, (ns % 1_000_000_000) // 1_000_000))  # type: ignore[union-attr, arg-type]
        with self.lock:  # type: ignore[union-attr]
            self.stream.write(f"{stamp} INFO {access_log.name}: {AccessRecord.FORMAT % (method, route, status, seconds * 1000, caller)}\n")
        if not self._flush_queued:
            self._flush_queued = True
            asyncio.get_running_loop().call_soon(self._flush_queued_lines)


class _Stamp(NamedTuple):
    """What TextFormatter.formatTime reads of a record."""

    created: float
    msecs: int


def setup_logging(level: str, fmt: str = "text") -> None:
    """Log to stderr (journald picks it up), as text or JSON lines; uvicorn's loggers go the same way."""
    # Its own buffered stream on stderr: sys.stderr is line-buffered, a write per line whatever we do.
    stream = open(sys.stderr.fileno(), "w", buffering=1 << 16, encoding="utf-8",  # noqa: SIM115 - lives on
                  errors="backslashreplace", closefd=False)
    handler = BurstHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # The logging HOWTO's optimisation notes: no record needs its caller, thread or process.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    if hasattr(logging, "logAsyncioTasks"):  # Python 3.12+
        logging.logAsyncioTasks = False


LISTEN_BACKLOG = 4096  # a fleet reconnecting after a restart; the kernel caps it at net.core.somaxconn


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready socket on host:port (port 0 picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must say TCP: asyncio sets TCP_NODELAY only on such sockets; without it every response
    # split over two writes waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


FULL_COLLECTION_SECONDS = 86_400.0  # the cycle collector's oldest generation at least once a day...
FULL_COLLECTION_GROWTH = 1.5, 256 << 20  # ...or once the RSS grew by half and by 256 MiB over its size after the last
YOUNG_GENERATIONS = 1  # gc.collect(1): generations 0 and 1


def rss_bytes() -> int:
    """The process's resident set size now (Linux: /proc/self/statm, in pages); elsewhere its peak
    (getrusage: KiB on Linux, bytes on macOS), the nearest portable reading."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class Server(uvicorn.Server):
    """uvicorn's server, except that SIGTERM/SIGINT release waiting long-polls at once (204), a
    graceful shutdown ends with exit status 0 instead of re-raising the signal, and the cycle
    collector runs on a clock, not by allocation counts: the young generations every tick (0.1 s),
    the oldest when memory grew.

    Why: a parked long-poll holds ~65 container objects (its task, coroutines, event, timer,
    request), so 10,000 parked miners are ~600,000 objects in the oldest generation, and polls
    that renew every few seconds promote fresh ones all the time. CPython's own rule (a full
    collection once a quarter of the old generation is newly promoted) then ran a full collection
    every ~4 s, each stopping the event loop for 0.5-2.4 s. Objects that die through the request
    and poll paths are freed by reference counting or in the young generations: full collections
    after 10-minute 10,000-miner runs (registration, idle, a 5,000-job burst, a slowloris attack)
    found no cyclic garbage left. So the oldest generation is collected once a day, or sooner when
    the RSS (resident now, not the peak, which never comes down) has grown by half and by 256 MiB
    over what it was right after the last full collection (cyclic garbage piling up shows there
    first); what start-up built lives as long as the process and is moved out of the collector's
    sight (`gc.freeze`, Python's documented use for it).

    The young generations have the same trouble from the other side: CPython counts a young
    collection down by allocations *net of deallocations*, and every poll that ends frees objects
    long promoted, so at 10,000 miners the count lagged until the youngest generation held
    ~200,000 live objects (the polls parked since the last collection) and a young collection
    paused the loop for 100-250 ms, read by miners and clients as wake-up and submit latency. So
    automatic collection is off, and each tick collects both young generations: what was allocated
    in the last 0.1 s and still lives is examined once (a few ms at 10,000 miners) and, if alive,
    goes to the oldest generation."""

    def __init__(self, config: uvicorn.Config, coord: Coordinator, metrics: Metrics | None = None,
                 rss: Callable[[], int] = rss_bytes) -> None:
        super().__init__(config)
        self.coord, self.metrics, self.rss = coord, metrics, rss
        self.full_collection_due, self.rss_at_collection = math.inf, 0
        self.collector_was_on: bool | None = None  # set once start-up has taken the collector over

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        # The coordinator first (the lifespan then finds it started): a ConfigError here (a development
        # key file that cannot be used, a changed log origin) leaves run() as itself, for `serve` to
        # report in one line with exit status 1, where uvicorn's lifespan would log "Application
        # startup failed" and exit 3.
        await self.coord.start()
        await super().startup(sockets=sockets)
        gc.collect()
        gc.freeze()
        self.collector_was_on = gc.isenabled()
        gc.disable()  # collections come from on_tick
        self.full_collection_due, self.rss_at_collection = time.monotonic() + FULL_COLLECTION_SECONDS, self.rss()
        log.info("start-up objects frozen; young generations are collected every tick, the oldest daily or "
                 "after memory grows")

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().shutdown(sockets=sockets)
        finally:  # a server run in a thread (`check`) leaves its process's collector as it found it
            if self.collector_was_on is not None:
                gc.unfreeze()
                if self.collector_was_on:
                    gc.enable()
                self.collector_was_on = None

    async def on_tick(self, counter: int) -> bool:
        if counter % 10 == 0 and self.full_collection_is_due():
            self.collect_fully()
        elif not gc.isenabled():  # (it is, in a server whose start-up did not finish)
            gc.collect(YOUNG_GENERATIONS)
        return await super().on_tick(counter)

    def full_collection_is_due(self) -> bool:
        factor, least = FULL_COLLECTION_GROWTH
        grown = self.rss() - self.rss_at_collection
        return time.monotonic() >= self.full_collection_due or (
            grown >= least and self.rss_at_collection + grown >= factor * self.rss_at_collection)

    def collect_fully(self) -> None:
        """One full collection (every generation but the frozen start-up objects); logged and timed."""
        started = time.perf_counter()
        freed = gc.collect()
        seconds = time.perf_counter() - started
        self.full_collection_due, self.rss_at_collection = time.monotonic() + FULL_COLLECTION_SECONDS, self.rss()
        if self.metrics is not None:
            self.metrics.full_collection.observe(seconds)
        log.info("full garbage collection: %d unreachable objects freed in %.0f ms", freed, seconds * 1000)

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        loop = asyncio.get_running_loop()

        def on_signal(sig: int, frame: Any) -> None:
            self.handle_exit(sig, frame)
            loop.call_soon_threadsafe(self.coord.hub.close)

        originals = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)


REQUEST_TIMEOUT_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                       b"connection: close\r\ncontent-length: 23\r\n\r\nrequest came too slowly")
OVER_CAP_503 = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
                b"connection: close\r\ncontent-length: 36\r\n\r\n{\"detail\":\"too many open connections\"}")
MIN_BODY_BYTES_PER_SECOND = 1024


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a ConnectionGuard: caps checked when a connection opens, and a
    deadline for each stage of receiving a request (its head from the first byte, or from opening;
    then its body). Between requests uvicorn's keep-alive timeout governs; once the body is in, the
    request is the server's: a long-poll may wait as long as it asks.

    The parser's callbacks say which stage the newest request is in (`receiving`); the deadline
    follows it once per `data_received`, so a request that arrives whole costs no timer at all."""

    guard: ConnectionGuard  # set by protocol_for

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: D107 - see connection_made
        self.deferred = (args, kwargs)
        self.peer: Peer | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Admit the connection or answer 503 and close it. uvicorn's own set-up (its parser, flow
        control, addresses, `__init__` deferred to here) runs only for an admitted connection: an
        address that reconnects the moment it is refused costs one accept and one write."""
        peer = self.guard.peer(peer_host(transport))
        if self.guard.admit(peer) is not None:
            transport.write(OVER_CAP_503)
            transport.close()
            return
        args, kwargs = self.deferred
        super().__init__(*args, **kwargs)
        super().connection_made(transport)
        self.transport = CoalescingTransport(transport)  # type: ignore[assignment]
        self.peer = peer
        if not peer.exempt and isinstance(self.app, ProxyHeadersMiddleware):
            self.app = self.app.app  # X-Forwarded-For counts only from FORWARDED_ALLOW_IPS: none to read here
        self.receiving: str | None = None  # "head" from a request's first byte, then "body" until it is all in
        self.stage: str | None = None  # the stage whose deadline is armed
        self.timer: asyncio.TimerHandle | None = None
        self.body_started, self.body_bytes = 0.0, 0
        self.arm("head", self.guard.header_timeout)  # the first head is due from opening

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is None:
            return  # refused: uvicorn never saw it
        self.disarm()
        self.guard.release(self.peer)
        self.peer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.receiving != self.stage and not self.transport.is_closing():
            self.follow()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.receiving = "head"

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self.receiving, self.body_bytes = "body", 0

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.receiving = None

    def on_response_complete(self) -> None:
        self.transport.flush()  # type: ignore[attr-defined]  # a head with no body (HEAD, 204)
        super().on_response_complete()
        if self.receiving == "body" and self.cycle.response_complete and not self.transport.is_closing():
            self.disarm()  # answered before its body came in: the rest of the stream cannot be trusted
            self.transport.close()

    def follow(self) -> None:
        """Move the deadline to the stage the newest request is in."""
        if self.receiving is None:
            self.disarm()
        elif self.receiving == "head":
            if self.stage != "head":  # the first bytes of a later request (the first one's is due from opening)
                self.arm("head", self.guard.header_timeout)
        else:
            declared = next((v for k, v in self.headers if k == b"content-length"), b"")
            length = min(int(declared), self.guard.max_body) if declared.isdigit() else 0  # past it buys no time
            self.body_started = self.loop.time()
            self.arm("body", max(self.guard.body_timeout, length / MIN_BODY_BYTES_PER_SECOND))

    def arm(self, stage: str, seconds: float) -> None:
        self.disarm()
        self.stage, self.timer = stage, self.loop.call_later(seconds, self.expired)

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.stage = self.timer = None

    def expired(self) -> None:
        stage, self.timer = self.stage, None
        if stage == "body":  # a body of unknown length may take longer while it keeps to 1 KB/s
            due = self.body_started + self.body_bytes / MIN_BODY_BYTES_PER_SECOND
            if due > self.loop.time():
                self.timer = self.loop.call_at(due, self.expired)
                return
        self.stage = None
        self.guard.closed[stage] += 1  # type: ignore[index]
        if not self.transport.is_closing():
            if self.cycle is None or self.cycle.response_complete or not self.cycle.response_started:
                self.transport.write(REQUEST_TIMEOUT_408)
            self.transport.close()


class CoalescingTransport:
    """A connection's transport as uvicorn's protocol sees it, which writes a response's head and
    body together. uvicorn writes them with two calls, so two send()s and two wake-ups of the
    client on a loopback or LAN link, a third of the kernel's share of a small answer; here the
    head of a final response (not 100 Continue) waits for the next write, a close, or the end of
    the response, and goes out with the body in one write."""

    __slots__ = ("head", "transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport, self.head = transport, None  # type: ignore[var-annotated]

    def write(self, data: bytes) -> None:
        if self.head is not None:
            head, self.head = self.head, None
            self.transport.write(head + data)
        elif data.startswith(b"HTTP/1.1 ") and not data.startswith(b"1", 9):
            self.head = data
        else:
            self.transport.write(data)

    def flush(self) -> None:
        if self.head is not None:
            head, self.head = self.head, None
            self.transport.write(head)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


def peer_host(transport: asyncio.BaseTransport) -> str:
    """The remote address of a TCP connection, or "-" (a Unix socket)."""
    peername = transport.get_extra_info("peername")
    return peername[0] if isinstance(peername, tuple) and peername else "-"


def protocol_for(guard: ConnectionGuard) -> type[GuardedProtocol]:
    """A GuardedProtocol class bound to `guard` (uvicorn makes one instance a connection)."""
    return type("GuardedProtocol", (GuardedProtocol,), {"guard": guard})


def raise_open_files_limit() -> int:
    """Raise the soft open-files limit to the hard one (each connection is a file); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(OSError):  # not allowed here: the soft limit stands
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


def run_server(settings: Settings, migrated: tuple[int, int] | None = None) -> None:
    """Serve until SIGTERM/SIGINT; raises click.ClickException when the address is taken, ConfigError
    when the coordinator cannot start. `migrated`: (before, after) schema versions when the caller has
    migrated already."""
    sock = bind_socket(settings.host, settings.port)
    log.info("listening on http://%s:%d%s", settings.host, sock.getsockname()[1],
             f" (served under {settings.root_path} by a proxy that strips it)" if settings.root_path else "")
    open_files = raise_open_files_limit()
    app = App(settings, migrated=migrated)
    log.info("open files %d: at most %d connections, %s per address", open_files, app.guard.total,
             settings.max_connections_per_address or "no cap")
    # log_config=None: uvicorn's lines go through our handler; access_log=False: App logs requests
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=5,
                            server_header=False, root_path=settings.root_path, http=protocol_for(app.guard),
                            backlog=LISTEN_BACKLOG,
                            forwarded_allow_ips=list(settings.forwarded_allow_ips), proxy_headers=True)
    Server(config, app.coord, app.metrics).run(sockets=[sock])


# === Smoke check ===

class CheckFailed(Exception):
    """A smoke-check step did not do what it should."""


def expect(condition: bool, why: str) -> None:
    if not condition:
        raise CheckFailed(why)


class Check:
    """The smoke flow's HTTP client (stdlib only) and its record of passed steps."""

    def __init__(self, base: str, client_key: str, miner_key: str, require_receipt: bool = False) -> None:
        self.base = base.rstrip("/").removesuffix("/v1")
        self.client_key, self.miner_key, self.require_receipt = client_key, miner_key, require_receipt
        self.passed: list[str] = []

    @contextlib.contextmanager
    def step(self, name: str) -> Any:
        try:
            yield
        except CheckFailed as exc:
            raise CheckFailed(f"step {name!r}: {exc}") from None
        except (KeyError, TypeError, ValueError) as exc:  # an answer of the wrong shape
            raise CheckFailed(f"step {name!r}: unexpected answer ({type(exc).__name__}: {exc})") from None
        self.passed.append(name)

    def call(self, method: str, path: str, key: str | None = None, body: Any = None, expect: int = 200) -> Any:
        """One request; its JSON answer. Raises CheckFailed on another status or no connection."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **({"X-Api-Key": key} if key else {})}
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        except (urllib.error.URLError, OSError) as exc:
            raise CheckFailed(f"cannot reach {self.base}: {getattr(exc, 'reason', exc)}") from None
        if status != expect:
            raise CheckFailed(f"{method} {path}: expected {expect}, got {status} {raw[:200].decode(errors='replace')}")
        return json.loads(raw) if raw else None


def claim_own_job(check: Check, job_id: str) -> dict[str, Any]:
    """Poll until the check's own job arrives; any other job is handed straight back (retryable)."""
    for _ in range(10):
        r = check.call("POST", "/v1/miners/poll", check.miner_key, {"max_wait_seconds": 5}, expect=200)
        if r["job_id"] == job_id:
            return r
        check.call("POST", f"/v1/miners/{r['job_id']}/fail", check.miner_key,
                   {"error_code": "CHECK", "error_message": "smoke check miner", "retryable": True})
    raise CheckFailed("the check's own job never arrived")


def run_check(check: Check) -> None:
    """Submit, register, poll, result, read back, verify the receipt, read the explorer and marketplace."""
    tag = f"aitbc-check-{secrets.token_hex(4)}"
    with check.step("health"):
        expect(check.call("GET", "/v1/health")["status"] == "ok", "health is not ok")
    with check.step("register"):
        check.call("POST", "/v1/miners/register", check.miner_key, {"capabilities": {"models": [tag], "price": 0.5}})
    with check.step("submit"):
        job = check.call("POST", "/v1/jobs", check.client_key, {"payload": {"check": tag, "value": "1"},
                         "constraints": {"models": [tag]}, "ttl_seconds": 120}, expect=201)
        job_id = job["job_id"]
    with check.step("poll"):
        expect(claim_own_job(check, job_id)["payload"]["check"] == tag, "the assignment carries another payload")
    with check.step("result"):
        receipt = check.call("POST", f"/v1/miners/{job_id}/result", check.miner_key,
                             {"result": {"check": tag}, "metrics": {"units": 2}})["receipt"]
    with check.step("read back"):
        view = check.call("GET", f"/v1/jobs/{job_id}", check.client_key)
        expect(view["state"] == "COMPLETED", f"job is {view['state']}, not COMPLETED")
        expect(check.call("GET", f"/v1/jobs/{job_id}/result", check.client_key)["result"] == {"check": tag},
               "the stored result differs")
    if receipt is not None or check.require_receipt:
        with check.step("receipt"):
            expect(receipt is not None, "no receipt was issued")
            keys = check.call("GET", "/v1/receipts/keys")["items"]
            active = {role: {k["key_id"] for k in keys if k["role"] == role and k["status"] == "active"}
                      for role in ("signing", "attestation")}
            local = verify_receipt(receipt, active["signing"], active["attestation"])
            expect(local["valid"], f"receipt does not verify here: {local['reason']}")
            remote = check.call("POST", "/v1/receipts/verify", body={"receipt": receipt})
            expect(remote["valid"], f"server says the receipt is invalid: {remote['reason']}")
    with check.step("explorer"):
        txs = check.call("GET", "/v1/explorer/transactions?limit=200")["items"]
        expect(any(t["hash"] == job_id and t["status"] == "Succeeded" for t in txs), "job missing from the explorer")
    with check.step("marketplace"):
        offers = check.call("GET", "/v1/marketplace/offers?limit=500")
        expect(any(o["provider"] == view["assigned_miner_id"] for o in offers), "the check miner has no offer")
        stats = check.call("GET", "/v1/marketplace/stats")
        expect({"totalOffers", "openCapacity", "averagePrice", "activeBids"} <= set(stats), "stats lack fields")


@contextlib.contextmanager
def running_server(settings: Settings) -> Any:
    """Serve `settings` on a free port in a background thread; yields the base URL."""
    sock = bind_socket(settings.host, 0)
    app = App(settings)
    server = Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="on"), app.coord)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise CheckFailed("the in-process coordinator did not start")
            time.sleep(0.02)
        yield f"http://{settings.host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def check_in_process() -> Check:
    """Run the smoke flow against a throwaway coordinator: temporary database, random keys."""
    keys = {role: secrets.token_hex(24) for role in ROLES}
    with tempfile.TemporaryDirectory(prefix="aitbc-check-") as tmp:
        env = {"APP_ENV": "check", "DATABASE_URL": f"sqlite:///{tmp}/check.db",
               **{f"{role.upper()}_API_KEYS": key for role, key in keys.items()},
               "RECEIPT_SIGNING_KEY_HEX": SigningKey.generate().encode().hex(),
               "RECEIPT_ATTESTATION_KEY_HEX": SigningKey.generate().encode().hex()}
        settings = Settings.load(env, dotenv=False)
        with running_server(settings) as base:
            check = Check(base, keys["client"], keys["miner"], require_receipt=True)
            run_check(check)
    return check


# === CLI ===

def _settings_or_exit(env_file: str | None, **overrides: Any) -> Settings:
    try:
        check_sqlite_version()
        return Settings.load(os.environ, env_file, **overrides)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="aitbc-coord")
def cli() -> None:
    """AITBC job coordinator: one module, one SQLite file.

    \b
    Example:
      aitbc-coord serve --port 8011
    """


@cli.command()
@click.option("--host", help="Bind address (APP_HOST, default 127.0.0.1).")
@click.option("--port", type=click.IntRange(0, 65535), help="Port, 0 picks a free one (APP_PORT, default 8011).")
@click.option("--db", "db_path", help="Database file, or a postgresql:// URL (DATABASE_URL, default ./coordinator.db).")
@click.option("--env-file", type=click.Path(dir_okay=False), help="Read settings from this file instead of ./.env.")
@click.option("--log-level", type=click.Choice(LOG_LEVELS, case_sensitive=False),
              help="LOG_LEVEL, default info.")
@click.option("--log-format", type=click.Choice(LOG_FORMATS, case_sensitive=False),
              help="json: one JSON object per line (LOG_FORMAT, default text).")
@click.option("--root-path", help="The prefix a reverse proxy serves the API under, e.g. /coordinator (ROOT_PATH).")
def serve(host: str | None, port: int | None, db_path: str | None, env_file: str | None, log_level: str | None,
          log_format: str | None, root_path: str | None) -> None:
    """Apply pending migrations, then serve the API.

    \b
    Example:
      aitbc-coord serve --host 0.0.0.0 --port 8011 --db /var/lib/aitbc/coordinator.db
    """
    try:
        parsed_root = None if root_path is None else _parse_root_path(root_path)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--root-path") from None
    # Options win over the environment; a bad LOG_LEVEL, like any bad setting, is one line naming it, exit 1.
    settings = _settings_or_exit(env_file, host=host, port=port, db_path=db_path, root_path=parsed_root,
                                 log_level=log_level and log_level.lower(), log_format=log_format and log_format.lower())
    setup_logging(settings.log_level, settings.log_format)
    try:
        run_server(settings, migrate_database(settings))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@cli.command("migrate")
@click.option("--db", "db_path", help="Database file, or a postgresql:// URL (DATABASE_URL, default ./coordinator.db).")
@click.option("--env-file", type=click.Path(dir_okay=False), help="Read settings from this file instead of ./.env.")
def migrate_command(db_path: str | None, env_file: str | None) -> None:
    """Create or upgrade the database schema (safe to repeat).

    \b
    Example:
      aitbc-coord migrate --db /var/lib/aitbc/coordinator.db
    """
    settings = _settings_or_exit(env_file, db_path=db_path)
    try:
        before, after = migrate_database(settings)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{settings.database}: schema version {before} -> {after}")


@cli.command("check")
@click.option("--url", envvar="AITBC_URL", help="Check this running server instead of a throwaway one. Also AITBC_URL.")
@click.option("--client-key", envvar="AITBC_CLIENT_KEY", default=DEV_KEYS["client"], show_default="the dev key",
              help="Client key for --url. Also AITBC_CLIENT_KEY.")
@click.option("--miner-key", envvar="AITBC_MINER_KEY", default=DEV_KEYS["miner"], show_default="the dev key",
              help="Miner key for --url (use a dedicated one: its registration is replaced). Also AITBC_MINER_KEY.")
def check_command(url: str | None, client_key: str, miner_key: str) -> None:
    """Smoke-test a coordinator end to end; exit status 0 only if every step passed.

    Submits a job, registers a miner, polls, posts the result, reads it back, verifies the receipt,
    and reads the explorer and the marketplace. Without --url it does this against a throwaway
    coordinator on a temporary database with random keys. Prints one summary line.

    \b
    Examples:
      aitbc-coord check
      aitbc-coord check --url http://127.0.0.1:8011 --client-key "$CK" --miner-key "$MK"
    """
    setup_logging("error")
    started = time.monotonic()
    check = Check(url, client_key, miner_key) if url else None
    try:
        if check is not None:
            run_check(check)
        else:
            check = check_in_process()
    except (CheckFailed, ConfigError) as exc:
        passed = len(check.passed) if check is not None else 0
        click.echo(f"check failed: {exc} ({passed} steps passed)", err=True)
        sys.exit(1)
    where = check.base if url else "a throwaway in-process coordinator"
    click.echo(f"check ok: {len(check.passed)} steps passed ({', '.join(check.passed)}) against {where} "
               f"in {time.monotonic() - started:.2f}s")


def write_secret(path: str, text: str, force: bool) -> None:
    """Write `text` to a new file readable only by its owner, whole or not at all (a key replaced with
    --force is never left truncated); raises click.ClickException if it exists or cannot be written."""
    try:
        write_file_atomically(path, text, replace=force)
    except FileExistsError:
        raise click.ClickException(f"{path} exists; use --force to replace it") from None
    except OSError as exc:
        raise click.ClickException(f"cannot write {path}: {exc.strerror or exc}") from None


@cli.command()
@click.option("--out", type=click.Path(dir_okay=False), help="Write the seed to this new file (mode 0600).")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def keygen(out: str | None, force: bool) -> None:
    """Make a new Ed25519 receipt key.

    Prints the 64-hex-char seed (the value RECEIPT_SIGNING_KEY_HEX takes) and its public key_id.
    With --out, writes the seed to a file only its owner can read and prints only the key_id.

    \b
    Example:
      aitbc-coord keygen --out /etc/aitbc-coordinator/receipt-signing.key
    """
    key = SigningKey.generate()
    if out is None:
        click.echo(f"seed: {key.encode().hex()}")
    else:
        write_secret(out, key.encode().hex() + "\n", force)
    click.echo(f"key_id: {key_id_of(key)}")


def archived_job_problems(job: Mapping[str, Any], key_ids: set[str]) -> list[str]:
    """Why the receipts of one archived job (an archive_line) do not verify: a signature, or a 1.1
    receipt's digest of a payload or result the line still holds. [] when all is well."""
    receipts = job.get("receipts")
    if not isinstance(job.get("job_id"), str):
        return ["its job_id is not a string"]
    if not isinstance(receipts, list):
        return ["receipts is not a list"]
    if job.get("state") == JobState.COMPLETED and job.get("pruned_at") is None and job.get("result") is None:
        return ["completed and not pruned, but it holds no result"]
    problems = []
    for receipt in receipts:
        if not isinstance(receipt, dict):
            problems.append("a receipt is not an object")
            continue
        if receipt.get("job_id") != job["job_id"]:
            problems.append(f"receipt {receipt.get('receipt_id')} is for job {receipt.get('job_id')}, not this line's")
            continue
        sig = receipt.get("signature")
        own = {sig["key_id"]} if isinstance(sig, dict) and isinstance(sig.get("key_id"), str) else set()
        report = verify_receipt(receipt, key_ids or own)
        if not report["valid"]:
            problems.append(f"receipt {receipt.get('receipt_id')}: {report['reason']}")
        meta = receipt.get("metadata") if isinstance(receipt.get("metadata"), dict) else {}
        for field, digest in (("payload", "job_payload_sha256"), ("result", "result_sha256")):
            value = job.get(field)
            if digest in meta and value is not None and canonical_digest(compact_json(value)) != meta[digest]:
                problems.append(f"receipt {receipt.get('receipt_id')}: the archived {field} does not match {digest}")
    return problems


def verify_archive(path: str | os.PathLike[str], key_ids: set[str]) -> None:
    """`aitbc-coord verify` of an archive file: every receipt of every job; exits 1 on the first problem."""
    jobs = receipts = 0
    try:
        for job in read_archive(path):
            problems = archived_job_problems(job, key_ids) if isinstance(job, dict) else ["a line is not an object"]
            if problems:
                click.echo(f"invalid: job {job.get('job_id') if isinstance(job, dict) else '?'}: {problems[0]}", err=True)
                sys.exit(1)
            jobs, receipts = jobs + 1, receipts + len(job["receipts"])
    except (OSError, ValueError, EOFError, RecursionError) as exc:
        raise click.ClickException(f"{path} is not a readable archive: {exc}") from None
    trust = "" if key_ids else " (signing keys not checked: pass --key-id)"
    click.echo(f"valid: {receipts} receipts of {jobs} archived jobs in {Path(path).name}{trust}")


# The receipt log from a client's side (`verify --log`, `audit`): everything fetched is checked here,
# nothing the log says is taken on trust but the key pinned for it. Both commands exit with one
# scheme, so that a monitor can tell a log at fault from a network glitch or its own mistake:
EXIT_FAILED = 1  # the log (or the receipt) failed a check
EXIT_TRANSPORT = 2  # the server could not be reached, or its answer could not be used
EXIT_LOCAL = 3  # a problem on this side: usage, a state or receipt file that cannot be read or written


class LogFault(Exception):
    """The log failed a check (bad signature, fork, shrunk tree, entries that do not make its root, a
    receipt it does not hold): exit status 1."""


class LogUnreachable(Exception):
    """The log could not be checked (unreachable, an answer that is not HTTP or not the JSON asked for,
    nothing to check yet): exit status 2."""


class LocalProblem(click.ClickException):
    """A problem on the auditor's side (a state file that cannot be read or written): exit status 3."""

    exit_code = EXIT_LOCAL


class LogCheckCommand(click.Command):
    """`verify` and `audit`: click's usage errors exit 3 (EXIT_LOCAL) instead of 2, which these
    commands use for a server that could not be asked."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as exc:
            exc.exit_code = EXIT_LOCAL
            raise

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:  # a BadParameter found while running (e.g. a malformed key)
            exc.exit_code = EXIT_LOCAL
            raise


def log_url_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A coordinator's base URL: http(s), a host, an optional path prefix; raises click.BadParameter."""
    if value is None:
        return None
    try:
        parts = urllib.parse.urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number up to 65535
    except ValueError as exc:
        raise click.BadParameter(f"{value!r} is not a URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise click.BadParameter(f"{value!r} is not a coordinator's URL (http:// or https://, a host, "
                                 f"no query), e.g. https://coord.example.org")
    return value


def http_opener() -> urllib.request.OpenerDirector:
    """urllib's opener for HTTP and HTTPS only (proxies from the environment, redirects), without
    its file:, ftp: and data: handlers: a redirect cannot make the client read a local file."""
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler(), urllib.request.HTTPHandler(), urllib.request.HTTPSHandler(),
                    urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPRedirectHandler(),
                    urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


def one_line(text: Any, limit: int = 200) -> str:
    """`text` as one line of at most about `limit` characters (what a server sent may hold anything)."""
    return " ".join(str(text).split())[:limit]


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """The wait a Retry-After header asks for, in seconds (RFC 9110 10.2.3: delay-seconds or an
    HTTP-date; `now` is Unix time), or None when there is none or it cannot be read."""
    if value is None:
        return None
    value = value.strip()
    if re.fullmatch(r"[0-9]{1,9}", value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return None if when.tzinfo is None else max(0.0, when.timestamp() - now)


class LogClient:
    """The public /v1/log routes of the coordinator at `base` (its URL), over HTTP. A 429 (or a 503 or
    425 that asks for a short wait) is retried after the wait its Retry-After asks for, a few times in
    a row: a first audit of a big log makes a request per LOG_ENTRIES_MAX leaves, and a receipt is
    under a checkpoint a second after it is issued."""

    MAX_ANSWER_BYTES = 64 << 20  # an entries page is a few MB; a server sending more is not answering
    RETRIES = 5  # waits in a row for one request
    # seconds: past these the answer is reported (503: a blip only; 425: a checkpoint due within seconds)
    LONGEST_WAIT = {429: 120.0, 503: 5.0, 425: 5.0}

    def __init__(self, base: str, timeout: float = 30.0, sleep: Callable[[float], None] = time.sleep) -> None:
        self.base, self.timeout, self.sleep, self.opener = base.rstrip("/"), timeout, sleep, http_opener()
        self.retry_after: str | None = None  # the last answer's Retry-After header

    def fetch(self, url: str) -> tuple[int, bytes, str | None]:
        """(status, body, Retry-After) of a GET; raises LogUnreachable for anything that is not a whole
        HTTP answer (refused, reset, timed out, not HTTP, shorter than its Content-Length, too large)."""
        request = urllib.request.Request(url, headers={"Accept": "application/json"})
        try:
            try:
                with self.opener.open(request, timeout=self.timeout) as response:
                    status, raw, headers = response.status, response.read(self.MAX_ANSWER_BYTES + 1), response.headers
            except urllib.error.HTTPError as exc:
                with exc:
                    status, raw, headers = exc.code, exc.read(self.MAX_ANSWER_BYTES + 1), exc.headers
        except (OSError, http.client.HTTPException, ValueError) as exc:  # URLError is an OSError
            reason = getattr(exc, "reason", None) or f"{type(exc).__name__} {exc}"
            raise LogUnreachable(f"cannot reach {self.base}: {one_line(reason)}") from None
        if len(raw) > self.MAX_ANSWER_BYTES:
            raise LogUnreachable(f"{self.base} sent an answer over {self.MAX_ANSWER_BYTES >> 20} MiB")
        length = headers.get("Content-Length", "")
        if length.isdecimal() and len(raw) < int(length):  # read(n) returns what came before the close
            raise LogUnreachable(f"{self.base} cut its answer short ({len(raw)} of {length} bytes)")
        return status, raw, headers.get("Retry-After")

    def get(self, path: str, ok: Sequence[int] = (200,), **params: Any) -> tuple[int, Any]:
        """(status, JSON) of a GET, after the waits a 429 or a short 503 asks for; raises LogUnreachable
        unless the status is one of `ok` and the answer is JSON."""
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        url, waits = f"{self.base}{path}{'?' + query if query else ''}", 0
        while True:
            status, raw, self.retry_after = self.fetch(url)
            wait = retry_after_seconds(self.retry_after, time.time())
            if wait is None or wait > self.LONGEST_WAIT.get(status, -1) or waits == self.RETRIES:
                break
            self.sleep(wait)
            waits += 1
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: nested past what json can parse
            data = raw
        if status not in ok:
            detail = data.get("detail") if isinstance(data, dict) else raw[:100].decode(errors="replace")
            after = f" (after {waits} waits as its Retry-After asked)" if waits else \
                f" (Retry-After: {one_line(self.retry_after)})" if self.retry_after is not None else ""
            raise LogUnreachable(f"GET {path}: {status} {one_line(detail)}{after}")
        if data is raw:
            raise LogUnreachable(f"GET {path}: {status} answer is not JSON: {one_line(raw[:100].decode(errors='replace'))}")
        return status, data

    def checkpoint(self) -> str:
        """The latest checkpoint's signed note."""
        _, data = self.get("/v1/log/checkpoint")
        return _field(data, "note", str)

    def log_keys(self) -> list[dict[str, Any]]:
        """The log keys GET /v1/receipts/keys lists."""
        _, data = self.get("/v1/receipts/keys")
        return [k for k in _field(data, "items", list) if isinstance(k, dict) and k.get("role") == "log"]

    def consistency(self, first: int, second: int) -> list[bytes]:
        _, data = self.get("/v1/log/proof/consistency", first=first, second=second)
        return _hashes(_field(data, "consistency_path", list))

    def entries(self, start: int, end: int) -> Iterable[tuple[int, bytes | None, bytes]]:
        """(index, leaf bytes or None once pruned, leaf hash) of leaves start..end; raises LogFault when
        they stop short or come out of order."""
        while start <= end:
            _, data = self.get("/v1/log/entries", start=start, end=end)
            items = _field(data, "items", list)
            if not items:
                raise LogFault(f"the log serves no entry {start}, yet its checkpoint has {end + 1} leaves")
            for item in items:
                if not isinstance(item, dict) or item.get("leaf_index") != start:
                    raise LogFault(f"the log served entries out of order where {start} was due")
                leaf = item.get("leaf")
                try:
                    yield start, None if leaf is None else b64_decode(leaf), _hashes([item.get("leaf_hash")])[0]
                except (TypeError, ValueError):
                    raise LogFault(f"entry {start} is not base64") from None
                start += 1


def _field(data: Any, name: str, kind: type) -> Any:
    if not isinstance(data, dict) or not isinstance(data.get(name), kind):
        raise LogUnreachable(f"the log answered without a {name}")
    return data[name]


def _hashes(items: Sequence[Any]) -> list[bytes]:
    """32-byte hashes from base64 strings; raises LogFault for anything else."""
    try:
        hashes = [b64_decode(item) for item in items]
    except (TypeError, ValueError):
        hashes = []
    if len(hashes) != len(items) or any(len(h) != 32 for h in hashes):
        raise LogFault("the log sent a hash that is not 32 bytes of base64")
    return hashes


def trusted_key(text: str, origin: str) -> NoteVerifier:
    """A log key given by an operator: a verifier key string, or a key_id (base64url public key, as
    GET /v1/receipts/keys lists it) named after `origin`. Raises ValueError."""
    if re.fullmatch(r"[A-Za-z0-9_-]{43}", text):
        public_key = b64url_decode(text)
        if len(public_key) == 32:
            return NoteVerifier(origin, public_key)
    return NoteVerifier.parse(text)


def log_key_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--key / --log-key: a verifier key or a key_id, checked when parsed (whose name it is comes later)."""
    if value is not None:
        try:
            trusted_key(value, "any-origin")
        except ValueError as exc:
            raise click.BadParameter(f"{exc}, or a key_id of 43 base64url characters") from None
    return value


def listed_key(client: LogClient, origin: str) -> NoteVerifier:
    """The active log key the log itself lists for `origin` (trust on first use)."""
    for key in client.log_keys():
        if key.get("status") == "active" and key.get("origin") == origin and isinstance(key.get("verifier_key"), str):
            with contextlib.suppress(ValueError):
                return NoteVerifier.parse(key["verifier_key"])
    raise LogUnreachable(f"the log lists no active key for {origin}; pass --key")


def open_checkpoint(note: str, verifier: NoteVerifier) -> Checkpoint:
    """The checkpoint in a note signed by `verifier`; raises LogFault (bad signature, malformed)."""
    try:
        return Checkpoint.parse(verifier.open(note))
    except ValueError as exc:
        raise LogFault(f"bad checkpoint: {exc}") from None


def read_state(path: str) -> dict[str, Any] | None:
    """An audit state file (None when there is none yet), checked whole as `audit` wrote it: the log's
    URL, the pinned key, a checkpoint signed by that key and the frontier of its tree. Raises
    LocalProblem when it cannot be read or is not such a file: the file is the auditor's, so nothing
    wrong in it is the log's fault."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise LocalProblem(f"cannot read the audit state {path}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        state = json.loads(text)
        if not isinstance(state, dict) or not isinstance(state.get("log"), str):
            raise ValueError("not a JSON object with the log's URL")
        if not isinstance(state["checkpoint"], str) or not isinstance(state["verifier_key"], str):
            raise ValueError("its checkpoint or key is not text")
        checkpoint = Checkpoint.parse(NoteVerifier.parse(state["verifier_key"]).open(state["checkpoint"]))
        frontier = saved_frontier(state)
        if len(frontier) != checkpoint.tree_size.bit_count() or frontier_root(frontier) != checkpoint.root_hash:
            raise ValueError("its frontier does not make its checkpoint's root")
    except KeyError as exc:
        raise LocalProblem(f"{path} is not an audit state file (no {exc})") from None
    except (ValueError, TypeError, AttributeError, RecursionError) as exc:
        raise LocalProblem(f"{path} is not an audit state file ({one_line(exc)})") from None
    return state


def saved_frontier(state: Mapping[str, Any]) -> list[bytes]:
    """The frontier an audit saved; raises ValueError or TypeError when it is not 32-byte base64 hashes."""
    try:
        frontier = [b64_decode(item) for item in state["frontier"]]
    except (TypeError, ValueError):
        raise ValueError("its frontier holds an entry that is not base64") from None
    if any(len(digest) != 32 for digest in frontier):
        raise ValueError("its frontier holds a hash that is not 32 bytes")
    return frontier


def state_directory(path: str) -> Path:
    """The directory a state file is written in; raises LocalProblem when there is none to write in
    (checked before an audit asks the log anything, so a long replay is not lost at the end)."""
    directory = Path(path).resolve().parent
    if not directory.is_dir():
        raise LocalProblem(f"cannot write the audit state {path}: no directory {directory}")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise LocalProblem(f"cannot write the audit state {path}: {directory} is not writable")
    return directory


def write_state(path: str, state: Mapping[str, Any]) -> None:
    """Replace the state file at once (a crash leaves the old one or the new one, never half of one);
    raises LocalProblem naming the file when it cannot be written."""
    state_directory(path)
    try:
        write_file_atomically(path, json.dumps(state, indent=1) + "\n", replace=True)
    except OSError as exc:
        raise LocalProblem(f"cannot write the audit state {path}: {exc.strerror or exc}") from None


def saved_checkpoint(state: Mapping[str, Any]) -> Checkpoint:
    """The checkpoint an audit saved (checked when it was saved, and by read_state), as it stands in the file."""
    return Checkpoint.parse(state["checkpoint"].rsplit("\n\n", 1)[0] + "\n")


def same_url(a: str, b: str) -> bool:
    """Whether two base URLs name the same server and path (case of scheme and host, a default port
    and a trailing slash aside)."""
    def key(url: str) -> tuple[str, str | None, int | None, str]:
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        return scheme, parts.hostname, parts.port or {"http": 80, "https": 443}.get(scheme), parts.path.rstrip("/")

    try:
        return key(a) == key(b)
    except ValueError:  # a port that is not a number, an unbalanced [
        return False


def check_state_is_of(client: LogClient, state: Mapping[str, Any], origin: str) -> None:
    """Check that an audit state is of the log at `client` (whose checkpoints carry `origin`). Raises
    LocalProblem when it is another log's (another origin, saved from another URL: the wrong file),
    LogFault when the log at the state's own URL now carries another origin (it changed its identity);
    a log with the state's origin at another URL (moved, or an alias) is the same log."""
    audited = saved_checkpoint(state).origin
    if origin == audited:
        return
    if not same_url(state["log"], client.base):
        raise LocalProblem(f"the --state file is the audit of {state['log']} (origin {audited}), not of "
                           f"{client.base} (origin {origin}): give this log's state file")
    raise LogFault(f"the log's origin is now {origin}, not {audited} as audited: a log keeps its origin for life")


def check_consistent(client: LogClient, old: Checkpoint, new: Checkpoint, what: str) -> None:
    """Raises LogFault unless `new` extends `old` (same origin, not smaller, a consistency proof)."""
    if new.origin != old.origin:
        raise LogFault(f"{what}: origin {new.origin} is not {old.origin}")
    if new.tree_size < old.tree_size:
        raise LogFault(f"{what}: the tree shrank from {old.tree_size} to {new.tree_size} leaves")
    path = [] if new.tree_size == old.tree_size else client.consistency(old.tree_size, new.tree_size)
    if not verify_consistency(old.tree_size, new.tree_size, old.root_hash, new.root_hash, path):
        raise LogFault(f"{what}: fork: the tree of {new.tree_size} leaves does not extend the one of "
                       f"{old.tree_size} (root {b64(old.root_hash)})")


class Replayed(NamedTuple):
    """What a replay saw: the entries replayed, how many of them came without their receipt (a leaf
    hash alone: pruned, or deleted), and the index of the first such."""

    entries: int
    bodiless: int
    first_bodiless: int | None


def replay(client: LogClient, frontier: list[bytes], start: int, checkpoint: Checkpoint,
           saved: Checkpoint | None = None) -> Replayed:
    """Extend `frontier` (the subtrees of the first `start` leaves) with the log's entries up to the
    checkpoint's size, checking each receipt against its leaf hash, the root against the checkpoint's
    and, passing `saved`'s size, against its root. Raises LogFault."""
    size, bodiless, first_bodiless = start, 0, None
    for index, leaf, digest in client.entries(start, checkpoint.tree_size - 1):
        if leaf is None:
            bodiless += 1
            first_bodiless = index if first_bodiless is None else first_bodiless
        elif leaf_hash(leaf) != digest:
            raise LogFault(f"entry {index}: its receipt does not hash to its leaf hash (rewritten)")
        frontier_append(frontier, size, digest)
        size += 1
        if saved is not None and size == saved.tree_size and frontier_root(frontier) != saved.root_hash:
            raise LogFault(f"the log's first {size} entries do not make the saved checkpoint's root (history rewritten)")
    if frontier_root(frontier) != checkpoint.root_hash:
        raise LogFault(f"the log's {size} entries do not make the root of its checkpoint")
    return Replayed(size - start, bodiless, first_bodiless)


def audit_log(client: LogClient, state: dict[str, Any] | None, key: str | None, full: bool,
              allow_pruned: bool = False) -> tuple[dict[str, Any], str]:
    """One audit (see `aitbc-coord audit`): the new state and a summary line; raises LogFault (also
    for entries served without their receipt, unless `allow_pruned`) or LogUnreachable."""
    note = client.checkpoint()
    origin = note.split("\n", 1)[0]
    if state:
        check_state_is_of(client, state, origin)
    pinned = NoteVerifier.parse(state["verifier_key"]) if state else None
    verifier = trusted_key(key, origin) if key else pinned or listed_key(client, origin)
    try:
        checkpoint = open_checkpoint(note, verifier)
    except LogFault as exc:
        hint = "; if the log's key was rotated on purpose, pass its new key with --key" if pinned and not key else ""
        raise LogFault(f"{exc}{hint}") from None
    saved = saved_checkpoint(state) if state else None
    if saved is not None:
        check_consistent(client, saved, checkpoint, "the latest checkpoint")
    if full or saved is None:
        frontier, start = [], 0
    else:
        frontier, start = saved_frontier(state), saved.tree_size  # checked by read_state
    replayed = replay(client, frontier, start, checkpoint, saved if full else None)
    if replayed.bodiless and not allow_pruned:
        raise LogFault(f"{replayed.bodiless} of the {replayed.entries} entries replayed came without their receipt "
                       f"(the first: entry {replayed.first_bodiless}): deleted, or pruned by receipt retention; "
                       f"if this log prunes receipts, audit it with --allow-pruned")
    new_state = {"log": client.base, "verifier_key": verifier.encode(), "checkpoint": note,
                 "frontier": [b64(h) for h in frontier]}
    grew = f"{checkpoint.tree_size - saved.tree_size} new since the saved checkpoint, consistent" if saved else \
        f"first audit, key {'given' if key else 'pinned from the log'}"
    pruned = f" ({replayed.bodiless} without their receipt: pruned)" if replayed.bodiless else ""
    summary = (f"ok: {checkpoint.origin}: {checkpoint.tree_size} leaves ({grew}); {replayed.entries} entries "
               f"replayed{pruned} and their root matches the checkpoint")
    return new_state, summary


def compare_audits(client: LogClient, mine: Mapping[str, Any], other: Mapping[str, Any]) -> str:
    """Check two auditors' saved checkpoints (each signed by its auditor's pinned key: read_state checked)
    against each other: the smaller extended by the larger, by a proof from the log at `client`.
    Raises LogFault (a split view), LogUnreachable, or LocalProblem (states of different logs, or not
    of this one)."""
    a, b = saved_checkpoint(mine), saved_checkpoint(other)
    if a.origin != b.origin:
        raise LocalProblem(f"the two state files are audits of different logs ({a.origin} and {b.origin})")
    check_state_is_of(client, mine, client.checkpoint().split("\n", 1)[0])
    small, big = sorted((a, b), key=lambda c: c.tree_size)
    check_consistent(client, small, big, "split view")
    return f"ok: the two saved checkpoints ({a.tree_size} and {b.tree_size} leaves of {a.origin}) are consistent"


def log_inclusion(client: LogClient, receipt: Mapping[str, Any], raw: bytes, key: str | None,
                  state: Mapping[str, Any] | None) -> str:
    """Check that the log holds `receipt` (as `raw`, the bytes of its file, or as the coordinator
    stores it) under a checkpoint signed by the trusted key, and, with an audit `state`, in the audited
    tree or one consistent with it. A summary; raises LogFault or LogUnreachable."""
    receipt_id = receipt.get("receipt_id")
    status, proof = client.get("/v1/log/proof/inclusion", ok=(200, 404, 425), receipt_id=receipt_id)
    if status == 404:
        raise LogFault(f"receipt {receipt_id} is not in the log")
    if status == 425:
        wait = retry_after_seconds(client.retry_after, time.time())
        raise LogUnreachable("the receipt is not under a checkpoint yet; try again "
                             + ("later" if wait is None else f"in {wait:g} s (the log's Retry-After)"))
    index, note = _field(proof, "leaf_index", int), _field(_field(proof, "checkpoint", dict), "note", str)
    origin = note.split("\n", 1)[0]
    if state:
        check_state_is_of(client, state, origin)
    saved = saved_checkpoint(state) if state else None
    if saved is not None and index < saved.tree_size:  # the audited tree itself: no signature to trust
        _, proof = client.get("/v1/log/proof/inclusion", receipt_id=receipt_id, tree_size=saved.tree_size)
        checkpoint, how = saved, "the audited checkpoint"
    else:
        verifier = trusted_key(key, origin) if key else NoteVerifier.parse(state["verifier_key"]) if state \
            else listed_key(client, origin)
        checkpoint = open_checkpoint(note, verifier)
        how = f"a checkpoint signed by {verifier.encode()}" + ("" if key or state else " (key as the log lists it)")
        if saved is not None:
            check_consistent(client, saved, checkpoint, "the log's checkpoint")
            how += ", consistent with the audited one"
    path = _hashes(_field(proof, "audit_path", list))
    if _field(proof, "tree_size", int) != checkpoint.tree_size or _field(proof, "leaf_index", int) != index:
        raise LogFault("the log's proof is for another tree or leaf than asked")
    leaves = {raw.strip(), stored_receipt_text(receipt).encode()}
    if not any(root_from_inclusion(index, checkpoint.tree_size, leaf_hash(leaf), path) == checkpoint.root_hash
               for leaf in leaves):
        raise LogFault(f"the log does not hold this receipt at leaf {index} (altered, or the log rewritten)")
    return f"in the receipt log {checkpoint.origin} as leaf {index} of {checkpoint.tree_size}, under {how}"


def read_receipt_file(receipt_file: Any) -> tuple[dict[str, Any], bytes]:
    """The receipt in a file (the receipt itself, or an answer holding it under "receipt") and the
    file's bytes; raises click.ClickException when it holds none."""
    raw = receipt_file.read()
    try:
        data = decode_json(raw)
    except Invalid:
        raise click.ClickException(f"{receipt_file.name} is not valid JSON") from None
    receipt = data["receipt"] if isinstance(data, dict) and isinstance(data.get("receipt"), dict) else data
    if not isinstance(receipt, dict):
        raise click.ClickException(f"{receipt_file.name} holds no receipt object")
    return receipt, raw


@cli.command("verify", cls=LogCheckCommand)
@click.argument("receipt_file", type=click.File("rb"))
@click.option("--key-id", "key_ids", multiple=True, help="A trusted signing key_id (repeatable).")
@click.option("--log", "log_url", metavar="URL", callback=log_url_option,
              help="Also check the receipt is in this coordinator's receipt log.")
@click.option("--log-key", metavar="KEY", callback=log_key_option, help="With --log: the log's trusted key (verifier key or key_id); "
              "default: the --state file's, else the one the log lists.")
@click.option("--state", "state_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="With --log: an `audit` state file; the receipt must be in the audited tree or a consistent later one.")
def verify_command(receipt_file: Any, key_ids: tuple[str, ...], log_url: str | None, log_key: str | None,
                   state_path: str | None) -> None:
    """Verify a receipt file, or every receipt of an archive file, offline; exit status 1 (with the
    reason) if one is invalid.

    Checks the signature and every attestation over the canonical bytes; with --key-id, the
    receipt must also be signed by one of those keys (see GET /v1/receipts/keys). With --log, the
    receipt must also be a leaf of that coordinator's receipt log under a checkpoint signed by the
    log's key (RFC 9162 inclusion proof). An archive file (jobs-YYYY-MM-DD.jsonl.gz, JSON Lines)
    also has each 1.1 receipt's payload and result digests checked against the archived payload
    and result.

    Exit status: 0 valid; 1 invalid (the receipt or the log failed a check); 2 the log could not be
    asked (unreachable, or an answer that is not the one asked for); 3 a local problem (usage, a
    file that cannot be read).

    \b
    Examples:
      curl -s -H "X-Api-Key: $KEY" http://127.0.0.1:8011/v1/jobs/$JOB/receipt > receipt.json
      aitbc-coord verify receipt.json --key-id TJvH0A9pkk0c3uQMNlCivLs3GR3i1T2TtfIbLT0n29Q
      aitbc-coord verify receipt.json --log http://127.0.0.1:8011 --state /var/lib/aitbc-audit/log.json
      aitbc-coord verify /var/lib/aitbc-coordinator/archive/jobs-2026-01-05.jsonl.gz
    """
    if receipt_file.name.endswith((".jsonl", ".jsonl.gz", ".gz")):
        if log_url is not None:
            raise click.UsageError("--log checks one receipt; an archive file is checked offline only")
        receipt_file.close()
        verify_archive(Path(receipt_file.name), set(key_ids))
        return
    if log_url is None and (log_key is not None or state_path is not None):
        raise click.UsageError("--log-key and --state only apply with --log URL")
    receipt, raw = read_receipt_file(receipt_file)
    sig = receipt.get("signature")
    own_key = sig.get("key_id") if isinstance(sig, dict) and isinstance(sig.get("key_id"), str) else None
    report = verify_receipt(receipt, set(key_ids) if key_ids else {own_key} - {None})
    if not report["valid"]:
        click.echo(f"invalid: {report['reason']}", err=True)
        sys.exit(EXIT_FAILED)
    trust = "" if key_ids else " (signing key not checked: pass --key-id)"
    logged = ""
    if log_url is not None:
        state = read_state(state_path) if state_path else None
        if state_path and state is None:
            raise LocalProblem(f"no audit state file at {state_path}")
        try:
            logged = "; " + log_inclusion(LogClient(log_url), receipt, raw, log_key, state)
        except LogFault as exc:
            click.echo(f"invalid: {exc}", err=True)
            sys.exit(EXIT_FAILED)
        except LogUnreachable as exc:
            click.echo(f"cannot check the log: {exc}", err=True)
            sys.exit(EXIT_TRANSPORT)
    click.echo(f"valid: receipt {receipt.get('receipt_id')} for job {receipt.get('job_id')} "
               f"signed by {own_key}{trust}{logged}")


@cli.command("audit", cls=LogCheckCommand)
@click.option("--log", "log_url", required=True, metavar="URL", callback=log_url_option,
              help="The coordinator whose receipt log to audit.")
@click.option("--state", "state_path", required=True, type=click.Path(dir_okay=False), metavar="FILE",
              help="Where the last audited checkpoint, the pinned key and the replayed tree's edge are kept.")
@click.option("--key", metavar="KEY", callback=log_key_option, help="The log's key (verifier key or key_id); pinned in FILE. Without it, "
              "the first audit pins the key the log lists.")
@click.option("--full", is_flag=True, help="Replay every entry from the first, not only those since the last audit.")
@click.option("--allow-pruned", is_flag=True, help="Accept entries served without their receipt (a log that prunes "
              "receipt bodies: RECEIPT_RETENTION_DAYS); they are counted. Without it they fail the audit.")
@click.option("--compare", "other_path", type=click.Path(dir_okay=False, exists=True), metavar="OTHER",
              help="Only check FILE's checkpoint against another auditor's state file (a split view shows here).")
def audit_command(log_url: str, state_path: str, key: str | None, full: bool, allow_pruned: bool,
                  other_path: str | None) -> None:
    """Audit a receipt log, as a monitor run from cron; exit status 1 with a one-line reason if it fails.

    Fetches the latest checkpoint and checks its signature against the pinned key; checks it is
    consistent with the checkpoint saved in FILE (RFC 9162 consistency proof: the log only grew);
    replays the entries since then (every receipt must hash to its leaf) and recomputes the root;
    then saves the new checkpoint. Fails on a bad signature (or a key other than the pinned one,
    until you pass the new one with --key), a fork, a shrunk tree, entries that do not make the
    checkpoint's root, or entries served without their receipt (a receipt deleted from the log's
    database looks so; unless --allow-pruned, for a log that prunes receipt bodies).

    Exit status: 0 ok; 1 the log failed a check; 2 the log could not be asked (unreachable, or an
    answer that is not the one asked for: try again later); 3 a local problem (usage, a state file
    that cannot be read or written).

    \b
    Examples:
      aitbc-coord audit --log https://coord.example.org --state /var/lib/aitbc-audit/coord.json
      aitbc-coord audit --log https://coord.example.org --state mine.json --compare theirs.json
    """
    state = read_state(state_path)
    if other_path is None:
        state_directory(state_path)
    client = LogClient(log_url)
    try:
        if other_path is not None:
            other = read_state(other_path)
            if state is None or other is None:
                raise LocalProblem("--compare needs two audit state files")
            click.echo(compare_audits(client, state, other))
            return
        new_state, summary = audit_log(client, state, key, full, allow_pruned)
    except LogFault as exc:
        click.echo(f"audit failed: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    except LogUnreachable as exc:
        click.echo(f"cannot audit: {exc}", err=True)
        sys.exit(EXIT_TRANSPORT)
    try:
        write_state(state_path, new_state)
    except LocalProblem as exc:
        exc.message += f" (the audit itself passed: {summary})"
        raise
    click.echo(summary)


@cli.command("archive")
@click.argument("dest", type=click.Path(file_okay=False))
@click.option("--before", type=click.DateTime(formats=["%Y-%m-%d"]),
              help="Export jobs that finished before this UTC day (default: today, so only whole days).")
@click.option("--db", "db_path", help="Database file, or a postgresql:// URL (DATABASE_URL, default ./coordinator.db).")
@click.option("--env-file", type=click.Path(dir_okay=False), help="Read settings from this file instead of ./.env.")
def archive_command(dest: str, before: Any, db_path: str | None, env_file: str | None) -> None:
    """Export finished jobs with their receipts to DEST, one file per UTC day, only reading the database.

    The files are those the server writes to ARCHIVE_DIR (jobs-YYYY-MM-DD.jsonl.gz, one job a
    line, receipts exactly as stored); a job whose payload was pruned has it as null. The database
    is opened read-only (it never writes, so it leaves no -wal/-shm files of its own behind); an
    existing file in DEST is never replaced (a second one gets a .2 suffix).

    \b
    Example:
      aitbc-coord archive /srv/exports/aitbc --before 2026-01-01 --db /var/lib/aitbc-coordinator/coordinator.db
    """
    settings = _settings_or_exit(env_file, db_path=db_path)
    cutoff = day_start(int(time.time() * 1000)) if before is None else \
        int(before.replace(tzinfo=datetime.timezone.utc).timestamp() * 1000)
    if settings.postgres_url is None and not Path(settings.db_path).is_file():
        raise click.ClickException(f"no database at {settings.db_path}")
    try:
        Path(dest).mkdir(mode=0o700, parents=True, exist_ok=True)
        conn, unchanged = (connect_reader(settings.postgres_url), lambda: None) if settings.postgres_url \
            else open_readonly(settings.db_path)
        try:
            written = export_finished(conn, Path(dest), cutoff, unchanged)
        finally:
            conn.close()
    except DatabaseChanged as exc:
        raise click.ClickException(f"archive to {dest} stopped: {exc}") from None
    except (OSError, *DB_ERRORS) as exc:
        raise click.ClickException(f"archive to {dest} failed: {exc}") from None
    jobs = sum(n for _, n in written)
    click.echo(f"{dest}: {jobs} jobs that finished before {day_name(cutoff)} in {len(written)} files")


@cli.command("backup")
@click.argument("dest", type=click.Path(dir_okay=False))
@click.option("--db", "db_path", help="Database file, or a postgresql:// URL (DATABASE_URL, default ./coordinator.db).")
@click.option("--env-file", type=click.Path(dir_okay=False), help="Read settings from this file instead of ./.env.")
def backup_command(dest: str, db_path: str | None, env_file: str | None) -> None:
    """Copy the database to the new file DEST, consistently, while the server runs.

    The copy is checked with PRAGMA integrity_check before it is put in place (mode 0600).

    \b
    Example:
      aitbc-coord backup --db /var/lib/aitbc-coordinator/coordinator.db /backups/coordinator-$(date +%F).db
    """
    settings = _settings_or_exit(env_file, db_path=db_path)
    if settings.postgres_url:
        raise click.ClickException("the database is PostgreSQL: back it up with its own tools (pg_dump, or base"
                                   " backups with WAL archiving; README, Running N instances)")
    try:
        done = backup(settings.db_path, dest)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{done['dest']}: {done['jobs']} jobs, schema version {done['schema_version']}, "
               f"{done['bytes']} bytes, integrity ok")


@cli.command("copy")
@click.option("--from", "source", required=True, metavar="sqlite:///PATH",
              help="The installation's SQLite database, as DATABASE_URL names it (sqlite:////abs/path.db).")
@click.option("--to", "target", required=True, metavar="postgresql://...",
              help="A new PostgreSQL database (a libpq URI; leave the password to PGPASSFILE).")
def copy_command(source: str, target: str) -> None:
    """Move an installation from SQLite into a new PostgreSQL database. Offline: stop the coordinator first.

    Creates the schema (as migrate does), then copies every table in one transaction with its keys as
    they are: receipts byte for byte (every signature verifies as before), the receipt log's leaves,
    subtrees and signed checkpoints (an auditor's saved checkpoint is consistent with the copy: no fork),
    and the kept totals as they were (they count history retention deleted). Before it commits it reads
    every table back and compares it with the source, checks the log's root on both sides and the totals
    against the rows (where retention deleted none of the rows a total counts), and prints the counts of
    both sides. Anything wrong is one line, exit 1, and nothing copied.

    Refused: a source that is in use or not at the current schema version (run `aitbc-coord migrate
    --db PATH` first), and a target that holds any job, receipt, miner, offer or bid. Run it as the role
    that owns (or will own) the tables: it disables their triggers while the rows go in. The SQLite file is
    only read: keep it as the rollback. Signing keys are not in the database: give the new instances the
    same key files, so that checkpoints go on being signed by the key auditors pinned.

    \b
    Example:
      systemctl stop aitbc-coordinator-api
      aitbc-coord copy --from sqlite:////var/lib/aitbc-coordinator/coordinator.db \\
                       --to 'postgresql://aitbc@/aitbc?host=/run/postgresql'
    """
    try:
        path = _parse_database_url(source)
    except ValueError as exc:
        raise click.ClickException(f"--from {exc}") from None
    if is_postgres_url(path):
        raise click.ClickException("--from must be the SQLite database to copy from (sqlite:///PATH)")
    if not is_postgres_url(target):
        raise click.ClickException("--to must be a PostgreSQL database (postgresql://user@host/dbname)")
    started = time.monotonic()
    try:
        report = copy_to_postgres(path, target)
    except (CopyFailed, ConfigError) as exc:
        raise click.ClickException(" ".join(str(exc).split())) from None  # psycopg's messages span lines
    width = max(len(name) for name in report.rows)
    click.echo(f"copied {path} into {url_without_password(target)} in {time.monotonic() - started:.1f} s;"
               f" rows read back equal to the source's, table by table:")
    click.echo(f"  {'table':<{width}}  {'sqlite':>10}  {'postgresql':>10}")
    for name, (before, after) in sorted(report.rows.items()):
        click.echo(f"  {name:<{width}}  {before:>10}  {after:>10}")
    click.echo(f"kept totals equal to what the rows imply: {', '.join(report.checked)}")
    if report.unchecked:
        click.echo(f"kept totals copied as they were, not checked: {'; '.join(report.unchecked)}")
    signed = "no checkpoint yet" if report.checkpoint is None else \
        f"the latest checkpoint, of {report.checkpoint} leaves, signs the copied tree's first {report.checkpoint}"
    click.echo(f"receipt log: {report.log_size} leaves, root {b64(report.log_root)} on both sides; {signed}")
    if Path(f"{path}.dev-signing-key").exists():
        click.echo(f"note: {path}.dev-signing-key (a development key) is not copied: on PostgreSQL, configure"
                   f" RECEIPT_SIGNING_KEY_FILE, or the log's checkpoints get a new key")
    click.echo(f"next: set DATABASE_URL to the PostgreSQL database and start the coordinator; keep {path}"
               f" as the rollback")


if __name__ == "__main__":
    cli()
