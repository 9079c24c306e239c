"""CORS, adapted from Starlette's `CORSMiddleware` to the request-filter phase.

The header computations follow Starlette's (precomputed once per route; the origin is
echoed instead of `*` when credentials are allowed; with `allow_headers: ["*"]` the
requested headers are mirrored), with two differences an API gateway wants:

- a preflight (OPTIONS with Origin and Access-Control-Request-Method) is always
  answered here, 204, and never reaches the upstream; when its origin, method or
  headers are not allowed it carries no `Access-Control-Allow-*` header at all (the
  browser then refuses the real request) rather than Starlette's 400;
- a disallowed origin never gets any `Access-Control-Allow-*` header on other answers
  either (Starlette adds `Allow-Credentials` and `Expose-Headers` to every answer).

Headers are added to every answer of the route, the gateway's own errors (401, 429...)
included, so that a browser can read why it was refused. `Vary: Origin` is on every
answer of the route: what it carries depends on the Origin.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from gateway.edge import EarlyResponse, EdgeContext, RequestFilter
from gateway.errors import MethodNotAllowed

__all__ = ["ALL_METHODS", "SAFELISTED_HEADERS", "CorsRules", "cors"]

log = logging.getLogger("gateway.cors")

ALL_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")
SAFELISTED_HEADERS = frozenset({"accept", "accept-language", "content-language", "content-type"})
_VARY = (b"vary", b"Origin")
_PREFLIGHT_VARY = (
    b"vary",
    b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
)


@dataclass(frozen=True, slots=True)
class CorsRules:
    """What the CORS filter reads: the route's (or the gateway's) CORS policy."""

    allow_origins: tuple[str, ...] = ()  # origins allowed, or "*"; default none
    allow_methods: tuple[str, ...] = ("GET",)  # methods a preflight allows, or "*"; default GET
    allow_headers: tuple[str, ...] = ()  # non-safelisted request headers, or "*"; default none
    expose_headers: tuple[str, ...] = ()  # response headers a browser may read; default none
    allow_credentials: bool = False  # cookies and auth allowed (origin echoed); default false
    max_age: float = 600.0  # seconds a browser caches a preflight answer; default 600


def cors(settings: CorsRules, route_methods: frozenset[str] | None = None) -> RequestFilter:
    """The route's CORS filter. `route_methods` are the methods the route itself serves
    (None: all): the router lets OPTIONS through for preflights, and a plain OPTIONS
    on a route that does not serve it is refused here with the route's 405."""
    allow_all_origins = "*" in settings.allow_origins
    origins = frozenset(o.rstrip("/").lower() for o in settings.allow_origins if o != "*")
    methods = ALL_METHODS if "*" in settings.allow_methods else settings.allow_methods
    method_set = frozenset(m.upper() for m in methods)
    allow_all_headers = "*" in settings.allow_headers
    allowed_headers = SAFELISTED_HEADERS | {h.lower() for h in settings.allow_headers}
    credentials = settings.allow_credentials
    # With credentials a browser refuses `*`: echo the origin instead.
    explicit_origin = not allow_all_origins or credentials

    simple: list[tuple[bytes, bytes]] = []
    if credentials:
        simple.append((b"access-control-allow-credentials", b"true"))
    if settings.expose_headers:
        simple.append(
            (b"access-control-expose-headers", ", ".join(settings.expose_headers).encode())
        )
    preflight: list[tuple[bytes, bytes]] = [
        (b"access-control-allow-methods", ", ".join(methods).encode()),
        (b"access-control-max-age", str(int(settings.max_age)).encode()),
    ]
    if not allow_all_headers:
        preflight.append(
            (b"access-control-allow-headers", ", ".join(sorted(allowed_headers)).encode())
        )
    if credentials:
        preflight.append((b"access-control-allow-credentials", b"true"))

    refuse_options: list[str] | None = None
    if route_methods is not None and "OPTIONS" not in route_methods:
        refuse_options = sorted(route_methods)
        if "GET" in refuse_options and "HEAD" not in refuse_options:
            refuse_options.append("HEAD")

    def allow_origin(origin: bytes) -> bytes | None:
        """The Access-Control-Allow-Origin value for this origin, or None if refused."""
        text = origin.decode("latin-1")
        if allow_all_origins and text != "null":
            return origin if explicit_origin else b"*"
        return origin if text.lower() in origins else None

    def answer_preflight(ctx: EdgeContext, origin: bytes, method: bytes) -> EarlyResponse:
        headers: list[tuple[bytes, bytes]] = [_PREFLIGHT_VARY]
        value = allow_origin(origin)
        requested = ctx.header(b"access-control-request-headers")
        names = [h.strip().lower() for h in (requested or b"").decode("latin-1").split(",")]
        names = [n for n in names if n]
        refused = []
        if value is None:
            refused.append("origin")
        if method.decode("latin-1") not in method_set:
            refused.append("method")
        if not allow_all_headers and any(n not in allowed_headers for n in names):
            refused.append("headers")
        if refused:
            log.debug(
                "CORS preflight refused (%s) for origin %r",
                ", ".join(refused),
                origin.decode("latin-1")[:200],
                extra={"route": ctx.route},
            )
            return EarlyResponse(204, headers)
        assert value is not None
        headers.append((b"access-control-allow-origin", value))
        headers.extend(preflight)
        if allow_all_headers and requested:
            headers.append((b"access-control-allow-headers", requested))
        return EarlyResponse(204, headers)

    async def check(ctx: EdgeContext) -> EarlyResponse | None:
        origin = ctx.header(b"origin")
        if origin is not None and ctx.method == "OPTIONS":
            method = ctx.header(b"access-control-request-method")
            if method is not None:
                return answer_preflight(ctx, origin, method)
        if refuse_options is not None and ctx.method == "OPTIONS":
            raise MethodNotAllowed(refuse_options)
        ctx.response_headers.append(_VARY)
        if origin is None:
            return None
        value = allow_origin(origin)
        if value is not None:
            ctx.response_headers.append((b"access-control-allow-origin", value))
            ctx.response_headers.extend(simple)
        return None

    return check
