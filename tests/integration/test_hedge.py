"""Hedged requests against real upstreams and the real gateway process: a slow first
target is hedged to a fast one and the answer comes from the hedge, the slow upstream
sees its request cancelled, POSTs are not hedged, a zero budget sends no hedge, a
percentile needs twenty answers first, a single target is hedged to itself, and the
hedges are counted."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.counting_app import HARNESS_FILE_LEAK
from tests.integration.harness import GatewayProcess, UpstreamServer

pytestmark = HARNESS_FILE_LEAK

SLOW = 3.0  # seconds the slow target takes on /slow/... (unless the gateway hangs up)
SLOW_SHORT = 0.6


class TargetApp:
    """Answers 200 naming itself. On `/slow/...` with `slow` set it waits `slow` seconds
    for the gateway to hang up first (only on its first request with `first_only`);
    `gone` counts the requests it saw abandoned."""

    def __init__(self, name: str, slow: float = 0.0, *, first_only: bool = False) -> None:
        self.name = name
        self.slow = slow
        self.first_only = first_only
        self.methods: list[str] = []
        self.gone = 0
        self.all_gone = threading.Event()
        self._lock = threading.Lock()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        while (await receive()).get("more_body"):
            pass
        with self._lock:
            self.methods.append(scope["method"])
            first = len(self.methods) == 1
        if self.slow and scope["path"].startswith("/slow") and (first or not self.first_only):
            try:
                async with asyncio.timeout(self.slow):
                    while (await receive())["type"] != "http.disconnect":
                        pass
                with self._lock:
                    self.gone += 1
                    if self.gone == len(self.methods) or self.first_only:
                        self.all_gone.set()
                return
            except TimeoutError:
                pass
        body = self.name.encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", b"%d" % len(body))],
            }
        )
        await send({"type": "http.response.body", "body": body})


@dataclass
class Rig:
    """One gateway for the whole module (it starts slowly on a busy machine), one
    upstream of two targets, slow then fast, per case (one target for `single`),
    each with its own route."""

    gateway: GatewayProcess
    apps: dict[str, tuple[TargetApp, TargetApp]]


CASES: dict[str, tuple[float, dict[str, Any], dict[str, Any]]] = {
    # name: (slow target's delay, route hedge block, upstream settings)
    "hedged": (SLOW, {"after": "100ms"}, {"retries": {"attempts": 0}}),
    "posts": (SLOW_SHORT, {"after": "50ms"}, {}),
    "nobudget": (SLOW_SHORT, {"after": "50ms"}, {"retries": {"budget": "0%"}}),
    "pct": (SLOW_SHORT, {"after": "p95"}, {}),
    "single": (SLOW, {"after": "100ms"}, {}),
}


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    apps: dict[str, tuple[TargetApp, TargetApp]] = {}
    servers: list[UpstreamServer] = []
    config: dict[str, Any] = {
        "server": {"access_log": True, "log_level": "warning"},
        "upstreams": {},
        "routes": [],
    }
    for name, (delay, hedge, settings) in CASES.items():
        if name == "single":  # one target, slow on its first request only
            only = TargetApp("only", slow=delay, first_only=True)
            apps[name] = (only, only)
            targets = [only]
        else:
            apps[name] = (TargetApp("slow", slow=delay), TargetApp("fast"))
            targets = list(apps[name])
        urls = []
        for app in targets:
            servers.append(UpstreamServer(app).start())
            urls.append(servers[-1].url)
        config["upstreams"][name] = {"targets": urls, **settings}
        config["routes"].append(
            {
                "name": name,
                "path": f"/{name}/{{rest:path}}",
                "rewrite": "/{rest}",
                "upstream": name,
                "timeout": "5s",
                "hedge": hedge,
            }
        )
    gw = GatewayProcess(config, tmp_path_factory.mktemp("hedge"))
    try:
        yield Rig(gw.start(timeout=60), apps)
    finally:
        gw.stop()
        for server in servers:
            server.stop()


def counted(gw: GatewayProcess, name: str, case: str, winner: str | None = None) -> float:
    """A hedge counter of `case`'s route and upstream, 0 when absent."""
    labels = {"route": case, "upstream": case}
    if winner is not None:
        labels["winner"] = winner
    text = httpx.get(gw.admin_url + "/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def access_lines(gw: GatewayProcess, route: str, count: int) -> list[dict[str, Any]]:
    """The access-log lines of `route`, once `count` of them are written (the log is
    flushed every 50 ms)."""
    deadline = time.monotonic() + 5.0
    while True:
        lines = [json.loads(line) for line in gw.stdout.splitlines() if line.startswith("{")]
        mine = [line for line in lines if line.get("route") == route]
        if len(mine) >= count or time.monotonic() > deadline:
            return mine
        time.sleep(0.05)


def timed_get(client: httpx.Client, url: str) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = client.get(url)
    return response, time.monotonic() - started


def test_a_slow_target_is_hedged_to_a_fast_one_and_sees_the_disconnect(rig: Rig) -> None:
    gw = rig.gateway
    slow, fast = rig.apps["hedged"]
    with httpx.Client(timeout=10) as client:
        answers = [timed_get(client, gw.url + f"/hedged/slow/{i}") for i in range(4)]
    for response, elapsed in answers:
        assert (response.status_code, response.text) == (200, "fast")
        assert elapsed < 1.5, elapsed
    # Round robin sent two of the four first tries to the slow target; each was hedged,
    # and the gateway hung up on the slow target once the hedge had answered.
    hedged = len(slow.methods)
    assert hedged == 2
    assert len(fast.methods) == 4
    assert slow.all_gone.wait(2.0), (slow.gone, hedged)
    assert counted(gw, "gateway_hedges_total", "hedged") == hedged
    assert counted(gw, "gateway_hedge_wins_total", "hedged", "hedge") == hedged
    assert counted(gw, "gateway_hedge_wins_total", "hedged", "first") == 0
    # The access log says which requests were hedged and that the hedge answered.
    lines = access_lines(gw, "hedged", 4)
    hedges = [(line.get("hedges", 0), line.get("hedge_won", False)) for line in lines]
    assert sorted(hedges) == [(0, False), (0, False), (1, True), (1, True)]


def test_posts_are_not_hedged(rig: Rig) -> None:
    gw = rig.gateway
    slow, fast = rig.apps["posts"]
    with httpx.Client(timeout=10) as client:
        started = time.monotonic()
        bodies = [client.post(gw.url + f"/posts/slow/{i}", content=b"{}").text for i in range(2)]
        elapsed = time.monotonic() - started
    assert sorted(bodies) == ["fast", "slow"]  # the slow one waited for its own answer
    assert elapsed >= SLOW_SHORT
    assert slow.methods == ["POST"] and fast.methods == ["POST"]  # one copy each
    assert counted(gw, "gateway_hedges_total", "posts") == 0
    assert [line.get("hedges") for line in access_lines(gw, "posts", 2)] == [None, None]


def test_a_zero_budget_sends_no_hedge(rig: Rig) -> None:
    gw = rig.gateway
    slow, fast = rig.apps["nobudget"]
    with httpx.Client(timeout=10) as client:
        bodies = [client.get(gw.url + f"/nobudget/slow/{i}").text for i in range(2)]
    assert sorted(bodies) == ["fast", "slow"]
    assert len(slow.methods) + len(fast.methods) == 2
    assert counted(gw, "gateway_hedges_total", "nobudget") == 0


def test_a_percentile_hedges_only_after_twenty_answers(rig: Rig) -> None:
    gw = rig.gateway
    with httpx.Client(timeout=10) as client:
        cold = [timed_get(client, gw.url + f"/pct/slow/c{i}") for i in range(2)]
        assert sorted(r.text for r, _ in cold) == ["fast", "slow"]  # not hedged: 2 answers
        assert max(elapsed for _, elapsed in cold) >= SLOW_SHORT
        for i in range(18):  # answers 3..20, fast
            assert client.get(gw.url + f"/pct/quick/{i}").status_code == 200
        warm = [timed_get(client, gw.url + f"/pct/slow/w{i}") for i in range(2)]
    for response, elapsed in warm:
        assert response.text == "fast"
        assert elapsed < SLOW_SHORT, elapsed
    # At least the slow one; a fast answer slower than p95 may be hedged too.
    assert counted(gw, "gateway_hedges_total", "pct") >= 1


def test_a_single_target_is_hedged_to_itself_over_another_connection(rig: Rig) -> None:
    gw = rig.gateway
    only, _ = rig.apps["single"]
    with httpx.Client(timeout=10) as client:
        response, elapsed = timed_get(client, gw.url + "/single/slow/1")
    assert (response.status_code, response.text) == (200, "only")
    assert elapsed < 1.5, elapsed
    assert len(only.methods) == 2  # the first try and its hedge, both to the one target
    assert only.all_gone.wait(2.0)  # the first try's connection was closed
    assert counted(gw, "gateway_hedge_wins_total", "single", "hedge") == 1
