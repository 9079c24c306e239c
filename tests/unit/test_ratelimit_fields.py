"""The IETF draft-10 RateLimit fields: `RateLimit-Policy: "<route>";q=;w=` and
`RateLimit: "<route>";r=;t=`, parsed back with http_sfv as a client would, their
numbers against the bucket's, and `Retry-After <= t` in the corners (burst 1,
fractional rates, a bucket just emptied, float noise)."""

from __future__ import annotations

import math
import os
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from gateway.config.units import parse_rate
from gateway.edge import EdgeContext
from gateway.edge.ratelimit import (
    Decision,
    MemoryStore,
    RateLimit,
    RateLimitFields,
    policy_name,
    rate_limit,
    whole_seconds,
)
from gateway.errors import RateLimited
from tests.unit.fakes import FakeClock
from tests.unit.sfv import parse_ratelimit_field

set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "gateway-hypothesis"))
FAST = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
PRINTABLE_ASCII = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1)


def ctx() -> EdgeContext:
    return EdgeContext(
        scope={"type": "http"},
        method="GET",
        route="r",
        client_ip="10.0.0.1",
        request_headers=[],
        upstream_headers=[],
    )


def fields_of(headers: list[tuple[bytes, bytes]]) -> tuple[dict[str, int], dict[str, int]]:
    """The policy's and the state's parameters, after checking both name the same
    policy and the triple says the same as the fields."""
    raw = dict(headers)
    policy_name_, policy = parse_ratelimit_field(raw[b"ratelimit-policy"])
    state_name, state = parse_ratelimit_field(raw[b"ratelimit"])
    assert policy_name_ == state_name
    assert set(policy) == {"q", "w"} and set(state) == {"r", "t"}
    assert policy["q"] == int(raw[b"ratelimit-limit"])
    assert state["r"] == int(raw[b"ratelimit-remaining"])
    assert state["t"] == int(raw[b"ratelimit-reset"])
    return policy, state


async def answer(check: object) -> tuple[int, list[tuple[bytes, bytes]]]:
    """Run the filter once: (status, headers) as the client would get them."""
    c = ctx()
    try:
        await check(c)  # type: ignore[operator]
    except RateLimited as refused:
        return 429, refused.headers
    return 200, c.response_headers


@pytest.mark.parametrize(
    ("route", "serialised"),
    [
        ("users", b'"users"'),
        ('say "hi"', b'"say \\"hi\\""'),
        ("back\\slash", b'"back\\\\slash"'),
        ("a b", b'"a b"'),
        ("50%", b'"50%"'),
    ],
)
def test_the_policy_name_is_a_quoted_sf_string_with_quote_and_backslash_escaped(
    route: str, serialised: bytes
) -> None:
    assert policy_name(route) == serialised
    fields = RateLimitFields(route, 1.0, 1)
    assert parse_ratelimit_field(fields.policy)[0] == route


@FAST
@given(PRINTABLE_ASCII)
def test_any_printable_ascii_route_name_reads_back_unchanged(route: str) -> None:
    fields = RateLimitFields(route, 2.0, 3)
    assert parse_ratelimit_field(fields.policy) == (route, {"q": 3, "w": 2})
    state = fields.headers(Decision(True, 3, 2, 0.5, 0.0))[-1][1]
    assert parse_ratelimit_field(state) == (route, {"r": 2, "t": 1})


@pytest.mark.parametrize(
    ("route", "reads"),
    [
        ("café", "caf%C3%A9"),
        ("tab\there", "tab%09here"),
        ("del\x7f", "del%7F"),
        ("日本", "%E6%97%A5%E6%9C%AC"),
        ('"é"', '"%C3%A9"'),
    ],
)
def test_a_name_an_sf_string_cannot_hold_is_percent_encoded_not_a_broken_field(
    route: str, reads: str
) -> None:
    assert parse_ratelimit_field(RateLimitFields(route, 1.0, 1).policy)[0] == reads


@FAST
@given(st.text(min_size=1))
def test_any_route_name_at_all_gives_valid_fields(route: str) -> None:
    fields = RateLimitFields(route, 1.0, 1)
    name, _ = parse_ratelimit_field(fields.policy)
    assert parse_ratelimit_field(fields.headers(Decision(False, 1, 0, 1.0, 1.0))[-1][1])[0] == name


