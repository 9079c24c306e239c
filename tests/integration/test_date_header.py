"""Every response carries exactly one `Date` (RFC 9110, 6.6.1): the upstream's when it
sent one, else the gateway's, and on every answer the gateway makes itself."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import pytest

from gateway.dataplane.headers import http_date
from tests.hardening.apps import RecordingApp
from tests.integration.harness import GatewayProcess, UpstreamServer


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    with (
        UpstreamServer(RecordingApp()) as dated,
        UpstreamServer(RecordingApp(), date_header=False) as undated,
    ):
        config: dict[str, Any] = {
            "upstreams": {
                "dated": {"targets": [dated.url]},
                "undated": {"targets": [undated.url]},
            },
            "routes": [
                {"name": "dated", "path": "/dated/{rest:path}", "upstream": "dated"},
                {"name": "undated", "path": "/undated/{rest:path}", "upstream": "undated"},
                {
                    "name": "limited",
                    "path": "/limited",
                    "upstream": "dated",
                    "rate_limit": {"rate": "1/s", "burst": 1, "key": "route"},
                },
            ],
        }
        with GatewayProcess(config, tmp_path_factory.mktemp("date")) as gw:
            yield gw


def dates(response: httpx.Response) -> list[str]:
    return response.headers.get_list("date")


def is_now(value: str) -> bool:
    return abs(parsedate_to_datetime(value).timestamp() - time.time()) < 5


def test_the_upstreams_date_is_kept_and_not_doubled(gw: GatewayProcess) -> None:
    response = httpx.get(gw.url + "/dated/x")
    assert response.status_code == 200
    assert len(dates(response)) == 1
    assert is_now(dates(response)[0])


def test_an_answer_without_a_date_gets_the_gateways(gw: GatewayProcess) -> None:
    response = httpx.get(gw.url + "/undated/x")
    assert response.status_code == 200
    [value] = dates(response)
    assert is_now(value)


def test_the_gateways_own_answers_carry_a_date(gw: GatewayProcess) -> None:
    not_found = httpx.get(gw.url + "/nowhere")
    assert not_found.status_code == 404
    [value] = dates(not_found)
    assert is_now(value)
    statuses = [httpx.get(gw.url + "/limited") for _ in range(3)]
    refused = [r for r in statuses if r.status_code == 429]
    assert refused
    assert all(len(dates(r)) == 1 for r in statuses)


def test_refusals_before_routing_carry_a_date(gw: GatewayProcess) -> None:
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        sock.sendall(
            b"GET /dated/x HTTP/1.1\r\nHost: gw.test\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
        )
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head = data.partition(b"\r\n\r\n")[0].decode("latin-1").lower()
    assert head.startswith("http/1.1 431")
    assert head.count("\r\ndate: ") == 1


def test_http_date_is_imf_fixdate_and_current() -> None:
    value = http_date().decode("ascii")
    assert value.endswith(" GMT")
    assert len(value) == len("Sun, 06 Nov 1994 08:49:37 GMT")
    assert is_now(value)
