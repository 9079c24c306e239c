from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import httpx
import pytest

from gateway.build.upstreams import Upstream
from gateway.config.models import HealthCheckSettings, UpstreamSettings
from gateway.upstream.health import HealthChecker
from gateway.upstream.target import Target


class FakeUpstreams:
    """A mock transport whose /healthz answer each target's `status` (or raises)."""

    def __init__(self) -> None:
        self.status: dict[str, int | Exception | float] = {}
        self.probes: dict[str, int] = {}

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        self.probes[host] = self.probes.get(host, 0) + 1
        assert request.url.path == "/healthz"
        assert request.headers["x-gateway-health-check"] == "1"
        answer = self.status.get(host, 200)
        if isinstance(answer, Exception):
            raise answer
        if isinstance(answer, float):
            await asyncio.sleep(answer)
            return httpx.Response(200)
        return httpx.Response(answer, text="ok")


def checker(
    fake: FakeUpstreams, targets: list[Target], **settings: float | str
) -> tuple[HealthChecker, httpx.AsyncClient]:
    client = httpx.AsyncClient(transport=httpx.MockTransport(fake))
    defaults: dict[str, float | str] = dict(
        interval=0.01, timeout=0.2, healthy_threshold=2, unhealthy_threshold=3
    )
    defaults.update(settings)
    return HealthChecker("u", targets, HealthCheckSettings(**defaults), client), client


async def wait_until(condition: Callable[[], bool], limit: float = 2.0) -> None:
    async with asyncio.timeout(limit):
        while not condition():  # noqa: ASYNC110 - the checker exposes no event to wait on
            await asyncio.sleep(0.005)


@pytest.mark.parametrize(
    ("answer", "healthy", "reason"),
    [
        (200, True, ""),
        (204, True, ""),
        (301, False, "answered 301"),
        (500, False, "answered 500"),
        (httpx.ConnectError("refused"), False, "ConnectError: refused"),
        (1.0, False, "no answer within 0.05s"),
    ],
)
async def test_probe(answer: int | Exception | float, healthy: bool, reason: str) -> None:
    fake = FakeUpstreams()
    fake.status["a"] = answer
    target = Target("http://a:80")
    hc, client = checker(fake, [target], timeout=0.05)
    async with client:
        assert await hc.probe(target) == (healthy, reason)


def test_thresholds_take_a_target_out_and_bring_it_back() -> None:
    target = Target("http://a:80")
    hc, _ = checker(FakeUpstreams(), [target], healthy_threshold=2, unhealthy_threshold=3)
    hc.observe(target, False)
    hc.observe(target, False)
    hc.observe(target, True)  # the streak is broken
    hc.observe(target, False)
    hc.observe(target, False)
    assert target.healthy
    hc.observe(target, False)
    assert not target.healthy
    hc.observe(target, True)
    assert not target.healthy
    hc.observe(target, False)
    hc.observe(target, True)
    assert not target.healthy
    hc.observe(target, True)
    assert target.healthy
    assert "http://a:80 up (ok=2 fail=0)" in repr(hc)


async def test_checks_run_per_target_until_closed(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeUpstreams()
    a, b = Target("http://a:80"), Target("http://b:80")
    hc, client = checker(fake, [a, b], unhealthy_threshold=2, healthy_threshold=2)
    async with client:
        with caplog.at_level(logging.INFO, logger="gateway.health"):
            hc.start()
            hc.start()  # idempotent
            assert hc.running
            fake.status["a"] = 500
            await wait_until(lambda: not a.healthy)
            assert b.healthy
            fake.status["a"] = 200
            await wait_until(lambda: a.healthy)
            await hc.aclose()
        assert not hc.running
        probes = dict(fake.probes)
        await asyncio.sleep(0.05)
        assert fake.probes == probes  # no checks after aclose
    changes = [(r.upstream, r.target, r.healthy) for r in caplog.records]
    assert changes == [("u", "http://a:80", False), ("u", "http://a:80", True)]
    assert caplog.records[0].levelname == "WARNING"
    assert "answered 500" in caplog.records[0].getMessage()


async def test_a_probe_that_crashes_counts_as_a_failure_and_checks_go_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeUpstreams()
    a = Target("http://a:80")
    hc, client = checker(fake, [a], unhealthy_threshold=1)

    async def broken(target: Target) -> tuple[bool, str]:
        raise RuntimeError("bug")

    hc.probe = broken  # type: ignore[method-assign]
    async with client:
        with caplog.at_level(logging.ERROR, logger="gateway.health"):
            hc.start()
            await wait_until(lambda: not a.healthy)
            await asyncio.sleep(0.03)
            assert hc.running
            await hc.aclose()
    assert any(r.exc_info for r in caplog.records)


async def test_upstream_starts_and_stops_its_health_checks() -> None:
    fake = FakeUpstreams()
    settings = UpstreamSettings.model_validate(
        {
            "targets": ["http://a:80", "http://b:80"],
            "health_check": {"interval": "10ms", "unhealthy_threshold": 1},
        }
    )
    upstream = Upstream("u", settings, transport=httpx.MockTransport(fake))
    assert upstream.health is not None
    fake.status["b"] = 503
    await upstream.start()
    await wait_until(lambda: not upstream.targets[1].healthy)
    assert upstream.targets[0].healthy
    await upstream.aclose()
    assert not upstream.health.running


async def test_no_health_check_configured_means_no_tasks() -> None:
    settings = UpstreamSettings.model_validate({"targets": ["http://a:80"]})
    upstream = Upstream("u", settings, transport=httpx.MockTransport(FakeUpstreams()))
    assert upstream.health is None
    await upstream.start()
    await upstream.aclose()
