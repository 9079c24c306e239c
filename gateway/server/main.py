"""`gateway run`: load and check the config, then serve it in this process
(`process.GatewayServer`) or under a supervisor of worker processes (`supervisor`)."""

from __future__ import annotations

import asyncio
import logging
import sys

from gateway.build.factory import unsupported
from gateway.config.loader import ConfigError, load_config
from gateway.ops.logs import configure_logging
from gateway.server.allocator import active as active_allocator
from gateway.server.listeners import event_loop_factory
from gateway.server.process import GatewayServer, raise_open_file_limit
from gateway.server.reload import with_port
from gateway.server.supervisor import Supervisor

__all__ = ["run"]

log = logging.getLogger("gateway.server")


def run(config_path: str, *, workers: int | None = None, port: int | None = None) -> int:
    """Load and check the config, then serve it in this process or under a supervisor
    of `workers` processes; returns the exit code."""
    try:
        settings = load_config(config_path)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    settings = with_port(settings, port)
    problems = unsupported(settings)
    if problems:
        for problem in problems:
            print(f"{config_path}: {problem}", file=sys.stderr)
        return 1
    configure_logging(settings.server.log_level)
    log.info("memory allocator", extra={"allocator": active_allocator()})
    raise_open_file_limit()  # workers inherit it
    count = workers or settings.server.workers
    if count > 1:
        with open(config_path, encoding="utf-8") as f:
            text = f.read()
        supervisor = Supervisor(settings, config_path, count, port)
        with asyncio.Runner(loop_factory=event_loop_factory) as runner:
            return runner.run(supervisor.run(text))
    gateway = GatewayServer(settings, config_path, port=port)
    with asyncio.Runner(loop_factory=event_loop_factory) as runner:
        return runner.run(gateway.serve())
