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
from starlette.routing import PARAM_REGEX, compile_path

from gateway.config.units import Duration, Rate, Size
from gateway.types import IPNetwork

__all__ = [
    "AggregateSettings",
    "ApiKeySettings",
    "AuthSettings",
    "BackendSettings",
    "BreakerSettings",
    "CacheSettings",
    "CompressionSettings",
    "CorsSettings",
    "GatewaySettings",
    "HealthCheckSettings",
    "Http2Settings",
    "JwtSettings",
    "RateLimitSettings",
    "RedisStore",
    "RetrySettings",
    "RouteCacheSettings",
    "RouteSettings",
    "ServerSettings",
    "TargetSettings",
    "TracingSettings",
    "UpstreamSettings",
]

KiB = 1024
MiB = 1024 * 1024
HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"}
)


class Model(BaseModel):
    """Base of every block: unknown keys are errors and settings are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class CertificateSettings(Model):
    """One entry of `server.tls.certificates`: a PEM certificate chain and its key."""

    cert: str  # PEM certificate (chain) file, relative to the working directory; required
    key: str  # PEM private key file of that certificate; required


class TlsSettings(Model):
    """The `server.tls:` block: the data listener speaks TLS only (unset: cleartext)."""

    # chosen by SNI against each certificate's SAN DNS names; the first is the default
    certificates: tuple[CertificateSettings, ...] = Field(min_length=1)
    sni_strict: bool = False  # refuse a handshake whose SNI matches none (or is absent)
    min_version: Literal["1.2", "1.3"] = "1.2"  # the oldest TLS version accepted; default 1.2
    # client certificates (mTLS): none, optional (verified when sent) or require
    client_auth: Literal["none", "optional", "require"] = "none"
    client_ca: str | None = None  # PEM CA file client certificates must chain to; default unset

    @field_validator("min_version", mode="before")
    @classmethod
    def _version(cls, value: Any) -> Any:
        # `min_version: 1.2` unquoted is a YAML float.
        return f"{value:.1f}" if isinstance(value, float) else value

    @model_validator(mode="after")
    def _client_ca(self) -> TlsSettings:
        if self.client_auth != "none" and self.client_ca is None:
            raise ValueError(f"client_auth: {self.client_auth} needs client_ca")
        return self


class Http2Settings(Model):
    """The `server.http2:` block: HTTP/2 on the data listener (h2 by ALPN under TLS, h2c
    by prior knowledge on cleartext)."""

    enabled: bool = True  # serve HTTP/2 beside HTTP/1.1 on the same port; default true
    # streams one connection may have open; sent as SETTINGS_MAX_CONCURRENT_STREAMS and
    # enforced with RST_STREAM(REFUSED_STREAM); default 128
    max_concurrent_streams: int = Field(128, ge=1, le=2**31 - 1)
    # bytes a stream may receive before a WINDOW_UPDATE; sent as
    # SETTINGS_INITIAL_WINDOW_SIZE (at most 2^31-1); default 1MiB
    initial_window_size: Size = 1 * MiB

    @field_validator("initial_window_size")
    @classmethod
    def _window(cls, value: int) -> int:
        if not 0 < value <= 2**31 - 1:
            raise ValueError("must be between 1 byte and 2^31-1 bytes")
        return value


class ServerSettings(Model):
    """The `server:` block: listeners, client limits, drain and logging."""

    host: str = "0.0.0.0"  # data-plane listen address; default 0.0.0.0
    port: int = Field(8080, ge=0, le=65535)  # data-plane TCP port (0-65535); default 8080
    # worker processes sharing the data port (1-64; --workers overrides); default 1
    workers: int = Field(1, ge=1, le=64)
    admin_host: str = "127.0.0.1"  # admin listener address; default 127.0.0.1
    admin_port: int = Field(9901, ge=0, le=65535)  # admin listener TCP port (0-65535); default 9901
    max_body_size: Size = 10 * MiB  # bytes a request body may have; more: 413; default 10MiB
    # seconds in-flight requests get to finish after SIGTERM/SIGINT; default 30s
    drain_timeout: Duration = 30.0
    # CIDRs whose X-Forwarded-For is believed; default [127.0.0.1/32]
    trusted_proxies: tuple[IPNetwork, ...] = (ipaddress.IPv4Network("127.0.0.1/32"),)
    access_log: bool = True  # one JSON line per request on stdout; default true
    # level of the JSON application logs on stderr; default info
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    watch: bool = False  # reload when the config file changes (polled every second); default false
    # variable holding the admin bearer token; default unset (admin paths open)
    admin_token_env: str | None = None
    # What one client connection may send or hold (docs/limits.md). Per worker process,
    # read at start: a reload does not change them.
    max_request_line: Size = 8 * KiB  # bytes of the request target; longer: 414; default 8KiB
    # bytes of all header field lines together; more: 431; default 32KiB
    max_header_size: Size = 32 * KiB
    # header fields in one request; more: 431; default 100
    max_header_count: int = Field(100, ge=1, le=10_000)
    # seconds from connect (or first byte) to the end of the head; default 10s
    header_timeout: Duration = 10.0
    # seconds of the longest pause between request body chunks; more: 408; default 10s
    body_timeout: Duration = 10.0
    keepalive_timeout: Duration = 5.0  # seconds idle between requests on one connection; default 5s
    # open client connections per worker; beyond it: 503; default 10000
    max_client_connections: int = Field(10_000, ge=1)
    # memory allocator; auto: jemalloc where installed (returns memory after bursts); default auto
    allocator: Literal["auto", "jemalloc", "python"] = "auto"
    tls: TlsSettings | None = None  # TLS termination on the data listener; default unset
    http2: Http2Settings = Http2Settings()  # HTTP/2 beside HTTP/1.1; default enabled

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
    """One entry of `upstreams.<name>.targets`: a URL, or `{url, weight}`."""

    url: str  # the target's base URL, http(s)://host:port with no path; required
    weight: int = Field(1, ge=1, le=1000)  # relative weight among the targets (1-1000); default 1

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/?#\s]+$", value.rstrip("/")):
            raise ValueError(
                f"invalid target URL {value!r}: expected http(s)://host:port with no path"
            )
        return value.rstrip("/")


class RetrySettings(Model):
    """The `upstreams.<name>.retries:` block: when a failed try is tried again."""

    # tries after the first (0-10); 0 turns retries off; default 1
    attempts: int = Field(1, ge=0, le=10)
    # seconds before the first retry, doubled each retry, with jitter; default 25ms
    backoff: Duration = 0.025
    # outcomes (connect_error, timeout), 5xx statuses, and the gRPC statuses of a
    # trailers-only answer (unavailable, resource-exhausted, deadline-exceeded,
    # internal; retried whatever the method) worth a retry; default [connect_error]
    on: tuple[
        Literal[
            "connect_error",
            "timeout",
            "unavailable",
            "resource-exhausted",
            "deadline-exceeded",
            "internal",
        ]
        | Annotated[int, Field(ge=500, le=599)],
        ...,
    ] = ("connect_error",)
    # retries at most this share of recent requests (0-1, or 0%-100%); default 20%
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
    """The `upstreams.<name>.circuit_breaker:` block: when a circuit opens and closes."""

    # failed share of the window's tries that opens the circuit (0-1]; default 0.5
    failure_ratio: float = Field(0.5, gt=0, le=1)
    # tries in the window before the failure ratio counts; default 20
    min_requests: int = Field(20, ge=1)
    window: Duration = 10.0  # seconds of history the failure ratio is taken over; default 10s
    open_for: Duration = 5.0  # seconds the circuit stays open before half-open trials; default 5s
    # trial requests let through at a time while half-open; default 1
    half_open_requests: int = Field(1, ge=1)


class HealthCheckSettings(Model):
    """The `upstreams.<name>.health_check:` block: active probes of each target."""

    # path probed with GET on each target; a 2xx is healthy; default /healthz
    path: str = "/healthz"
    interval: Duration = 5.0  # seconds between the end of one probe and the next; default 5s
    timeout: Duration = 1.0  # seconds a probe has to answer completely, else it failed; default 1s
    # consecutive successes that bring a target back; default 2
    healthy_threshold: int = Field(2, ge=1)
    # consecutive failures that take a target out; default 3
    unhealthy_threshold: int = Field(3, ge=1)
    # probe grpc.health.v1.Health/Check instead of GET path (needs protocol: http2);
    # SERVING is healthy; default false
    grpc: bool = False
    service: str = ""  # the service name asked about with grpc: true; default "" (the server)


class UpstreamTlsSettings(Model):
    """The `upstreams.<name>.tls:` block: how `https://` targets are verified and met."""

    verify: bool = True  # verify the target's certificate; false only when asked; default true
    ca_file: str | None = None  # PEM CAs to verify against; default the system trust store
    # the name sent as SNI and verified; default the target's host (no SNI for an IP)
    server_name: str | None = None
    cert: str | None = None  # PEM client certificate for upstream mTLS; default none
    key: str | None = None  # its private key; required with cert

    @model_validator(mode="after")
    def _pair(self) -> UpstreamTlsSettings:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key go together")
        return self


class UpstreamSettings(Model):
    """One `upstreams.<name>:` block: targets, pool, queue, timeouts and resilience."""

    # URLs, or {url, weight}; at least one; required
    targets: tuple[TargetSettings, ...] = Field(min_length=1)
    # how a target is picked: round_robin | least_inflight | random; default round_robin
    balancer: Literal["round_robin", "least_inflight", "random"] = "round_robin"
    max_connections: int = Field(256, ge=1)  # connections per target, open or opening; default 256
    # idle connections kept per target; 0 disables keep-alive; default 64
    max_keepalive: int = Field(64, ge=0)
    keepalive_expiry: Duration = 4.0  # seconds an idle connection is kept for reuse; default 4s
    # requests in flight to this upstream at once (the bulkhead); default 1024
    max_concurrency: int = Field(1024, ge=1)
    # requests that may wait for a slot; queue full: 503; default 1024
    max_queue: int = Field(1024, ge=0)
    queue_timeout: Duration = 1.0  # seconds a request may wait in that queue, then 503; default 1s
    connect_timeout: Duration = 2.0  # seconds to establish a connection to a target; default 2s
    read_timeout: Duration = 30.0  # seconds between two reads of an upstream answer; default 30s
    # when a failed try is tried again; default attempts 1, on [connect_error], budget 20%
    retries: RetrySettings = RetrySettings()
    circuit_breaker: BreakerSettings | None = None  # the circuit breaker; default none (no breaker)
    # active probes of each target; default none (no probes)
    health_check: HealthCheckSettings | None = None
    # TLS to https:// targets; default: verified against the system trust store
    tls: UpstreamTlsSettings | None = None
    # http1, or http2 (h2 by ALPN over https, h2c prior knowledge over http, one
    # connection multiplexing many requests); default http1
    protocol: Literal["http1", "http2"] = "http1"

    @field_validator("targets", mode="before")
    @classmethod
    def _targets(cls, value: Any) -> Any:
        if isinstance(value, list | tuple):
            return tuple({"url": v} if isinstance(v, str) else v for v in value)
        return value

    @model_validator(mode="after")
    def _grpc_health(self) -> UpstreamSettings:
        if self.health_check is not None and self.health_check.grpc and self.protocol != "http2":
            raise ValueError("health_check.grpc: true needs protocol: http2 (gRPC is HTTP/2)")
        return self


class RateLimitSettings(Model):
    """The `routes[].rate_limit:` block: a token bucket per key."""

    rate: Rate  # token refill rate, per second (YAML 100/s, 6000/m, 50000/h); required
    burst: int = Field(ge=1)  # bucket size in requests: the most allowed at once; required
    key: str = "client_ip"  # one bucket per client_ip | header:NAME | route; default client_ip
    # Redis unreachable: false lets requests through, true answers 503; default false
    fail_closed: bool = False

    @field_validator("key")
    @classmethod
    def _key(cls, value: str) -> str:
        if value in ("client_ip", "route") or re.match(r"^header:[A-Za-z0-9-]+$", value):
            return value
        raise ValueError("key must be client_ip, route or header:NAME")


class RedisStore(Model):
    """The `rate_limit_store: {redis: URL}` form: buckets shared by every replica."""

    redis: str  # redis://, rediss:// or unix:// URL of the shared store; required
    # prefix of every bucket key (one Redis, several gateways); default gateway:rl:
    prefix: str = "gateway:rl:"
    # seconds for connect, pool wait and reply, each; a dead Redis never stalls; default 200ms
    timeout: Duration = 0.2

    @field_validator("redis")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("expected a redis:// URL")
        return value


class ApiKeySettings(Model):
    """The `auth.api_keys:` block: the key header and where the keys come from."""

    header: str = "X-API-Key"  # request header carrying the key; default X-API-Key
    keys: tuple[str, ...] = ()  # keys listed in the config; default none
    keys_env: str | None = None  # variable holding more keys, comma-separated; default none

    @field_validator("header")
    @classmethod
    def _header(cls, value: str) -> str:
        if not re.match(r"^[A-Za-z0-9-]+$", value):
            raise ValueError("header must be a header name such as X-API-Key")
        return value


class JwtSettings(Model):
    """The `auth.jwt:` block: which tokens are accepted and which claims go upstream."""

    issuer: str | None = None  # the required `iss` claim; default none (not checked)
    audience: str | None = None  # the required `aud` claim; default none (not checked)
    # accepted `alg` values: RS256, ES256, HS256; default [RS256]
    algorithms: tuple[Literal["RS256", "ES256", "HS256"], ...] = Field(("RS256",), min_length=1)
    jwks_file: str | None = None  # path of a JWKS file (RS256/ES256 keys); default none
    jwks_url: str | None = None  # http(s) URL of a JWKS, exclusive with jwks_file; default none
    # variable holding the HS256 secret (at least 32 bytes); default none
    secret_env: str | None = None
    leeway: Duration = 30.0  # seconds of clock skew allowed on exp, nbf and iat; default 30s
    # seconds between JWKS re-reads; an unknown kid also triggers one; default 5m
    jwks_refresh: Duration = 300.0
    # verified claim -> upstream header, e.g. {sub: X-User-Id}; default none
    claims_to_headers: dict[str, str] = Field(default_factory=dict)

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
    """The `auth:` block: API keys and JWT, for the routes that ask for them."""

    # API-key auth for routes with auth: api_key; default none
    api_keys: ApiKeySettings | None = None
    jwt: JwtSettings | None = None  # JWT auth for routes with auth: jwt; default none


class CorsSettings(Model):
    """A `cors:` block, global or per route (`routes[].cors`)."""

    allow_origins: tuple[str, ...] = ()  # origins allowed, or *; default none
    allow_methods: tuple[str, ...] = ("GET",)  # methods a preflight allows, or *; default [GET]
    # non-safelisted request headers allowed, or * (mirrors the request); default none
    allow_headers: tuple[str, ...] = ()
    expose_headers: tuple[str, ...] = ()  # response headers a browser may read; default none
    # cookies and auth allowed (the origin is echoed); default false
    allow_credentials: bool = False
    max_age: Duration = 600.0  # seconds a browser caches a preflight answer; default 10m


def _template_is_valid(template: str) -> None:
    """Raise ValueError when Starlette cannot compile the template (unknown convertor...)."""
    try:
        compile_path(template)
    except (AssertionError, ValueError) as exc:
        raise ValueError(str(exc) or f"invalid path template {template!r}") from exc


def _template_params(template: str) -> list[str]:
    return [m.group(1) for m in PARAM_REGEX.finditer(template)]


class BackendSettings(Model):
    """One entry of `routes[].aggregate.backends`: a backend call and its merge."""

    upstream: str  # name of the upstream called; required
    path: str  # path template over the route's parameters, may carry a query; required
    # nest the backend's JSON under this key; default none (merge its fields)
    key: str | None = None
    required: bool = False  # a failure of this backend fails the whole request; default false
    # seconds this backend may take, within the route deadline; default none (the deadline)
    timeout: Duration | None = None
    fields: tuple[str, ...] | None = None  # top-level fields kept; default none (all kept)
    # top-level fields renamed {old: new}, after fields; default none
    rename: dict[str, str] = Field(default_factory=dict)

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("a backend path must start with /")
        return value


class AggregateSettings(Model):
    """The `routes[].aggregate:` block: backends fanned out to and merged."""

    # allow: 200 without failed non-required backends; fail: any failure fails; default allow
    partial: Literal["allow", "fail"] = "allow"
    # bytes of each backend's body; more fails that backend; default 10MiB
    max_response_size: Size = 10 * MiB
    # backends called concurrently (1-32); required
    backends: tuple[BackendSettings, ...] = Field(min_length=1, max_length=32)

    @model_validator(mode="after")
    def _unique_keys(self) -> AggregateSettings:
        keys = [b.key for b in self.backends if b.key is not None]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ValueError(f"backend keys must be unique; repeated: {', '.join(dupes)}")
        return self


class RouteCacheSettings(Model):
    """A route's `cache:` block: its answers are cached (docs/cache.md)."""

    # seconds answers without explicit freshness stay fresh; 0: only explicitly fresh
    # answers (max-age, s-maxage, Expires) are stored; default 0s
    default_ttl: Duration = 0.0

    @field_validator("default_ttl")
    @classmethod
    def _ttl(cls, value: float) -> float:
        if value < 0:
            raise ValueError("default_ttl cannot be negative")
        return value


