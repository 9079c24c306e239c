"""JWT bearer tokens, verified with PyJWT.

The token's header never chooses the kind of key. An algorithm is accepted only if it
is in the route's `algorithms`; HS256 is verified only with the secret from
`secret_env`, RS256 only with an RSA key and ES256 only with a P-256 EC key from the
JWKS (symmetric `oct` keys in a JWKS are ignored). So `alg: none`, an HS256 token
signed with a public key (algorithm confusion) and any algorithm not configured are
all refused before a signature is checked.

The JWKS (a file or a URL) is cached per runtime and re-read every `jwks_refresh`, in
the background. A token naming an unknown `kid` triggers one immediate re-read, at most
once per `KID_REFRESH_COOLDOWN` seconds, so rotated keys are picked up at once while a
stream of made-up kids cannot hammer the JWKS source.

A verified token is remembered (`TOKEN_CACHE_SIZE` tokens per verifier, oldest first
out), so a client sending the same token again costs a dictionary lookup and an expiry
check instead of a signature check (Envoy's `jwt_cache_config` does the same; the
gain is in docs/performance.md). Only tokens that passed every check are remembered, by their
exact text (signature included); `exp` is checked again on every use, and the whole
cache is dropped whenever the JWKS is re-read, so a key removed from it stops accepting
its tokens at once.

Claims named in `claims_to_headers` are sent upstream as headers; headers of those names
sent by the client are always removed first, so they cannot be spoofed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import jwt
from jwt import PyJWK

from gateway.edge import EdgeContext, RequestFilter
from gateway.errors import Unauthorized

__all__ = [
    "InvalidToken",
    "JwksKey",
    "JwksKeys",
    "JwtRules",
    "JwtVerifier",
    "bearer_token",
    "claim_header_value",
    "hmac_secret",
    "jwks_loader",
    "jwt_auth",
    "parse_jwks",
]

log = logging.getLogger("gateway.jwt")

KID_REFRESH_COOLDOWN = 10.0  # seconds between re-reads triggered by unknown kids
FAILED_REFRESH_RETRY = 30.0  # a failed periodic re-read is tried again this much later
JWKS_FETCH_TIMEOUT = 3.0
JWKS_MAX_BYTES = 1024 * 1024
TOKEN_CACHE_SIZE = 1024  # verified tokens remembered per verifier
TOKEN_CACHE_MAX_LENGTH = 4096  # longer tokens are verified every time
MIN_HMAC_SECRET = 32  # bytes: RFC 7518 3.2, a key at least as long as the hash

_ASYMMETRIC = {"RS256": ("RSA", None), "ES256": ("EC", "P-256")}  # alg -> (kty, crv)
_MISSING = [(b"www-authenticate", b'Bearer realm="gateway"')]
_INVALID = [(b"www-authenticate", b'Bearer realm="gateway", error="invalid_token"')]
# Printable ASCII but `%` stays as it is in a claim header; anything else is %-encoded.
_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")

Loader = Callable[[], Awaitable[bytes]]


class InvalidToken(Exception):
    """Why a token was refused (the problem's `detail`)."""


@dataclass(frozen=True, slots=True)
class JwtRules:
    """What the JWT verifier, the JWKS loader and the filter read: which tokens to accept,
    where their keys come from, and which claims go upstream."""

    issuer: str | None = None  # the required `iss`; default none (not checked)
    audience: str | None = None  # the required `aud`; default none (not checked)
    algorithms: tuple[str, ...] = ("RS256",)  # RS256, ES256 and/or HS256; default RS256
    jwks_file: str | None = None  # path of a JWKS file; default none
    jwks_url: str | None = None  # http(s) URL of a JWKS; default none
    secret_env: str | None = None  # variable holding the HS256 secret; default none
    leeway: float = 30.0  # seconds of clock skew allowed on exp, nbf and iat; default 30
    # claim -> upstream header name, e.g. {"sub": "X-User-Id"}; default none
    claims_to_headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class JwksKey:
    kid: str | None
    kty: str
    crv: str | None
    alg: str  # the JWK's `alg`, or PyJWT's default for its kty and crv
    key: Any  # a cryptography public key


def parse_jwks(data: bytes) -> list[JwksKey]:
    """The usable signature keys of a JWKS document: RSA and EC only, `use` absent or
    `sig`. Keys PyJWT cannot build are skipped (logged), not fatal."""
    doc = json.loads(data)
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError('a JWKS is a JSON object with a "keys" list')
    keys = []
    for item in doc["keys"]:
        if not isinstance(item, dict) or item.get("kty") not in ("RSA", "EC"):
            continue
        if item.get("use", "sig") != "sig":
            continue
        kid = item.get("kid")
        try:
            jwk = PyJWK(item)
        except jwt.PyJWTError as exc:
            log.warning("skipping a JWKS key (kid %r): %s", kid, exc)
            continue
        keys.append(
            JwksKey(
                kid=kid if isinstance(kid, str) else None,
                kty=item["kty"],
                crv=item.get("crv"),
                alg=jwk.algorithm_name,
                key=jwk.key,
            )
        )
    return keys


def jwks_loader(settings: JwtRules) -> Loader:
    """Reads the configured JWKS source: the file, or the URL (bounded in time and size)."""
    if settings.jwks_file is not None:
        path = Path(settings.jwks_file)

        async def read_file() -> bytes:
            return await asyncio.to_thread(path.read_bytes)

        return read_file
    url = settings.jwks_url
    assert url is not None

    async def fetch() -> bytes:
        async with httpx.AsyncClient(timeout=JWKS_FETCH_TIMEOUT) as client:
            async with client.stream("GET", url, headers={"accept": "application/json"}) as r:
                r.raise_for_status()
                body = b""
                async for chunk in r.aiter_bytes():
                    body += chunk
                    if len(body) > JWKS_MAX_BYTES:
                        raise ValueError(f"JWKS larger than {JWKS_MAX_BYTES} bytes")
                return body

    return fetch


class JwksKeys:
    """A cached JWKS: looked up by kid and algorithm, re-read periodically and on an
    unknown kid (rate-limited). One per runtime, shared by every JWT route."""

    def __init__(
        self,
        load: Loader,
        refresh: float,
        *,
        source: str = "jwks",
        cooldown: float = KID_REFRESH_COOLDOWN,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._load = load
        self._refresh_every = refresh
        self._source = source
        self._cooldown = cooldown
        self._clock = clock
        self._keys: list[JwksKey] = []
        self._kids: frozenset[str] = frozenset()
        self._next_refresh = 0.0
        self._kid_refresh_at = -cooldown  # the first unknown kid may always refresh
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._closed = False  # after `aclose` no refresh task starts (a late request)
        self.loads = 0  # completed reads, successful or not
        self.generation = 0  # successful reads: tokens verified before one are checked again

    async def start(self) -> None:
        """The first read; a failure is logged and retried on the next unknown kid."""
        async with self._lock:
            if self.loads == 0:
                await self._reload("startup")

    async def _reload(self, reason: str) -> bool:
        """Re-read the JWKS (lock held). On failure the keys already known stay."""
        try:
            keys = parse_jwks(await self._load())
        except Exception as exc:  # a bad file or a failing URL must not take auth down
            self.loads += 1
            self._next_refresh = self._clock() + min(self._refresh_every, FAILED_REFRESH_RETRY)
            log.error(
                "JWKS read failed (%s): %s: %s; keeping %d known keys",
                reason,
                type(exc).__name__,
                exc,
                len(self._keys),
                extra={"jwks": self._source},
            )
            return False
        self.loads += 1
        self.generation += 1
        self._keys = keys
        self._kids = frozenset(k.kid for k in keys if k.kid is not None)
        self._next_refresh = self._clock() + self._refresh_every
        log.info("JWKS loaded (%s): %d keys", reason, len(keys), extra={"jwks": self._source})
        return True

    def find(self, kid: str | None, alg: str) -> JwksKey | None:
        """The key for this kid and algorithm, of the key type the algorithm needs. A
        token without a kid is accepted only when exactly one key fits."""
        kty, crv = _ASYMMETRIC[alg]
        fits = [
            k
            for k in self._keys
            if k.kty == kty
            and k.alg == alg
            and (crv is None or k.crv == crv)
            and (kid is None or k.kid == kid)
        ]
        if kid is None:
            return fits[0] if len(fits) == 1 else None
        return fits[0] if fits else None

    def refresh_if_due(self) -> None:
        """Start the periodic re-read in the background when it is due."""
        if (
            self._clock() >= self._next_refresh
            and (self._task is None or self._task.done())
            and not self._closed
        ):
            self._task = asyncio.create_task(self._periodic())

    async def key_for(self, kid: str | None, alg: str) -> JwksKey | None:
        self.refresh_if_due()
        key = self.find(kid, alg)
        if key is None and kid is not None and kid not in self._kids:
            await self._refresh_for(kid)
            key = self.find(kid, alg)
        return key

    async def _refresh_for(self, kid: str) -> None:
        if self._clock() - self._kid_refresh_at < self._cooldown:
            return
        async with self._lock:
            # Another request may have re-read while this one waited.
            if kid in self._kids or self._clock() - self._kid_refresh_at < self._cooldown:
                return
            self._kid_refresh_at = self._clock()
            await self._reload(f"unknown kid {kid[:64]!r}")

    async def _periodic(self) -> None:
        async with self._lock:
            if self._clock() >= self._next_refresh:
                await self._reload("periodic")

    async def aclose(self) -> None:
        self._closed = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def __repr__(self) -> str:
        return f"JwksKeys({self._source!r}, keys={sorted(self._kids)}, loads={self.loads})"


class JwtVerifier:
    """Checks one token: algorithm, key, signature, then exp/nbf/iat, iss and aud."""

    def __init__(
        self,
        settings: JwtRules,
        keys: JwksKeys | None,
        secret: bytes | None,
        *,
        now: Callable[[], float] = time.time,
    ):
        self.algorithms = frozenset(settings.algorithms)
        if "HS256" in self.algorithms and not secret:
            raise ValueError("HS256 is configured but the secret is empty")
        if self.algorithms - {"HS256"} and keys is None:
            raise ValueError("RS256/ES256 need a JWKS")
        self._keys = keys
        self._secret = secret
        self._issuer = settings.issuer
        self._audience = settings.audience
        self._leeway = settings.leeway
        require = ["exp"]
        if settings.issuer is not None:
            require.append("iss")
        if settings.audience is not None:
            require.append("aud")
        self._options: Any = {  # PyJWT's Options TypedDict is newer than 2.8
            "require": require,
            "verify_aud": settings.audience is not None,
            "enforce_minimum_key_length": True,
        }
        self._now = now  # wall clock, as PyJWT's own checks use
        # token -> (its `exp`, its claims), for tokens that passed every check.
        self._verified: dict[str, tuple[float, dict[str, Any]]] = {}
        self._generation = keys.generation if keys is not None else 0

    async def verify(self, token: str) -> dict[str, Any]:
        keys = self._keys
        if keys is not None:
            keys.refresh_if_due()
            if keys.generation != self._generation:
                self._verified.clear()  # the JWKS was re-read: check every token again
                self._generation = keys.generation
        known = self._verified.get(token)
        if known is not None:
            expires, claims = known
            if expires > self._now() - self._leeway:
                return claims
            del self._verified[token]
            raise InvalidToken("token expired")
        claims = await self._check(token)
        if len(token) <= TOKEN_CACHE_MAX_LENGTH:
            verified = self._verified
            if len(verified) >= TOKEN_CACHE_SIZE:
                del verified[next(iter(verified))]
            verified[token] = (float(claims["exp"]), claims)
        return claims

    async def _check(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidToken("malformed token") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise InvalidToken(f"algorithm {str(alg)[:16]!r} is not accepted")
        key: Any
        if alg == "HS256":
            key = self._secret
        else:
            kid = header.get("kid")
            if kid is not None and not isinstance(kid, str):
                raise InvalidToken("malformed kid")
            assert self._keys is not None
            jwk = await self._keys.key_for(kid, alg)
            if jwk is None:
                raise InvalidToken("no key matches the token's kid and algorithm")
            key = jwk.key
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options=self._options,
            )
        except jwt.ExpiredSignatureError:
            raise InvalidToken("token expired") from None
        except jwt.ImmatureSignatureError:
            raise InvalidToken("token not valid yet") from None
        except jwt.InvalidAudienceError:
            raise InvalidToken("wrong audience") from None
        except jwt.InvalidIssuerError:
            raise InvalidToken("wrong issuer") from None
        except jwt.MissingRequiredClaimError as exc:
            raise InvalidToken(f"missing claim {exc.claim!r}") from None
        except jwt.InvalidSignatureError:
            raise InvalidToken("bad signature") from None
        except jwt.PyJWTError:
            raise InvalidToken("invalid token") from None
        return claims


def hmac_secret(settings: JwtRules, environ: dict[str, str] | None = None) -> bytes | None:
    if settings.secret_env is None:
        return None
    env = os.environ if environ is None else environ
    return env.get(settings.secret_env, "").encode() or None


def bearer_token(value: bytes | None) -> str | None:
    if value is None:
        return None
    scheme, _, token = value.decode("latin-1").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def claim_header_value(value: object) -> bytes | None:
    """A claim as a header value: strings as they are, numbers and booleans as JSON
    scalars, lists and objects as compact JSON. Values with `%`, non-ASCII or control
    characters are %-encoded (UTF-8), so an upstream may always percent-decode."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value
    elif isinstance(value, bool | int | float):
        text = json.dumps(value)
    else:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    if not all(c in _SAFE for c in text):
        text = quote(text, safe=_SAFE)
    return text.encode("ascii")


def jwt_auth(settings: JwtRules, verifier: JwtVerifier) -> RequestFilter:
    """The route's JWT filter. Refuses with 401 and `WWW-Authenticate: Bearer ...`."""
    mapping = [(claim, name.lower().encode()) for claim, name in settings.claims_to_headers.items()]
    strip = frozenset(name for _, name in mapping)

    async def check(ctx: EdgeContext) -> None:
        if strip:
            ctx.upstream_headers[:] = [(k, v) for k, v in ctx.upstream_headers if k not in strip]
        token = bearer_token(ctx.header(b"authorization"))
        if token is None:
            raise Unauthorized(
                "missing bearer token: send Authorization: Bearer <JWT>", headers=list(_MISSING)
            )
        try:
            claims = await verifier.verify(token)
        except InvalidToken as exc:
            raise Unauthorized(str(exc), headers=list(_INVALID)) from None
        for claim, name in mapping:
            value = claim_header_value(claims.get(claim))
            if value is not None:
                ctx.upstream_headers.append((name, value))
        sub = claims.get("sub")
        if sub is not None:
            ctx.caller = str(sub)
        return None

    return check
