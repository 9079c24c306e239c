"""gRPC's pieces of the data plane: grpc-timeout, grpc-message, the error mapping."""

from __future__ import annotations

import pytest

from gateway.dataplane.grpc import (
    GRPC_STATUS,
    grpc_error_headers,
    grpc_message,
    grpc_timeout,
    is_grpc,
    timeout_header,
)
from gateway.errors import (
    BadRequest,
    BodyTooLarge,
    GatewayError,
    MethodNotAllowed,
    RateLimited,
    RouteNotFound,
    ShuttingDown,
    Unauthorized,
    UpstreamSaturated,
    UpstreamTimeout,
    UpstreamUnavailable,
    UpstreamUnhealthy,
)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (b"1S", 1.0),
        (b"250m", 0.25),
        (b"2H", 7200.0),
        (b"3M", 180.0),
        (b"99999999u", 99.999999),
        (b"5n", 5e-9),
        (b"123456789m", None),  # more than 8 digits
        (b"1s", None),  # unknown unit
        (b"m", None),
        (b"-1S", None),
        (b"1.5S", None),
        (b"", None),
        (None, None),
    ],
)
def test_grpc_timeout_is_at_most_8_digits_and_a_unit(
    value: bytes | None, seconds: float | None
) -> None:
    got = grpc_timeout(value)
    if seconds is None:
        assert got is None
    else:
        assert got == pytest.approx(seconds)


def test_the_upstream_gets_whole_milliseconds_left() -> None:
    assert timeout_header(1.2345) == b"1234m"
    assert timeout_header(0.0001) == b"1m"  # never zero: a zero deadline is already past
    assert timeout_header(10**9) == b"99999999m"


def test_is_grpc_by_content_type_prefix() -> None:
    assert is_grpc(b"application/grpc")
    assert is_grpc(b"application/grpc+proto")
    assert is_grpc(b"Application/GRPC")
    assert not is_grpc(b"application/json")
    assert not is_grpc(None)


def test_grpc_message_percent_encodes_outside_printable_ascii() -> None:
    assert grpc_message("plain text: ok") == b"plain text: ok"
    assert grpc_message("100% caf\u00e9\n") == b"100%25 caf%C3%A9%0A"


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (RouteNotFound(), 12),
        (MethodNotAllowed(["GET"]), 12),
        (BodyTooLarge(), 8),
        (RateLimited(), 8),
        (Unauthorized(), 16),
        (UpstreamTimeout(), 4),
        (UpstreamUnavailable(), 14),
        (UpstreamSaturated(), 14),
        (UpstreamUnhealthy(), 14),
        (ShuttingDown(), 14),
        (BadRequest(), 13),
    ],
)
def test_the_contracts_status_mapping(error: GatewayError, status: int) -> None:
    headers = dict(grpc_error_headers(error, "rid"))
    assert headers[b"grpc-status"] == b"%d" % status
    assert headers[b"content-type"] == b"application/grpc"
    assert headers[b"x-request-id"] == b"rid"
    assert headers[b"grpc-message"].startswith(error.code.encode() + b": ")


def test_every_error_code_has_a_status() -> None:
    def leaves(cls: type[GatewayError]) -> list[type[GatewayError]]:
        found = [cls]
        for sub in cls.__subclasses__():
            found.extend(leaves(sub))
        return found

    codes = {cls.code for cls in leaves(GatewayError)}
    assert codes <= set(GRPC_STATUS)
