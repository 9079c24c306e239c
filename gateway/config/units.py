"""Durations, sizes and rates as the contract writes them (`250ms`, `10MiB`, `100/s`)."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer

__all__ = ["Duration", "Rate", "Size", "parse_duration", "parse_rate", "parse_size"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|KB|MB|GB|K|M|G)?\s*$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "K": 1024,
    "M": 1024**2,
    "G": 1024**3,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|m|h)\s*$")
_RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any) -> float:
    """Seconds from `250ms`, `2s`, `1.5s`, `1m`, `1h` or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 250ms, 2s or 1m")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ValueError(f"invalid duration {value!r}: expected e.g. 250ms, 2s, 1.5s, 1m")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def parse_size(value: Any) -> int:
    """Bytes from `512`, `64KiB`, `10MiB`."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 512, 64KiB or 10MiB")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        size = int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])
    else:
        raise ValueError(f"invalid size {value!r}: expected e.g. 512, 64KiB, 10MiB")
    if size < 0:
        raise ValueError("a size cannot be negative")
    return size


def parse_rate(value: Any) -> float:
    """Events per second from `100/s`, `6000/m`, `50000/h`."""
    if isinstance(value, str) and (m := _RATE.match(value)):
        rate = float(m.group(1)) / _RATE_UNITS[m.group(2)]
        if rate <= 0:
            raise ValueError("a rate must be positive")
        return rate
    raise ValueError(f"invalid rate {value!r}: expected e.g. 100/s, 6000/m, 50000/h")


def _fmt_seconds(seconds: float) -> str:
    if seconds and seconds < 1:
        return f"{round(seconds * 1000)}ms"
    return f"{seconds:g}s"


Duration = Annotated[float, BeforeValidator(parse_duration), PlainSerializer(_fmt_seconds)]
Size = Annotated[int, BeforeValidator(parse_size)]
Rate = Annotated[float, BeforeValidator(parse_rate), PlainSerializer(lambda r: f"{r:g}/s")]