class CacheSettings(Model):
    """The `cache:` block: the store every caching route shares (docs/cache.md)."""

    # memory (per process) or {redis: URL} shared by replicas; default memory
    store: Literal["memory"] | RedisStore = "memory"
    max_size: Size = 256 * MiB  # bytes held, least recently used evicted; default 256MiB
    # answers with larger bodies are streamed through, never stored; default 1MiB
    max_object_size: Size = 1 * MiB

    @model_validator(mode="after")
    def _sizes(self) -> CacheSettings:
        if self.max_size <= 0 or self.max_object_size <= 0:
            raise ValueError("max_size and max_object_size must be positive")
        return self


# Headers a transform may never set, add or remove: the gateway's own (the contract).
PROTECTED_HEADERS = ("x-request-id", "x-request-timeout-ms")
PROTECTED_PREFIXES = ("x-forwarded-",)
TRANSFORM_VARIABLES = frozenset({"client_ip", "request_id", "route", "upstream"})
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_VARIABLE = re.compile(r"\{([^{}]*)\}")


def _transform_name(name: str) -> str:
    if not _HEADER_NAME.match(name):
        raise ValueError(f"{name!r} is not a valid header name")
    lower = name.lower()
    if lower in PROTECTED_HEADERS or lower.startswith(PROTECTED_PREFIXES):
        raise ValueError(
            f"{name} is the gateway's own header: a transform cannot change "
            "X-Forwarded-*, X-Request-ID or X-Request-Timeout-Ms"
        )
    return name


