"""Trace headers read and written by hand (gateway/tracing/propagation.py): W3C Trace
Context and B3, strict on what they accept, and the sampling decision made from them."""

from __future__ import annotations

import random

import pytest

from gateway.tracing.propagation import (
    ID_BATCH,
    ID_SLICES,
    ID_WIDTH,
    Extracted,
    Parent,
    b3_headers,
    b3_single,
    draw_ids,
    extract,
    format_traceparent,
    parse_b3_multi,
    parse_b3_single,
    parse_traceparent,
)
from gateway.tracing.spans import SpanRecord, Tracer, TracingRules

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
GOOD = f"00-{TRACE}-{SPAN}-01".encode()


# --- traceparent ----------------------------------------------------------------------


def test_traceparent_sampled_and_not() -> None:
    assert parse_traceparent(GOOD) == Parent(TRACE, SPAN, True)
    assert parse_traceparent(f"00-{TRACE}-{SPAN}-00".encode()) == Parent(TRACE, SPAN, False)
    # Only the sampled bit decides; other flag bits are carried by nobody.
    assert parse_traceparent(f"00-{TRACE}-{SPAN}-03".encode()) == Parent(TRACE, SPAN, True)
    assert parse_traceparent(f"00-{TRACE}-{SPAN}-02".encode()) == Parent(TRACE, SPAN, False)


def test_traceparent_surrounding_whitespace_is_not_part_of_the_value() -> None:
    assert parse_traceparent(b" " + GOOD + b"\t") == Parent(TRACE, SPAN, True)


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"garbage",
        GOOD[:-1],  # too short
        GOOD + b"-extra",  # version 00 has exactly four fields
        GOOD.replace(b"00-", b"01-", 1),  # only version 00 is read
        GOOD.replace(b"00-", b"ff-", 1),  # ff is forbidden anyway
        GOOD.upper(),  # uppercase hex
        f"00-{TRACE.upper()}-{SPAN}-01".encode(),
        f"00-{'0' * 32}-{SPAN}-01".encode(),  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01".encode(),  # all-zero span id
        f"00-{TRACE[:-1]}g-{SPAN}-01".encode(),  # not hex
        f"00-{TRACE}-{SPAN}-0x".encode(),  # flags not hex
        f"00_{TRACE}_{SPAN}_01".encode(),  # wrong separators
        f"00-{TRACE}{SPAN}--01".encode(),
    ],
)
def test_malformed_traceparent_is_refused(value: bytes) -> None:
    assert parse_traceparent(value) is None


def test_traceparent_written_fixed_width() -> None:
    assert format_traceparent(TRACE, SPAN, True) == GOOD
    assert format_traceparent(TRACE, SPAN, False) == f"00-{TRACE}-{SPAN}-00".encode()


def test_a_draw_holds_each_requests_ids_and_unsampled_traceparent() -> None:
    text, data = draw_ids()
    assert len(text) == ID_BATCH * ID_WIDTH and data == text.encode()
    for trace_id, span_id, traceparent, first_id in ID_SLICES:
        header = data[traceparent]
        parent = parse_traceparent(header)
        assert parent == Parent(text[trace_id], text[first_id], False)
        assert header == format_traceparent(text[trace_id], text[first_id], False)
        for value, width in ((text[trace_id], 32), (text[span_id], 16), (text[first_id], 16)):
            assert len(value) == width and not value.strip("0123456789abcdef")
            assert value != "0" * width
    # No 64-bit half of an id is zero: a draw that would have one is drawn again.
    halves = [text[s][i : i + 16] for ids in ID_SLICES for s in ids[:2] for i in (0, 16)]
    assert "0" * 16 not in halves


def test_new_ids_are_unique_across_draws() -> None:
    t, _ = tracer()
    traces = [t.begin([])[0] for _ in range(1000)]  # several draws from the OS
    firsts = [x.first_span_id(x.first) for x in traces if x.first is not None]
    ids = [x.trace_id for x in traces] + [x.span_id for x in traces]
    ids += firsts + [t.new_span_id() for _ in range(300)]
    assert len(firsts) == 1000
    assert len(set(ids)) == len(ids)
    assert {len(x.trace_id) for x in traces} == {32}
    assert {len(i) for i in ids[1000:]} == {16}


# --- B3 -------------------------------------------------------------------------------


def test_b3_multi() -> None:
    assert parse_b3_multi(TRACE.encode(), SPAN.encode(), b"1", None) == Parent(TRACE, SPAN, True)
    assert parse_b3_multi(TRACE.encode(), SPAN.encode(), b"0", None) == Parent(TRACE, SPAN, False)
    assert parse_b3_multi(TRACE.encode(), SPAN.encode(), b"true", None) == Parent(TRACE, SPAN, True)
    # Ids without a sampling state: the decision is deferred to the gateway.
    assert parse_b3_multi(TRACE.encode(), SPAN.encode(), None, None) == Parent(TRACE, SPAN, None)
    # Debug samples.
    assert parse_b3_multi(TRACE.encode(), SPAN.encode(), None, b"1") == Parent(TRACE, SPAN, True)
    # A 64-bit trace id is padded to 128 bits.
    assert parse_b3_multi(SPAN.encode(), SPAN.encode(), b"1", None) == Parent(
        "0" * 16 + SPAN, SPAN, True
    )
    # A sampling decision alone names no parent.
    assert parse_b3_multi(None, None, b"0", None) == Parent(None, None, False)
    assert parse_b3_multi(None, None, None, None) is None


