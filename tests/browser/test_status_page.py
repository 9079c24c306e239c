"""The status page (`GET /status` on the admin listener) in headless Chromium, against a
real gateway process with real upstreams: what it lists, that it follows the traffic,
health checks and the circuit breaker by itself, that names render as text, and that it
says plainly when the gateway stops answering."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

from tests.integration.counting_app import CountingApp
from tests.integration.harness import GatewayProcess, UpstreamServer

pytestmark = pytest.mark.browser

TOKEN = "status-page-t0k"
EVIL = "<script>alert('route')</script><img src=x onerror=alert(2)>"
ROUTES = [EVIL, "users", "flaky", "profile"]
SOON = 5_000  # ms: what "within a few seconds" means here


class Setup:
    def __init__(self, tmp: Path) -> None:
        self.stable = UpstreamServer(CountingApp("stable")).start()
        self.switch_app = CountingApp("switch")
        self.switch = UpstreamServer(self.switch_app).start()
        self.failing = UpstreamServer(CountingApp("failing", status=500)).start()
        self.gateway = GatewayProcess(
            config(self.stable, self.switch, self.failing), tmp, env={"STATUS_TOKEN": TOKEN}
        ).start()

    def close(self) -> None:
        self.gateway.stop()
        for server in (self.stable, self.switch, self.failing):
            server.stop()


def config(stable: UpstreamServer, switch: UpstreamServer, failing: UpstreamServer) -> Any:
    return {
        "server": {"access_log": False, "admin_token_env": "STATUS_TOKEN"},
        "upstreams": {
            "api": {
                "targets": [stable.url, {"url": switch.url, "weight": 2}],
                "health_check": {
                    "interval": "200ms",
                    "timeout": "500ms",
                    "unhealthy_threshold": 2,
                    "healthy_threshold": 1,
                },
            },
            "flaky": {
                "targets": [failing.url],
                "retries": {"attempts": 0},
                "circuit_breaker": {"min_requests": 3, "failure_ratio": 0.5, "open_for": "60s"},
            },
        },
        "routes": [
            {"name": EVIL, "path": "/evil", "upstream": "api"},
            {
                "name": "users",
                "path": "/users/{id}",
                "methods": ["GET"],
                "upstream": "api",
                "rate_limit": {"rate": "500/s", "burst": 500},
            },
            {"name": "flaky", "path": "/flaky", "upstream": "flaky"},
            {
                "name": "profile",
                "path": "/profile/{id}",
                "aggregate": {"backends": [{"upstream": "api", "path": "/u/{id}", "key": "u"}]},
            },
        ],
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    running = Setup(tmp_path_factory.mktemp("status-page"))
    yield running
    running.close()


class Watcher:
    """A page on /status that fails the test on any script error, CSP violation or
    dialog (an `alert` would mean a name ran as markup)."""

    def __init__(self, browser: Browser, admin_url: str, token: str | None = TOKEN) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.context = browser.new_context(
            extra_http_headers=headers, viewport={"width": 1400, "height": 1000}
        )
        self.page: Page = self.context.new_page()
        self.problems: list[str] = []
        self.page.on(
            "dialog", lambda d: (self.problems.append(f"dialog: {d.message}"), d.dismiss())
        )
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on(
            "console",
            lambda m: self.problems.append(f"console: {m.text}") if m.type == "error" else None,
        )
        self.page.goto(admin_url + "/status")
        expect(self.page.locator("#state")).to_have_text("live", timeout=SOON)

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def watcher(browser: Browser, setup: Setup) -> Iterator[Watcher]:
    w = Watcher(browser, setup.gateway.admin_url)
    yield w
    problems = list(w.problems)
    w.close()
    assert problems == []


def test_page_lists_every_route_and_target_and_names_render_as_text(
    watcher: Watcher, setup: Setup, tmp_path: Path
) -> None:
    page = watcher.page
    expect(page.locator("tr.route")).to_have_count(len(ROUTES))
    assert page.locator("tr.route td.name").all_inner_texts() == ROUTES
    expect(page.locator("tr.target")).to_have_count(3)
    urls = [t.get_attribute("data-url") for t in page.locator("tr.target").all()]
    assert urls == [setup.stable.url, setup.switch.url, setup.failing.url]
    assert page.locator(".upstream h3 .mono").all_inner_texts() == ["api", "flaky"]
    # The route named with markup is text: no element came out of it, nothing ran.
    evil = page.locator("tr.route").first
    assert evil.locator("td.name").inner_text() == EVIL
    assert evil.locator("td.name img, td.name script").count() == 0
    assert page.locator("img").count() == 0
    assert page.locator("script").count() == 1  # the page's own
    profile = page.locator('tr.route[data-name="profile"]')
    expect(profile).to_contain_text("aggregate: api /u/{id}")
    expect(page.locator('tr.route[data-name="users"]')).to_contain_text("500/s, burst 500")
    shot = tmp_path / "status.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 10_000


def test_counters_move_after_traffic(watcher: Watcher, setup: Setup) -> None:
    page = watcher.page
    row = page.locator('tr.route[data-name="users"]')
    expect(row.locator(".requests")).to_contain_text("0 in 1 min")
    with httpx.Client(base_url=setup.gateway.url, timeout=5) as client:
        for i in range(25):
            assert client.get(f"/users/{i}").status_code == 200
        missing = client.get("/no-such-route")
    expect(row.locator(".requests")).to_contain_text("25 in 1 min · 25 total", timeout=SOON)
    expect(row.locator(".rate")).not_to_have_text("0.00")
    expect(row.locator(".p50")).not_to_have_text("\u2013")  # the "no figure" dash
    # The gateway's own answer shows among the recent errors, by its request id.
    rid = missing.headers["x-request-id"]
    expect(page.locator("#errors tr.error").first).to_contain_text(rid, timeout=SOON)
    expect(page.locator("#errors tr.error").first.locator(".code")).to_have_text("route_not_found")


def test_a_target_failing_its_health_check_shows_unhealthy_then_recovers(
    watcher: Watcher, setup: Setup
) -> None:
    health = watcher.page.locator(f'tr.target[data-url="{setup.switch.url}"] .health')
    expect(health).to_have_text("healthy", timeout=SOON)
    setup.switch_app.health_status = 503
    try:
        expect(health).to_have_text("unhealthy", timeout=SOON)
        last = watcher.page.locator(f'tr.target[data-url="{setup.switch.url}"] .last-check')
        expect(last).to_contain_text("answered 503")
    finally:
        setup.switch_app.health_status = 200
    expect(health).to_have_text("healthy", timeout=SOON)


def test_an_open_circuit_shows_open(watcher: Watcher, setup: Setup) -> None:
    breaker = watcher.page.locator('.upstream[data-name="flaky"] .breaker')
    expect(breaker).to_have_text("circuit closed")
    with httpx.Client(base_url=setup.gateway.url, timeout=5) as client:
        statuses = [client.get("/flaky").status_code for _ in range(4)]
    assert statuses[-1] == 503  # refused by the open circuit
    expect(breaker).to_contain_text("circuit open", timeout=SOON)
    expect(breaker).to_contain_text("next trial in")


def test_page_says_plainly_when_the_gateway_stops_answering(
    browser: Browser, tmp_path: Path
) -> None:
    with UpstreamServer(CountingApp()) as up:
        gw = GatewayProcess(
            {
                "upstreams": {"api": {"targets": [up.url]}},
                "routes": [{"name": "r", "path": "/r", "upstream": "api"}],
            },
            tmp_path,
        ).start()
        try:
            w = Watcher(browser, gw.admin_url, token=None)
            banner = w.page.locator("#banner")
            expect(banner).to_be_hidden()
            started = time.monotonic()
            gw.stop()
            expect(w.page.locator("#state")).to_have_text("NOT ANSWERING", timeout=SOON)
            assert time.monotonic() - started < 5
            expect(banner).to_be_visible()
            expect(banner).to_contain_text("The gateway is not answering")
            expect(banner).to_contain_text("stale")
            w.close()
        finally:
            gw.stop()
