"""Reading the config file: YAML with line numbers, `${VAR}` interpolation, validation.

Every problem, whether a YAML syntax error, a field pydantic rejects or a route
naming an unknown upstream, comes out as one line an editor can jump to:

    gateway.yaml:12:5: routes.2.upstream: unknown upstream 'user' (known: orders, users)

and a file with several problems reports all of them in one run, so an operator
fixes the whole file at once rather than one error per attempt.

The YAML is composed to a node tree rather than loaded, because only nodes know
where they came from. The tree is turned into plain Python values by `_Builder`,
which records the position of every value (and of every mapping key, so an
unknown key points at the key itself) under its path, e.g.
`("upstreams", "users", "targets", 0)`. Pydantic reports errors by the same path.
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails
from pydantic_settings import SettingsError

from gateway.config.models import GatewaySettings

try:  # libyaml is several times faster, and marks are the same
    from yaml import CSafeLoader as _Loader
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml import SafeLoader as _Loader  # type: ignore[assignment]

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "ConfigError",
    "Problem",
    "cross_check",
    "load_config",
    "load_config_text",
    "resolve_config_path",
    "route_table",
]

DEFAULT_CONFIG_PATH = "config/gateway.yaml"
CONFIG_ENV = "GATEWAY_CONFIG"
ENV_PREFIX = "GATEWAY_"
ENV_DELIMITER = "__"

Path = tuple[str | int, ...]
Position = tuple[int, int]  # 1-based line and column

_MERGE_TAG = "tag:yaml.org,2002:merge"
# Aliases share nodes, so a few lines of YAML can expand into billions of values.
_MAX_NODES = 1_000_000
# `$${` is a literal `${`; otherwise `${NAME}` or `${NAME:-default}`.
_REFERENCE = re.compile(r"\$(\$\{)|\$\{([^}]*)(\}?)")
_NAME = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)
# How pydantic tags the branch of a union in an error's `loc`: "literal['memory']",
# "RedisStore", "constrained-int", "function-after[...]". Field names never look so.
_FIELD_NAME = re.compile(r"[a-z_][a-z0-9_]*")
_PRIMITIVE_TAGS = frozenset({"int", "str", "float", "bool", "none", "bytes", "list", "dict"})
_PYDANTIC_PREFIXES = ("Value error, ", "Assertion failed, ")


class ConfigError(Exception):
    """The config cannot be used. `errors` holds one `FILE:LINE:COL: path: message` line each."""

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


class Problem(NamedTuple):
    """One thing wrong with the config, before it is given a file position."""

    path: Path
    message: str
    at_key: bool = False  # point at the mapping key rather than its value


@dataclass
class _Document:
    """Plain values plus where each one was written."""

    data: Any
    values: dict[Path, Position] = field(default_factory=dict)
    keys: dict[Path, Position] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)


def resolve_config_path(cli_value: str | None) -> str:
    """The config file to use: `-c`, else `$GATEWAY_CONFIG`, else `config/gateway.yaml`."""
    if cli_value:
        return cli_value
    return os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH


def load_config(path: str) -> GatewaySettings:
    """Read, interpolate and validate the config file; raise `ConfigError` listing every problem."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError([_format(path, (1, 1), (), f"cannot read config: {reason}")]) from exc
    return load_config_text(text, path)


