"""Processes, listeners and protocols: what turns sockets into ASGI requests for the
data plane, and a config file into a running (or supervised) gateway."""

from __future__ import annotations

__all__ = ["run"]


def run(config_path: str, *, workers: int | None = None, port: int | None = None) -> int:
    """Serve `config_path` until told to stop (`gateway run`); see `main.run`."""
    from gateway.server.main import run as serve

    return serve(config_path, workers=workers, port=port)
