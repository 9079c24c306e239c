"""Reload and watch, shared by the single process and the supervisor: the config
file's fingerprint, the watch loop that notices a change, and the `--port` override
applied to every settings load."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable

from gateway.config.models import GatewaySettings

__all__ = ["WATCH_EVERY", "fingerprint", "watch", "with_port"]

log = logging.getLogger("gateway.server")

WATCH_EVERY = 1.0  # seconds between two looks at the config file


def fingerprint(path: str) -> tuple[int, int, int] | None:
    """What changes when the file does (following symlinks, so a Kubernetes
    ConfigMap's atomic symlink swap counts); None when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_ino, st.st_size)


async def watch(path: str, reload: Callable[[], Awaitable[object]]) -> None:
    """Call `reload` whenever the file at `path` changes; runs until cancelled."""
    last = fingerprint(path)
    while True:
        await asyncio.sleep(WATCH_EVERY)
        current = fingerprint(path)
        if current is not None and current != last:
            last = current
            log.info("config file changed; reloading", extra={"path": path})
            await reload()


def with_port(settings: GatewaySettings, port: int | None) -> GatewaySettings:
    """`settings` with the data port `--port` asked for, if it asked."""
    if port is None:
        return settings
    server = settings.server.model_copy(update={"port": port})
    return settings.model_copy(update={"server": server})