def _transform_value(name: str, value: str) -> str:
    if "\r" in value or "\n" in value or "\x00" in value:
        raise ValueError(f"the value of {name} holds a control character")
    unknown = [v for v in _VARIABLE.findall(value) if v not in TRANSFORM_VARIABLES]
    if unknown:
        known = ", ".join("{" + v + "}" for v in sorted(TRANSFORM_VARIABLES))
        raise ValueError(f"unknown variable {{{unknown[0]}}} in {name} (known: {known})")
    return value


class HeaderOps(Model):
    """One direction of `routes[].headers`: fields set, added and removed."""

    # fields replaced (or created) with these values; {client_ip} {request_id} {route}
    # {upstream} are filled in per request; default none
    set: dict[str, str] = Field(default_factory=dict)
    # fields appended (kept beside any already there), same variables; default none
    add: dict[str, str] = Field(default_factory=dict)
    remove: tuple[str, ...] = ()  # field names removed; default none

    @model_validator(mode="after")
    def _entries(self) -> HeaderOps:
        for name in (*self.set, *self.add, *self.remove):
            _transform_name(name)
        for name, value in (*self.set.items(), *self.add.items()):
            _transform_value(name, value)
        return self


class HeaderTransforms(Model):
    """The `routes[].headers:` block: transforms applied after the gateway's own headers."""

    request: HeaderOps | None = None  # applied to what goes upstream; default none
    response: HeaderOps | None = None  # applied to what goes to the client; default none


