"""Structured logs: application logs are JSON lines on stderr; the access log is one
JSON line per request on stdout.

Both are JSON with `ensure_ascii`, so a control character from client input (a newline,
an ANSI escape) is always written escaped (`\\n`, `\\u001b`) and one record stays one
line. Credentials never reach either: fields named like one (`authorization`, `cookie`,
`x-api-key`, ...) are masked, and bearer/basic credentials and anything shaped like a
JWT are cut out of messages, string fields and the access log's path."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time
from typing import TextIO

import orjson

__all__ = ["AccessLog", "JsonFormatter", "configure_logging", "scrub", "utc_now_iso"]

_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}


_SECRET_FIELDS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "x-api-key",
        "api_key",
        "apikey",
        "token",
        "access_token",
        "password",
        "secret",
    }
)
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*")
_CREDENTIAL = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}")
REDACTED = "***"


def scrub(text: str) -> str:
    """`text` without JWTs or bearer/basic credentials."""
    if "eyJ" in text:
        text = _JWT.sub("[jwt]", text)
    lowered = text.lower()
    if "bearer" in lowered or "basic" in lowered:
        text = _CREDENTIAL.sub(r"\1 " + REDACTED, text)
    return text


def _scrub_value(key: str, value: object) -> object:
    if key.lower() in _SECRET_FIELDS:
        return REDACTED
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {str(k): _scrub_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub_value("", v) for v in value]
    return value


class JsonFormatter(logging.Formatter):
    """One JSON object per log record, with its extra fields, credentials masked."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": scrub(record.getMessage()),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = _scrub_value(key, value)
        if record.exc_info:
            doc["exception"] = scrub(self.formatException(record.exc_info))
        return json.dumps(doc, default=lambda v: scrub(str(v)))


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    logging.getLogger("uvicorn.access").disabled = True
    # httpx logs every upstream request at INFO; the access log already says it once.
    logging.getLogger("httpx").setLevel(logging.WARNING)


class AccessLog:
    """One JSON line per request on stdout, written in small batches so a busy event
    loop makes one write per batch instead of one per request."""

    __slots__ = ("_buffer", "_flush_scheduled", "_second", "_second_text", "_stream")
    # With tracing on (`TracedAccessLog`), every line carries `trace_id` and `span_id`.
    traced = False

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream or sys.stdout
        self._buffer: list[str] = []
        self._flush_scheduled = False
        self._second = -1
        self._second_text = ""

    def now(self) -> str:
        """UTC time with milliseconds; the second is formatted once a second."""
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{int((now - second) * 1000):03d}Z"

    def write(self, record: dict[str, object]) -> None:
        path = record.get("path")
        if isinstance(path, str) and "eyJ" in path:  # a token in the path stays out
            record["path"] = scrub(path)
        self._buffer.append(orjson.dumps(record, default=str).decode())
        if len(self._buffer) >= 256:
            self.flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            try:
                asyncio.get_running_loop().call_later(0.05, self.flush)
            except RuntimeError:
                self.flush()

    def flush(self) -> None:
        self._flush_scheduled = False
        if self._buffer:
            lines = "\n".join(self._buffer) + "\n"
            self._buffer.clear()
            try:
                self._stream.write(lines)
                self._stream.flush()
            except (OSError, ValueError):  # stdout closed: never fail a request over it
                pass

    def __repr__(self) -> str:
        return f"AccessLog(pending={len(self._buffer)})"


def utc_now_iso() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
