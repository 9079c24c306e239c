"""The aggregation engine on its own: templates, fan-out, merge, partial answers.

Backends are fake handlers returning `GatewayResponse` objects built from bytes, so
every rule is checked without a network; `tests/integration/test_aggregation.py` runs
the same rules through the real gateway against real upstreams.
"""

from __future__ import annotations

import asyncio
import json
import textwrap
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest

from gateway.build.factory import build_runtime
from gateway.build.upstreams import Upstream
from gateway.config.loader import ConfigError, load_config_text
from gateway.config.models import UpstreamSettings
from gateway.dataplane.aggregate import Aggregation as AggregateRoute
from gateway.dataplane.aggregate import Backend, BackendTemplate
from gateway.errors import (
    BadRequest,
    GatewayError,
    UpstreamSaturated,
    UpstreamTimeout,
    UpstreamUnavailable,
    UpstreamUnhealthy,
)
from gateway.types import Deadline, GatewayRequest, GatewayResponse, Handler, Headers

# --------------------------------------------------------------------------- helpers


@dataclass
class Fake:
    """A backend handler: answers `body` (bytes as they are, anything else as JSON; or
    `chunks`) with `status` after `delay` seconds, and records every request it got,
    whether its response was closed, and whether it was cancelled."""

    body: Any = b"{}"
    chunks: list[bytes] | None = None
    status: int = 200
    delay: float = 0.0
    body_delay: float = 0.0  # between the headers and the body
    raises: GatewayError | None = None
    requests: list[GatewayRequest] = field(default_factory=list)
    closed: int = 0
    cancelled: bool = False
    started_at: float | None = None

    async def __call__(self, request: GatewayRequest) -> GatewayResponse:
        self.requests.append(request)
        self.started_at = time.monotonic()
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        if self.raises is not None:
            raise self.raises
        if self.chunks is not None:
            chunks = self.chunks
        elif isinstance(self.body, bytes):
            chunks = [self.body]
        else:
            chunks = [json.dumps(self.body).encode()]

        async def body() -> AsyncIterator[bytes]:
            try:
                if self.body_delay:
                    await asyncio.sleep(self.body_delay)
                for chunk in chunks:
                    yield chunk
            except asyncio.CancelledError:
                self.cancelled = True
                raise

        async def close() -> None:
            self.closed += 1

        return GatewayResponse(self.status, [], body(), close, upstream="fake")


def backend(
    handler: Handler,
    path: str = "/x",
    *,
    index: int = 0,
    upstream: str = "up",
    key: str | None = None,
    required: bool = False,
    timeout: float | None = None,
    fields: list[str] | None = None,
    rename: dict[str, str] | None = None,
    path_params: frozenset[str] = frozenset(),
) -> Backend:
    return Backend(
        index=index,
        upstream=upstream,
        template=BackendTemplate(path, path_params),
        handler=handler,
        key=key,
        required=required,
        timeout=timeout,
        fields=frozenset(fields) if fields is not None else None,
        rename=rename or {},
    )


def route(
    *backends: Backend,
    partial: str = "allow",
    max_response_size: int = 10 * 1024 * 1024,
    forward_authorization: bool = True,
) -> AggregateRoute:
    numbered = [
        Backend(
            index=i,
            upstream=b.upstream,
            template=b.template,
            handler=b.handler,
            key=b.key,
            required=b.required,
            timeout=b.timeout,
            fields=b.fields,
            rename=b.rename,
        )
        for i, b in enumerate(backends)
    ]
    return AggregateRoute(
        "profile",
        numbered,
        partial=partial,
        timeout=5.0,
        max_response_size=max_response_size,
        forward_authorization=forward_authorization,
    )


async def run(
    agg: AggregateRoute,
    params: dict[str, str] | None = None,
    headers: Headers | None = None,
    within: float = 5.0,
) -> tuple[int, dict[bytes, bytes], Any]:
    status, out, body = await agg.run(params or {}, headers or [], Deadline.after(within), "rid")
    return status, dict(out), json.loads(body)


