"""Offline readers for the files under deploy/: a Dockerfile parser, Docker's
.dockerignore matching, Kubernetes manifests and quantities, the container configs
loaded through the gateway's own loader, and a `gateway run` for the few checks that
need a real process (on 127.0.0.1, free ports)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gateway.config.loader import load_config_text
from gateway.config.models import GatewaySettings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
DOCKERFILE = DEPLOY / "Dockerfile"
CONTAINER_CONFIG = DEPLOY / "gateway.container.yaml"
VENV_BIN = Path(sys.executable).parent


# --- Dockerfile ----------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY...
    args: str  # the arguments, continuation lines joined
    line: int  # where it starts, 1-based


@dataclass
class Stage:
    image: str  # what FROM names, build ARGs substituted
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions in order. Comment lines (parser directives included) and blank
    lines are dropped, also between continuation lines, as Docker does."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        joined = " ".join(p for p in pending if p)
        pending = []
        keyword, _, args = joined.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
    assert not pending, "the Dockerfile ends inside a continuation line"
    return instructions


def substitute(text: str, variables: dict[str, str]) -> str:
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return variables.get(name, "")

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)", value, text)


def stages(instructions: list[Instruction]) -> list[Stage]:
    """The build stages; global ARGs (before the first FROM) resolved in FROM lines."""
    global_args: dict[str, str] = {}
    result: list[Stage] = []
    for instruction in instructions:
        if instruction.keyword == "ARG" and not result:
            name, _, default = instruction.args.partition("=")
            global_args[name.strip()] = default.strip().strip('"')
        elif instruction.keyword == "FROM":
            words = [w for w in instruction.args.split() if not w.startswith("--")]
            image = substitute(words[0], global_args)
            alias = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            result.append(Stage(image=image, name=alias))
        elif result:
            result[-1].instructions.append(instruction)
    return result


def exec_form(args: str) -> list[str] | None:
    """The JSON array of an exec-form instruction, or None for the shell form."""
    if not args.startswith("["):
        return None
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def split_options(args: str) -> tuple[dict[str, str], str]:
    """`--name=value` options leading an instruction, and the rest."""
    options: dict[str, str] = {}
    rest = args
    while rest.startswith("--"):
        option, _, rest = rest.partition(" ")
        name, _, value = option[2:].partition("=")
        options[name] = value
        rest = rest.strip()
    return options, rest


def env_of(stage: Stage) -> dict[str, str]:
    """ENV of one stage (the `KEY=VALUE ...` form), later values winning."""
    env: dict[str, str] = {}
    for instruction in stage.all("ENV"):
        for word in shlex.split(instruction.args):
            name, sep, value = word.partition("=")
            assert sep, f"line {instruction.line}: use ENV KEY=VALUE"
            env[name] = value  # as written: `$PATH` stays `$PATH`
    return env


def copies(stage: Stage) -> list[tuple[dict[str, str], list[str], str]]:
    """Each COPY of a stage as (options, sources, destination)."""
    result = []
    for instruction in stage.all("COPY"):
        options, rest = split_options(instruction.args)
        words = exec_form(rest) or shlex.split(rest)
        result.append((options, words[:-1], words[-1]))
    return result


def dockerfile_stages() -> list[Stage]:
    return stages(parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8")))


# --- .dockerignore -------------------------------------------------------------------


class DockerIgnore:
    """Docker's rules: patterns are matched, in order, against a path relative to the
    context and against each of its parent directories; the last matching pattern
    decides (a `!` pattern re-includes). `*` and `?` stay within one path segment,
    `**` spans any number of them."""

    def __init__(self, text: str) -> None:
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negated = line.startswith("!")
            pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
            self.rules.append((negated, re.compile(self._regex(pattern))))

    @staticmethod
    def _regex(pattern: str) -> str:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return out + r"\Z"

    def excluded(self, path: str) -> bool:
        parts = path.strip("/").split("/")
        candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        result = False
        for negated, regex in self.rules:
            if any(regex.match(c) for c in candidates):
                result = not negated
        return result


# --- Kubernetes ----------------------------------------------------------------------


def kustomization() -> dict[str, Any]:
    data = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def manifests() -> list[tuple[str, dict[str, Any]]]:
    """(file name, document) for every resource the kustomization lists."""
    result = []
    for name in kustomization()["resources"]:
        text = (KUBERNETES / name).read_text(encoding="utf-8")
        result += [(name, doc) for doc in yaml.safe_load_all(text) if doc is not None]
    return result


def find(kind: str, name: str) -> dict[str, Any]:
    matches = [
        doc for _, doc in manifests() if doc["kind"] == kind and doc["metadata"]["name"] == name
    ]
    assert len(matches) == 1, f"expected one {kind} {name!r}, found {len(matches)}"
    return matches[0]


def container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [
        c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name
    ]
    assert isinstance(found, dict)
    return found


def container_port(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port, a number or a container port's name, as a number."""
    if isinstance(port, int):
        assert port in [p["containerPort"] for p in container["ports"]], port
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return int(number)


_SUFFIX = {
    "m": 1e-3,
    "": 1.0,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "Ki": 2.0**10,
    "Mi": 2.0**20,
    "Gi": 2.0**30,
}


def quantity(value: str | int | float) -> float:
    """A Kubernetes resource quantity ("500m", "1", "256Mi") as a number."""
    match = re.fullmatch(r"([0-9.]+)(m|k|M|G|Ki|Mi|Gi)?", str(value))
    assert match, f"not a quantity this test knows: {value!r}"
    return float(match.group(1)) * _SUFFIX[match.group(2) or ""]


# --- gateway configs -----------------------------------------------------------------


@contextlib.contextmanager
def clean_environment(**values: str) -> Iterator[None]:
    """No GATEWAY_* overrides from the caller's environment leak into a config load;
    `values` are set for its duration."""
    saved = dict(os.environ)
    try:
        for name in [n for n in os.environ if n.startswith("GATEWAY_")]:
            del os.environ[name]
        os.environ.update(values)
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def load_gateway_yaml(text: str, label: str, **env: str) -> GatewaySettings:
    """Validate like `gateway check` does (schema, references, `${VAR}`), offline."""
    with clean_environment(**env):
        return load_config_text(text, label)


def configmap_gateway_yaml() -> str:
    text = find("ConfigMap", "gateway-config")["data"]["gateway.yaml"]
    assert isinstance(text, str)
    return text


# --- processes -----------------------------------------------------------------------


def wait_http(url: str, within: float = 15.0) -> int:
    """The status of the first answer from `url` (an HTTP error status included)."""
    deadline = time.monotonic() + within
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@contextlib.contextmanager
def process(argv: list[str], env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[str]]:
    """A child process in its own session, stopped (TERM, then KILL) on exit."""
    proc = subprocess.Popen(
        argv,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()
