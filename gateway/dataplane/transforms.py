"""Header transforms (`routes[].headers`): fields removed, set and added, in that order,
after the gateway's own headers, on what goes upstream and on what goes to the client.

Compiled once by the factory: `{route}` and `{upstream}` are filled in then, so a value
without `{client_ip}` or `{request_id}` is prebuilt bytes and costs nothing to render;
the client's address is worked out only when a value of the transform names it. A route
without `headers:` has no transform and pays nothing (see docs/policies.md).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from gateway.dataplane.headers import HOP_BY_HOP, IncomingHeaders
from gateway.dataplane.state import Exchange
from gateway.edge.client_ip import real_client_ip
from gateway.types import Headers, IPNetwork, Message, Scope, Send

__all__ = ["REFUSED", "HeaderTransform", "client_ip_of", "refused_name"]

# Fields a transform may not touch, besides the contract's own (X-Forwarded-*,
# X-Request-ID, X-Request-Timeout-Ms, refused by the settings model): those that frame
# the message or name its target, which the gateway writes itself, and the hop-by-hop
# ones, which belong to one connection and are dropped both ways.
REFUSED = HOP_BY_HOP | {b"host", b"content-length"}
_CONTENT_TYPE = frozenset({b"content-type"})
_VARIABLE = re.compile(r"\{(client_ip|request_id|route|upstream)\}")

# A value: prebuilt bytes, or its parts (bytes as they are, `client_ip` or
# `request_id` filled in per request).
_Value = bytes | tuple[bytes | str, ...]


def refused_name(name: str) -> bool:
    """A field a transform may not name (Host, Content-Length, hop-by-hop)."""
    return name.lower().encode("latin-1") in REFUSED


def _compile(value: str, route: str, upstream: str) -> tuple[_Value, bool]:
    """The value with `{route}` and `{upstream}` filled in; prebuilt bytes when nothing
    is left to fill per request. The flag says whether it needs the client's address."""
    parts: list[bytes | str] = []
    idx = 0
    for m in _VARIABLE.finditer(value):
        parts.append(value[idx : m.start()].encode())
        name = m.group(1)
        if name == "route":
            parts.append(route.encode())
        elif name == "upstream":
            parts.append(upstream.encode())
        else:
            parts.append(name)
        idx = m.end()
    parts.append(value[idx:].encode())
    if all(isinstance(p, bytes) for p in parts):
        return b"".join(p for p in parts if isinstance(p, bytes)), False
    merged: list[bytes | str] = []
    for part in parts:  # adjacent literals joined, empty ones dropped
        if isinstance(part, bytes) and merged and isinstance(merged[-1], bytes):
            merged[-1] = merged[-1] + part
        elif part != b"":
            merged.append(part)
    return tuple(merged), "client_ip" in merged


def _render(parts: tuple[bytes | str, ...], request_id: bytes, client_ip: bytes) -> bytes:
    return b"".join(
        p if isinstance(p, bytes) else (request_id if p == "request_id" else client_ip)
        for p in parts
    )


class HeaderTransform:
    """One direction of a route's `headers:` block, compiled. `apply` returns the
    headers with the `remove` and `set` names dropped (names compared without case),
    then the `set` fields, then the `add` fields appended. Names are written lower-case
    (what HTTP/2 requires, and what HTTP/1.1 does not mind)."""

    __slots__ = ("_drop", "_fields", "needs_client_ip")

    def __init__(
        self,
        *,
        remove: Iterable[str] = (),
        set: Mapping[str, str] | None = None,
        add: Mapping[str, str] | None = None,
        route: str = "",
        upstream: str = "",
    ) -> None:
        set_, add_ = dict(set or {}), dict(add or {})
        for name in (*remove, *set_, *add_):
            if refused_name(name):
                raise ValueError(f"a transform cannot change {name}")
        self._drop = frozenset(n.lower().encode("latin-1") for n in (*remove, *set_))
        fields: list[tuple[bytes, _Value]] = []
        needs = False
        for name, value in (*set_.items(), *add_.items()):
            compiled, client = _compile(value, route, upstream)
            needs = needs or client
            fields.append((name.lower().encode("latin-1"), compiled))
        self._fields = tuple(fields)
        self.needs_client_ip = needs

    def __repr__(self) -> str:
        names = [n.decode() for n, _ in self._fields]
        return f"HeaderTransform(drop={sorted(n.decode() for n in self._drop)}, fields={names})"

    def apply(
        self,
        headers: Headers,
        request_id: str,
        client_ip: str = "",
        keep: frozenset[bytes] = frozenset(),
    ) -> Headers:
        """`headers` transformed, as a new list. Fields named in `keep` are left as they
        are whatever the transform says (the Content-Type of the gateway's own errors)."""
        drop = self._drop - keep if keep else self._drop
        out = [(n, v) for n, v in headers if n.lower() not in drop]
        rid = cip = b""
        for name, value in self._fields:
            if keep and name in keep:
                continue
            if not isinstance(value, bytes):
                if not rid:
                    rid, cip = request_id.encode("ascii"), client_ip.encode("latin-1")
                value = _render(value, rid, cip)
            out.append((name, value))
        return out

    def apply_upstream(
        self, incoming: IncomingHeaders, scope: Scope, trusted: tuple[IPNetwork, ...]
    ) -> None:
        """Transform what goes upstream (after X-Forwarded-* and X-Request-ID are set)."""
        client_ip = _client_ip(scope, incoming, trusted) if self.needs_client_ip else ""
        incoming.upstream = self.apply(incoming.upstream, incoming.request_id, client_ip)

    def wrap_send(
        self,
        send: Send,
        scope: Scope,
        incoming: IncomingHeaders,
        trusted: tuple[IPNetwork, ...],
        exchange: Exchange,
    ) -> Send:
        """`send` with the response transform applied to the answer's head, whoever
        makes it: the upstream's answer, a filter's, or the gateway's own error (whose
        Content-Type it never changes: problem+json, or gRPC's)."""
        client_ip = _client_ip(scope, incoming, trusted) if self.needs_client_ip else ""
        request_id = incoming.request_id

        async def transformed(message: Message) -> None:
            if message["type"] == "http.response.start":
                keep = _CONTENT_TYPE if exchange.detail is not None else frozenset()
                message["headers"] = self.apply(
                    list(message.get("headers", ())), request_id, client_ip, keep
                )
            await send(message)

        return transformed


def _client_ip(scope: Scope, incoming: IncomingHeaders, trusted: tuple[IPNetwork, ...]) -> str:
    client = scope.get("client")
    return real_client_ip(client[0] if client else "", incoming.forwarded_for, trusted)


def client_ip_of(headers: Headers, trusted: tuple[IPNetwork, ...]) -> str:
    """The client's address from the X-Forwarded-For the gateway wrote (its last hop is
    the peer): the same answer `real_client_ip` gives from the connection."""
    for name, value in headers:
        if name == b"x-forwarded-for":
            peer = value.rsplit(b",", 1)[-1].strip().decode("latin-1")
            return real_client_ip(peer, value, trusted)
    return ""