class HedgeSettings(Model):
    """The `routes[].hedge:` block: a second try when the first is slow."""

    # seconds without response headers before another try, or p95 / p99 of the
    # upstream's recent latency (no hedge with fewer than 20 recent answers); required
    after: Literal["p95", "p99"] | Duration
    max: int = Field(default=1, ge=1, le=3)  # hedges per request; default 1

    @field_validator("after")
    @classmethod
    def _after(cls, value: str | float) -> str | float:
        if isinstance(value, float | int) and value <= 0:
            raise ValueError("after must be positive, or p95 / p99")
        return value


class IdempotencySettings(Model):
    """The `idempotency:` block: where Idempotency-Key answers are kept (docs/policies.md)."""

    # memory (per process) or {redis: URL} shared by replicas; default memory
    store: Literal["memory"] | RedisStore = "memory"
    ttl: Duration = 24 * 3600.0  # seconds a stored answer is replayed; default 24h
    # larger answers are passed through and not stored; default 1MiB
    max_response_size: Size = 1 * MiB
    # bytes the memory store holds, oldest answers dropped first; default 64MiB
    max_size: Size = 64 * MiB

    @model_validator(mode="after")
    def _positive(self) -> IdempotencySettings:
        if self.ttl <= 0 or self.max_response_size <= 0 or self.max_size <= 0:
            raise ValueError("ttl, max_response_size and max_size must be positive")
        if self.max_size < self.max_response_size:
            raise ValueError("max_size must be at least max_response_size")
        return self


