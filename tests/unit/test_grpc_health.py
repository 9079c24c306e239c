"""grpc.health.v1 messages, encoded and read by hand (upstream/health.py)."""

from __future__ import annotations

import pytest

from gateway.config.models import UpstreamSettings
from gateway.upstream.health import health_request, health_status


def frame(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


def test_a_request_is_one_uncompressed_grpc_message() -> None:
    assert health_request("") == frame(b"")
    assert health_request("pkg.Svc") == frame(b"\x0a\x07pkg.Svc")
    long = "s" * 200  # a length past one varint byte
    assert health_request(long) == frame(b"\x0a\xc8\x01" + long.encode())


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (frame(b"\x08\x01"), 1),  # SERVING
        (frame(b"\x08\x02"), 2),  # NOT_SERVING
        (frame(b""), 0),  # the default: UNKNOWN
        (frame(b"\x12\x02ab\x08\x01"), 1),  # an unknown field first is skipped
        (b"", None),
        (b"\x01\x00\x00\x00\x02\x08\x01", None),  # compressed: not read
        (b"\x00\x00\x00\x00\x05\x08", None),  # truncated
    ],
)
def test_the_status_is_read_from_the_first_message(body: bytes, status: int | None) -> None:
    assert health_status(body) == status


def test_grpc_health_checks_need_an_http2_upstream() -> None:
    check = {"grpc": True}
    UpstreamSettings(targets=["http://a"], protocol="http2", health_check=check)
    with pytest.raises(ValueError, match="protocol: http2"):
        UpstreamSettings(targets=["http://a"], health_check=check)