@pytest.mark.parametrize(
    ("rate", "burst", "w"),
    [
        ("2/s", 3, 2),  # 1.5 s, rounded up
        ("100/s", 200, 2),
        ("6000/m", 10, 1),  # 100/s: 0.1 s rounds up to 1, never 0
        ("6000/m", 1, 1),
        ("1/h", 1, 3600),
        ("1/h", 7, 25200),
        ("6/m", 3, 30),  # 3 / 0.1 is 30.000000000000004 in floats: still 30
        ("7/m", 7, 60),
        ("1/m", 1, 60),
    ],
)
def test_w_is_the_seconds_to_refill_the_whole_burst_rounded_up(
    rate: str, burst: int, w: int
) -> None:
    fields = RateLimitFields("r", parse_rate(rate), burst)
    assert parse_ratelimit_field(fields.policy) == ("r", {"q": burst, "w": w})
    assert fields.policy == b'"r";q=%d;w=%d' % (burst, w)  # exact bytes: no spaces, this order


def test_numbers_beyond_an_sf_integer_are_capped_so_the_field_stays_valid() -> None:
    fields = RateLimitFields("r", parse_rate("1/h"), 10**16)
    _, policy = parse_ratelimit_field(fields.policy)
    assert policy == {"q": 999_999_999_999_999, "w": 999_999_999_999_999}


def test_whole_seconds_rounds_up_ignores_float_noise_and_is_at_least_one() -> None:
    assert whole_seconds(2.1) == 3
    assert whole_seconds(30.000000000000004) == 30
    assert whole_seconds(1e-15) == 1  # a bucket never full after a take: t >= 1
    assert whole_seconds(0.0) == 1
    assert whole_seconds(3600.0) == 3600


async def test_a_bucket_walked_empty_and_refused_at_2_per_second() -> None:
    check = rate_limit(RateLimit(rate=2.0, burst=3), "walk", MemoryStore(clock=FakeClock()), None)
    seen = [await answer(check) for _ in range(4)]
    assert [status for status, _ in seen] == [200, 200, 200, 429]
    states = [fields_of(headers)[1] for _, headers in seen]
    # Tokens 2, 1, 0, 0 left: full again in 0.5, 1, 1.5, 1.5 s.
    assert states == [{"r": 2, "t": 1}, {"r": 1, "t": 1}, {"r": 0, "t": 2}, {"r": 0, "t": 2}]
    assert dict(seen[3][1])[b"retry-after"] == b"1"  # one token in 0.5 s


@pytest.mark.parametrize(
    ("rate", "burst", "retry_after", "t"),
    [
        ("6000/m", 1, 1, 1),  # 0.01 s to the next token and to full: both round up to 1
        ("100/s", 1, 1, 1),
        ("1/h", 1, 3600, 3600),
        ("1/m", 1, 60, 60),
        ("1/h", 3, 3600, 10800),
        ("6/m", 3, 10, 30),
        ("7/m", 2, 9, 18),  # 8.57 s to one token, 17.14 s to two
    ],
)
async def test_a_just_emptied_bucket_refuses_with_retry_after_never_above_t(
    rate: str, burst: int, retry_after: int, t: int
) -> None:
    check = rate_limit(
        RateLimit(rate=parse_rate(rate), burst=burst), "r", MemoryStore(clock=FakeClock()), None
    )
    for _ in range(burst):
        assert (await answer(check))[0] == 200
    status, headers = await answer(check)
    assert status == 429
    policy, state = fields_of(headers)
    assert state == {"r": 0, "t": t}
    assert int(dict(headers)[b"retry-after"]) == retry_after
    assert retry_after <= state["t"] <= policy["w"]


def test_retry_after_is_capped_at_t_even_for_a_decision_that_disagrees() -> None:
    fields = RateLimitFields("r", 1.0, 1)
    assert fields.retry_after(Decision(False, 1, 0, reset=0.5, retry_after=2.0)) == 1


@FAST
@given(
    rate=st.sampled_from(["1/h", "1/m", "7/m", "6/m", "6000/m", "2/s", "100/s", "1000/s"]),
    burst=st.integers(1, 50),
    steps=st.lists(st.floats(0, 120, allow_nan=False), min_size=1, max_size=40),
)
def test_every_answer_has_consistent_fields_and_retry_after_at_most_t(
    rate: str, burst: int, steps: list[float]
) -> None:
    per_second = parse_rate(rate)
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    fields = RateLimitFields("r", per_second, burst)
    for step in steps:
        clock.advance(step)
        decision = store.take_now("k", per_second, burst)
        headers = fields.headers(decision)
        policy, state = fields_of(headers)
        assert policy == {"q": burst, "w": math.ceil(burst / per_second - 1e-9)}
        assert 0 <= state["r"] < burst  # a token was just taken, or none was left
        assert 1 <= state["t"] <= policy["w"]
        if not decision.allowed:
            assert 1 <= fields.retry_after(decision) <= state["t"]


def test_the_fields_show_their_policy_in_repr() -> None:
    assert repr(RateLimitFields("r", 2.0, 3)) == "RateLimitFields(policy='\"r\";q=3;w=2')"