class RouteSettings(Model):
    """One `routes[]` entry: what it matches and where it sends the request."""

    name: str = Field(min_length=1)  # unique route name (metrics, logs, errors); required
    path: str  # Starlette-style path template, e.g. /users/{id}; required
    # HTTP methods allowed (HEAD wherever GET); default none (any)
    methods: tuple[str, ...] | None = None
    # Host matched, exact or *.example.com, port ignored; default none (any)
    host: str | None = None
    upstream: str | None = None  # name of the upstream proxied to; required unless aggregate
    # path template sent upstream instead of the path; default none (unchanged)
    rewrite: str | None = None
    # send the client's Host upstream instead of the target's; default false
    preserve_host: bool = False
    # seconds of the route deadline: queueing, every try and backend; default 15s
    timeout: Duration = 15.0
    retry_non_idempotent: bool = False  # retry POST/PATCH too (opt-in); default false
    # aggregate routes: send Authorization to every backend; default true
    forward_authorization: bool = True
    # send the API key header upstream (auth: api_key removes it); default false
    forward_api_key: bool = False
    # token-bucket rate limit of this route; default none (unlimited)
    rate_limit: RateLimitSettings | None = None
    # authentication required: none | api_key | jwt; default none
    auth: Literal["none", "api_key", "jwt"] = "none"
    # this route's CORS policy, replacing the global one; default none (the global)
    cors: CorsSettings | None = None
    # fan out to backends instead of proxying to upstream; default none
    aggregate: AggregateSettings | None = None
    # false: this route's answers are never compressed (the global `compression`); default true
    compression: bool = True
    # translate gRPC-Web calls (browsers) to gRPC for a protocol: http2 upstream; default false
    grpc_web: bool = False
    # cache this route's GET/HEAD answers (the global `cache` store); default none (off)
    cache: RouteCacheSettings | None = None
    # upstream tried once when this route's upstream cannot answer; default none
    fallback: str | None = None
    # a second try to another target when the first is slow; default none (no hedging)
    hedge: HedgeSettings | None = None
    # Idempotency-Key handling: optional | required (POST and PATCH); default none (off)
    idempotency: Literal["optional", "required"] | None = None
    # request and response header transforms; default none
    headers: HeaderTransforms | None = None

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("a route path must start with /")
        _template_is_valid(value)
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
        if self.aggregate is not None and (self.fallback or self.hedge):
            raise ValueError("fallback and hedge apply to proxied routes, not aggregates")
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


