"""deploy/systemd/gateway.service: read with configparser for what the gateway needs,
then checked by systemd's own `systemd-analyze verify` and `security` where present."""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from gateway.config.models import ServerSettings
from tests.deploy.support import DEPLOY, VENV_BIN

UNIT = DEPLOY / "systemd" / "gateway.service"
INSTALLED_GATEWAY = "/opt/gateway/venv/bin/gateway"


@pytest.fixture(scope="module")
def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(UNIT.read_text(encoding="utf-8"))
    return parser


def all_values(key: str) -> list[str]:
    """Every value of a key that may repeat (configparser keeps the last)."""
    pattern = re.compile(rf"^{re.escape(key)}=(.*)$")
    lines = UNIT.read_text(encoding="utf-8").splitlines()
    return [m.group(1) for line in lines if (m := pattern.match(line))]


def timespan(value: str) -> float:
    total = 0.0
    for number, unit in re.findall(r"(\d+)\s*(ms|s|min|m|h)?", value):
        total += int(number) * {"ms": 0.001, "s": 1, "": 1, "min": 60, "m": 60, "h": 3600}[unit]
    return total


def test_sections(unit: configparser.ConfigParser) -> None:
    assert unit.sections() == ["Unit", "Service", "Install"]
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    assert "network-online.target" in unit["Unit"]["After"]


def test_runs_gateway_run_with_the_documented_config(unit: configparser.ConfigParser) -> None:
    service = unit["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[:2] == [INSTALLED_GATEWAY, "run"]
    assert "GATEWAY_CONFIG=/etc/gateway/gateway.yaml" in all_values("Environment")
    # A config that does not validate stops the start, with every error in the journal.
    assert shlex.split(service["ExecStartPre"])[:2] == [INSTALLED_GATEWAY, "check"]


def test_restart_reload_and_stop(unit: configparser.ConfigParser) -> None:
    service = unit["Service"]
    assert service["Restart"] == "on-failure"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["KillSignal"] == "SIGTERM"
    # SIGTERM to the main process: with --workers it drains its workers itself.
    assert service["KillMode"] == "mixed"
    assert timespan(service["TimeoutStopSec"]) > ServerSettings().drain_timeout
    assert int(service["LimitNOFILE"]) >= 65536


def test_dedicated_user_and_hardening(unit: configparser.ConfigParser) -> None:
    service = unit["Service"]
    assert service["User"] not in ("", "root", "0")
    assert service["Group"] == service["User"]
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",  # --workers keeps its metrics in a temp dir: /tmp must be writable
        "PrivateDevices": "yes",
        "CapabilityBoundingSet": "",
        "RestrictNamespaces": "yes",
    }
    assert {k: service.get(k) for k in expected} == expected
    families = set(service["RestrictAddressFamilies"].split())
    assert {"AF_INET", "AF_INET6"} <= families
    # Python's cffi (cryptography, for JWTs) needs writable+executable memory.
    assert "MemoryDenyWriteExecute" not in service


def runnable_copy(tmp_path: Path) -> Path:
    """The unit with the installed path pointed at this machine's gateway, so that
    systemd's checks of the executables pass and only the unit itself is judged."""
    gateway = VENV_BIN / "gateway"
    assert gateway.exists()
    text = UNIT.read_text(encoding="utf-8").replace(INSTALLED_GATEWAY, str(gateway))
    copy = tmp_path / "gateway.service"
    copy.write_text(text, encoding="utf-8")
    return copy


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_accepts_every_directive(tmp_path: Path) -> None:
    copy = runnable_copy(tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "verify", copy.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    # Unknown keys and bad values are only warnings to systemd: none are allowed here.
    problems = [line for line in result.stderr.splitlines() if copy.name in line]
    assert problems == []


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_rates_the_sandbox_as_well_exposed_at_most(tmp_path: Path) -> None:
    copy = runnable_copy(tmp_path)
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=25", str(copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Exposure runs from 0.0 (locked down) to 10.0 (unprotected); 2.5 and below is
    # the band systemd itself calls OK.
    (overall,) = re.findall(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert float(overall) <= 2.5, result.stdout
    assert result.returncode == 0, result.stderr
