"""RFC 9111's rules for a shared cache, as plain functions over raw header lists: which
answers may be stored, for how long they are fresh, how old they are, and which request
headers (`Vary`) select among their variants. No state and no I/O: `cache.py` holds the
store and the request path's use of these rules.
"""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime

from gateway.types import Headers

__all__ = [
    "HEURISTIC_STATUSES",
    "Freshness",
    "RequestDirectives",
    "current_age",
    "freshness",
    "http_time",
    "parse_cache_control",
    "request_directives",
    "vary_names",
    "vary_values",
]

# RFC 9110 15.1's heuristically cacheable statuses the gateway stores (206 and 308 not).
HEURISTIC_STATUSES = frozenset({200, 203, 204, 300, 301, 404, 405, 410, 414, 501})


def parse_cache_control(headers: Headers) -> dict[bytes, bytes | None]:
    """Every `Cache-Control` directive of `headers`, names lowercased, quoted values
    unquoted; a directive given twice keeps its first value."""
    out: dict[bytes, bytes | None] = {}
    for name, value in headers:
        if name.lower() != b"cache-control":
            continue
        for element in value.split(b","):
            key, eq, arg = element.partition(b"=")
            key = key.strip().lower()
            if key and key not in out:
                out[key] = arg.strip().strip(b'"') if eq else None
    return out


def http_time(value: bytes | None) -> float | None:
    """An HTTP date as seconds since the epoch; None when absent or invalid (RFC 9111
    5.3: an invalid Expires means already expired, which the caller decides)."""
    if value is None:
        return None
    try:
        return parsedate_to_datetime(value.decode("latin-1")).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


def _seconds(value: bytes | None) -> int | None:
    if value is None or not value.isdigit():
        return None
    return int(value)


def _field(headers: Headers, name: bytes) -> bytes | None:
    for n, v in headers:
        if n.lower() == name:
            return v
    return None


class Freshness:
    """What a response's headers say about storing it: `lifetime` in seconds (None:
    not storable), `initial_age`, whether it must be revalidated before every use
    (`no-cache`), whether it may be shared with requests that carry
    `Authorization` (`public`, `s-maxage`, `must-revalidate`), and for how many
    seconds past its lifetime it may still be served while it is refreshed in the
    background (`stale_while_revalidate`) or when the upstream fails
    (`stale_if_error`), RFC 5861; 0 when not at all."""

    __slots__ = (
        "initial_age",
        "lifetime",
        "no_cache",
        "reason",
        "shared_with_auth",
        "stale_if_error",
        "stale_while_revalidate",
    )

    def __init__(
        self,
        lifetime: float | None,
        initial_age: float = 0.0,
        no_cache: bool = False,
        shared_with_auth: bool = False,
        reason: str = "",
        stale_while_revalidate: float = 0.0,
        stale_if_error: float = 0.0,
    ) -> None:
        self.lifetime = lifetime
        self.stale_while_revalidate = stale_while_revalidate
        self.stale_if_error = stale_if_error
        self.initial_age = initial_age
        self.no_cache = no_cache
        self.shared_with_auth = shared_with_auth
        self.reason = reason  # why not storable, for logs and tests

    def __repr__(self) -> str:
        return f"Freshness(lifetime={self.lifetime}, age={self.initial_age}, {self.reason!r})"


def freshness(
    status: int,
    headers: Headers,
    default_ttl: float,
    *,
    authorized: bool = False,
    now: float | None = None,
) -> Freshness:
    """Whether a shared cache may store this response and its freshness lifetime:
    `s-maxage` > `max-age` > `Expires` (against `Date`) > `default_ttl` (0: only
    explicitly fresh answers are stored). Never stored: `no-store`, `private`,
    `Set-Cookie`, `Vary: *`, statuses outside `HEURISTIC_STATUSES`, and answers to a
    request with `Authorization` unless `public`, `s-maxage` or `must-revalidate`.
    `stale-while-revalidate` and `stale-if-error` (RFC 5861) give the stale windows,
    unless `no-cache`, `must-revalidate` or `proxy-revalidate` forbid serving it stale
    (RFC 9111 4.2.4)."""
    now = time.time() if now is None else now
    if status not in HEURISTIC_STATUSES:
        return Freshness(None, reason="status")
    cc = parse_cache_control(headers)
    if b"no-store" in cc:
        return Freshness(None, reason="no-store")
    if b"private" in cc:
        return Freshness(None, reason="private")
    date: float | None = None
    expires: bytes | None = None
    has_expires = False
    age_value = 0
    for name, value in headers:
        lname = name.lower()
        if lname == b"set-cookie":
            return Freshness(None, reason="set-cookie")
        if lname == b"vary" and any(t.strip() == b"*" for t in value.split(b",")):
            return Freshness(None, reason="vary-star")
        if lname == b"date":
            date = http_time(value)
        elif lname == b"expires":
            expires, has_expires = value, True
        elif lname == b"age":
            age_value = _seconds(value.strip()) or 0
    shared_with_auth = b"public" in cc or b"s-maxage" in cc or b"must-revalidate" in cc
    if authorized and not shared_with_auth:
        return Freshness(None, reason="authorization")
    lifetime: float | None = None
    s_maxage = _seconds(cc.get(b"s-maxage"))
    max_age = _seconds(cc.get(b"max-age"))
    if s_maxage is not None:
        lifetime = s_maxage
    elif max_age is not None:
        lifetime = max_age
    elif has_expires:
        at = http_time(expires)
        lifetime = 0.0 if at is None else max(0.0, at - (date if date is not None else now))
    elif default_ttl > 0:
        lifetime = default_ttl
    no_cache = b"no-cache" in cc
    if lifetime is None and no_cache and _has_validator(headers):
        lifetime = 0.0  # stored, but revalidated before every use
    if lifetime is None:
        return Freshness(None, reason="no-freshness")
    if lifetime <= 0 and not no_cache and not _has_validator(headers):
        return Freshness(None, reason="stale-on-arrival")
    apparent = max(0.0, now - date) if date is not None else 0.0
    swr = sie = 0.0
    if not (no_cache or b"must-revalidate" in cc or b"proxy-revalidate" in cc):
        swr = float(_seconds(cc.get(b"stale-while-revalidate")) or 0)
        sie = float(_seconds(cc.get(b"stale-if-error")) or 0)
    return Freshness(
        lifetime,
        max(float(age_value), apparent),
        no_cache,
        shared_with_auth,
        stale_while_revalidate=swr,
        stale_if_error=sie,
    )