class CompressionSettings(Model):
    """The `compression:` block: answers compressed for clients that accept it
    (docs/compression.md). Unset: off, at no cost per request."""

    # codings offered, the gateway's preference among those a client accepts with
    # equal q: zstd | br | gzip; default [zstd, br, gzip]
    algorithms: tuple[Literal["zstd", "br", "gzip"], ...] = ("zstd", "br", "gzip")
    min_size: Size = 1 * KiB  # bodies known to be smaller are sent as they are; default 1KiB
    # media types compressed, exact or type/*; default text/*, application/json,
    # application/javascript, application/xml, application/problem+json, image/svg+xml
    types: tuple[str, ...] = (
        "text/*",
        "application/json",
        "application/javascript",
        "application/xml",
        "application/problem+json",
        "image/svg+xml",
    )

    @field_validator("algorithms")
    @classmethod
    def _algorithms(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("algorithms needs at least one of zstd, br, gzip")
        if len(set(value)) != len(value):
            raise ValueError("algorithms lists a coding twice")
        return value

    @field_validator("types")
    @classmethod
    def _types(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for media in value:
            if not re.match(r"^[A-Za-z0-9!#$&^_.+-]+/(\*|[A-Za-z0-9!#$&^_.+-]+)$", media):
                raise ValueError(f"{media!r} is not a media type (type/subtype or type/*)")
        return tuple(media.lower() for media in value)


class TracingSettings(Model):
    """The `tracing:` block: W3C trace context (and B3) through every hop, and
    OpenTelemetry spans exported over OTLP/HTTP (docs/tracing.md). Unset: off, at no
    cost per request. Read once per process start: a reload does not change it."""

    # OTLP HTTP/protobuf collector, http(s)://host:port[/path]; /v1/traces is appended; required
    endpoint: str
    # share (0-1, or 0%-100%) of requests without a parent that are sampled; default 0.01
    sample_ratio: float = 0.01
    # header formats, tracecontext | b3: the first present and valid gives the parent,
    # every one listed is written upstream; default [tracecontext]
    propagation: tuple[Literal["tracecontext", "b3"], ...] = ("tracecontext",)
    # the resource's service.name; default gateway
    service_name: str = Field("gateway", min_length=1)
    # seconds one export may take, retries included; then its spans are dropped; default 3s
    export_timeout: Duration = 3.0

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        if not re.match(r"^https?://[^/?#\s]+(/[^?#\s]*)?$", value):
            raise ValueError(f"invalid endpoint {value!r}: expected http(s)://host:port[/path]")
        return value

    @field_validator("sample_ratio", mode="before")
    @classmethod
    def _percent(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().endswith("%"):
            return float(value.strip()[:-1]) / 100
        return value

    @field_validator("sample_ratio")
    @classmethod
    def _ratio(cls, value: float) -> float:
        if not 0 <= value <= 1:
            raise ValueError("sample_ratio is a share of requests: between 0 and 1 (or 0%-100%)")
        return value

    @field_validator("propagation")
    @classmethod
    def _formats(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("propagation needs at least one format: tracecontext or b3")
        if len(set(value)) != len(value):
            raise ValueError("propagation lists a format twice")
        return value

    @field_validator("export_timeout")
    @classmethod
    def _timeout(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be greater than zero")
        return value


class GatewaySettings(BaseSettings):
    """The whole file. Environment variables `GATEWAY_<SECTION>__<FIELD>` override it."""

    model_config = SettingsConfigDict(
        extra="forbid",
        frozen=True,
        env_prefix="GATEWAY_",
        env_nested_delimiter="__",
        nested_model_default_partial_update=True,
    )

    server: ServerSettings = ServerSettings()  # the `server:` block; default every server default
    # upstreams by name; default none
    upstreams: dict[str, UpstreamSettings] = Field(default_factory=dict)
    routes: tuple[RouteSettings, ...] = ()  # routes, tried in file order; default none
    # memory (per process) or {redis: URL} shared by replicas; default memory
    rate_limit_store: Literal["memory"] | RedisStore = "memory"
    auth: AuthSettings | None = None  # credentials for api_key and jwt routes; default none
    cors: CorsSettings | None = None  # global CORS policy for every route; default none (no CORS)
    # OpenTelemetry tracing (W3C trace context, OTLP export); default none (off, no cost)
    tracing: TracingSettings | None = None
    # response compression (zstd, br, gzip) by Accept-Encoding; default none (off, no cost)
    compression: CompressionSettings | None = None
    # the response cache's store and sizes, for routes with `cache:`; default memory, 256MiB
    cache: CacheSettings | None = None
    # the Idempotency-Key store, for routes with `idempotency:`; default memory, 24h, 1MiB
    idempotency: IdempotencySettings | None = None

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
