"""Fan-out aggregation: one request, several backends called at once, one merged JSON.

`Aggregation` is a Handler like any upstream chain: the data plane calls it with the
request and gets one whole `GatewayResponse` back, so an aggregate route takes the
same request path as a proxy route. Each backend call runs through its upstream's own
policy chain (retry, breaker, bulkhead), so aggregation adds no resilience logic of
its own. Partial answers are a normal outcome (lura's `IsComplete=false`), surfaced as
`X-Gateway-Completed: false`.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote_to_bytes

import orjson
from starlette.routing import PARAM_REGEX

from gateway.dataplane.transforms import HeaderTransform, client_ip_of
from gateway.errors import (
    BadRequest,
    GatewayError,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.policies.expiry import Expiry
from gateway.types import (
    Deadline,
    GatewayRequest,
    GatewayResponse,
    Handler,
    Headers,
    IPNetwork,
    WholeBody,
    closed,
)

__all__ = ["Aggregation", "Backend", "BackendTemplate"]

# The incoming headers that reach every backend (Authorization unless the route says not).
FORWARDED = frozenset(
    {
        b"x-request-id",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"accept-language",
        b"traceparent",
        b"tracestate",
        b"user-agent",
    }
)
_ACCEPT_JSON = (b"accept", b"application/json")


def _loads(data: bytes) -> Any:
    """orjson first; what it refuses but JSON allows (integers past 64 bits, nesting
    past 255, UTF-16/32) goes to the standard library, which refuses NaN/Infinity."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data, parse_constant=_no_constant)


def _dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError: integers past 64 bits, deep nesting
        return json.dumps(value, separators=(",", ":")).encode()


class BackendTemplate:
    """A backend path template (`/orders?user={uid}`) over the route's path parameters.

    Parameters arrive percent-encoded from the request path; each is decoded once and
    re-encoded for where it lands, so `a&b` can never add a query parameter and `a/b`
    can never add a path segment (a `{name:path}` parameter keeps its slashes). The
    bytes the client sent are kept exactly (`%FF` stays `%FF`), and a filled path with a
    `.` or `..` segment is refused, as a rewrite's is."""

    __slots__ = ("_parts", "source")

    def __init__(self, template: str, path_params: frozenset[str]) -> None:
        self.source = template
        path, _, query = template.partition("?")
        self._parts: list[tuple[str, str | None, str]] = []
        for text, in_query in ((path, False), ("?" + query if query else "", True)):
            idx = 0
            for m in PARAM_REGEX.finditer(text):
                name = m.group(1)
                safe = "/" if (name in path_params and not in_query) else ""
                self._parts.append((text[idx : m.start()], name, safe))
                idx = m.end()
            self._parts.append((text[idx:], None, ""))

    def fill(self, params: dict[str, str]) -> tuple[str, bytes]:
        out = []
        for literal, name, safe in self._parts:
            out.append(literal)
            if name is not None:
                out.append(quote(unquote_to_bytes(params[name]), safe=safe))
        path, _, query = "".join(out).partition("?")
        if any(segment in (".", "..") for segment in path.split("/")):
            raise BadRequest("a backend path would contain a dot segment")
        return path, query.encode("latin-1")


@dataclass(frozen=True, slots=True)
class Backend:
    """One backend of an aggregate route: its upstream's chain, its path template, and
    how its answer is merged (under `key`, filtered to `fields`, renamed)."""

    index: int
    upstream: str
    template: BackendTemplate
    handler: Handler
    key: str | None
    required: bool
    timeout: float | None
    fields: frozenset[str] | None
    rename: dict[str, str]
    # the route's `headers.request`, with this backend's upstream as `{upstream}`
    transform: HeaderTransform | None = None

    def describe(self) -> str:
        label = self.key or f"#{self.index}"
        return f"backend {label} ({self.upstream} {self.template.source})"


@dataclass(slots=True)
class _Outcome:
    backend: Backend
    value: Any = None
    error: GatewayError | None = None


