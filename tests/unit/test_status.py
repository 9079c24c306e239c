"""The status board and document (gateway/ops/board.py, page.py): the per-route minute ring, the
percentiles read off its histogram, recent errors, and several snapshots summed."""

from __future__ import annotations

import math
import time
from typing import Any

import pytest

from gateway.config.models import GatewaySettings
from gateway.dataplane.state import Exchange
from gateway.ops.board import BOUNDS, MAX_ROUTES, RECENT_ERRORS, WINDOW, StatusBoard
from gateway.ops.page import process_info, quantile, render


def exchange(
    route: str | None = "r",
    error: str | None = None,
    detail: str | None = None,
    started: float | None = None,
) -> Exchange:
    ex = Exchange(time.monotonic() if started is None else started, "GET", "/p", "rid-1")
    ex.route, ex.error, ex.detail = route, error, detail
    return ex


def add(board: StatusBoard, second: int, elapsed: float, status: int = 200) -> None:
    """A request on route `r` that finished `elapsed` seconds after it started, within
    the monotonic clock's `second`."""
    board.record(exchange(started=second + 0.5 - elapsed), "r", status, elapsed)


def histogram(samples: list[float]) -> list[int]:
    board = StatusBoard()
    for s in samples:
        add(board, 1000, s)
    bins = [0] * (len(BOUNDS) + 1)
    for k, n in board.routes["r"].dump(1000)["buckets"][0][3]:
        bins[k] = n
    return bins


def test_route_window_keeps_one_minute_of_seconds() -> None:
    board = StatusBoard()
    add(board, 100, 0.010)
    add(board, 100, 0.020, 503)
    add(board, 130, 0.030)
    window = board.routes["r"]
    dumped = window.dump(130)
    assert (dumped["total"], dumped["errors_total"]) == (3, 1)
    assert sorted((s, n, e) for s, n, e, _ in dumped["buckets"]) == [(100, 2, 1), (130, 1, 0)]
    # A minute later second 100 has left the window; its slot is reused afresh.
    assert [b[0] for b in window.dump(100 + WINDOW)["buckets"]] == [130]
    add(board, 100 + WINDOW, 0.5)
    [(second, count, errors, _)] = [b for b in window.dump(100 + WINDOW)["buckets"] if b[0] != 130]
    assert (second, count, errors) == (100 + WINDOW, 1, 0)
    assert window.dump(100 + 2 * WINDOW)["buckets"] == []
    assert (window.total, window.errors_total) == (4, 1)


@pytest.mark.parametrize(
    "samples",
    [
        [0.005] * 100,
        [0.001 * (i + 1) for i in range(1000)],
        [0.002] * 98 + [1.5, 2.0],
    ],
)
def test_percentiles_are_within_a_bucket_of_the_truth(samples: list[float]) -> None:
    bins = histogram(samples)
    ordered = sorted(samples)
    for q in (0.5, 0.99):
        truth = ordered[math.ceil(q * len(ordered)) - 1]
        got = quantile(bins, q)
        assert got is not None
        assert truth / math.sqrt(2) <= got <= truth * math.sqrt(2), (q, truth, got)


def test_quantile_of_nothing_is_none_and_overflow_is_capped() -> None:
    assert quantile([0] * (len(BOUNDS) + 1), 0.5) is None
    assert quantile(histogram([10_000.0]), 0.99) == BOUNDS[-1]


def test_board_records_every_request_and_only_the_gateways_own_errors() -> None:
    board = StatusBoard()
    board.record(exchange("r"), "r", 200, 0.01)
    board.record(exchange("r"), "r", 502, 0.01)  # the upstream's 502: no detail
    board.record(exchange("r", "upstream_timeout", "too slow"), "r", 504, 2.0)
    assert (board.routes["r"].total, board.routes["r"].errors_total) == (3, 2)
    [error] = board.errors
    assert (error.route, error.status, error.code, error.detail) == (
        "r",
        504,
        "upstream_timeout",
        "too slow",
    )
    for i in range(RECENT_ERRORS + 10):
        board.record(exchange(None, "route_not_found", f"n{i}"), "(none)", 404, 0.001)
    assert len(board.errors) == RECENT_ERRORS
    assert board.errors[-1].detail == f"n{RECENT_ERRORS + 9}"


