"""RFC 9111's rules for the shared cache (`dataplane/cacherules.py`) and the memory
store's LRU and purges (`dataplane/cache.py`)."""

from __future__ import annotations

from email.utils import formatdate

import pytest

from gateway.dataplane.cache import Entry, MemoryStore
from gateway.dataplane.cacherules import (
    current_age,
    freshness,
    parse_cache_control,
    request_directives,
    vary_names,
    vary_values,
)
from gateway.types import Headers

NOW = 1_700_000_000.0


def date(at: float) -> bytes:
    return formatdate(at, usegmt=True).encode()


def cc(value: str, *extra: tuple[bytes, bytes]) -> Headers:
    return [(b"cache-control", value.encode()), (b"date", date(NOW)), *extra]


def test_parse_cache_control() -> None:
    parsed = parse_cache_control(
        [(b"Cache-Control", b"max-age=60, Public"), (b"cache-control", b's-maxage="5"')]
    )
    assert parsed == {b"max-age": b"60", b"public": None, b"s-maxage": b"5"}


def test_s_maxage_beats_max_age_beats_expires_beats_default() -> None:
    expires = (b"expires", date(NOW + 30))
    assert freshness(200, cc("max-age=60, s-maxage=10", expires), 5, now=NOW).lifetime == 10
    assert freshness(200, cc("max-age=60", expires), 5, now=NOW).lifetime == 60
    assert freshness(200, [(b"date", date(NOW)), expires], 5, now=NOW).lifetime == 30
    assert freshness(200, [(b"date", date(NOW))], 5, now=NOW).lifetime == 5


def test_no_explicit_freshness_and_no_default_is_not_stored() -> None:
    assert freshness(200, [(b"date", date(NOW))], 0, now=NOW).lifetime is None


def test_invalid_expires_is_already_expired() -> None:
    fresh = freshness(200, [(b"expires", b"0"), (b"etag", b'"a"')], 0, now=NOW)
    assert fresh.lifetime == 0


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        (cc("no-store, max-age=60"), "no-store"),
        (cc("private, max-age=60"), "private"),
        (cc("max-age=60", (b"set-cookie", b"a=1")), "set-cookie"),
        (cc("max-age=60", (b"vary", b"Accept, *")), "vary-star"),
    ],
)
def test_never_stored(headers: Headers, reason: str) -> None:
    fresh = freshness(200, headers, 60, now=NOW)
    assert fresh.lifetime is None
    assert fresh.reason == reason


@pytest.mark.parametrize("status", [201, 302, 307, 400, 403, 500, 502, 503])
def test_statuses_outside_the_heuristic_set_are_not_stored(status: int) -> None:
    assert freshness(status, cc("max-age=60"), 60, now=NOW).lifetime is None


@pytest.mark.parametrize("status", [200, 203, 204, 300, 301, 404, 405, 410, 414, 501])
def test_heuristic_statuses_are_stored(status: int) -> None:
    assert freshness(status, cc("max-age=60"), 0, now=NOW).lifetime == 60


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        ("max-age=60", False),
        ("public, max-age=60", True),
        ("s-maxage=60", True),
        ("must-revalidate, max-age=60", True),
    ],
)
def test_authorization_needs_permission(value: str, stored: bool) -> None:
    fresh = freshness(200, cc(value), 0, authorized=True, now=NOW)
    assert (fresh.lifetime is not None) is stored


def test_no_cache_with_a_validator_is_stored_for_revalidation() -> None:
    fresh = freshness(200, cc("no-cache", (b"etag", b'"v"')), 0, now=NOW)
    assert fresh.lifetime == 0
    assert fresh.no_cache
    assert freshness(200, cc("no-cache"), 0, now=NOW).lifetime is None


def test_initial_age_from_age_and_date() -> None:
    assert freshness(200, cc("max-age=60", (b"age", b"7")), 0, now=NOW).initial_age == 7
    late = freshness(200, cc("max-age=60"), 0, now=NOW + 3)
    assert late.initial_age == 3  # the apparent age: it left the origin 3 s ago
    assert current_age(7, NOW, NOW + 10) == 17


def test_vary_names_and_values() -> None:
    names = vary_names([(b"Vary", b"Accept-Language, x-b"), (b"vary", b"accept-language")])
    assert names == (b"accept-language", b"x-b")
    request = [(b"accept-language", b"en,  fr"), (b"x-b", b"1"), (b"x-b", b"2")]
    assert vary_values(request, names) == (b"en,fr", b"1,2")
    assert vary_values([], names) == (b"", b"")


def entry(target: str, size: int, route: str = "r") -> Entry:
    fresh = freshness(200, cc("max-age=60"), 0, now=NOW)
    return Entry((route, target, (), ()), 200, [], b"x" * size, fresh, NOW)


def test_store_evicts_least_recently_used() -> None:
    one = entry("/1", 400)
    store = MemoryStore(max_size=3 * one.size)
    store.put(one)
    store.put(entry("/2", 400))
    store.put(entry("/3", 400))
    assert store.get(("r", "/1", (), ())) is not None  # /1 is now the most recent
    store.put(entry("/4", 400))
    assert store.get(("r", "/2", (), ())) is None
    assert len(store) == 3
    assert store.size <= store.max_size


