"""Headers both ways: hop-by-hop removal, X-Forwarded-*, X-Request-ID."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from gateway.dataplane.headers import add_forwarded, parse_incoming, response_headers

HOP_BY_HOP = [
    (b"connection", b"keep-alive"),
    (b"keep-alive", b"timeout=5"),
    (b"te", b"trailers"),
    (b"trailer", b"x-checksum"),
    (b"transfer-encoding", b"chunked"),
    (b"upgrade", b"h2c"),
    (b"proxy-authorization", b"Basic c2VjcmV0"),
    (b"proxy-authenticate", b"Basic"),
    (b"proxy-connection", b"keep-alive"),
]


def names(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [n.lower() for n, _ in headers]


def values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for n, v in headers if n.lower() == name]


def scope(client: str = "10.0.0.7", scheme: str = "http") -> dict[str, Any]:
    return {"type": "http", "client": (client, 55555), "scheme": scheme}


# --- parse_incoming -------------------------------------------------------------------


def test_hop_by_hop_headers_are_not_sent_upstream() -> None:
    raw = [(b"host", b"gw.example"), (b"accept", b"*/*"), *HOP_BY_HOP, (b"x-app", b"1")]
    incoming = parse_incoming(raw)
    up = names(incoming.upstream)
    for name, _ in HOP_BY_HOP:
        assert name not in up
    assert (b"accept", b"*/*") in incoming.upstream
    assert (b"x-app", b"1") in incoming.upstream
    assert incoming.chunked is True
    assert incoming.host == "gw.example"


def test_headers_named_in_connection_are_dropped() -> None:
    raw = [
        (b"host", b"gw"),
        (b"connection", b"Foo, x-Secret ,  keep-alive"),
        (b"connection", b"bar"),
        (b"foo", b"1"),
        (b"x-secret", b"2"),
        (b"bar", b"3"),
        (b"baz", b"4"),
    ]
    incoming = parse_incoming(raw)
    up = names(incoming.upstream)
    for name in (b"connection", b"foo", b"x-secret", b"bar"):
        assert name not in up
    assert (b"baz", b"4") in incoming.upstream


def test_content_length_named_in_connection_is_still_forwarded_for_framing() -> None:
    incoming = parse_incoming([(b"connection", b"content-length"), (b"content-length", b"5")])
    assert (b"content-length", b"5") in incoming.upstream


def test_content_length_named_in_connection_is_still_read() -> None:
    incoming = parse_incoming([(b"connection", b"content-length"), (b"content-length", b"5")])
    assert incoming.content_length == 5


def test_gateway_owned_headers_are_replaced_not_forwarded() -> None:
    raw = [
        (b"host", b"gw"),
        (b"x-request-id", b"abc"),
        (b"x-forwarded-for", b"1.2.3.4"),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-host", b"orig"),
        (b"x-request-timeout-ms", b"250"),
        (b"expect", b"100-continue"),
    ]
    incoming = parse_incoming(raw)
    assert incoming.upstream == []
    assert incoming.forwarded_for == b"1.2.3.4"
    assert incoming.forwarded_proto == b"https"
    assert incoming.forwarded_host == b"orig"
    assert incoming.timeout_ms == 250
    assert incoming.request_id == "abc"


@pytest.mark.parametrize(
    "rid",
    [b"abc-123", b"x" * 128, b"!~" * 64, b"550e8400-e29b-41d4-a716-446655440000", b"a"],
)
def test_a_sane_request_id_is_kept(rid: bytes) -> None:
    assert parse_incoming([(b"x-request-id", rid)]).request_id == rid.decode()


@pytest.mark.parametrize(
    "rid", [b"", b"x" * 129, b"has space", b"tab\there", b"caf\xc3\xa9", b"nul\x00", b"\x7f"]
)
def test_an_insane_request_id_is_replaced(rid: bytes) -> None:
    rid_out = parse_incoming([(b"x-request-id", rid)]).request_id
    assert rid_out != rid.decode("latin-1")
    assert 0 < len(rid_out) <= 128
    assert all(0x21 <= ord(c) <= 0x7E for c in rid_out)


def test_a_missing_request_id_is_generated_fresh_each_time() -> None:
    a = parse_incoming([]).request_id
    b = parse_incoming([]).request_id
    assert a != b
    assert len(a) >= 16
    assert a.isascii() and a.isalnum()


def test_content_length_chunked_and_timeout_are_read() -> None:
    incoming = parse_incoming([(b"content-length", b"2048")])
    assert incoming.content_length == 2048
    assert incoming.chunked is False
    assert incoming.timeout_ms is None
    assert parse_incoming([(b"transfer-encoding", b"Chunked")]).chunked is True
    assert parse_incoming([(b"x-request-timeout-ms", b"nonsense")]).timeout_ms is None
    assert parse_incoming([(b"x-request-timeout-ms", b"-5")]).timeout_ms == 0


def test_repeated_x_forwarded_for_headers_are_joined_in_order() -> None:
    incoming = parse_incoming([(b"x-forwarded-for", b"1.1.1.1"), (b"x-forwarded-for", b"2.2.2.2")])
    assert incoming.forwarded_for == b"1.1.1.1, 2.2.2.2"


# --- add_forwarded --------------------------------------------------------------------


def test_forwarded_headers_are_set_from_the_connection() -> None:
    incoming = parse_incoming([(b"host", b"api.example.com:8080"), (b"x-request-id", b"rid-1")])
    add_forwarded(incoming, scope(client="10.0.0.7", scheme="http"), ())
    up = incoming.upstream
    assert values(up, b"x-forwarded-for") == [b"10.0.0.7"]
    assert values(up, b"x-forwarded-proto") == [b"http"]
    assert values(up, b"x-forwarded-host") == [b"api.example.com:8080"]
    assert values(up, b"x-request-id") == [b"rid-1"]


def test_x_forwarded_for_is_appended_to() -> None:
    incoming = parse_incoming([(b"host", b"gw"), (b"x-forwarded-for", b"1.2.3.4, 5.6.7.8")])
    add_forwarded(incoming, scope(client="127.0.0.1"), ())
    assert values(incoming.upstream, b"x-forwarded-for") == [b"1.2.3.4, 5.6.7.8, 127.0.0.1"]


def test_untrusted_client_cannot_set_forwarded_proto_or_host() -> None:
    raw = [(b"host", b"gw"), (b"x-forwarded-proto", b"https"), (b"x-forwarded-host", b"evil")]
    incoming = parse_incoming(raw)
    trusted = (ipaddress.ip_network("192.168.0.0/16"),)
    add_forwarded(incoming, scope(client="10.0.0.7", scheme="http"), trusted)
    assert values(incoming.upstream, b"x-forwarded-proto") == [b"http"]
    assert values(incoming.upstream, b"x-forwarded-host") == [b"gw"]


def test_trusted_proxy_forwarded_proto_and_host_are_kept() -> None:
    raw = [(b"host", b"gw"), (b"x-forwarded-proto", b"https"), (b"x-forwarded-host", b"shop")]
    incoming = parse_incoming(raw)
    trusted = (ipaddress.ip_network("10.0.0.0/8"),)
    add_forwarded(incoming, scope(client="10.0.0.7", scheme="http"), trusted)
    assert values(incoming.upstream, b"x-forwarded-proto") == [b"https"]
    assert values(incoming.upstream, b"x-forwarded-host") == [b"shop"]


def test_each_forwarded_header_is_sent_exactly_once() -> None:
    raw = [
        (b"host", b"gw"),
        (b"x-forwarded-for", b"1.2.3.4"),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-host", b"a"),
        (b"x-request-id", b"r"),
    ]
    incoming = parse_incoming(raw)
    add_forwarded(incoming, scope(scheme="https"), ())
    up = names(incoming.upstream)
    for name in (b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"x-request-id"):
        assert up.count(name) == 1, name
    assert values(incoming.upstream, b"x-forwarded-proto") == [b"https"]


# --- response_headers -----------------------------------------------------------------


def test_response_hop_by_hop_headers_are_dropped() -> None:
    raw = [
        (b"Content-Type", b"text/plain"),
        (b"Connection", b"x-secret, Keep-Alive"),
        (b"X-Secret", b"1"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Upgrade", b"websocket"),
        (b"Trailer", b"x-sum"),
        (b"Proxy-Authenticate", b"Basic"),
        (b"TE", b"trailers"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
    ]
    out = response_headers(raw, b"rid-9")
    out_names = names(out)
    for gone in (
        b"connection",
        b"x-secret",
        b"keep-alive",
        b"transfer-encoding",
        b"upgrade",
        b"trailer",
        b"proxy-authenticate",
        b"te",
    ):
        assert gone not in out_names, gone
    assert values(out, b"set-cookie") == [b"a=1", b"b=2"]
    assert values(out, b"content-type") == [b"text/plain"]


def test_response_carries_the_gateways_request_id_only() -> None:
    out = response_headers([(b"x-request-id", b"upstream-made-this")], b"rid-9")
    assert values(out, b"x-request-id") == [b"rid-9"]
    out = response_headers([(b"date", b"Sun, 06 Nov 1994 08:49:37 GMT")], b"rid-10")
    assert out == [(b"date", b"Sun, 06 Nov 1994 08:49:37 GMT"), (b"x-request-id", b"rid-10")]


def test_a_response_without_date_gets_one() -> None:
    out = response_headers([(b"content-type", b"text/plain")], b"r")
    assert [n for n, _ in out] == [b"content-type", b"x-request-id", b"date"]
    assert values(out, b"date")[0].endswith(b" GMT")
    kept = response_headers([(b"Date", b"Sun, 06 Nov 1994 08:49:37 GMT")], b"r")
    assert [n for n, _ in kept] == [b"Date", b"x-request-id"]


def test_response_headers_keep_order_and_case_of_the_rest() -> None:
    raw = [(b"X-B", b"2"), (b"x-a", b"1"), (b"Content-Length", b"3")]
    out = response_headers(raw, b"r")
    assert out[:3] == raw
