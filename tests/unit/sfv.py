"""The RateLimit fields as a client reads them: parsed with http_sfv (RFC 9651), strictly."""

from __future__ import annotations

import http_sfv

__all__ = ["RateLimitField", "parse_ratelimit_field"]

RateLimitField = tuple[str, dict[str, int]]


def parse_ratelimit_field(value: bytes) -> RateLimitField:
    """One `RateLimit` or `RateLimit-Policy` value: a List of exactly one Item whose value
    is a String (a Token is the draft-06 mistake) and whose parameters are all Integers.
    Returns the policy name and the parameters; any other shape fails the test."""
    members = http_sfv.List()
    members.parse(value)  # ValueError on anything that is not a valid sf-list
    assert len(members) == 1, value
    item = members[0]
    assert isinstance(item, http_sfv.Item), value
    assert type(item.value) is str, f"{value!r}: the name is {type(item.value).__name__}"
    params = dict(item.params)
    for key, param in params.items():
        assert type(param) is int, f"{value!r}: {key} is {type(param).__name__}"
    return item.value, params
