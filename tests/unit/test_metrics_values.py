"""In a single process the gateway's figures are counted without a lock per increment
(`LoopValue`); what /metrics shows is the same."""

from __future__ import annotations

import pytest
from prometheus_client import values
from prometheus_client.parser import text_string_to_metric_families

from gateway.ops.metrics import LoopValue, Metrics, UpstreamStats, render


def sample(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"{name} {labels} not exposed")


def test_single_process_figures_count_without_locks_and_expose_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(values, "ValueClass", values.MutexValue)
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    metrics = Metrics()
    assert values.ValueClass is LoopValue
    requests = metrics.requests.labels("r", "GET", "200")
    assert isinstance(requests._value, LoopValue)
    for _ in range(3):
        requests.inc()
    metrics.duration.labels("r").observe(0.003)
    stats = UpstreamStats(metrics, "u")
    stats.inflight.inc()
    stats.inflight.inc()
    stats.inflight.dec()
    stats.record("2xx", 0.002)
    text = render(metrics).decode()
    assert sample(text, "gateway_requests_total", route="r", method="GET", status="200") == 3
    assert sample(text, "gateway_request_duration_seconds_bucket", route="r", le="0.005") == 1
    assert sample(text, "gateway_request_duration_seconds_bucket", route="r", le="0.0025") == 0
    assert sample(text, "gateway_request_duration_seconds_sum", route="r") == pytest.approx(0.003)
    assert sample(text, "gateway_upstream_inflight", upstream="u") == 1
    assert sample(text, "gateway_upstream_requests_total", upstream="u", outcome="2xx") == 1


def test_other_value_classes_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Multiprocess mode (file-backed values) keeps prometheus-client's own class."""

    class FileBacked(values.MutexValue):
        pass

    monkeypatch.setattr(values, "ValueClass", FileBacked)
    metrics = Metrics()
    assert values.ValueClass is FileBacked
    assert isinstance(metrics.requests.labels("r", "GET", "200")._value, FileBacked)
