"""The demo upstreams of `examples/demo.py`, on their own: the `upstreams` service of
deploy/docker-compose.yml.

`python -m examples.demo` starts them on 127.0.0.1 inside the gateway's own process.
In compose they are a separate container that the gateway reaches by its service
name, so they listen on every interface here. SIGTERM or SIGINT stops them (exit 0).

    python deploy/demo_upstreams.py --host 0.0.0.0 --ports 9001,9002,9003,9004
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import uvicorn

# examples/demo.py: mounted beside this file in the container (compose), or found in the
# checkout's examples/ when run from a clone.
_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE), str(_HERE.parent / "examples")]

from demo import build_demo_app  # noqa: E402


class _Server(uvicorn.Server):
    """Several servers share one loop: signals are handled once, below, not by each."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve(host: str, ports: list[int]) -> None:
    servers = [
        _Server(
            uvicorn.Config(
                build_demo_app(port),
                host=host,
                port=port,
                log_level="warning",
                access_log=False,
                lifespan="off",
            )
        )
        for port in ports
    ]

    def stop() -> None:
        for server in servers:
            server.should_exit = True

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    tasks = [asyncio.create_task(server.serve()) for server in servers]
    while not all(server.started for server in servers):
        if any(task.done() for task in tasks):  # a port in use: uvicorn logged why
            stop()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise SystemExit(f"demo upstreams could not start on {host} ports {ports}")
        await asyncio.sleep(0.05)
    print(
        json.dumps({"message": "demo upstreams started", "host": host, "ports": ports}), flush=True
    )
    await asyncio.gather(*tasks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve examples/demo.py's upstreams alone.")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--ports", default="9001,9002,9003,9004")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.host, [int(p) for p in args.ports.split(",")]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
