"""Shared by the edge-policy integration tests: an upstream that echoes what it was sent,
and reading one metric off a gateway's admin listener."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.harness import GatewayProcess
from tests.integration.redis_keys import SHARED_REDIS, scratch_prefix

__all__ = ["SHARED_REDIS", "EchoApp", "metric", "redis_prefix_of_its_own"]


class EchoApp:
    """Answers 200 with JSON `{path, method, headers}` (headers as a name -> value dict,
    repeated names joined with ', ') and counts requests; `serve` maps paths to fixed
    JSON bodies (e.g. a JWKS document)."""

    def __init__(self) -> None:
        self.requests = 0
        self.serve: dict[str, Any] = {}
        self._lock = threading.Lock()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if not message.get("more_body"):
                break
        if scope["path"] in self.serve:
            body = json.dumps(self.serve[scope["path"]]).encode()
        else:
            with self._lock:
                self.requests += 1
            headers: dict[str, str] = {}
            for name, value in scope["headers"]:
                key = name.decode("latin-1")
                text = value.decode("latin-1")
                headers[key] = f"{headers[key]}, {text}" if key in headers else text
            body = json.dumps(
                {"path": scope["path"], "method": scope["method"], "headers": headers}
            ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def metric(gw: GatewayProcess, name: str, **labels: str) -> float:
    """The value of one sample on the admin /metrics (0 when absent)."""
    text = httpx.get(gw.admin_url + "/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def redis_prefix_of_its_own(tag: str) -> Iterator[str]:
    """A key prefix of one test's own in the shared Redis, its keys deleted afterwards:
    what a fixture yields from."""
    with scratch_prefix(tag) as prefix:
        yield prefix
