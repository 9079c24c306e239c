"""`proxy.parse_incoming`'s framing checks on their own: what the HTTP parser might let
through is still never forwarded ambiguously, and the upstream's framing headers are
always the gateway's own."""

from __future__ import annotations

import pytest

from gateway.dataplane.headers import parse_incoming


def h(*pairs: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v.encode("latin-1")) for k, v in pairs]


def framing(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    upstream = parse_incoming(headers).upstream
    return [(k, v) for k, v in upstream if k in (b"content-length", b"transfer-encoding")]


@pytest.mark.parametrize(
    ("headers", "error"),
    [
        (h(("content-length", "5"), ("transfer-encoding", "chunked")), "both"),
        (h(("transfer-encoding", "chunked"), ("content-length", "5")), "both"),
        (h(("content-length", "5"), ("content-length", "6")), "more than one Content-Length"),
        (h(("content-length", "5"), ("content-length", "5")), "more than one Content-Length"),
        (h(("content-length", "-1")), "invalid Content-Length"),
        (h(("content-length", "+5")), "invalid Content-Length"),
        (h(("content-length", "1_0")), "invalid Content-Length"),
        (h(("content-length", "0x5")), "invalid Content-Length"),
        (h(("content-length", "5, 5")), "invalid Content-Length"),
        (h(("content-length", "")), "invalid Content-Length"),
        (h(("content-length", "9" * 40)), "invalid Content-Length"),
        (h(("transfer-encoding", "gzip, chunked")), "unsupported Transfer-Encoding"),
        (h(("transfer-encoding", "identity")), "unsupported Transfer-Encoding"),
        (h(("transfer-encoding", "chunked"), ("transfer-encoding", "chunked")), "unsupported"),
        (h(("host", "a"), ("host", "b")), "more than one Host"),
    ],
)
def test_ambiguous_framing_is_flagged(headers: list[tuple[bytes, bytes]], error: str) -> None:
    incoming = parse_incoming(headers)
    assert incoming.framing_error is not None and error in incoming.framing_error


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (h(("content-length", "005 ")), [(b"content-length", b"5")]),
        (h(("content-length", "0")), [(b"content-length", b"0")]),
        (h(("transfer-encoding", "CHUNKED")), []),
        (h(("transfer-encoding", " chunked ")), []),
        (h(("connection", "content-length"), ("content-length", "3")), [(b"content-length", b"3")]),
        (h(("accept", "*/*")), []),
    ],
)
def test_the_upstream_framing_is_the_gateways_own(
    headers: list[tuple[bytes, bytes]], expected: list[tuple[bytes, bytes]]
) -> None:
    incoming = parse_incoming(headers)
    assert incoming.framing_error is None
    assert framing(headers) == expected


def test_a_chunked_request_is_marked_chunked() -> None:
    incoming = parse_incoming(h(("transfer-encoding", "Chunked")))
    assert incoming.chunked and incoming.content_length is None