def load_config_text(text: str, filename: str) -> GatewaySettings:
    """Like `load_config`, for YAML already in hand; `filename` only labels the errors."""
    try:
        root = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        raise ConfigError([_syntax_error(filename, exc)]) from exc
    except yaml.YAMLError as exc:  # e.g. a control character in the stream; no mark
        raise ConfigError([_format(filename, (1, 1), (), f"invalid YAML: {exc}")]) from exc

    doc = _Builder(os.environ).build(root)
    if not isinstance(doc.data, dict):
        kind = "a list" if isinstance(doc.data, list) else f"the value {doc.data!r}"
        message = (
            f"the top level must be a mapping of sections (server, upstreams, routes), not {kind}"
        )
        raise ConfigError([_format(filename, doc.values[()], (), message)])

    problems = list(doc.problems)
    # BaseSettings reads keyword arguments such as `_env_file` as its own options,
    # so a top-level key starting with `_` must never reach it.
    data = {k: v for k, v in doc.data.items() if not k.startswith("_")}
    problems += [
        Problem((k,), "Extra inputs are not permitted", at_key=True)
        for k in doc.data
        if k.startswith("_")
    ]
    settings: GatewaySettings | None = None
    try:
        settings = GatewaySettings(**data)
    except ValidationError as exc:
        # A value whose `${VAR}` failed is reported once, not again as invalid.
        unresolved = [p.path for p in doc.problems]
        problems += [
            p
            for p in _validation_problems(exc.errors(), data)
            if not any(p.path[: len(u)] == u for u in unresolved)
        ]
    except SettingsError as exc:  # an environment override that is not valid JSON
        match = re.search(r'for field "(\w+)"', str(exc))
        path: Path = (match.group(1),) if match else ()
        variable = _environment_source(path)
        problems.append(
            Problem(path, f"{exc} (from environment {variable})" if variable else str(exc))
        )

    # Cross-check what was validated (environment overrides included) when possible,
    # else the raw file, so one run shows both kinds of error.
    checked = settings.model_dump(include={"upstreams", "routes"}) if settings else data
    problems += cross_check(checked)
    if settings is not None:
        problems += tls_file_problems(settings)

    if problems or settings is None:
        raise ConfigError(_render(filename, doc, problems))
    return settings


def tls_file_problems(settings: GatewaySettings) -> list[Problem]:
    """The TLS files the settings name that cannot serve: unreadable, not PEM, or a key
    that does not belong to its certificate. Checked on every load, so `gateway check`,
    a start and a reload all refuse them, pointing at the line that names the file."""
    problems: list[Problem] = []
    tls = settings.server.tls
    if tls is not None:
        base: Path = ("server", "tls")
        for i, pair in enumerate(tls.certificates):
            problems += _pair_problems((*base, "certificates", i), pair.cert, pair.key)
        if tls.client_ca is not None:
            problems += _ca_problems((*base, "client_ca"), tls.client_ca)
    for name, upstream in settings.upstreams.items():
        up = upstream.tls
        if up is None:
            continue
        where: Path = ("upstreams", name, "tls")
        if up.ca_file is not None:
            problems += _ca_problems((*where, "ca_file"), up.ca_file)
        if up.cert is not None and up.key is not None:
            problems += _pair_problems(where, up.cert, up.key)
    return problems


