"""Raw-socket HTTP for hostile-client tests: send bytes exactly as given (no client-side
normalisation) and read what comes back, noting whether the server closed."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

import httpx

__all__ = ["Answer", "connect", "exchange", "read_answer", "serves_normally"]


@dataclass
class Answer:
    """The first response on a connection (`status` None: closed without one)."""

    status: int | None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    complete: bool = False  # the body arrived whole by its own framing
    closed: bool = False  # the server closed the connection afterwards
    raw: bytes = b""

    @property
    def is_5xx(self) -> bool:
        return self.status is not None and self.status >= 500


def connect(port: int, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def _recv(sock: socket.socket, deadline: float) -> bytes | None:
    """One read: bytes, b"" on EOF, None when `deadline` passed first."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return None
    sock.settimeout(remaining)
    try:
        return sock.recv(65536)
    except TimeoutError:
        return None
    except ConnectionResetError:
        return b""


def read_answer(
    sock: socket.socket,
    timeout: float = 5.0,
    close_within: float = 1.0,
    leftover: bytearray | None = None,
) -> Answer:
    """Read one response by its framing, then wait up to `close_within` for EOF. Bytes
    read past this response (a pipelined next one) go to `leftover` when given, and
    are read from it first."""
    deadline = time.monotonic() + timeout
    data = bytes(leftover or b"")
    if leftover is not None:
        leftover.clear()
    while b"\r\n\r\n" not in data:
        chunk = _recv(sock, deadline)
        if not chunk:
            return Answer(None, raw=data, closed=chunk == b"")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    closed = False
    chunked = headers.get("transfer-encoding", "").lower() == "chunked"
    length = int(headers["content-length"]) if "content-length" in headers else None

    def complete() -> bool:
        if chunked:
            return body.endswith(b"0\r\n\r\n")
        return length is not None and len(body) >= length

    while not complete():
        chunk = _recv(sock, deadline)
        if chunk is None:
            break
        if not chunk:
            closed = True
            break
        body += chunk
    if complete() and not chunked and length is not None and len(body) > length:
        if leftover is not None:
            leftover.extend(body[length:])
        body = body[:length]
        return Answer(status, headers, body, True, False, data)
    if not closed:
        chunk = _recv(sock, time.monotonic() + close_within)
        closed = chunk == b""
        if chunk and leftover is not None:
            leftover.extend(chunk)
    return Answer(status, headers, body, complete(), closed, data)


def exchange(port: int, data: bytes, timeout: float = 5.0, close_within: float = 1.0) -> Answer:
    with connect(port, timeout) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return Answer(None, closed=True)
        return read_answer(sock, timeout, close_within)


def serves_normally(url: str, path: str = "/ok", within: float = 2.0) -> float:
    """A normal request answers 200 within `within` seconds; returns how long it took."""
    started = time.monotonic()
    response = httpx.get(url + path, timeout=within)
    elapsed = time.monotonic() - started
    assert response.status_code == 200, (response.status_code, response.text)
    assert elapsed < within
    return elapsed
