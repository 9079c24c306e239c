"""Active health checks: one background task per target probes `GET path` every `interval`.

`unhealthy_threshold` consecutive failures (a non-2xx answer, an error, or no answer
within `timeout`) take the target out of rotation (`target.healthy = False`; the
balancers skip it); `healthy_threshold` consecutive successes bring it back. Targets
start healthy, so traffic flows from the first moment and a checker only ever reacts
to evidence. Probes go through the upstream's own pooled client, bypass the bulkhead
(a full queue must not make a target look dead) and carry `X-Gateway-Health-Check: 1`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import httpx

from gateway.upstream.target import Target

__all__ = ["HealthCheck", "HealthChecker"]

log = logging.getLogger("gateway.health")

_PROBE_HEADERS = {"x-gateway-health-check": "1"}
_GRPC_CHECK = "/grpc.health.v1.Health/Check"
_GRPC_HEADERS = {
    "x-gateway-health-check": "1",
    "content-type": "application/grpc",
    "te": "trailers",
}
_SERVING = 1
_STATUS_NAMES: dict[int | None, str] = {
    None: "unreadable",
    0: "UNKNOWN",
    1: "SERVING",
    2: "NOT_SERVING",
    3: "SERVICE_UNKNOWN",
}


def health_request(service: str) -> bytes:
    """A gRPC message holding `HealthCheckRequest{service}`, encoded by hand (field 1,
    a length-delimited string) rather than with a protobuf runtime."""
    name = service.encode("utf-8")
    message = b"\x0a" + _varint(len(name)) + name if name else b""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def health_status(body: bytes) -> int | None:
    """The `status` (field 1, a varint) of the first `HealthCheckResponse` in a gRPC
    body; 0 (UNKNOWN) when the field is absent, None when the body is not one."""
    if len(body) < 5 or body[0] != 0:
        return None
    size = int.from_bytes(body[1:5], "big")
    message = body[5 : 5 + size]
    if len(message) != size:
        return None
    at = 0
    while at < len(message):
        key, at = _read_varint(message, at)
        if key is None:
            return None
        kind = key & 7
        if key >> 3 == 1 and kind == 0:
            value, at = _read_varint(message, at)
            return value
        if kind == 0:
            _, at = _read_varint(message, at)
        elif kind == 2:
            length, at = _read_varint(message, at)
            if length is None:
                return None
            at += length
        else:
            return None  # no other wire types in this message
    return 0


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(data: bytes, at: int) -> tuple[int | None, int]:
    value = shift = 0
    while at < len(data) and shift < 64:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7
    return None, len(data)


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """How an upstream's targets are probed (the `health_check` block's fields)."""

    path: str = "/healthz"  # the path probed with GET on every target
    interval: float = 5.0  # seconds between two probes of one target
    timeout: float = 1.0  # seconds a probe may take before it counts as failed
    healthy_threshold: int = 2  # consecutive successes that bring a target back
    unhealthy_threshold: int = 3  # consecutive failures that take it out of rotation
    grpc: bool = False  # probe grpc.health.v1.Health/Check rather than GET path
    service: str = ""  # the service asked about (grpc); "" is the server as a whole


class HealthChecker:
    """The health-check tasks of one upstream's targets; `start` and `aclose` are
    idempotent."""

    def __init__(
        self,
        upstream: str,
        targets: list[Target],
        settings: HealthCheck,
        client: httpx.AsyncClient,
    ) -> None:
        self.upstream = upstream
        self.targets = targets
        self.settings = settings
        self.client = client
        self._tasks: list[asyncio.Task[None]] = []
        # Consecutive results in the current direction, per target URL.
        self._successes: dict[str, int] = {t.url: 0 for t in targets}
        self._failures: dict[str, int] = {t.url: 0 for t in targets}
        # The latest probe per target URL, for the status page: (Unix time, ok, why not).
        self.last_checks: dict[str, tuple[float, bool, str]] = {}

    @property
    def running(self) -> bool:
        return any(not t.done() for t in self._tasks)

    def start(self) -> None:
        if self._tasks:
            return
        for target in self.targets:
            self._tasks.append(
                asyncio.create_task(
                    self._run(target), name=f"health-check {self.upstream} {target.url}"
                )
            )

    async def aclose(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self, target: Target) -> None:
        while True:
            try:
                ok, reason = await self.probe(target)
            except Exception as exc:  # a bug must not silently end this target's checks
                log.exception(
                    "health check failed unexpectedly",
                    extra={"upstream": self.upstream, "target": target.url},
                )
                ok, reason = False, f"{type(exc).__name__}: {exc}"
            self.observe(target, ok, reason)
            await asyncio.sleep(self.settings.interval)

    async def probe(self, target: Target) -> tuple[bool, str]:
        """One check: (healthy, why not)."""
        if self.settings.grpc:
            return await self._probe_grpc(target)
        url = target.base + self.settings.path
        try:
            async with asyncio.timeout(self.settings.timeout):
                async with self.client.stream("GET", url, headers=_PROBE_HEADERS) as response:
                    await response.aread()
        except TimeoutError:
            return False, f"no answer within {self.settings.timeout:g}s"
        except httpx.HTTPError as exc:
            return False, f"{type(exc).__name__}: {exc}".rstrip(": ")
        except OSError as exc:  # pragma: no cover - the transport maps these; belt and braces
            return False, f"{type(exc).__name__}: {exc}"
        if not 200 <= response.status_code < 300:
            return False, f"answered {response.status_code}"
        return True, ""

    async def _probe_grpc(self, target: Target) -> tuple[bool, str]:
        """`grpc.health.v1.Health/Check` for `service`: healthy when it says SERVING."""
        try:
            async with asyncio.timeout(self.settings.timeout):
                response = await self.client.post(
                    target.base + _GRPC_CHECK,
                    headers=_GRPC_HEADERS,
                    content=health_request(self.settings.service),
                )
        except TimeoutError:
            return False, f"no answer within {self.settings.timeout:g}s"
        except httpx.HTTPError as exc:
            return False, f"{type(exc).__name__}: {exc}".rstrip(": ")
        if response.status_code != 200:
            return False, f"answered {response.status_code}"
        status = response.headers.get("grpc-status")
        if status is not None and status != "0":  # a trailers-only error
            message = response.headers.get("grpc-message", "")
            return False, f"grpc-status {status} {message}".rstrip()
        serving = health_status(response.content)
        if serving != _SERVING:
            return False, f"health status {_STATUS_NAMES.get(serving, serving)}"
        return True, ""

    def observe(self, target: Target, ok: bool, reason: str = "") -> None:
        """Count one probe result and flip the target's state at a threshold."""
        url = target.url
        self.last_checks[url] = (time.time(), ok, reason)
        if ok:
            self._failures[url] = 0
            self._successes[url] += 1
            if not target.healthy and self._successes[url] >= self.settings.healthy_threshold:
                target.healthy = True
                log.info(
                    "target is healthy again after %d good checks",
                    self._successes[url],
                    extra={"upstream": self.upstream, "target": url, "healthy": True},
                )
        else:
            self._successes[url] = 0
            self._failures[url] += 1
            if target.healthy and self._failures[url] >= self.settings.unhealthy_threshold:
                target.healthy = False
                log.warning(
                    "target taken out of rotation after %d failed checks: %s",
                    self._failures[url],
                    reason,
                    extra={"upstream": self.upstream, "target": url, "healthy": False},
                )

    def __repr__(self) -> str:
        states = ", ".join(
            f"{t.url} {'up' if t.healthy else 'DOWN'}"
            f" (ok={self._successes[t.url]} fail={self._failures[t.url]})"
            for t in self.targets
        )
        return f"HealthChecker({self.upstream!r} every {self.settings.interval:g}s: {states})"