@pytest.mark.parametrize(
    ("trace", "span", "sampled"),
    [
        (TRACE.encode(), None, b"1"),  # half an id pair
        (None, SPAN.encode(), b"1"),
        (TRACE.upper().encode(), SPAN.encode(), b"1"),
        (b"0" * 32, SPAN.encode(), b"1"),
        (TRACE.encode(), b"0" * 16, b"1"),
        (TRACE[:20].encode(), SPAN.encode(), b"1"),
        (TRACE.encode(), SPAN.encode(), b"yes"),
    ],
)
def test_malformed_b3_multi_is_refused(
    trace: bytes | None, span: bytes | None, sampled: bytes | None
) -> None:
    assert parse_b3_multi(trace, span, sampled, None) is None


def test_b3_single() -> None:
    assert parse_b3_single(f"{TRACE}-{SPAN}-1".encode()) == Parent(TRACE, SPAN, True)
    assert parse_b3_single(f"{TRACE}-{SPAN}-0-{SPAN}".encode()) == Parent(TRACE, SPAN, False)
    assert parse_b3_single(f"{TRACE}-{SPAN}-d".encode()) == Parent(TRACE, SPAN, True)
    assert parse_b3_single(f"{TRACE}-{SPAN}".encode()) == Parent(TRACE, SPAN, None)
    assert parse_b3_single(f"{SPAN}-{SPAN}-1".encode()) == Parent("0" * 16 + SPAN, SPAN, True)
    assert parse_b3_single(b"0") == Parent(None, None, False)
    assert parse_b3_single(b"1") == Parent(None, None, True)


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"x",
        TRACE.encode(),  # no span id
        f"{TRACE}-{SPAN}-2".encode(),  # no such sampling state
        f"{TRACE}-{SPAN}-1-xyz".encode(),
        f"{TRACE}-{SPAN}-1-{SPAN}-1".encode(),  # a field too many
        f"{TRACE.upper()}-{SPAN}-1".encode(),
    ],
)
def test_malformed_b3_single_is_refused(value: bytes) -> None:
    assert parse_b3_single(value) is None


def test_b3_written_and_64_bit_ids_go_back_short() -> None:
    assert b3_headers(TRACE, SPAN, True) == [
        (b"x-b3-traceid", TRACE.encode()),
        (b"x-b3-spanid", SPAN.encode()),
        (b"x-b3-sampled", b"1"),
    ]
    assert b3_headers("0" * 16 + SPAN, SPAN, False)[0] == (b"x-b3-traceid", SPAN.encode())
    assert b3_single(TRACE, SPAN, False) == (b"b3", f"{TRACE}-{SPAN}-0".encode())


# --- reading a request's headers ------------------------------------------------------

TC = ("tracecontext",)
BOTH = ("tracecontext", "b3")
B3_FIRST = ("b3", "tracecontext")


def test_no_trace_headers() -> None:
    assert extract([(b"host", b"x")], BOTH) == Extracted(None)


def test_valid_traceparent_keeps_tracestate_unchanged() -> None:
    got = extract([(b"traceparent", GOOD), (b"tracestate", b"a=1,b=2")], TC)
    assert got == Extracted(Parent(TRACE, SPAN, True), b"a=1,b=2", False, True)


def test_several_tracestate_fields_are_one_list() -> None:
    got = extract([(b"traceparent", GOOD), (b"tracestate", b"a=1"), (b"tracestate", b"b=2")], TC)
    assert got.tracestate == b"a=1,b=2"


def test_malformed_traceparent_takes_its_tracestate_with_it() -> None:
    got = extract([(b"traceparent", GOOD.upper()), (b"tracestate", b"a=1")], TC)
    assert got == Extracted(None, None, False, True)


def test_repeated_traceparent_is_malformed() -> None:
    got = extract([(b"traceparent", GOOD), (b"traceparent", GOOD)], TC)
    assert got.parent is None and got.found


def test_first_listed_valid_format_wins() -> None:
    other = "a" * 32
    headers = [
        (b"traceparent", GOOD),
        (b"x-b3-traceid", other.encode()),
        (b"x-b3-spanid", SPAN.encode()),
        (b"x-b3-sampled", b"0"),
    ]
    assert extract(headers, BOTH).parent == Parent(TRACE, SPAN, True)
    assert extract(headers, B3_FIRST).parent == Parent(other, SPAN, False)
    # Malformed first format: the next listed one gives the parent.
    headers[0] = (b"traceparent", b"nonsense")
    assert extract(headers, BOTH).parent == Parent(other, SPAN, False)