def _pair_problems(where: Path, cert: str, key: str) -> list[Problem]:
    """A certificate and its key, named at `where` (.cert / .key) when they do not load."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        missing = "key" if exc.filename == key else "cert"
        return [Problem((*where, missing), f"cannot read {exc.filename}")]
    except OSError as exc:  # ssl.SSLError is one
        return [Problem((*where, "cert"), _pem_problem(cert, key, exc))]
    return []


def _ca_problems(where: Path, ca_file: str) -> list[Problem]:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(ca_file)
    except (OSError, ValueError) as exc:
        return [Problem(where, f"cannot load {ca_file}: {_reason(exc)}")]
    return []


def _pem_problem(cert: str, key: str, exc: OSError) -> str:
    reason = _reason(exc)
    if "KEY_VALUES_MISMATCH" in reason.upper().replace(" ", "_"):
        return f"the key {key} does not belong to the certificate {cert}"
    return f"cannot load {cert} with {key}: {reason}"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and not isinstance(exc, ssl.SSLError):
        return exc.strerror
    return str(getattr(exc, "reason", None) or exc)


def cross_check(data: Mapping[str, Any]) -> list[Problem]:
    """Problems no single model can see: references between sections, repeated names.

    `data` is the config as plain values (the raw file, or a validated one dumped);
    parts of the wrong shape are skipped, since validation reports those.
    """
    problems: list[Problem] = []
    upstreams = data.get("upstreams", {})
    known = sorted(upstreams) if isinstance(upstreams, Mapping) else None

    def check_upstream(value: Any, path: Path) -> None:
        if known is None or not isinstance(value, str) or value in known:
            return
        hint = f"known: {', '.join(known)}" if known else "no upstreams are defined"
        problems.append(Problem(path, f"unknown upstream {value!r} ({hint})"))

    routes = data.get("routes")
    if not isinstance(routes, list | tuple):
        return problems
    first_index: dict[str, int] = {}
    for i, route in enumerate(routes):
        if not isinstance(route, Mapping):
            continue
        name = route.get("name")
        if isinstance(name, str):
            if name in first_index:
                message = f"duplicate route name {name!r} (routes.{first_index[name]} has it too)"
                problems.append(Problem(("routes", i, "name"), message))
            else:
                first_index[name] = i
        check_upstream(route.get("upstream"), ("routes", i, "upstream"))
        fallback = route.get("fallback")
        check_upstream(fallback, ("routes", i, "fallback"))
        if isinstance(fallback, str) and fallback == route.get("upstream"):
            message = "the fallback must be another upstream than the route's own"
            problems.append(Problem(("routes", i, "fallback"), message))
        aggregate = route.get("aggregate")
        backends = aggregate.get("backends") if isinstance(aggregate, Mapping) else None
        if isinstance(backends, list | tuple):
            for j, backend in enumerate(backends):
                if isinstance(backend, Mapping):
                    path: Path = ("routes", i, "aggregate", "backends", j, "upstream")
                    check_upstream(backend.get("upstream"), path)
    return problems


def route_table(settings: GatewaySettings) -> str:
    """The routes as an aligned table: NAME, METHODS, HOST, PATH, TARGET."""
    rows = [("NAME", "METHODS", "HOST", "PATH", "TARGET")]
    for route in settings.routes:
        if route.aggregate is not None:
            target = f"aggregate({', '.join(b.upstream for b in route.aggregate.backends)})"
        else:
            target = f"{route.upstream} -> {route.rewrite or route.path}"
        methods = ",".join(route.methods) if route.methods else "*"
        rows.append((route.name, methods, route.host or "*", route.path, target))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    return "\n".join(lines)


class _Builder:
    """Turns a composed YAML node tree into plain values, recording each one's position."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ
        self._constructor = yaml.constructor.SafeConstructor()
        self._doc = _Document(data=None)
        self._active: set[int] = set()  # nodes being built: a cycle means a recursive alias
        self._reported: set[int] = set()  # an aliased scalar's problem is reported once
        self._count = 0

    def build(self, root: yaml.Node | None) -> _Document:
        if root is None:  # an empty file, or only comments: every default
            self._doc.data = {}
            self._doc.values[()] = (1, 1)
            return self._doc
        try:
            self._doc.data = self._node(root, ())
        except _TooLarge:
            self._doc.data = {}
            self._problem(root, (), f"more than {_MAX_NODES} values after expanding aliases")
        self._doc.values[()] = (1, 1) if isinstance(self._doc.data, dict) else _position(root)
        return self._doc

    def _problem(self, node: yaml.Node, path: Path, message: str) -> None:
        self._doc.values.setdefault(path, _position(node))
        self._doc.problems.append(Problem(path, message))

    def _node(self, node: yaml.Node, path: Path) -> Any:
        self._count += 1
        if self._count > _MAX_NODES:
            raise _TooLarge
        self._doc.values[path] = _position(node)
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node, path)
        if id(node) in self._active:
            self._problem(node, path, "an alias refers to a node that contains it")
            return None
        self._active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [self._node(child, (*path, i)) for i, child in enumerate(node.value)]
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, path)
            return None  # pragma: no cover - the composer makes no other kind
        finally:
            self._active.discard(id(node))

    def _mapping(self, node: yaml.MappingNode, path: Path) -> dict[str, Any]:
        result: dict[str, Any] = {}
        merges: list[yaml.MappingNode] = []
        own: list[tuple[yaml.Node, yaml.Node]] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                sources = (
                    value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                )
                for source in sources:
                    if isinstance(source, yaml.MappingNode):
                        merges.append(source)
                    else:
                        self._problem(
                            source, path, "a merge key (<<) takes a mapping or a list of them"
                        )
            else:
                own.append((key_node, value_node))
        # `<<: [*a, *b]`: keys of *a win over *b, and the mapping's own keys win over both.
        for source in reversed(merges):
            merged = self._node(source, path)
            if isinstance(merged, dict):  # not when the alias is recursive
                result.update(merged)
        seen: dict[str, Position] = {}
        for key_node, value_node in own:
            if not isinstance(key_node, yaml.ScalarNode):
                self._problem(key_node, path, "a mapping key must be a plain string")
                continue
            # The key's text, not its YAML type: `on:` is a key named "on", not True.
            key = key_node.value
            key_path = (*path, key)
            if key in seen:
                line, _ = seen[key]
                self._doc.keys[key_path] = _position(key_node)
                self._doc.problems.append(
                    Problem(key_path, f"duplicate key {key!r} (first on line {line})", at_key=True)
                )
                continue
            seen[key] = self._doc.keys[key_path] = _position(key_node)
            result[key] = self._node(value_node, key_path)
        self._doc.values[path] = _position(node)
        return result

    def _scalar(self, node: yaml.ScalarNode, path: Path) -> Any:
        try:
            value = self._constructor.construct_object(node)
        except yaml.constructor.ConstructorError as exc:
            self._problem(node, path, str(exc.problem))
            return None
        except (ValueError, IndexError, KeyError, AttributeError) as exc:
            # An explicit tag on a value it cannot hold (`!!int x`, `!!timestamp 2001-02-30`):
            # PyYAML's constructors raise plain exceptions for these.
            self._problem(node, path, f"cannot read {node.value!r} as {node.tag}: {exc}")
            return None
        if not isinstance(value, str) or "${" not in value:
            return value
        text, whole, problems = self._interpolate(value)
        if problems:
            if id(node) not in self._reported:
                self._reported.add(id(node))
                for problem in problems:
                    self._problem(node, path, problem)
            return text
        # An unquoted `${PORT:-8080}` is typed as YAML would type `8080` written there.
        # An empty result stays "" rather than becoming YAML's null.
        if whole and node.style in (None, "") and text.strip():
            retyped = yaml.safe_load(text)
            if isinstance(retyped, bool | int | float):
                return retyped
        return text

    def _interpolate(self, value: str) -> tuple[str, bool, list[str]]:
        """Substitute `${...}`; return the text, whether it was one reference alone, problems."""
        problems: list[str] = []
        references = 0

        def substitute(match: re.Match[str]) -> str:
            nonlocal references
            if match.group(1):
                return "${"
            references += 1
            body, closed = match.group(2), match.group(3)
            name = _NAME.fullmatch(body) if closed else None
            if name is None:
                expected = "expected ${NAME} or ${NAME:-default}"
                problems.append(f"malformed reference {match.group(0)!r}: {expected}")
                return match.group(0)
            variable, default = name.group(1), name.group(2)
            current = self._environ.get(variable)
            if default is not None:
                return current or default  # `:-` as in the shell: unset or empty
            if current is None:
                problems.append(
                    f"environment variable {variable} is not set "
                    f"(write ${{{variable}:-default}} to give a default)"
                )
                return ""
            return current

        text = _REFERENCE.sub(substitute, value)
        whole = references == 1 and _REFERENCE.fullmatch(value) is not None
        return text, whole, problems


