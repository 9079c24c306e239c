"""Path normalisation and the route table: host, then path template, then method.

Matching runs on the *normalised raw* path: percent-encoded unreserved characters are
decoded (so `%2e%2e` is `..`), dot segments are resolved (RFC 3986 5.2.4), and encoded
slashes, backslashes and NUL are rejected outright, so neither matching nor a rewrite
can ever be tricked into climbing out of its prefix. Parameters keep their percent
encoding, so a rewrite forwards them byte for byte.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar
from urllib.parse import unquote_to_bytes

from starlette.routing import PARAM_REGEX, compile_path

from gateway.errors import BadRequest, MethodNotAllowed, RouteNotFound

__all__ = ["CompiledTemplate", "Match", "Router", "normalize_path"]

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PCT = re.compile(r"%([0-9A-Fa-f]{2})")
_FORBIDDEN = re.compile(r"%(?:2[fF]|5[cC]|00)|\\|[\x00-\x20\x7f]")
_BAD_PCT = re.compile(r"%(?![0-9A-Fa-f]{2})")

T = TypeVar("T")


def _pct(match: re.Match[str]) -> str:
    byte = int(match.group(1), 16)
    return chr(byte) if byte in _UNRESERVED else "%" + match.group(1).upper()


def _remove_dot_segments(path: str) -> str:
    out: list[str] = []
    segments = path.split("/")
    for i, seg in enumerate(segments):
        if seg == "..":
            if len(out) > 1:
                out.pop()
            if i == len(segments) - 1:
                out.append("")
        elif seg == ".":
            if i == len(segments) - 1:
                out.append("")
        else:
            out.append(seg)
    result = "/".join(out)
    return result if result.startswith("/") else "/" + result


def normalize_path(raw: str) -> str:
    """The canonical form of a raw (percent-encoded) request path, or BadRequest."""
    if not raw.startswith("/"):
        raise BadRequest("the request path must start with /")
    if _FORBIDDEN.search(raw):
        raise BadRequest("encoded slashes, backslashes, NUL and control characters are refused")
    if "%" in raw:
        if _BAD_PCT.search(raw):
            raise BadRequest("malformed percent-encoding in the path")
        try:
            # Overlong or otherwise invalid UTF-8 (`%C0%AE` is an overlong `.`) is refused:
            # a lenient decoder upstream could read it as a dot segment or a slash.
            unquote_to_bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("the path is not valid UTF-8 once percent-decoded") from None
        raw = _PCT.sub(_pct, raw)
    if "/." in raw:
        raw = _remove_dot_segments(raw)
    return raw


class CompiledTemplate:
    """A path template (`/v1/users/{rest}`) filled from raw, percent-encoded parameters."""

    __slots__ = ("_parts", "source")

    def __init__(self, template: str) -> None:
        self.source = template
        self._parts: list[tuple[str, str | None]] = []
        idx = 0
        for m in PARAM_REGEX.finditer(template):
            self._parts.append((template[idx : m.start()], m.group(1)))
            idx = m.end()
        self._parts.append((template[idx:], None))

    def fill(self, params: dict[str, str]) -> str:
        out = "".join(lit + (params[name] if name else "") for lit, name in self._parts)
        if "/." in out:
            # A parameter such as `..` can only appear through a partial-segment template
            # (`/x{name}`); refuse rather than let the rewrite leave its prefix.
            segments = out.split("?", 1)[0].split("/")
            if any(s in (".", "..") for s in segments):
                raise BadRequest("the rewritten path would contain a dot segment")
        return out


@dataclass(frozen=True, slots=True)
class Match(Generic[T]):
    route: T
    params: dict[str, str]


class _Entry(Generic[T]):
    """One route of the table: its host, methods and compiled path pattern."""

    __slots__ = ("host", "host_suffix", "methods", "regex", "route")

    def __init__(self, route: T, path: str, methods: frozenset[str] | None, host: str | None):
        self.route = route
        self.regex = compile_path(path)[0]
        self.methods = methods
        self.host: str | None = None
        self.host_suffix: str | None = None
        if host:
            host = host.lower()
            if host.startswith("*."):
                self.host_suffix = host[1:]
            else:
                self.host = host

    def host_matches(self, host: str) -> bool:
        if self.host is not None:
            return host == self.host
        if self.host_suffix is not None:
            return host.endswith(self.host_suffix)
        return True


class Router(Generic[T]):
    """Routes in config order; the first whose host and path match and that allows the
    method wins. A path that matches only with other methods is a 405 with `Allow`."""

    def __init__(self) -> None:
        self._entries: list[_Entry[T]] = []

    def add(self, route: T, path: str, methods: frozenset[str] | None, host: str | None) -> None:
        self._entries.append(_Entry(route, path, methods, host))

    def match(self, host: str, method: str, path: str) -> Match[T]:
        host = _strip_port(host.lower())
        allowed: list[str] = []
        for entry in self._entries:
            if not entry.host_matches(host):
                continue
            m = entry.regex.match(path)
            if m is None:
                continue
            if entry.methods is None or method in entry.methods:
                return Match(entry.route, m.groupdict())
            if method == "HEAD" and "GET" in entry.methods:
                return Match(entry.route, m.groupdict())
            allowed.extend(x for x in sorted(entry.methods) if x not in allowed)
        if allowed:
            if "GET" in allowed and "HEAD" not in allowed:
                allowed.append("HEAD")  # served wherever GET is
            raise MethodNotAllowed(allowed)
        raise RouteNotFound(f"no route for {method} {path}")

    def __iter__(self) -> Iterator[T]:
        """The routes, in config order."""
        return (entry.route for entry in self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Router({len(self._entries)} routes)"


def _strip_port(host: str) -> str:
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if ":" in host else host
