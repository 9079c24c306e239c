"""Trace headers, read and written by hand: W3C Trace Context (`traceparent`,
`tracestate`) and B3 (the multi headers `X-B3-*` and the single `b3` header).

Reading is strict, so that a header the gateway cannot vouch for never names a parent:
`traceparent` is version `00` in its fixed width of 55 characters, lowercase hex, with
neither id all zeros (W3C Trace Context, 3.2); B3 ids are lowercase hex, 16 or 32
characters for a trace id (a 64-bit one is padded to 128 bits), 16 for a span id.
Writing needs nothing but string formatting. No OpenTelemetry here: this runs per
request while tracing is on, and OpenTelemetry is only the exporter's business.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from operator import itemgetter

__all__ = [
    "B3",
    "FORMATS",
    "HEADER_NAME",
    "ID_BATCH",
    "ID_SLICES",
    "ID_WIDTH",
    "NO_TRACE_HEADER_IN",
    "TRACEPARENT",
    "TRACESTATE",
    "TRACE_HEADERS",
    "X_B3_FLAGS",
    "X_B3_PARENTSPANID",
    "X_B3_SAMPLED",
    "X_B3_SPANID",
    "X_B3_TRACEID",
    "Extracted",
    "Parent",
    "b3_headers",
    "b3_single",
    "draw_ids",
    "extract",
    "format_traceparent",
    "parse_b3_multi",
    "parse_b3_single",
    "parse_traceparent",
]

TRACEPARENT = b"traceparent"
TRACESTATE = b"tracestate"
B3 = b"b3"
X_B3_TRACEID = b"x-b3-traceid"
X_B3_SPANID = b"x-b3-spanid"
X_B3_PARENTSPANID = b"x-b3-parentspanid"
X_B3_SAMPLED = b"x-b3-sampled"
X_B3_FLAGS = b"x-b3-flags"
# Every trace header the gateway knows. With tracing on, none is forwarded as it came:
# each try gets the gateway's own (an upstream must never attach to the caller's span).
TRACE_HEADERS = frozenset(
    {TRACEPARENT, TRACESTATE, B3, X_B3_TRACEID, X_B3_SPANID, X_B3_PARENTSPANID, X_B3_SAMPLED}
    | {X_B3_FLAGS}
)
FORMATS = ("tracecontext", "b3")

_HEX = b"0123456789abcdef"
_ODD_HEX = frozenset(b"13579bdf")  # the last flags digit of a sampled `traceparent`
_DASH = ord("-")
_ZERO_TRACE = b"0" * 32
_ZERO_SPAN = b"0" * 16
_ZERO_HALF = "0" * 16
_B3_SAMPLED = {b"1": True, b"true": True, b"0": False, b"false": False}
_B3_SINGLE_SAMPLED = {b"1": True, b"d": True, b"0": False}

# Ids need randomness (W3C Trace Context 6.2) and uniqueness, not one system call each:
# they are drawn from the OS for `ID_BATCH` requests at once, each request's laid out as
# `00-{trace id}-{first try's span id}-00{SERVER span id}`: the `traceparent` its first
# try sends when not sampled, then its SERVER span's id. A request takes its ids by
# index (`ID_SLICES`): slices of the text, the header a slice of its bytes, with no
# arithmetic on offsets (every operation per request counts, `spans.Tracer.root`).
ID_BATCH = 128  # requests' ids per draw (even: `draw_ids` draws whole bytes; a small int index)
ID_WIDTH = 71  # characters of one request's ids in that layout
# The fixed characters of the layout: the version, the separators, the flags.
_FIXED = {0: b"0", 1: b"0", 2: b"-", 35: b"-", 52: b"-", 53: b"0", 54: b"0"}


def _slices(k: int) -> tuple[slice, slice, slice, slice]:
    at = k * ID_WIDTH
    return (
        slice(at + 3, at + 35),  # trace id
        slice(at + 55, at + 71),  # SERVER span id
        slice(at, at + 55),  # the first try's `traceparent`, not sampled
        slice(at + 36, at + 52),  # the first try's span id
    )


ID_SLICES = tuple(_slices(k) for k in range(ID_BATCH))


def draw_ids() -> tuple[str, bytes]:
    """`ID_BATCH` requests' ids, as text and the same as bytes: random lowercase hex in
    the layout above, no id all zeros (invalid). A handful of C calls for the batch:
    random bytes as hex (two digits a byte), then the fixed characters written over."""
    while True:
        out = bytearray(os.urandom(ID_BATCH * ID_WIDTH // 2).hex(), "ascii")
        for at, char in _FIXED.items():
            out[at::ID_WIDTH] = char * ID_BATCH
        text = out.decode("ascii")
        # Sixteen zeros in a row hold every all-zero id (and, rarely, a valid one):
        # one chance in about 2**50 per draw, drawn again.
        if _ZERO_HALF not in text:
            return text, bytes(out)


# Whether an ASGI header list `raw` carries no trace header, in one pass in C and no
# call of ours (it runs for every request): `NO_TRACE_HEADER_IN(map(HEADER_NAME, raw))`.
NO_TRACE_HEADER_IN = TRACE_HEADERS.isdisjoint
HEADER_NAME = itemgetter(0)


def _hex_id(value: bytes, size: int) -> bool:
    """`value` is `size` lowercase hex digits, not all of them zeros."""
    return len(value) == size and not value.translate(None, _HEX) and value.count(b"0") != size


# The records below are plain (not frozen) dataclasses: a frozen one's __init__ costs
# a call of object.__setattr__ per field, and these are made per request.
@dataclass(slots=True)
class Parent:
    """What a request's trace headers say. `trace_id` and `span_id` name the caller's
    span (None for a sampling decision that came without ids, B3's `b3: 0`);
    `sampled` is the caller's decision, None when it left it to the gateway (B3 ids
    without a sampling state)."""

    trace_id: str | None
    span_id: str | None
    sampled: bool | None


def parse_traceparent(value: bytes) -> Parent | None:
    """A `traceparent` value, or None when it is malformed: anything but version `00`
    exactly 55 characters long, `-` where the format puts them, lowercase hex, and
    neither id all zeros."""
    if len(value) != 55:
        value = value.strip(b" \t")
        if len(value) != 55:
            return None
    # One translate checks every hex digit at once (the separators go with the version).
    if (
        value[:3] != b"00-"
        or value[35] != _DASH
        or value[52] != _DASH
        or value[3:35].translate(None, _HEX)
        or value[36:52].translate(None, _HEX)
        or value[53:].translate(None, _HEX)
        or value[3:35] == _ZERO_TRACE
        or value[36:52] == _ZERO_SPAN
    ):
        return None
    text = value.decode("ascii")
    return Parent(text[3:35], text[36:52], value[54] in _ODD_HEX)


def format_traceparent(trace_id: str, span_id: str, sampled: bool) -> bytes:
    """`traceparent` for a span of ours: version 00, the sampled flag alone."""
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}".encode("ascii")


def _b3_trace_id(value: bytes) -> str | None:
    if _hex_id(value, 32):
        return value.decode("ascii")
    if _hex_id(value, 16):
        return _ZERO_HALF + value.decode("ascii")  # a 64-bit trace id, left-padded
    return None


def parse_b3_single(value: bytes) -> Parent | None:
    """The single `b3` header: `{trace}-{span}[-{sampling}[-{parent span}]]`, or a
    sampling decision alone (`0`, `1`, `d` for debug, which samples). None when
    malformed."""
    parts = value.strip(b" \t").split(b"-")
    if len(parts) == 1:
        decision = _B3_SINGLE_SAMPLED.get(parts[0])
        return None if decision is None else Parent(None, None, decision)
    if len(parts) > 4:
        return None
    trace_id = _b3_trace_id(parts[0])
    if trace_id is None or not _hex_id(parts[1], 16):
        return None
    sampled: bool | None = None
    if len(parts) >= 3:
        sampled = _B3_SINGLE_SAMPLED.get(parts[2])
        if sampled is None:
            return None
    if len(parts) == 4 and not _hex_id(parts[3], 16):
        return None
    return Parent(trace_id, parts[1].decode("ascii"), sampled)


def parse_b3_multi(
    trace_id: bytes | None,
    span_id: bytes | None,
    sampled: bytes | None,
    flags: bytes | None,
) -> Parent | None:
    """The multi headers: `X-B3-TraceId` and `X-B3-SpanId` together, `X-B3-Sampled`
    (`1`/`0`, or the older `true`/`false`) and `X-B3-Flags: 1` (debug, which samples).
    None when absent or malformed; a sampling decision alone has no ids."""
    decision: bool | None = None
    if sampled is not None:
        decision = _B3_SAMPLED.get(sampled.strip(b" \t").lower())
        if decision is None:
            return None
    if flags is not None and flags.strip(b" \t") == b"1":
        decision = True
    if trace_id is None and span_id is None:
        return None if decision is None else Parent(None, None, decision)
    if trace_id is None or span_id is None:
        return None
    tid = _b3_trace_id(trace_id.strip(b" \t"))
    span_id = span_id.strip(b" \t")
    if tid is None or not _hex_id(span_id, 16):
        return None
    return Parent(tid, span_id.decode("ascii"), decision)


def b3_headers(trace_id: str, span_id: str, sampled: bool) -> list[tuple[bytes, bytes]]:
    """The multi headers for a span of ours. A trace id whose upper half is zeros came
    from a 64-bit B3 system: it goes back in its 16-digit form."""
    tid = trace_id[16:] if trace_id.startswith(_ZERO_HALF) else trace_id
    return [
        (X_B3_TRACEID, tid.encode("ascii")),
        (X_B3_SPANID, span_id.encode("ascii")),
        (X_B3_SAMPLED, b"1" if sampled else b"0"),
    ]


def b3_single(trace_id: str, span_id: str, sampled: bool) -> tuple[bytes, bytes]:
    """The single `b3` header for a span of ours."""
    tid = trace_id[16:] if trace_id.startswith(_ZERO_HALF) else trace_id
    return (B3, f"{tid}-{span_id}-{'1' if sampled else '0'}".encode("ascii"))


@dataclass(slots=True)
class Extracted:
    """A request's trace headers, read in the order of the `propagation` list.

    `parent`: what the first listed format that is present and valid says (None: no
    parent, the request starts a trace). `tracestate`: the caller's, to pass on
    unchanged; kept only when its `traceparent` was valid and names the parent's trace
    (a malformed `traceparent` takes its `tracestate` with it). `single`: the B3 parent
    came as the single `b3` header, so tries get that header too. `found`: some trace
    header was present, so the forwarded headers must be cleaned of them."""

    parent: Parent | None
    tracestate: bytes | None = None
    single: bool = False
    found: bool = False


NOTHING = Extracted(None)
_REPEATED = b""  # a header given twice where once is allowed: no parser accepts it


def _one(values: dict[bytes, list[bytes]], name: bytes) -> bytes | None:
    """The value of a header that may be given once (`_REPEATED` when it was not)."""
    found = values.get(name)
    if found is None:
        return None
    return found[0] if len(found) == 1 else _REPEATED


def extract(raw: Iterable[tuple[bytes, bytes]], formats: tuple[str, ...]) -> Extracted:
    """Read the trace headers of `raw` (an ASGI header list, lowercase names) for the
    `formats` listed. A header that repeats when it may not (`traceparent`, `b3`, the
    B3 ids) is malformed; repeated `tracestate` fields are one list (RFC 9110 5.3)."""
    values: dict[bytes, list[bytes]] | None = None
    for name, value in raw:
        if name in TRACE_HEADERS:
            if values is None:
                values = {name: [value]}
            elif name in values:
                values[name].append(value)
            else:
                values[name] = [value]
    if values is None:
        return NOTHING
    given = values.get(TRACEPARENT)
    traceparent = parse_traceparent(given[0]) if given is not None and len(given) == 1 else None
    parent: Parent | None = None
    single = False
    for fmt in formats:
        if fmt == "tracecontext":
            parent = traceparent
        elif B3 in values:
            b3 = values[B3]
            parent = parse_b3_single(b3[0] if len(b3) == 1 else _REPEATED)
            single = parent is not None
        else:
            parent = parse_b3_multi(
                _one(values, X_B3_TRACEID),
                _one(values, X_B3_SPANID),
                _one(values, X_B3_SAMPLED),
                _one(values, X_B3_FLAGS),
            )
        if parent is not None:
            break
    tracestate: bytes | None = None
    states = values.get(TRACESTATE)
    if (
        states
        and traceparent is not None
        and parent is not None
        and parent.trace_id == traceparent.trace_id
        and "tracecontext" in formats
    ):
        tracestate = b",".join(states)
    return Extracted(parent, tracestate, single, True)