async def failure(agg: AggregateRoute, within: float = 5.0) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        await agg.run({}, [], Deadline.after(within), "rid")
    return info.value


# ------------------------------------------------------------------ BackendTemplate


def fill(template: str, path_params: frozenset[str] = frozenset(), **params: str) -> Any:
    return BackendTemplate(template, path_params).fill(params)


def test_fill_path_and_query() -> None:
    assert fill("/v1/users/{uid}", uid="42") == ("/v1/users/42", b"")
    assert fill("/orders?user={uid}", uid="42") == ("/orders", b"user=42")
    assert fill("/u/{a}/o?b={b}&limit=10", a="1", b="2") == ("/u/1/o", b"b=2&limit=10")
    assert fill("/static?all=1") == ("/static", b"all=1")
    assert fill("/both/{uid}?again={uid}", uid="7") == ("/both/7", b"again=7")


def test_fill_keeps_a_parameter_from_adding_query_parameters() -> None:
    path, query = fill("/v1/users/{uid}?user={uid}", uid="a&b=c")
    assert path == "/v1/users/a%26b%3Dc"
    assert query == b"user=a%26b%3Dc"
    assert parse_qs(query.decode()) == {"user": ["a&b=c"]}
    # A `?` or `#` in a parameter cannot start a query or a fragment either.
    assert fill("/u/{uid}?q={uid}", uid="x?y#z") == ("/u/x%3Fy%23z", b"q=x%3Fy%23z")
    assert fill("/u?q={uid}", uid="1+1;x") == ("/u", b"q=1%2B1%3Bx")


def test_fill_decodes_once_and_encodes_once() -> None:
    # Parameters arrive percent-encoded from the request path: not encoded twice.
    assert fill("/u/{uid}?q={uid}", uid="a%20b") == ("/u/a%20b", b"q=a%20b")
    assert parse_qs(fill("/u?q={uid}", uid="a%20b")[1].decode()) == {"q": ["a b"]}
    # A bare space (already decoded) is encoded.
    assert fill("/u/{uid}?q={uid}", uid="a b") == ("/u/a%20b", b"q=a%20b")
    assert fill("/u/{uid}", uid="%C3%A9t%C3%A9") == ("/u/%C3%A9t%C3%A9", b"")
    # Bytes that are not UTF-8 are forwarded exactly as the client sent them.
    assert fill("/u/{uid}?q={uid}", uid="%FF%FE") == ("/u/%FF%FE", b"q=%FF%FE")


def test_fill_slashes_only_in_path_parameters_in_the_path() -> None:
    # An ordinary parameter cannot add a path segment...
    assert fill("/u/{uid}", uid="a/b") == ("/u/a%2Fb", b"")
    # ...a `{rest:path}` parameter keeps its slashes in the path, not in the query.
    rest = frozenset({"rest"})
    assert fill("/files/{rest}?p={rest}", rest, rest="a/b/c.txt") == (
        "/files/a/b/c.txt",
        b"p=a%2Fb%2Fc.txt",
    )


def test_fill_refuses_dot_segments() -> None:
    for value in ("..", "."):
        with pytest.raises(BadRequest, match="dot segment"):
            fill("/v1/users/{uid}/orders", uid=value)
    # Dots inside a segment, or in the query, are ordinary characters.
    assert fill("/v1/users/{uid}?q={q}", uid="a..b", q="..") == ("/v1/users/a..b", b"q=..")


# --------------------------------------------------------------------------- merge


async def test_key_nests_each_backends_json() -> None:
    agg = route(
        backend(Fake({"id": 1, "name": "Ada"}), key="user"),
        backend(Fake([{"id": 9}]), key="orders"),
        backend(Fake(b"3"), key="count"),
        backend(Fake(b"null"), key="nothing"),
    )
    status, headers, body = await run(agg)
    assert status == 200
    assert body == {
        "user": {"id": 1, "name": "Ada"},
        "orders": [{"id": 9}],
        "count": 3,
        "nothing": None,
    }
    assert headers[b"x-gateway-completed"] == b"true"
    assert headers[b"content-type"] == b"application/json"


