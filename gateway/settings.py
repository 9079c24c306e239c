"""The configuration schema: small frozen pydantic models whose field names are the contract's.

Validation here is per-field and per-model; cross-references (a route naming an
unknown upstream, duplicate route names) are checked by `loader.cross_check`, which
reports them with the same `FILE:LINE:COL: path: message` locations.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from starlette.routing import PARAM_REGEX

from gateway.units import Duration, Rate, Size

__all__ = [
    "AggregateSettings",
    "ApiKeySettings",
    "AuthSettings",
    "BackendSettings",
    "BreakerSettings",
    "CorsSettings",
    "GatewaySettings",
    "HealthCheckSettings",
    "JwtSettings",
    "RateLimitSettings",
    "RedisStore",
    "RetrySettings",
    "RouteSettings",
    "ServerSettings",
    "TargetSettings",
    "UpstreamSettings",
]

KiB = 1024
MiB = 1024 * 1024
HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"}
)


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ServerSettings(Model):
    host: str = "0.0.0.0"
    port: int = Field(8080, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=64)
    admin_host: str = "127.0.0.1"
    admin_port: int = Field(9901, ge=0, le=65535)
    max_body_size: Size = 10 * MiB
    drain_timeout: Duration = 30.0
    trusted_proxies: tuple[IPNetwork, ...] = (ipaddress.IPv4Network("127.0.0.1/32"),)
    access_log: bool = True
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    watch: bool = False
    admin_token_env: str | None = None
    # What one client connection may send or hold (docs/limits.md). Per worker process,
    # read at start: a reload does not change them.
    max_request_line: Size = 8 * KiB  # the request target; longer: 414
    max_header_size: Size = 32 * KiB  # all header field lines together; more: 431
    max_header_count: int = Field(100, ge=1, le=10_000)  # more: 431
    header_timeout: Duration = 10.0  # from connect (or first byte) to the end of the head
    body_timeout: Duration = 10.0  # the longest pause between request body chunks: 408
    keepalive_timeout: Duration = 5.0  # idle time between requests on one connection
    max_client_connections: int = Field(10_000, ge=1)  # per worker; beyond it: 503
    # gateway/allocator.py: jemalloc where installed gives memory back after bursts.
    allocator: Literal["auto", "jemalloc", "python"] = "auto"

    @field_validator(
        "max_request_line",
        "max_header_size",
        "header_timeout",
        "body_timeout",
        "keepalive_timeout",
    )
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be greater than zero")
        return value

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _networks(cls, value: Any) -> Any:
        if isinstance(value, list | tuple):
            return tuple(ipaddress.ip_network(v, strict=False) for v in value)
        return value


class TargetSettings(Model):
    url: str
    weight: int = Field(1, ge=1, le=1000)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/?#\s]+$", value.rstrip("/")):
            raise ValueError(
                f"invalid target URL {value!r}: expected http(s)://host:port with no path"
            )
        return value.rstrip("/")


class RetrySettings(Model):
    attempts: int = Field(1, ge=0, le=10)
    backoff: Duration = 0.025
    on: tuple[Literal["connect_error", "timeout"] | Annotated[int, Field(ge=500, le=599)], ...] = (
        "connect_error",
    )
    budget: float = 0.2

    @field_validator("budget", mode="before")
    @classmethod
    def _percent(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().endswith("%"):
            return float(value.strip()[:-1]) / 100
        return value

    @field_validator("budget")
    @classmethod
    def _budget_range(cls, value: float) -> float:
        if not 0 <= value <= 1:
            raise ValueError("budget is a share of requests: between 0% and 100%")
        return value


class BreakerSettings(Model):
    failure_ratio: float = Field(0.5, gt=0, le=1)
    min_requests: int = Field(20, ge=1)
    window: Duration = 10.0
    open_for: Duration = 5.0
    half_open_requests: int = Field(1, ge=1)


class HealthCheckSettings(Model):
    path: str = "/healthz"
    interval: Duration = 5.0
    timeout: Duration = 1.0
    healthy_threshold: int = Field(2, ge=1)
    unhealthy_threshold: int = Field(3, ge=1)


class UpstreamSettings(Model):
    targets: tuple[TargetSettings, ...] = Field(min_length=1)
    balancer: Literal["round_robin", "least_inflight", "random"] = "round_robin"
    max_connections: int = Field(256, ge=1)
    max_keepalive: int = Field(64, ge=0)
    keepalive_expiry: Duration = 4.0
    max_concurrency: int = Field(1024, ge=1)
    max_queue: int = Field(1024, ge=0)
    queue_timeout: Duration = 1.0
    connect_timeout: Duration = 2.0
    read_timeout: Duration = 30.0
    retries: RetrySettings = RetrySettings()
    circuit_breaker: BreakerSettings | None = None
    health_check: HealthCheckSettings | None = None

    @field_validator("targets", mode="before")
    @classmethod
    def _targets(cls, value: Any) -> Any:
        if isinstance(value, list | tuple):
            return tuple({"url": v} if isinstance(v, str) else v for v in value)
        return value


class RateLimitSettings(Model):
    rate: Rate
    burst: int = Field(ge=1)
    key: str = "client_ip"
    # When the shared (Redis) store cannot be reached: false lets requests through
    # (fail-open), true refuses them with 503 `rate_limit_unavailable`.
    fail_closed: bool = False

    @field_validator("key")
    @classmethod
    def _key(cls, value: str) -> str:
        if value in ("client_ip", "route") or re.match(r"^header:[A-Za-z0-9-]+$", value):
            return value
        raise ValueError("key must be client_ip, route or header:NAME")


class RedisStore(Model):
    redis: str
    prefix: str = "gateway:rl:"  # every bucket key starts with it (one Redis, several gateways)
    timeout: Duration = 0.2  # connect, pool wait and reply, each; a dead Redis never stalls

    @field_validator("redis")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("expected a redis:// URL")
        return value


class ApiKeySettings(Model):
    header: str = "X-API-Key"
    keys: tuple[str, ...] = ()
    keys_env: str | None = None

    @field_validator("header")
    @classmethod
    def _header(cls, value: str) -> str:
        if not re.match(r"^[A-Za-z0-9-]+$", value):
            raise ValueError("header must be a header name such as X-API-Key")
        return value


class JwtSettings(Model):
    issuer: str | None = None
    audience: str | None = None
    algorithms: tuple[Literal["RS256", "ES256", "HS256"], ...] = Field(("RS256",), min_length=1)
    jwks_file: str | None = None
    jwks_url: str | None = None
    secret_env: str | None = None
    leeway: Duration = 30.0  # clock skew allowed on exp, nbf and iat
    jwks_refresh: Duration = 300.0  # how often the JWKS is re-read; an unknown kid also does
    claims_to_headers: dict[str, str] = Field(default_factory=dict)  # {sub: X-User-Id}

    @field_validator("claims_to_headers")
    @classmethod
    def _claim_headers(cls, value: dict[str, str]) -> dict[str, str]:
        for header in value.values():
            if not re.match(r"^[A-Za-z0-9-]+$", header):
                raise ValueError(f"{header!r} is not a header name")
        return value

    @model_validator(mode="after")
    def _key_sources(self) -> JwtSettings:
        if self.jwks_file is not None and self.jwks_url is not None:
            raise ValueError("jwks_file and jwks_url are exclusive: give one")
        asymmetric = [a for a in self.algorithms if a != "HS256"]
        if asymmetric and self.jwks_file is None and self.jwks_url is None:
            raise ValueError(f"{', '.join(asymmetric)} needs jwks_file or jwks_url")
        if "HS256" in self.algorithms and self.secret_env is None:
            raise ValueError("HS256 needs secret_env (the variable holding the shared secret)")
        if self.jwks_url is not None and not self.jwks_url.startswith(("https://", "http://")):
            raise ValueError("jwks_url must be an http(s) URL")
        return self


class AuthSettings(Model):
    api_keys: ApiKeySettings | None = None
    jwt: JwtSettings | None = None


class CorsSettings(Model):
    allow_origins: tuple[str, ...] = ()
    allow_methods: tuple[str, ...] = ("GET",)
    allow_headers: tuple[str, ...] = ()
    expose_headers: tuple[str, ...] = ()
    allow_credentials: bool = False
    max_age: Duration = 600.0


def _template_params(template: str) -> list[str]:
    return [m.group(1) for m in PARAM_REGEX.finditer(template)]


class BackendSettings(Model):
    upstream: str
    path: str
    key: str | None = None
    required: bool = False
    timeout: Duration | None = None
    fields: tuple[str, ...] | None = None
    rename: dict[str, str] = Field(default_factory=dict)

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("a backend path must start with /")
        return value


class AggregateSettings(Model):
    partial: Literal["allow", "fail"] = "allow"
    max_response_size: Size = 10 * MiB
    backends: tuple[BackendSettings, ...] = Field(min_length=1, max_length=32)

    @model_validator(mode="after")
    def _unique_keys(self) -> AggregateSettings:
        keys = [b.key for b in self.backends if b.key is not None]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ValueError(f"backend keys must be unique; repeated: {', '.join(dupes)}")
        return self


class RouteSettings(Model):
    name: str = Field(min_length=1)
    path: str
    methods: tuple[str, ...] | None = None
    host: str | None = None
    upstream: str | None = None
    rewrite: str | None = None
    preserve_host: bool = False
    timeout: Duration = 15.0
    retry_non_idempotent: bool = False
    forward_authorization: bool = True
    forward_api_key: bool = False  # auth: api_key removes the key header unless this is true
    rate_limit: RateLimitSettings | None = None
    auth: Literal["none", "api_key", "jwt"] = "none"
    cors: CorsSettings | None = None
    aggregate: AggregateSettings | None = None

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("a route path must start with /")
        from gateway.routing import template_is_valid

        template_is_valid(value)
        return value

    @field_validator("rewrite")
    @classmethod
    def _rewrite(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith("/"):
            raise ValueError("a rewrite must start with /")
        if "?" in value or "#" in value:
            raise ValueError(
                "a rewrite is a path only: the client's query string is forwarded as it is"
            )
        return value

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        upper = tuple(m.upper() for m in value)
        unknown = [m for m in upper if m not in HTTP_METHODS]
        if unknown:
            raise ValueError(f"unknown HTTP method(s): {', '.join(unknown)}")
        if not upper:
            raise ValueError("methods cannot be empty; omit it to allow every method")
        return upper

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("a route timeout must be positive")
        return value

    @model_validator(mode="after")
    def _shape(self) -> RouteSettings:
        if self.aggregate is None and self.upstream is None:
            raise ValueError("a route needs an upstream (or an aggregate)")
        if self.aggregate is not None and self.rewrite is not None:
            raise ValueError("rewrite does not apply to an aggregate route")
        params = set(_template_params(self.path))
        for template in [self.rewrite] + [
            b.path for b in (self.aggregate.backends if self.aggregate else ())
        ]:
            if template is None:
                continue
            missing = [p for p in _template_params(template) if p not in params]
            if missing:
                raise ValueError(
                    f"template {template!r} uses {', '.join(missing)}, "
                    f"which the path {self.path!r} does not define"
                )
        return self


class GatewaySettings(BaseSettings):
    """The whole file. Environment variables `GATEWAY_<SECTION>__<FIELD>` override it."""

    model_config = SettingsConfigDict(
        extra="forbid",
        frozen=True,
        env_prefix="GATEWAY_",
        env_nested_delimiter="__",
        nested_model_default_partial_update=True,
    )

    server: ServerSettings = ServerSettings()
    upstreams: dict[str, UpstreamSettings] = Field(default_factory=dict)
    routes: tuple[RouteSettings, ...] = ()
    rate_limit_store: Literal["memory"] | RedisStore = "memory"
    auth: AuthSettings | None = None
    cors: CorsSettings | None = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment wins over the file, as operators expect of GATEWAY_SERVER__PORT.
        return env_settings, init_settings
