"""CoalescingTransport: writes of one loop step leave joined, in order, never lost."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.server.coalesce import CoalescingTransport


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        assert not self.closing, "written after close"
        self.calls.append(("write", bytes(data)))

    def close(self) -> None:
        self.calls.append(("close", None))
        self.closing = True

    def abort(self) -> None:
        self.calls.append(("abort", None))
        self.closing = True

    def write_eof(self) -> None:
        self.calls.append(("eof", None))

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


def make() -> tuple[CoalescingTransport, Recorder]:
    inner = Recorder()
    return CoalescingTransport(inner, asyncio.get_running_loop()), inner  # type: ignore[arg-type]


async def test_writes_of_one_step_leave_as_one() -> None:
    t, inner = make()
    t.write(b"HTTP/1.1 200 OK\r\n\r\n")
    t.write(b"body")
    assert inner.calls == []
    assert t.get_write_buffer_size() == len(b"HTTP/1.1 200 OK\r\n\r\nbody")
    await asyncio.sleep(0)
    assert inner.calls == [("write", b"HTTP/1.1 200 OK\r\n\r\nbody")]
    t.write(b"next")
    await asyncio.sleep(0)
    assert inner.calls[-1] == ("write", b"next")


async def test_large_writes_go_straight_through_after_what_is_pending() -> None:
    t, inner = make()
    big = b"x" * (1 << 20)
    t.write(b"head")
    t.write(big)
    t.write(b"tail")
    await asyncio.sleep(0)
    assert [c[1] for c in inner.calls] == [b"head", big, b"tail"]


async def test_close_and_eof_flush_first_abort_drops() -> None:
    t, inner = make()
    t.write(b"last words")
    t.write_eof()
    t.close()
    await asyncio.sleep(0)
    assert inner.calls == [("write", b"last words"), ("eof", None), ("close", None)]

    t, inner = make()
    t.write(b"never sent")
    t.abort()
    await asyncio.sleep(0)
    assert inner.calls == [("abort", None)]


async def test_a_transport_closed_meanwhile_is_not_written_to() -> None:
    t, inner = make()
    t.write(b"late")
    inner.closing = True  # the peer went away before the loop step ended
    await asyncio.sleep(0)
    assert inner.calls == []


async def test_everything_else_is_the_transport_s() -> None:
    t, inner = make()
    t.writelines([b"a", b"b"])
    assert t.get_extra_info("peername") == "info:peername"
    assert not t.is_closing()
    await asyncio.sleep(0)
    assert inner.calls == [("write", b"ab")]