async def test_flat_merge_in_backend_order_later_wins() -> None:
    # The first backend answers last: the order of the config decides, not arrival.
    agg = route(
        backend(Fake({"a": 1, "b": 1, "c": 1}, delay=0.05)),
        backend(Fake({"b": 2, "d": 2})),
        backend(Fake({"c": 3}, delay=0.02)),
    )
    _, headers, body = await run(agg)
    assert body == {"a": 1, "b": 2, "c": 3, "d": 2}
    assert list(body) == ["a", "b", "c", "d"]
    assert headers[b"x-gateway-completed"] == b"true"


async def test_flat_and_keyed_mix() -> None:
    agg = route(
        backend(Fake({"id": 1, "user": "shadowed"})),
        backend(Fake({"total": 2}), key="user"),
    )
    _, _, body = await run(agg)
    assert body == {"id": 1, "user": {"total": 2}}


async def test_fields_keep_only_those_and_rename_renames() -> None:
    agg = route(
        backend(
            Fake({"id": 1, "name": "Ada", "email": "a@x", "pw": "secret"}),
            fields=["id", "name", "missing"],
            rename={"name": "full_name"},
        ),
        backend(Fake({"id": 2, "tier": "gold"}), key="account", fields=["tier"]),
        backend(Fake({"count": 5, "x": 1}), rename={"count": "order_count"}),
    )
    _, _, body = await run(agg)
    assert body == {
        "id": 1,
        "full_name": "Ada",
        "account": {"tier": "gold"},
        "order_count": 5,
        "x": 1,
    }


async def test_fields_on_an_empty_list_keep_nothing() -> None:
    agg = route(backend(Fake({"a": 1}), fields=[]), backend(Fake({"b": 2})))
    _, _, body = await run(agg)
    assert body == {"b": 2}


@pytest.mark.parametrize(
    ("answer", "kind"),
    [(b"[1, 2]", "list"), (b'"text"', "str"), (b"42", "int"), (b"null", "NoneType")],
)
async def test_a_value_that_cannot_be_merged_fails_that_backend(answer: bytes, kind: str) -> None:
    bad = Fake(answer)
    agg = route(backend(Fake({"ok": True})), backend(bad, "/list"))
    status, headers, body = await run(agg)
    assert (status, body) == (200, {"ok": True})
    assert headers[b"x-gateway-completed"] == b"false"
    # The same backend as the only one: its failure is the answer, with a clear detail.
    error = await failure(route(backend(Fake(answer), "/list")))
    assert isinstance(error, UpstreamUnavailable)
    assert error.detail == (
        f"backend #0 (up /list) answered a JSON {kind}, which cannot be merged "
        "(only an object can be merged at the top level or filtered by fields)"
    )
    assert bad.closed == 1


async def test_fields_on_a_keyed_list_fail_that_backend() -> None:
    error = await failure(route(backend(Fake([1]), "/l", key="items", fields=["id"])))
    assert "backend items (up /l) answered a JSON list, which cannot be merged" in error.detail


@pytest.mark.parametrize(
    "answer",
    [b"<html>oops</html>", b"", b'{"a": 1', b"\xff\xfe\x00", b'{"a": NaN}', b"[Infinity]"],
)
async def test_a_body_that_is_not_json_fails_that_backend(answer: bytes) -> None:
    fake = Fake(answer)
    error = await failure(route(backend(fake, "/html", key="page")))
    assert isinstance(error, UpstreamUnavailable)
    assert error.status == 502
    assert error.detail == "backend page (up /html) answered a body that is not JSON"
    assert error.upstream == "up"
    assert fake.closed == 1


async def test_deep_nesting_is_a_backend_failure_not_a_crash() -> None:
    # Near Python's recursion limit a body either parses and is merged, or fails as a
    # gateway error; it never escapes as a RecursionError (a 500 for a backend's fault).
    for depth in (10, *range(960, 1010, 3), 5000):
        body = b"[" * depth + b"]" * depth
        agg = route(backend(Fake(body), key="deep"))
        try:
            status, _, _ = await agg.run({}, [], Deadline.after(5), "rid")
        except GatewayError as exc:
            assert exc.status == 502
        else:
            assert status == 200