class _TooLarge(Exception):
    pass


def _position(node: yaml.Node) -> Position:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _validation_problems(errors: list[ErrorDetails], data: Mapping[str, Any]) -> list[Problem]:
    """Pydantic's errors as problems, with union-branch tags taken out of their paths.

    A value that fits no branch of a union gets one error per branch. When some
    branch got further (the value had its shape, `rate_limit_store: {redis: x}`),
    only that branch's errors are kept; otherwise they become one line.
    """
    problems: list[Problem] = []
    unions: dict[Path, list[tuple[Path, str]]] = {}
    for error in errors:
        path, union_at = _clean_loc(error["loc"], data)
        message = _message(error, path)
        if union_at is None:
            problems.append(Problem(path, message, at_key=error["type"] == "extra_forbidden"))
        else:
            unions.setdefault(path[:union_at], []).append((path, message))
    for union_path, branch_errors in unions.items():
        deeper = [(p, m) for p, m in branch_errors if len(p) > len(union_path)]
        if deeper:
            problems += [Problem(p, m) for p, m in deeper]
        else:
            messages = list(dict.fromkeys(m for _, m in branch_errors))
            problems.append(Problem(union_path, ", or ".join(messages)))
    # "should have at least 1 item after validation" only echoes errors in the items.
    return [
        p
        for p in problems
        if not (
            "after validation" in p.message
            and any(len(q.path) > len(p.path) and q.path[: len(p.path)] == p.path for q in problems)
        )
    ]


