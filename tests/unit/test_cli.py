"""The `gateway` command line: `check`, `run`, `--help`, `--version`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import gateway.server
from gateway import __version__
from gateway.cli import main

GOOD = """\
upstreams:
  users: {targets: [http://127.0.0.1:9001]}
routes:
  - {name: users, path: "/users/{id}", methods: [GET, PUT], upstream: users, rewrite: "/v1/{id}"}
  - {name: all, path: /, host: api.example, upstream: users}
"""

BAD = """\
server:
  prot: 8080
routes:
  - {name: users, path: /users, upstream: nobody}
"""


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("GATEWAY_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return str(path)


def test_check_prints_the_route_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", write(tmp_path, GOOD)]) == 0
    out, err = capsys.readouterr()
    assert out == (
        "NAME   METHODS  HOST         PATH         TARGET\n"
        "users  GET,PUT  *            /users/{id}  users -> /v1/{id}\n"
        "all    *        api.example  /            users -> /\n"
    )
    assert err == ""


def test_check_prints_every_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, BAD)
    assert main(["check", path]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"{path}:2:3: server.prot: Extra inputs are not permitted",
        f"{path}:4:43: routes.0.upstream: unknown upstream 'nobody' (no upstreams are defined)",
    ]


def test_check_of_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(tmp_path / "nope.yaml")]) == 1
    assert "cannot read config" in capsys.readouterr().err


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: gateway" in out
    assert "examples:" in out
    assert "GATEWAY_SERVER__PORT" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"gateway {__version__}"


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: gateway" in capsys.readouterr().err


def test_bad_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--workers", "0"]) == 2
    assert "--workers: must be between 1 and 64" in capsys.readouterr().err


class FakeRun:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int | None, int | None]] = []

    def __call__(self, config_path: str, *, workers: int | None, port: int | None) -> int:
        self.calls.append((config_path, workers, port))
        return 3


@pytest.fixture
def fake_run(monkeypatch: pytest.MonkeyPatch) -> FakeRun:
    fake = FakeRun()
    monkeypatch.setattr(gateway.server, "run", fake)
    return fake


def test_run_passes_options_to_the_server(fake_run: FakeRun) -> None:
    assert main(["run", "-c", "my.yaml", "--workers", "4", "--port", "9000"]) == 3
    assert fake_run.calls == [("my.yaml", 4, 9000)]


def test_run_falls_back_to_environment_then_default(
    fake_run: FakeRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["run"]) == 3
    monkeypatch.setenv("GATEWAY_CONFIG", "env.yaml")
    assert main(["run"]) == 3
    assert fake_run.calls == [("config/gateway.yaml", None, None), ("env.yaml", None, None)]