@pytest.mark.parametrize("status", [204, 299])
async def test_any_2xx_is_a_success(status: int) -> None:
    _, _, body = await run(route(backend(Fake(b"{}", status=status), key="k")))
    assert body == {"k": {}}


@pytest.mark.parametrize("status", [199, 301, 304, 404, 429, 500, 503])
async def test_a_non_2xx_status_fails_that_backend(status: int) -> None:
    fake = Fake({"error": "nope"}, status=status)
    agg = route(backend(Fake({"ok": 1}), key="a"), backend(fake, "/v1/{id}", key="b"))
    _, headers, body = await run(agg, {"id": "7"})
    assert body == {"a": {"ok": 1}}
    assert headers[b"x-gateway-completed"] == b"false"
    error = await failure(route(backend(Fake({}, status=status), "/v1/x", key="b")))
    assert isinstance(error, UpstreamUnavailable)
    assert error.detail == f"backend b (up /v1/x) answered {status}"
    assert fake.closed == 1


async def test_max_response_size_is_per_backend() -> None:
    big = json.dumps({"blob": "x" * 4096}).encode()
    small = json.dumps({"y": "y" * 900}).encode()
    fat = Fake(chunks=[big[:1000], big[1000:2000], big[2000:]])
    agg = route(
        backend(fat, "/big", key="big"),
        backend(Fake(small), key="small"),  # under the cap: kept
        max_response_size=1024,
    )
    _, headers, body = await run(agg)
    assert body == {"small": {"y": "y" * 900}}
    assert headers[b"x-gateway-completed"] == b"false"
    assert fat.closed == 1
    error = await failure(route(backend(Fake(big), "/big", key="big"), max_response_size=1024))
    assert isinstance(error, UpstreamUnavailable)
    assert error.detail == (
        "backend big (up /big) answered more than max_response_size (1024 bytes)"
    )


async def test_max_response_size_is_inclusive() -> None:
    exact = b'{"a":"' + b"x" * 1016 + b'"}'
    assert len(exact) == 1024
    _, headers, body = await run(route(backend(Fake(exact), key="k"), max_response_size=1024))
    assert body == {"k": {"a": "x" * 1016}}
    assert headers[b"x-gateway-completed"] == b"true"


async def test_answer_headers_and_exact_body() -> None:
    status, headers, raw = await route(backend(Fake({"b": 1, "a": [1, 2]}))).run(
        {}, [], Deadline.after(5), "rid"
    )
    assert status == 200
    assert raw == b'{"b":1,"a":[1,2]}'
    assert headers == [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(raw)).encode()),
        (b"x-gateway-completed", b"true"),
    ]


async def test_every_response_is_closed() -> None:
    fakes = [Fake({"a": 1}), Fake(b"nope"), Fake({}, status=500), Fake(chunks=[b"x" * 2000])]
    agg = route(*(backend(f, key=f"k{i}") for i, f in enumerate(fakes)), max_response_size=1024)
    _, _, body = await run(agg)
    assert body == {"k0": {"a": 1}}
    assert [f.closed for f in fakes] == [1, 1, 1, 1]


# ------------------------------------------------------------------------- partial


async def test_partial_allow_leaves_a_failed_backend_out() -> None:
    agg = route(
        backend(Fake({"id": 1}), key="user", required=True),
        backend(Fake(raises=UpstreamUnavailable("refused", upstream="orders")), key="orders"),
        backend(Fake({"r": []}), key="recs"),
    )
    status, headers, body = await run(agg)
    assert status == 200
    assert body == {"user": {"id": 1}, "recs": {"r": []}}
    assert headers[b"x-gateway-completed"] == b"false"


async def test_a_required_backend_failing_fails_the_request() -> None:
    agg = route(
        backend(Fake({"id": 1}), key="orders"),
        backend(Fake(b"<html>"), "/v1/users/{uid}", key="user", required=True),
    )
    with pytest.raises(UpstreamUnavailable) as info:
        await agg.run({"uid": "42"}, [], Deadline.after(5), "rid")
    assert info.value.detail == "backend user (up /v1/users/{uid}) answered a body that is not JSON"