def _clean_loc(loc: tuple[str | int, ...], data: Any) -> tuple[Path, int | None]:
    """The path of `loc` in the file, and where in it a union branch tag was dropped."""
    path: list[str | int] = []
    union_at: int | None = None
    node: Any = data
    for part in loc:
        if isinstance(part, int):
            in_list = isinstance(node, list) and 0 <= part < len(node)
            node = node[part] if in_list else None
        elif isinstance(node, dict) and part in node:
            node = node[part]
        elif part in _PRIMITIVE_TAGS or not _FIELD_NAME.fullmatch(part):
            union_at = len(path) if union_at is None else union_at
            continue  # the input is unchanged inside a branch
        else:
            node = None
        path.append(part)
    return tuple(path), union_at


def _message(error: ErrorDetails, path: Path) -> str:
    message = error["msg"]
    for prefix in _PYDANTIC_PREFIXES:
        message = message.removeprefix(prefix)
    variable = _environment_source(path)
    if variable:
        message += f" (from environment {variable})"
    return message


def _environment_source(path: Path) -> str | None:
    """The `GATEWAY_A__B` variable that overrode `path` (or an ancestor of it), if one did."""
    present = {name.upper() for name in os.environ}  # pydantic-settings ignores case
    for depth in range(len(path), 0, -1):
        name = ENV_PREFIX + ENV_DELIMITER.join(str(p) for p in path[:depth]).upper()
        if name in present:
            return name
    return None


def _render(filename: str, doc: _Document, problems: list[Problem]) -> list[str]:
    located = [(_locate(doc, p), p) for p in problems]
    located.sort(key=lambda item: item[0])  # stable: same position keeps report order
    return list(dict.fromkeys(_format(filename, pos, p.path, p.message) for pos, p in located))


def _locate(doc: _Document, problem: Problem) -> Position:
    if problem.at_key and problem.path in doc.keys:
        return doc.keys[problem.path]
    path = problem.path
    while path and path not in doc.values:
        path = path[:-1]  # e.g. a missing field: point at the mapping that lacks it
    return doc.values.get(path, (1, 1))


def _format(filename: str, position: Position, path: Path, message: str) -> str:
    line, column = position
    return f"{filename}:{line}:{column}: {'.'.join(str(p) for p in path)}: {message}"


def _syntax_error(filename: str, exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    position = (mark.line + 1, mark.column + 1) if mark else (1, 1)
    message = f"YAML syntax error: {exc.problem or exc.context}"
    if exc.problem and exc.context:
        where = ""
        if exc.context_mark is not None:
            where = f" at line {exc.context_mark.line + 1}, column {exc.context_mark.column + 1}"
        message += f" ({exc.context}{where})"
    return _format(filename, position, (), message)
