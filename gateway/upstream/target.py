"""One upstream address and its live state, kept on the target itself (as Caddy keeps
it on its hosts): balancers, health checks and the pool read and write it here."""

from __future__ import annotations

import httpx

__all__ = ["Target"]


class Target:
    """One upstream address with its live state."""

    __slots__ = ("base", "healthy", "host", "inflight", "url", "weight")

    def __init__(self, url: str, weight: int = 1) -> None:
        self.url = url
        self.base = url.rstrip("/")
        self.host = httpx.URL(url).netloc.decode("ascii")
        self.weight = weight
        self.inflight = 0
        self.healthy = True

    def __repr__(self) -> str:
        state = "healthy" if self.healthy else "UNHEALTHY"
        return f"Target({self.url} w={self.weight} inflight={self.inflight} {state})"