class Aggregation:
    """The handler of an aggregate route: calling it fans the request out to every
    backend and answers the merged JSON as one whole response (or raises the error of
    the backend that decided the outcome). `run` is the same, as (status, headers,
    body). `timeout` is the route's, which the data plane's deadline carries.

    `identity`: the header names the route's auth filter put on the request (JWT
    `claims_to_headers`, the API key header with `forward_api_key`), passed to every
    backend as a proxied route's upstream gets them. `trusted_proxies` is only read
    when a backend's transform names `{client_ip}`."""

    def __init__(
        self,
        name: str,
        backends: list[Backend],
        *,
        partial: str,
        timeout: float,
        max_response_size: int,
        forward_authorization: bool,
        identity: frozenset[bytes] = frozenset(),
        trusted_proxies: tuple[IPNetwork, ...] = (),
    ) -> None:
        self.name = name
        self.backends = backends
        self.allow_partial = partial == "allow"
        self.timeout = timeout
        self.max_response_size = max_response_size
        forwarded = FORWARDED | {b"authorization"} if forward_authorization else FORWARDED
        self.forwarded = forwarded | identity
        self.trusted_proxies = trusted_proxies

    def __repr__(self) -> str:
        return f"Aggregation({self.name!r}, backends={[b.describe() for b in self.backends]})"

    async def __call__(self, request: GatewayRequest) -> GatewayResponse:
        status, headers, body = await self.run(
            request.params or {},
            request.headers,
            request.deadline,
            request.request_id,
            request.trace,
        )
        return GatewayResponse(
            status=status, headers=headers, body=WholeBody(body), close=closed, whole=body
        )

    async def run(
        self,
        params: dict[str, str],
        headers: Headers,
        deadline: Deadline,
        request_id: str,
        trace: Any = None,
    ) -> tuple[int, Headers, bytes]:
        base = [(n, v) for n, v in headers if n in self.forwarded]
        base.append(_ACCEPT_JSON)
        # Filled before any backend starts: a path that cannot be built refuses the request.
        targets = [b.template.fill(params) for b in self.backends]
        tasks = [
            asyncio.create_task(self._call(b, target, base, deadline, request_id, trace))
            for b, target in zip(self.backends, targets, strict=True)
        ]
        try:
            done, _ = await asyncio.wait(tasks, timeout=max(deadline.remaining(), 0))
        finally:
            stragglers = [t for t in tasks if not t.done()]
            for task in stragglers:
                task.cancel()
            if stragglers:  # wait for them so their connections are released now
                await asyncio.gather(*stragglers, return_exceptions=True)
        outcomes = []
        for backend, task in zip(self.backends, tasks, strict=True):
            if task in done and not task.cancelled():
                outcomes.append(task.result())
            else:
                outcomes.append(
                    _Outcome(
                        backend,
                        error=UpstreamTimeout(
                            f"{backend.describe()} did not answer within the route deadline",
                            upstream=backend.upstream,
                        ),
                    )
                )
        return self._merge(outcomes)

    def _merge(self, outcomes: list[_Outcome]) -> tuple[int, Headers, bytes]:
        failures = [o for o in outcomes if o.error is not None]
        if failures:
            required = [o for o in failures if o.backend.required]
            if required:
                raise_first = required[0]
            elif not self.allow_partial or len(failures) == len(outcomes):
                raise_first = failures[0]
            else:
                raise_first = None
            if raise_first is not None:
                assert raise_first.error is not None
                raise raise_first.error
        merged: dict[str, Any] = {}
        for outcome in outcomes:
            if outcome.error is not None:
                continue
            if outcome.backend.key is not None:
                merged[outcome.backend.key] = outcome.value
            else:
                merged.update(outcome.value)
        try:
            body = _dumps(merged)
        except RecursionError:  # parsed just under the nesting limit, nested once more
            raise UpstreamUnavailable(
                "the merged answer is nested too deeply to encode as JSON"
            ) from None
        headers: Headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-gateway-completed", b"false" if failures else b"true"),
        ]
        return 200, headers, body

    async def _call(
        self,
        backend: Backend,
        target: tuple[str, bytes],
        headers: Headers,
        deadline: Deadline,
        request_id: str,
        trace: Any,
    ) -> _Outcome:
        path, query = target
        limit = deadline
        late = "did not answer within the route deadline"
        if backend.timeout is not None and backend.timeout < deadline.remaining():
            limit = Deadline.after(backend.timeout)
            late = f"did not answer within its timeout ({backend.timeout * 1000:.0f} ms)"
        transform = backend.transform
        if transform is None:
            sent = list(headers)
        else:
            ip = client_ip_of(headers, self.trusted_proxies) if transform.needs_client_ip else ""
            sent = transform.apply(headers, request_id, ip)
        request = GatewayRequest(
            method="GET",
            path=path,
            query=query,
            headers=sent,
            deadline=limit,
            request_id=request_id,
            route=self.name,
            trace=trace,
        )
        try:
            try:
                if limit is deadline:
                    # `run` ends every call at the route deadline (asyncio.wait).
                    value = await self._fetch(backend, request)
                else:
                    with Expiry(max(limit.remaining(), 0)):
                        value = await self._fetch(backend, request)
            except TimeoutError:
                raise UpstreamTimeout(
                    f"{backend.describe()} {late}", upstream=backend.upstream
                ) from None
        except GatewayError as exc:
            if isinstance(exc, UpstreamTimeout) and limit.expired():
                # Whichever timer noticed first (this one, the deadline's, the try's),
                # say which limit it was.
                exc.detail = f"{backend.describe()} {late}"
            elif isinstance(exc, UpstreamError) and not exc.detail.startswith("backend "):
                exc.detail = f"{backend.describe()}: {exc.detail}"
            exc.upstream = exc.upstream or backend.upstream
            return _Outcome(backend, error=exc)
        return _Outcome(backend, value=value)

    async def _fetch(self, backend: Backend, request: GatewayRequest) -> Any:
        response = await backend.handler(request)
        try:
            if not 200 <= response.status < 300:
                raise UpstreamUnavailable(
                    f"{backend.describe()} answered {response.status}",
                    upstream=backend.upstream,
                    outcome="status",
                )
            chunks = []
            size = 0
            async for chunk in response.body:  # a `whole` answer comes as one chunk
                size += len(chunk)
                if size > self.max_response_size:
                    raise UpstreamUnavailable(
                        f"{backend.describe()} answered more than max_response_size "
                        f"({self.max_response_size} bytes)",
                        upstream=backend.upstream,
                        outcome="too_large",
                    )
                chunks.append(chunk)
        finally:
            await response.close()
        try:
            value = _loads(b"".join(chunks))
        except (ValueError, RecursionError):  # RecursionError: nested too deep
            raise UpstreamUnavailable(
                f"{backend.describe()} answered a body that is not JSON",
                upstream=backend.upstream,
                outcome="bad_body",
            ) from None
        return self._shape(backend, value)

    @staticmethod
    def _shape(backend: Backend, value: Any) -> Any:
        if backend.fields is not None or backend.rename or backend.key is None:
            if not isinstance(value, dict):
                kind = type(value).__name__
                raise UpstreamUnavailable(
                    f"{backend.describe()} answered a JSON {kind}, which cannot be merged "
                    "(only an object can be merged at the top level or filtered by fields)",
                    upstream=backend.upstream,
                    outcome="bad_body",
                )
            if backend.fields is not None:
                value = {k: v for k, v in value.items() if k in backend.fields}
            if backend.rename:
                value = {backend.rename.get(k, k): v for k, v in value.items()}
        return value


def _no_constant(name: str) -> Any:
    # NaN and Infinity are not JSON (RFC 8259); passed through they would make the
    # merged answer invalid JSON.
    raise ValueError(f"{name} is not JSON")