def test_board_bounds_the_number_of_routes() -> None:
    board = StatusBoard()
    for i in range(MAX_ROUTES + 5):
        board.record(exchange(f"r{i}"), f"r{i}", 200, 0.001)
    assert len(board.routes) == MAX_ROUTES


def settings() -> GatewaySettings:
    return GatewaySettings.model_validate(
        {
            "upstreams": {
                "u": {
                    "targets": ["http://a:1", "http://b:1"],
                    "max_concurrency": 4,
                    "circuit_breaker": {},
                    "health_check": {},
                }
            },
            "routes": [{"name": "r", "path": "/r", "upstream": "u"}],
        }
    )


def worker(
    now: int,
    requests: int,
    breaker: str,
    b_healthy: bool,
    errors: list[list[Any]],
    trial: int | None = None,
) -> dict[str, Any]:
    return {
        "pid": 1,
        "connections": 2,
        "draining": False,
        "routes": {
            "r": {
                "total": requests,
                "errors_total": 1,
                "buckets": [
                    [now, requests, 1, [[20, requests]]],
                    [now - WINDOW, 99, 99, [[1, 99]]],
                ],
            }
        },
        "upstreams": {
            "u": {
                "inflight": 1,
                "queued": 2,
                "max_concurrency": 4,
                "max_queue": 1024,
                "outcomes": {"2xx": requests, "saturated": 1},
                "breaker": {"state": breaker, "next_trial_in_s": trial},
                "retry_budget": {"retries": 1, "allowed": 100, "requests": requests},
                "targets": {
                    "http://a:1": {"healthy": True, "inflight": 1, "last_check": [10.0, True, ""]},
                    "http://b:1": {
                        "healthy": b_healthy,
                        "inflight": 0,
                        "last_check": [20.0 if not b_healthy else 5.0, b_healthy, "answered 503"],
                    },
                },
            }
        },
        "errors": errors,
    }


def test_render_sums_the_snapshots_of_several_workers() -> None:
    now = int(time.monotonic())
    error = [100.0, "x", "r", "GET", "/r", 503, "upstream_saturated", "full"]
    newer = [200.0, "y", "r", "GET", "/r", 504, "upstream_timeout", "slow"]
    snaps = [
        worker(now, 10, "closed", True, [error]),
        worker(now, 30, "open", False, [newer], trial=7),
    ]
    board = StatusBoard()
    doc = render(settings(), snaps, process_info(board, workers=2, snapshots=snaps, draining=False))
    assert (doc["process"]["workers_reporting"], doc["process"]["connections"]) == (2, 4)
    [route] = doc["routes"]
    # Only the last minute counts: the bucket a minute old is left out.
    assert (route["requests"], route["errors"], route["requests_total"]) == (40, 2, 40)
    assert route["series"]["requests"][-1] == 40
    assert route["rate_per_s"] == round(40 / WINDOW, 3)
    assert route["error_rate"] == 0.05
    assert BOUNDS[19] * 1000 <= route["p50_ms"] <= BOUNDS[20] * 1000
    [up] = doc["upstreams"]
    assert (up["inflight"], up["queued"], up["max_concurrency"]) == (2, 4, 8)
    assert (up["shed"], up["outcomes"]["2xx"]) == (2, 40)
    assert up["breaker"] == {"state": "open", "next_trial_in_s": 7}
    assert up["retry_budget"] == {"ratio": 0.2, "retries": 2, "allowed": 200, "requests": 40}
    a, b = up["targets"]
    assert (a["health"], a["inflight"]) == ("healthy", 2)
    # Unhealthy as soon as one worker's checks say so; the newest check is shown.
    assert b["health"] == "unhealthy"
    assert b["last_check"] == {"at": 20.0, "ok": False, "detail": "answered 503"}
    assert [e["request_id"] for e in doc["recent_errors"]] == ["y", "x"]


def test_render_before_any_worker_reports() -> None:
    board = StatusBoard()
    doc = render(settings(), [], process_info(board, workers=2, snapshots=[], draining=False))
    [route] = doc["routes"]
    assert (route["requests"], route["p99_ms"]) == (0, None)
    [up] = doc["upstreams"]
    assert up["breaker"] == {"state": "closed", "next_trial_in_s": None}
    assert [t["health"] for t in up["targets"]] == ["not_checked", "not_checked"]
    assert doc["recent_errors"] == []
