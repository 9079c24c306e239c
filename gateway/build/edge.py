"""Assemble a route's edge filters, once, at build time (the edge's `proxy/factory.go`).

Order: CORS first (a preflight is answered before anything asks for credentials, and
the CORS headers it adds ride on every later answer, errors included), then auth
(`api_key` or `jwt`), then the rate limit (only requests that passed auth spend tokens
of their bucket).

`EdgeResources` is what the filters of one runtime share: the rate-limit store and the
JWT verifier with its JWKS cache. A reload whose store (or JWT) settings did not change
takes them over, buckets and cached keys included. `config_problems` lists what the
settings models cannot see on their own (missing auth blocks, empty key variables,
unreadable JWKS files); `factory.unsupported` reports them, so `gateway check`,
`gateway run` and a reload refuse such a config with a clear message.
"""

from __future__ import annotations

import os
from pathlib import Path

from gateway.build.values import plain
from gateway.config.models import GatewaySettings, JwtSettings, RouteSettings
from gateway.edge import RequestFilter
from gateway.edge.apikey import ApiKeys, api_key, configured_keys
from gateway.edge.cors import CorsRules, cors
from gateway.edge.jwt import (
    MIN_HMAC_SECRET,
    JwksKeys,
    JwtRules,
    JwtVerifier,
    hmac_secret,
    jwks_loader,
    jwt_auth,
    parse_jwks,
)
from gateway.edge.ratelimit import RateLimit, RateLimitStore, RedisStoreSpec, make_store, rate_limit
from gateway.ops.metrics import Metrics

__all__ = ["EdgeResources", "build_filters", "config_problems"]


def build_filters(
    route: RouteSettings,
    settings: GatewaySettings,
    store: RateLimitStore,
    metrics: Metrics | None,
    *,
    jwt: JwtVerifier | None = None,
) -> tuple[RequestFilter, ...]:
    """The route's request filters, in order: CORS, auth, rate limit."""
    filters: list[RequestFilter] = []
    policy = route.cors if route.cors is not None else settings.cors
    if policy is not None:
        methods = frozenset(route.methods) if route.methods is not None else None
        filters.append(cors(plain(CorsRules, policy), methods))
    auth = settings.auth
    if route.auth == "api_key":
        if auth is None or auth.api_keys is None:
            raise ValueError(f"route {route.name!r} asks for api_key but auth.api_keys is unset")
        filters.append(api_key(plain(ApiKeys, auth.api_keys), forward=route.forward_api_key))
    elif route.auth == "jwt":
        if auth is None or auth.jwt is None or jwt is None:
            raise ValueError(f"route {route.name!r} asks for jwt but auth.jwt is unset")
        filters.append(jwt_auth(plain(JwtRules, auth.jwt), jwt))
    if route.rate_limit is not None:
        filters.append(rate_limit(plain(RateLimit, route.rate_limit), route.name, store, metrics))
    return tuple(filters)


def router_methods(route: RouteSettings, settings: GatewaySettings) -> frozenset[str] | None:
    """The methods to route to this route: its own, plus OPTIONS when CORS applies, so
    that preflights reach the CORS filter instead of the router's 405."""
    if route.methods is None:
        return None
    methods = frozenset(route.methods)
    if route.cors is not None or settings.cors is not None:
        methods |= {"OPTIONS"}
    return methods


class EdgeResources:
    """The rate-limit store and the JWT verifier of one runtime."""

    def __init__(self, settings: GatewaySettings, previous: EdgeResources | None = None) -> None:
        store = settings.rate_limit_store
        self.store: RateLimitStore = make_store(
            store if isinstance(store, str) else plain(RedisStoreSpec, store),
            previous.store if previous is not None else None,
        )
        self.jwt_settings: JwtSettings | None = settings.auth.jwt if settings.auth else None
        self.jwks: JwksKeys | None = None
        self.jwt: JwtVerifier | None = None
        jwt_settings = self.jwt_settings
        if jwt_settings is None:
            return
        rules = plain(JwtRules, jwt_settings)
        if previous is not None and previous.jwt_settings == jwt_settings:
            self.jwks = previous.jwks  # same source: keep the cached keys
        elif rules.jwks_file is not None or rules.jwks_url is not None:
            self.jwks = JwksKeys(
                jwks_loader(rules),
                jwt_settings.jwks_refresh,
                source=rules.jwks_file or rules.jwks_url or "jwks",
            )
        # The secret is read from the environment on every build, so a reload rotates it.
        self.jwt = JwtVerifier(rules, self.jwks, hmac_secret(rules))

    async def start(self) -> None:
        if self.jwks is not None:
            await self.jwks.start()  # a no-op for keys taken over from the previous runtime

    async def retire(self, successor: EdgeResources | None) -> None:
        """Close what the successor runtime did not take over."""
        if successor is None or successor.store is not self.store:
            await self.store.aclose()
        if self.jwks is not None and (successor is None or successor.jwks is not self.jwks):
            await self.jwks.aclose()

    async def aclose(self) -> None:
        await self.retire(None)

    def __repr__(self) -> str:
        return f"EdgeResources(store={self.store!r}, jwks={self.jwks!r})"


def config_problems(settings: GatewaySettings, environ: dict[str, str] | None = None) -> list[str]:
    """What would make the edge filters refuse to build, as `path: message` lines."""
    env = dict(os.environ) if environ is None else environ
    problems: list[str] = []
    auth = settings.auth
    for i, route in enumerate(settings.routes):
        if route.auth == "api_key" and (auth is None or auth.api_keys is None):
            problems.append(f"routes.{i}.auth: api_key needs the global auth.api_keys block")
        if route.auth == "jwt" and (auth is None or auth.jwt is None):
            problems.append(f"routes.{i}.auth: jwt needs the global auth.jwt block")
    if auth is not None and auth.api_keys is not None:
        keys = auth.api_keys
        if not configured_keys(plain(ApiKeys, keys), env):
            where = f" and {keys.keys_env} is unset or empty" if keys.keys_env else ""
            problems.append(f"auth.api_keys: no keys: none listed in keys{where}")
    if auth is not None and auth.jwt is not None:
        jwt = auth.jwt
        if jwt.secret_env is not None and "HS256" in jwt.algorithms:
            secret = env.get(jwt.secret_env, "")
            if not secret:
                problems.append(
                    f"auth.jwt.secret_env: environment variable {jwt.secret_env} is unset or empty"
                )
            elif len(secret.encode()) < MIN_HMAC_SECRET:
                problems.append(
                    f"auth.jwt.secret_env: the secret in {jwt.secret_env} is shorter than "
                    f"{MIN_HMAC_SECRET} bytes (RFC 7518 3.2)"
                )
        if jwt.jwks_file is not None:
            try:
                parse_jwks(Path(jwt.jwks_file).read_bytes())
            except OSError as exc:
                problems.append(f"auth.jwt.jwks_file: cannot read {jwt.jwks_file}: {exc.strerror}")
            except ValueError as exc:  # json.JSONDecodeError included
                problems.append(f"auth.jwt.jwks_file: {jwt.jwks_file} is not a JWKS: {exc}")
    return problems
