"""deploy/Dockerfile and .dockerignore, read offline (no Docker engine runs here), and
the image's HEALTHCHECK command run for real against a live `gateway run`."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.specifiers import SpecifierSet

from gateway.config.loader import CONFIG_ENV
from gateway.config.models import ServerSettings
from tests.deploy.support import (
    CONTAINER_CONFIG,
    REPO,
    VENV_BIN,
    DockerIgnore,
    Stage,
    copies,
    dockerfile_stages,
    env_of,
    exec_form,
    load_gateway_yaml,
    process,
    split_options,
    wait_http,
)
from tests.integration.harness import free_port

PINNED_PYTHON = re.compile(
    r"python:(?P<version>3\.(?P<minor>\d+)\.(?P<patch>\d+))-slim(?:-(?:bookworm|trixie))?"
    r"(?:@sha256:[0-9a-f]{64})?"
)


@pytest.fixture(scope="module")
def all_stages() -> list[Stage]:
    return dockerfile_stages()


@pytest.fixture(scope="module")
def final(all_stages: list[Stage]) -> Stage:
    return all_stages[-1]


@pytest.fixture(scope="module")
def container_server() -> ServerSettings:
    text = CONTAINER_CONFIG.read_text(encoding="utf-8")
    return load_gateway_yaml(text, str(CONTAINER_CONFIG)).server


def healthcheck(stage: Stage) -> tuple[dict[str, str], list[str]]:
    instruction = stage.last("HEALTHCHECK")
    assert instruction is not None, "no HEALTHCHECK"
    options, rest = split_options(instruction.args)
    keyword, _, command = rest.partition(" ")
    assert keyword.upper() == "CMD"
    argv = exec_form(command.strip())
    assert argv is not None, "HEALTHCHECK CMD should be the exec form (no shell needed)"
    return options, argv


def healthcheck_url(argv: list[str]) -> str:
    (url,) = re.findall(r"https?://[^'\"\s]+", " ".join(argv))
    return str(url)


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", value)
    assert match, value
    return float(match.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0}[match.group(2)]


def test_multi_stage_on_a_pinned_slim_python(all_stages: list[Stage]) -> None:
    assert len(all_stages) >= 2, "multi-stage: a builder and a runtime stage"
    names = {s.name for s in all_stages if s.name}
    for stage in all_stages:
        if stage.image in names:
            continue  # FROM an earlier stage
        match = PINNED_PYTHON.fullmatch(stage.image)
        assert match, f"{stage.image!r}: expected python:3.X.Y-slim-<debian>, a patch release"
    # The runtime stage is the slim base itself, not the builder with its build tools.
    assert PINNED_PYTHON.fullmatch(all_stages[-1].image)
    # Every stage on the same base: the venv built in one runs in the other.
    assert len({s.image for s in all_stages if s.image not in names}) == 1


def test_base_python_satisfies_the_projects_requires_python(all_stages: list[Stage]) -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    match = PINNED_PYTHON.fullmatch(all_stages[-1].image)
    assert match is not None
    assert match.group("version") in SpecifierSet(project["requires-python"])
    assert match.group("minor") == "11", "the project is developed and tested on 3.11"


def test_dependencies_come_from_the_projects_own_metadata(all_stages: list[Stage]) -> None:
    builder, runtime = all_stages[0], all_stages[-1]
    copied = {src for _, sources, _ in copies(builder) for src in sources}
    assert {"pyproject.toml", "gateway/"} <= copied
    assert "README.md" in copied, "pyproject's readme: the wheel cannot be built without it"
    runs = " ".join(i.args for i in builder.all("RUN"))
    assert re.search(r"pip wheel .*--no-deps .*\s\.(\s|$)", runs), "a wheel of the project"
    # The wheel is installed, and pip resolves its dependencies from its metadata: no
    # requirements file, no package named by hand.
    installs = re.findall(r"pip install ([^&]+)", runs)
    assert installs and all(i.split() == ["/wheels/gateway-*.whl"] for i in installs), installs
    assert "requirements" not in runs
    # The runtime gets the virtualenv only, not the source tree.
    runtime_copies = copies(runtime)
    assert (
        {"from": builder.name or ""},
        ["/opt/venv"],
        "/opt/venv",
    ) in runtime_copies
    assert not any(
        src.startswith("gateway") or src == "."
        for opts, sources, _ in runtime_copies
        if "from" not in opts
        for src in sources
    )
    assert env_of(runtime)["PATH"].startswith("/opt/venv/bin:")


def test_runs_as_a_non_root_user(final: Stage) -> None:
    user = final.last("USER")
    assert user is not None, "no USER: the container would run as root"
    uid, _, gid = user.args.partition(":")
    assert uid.isdigit() and int(uid) != 0, "a numeric uid, so runAsNonRoot can verify it"
    assert not gid or (gid.isdigit() and int(gid) != 0)
    runs = " ".join(i.args for i in final.all("RUN"))
    assert re.search(rf"useradd .*--uid {uid}\b", runs), "the uid exists in /etc/passwd"
    # USER comes after every RUN, so nothing after it runs as root.
    last_run = max(i.line for i in final.all("RUN"))
    assert user.line > last_run


def test_config_path_is_documented_and_baked_in(final: Stage) -> None:
    env = env_of(final)
    assert CONFIG_ENV == "GATEWAY_CONFIG"
    assert env[CONFIG_ENV] == "/etc/gateway/gateway.yaml"
    assert ({}, ["deploy/gateway.container.yaml"], env[CONFIG_ENV]) in copies(final)


def test_exposes_the_data_and_admin_ports_of_its_config(
    final: Stage, container_server: ServerSettings
) -> None:
    exposed = {int(port.split("/")[0]) for i in final.all("EXPOSE") for port in i.args.split()}
    assert exposed == {container_server.port, container_server.admin_port}
    # In a container the admin listener must not keep the loopback-only default.
    assert ServerSettings().admin_host == "127.0.0.1"
    assert container_server.admin_host == "0.0.0.0"
    assert container_server.host == "0.0.0.0"


def test_entrypoint_is_gateway_run(final: Stage) -> None:
    entrypoint, cmd = final.last("ENTRYPOINT"), final.last("CMD")
    assert entrypoint is not None and cmd is not None
    argv = (exec_form(entrypoint.args) or []) + (exec_form(cmd.args) or [])
    assert argv == ["gateway", "run"], "exec form, so the gateway is PID 1 and gets SIGTERM"
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "scripts"
    ]
    assert scripts["gateway"] == "gateway.cli:main"
    stop = final.last("STOPSIGNAL")
    assert stop is None or stop.args == "SIGTERM", "SIGTERM is the signal that drains"


def test_healthcheck_polls_healthz_on_the_admin_port(
    final: Stage, container_server: ServerSettings
) -> None:
    options, argv = healthcheck(final)
    assert argv[0] == "python", "slim has no curl: Python's urllib"
    url = urlsplit(healthcheck_url(argv))
    assert url.hostname in ("127.0.0.1", "localhost")
    assert url.port == container_server.admin_port
    assert url.path == "/healthz"
    # urlopen's own timeout is shorter than Docker's, so a hung check fails cleanly.
    (inner,) = re.findall(r"timeout=(\d+(?:\.\d+)?)", " ".join(argv))
    assert float(inner) < seconds(options["timeout"])
    assert {"interval", "timeout", "retries"} <= set(options)


def test_healthcheck_command_passes_on_a_live_gateway_and_fails_without_one(
    final: Stage, container_server: ServerSettings, tmp_path: Path
) -> None:
    """The HEALTHCHECK's own command, run against a real `gateway run` whose server
    settings are the container config's (ports moved to free ones on 127.0.0.1)."""
    _, argv = healthcheck(final)
    port, admin_port = free_port(), free_port()
    server = dict(yaml.safe_load(CONTAINER_CONFIG.read_text(encoding="utf-8"))["server"])
    server.update(
        host="127.0.0.1", port=port, admin_host="127.0.0.1", admin_port=admin_port, watch=False
    )
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({"server": server}), encoding="utf-8")
    check = [sys.executable] + [
        a.replace(f":{container_server.admin_port}/", f":{admin_port}/") for a in argv[1:]
    ]

    with process([str(VENV_BIN / "gateway"), "run", "-c", str(config)]) as gateway:
        assert wait_http(f"http://127.0.0.1:{admin_port}/readyz") == 200
        passed = subprocess.run(check, capture_output=True, timeout=10)
        assert passed.returncode == 0, passed.stderr
        gateway.terminate()
        assert gateway.wait(timeout=15) == 0

    failed = subprocess.run(check, capture_output=True, timeout=10)
    assert failed.returncode != 0
    assert b"Connection refused" in failed.stderr