async def test_a_required_failure_wins_over_an_earlier_optional_one() -> None:
    agg = route(
        backend(Fake({}, status=500), "/a", key="optional"),
        backend(Fake(raises=UpstreamTimeout("late")), "/b", key="needed", required=True),
        backend(Fake({"ok": 1}), key="fine"),
    )
    error = await failure(agg)
    assert isinstance(error, UpstreamTimeout)
    assert error.detail == "backend needed (up /b): late"


async def test_all_failing_is_the_first_failure_in_backend_order() -> None:
    agg = route(
        backend(Fake(raises=UpstreamTimeout("slow"), delay=0.03), "/a", key="a"),
        backend(Fake({}, status=502), "/b", key="b"),  # fails first in time
    )
    error = await failure(agg)
    assert isinstance(error, UpstreamTimeout)
    assert error.status == 504
    assert error.code == "upstream_timeout"
    assert error.detail == "backend a (up /a): slow"


async def test_partial_fail_turns_any_failure_into_an_error() -> None:
    agg = route(
        backend(Fake({"id": 1}), key="user"),
        backend(Fake({}, status=404), "/orders", key="orders"),
        partial="fail",
    )
    error = await failure(agg)
    assert isinstance(error, UpstreamUnavailable)
    assert (error.status, error.code) == (502, "upstream_unavailable")
    assert error.detail == "backend orders (up /orders) answered 404"
    # Complete, it is an ordinary answer.
    complete = route(backend(Fake({"id": 1}), key="user"), partial="fail")
    _, headers, body = await run(complete)
    assert body == {"user": {"id": 1}}
    assert headers[b"x-gateway-completed"] == b"true"


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (UpstreamUnavailable("cannot connect to http://t"), 502, "upstream_unavailable"),
        (UpstreamTimeout("http://t did not answer in time"), 504, "upstream_timeout"),
        (UpstreamSaturated("queue full", retry_after=2), 503, "upstream_saturated"),
        (UpstreamUnhealthy("circuit open", retry_after=3), 503, "upstream_unhealthy"),
    ],
)
async def test_the_handlers_own_error_is_the_answer_naming_the_backend(
    error: GatewayError, status: int, code: str
) -> None:
    detail = error.detail
    agg = route(backend(Fake(raises=error), "/v1/users/{uid}", upstream="users", key="user"))
    with pytest.raises(GatewayError) as info:
        await agg.run({"uid": "1"}, [], Deadline.after(5), "rid")
    raised = info.value
    assert (raised.status, raised.code) == (status, code)
    assert raised.detail == f"backend user (users /v1/users/{{uid}}): {detail}"
    assert raised.upstream == "users"
    if status == 503:  # Retry-After survives
        assert any(name == b"retry-after" for name, _ in raised.headers)


async def test_an_unkeyed_backend_is_named_by_its_position() -> None:
    agg = route(backend(Fake({"a": 1})), backend(Fake({}, status=500), "/second"), partial="fail")
    error = await failure(agg)
    assert error.detail == "backend #1 (up /second) answered 500"


# ---------------------------------------------------------------- time and cancellation


async def test_backends_are_called_at_once() -> None:
    fakes = [Fake({f"k{i}": i}, delay=0.2) for i in range(3)]
    agg = route(*(backend(f) for f in fakes))
    started = time.monotonic()
    _, _, body = await run(agg)
    elapsed = time.monotonic() - started
    assert body == {"k0": 0, "k1": 1, "k2": 2}
    assert elapsed < 0.35, elapsed
    starts = [f.started_at for f in fakes if f.started_at is not None]
    assert len(starts) == 3
    assert max(starts) - min(starts) < 0.05


