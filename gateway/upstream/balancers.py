"""Selection policies: each balancer is a small type with one `select` method.

`select(exclude)` returns a healthy target not in `exclude` (target URLs already tried
by this request) when there is one, else any healthy target, else None.
"""

from __future__ import annotations

import bisect
import itertools
import random
from typing import Protocol

from gateway.upstream.target import Target

__all__ = ["Balancer", "LeastInflight", "RoundRobin", "WeightedRandom", "make_balancer"]


class Balancer(Protocol):
    def select(self, exclude: set[str]) -> Target | None: ...


def _candidates(targets: list[Target], exclude: set[str]) -> list[Target]:
    healthy = [t for t in targets if t.healthy]
    if exclude:
        fresh = [t for t in healthy if t.url not in exclude]
        return fresh or healthy
    return healthy


def _smooth_pick(targets: list[Target], current: list[int], allowed: list[Target]) -> Target:
    """One step of nginx's smooth weighted round robin over `allowed` (a non-empty
    subset of `targets`); `current` is the per-target running score it keeps."""
    ids = {id(t) for t in allowed}
    total = 0
    best = -1
    for i, t in enumerate(targets):
        if id(t) not in ids:
            continue
        current[i] += t.weight
        total += t.weight
        if best < 0 or current[i] > current[best]:
            best = i
    current[best] -= total
    return targets[best]


class RoundRobin:
    """Smooth weighted round robin (nginx's): exact over a cycle of sum(weights) picks,
    with the heavier targets interleaved rather than bunched."""

    def __init__(self, targets: list[Target]) -> None:
        self.targets = targets
        self._current = [0] * len(targets)
        self._uniform = all(t.weight == targets[0].weight for t in targets)
        self._cycle = itertools.cycle(range(len(targets)))

    def select(self, exclude: set[str]) -> Target | None:
        targets = self.targets
        if len(targets) == 1:
            t = targets[0]
            return t if t.healthy else None
        if self._uniform and not exclude:
            for _ in range(len(targets)):
                t = targets[next(self._cycle)]
                if t.healthy:
                    return t
            return None
        candidates = _candidates(targets, exclude)
        if not candidates:
            return None
        return _smooth_pick(targets, self._current, candidates)

    def __repr__(self) -> str:
        return f"RoundRobin({[t.url for t in self.targets]})"


class LeastInflight:
    """The target with the fewest in-flight requests per unit of weight (nginx's
    `least_conn`). Ties, such as every target of an idle upstream, are broken by smooth
    weighted round robin among the tied targets, so weights hold at low load too."""

    def __init__(self, targets: list[Target]) -> None:
        self.targets = targets
        self._current = [0] * len(targets)

    def select(self, exclude: set[str]) -> Target | None:
        candidates = _candidates(self.targets, exclude)
        if not candidates:
            return None
        # Compare inflight/weight by cross-multiplying: exact, no float ties missed.
        best = candidates[0]
        tied = [best]
        for t in candidates[1:]:
            left, right = t.inflight * best.weight, best.inflight * t.weight
            if left < right:
                best = t
                tied = [t]
            elif left == right:
                tied.append(t)
        if len(tied) == 1:
            return best
        return _smooth_pick(self.targets, self._current, tied)

    def __repr__(self) -> str:
        return f"LeastInflight({[(t.url, t.inflight) for t in self.targets]})"


class WeightedRandom:
    """A healthy target drawn at random, in proportion to its weight."""

    def __init__(self, targets: list[Target], rng: random.Random | None = None) -> None:
        self.targets = targets
        self._rng = rng or random.Random()

    def select(self, exclude: set[str]) -> Target | None:
        candidates = _candidates(self.targets, exclude)
        if not candidates:
            return None
        cumulative = list(itertools.accumulate(t.weight for t in candidates))
        point = self._rng.random() * cumulative[-1]
        return candidates[bisect.bisect_right(cumulative, point)]

    def __repr__(self) -> str:
        return f"WeightedRandom({[(t.url, t.weight) for t in self.targets]})"


def make_balancer(kind: str, targets: list[Target]) -> Balancer:
    if kind == "least_inflight":
        return LeastInflight(targets)
    if kind == "random":
        return WeightedRandom(targets)
    return RoundRobin(targets)