def test_tracestate_kept_only_beside_the_traceparent_of_the_parent() -> None:
    headers = [
        (b"traceparent", GOOD),
        (b"tracestate", b"a=1"),
        (b"b3", f"{'a' * 32}-{SPAN}-1".encode()),
    ]
    assert extract(headers, B3_FIRST).tracestate is None  # b3 named another trace
    assert extract(headers, BOTH).tracestate == b"a=1"
    assert extract(headers, ("b3",)).tracestate is None  # tracecontext is not spoken


def test_b3_single_is_read_before_the_multi_headers() -> None:
    headers = [
        (b"b3", f"{TRACE}-{SPAN}-1".encode()),
        (b"x-b3-traceid", ("a" * 32).encode()),
        (b"x-b3-spanid", SPAN.encode()),
    ]
    got = extract(headers, ("b3",))
    assert got.parent == Parent(TRACE, SPAN, True) and got.single


def test_unlisted_formats_are_not_read_but_found() -> None:
    got = extract([(b"x-b3-traceid", TRACE.encode()), (b"x-b3-spanid", SPAN.encode())], TC)
    assert got == Extracted(None, None, False, True)


# --- the sampling decision and the ids sent upstream ---------------------------------


class Sink:
    def __init__(self) -> None:
        self.spans: list[SpanRecord] = []

    def submit(self, span: SpanRecord) -> None:
        self.spans.append(span)

    def describe(self) -> dict[str, int]:
        return {}

    def start(self) -> None:
        pass

    def close(self, timeout: float | None = None) -> None:
        pass


def tracer(ratio: float = 0.01, propagation: tuple[str, ...] = TC) -> tuple[Tracer, Sink]:
    sink = Sink()
    rules = TracingRules("http://collector:4318", ratio, propagation)
    return Tracer(rules, sink, random.Random(7)), sink


def test_parent_sampled_flag_decides() -> None:
    t, _ = tracer(ratio=0.0)
    trace, found = t.begin([(b"traceparent", GOOD)])
    assert found and trace.sampled and trace.trace_id == TRACE and trace.parent_id == SPAN
    assert trace.span_id != SPAN
    t, _ = tracer(ratio=1.0)
    trace, _ = t.begin([(b"traceparent", f"00-{TRACE}-{SPAN}-00".encode())])
    assert not trace.sampled


def test_roots_follow_sample_ratio() -> None:
    for ratio, expected in ((0.0, 0), (1.0, 1000)):
        t, _ = tracer(ratio=ratio)
        assert sum(t.begin([])[0].sampled for _ in range(1000)) == expected
    t, _ = tracer(ratio=0.25)
    assert 150 < sum(t.begin([])[0].sampled for _ in range(1000)) < 350


def test_a_tiny_sample_ratio_never_overflows_the_countdown() -> None:
    for ratio in (1e-308, 5e-324, 1e-9):
        t, _ = tracer(ratio=ratio)
        assert not any(t.begin([])[0].sampled for _ in range(1000))


def test_deferred_b3_decision_follows_sample_ratio() -> None:
    headers = [(b"x-b3-traceid", TRACE.encode()), (b"x-b3-spanid", SPAN.encode())]
    for ratio in (0.0, 1.0):
        t, _ = tracer(ratio=ratio, propagation=("b3",))
        trace, _ = t.begin(headers)
        assert trace.sampled is bool(ratio) and trace.trace_id == TRACE


def test_try_headers_name_the_try_and_carry_tracestate() -> None:
    t, sink = tracer(propagation=BOTH)
    trace, _ = t.begin([(b"traceparent", GOOD), (b"tracestate", b"k=v")])
    one, two = trace.start_try(), trace.start_try()
    assert one.span_id != two.span_id != trace.span_id
    assert one.headers == [
        (b"traceparent", f"00-{TRACE}-{one.span_id}-01".encode()),
        (b"tracestate", b"k=v"),
        (b"x-b3-traceid", TRACE.encode()),
        (b"x-b3-spanid", one.span_id.encode()),
        (b"x-b3-sampled", b"1"),
    ]
    one.end("GET", {"http.response.status_code": 200})
    trace.end("GET r", {})
    client, server = sink.spans
    assert client.parent_id == trace.span_id and client.span_id == one.span_id
    assert server.parent_id == SPAN and server.remote_parent
    assert client.start_ns <= client.end_ns and server.start_ns <= server.end_ns


def test_unsampled_request_sends_a_fresh_span_id_with_flags_00_and_exports_nothing() -> None:
    t, sink = tracer(ratio=0.0)
    trace, _ = t.begin([])
    span = trace.start_try()
    (name, value), *_ = span.headers
    assert name == b"traceparent"
    assert value == f"00-{trace.trace_id}-{span.span_id}-00".encode()
    span.end("GET", {})
    trace.end("GET r", {})
    assert sink.spans == []


def test_b3_single_parent_gets_the_single_header_back() -> None:
    t, _ = tracer(propagation=("b3",))
    trace, _ = t.begin([(b"b3", f"{TRACE}-{SPAN}-1".encode())])
    span = trace.start_try()
    assert span.headers[-1] == (b"b3", f"{TRACE}-{span.span_id}-1".encode())
    assert all(name != b"traceparent" for name, _ in span.headers)