async def test_a_backend_timeout_bounds_that_backend_only() -> None:
    late = Fake({"late": True}, delay=2)
    slowish = Fake({"slowish": True}, delay=0.25)  # longer than the other's timeout
    agg = route(
        backend(late, "/recs", key="recs", timeout=0.1),
        backend(slowish, key="user"),
    )
    started = time.monotonic()
    status, headers, body = await run(agg)
    elapsed = time.monotonic() - started
    assert (status, body) == (200, {"user": {"slowish": True}})
    assert headers[b"x-gateway-completed"] == b"false"
    assert 0.24 <= elapsed < 0.5, elapsed
    assert late.cancelled
    # The backend's deadline is its own timeout, not the route's.
    assert late.started_at is not None
    assert late.requests[0].deadline.expires_at - late.started_at <= 0.11


async def test_a_backend_timeout_is_a_504_naming_it() -> None:
    agg = route(backend(Fake({}, delay=2), "/recs", key="recs", timeout=0.05, required=True))
    started = time.monotonic()
    error = await failure(agg)
    assert time.monotonic() - started < 0.3
    assert isinstance(error, UpstreamTimeout)
    assert error.detail == "backend recs (up /recs) did not answer within its timeout (50 ms)"


async def test_a_backend_timeout_longer_than_the_deadline_changes_nothing() -> None:
    fake = Fake({}, delay=2)
    agg = route(backend(fake, "/x", key="x", timeout=10))
    started = time.monotonic()
    error = await failure(agg, within=0.1)
    assert time.monotonic() - started < 0.3
    assert isinstance(error, UpstreamTimeout)
    assert error.detail == "backend x (up /x) did not answer within the route deadline"
    assert fake.requests[0].deadline.remaining() < 0


@pytest.mark.parametrize(
    ("own", "late"), [(0.05, "its timeout (50 ms)"), (None, "the route deadline")]
)
async def test_a_timeout_noticed_inside_the_chain_names_the_limit(
    own: float | None, late: str
) -> None:
    # Inner policies (deadline, try timeout) run timers for the same instant; when one
    # of them reports the timeout, the detail still says which limit passed.
    async def inner_timer(request: GatewayRequest) -> GatewayResponse:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            raise UpstreamTimeout("no answer within the route deadline (5 ms left)") from None
        raise AssertionError("not reached")

    agg = route(backend(inner_timer, "/r", key="r", timeout=own, required=True))
    error = await failure(agg, within=0.1)
    assert isinstance(error, UpstreamTimeout)
    assert error.detail == f"backend r (up /r) did not answer within {late}"


async def test_the_route_deadline_bounds_the_fan_out_and_cancels_stragglers() -> None:
    fast = Fake({"id": 1})
    slow = Fake({"late": 1}, delay=5)
    slow_body = Fake({"late": 2}, body_delay=5)  # headers in time, body never
    agg = route(
        backend(fast, key="user"),
        backend(slow, "/slow", key="slow"),
        backend(slow_body, "/slow-body", key="slow_body"),
    )
    started = time.monotonic()
    status, headers, body = await run(agg, within=0.2)
    elapsed = time.monotonic() - started
    assert 0.15 <= elapsed < 0.4, elapsed
    assert (status, body) == (200, {"user": {"id": 1}})
    assert headers[b"x-gateway-completed"] == b"false"
    # Cancelled by the time the answer exists, and the half-read response released.
    assert slow.cancelled and slow_body.cancelled
    assert slow_body.closed == 1


async def test_stragglers_are_cancelled_when_the_caller_is() -> None:
    # A client that goes away cancels the task running the route.
    fakes = [Fake({}, delay=5), Fake({}, body_delay=5)]
    agg = route(*(backend(f, key=f"k{i}") for i, f in enumerate(fakes)))
    task = asyncio.create_task(agg.run({}, [], Deadline.after(10), "rid"))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert all(f.cancelled for f in fakes)
    assert fakes[1].closed == 1


async def test_a_deadline_already_past_calls_nobody_for_long() -> None:
    fake = Fake({}, delay=1)
    started = time.monotonic()
    error = await failure(route(backend(fake, "/x", key="x")), within=0)
    assert time.monotonic() - started < 0.1
    assert isinstance(error, UpstreamTimeout)


# ------------------------------------------------------------------------- headers