@pytest.fixture(scope="module")
def ignore() -> DockerIgnore:
    return DockerIgnore((REPO / ".dockerignore").read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        ".pytest_cache/v/cache/nodeids",
        ".ruff_cache/CACHEDIR.TAG",
        ".mypy_cache/3.11/gateway/app.data.json",
        "gateway/__pycache__/app.cpython-311.pyc",
        "gateway/policies/__pycache__/retry.cpython-311.pyc",
        "gateway.egg-info/PKG-INFO",
        "load/results/20261125-132019/report.md",
        "tests/unit/test_cli.py",
        "deploy/kubernetes/deployment.yaml",
        ".env",
    ],
)
def test_dockerignore_keeps_out(ignore: DockerIgnore, path: str) -> None:
    assert ignore.excluded(path)


def test_dockerignore_keeps_everything_the_build_copies(
    ignore: DockerIgnore, all_stages: list[Stage]
) -> None:
    sources = [
        src
        for stage in all_stages
        for opts, srcs, _ in copies(stage)
        if "from" not in opts
        for src in srcs
    ]
    assert sources
    for source in sources:
        path = REPO / source
        assert path.exists(), source
        files = [p for p in path.rglob("*.py")] if path.is_dir() else [path]
        for file in files:
            relative = file.relative_to(REPO).as_posix()
            if "__pycache__" not in relative:
                assert not ignore.excluded(relative), f"{relative} is copied but ignored"
