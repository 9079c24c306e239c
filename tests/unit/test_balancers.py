from __future__ import annotations

import collections
import random

import pytest

from gateway.upstream.balancers import LeastInflight, RoundRobin, WeightedRandom, make_balancer
from gateway.upstream.target import Target


def targets(*weights: int) -> list[Target]:
    return [Target(f"http://{name}:80", w) for name, w in zip("abcdefgh", weights, strict=False)]


def name(target: Target | None) -> str:
    assert target is not None
    return target.url[7]


def picks(balancer: RoundRobin | LeastInflight | WeightedRandom, n: int) -> list[str]:
    return [name(balancer.select(set())) for _ in range(n)]


# round robin


def test_smooth_weighted_round_robin_sequence_for_5_1_1() -> None:
    rr = RoundRobin(targets(5, 1, 1))
    # nginx's smooth WRR: exact over each cycle of sum(weights), heavier targets interleaved
    assert picks(rr, 7) == list("aabacaa")
    assert picks(rr, 7) == list("aabacaa")


def test_weighted_round_robin_is_exact_over_a_cycle() -> None:
    rr = RoundRobin(targets(1, 3))
    assert picks(rr, 4) == list("babb")
    assert collections.Counter(picks(rr, 40)) == {"a": 10, "b": 30}


def test_round_robin_alternates_equal_weights() -> None:
    rr = RoundRobin(targets(1, 1, 1))
    assert picks(rr, 6) == list("abcabc")


def test_round_robin_skips_unhealthy_targets() -> None:
    ts = targets(1, 1, 1)
    rr = RoundRobin(ts)
    ts[1].healthy = False
    assert picks(rr, 4) == list("acac")
    ts[1].healthy = True
    assert set(picks(rr, 3)) == {"a", "b", "c"}


def test_weighted_round_robin_skips_unhealthy_targets() -> None:
    ts = targets(5, 1, 1)
    rr = RoundRobin(ts)
    ts[0].healthy = False
    assert collections.Counter(picks(rr, 10)) == {"b": 5, "c": 5}


@pytest.mark.parametrize("weights", [(1,), (1, 1), (2, 1)])
def test_no_healthy_target_gives_none(weights: tuple[int, ...]) -> None:
    ts = targets(*weights)
    for t in ts:
        t.healthy = False
    for balancer in (RoundRobin(ts), LeastInflight(ts), WeightedRandom(ts)):
        assert balancer.select(set()) is None
        assert balancer.select({ts[0].url}) is None


@pytest.mark.parametrize("weights", [(1, 1), (3, 1), (1, 1, 1)])
def test_exclude_prefers_a_target_not_yet_tried(weights: tuple[int, ...]) -> None:
    ts = targets(*weights)
    for balancer in (RoundRobin(ts), LeastInflight(ts), WeightedRandom(ts, random.Random(1))):
        for _ in range(10):
            assert name(balancer.select({ts[0].url})) != "a"


def test_exclude_falls_back_to_a_tried_target_when_all_were_tried() -> None:
    ts = targets(1, 1)
    everything = {t.url for t in ts}
    for balancer in (RoundRobin(ts), LeastInflight(ts), WeightedRandom(ts)):
        assert balancer.select(everything) in ts
    single = targets(1)
    assert RoundRobin(single).select({single[0].url}) is single[0]


def test_exclude_never_falls_back_to_an_unhealthy_target() -> None:
    ts = targets(1, 1)
    ts[1].healthy = False
    for balancer in (RoundRobin(ts), LeastInflight(ts), WeightedRandom(ts)):
        assert balancer.select({ts[0].url}) is ts[0]


def test_retries_do_not_disturb_the_weighted_spread() -> None:
    ts = targets(1, 3)
    rr = RoundRobin(ts)
    counts = collections.Counter(picks(rr, 40))
    rr.select({ts[1].url})  # a retry somewhere in between
    counts.update(picks(rr, 40))
    assert counts["b"] - 3 * counts["a"] in range(-4, 5)


# least in-flight


def test_least_inflight_picks_the_minimum() -> None:
    ts = targets(1, 1, 1)
    ts[0].inflight, ts[1].inflight, ts[2].inflight = 5, 2, 7
    lb = LeastInflight(ts)
    assert picks(lb, 5) == ["b"] * 5


def test_least_inflight_weighs_in_flight_by_weight() -> None:
    ts = targets(1, 4)
    ts[0].inflight, ts[1].inflight = 1, 3  # 1/1 against 3/4
    assert name(LeastInflight(ts).select(set())) == "b"


def test_least_inflight_rotates_ties() -> None:
    lb = LeastInflight(targets(1, 1, 1))
    assert collections.Counter(picks(lb, 30)) == {"a": 10, "b": 10, "c": 10}


def test_least_inflight_follows_load() -> None:
    ts = targets(1, 1)
    lb = LeastInflight(ts)
    for _ in range(10):  # each pick takes a request that never finishes
        chosen = lb.select(set())
        assert chosen is not None
        chosen.inflight += 1
    assert [t.inflight for t in ts] == [5, 5]


def test_least_inflight_skips_unhealthy_and_excluded() -> None:
    ts = targets(1, 1, 1)
    ts[0].inflight, ts[1].inflight, ts[2].inflight = 0, 1, 2
    ts[0].healthy = False
    lb = LeastInflight(ts)
    assert name(lb.select(set())) == "b"
    assert name(lb.select({ts[1].url})) == "c"


# weighted random


def test_random_is_weighted() -> None:
    wr = WeightedRandom(targets(1, 3), random.Random(42))
    counts = collections.Counter(picks(wr, 10_000))
    assert 2300 < counts["a"] < 2700
    assert 7300 < counts["b"] < 7700


def test_random_spreads_evenly_on_equal_weights() -> None:
    wr = WeightedRandom(targets(1, 1, 1, 1), random.Random(3))
    counts = collections.Counter(picks(wr, 8000))
    assert set(counts) == set("abcd")
    assert all(1800 < c < 2200 for c in counts.values())


def test_random_with_the_same_seed_repeats() -> None:
    ts = targets(2, 1, 1)
    assert picks(WeightedRandom(ts, random.Random(9)), 50) == picks(
        WeightedRandom(ts, random.Random(9)), 50
    )


def test_random_edges_of_the_cumulative_weights() -> None:
    class Fixed(random.Random):
        def __init__(self, value: float) -> None:
            super().__init__()
            self.value = value

        def random(self) -> float:
            return self.value

    ts = targets(1, 3)
    assert name(WeightedRandom(ts, Fixed(0.0)).select(set())) == "a"
    assert name(WeightedRandom(ts, Fixed(0.2499)).select(set())) == "a"
    assert name(WeightedRandom(ts, Fixed(0.25)).select(set())) == "b"
    assert name(WeightedRandom(ts, Fixed(0.9999999)).select(set())) == "b"


def test_make_balancer() -> None:
    ts = targets(1, 1)
    assert isinstance(make_balancer("round_robin", ts), RoundRobin)
    assert isinstance(make_balancer("least_inflight", ts), LeastInflight)
    assert isinstance(make_balancer("random", ts), WeightedRandom)


def test_least_inflight_keeps_weights_when_idle() -> None:
    # Regression: ties used to rotate evenly, so an idle upstream ignored the weights.
    lb = LeastInflight(targets(1, 3))
    assert collections.Counter(picks(lb, 40)) == {"a": 10, "b": 30}
