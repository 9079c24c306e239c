"""API keys: a header whose value must be one of the configured keys.

Keys come from the config (`keys`) and from an environment variable (`keys_env`,
comma-separated), read when the runtime is built, so a reload picks up a rotated
variable. The comparison is constant-time over every key: each candidate and each key
are hashed to the same length and compared with `hmac.compare_digest`, and all keys
are compared whatever the result, so timing says neither which key nor how much of
one matched. The key header is removed from the upstream request unless the route
sets `forward_api_key`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass

from gateway.edge import EdgeContext, RequestFilter
from gateway.errors import Unauthorized

__all__ = ["ApiKeys", "api_key", "configured_keys"]


@dataclass(frozen=True, slots=True)
class ApiKeys:
    """What the API-key filter reads: the header and where the keys come from."""

    header: str = "X-API-Key"  # the request header carrying the key; default X-API-Key
    keys: tuple[str, ...] = ()  # keys listed in the config; default none
    keys_env: str | None = None  # variable holding more keys, comma-separated; default none


def configured_keys(settings: ApiKeys, environ: dict[str, str] | None = None) -> list[str]:
    """The listed keys plus those in `keys_env`; blanks and surrounding spaces dropped."""
    env = os.environ if environ is None else environ
    keys = [k.strip() for k in settings.keys]
    if settings.keys_env is not None:
        keys.extend(k.strip() for k in env.get(settings.keys_env, "").split(","))
    return [k for k in keys if k]


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


def api_key(
    settings: ApiKeys, *, forward: bool = False, environ: dict[str, str] | None = None
) -> RequestFilter:
    """The route's API-key filter. Refuses with 401 and `WWW-Authenticate: ApiKey ...`."""
    digests = [_digest(k.encode()) for k in configured_keys(settings, environ)]
    if not digests:
        raise ValueError(
            "auth.api_keys has no keys: list them in keys or set the variable named by keys_env"
        )
    name = settings.header.lower().encode("latin-1")
    challenge_value = f'ApiKey realm="gateway", header="{settings.header}"'.encode()
    challenge = [(b"www-authenticate", challenge_value)]

    async def check(ctx: EdgeContext) -> None:
        presented = ctx.header(name)
        if not presented:
            raise Unauthorized(
                f"missing API key: send it in {settings.header}", headers=list(challenge)
            )
        candidate = _digest(presented.strip())
        ok = False
        for digest in digests:
            ok |= hmac.compare_digest(candidate, digest)
        if not ok:
            raise Unauthorized(f"invalid API key in {settings.header}", headers=list(challenge))
        ctx.caller = candidate  # a hash: the key itself is never kept
        if not forward:
            ctx.upstream_headers[:] = [(k, v) for k, v in ctx.upstream_headers if k != name]
        return None

    return check
