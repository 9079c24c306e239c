"""Durations, sizes and rates as the contract spells them."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from gateway.config.units import Duration, Rate, Size, parse_duration, parse_rate, parse_size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("2s", 2.0),
        ("1.5s", 1.5),
        ("1m", 60.0),
        ("1h", 3600.0),
        ("0ms", 0.0),
        (" 300ms ", 0.3),
        ("3", 3.0),
        ("0.5", 0.5),
        (3, 3.0),
        (0.25, 0.25),
    ],
)
def test_durations(text: Any, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "bad", ["", "fast", "2 parsecs", "-1s", "1.5.0s", "ms", "2d", "1e3", True, None, [1], -1]
)
def test_bad_durations_raise(bad: Any) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512", 512),
        (512, 512),
        ("0", 0),
        ("64KiB", 64 * 1024),
        ("10MiB", 10 * 1024 * 1024),
        ("1GiB", 1024**3),
        ("1.5KiB", 1536),
        ("1KB", 1000),
        ("2MB", 2_000_000),
    ],
)
def test_sizes(text: Any, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["", "big", "10 parsecs", "-5", "10TiB", "KiB", True, None, 1.5])
def test_bad_sizes_raise(bad: Any) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


@pytest.mark.parametrize(
    ("text", "per_second"),
    [
        ("100/s", 100.0),
        ("6000/m", 100.0),
        ("50000/h", 50000 / 3600),
        ("1/m", 1 / 60),
        (" 10 / s ", 10.0),
    ],
)
def test_rates(text: str, per_second: float) -> None:
    assert parse_rate(text) == pytest.approx(per_second)


@pytest.mark.parametrize("bad", ["", "100", "100/d", "/s", "0/s", "-1/s", "fast/s", 100, None])
def test_bad_rates_raise(bad: Any) -> None:
    with pytest.raises(ValueError):
        parse_rate(bad)


def test_annotated_types_validate_and_reject_through_pydantic() -> None:
    assert TypeAdapter(Duration).validate_python("250ms") == pytest.approx(0.25)
    assert TypeAdapter(Size).validate_python("64KiB") == 65536
    assert TypeAdapter(Rate).validate_python("6000/m") == pytest.approx(100.0)
    for adapter, bad in ((Duration, "soon"), (Size, "huge"), (Rate, "lots")):
        with pytest.raises(ValidationError):
            TypeAdapter(adapter).validate_python(bad)


def test_durations_serialise_back_to_the_contract_spelling() -> None:
    adapter = TypeAdapter(Duration)
    assert adapter.dump_python(0.25) == "250ms"
    assert adapter.dump_python(2.0) == "2s"
    assert parse_duration(adapter.dump_python(1.5)) == pytest.approx(1.5)
