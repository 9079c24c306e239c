"""The admin listener (a separate port, never the data port): health, readiness,
metrics, the running config (secrets redacted), reload, and the status page
(`/status`, `/status.json`; see `page.py`).

Off the hot path, so it is an ordinary Starlette app. When `admin_token_env` names a
set environment variable, every path but /healthz, /readyz and /metrics requires
`Authorization: Bearer <token>`.
"""

from __future__ import annotations

import hmac
import os
import re
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.config.models import GatewaySettings
from gateway.dataplane.state import GatewayState
from gateway.ops.metrics import CONTENT_TYPE_LATEST, render
from gateway.ops.page import StatusPage, local_status

__all__ = ["build_admin_app", "redact"]

Reload = Callable[[], Awaitable[list[str]]]
StatusDocument = Callable[[], dict[str, Any]]
REDACTED = "***"
_OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_SECRET_KEY = re.compile(r"(secret|password|passwd|token|api_?key|^keys$)", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"^([a-z][a-z0-9+.-]*://[^:/@]*):[^@/]*@", re.IGNORECASE)


def redact(value: Any, key: str = "") -> Any:
    """The config as JSON with secrets replaced: listed API keys, secrets and
    passwords, and the password part of any URL. Names of environment variables
    (`*_env`) are kept: they say where a secret is, not what it is."""
    if isinstance(value, dict):
        return {k: redact(v, k) for k, v in value.items()}
    if isinstance(value, list | tuple):
        if key and _SECRET_KEY.search(key) and not key.endswith("_env"):
            return [REDACTED for _ in value]
        return [redact(v, key) for v in value]
    if isinstance(value, str):
        if key and _SECRET_KEY.search(key) and not key.endswith("_env"):
            return REDACTED
        return _URL_PASSWORD.sub(rf"\1:{REDACTED}@", value)
    return value


def build_admin_app(
    state: GatewayState[Any],
    reload: Reload | None = None,
    settings: Callable[[], GatewaySettings | None] | None = None,
    status: StatusDocument | None = None,
) -> Starlette:
    """`status` builds the `/status.json` document; by default this process's own
    (a supervisor passes one that merges its workers')."""
    page = StatusPage()

    def current() -> GatewaySettings | None:
        if settings is not None:
            return settings()
        return state.runtime.settings if state.runtime is not None else None

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        if state.runtime is None:
            return JSONResponse({"status": "starting"}, status_code=503)
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ready"})

    async def metrics(request: Request) -> Response:
        return Response(render(state.metrics), media_type=CONTENT_TYPE_LATEST)

    async def config(request: Request) -> Response:
        if (denied := _check_token(request, current())) is not None:
            return denied
        running = current()
        if running is None:
            return JSONResponse({"error": "no config loaded"}, status_code=503)
        return JSONResponse(redact(running.model_dump(mode="json")))

    async def do_reload(request: Request) -> Response:
        if (denied := _check_token(request, current())) is not None:
            return denied
        if reload is None:
            return JSONResponse({"status": "error", "errors": ["reload unavailable"]}, 503)
        errors = await reload()
        if errors:
            return JSONResponse({"status": "error", "errors": errors}, status_code=400)
        return JSONResponse({"status": "reloaded"})

    async def purge(request: Request) -> Response:
        if (denied := _check_token(request, current())) is not None:
            return denied
        try:
            spec = await request.json()
        except ValueError:
            spec = None
        problem = _purge_problem(spec)
        if problem is not None:
            return JSONResponse({"error": problem}, status_code=400)
        runtime = state.runtime
        cache = getattr(runtime, "cache", None) if runtime is not None else None
        if cache is None:
            return JSONResponse({"purged": 0})
        purged = await cache.apurge(spec.get("route"), spec.get("path"), spec.get("prefix"))
        return JSONResponse({"purged": purged})

    async def status_page(request: Request) -> Response:
        if (denied := _check_token(request, current())) is not None:
            return denied
        return Response(page.body, media_type="text/html; charset=utf-8", headers=page.headers)

    async def status_json(request: Request) -> Response:
        if (denied := _check_token(request, current())) is not None:
            return denied
        document = status() if status is not None else local_status(state)
        # Target URLs may carry credentials: the same redaction as /config.
        return JSONResponse(redact(document), headers={"Cache-Control": "no-store"})

    return Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET", "HEAD"]),
            Route("/readyz", readyz, methods=["GET", "HEAD"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/config", config, methods=["GET"]),
            Route("/reload", do_reload, methods=["POST"]),
            Route("/cache/purge", purge, methods=["POST"]),
            Route("/status", status_page, methods=["GET"]),
            Route("/status.json", status_json, methods=["GET"]),
        ]
    )


def _purge_problem(spec: Any) -> str | None:
    """Why a `/cache/purge` body is refused; None when it is one of the three forms:
    `{"route"}`, `{"route", "path"}` or `{"prefix"}`."""
    if not isinstance(spec, dict) or not spec:
        return 'expected {"route": NAME}, {"route": NAME, "path": TARGET} or {"prefix": PATH}'
    if any(not isinstance(v, str) or not v for v in spec.values()):
        return "route, path and prefix are non-empty strings"
    if set(spec) in ({"route"}, {"route", "path"}, {"prefix"}):
        return None
    return 'expected {"route": NAME}, {"route": NAME, "path": TARGET} or {"prefix": PATH}'


def _check_token(request: Request, settings: GatewaySettings | None) -> Response | None:
    if request.url.path in _OPEN_PATHS or settings is None:
        return None
    env = settings.server.admin_token_env
    if not env:
        return None
    # Fail closed: a token setting whose variable is unset or empty locks the paths
    # rather than leaving them open.
    token = os.environ.get(env, "")
    given = request.headers.get("authorization", "")
    if token and hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        return None
    return JSONResponse(
        {"error": "admin token required"},
        status_code=401,
        headers={"WWW-Authenticate": 'Bearer realm="gateway-admin"'},
    )
