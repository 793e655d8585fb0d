"""Packaging and deployment: the wheel from an empty directory, and the systemd unit."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest

import aitbc_coord as ac

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_wheel_installs_and_runs_from_an_empty_directory(tmp_path: Path) -> None:
    dist, venv, empty = tmp_path / "dist", tmp_path / "venv", tmp_path / "empty"
    empty.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(ROOT)],
                   check=True, capture_output=True)
    wheel = next(dist.glob("aitbc_coordinator-*.whl"))
    assert {"aitbc_coord.py", "aitbc_coord_schema.sql"} <= set(zipfile.ZipFile(wheel).namelist())
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], check=True, capture_output=True)
    exe = str(venv / "bin" / "aitbc-coord")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([exe, *args], cwd=empty, capture_output=True, text=True, timeout=120,
                              env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})

    assert run("--version").returncode == 0
    migrated = run("migrate")
    assert migrated.returncode == 0 and f"schema version 0 -> {ac.SCHEMA_VERSION}" in migrated.stdout
    checked = run("check")
    assert checked.returncode == 0 and "9 steps passed" in checked.stdout, checked.stderr
    proc = subprocess.Popen([exe, "serve", "--port", "0"], cwd=empty, stderr=subprocess.PIPE, text=True,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    try:
        line = ""
        while "listening on" not in line:
            line = proc.stderr.readline()
            assert line, "serve exited"
        url = re.search(r"http://[\d.]+:\d+", line).group(0)
        deadline = time.monotonic() + 20
        while True:
            try:
                assert httpx.get(url + "/v1/health").json()["db"] == "ok"
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        proc.stderr.close()
    assert (empty / "coordinator.db").is_file()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed (Debian: apt-get install systemd)")
def test_the_systemd_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "aitbc-coord"  # verify wants ExecStart to exist: point it at ours
    unit = (ROOT / "aitbc-coordinator-api.service").read_text()
    assert "/opt/aitbc-coordinator/bin/aitbc-coord" in unit
    local = tmp_path / "aitbc-coordinator-api.service"
    local.write_text(unit.replace("/opt/aitbc-coordinator/bin/aitbc-coord", str(exe)))
    verify = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(local)],
                              capture_output=True, text=True, timeout=60)
    score = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", security.stdout)
    assert score is not None, security.stdout + security.stderr
    assert float(score.group(1)) <= 2.0
    for needed in ("LoadCredential=", "RECEIPT_SIGNING_KEY_FILE=%d/", "StateDirectory=", "Restart=on-failure",
                   "EnvironmentFile=", "NoNewPrivileges=yes", "DynamicUser=yes"):
        assert needed in unit


def systemd_environment_file(text: str) -> dict[str, str]:
    """Assignments as systemd's EnvironmentFile= reads them: a line is KEY=VALUE, one starting with # or ;
    is a comment, and nothing else is: a trailing "# note" stays part of the value (systemd issue 12527)."""
    values = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";")):
            key, sep, value = line.partition("=")
            assert sep, f"not KEY=VALUE: {line!r}"
            values[key.strip()] = value.strip()
    return values


def unit_environment() -> dict[str, str]:
    """The unit's Environment=NAME=VALUE lines."""
    unit = (ROOT / "aitbc-coordinator-api.service").read_text()
    return dict(m.groups() for m in re.finditer(r"^Environment=([A-Z_]+)=(.*)$", unit, re.MULTILINE))


def test_env_example_read_as_systemd_does_is_accepted_and_carries_no_comment_in_a_value(tmp_path: Path) -> None:
    """README installs .env.example as the unit's EnvironmentFile=; `LOG_LEVEL=info   # debug, ...` once
    made serve refuse to start."""
    values = systemd_environment_file((ROOT / ".env.example").read_text())
    assert values, "the example assigns nothing"
    assert not [name for name, value in values.items() if "#" in value]
    assert set(values) <= set(ac.ENV_VARS) | {f"{role.upper()}_API_KEYS" for role in ac.ROLES}
    settings = ac.Settings.load({**values, "DATABASE_URL": f"sqlite:///{tmp_path}/c.db"}, dotenv=False)
    assert settings.log_level == "info"  # the default kept: the line is commented out
    # README: ".env.example lists every variable", each commented out as `# NAME=example` unless set
    text = (ROOT / ".env.example").read_text()
    named = {*ac.ENV_VARS, *(f"{role.upper()}_API_KEYS{end}" for role in ac.ROLES for end in ("", "_FILE")),
             *(f"{key}{end}" for key in ("RECEIPT_SIGNING_KEY", "RECEIPT_ATTESTATION_KEY", "RECEIPT_LOG_SIGNING_KEY")
               for end in ("_HEX", "_FILE"))}
    assert not [name for name in named if not re.search(rf"^(# )?{name}=", text, re.MULTILINE)]


def test_env_example_never_cancels_what_the_systemd_unit_sets() -> None:
    """EnvironmentFile= values, even empty ones, override the unit's Environment= lines: an empty
    RECEIPT_SIGNING_KEY_FILE= there once left a production service issuing no receipts."""
    unit = unit_environment()
    assert {"DATABASE_URL", "RECEIPT_SIGNING_KEY_FILE"} <= set(unit)
    values = systemd_environment_file((ROOT / ".env.example").read_text())
    assert not set(values) & set(unit)
    assert not [name for name, value in values.items() if value == ""]  # an empty value is never a default
    effective = {**unit, **values}  # systemd: the file wins
    assert {name: effective[name] for name in unit} == unit
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Running under systemd"):]
    assert all(f"`{name}`" in section[:2000] for name in unit)