INCOMING: Headers = [
    (b"x-request-id", b"rid-1"),
    (b"x-forwarded-for", b"10.0.0.1, 127.0.0.1"),
    (b"x-forwarded-proto", b"https"),
    (b"x-forwarded-host", b"api.example"),
    (b"authorization", b"Bearer t0k"),
    (b"cookie", b"session=1"),
    (b"content-type", b"text/plain"),
    (b"content-length", b"3"),
    (b"accept", b"text/html"),
    (b"x-custom", b"1"),
    (b"user-agent", b"curl/8"),
    (b"accept-language", b"fr"),
    (b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    (b"tracestate", b"k=v"),
]


async def test_forwarded_headers_reach_every_backend() -> None:
    fakes = [Fake({"a": 1}), Fake({"b": 2}, status=500)]
    agg = route(backend(fakes[0], key="a"), backend(fakes[1], key="b"))
    await run(agg, headers=INCOMING)
    for fake in fakes:
        (request,) = fake.requests
        assert request.method == "GET"
        assert request.route == "profile"
        assert request.request_id == "rid"
        assert request.body is None and request.stream is None
        assert sorted(request.headers) == sorted(
            [
                (b"x-request-id", b"rid-1"),
                (b"x-forwarded-for", b"10.0.0.1, 127.0.0.1"),
                (b"x-forwarded-proto", b"https"),
                (b"x-forwarded-host", b"api.example"),
                (b"authorization", b"Bearer t0k"),
                (b"user-agent", b"curl/8"),
                (b"accept-language", b"fr"),
                (b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
                (b"tracestate", b"k=v"),
                (b"accept", b"application/json"),
            ]
        )


async def test_forward_authorization_false_keeps_it_back() -> None:
    fake = Fake({"a": 1})
    await run(route(backend(fake, key="a"), forward_authorization=False), headers=INCOMING)
    names = {name for name, _ in fake.requests[0].headers}
    assert b"authorization" not in names
    assert b"x-request-id" in names


async def test_each_backend_is_sent_its_own_x_request_timeout_ms() -> None:
    # The real `Upstream.send` sets X-Request-Timeout-Ms from each backend's deadline.
    seen: dict[str, httpx.Request] = {}

    def answer(request: httpx.Request) -> httpx.Response:
        seen[request.url.path] = request
        # `json=` would make a response httpx treats as already read when streamed.
        body = json.dumps({request.url.path: True}).encode()
        return httpx.Response(200, stream=httpx.ByteStream(body))

    upstream = Upstream(
        "up",
        UpstreamSettings(targets=({"url": "http://up.test"},)),
        transport=httpx.MockTransport(answer),
    )
    try:
        agg = route(
            backend(upstream.send, "/route-deadline"),
            backend(upstream.send, "/own-timeout?x={uid}", timeout=0.5),
        )
        _, _, body = await run(agg, {"uid": "a b"}, INCOMING, within=3)
    finally:
        await upstream.aclose()
    assert body == {"/route-deadline": True, "/own-timeout": True}
    route_ms = int(seen["/route-deadline"].headers["x-request-timeout-ms"])
    own_ms = int(seen["/own-timeout"].headers["x-request-timeout-ms"])
    assert 2500 < route_ms <= 3000
    assert 400 < own_ms <= 500
    assert seen["/own-timeout"].url.query == b"x=a%20b"
    for request in seen.values():
        assert request.headers["x-request-id"] == "rid-1"
        assert request.headers["authorization"] == "Bearer t0k"
        assert "cookie" not in request.headers


# ----------------------------------------------------------------- config-time checks


def config(backends: str, extra: str = "") -> str:
    return textwrap.dedent(
        """\
        upstreams:
          users: {targets: ["http://127.0.0.1:9001"]}
          orders: {targets: ["http://127.0.0.1:9002"]}
        routes:
          - name: profile
            path: /api/profile/{uid}
            timeout: 800ms
        """
    ) + textwrap.indent(f"aggregate:\n{extra}  backends: {backends}\n", "    ")


def errors_of(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "gw.yaml")
    return "\n".join(info.value.errors)


def backends_yaml(n: int) -> str:
    return "[" + ", ".join(f"{{upstream: users, path: /u/{i}, key: k{i}}}" for i in range(n)) + "]"


def test_config_defaults_and_values() -> None:
    settings = load_config_text(
        config(
            '[{upstream: users, path: "/v1/users/{uid}", key: user, required: true, '
            "fields: [id, name], rename: {name: full_name}, timeout: 300ms}, "
            '{upstream: orders, path: "/orders?user={uid}"}]'
        ),
        "gw.yaml",
    )
    aggregate = settings.routes[0].aggregate
    assert aggregate is not None
    assert aggregate.partial == "allow"
    assert aggregate.max_response_size == 10 * 1024 * 1024
    first, second = aggregate.backends
    assert (first.key, first.required, first.timeout) == ("user", True, 0.3)
    assert first.fields == ("id", "name")
    assert first.rename == {"name": "full_name"}
    assert (second.key, second.required, second.timeout, second.fields) == (None, False, None, None)
    assert settings.routes[0].forward_authorization is True


def test_config_max_response_size_and_partial() -> None:
    settings = load_config_text(
        config(backends_yaml(1), "  partial: fail\n  max_response_size: 1KiB\n"), "gw.yaml"
    )
    aggregate = settings.routes[0].aggregate
    assert aggregate is not None
    assert (aggregate.partial, aggregate.max_response_size) == ("fail", 1024)


def test_config_zero_backends_is_an_error() -> None:
    assert "routes.0.aggregate.backends: Tuple should have at least 1 item" in errors_of(
        config("[]")
    )


def test_config_thirty_three_backends_is_an_error() -> None:
    load_config_text(config(backends_yaml(32)), "gw.yaml")  # the most allowed
    assert "routes.0.aggregate.backends: Tuple should have at most 32 items" in errors_of(
        config(backends_yaml(33))
    )


def test_config_duplicate_keys_are_an_error() -> None:
    text = config(
        "[{upstream: users, path: /a, key: user}, {upstream: orders, path: /b, key: user}, "
        "{upstream: orders, path: /c}, {upstream: orders, path: /d}]"
    )
    assert "backend keys must be unique; repeated: user" in errors_of(text)


def test_config_other_backend_errors() -> None:
    assert "partial: Input should be 'allow' or 'fail'" in errors_of(
        config(backends_yaml(1), "  partial: sometimes\n")
    )
    assert "unknown upstream 'nobody'" in errors_of(config("[{upstream: nobody, path: /a}]"))
    assert "uses user_id, which the path '/api/profile/{uid}' does not define" in errors_of(
        config('[{upstream: users, path: "/u/{user_id}"}]')
    )
    assert "a backend path must start with /" in errors_of(config("[{upstream: users, path: u}]"))
    assert "Extra inputs are not permitted" in errors_of(
        config("[{upstream: users, path: /u, keyy: x}]")
    )


def test_runtime_compiles_the_aggregate_route() -> None:
    settings = load_config_text(
        textwrap.dedent(
            """\
            upstreams:
              users: {targets: ["http://127.0.0.1:9001"]}
            routes:
              - name: files
                path: /files/{owner}/{rest:path}
                timeout: 2s
                forward_authorization: false
                aggregate:
                  partial: fail
                  max_response_size: 2KiB
                  backends:
                    - {upstream: users, path: "/meta/{owner}/{rest}", key: meta, timeout: 1s}
            """
        ),
        "gw.yaml",
    )
    runtime = build_runtime(settings)
    compiled = runtime.router.match("any", "GET", "/files/me/a/b.txt")
    agg = compiled.route.handler  # an aggregate route's handler is its fan-out
    assert isinstance(agg, AggregateRoute)
    assert (agg.timeout, agg.max_response_size, agg.allow_partial) == (2.0, 2048, False)
    assert b"authorization" not in agg.forwarded
    (only,) = agg.backends
    assert (only.key, only.timeout, only.upstream) == ("meta", 1.0, "users")
    # Only the `{rest:path}` parameter keeps its slashes.
    assert only.template.fill({"owner": "a/b", "rest": "x/y"}) == ("/meta/a%2Fb/x/y", b"")