def _has_validator(headers: Headers) -> bool:
    return _field(headers, b"etag") is not None or _field(headers, b"last-modified") is not None


class RequestDirectives:
    """A request's own `Cache-Control` (RFC 9111 5.2.1), as far as a shared cache acts
    on it: `max_age` / `min_fresh` / `max_stale` in seconds (None: not sent;
    `max_stale` -1: `max-stale` without a value, any staleness), `no_cache` (use no
    stored answer without validating it upstream), `no_store` (store nothing of this
    exchange) and `only_if_cached` (a stored answer, or 504 without going upstream)."""

    __slots__ = ("max_age", "max_stale", "min_fresh", "no_cache", "no_store", "only_if_cached")

    def __init__(self, cc: dict[bytes, bytes | None]) -> None:
        self.no_cache = b"no-cache" in cc
        self.no_store = b"no-store" in cc
        self.only_if_cached = b"only-if-cached" in cc
        self.max_age = _seconds(cc.get(b"max-age"))
        self.min_fresh = _seconds(cc.get(b"min-fresh"))
        if b"max-stale" in cc:
            value = cc[b"max-stale"]
            stale = -1 if value is None else _seconds(value)
            self.max_stale: int | None = 0 if stale is None else stale  # invalid: none
        else:
            self.max_stale = None

    @property
    def strict(self) -> bool:
        """Whether the request narrows what counts as fresh (then it gets no stale
        answer by `stale-while-revalidate` either)."""
        return self.no_cache or self.max_age is not None or self.min_fresh is not None

    def accepts(self, age: float, lifetime: float, no_cache: bool, headers: Headers) -> bool:
        """Whether a stored answer of this `age` and `lifetime` (and `no_cache`, its
        head `headers`) may answer the request without going upstream."""
        if self.no_cache or no_cache:
            return False
        if self.max_age is not None and age > self.max_age:
            return False
        left = lifetime - age
        if self.min_fresh is not None and left < self.min_fresh:
            return False
        if left > 0:
            return True
        if self.max_stale is None:
            return False
        # RFC 9111 4.2.4 / 5.2.2.2, 5.2.2.8, 5.2.2.10: never served stale, whatever
        # the request accepts.
        cc = parse_cache_control(headers)
        if b"must-revalidate" in cc or b"proxy-revalidate" in cc or b"s-maxage" in cc:
            return False
        return self.max_stale < 0 or -left <= self.max_stale

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)}" for n in self.__slots__)
        return f"RequestDirectives({fields})"


def request_directives(headers: Headers) -> RequestDirectives | None:
    """The request's `Cache-Control` directives, or None when it sent none (the common
    case, which then costs one scan of the names). `Pragma` is not read: RFC 9111 5.4
    deprecates it."""
    for name, _ in headers:
        if name.lower() == b"cache-control":
            return RequestDirectives(parse_cache_control(headers))
    return None


def current_age(initial_age: float, stored_at: float, now: float | None = None) -> float:
    """RFC 9111 4.2.3: the age when stored plus the time resident since."""
    now = time.time() if now is None else now
    return initial_age + max(0.0, now - stored_at)


def vary_names(headers: Headers) -> tuple[bytes, ...]:
    """The request headers a response varies on, lowercased, sorted, once each."""
    names: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"vary":
            names.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return tuple(sorted(names))


def vary_values(request: Headers, names: tuple[bytes, ...]) -> tuple[bytes, ...]:
    """The request's values of `names` (fields given twice joined, whitespace after
    commas normalised): the secondary key selecting one variant."""
    if not names:
        return ()
    found: dict[bytes, list[bytes]] = {}
    for name, value in request:
        lname = name.lower()
        if lname in names:
            found.setdefault(lname, []).append(value.strip())
    out = []
    for name in names:
        values = found.get(name)
        if values is None:
            out.append(b"")
            continue
        joined = b",".join(values)
        out.append(b",".join(t.strip() for t in joined.split(b",")))
    return tuple(out)