def test_store_purge_counts_variants() -> None:
    store = MemoryStore(max_size=1 << 20)
    fresh = freshness(200, cc("max-age=60"), 0, now=NOW)
    for lang in (b"en", b"fr"):
        store.put(Entry(("r", "/a", (b"x",), (lang,)), 200, [], b"", fresh, NOW))
    store.put(entry("/b", 1))
    store.put(entry("/a", 1, route="other"))
    assert store.purge(lambda p: p == ("r", "/a")) == 2
    assert store.purge(lambda p: p[1].startswith("/")) == 2
    assert len(store) == 0
    assert store.size == 0


def test_entry_age_and_ttl() -> None:
    fresh = freshness(200, cc("max-age=60", (b"age", b"10")), 0, now=NOW)
    stored = Entry(("r", "/", (), ()), 200, [(b"age", b"10")], b"", fresh, NOW)
    assert stored.headers == []  # Age is recomputed per hit, never stored
    assert stored.age(NOW + 5) == 15
    assert stored.ttl(NOW + 5) == 45
    assert stored.usable(NOW + 49)
    assert not stored.usable(NOW + 50)


def test_stale_windows_from_rfc_5861_directives() -> None:
    both = freshness(200, cc("max-age=60, stale-while-revalidate=30, stale-if-error=600"), 0)
    assert (both.stale_while_revalidate, both.stale_if_error) == (30, 600)
    plain = freshness(200, cc("max-age=60"), 0, now=NOW)
    assert (plain.stale_while_revalidate, plain.stale_if_error) == (0, 0)
    bad = freshness(200, cc("max-age=60, stale-while-revalidate=-1, stale-if-error"), 0)
    assert (bad.stale_while_revalidate, bad.stale_if_error) == (0, 0)


@pytest.mark.parametrize("forbids", ["must-revalidate", "proxy-revalidate", "no-cache"])
def test_stale_windows_yield_to_revalidation_directives(forbids: str) -> None:
    value = f"max-age=60, {forbids}, stale-while-revalidate=30, stale-if-error=600"
    fresh = freshness(200, cc(value, (b"etag", b'"v"')), 0, now=NOW)
    assert (fresh.stale_while_revalidate, fresh.stale_if_error) == (0, 0)


def test_entry_within_a_stale_window() -> None:
    value = "max-age=60, stale-while-revalidate=30, stale-if-error=600"
    fresh = freshness(200, cc(value), 0, now=NOW)
    stored = Entry(("r", "/", (), ()), 200, [], b"", fresh, NOW)
    assert stored.within(stored.stale_while_revalidate, NOW + 90)
    assert not stored.within(stored.stale_while_revalidate, NOW + 91)
    assert stored.within(stored.stale_if_error, NOW + 660)
    assert not stored.within(stored.stale_if_error, NOW + 661)
    assert not stored.within(0, NOW + 61)


def _directives(value: bytes):  # type: ignore[no-untyped-def]
    found = request_directives([(b"accept", b"*/*"), (b"Cache-Control", value)])
    assert found is not None
    return found


def test_no_request_directives_is_none() -> None:
    assert request_directives([(b"accept", b"*/*")]) is None


@pytest.mark.parametrize(
    ("value", "age", "lifetime", "accepted"),
    [
        (b"max-age=10", 5, 60, True),
        (b"max-age=10", 11, 60, False),
        (b"min-fresh=30", 20, 60, True),  # 40 s left
        (b"min-fresh=30", 40, 60, False),  # 20 s left
        (b"no-cache", 0, 60, False),
        (b"max-stale=10", 65, 60, True),  # 5 s stale
        (b"max-stale=10", 75, 60, False),
        (b"max-stale", 10_000, 60, True),
        (b"max-stale=bogus", 61, 60, False),  # an invalid value accepts nothing stale
        (b"no-store", 61, 60, False),  # stale, and nothing accepts it
        (b'max-age="10"', 11, 60, False),  # quoted-string argument
    ],
)
def test_request_directives_accept(value: bytes, age: int, lifetime: int, accepted: bool) -> None:
    assert _directives(value).accepts(age, lifetime, False, []) is accepted


@pytest.mark.parametrize("cc", [b"must-revalidate", b"proxy-revalidate", b"s-maxage=1"])
def test_max_stale_never_overrides_revalidation(cc: bytes) -> None:
    stored: Headers = [(b"cache-control", b"max-age=1, " + cc)]
    assert not _directives(b"max-stale").accepts(5, 1, False, stored)


def test_stored_no_cache_is_never_accepted() -> None:
    assert not _directives(b"max-stale").accepts(0, 60, True, [])


def test_strict_and_flags() -> None:
    d = _directives(b"no-store, only-if-cached")
    assert d.no_store and d.only_if_cached and not d.strict
    assert _directives(b"max-age=0").strict
    assert _directives(b"min-fresh=1").strict
    assert not _directives(b"max-stale=5").strict
