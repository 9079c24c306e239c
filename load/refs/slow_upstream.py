"""The slow upstream of the cache-stampede scenario: counts requests, answers late.

Every `GET <target>` is counted per target (path and query) and answered after
`--delay` seconds with a small JSON body and `Cache-Control: max-age=60`, so one
answer is cacheable. `GET /count?<target>` (not counted, not delayed) answers the
number of requests that target received; `GET /healthz` answers `ok`. asyncio
streams, HTTP/1.1 keep-alive, no dependencies.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import urllib.parse

COUNTS: collections.Counter[str] = collections.Counter()


def _answer(status: str, body: bytes, extra: str = "") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    )
    return head.encode() + body


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            _method, target, _version = lines[0].split(" ", 2)
            length = 0
            close = False
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip() or 0)
                elif name.strip().lower() == "connection" and "close" in value.lower():
                    close = True
            if length:
                await reader.readexactly(length)
            if target == "/healthz":
                writer.write(_answer("200 OK", b'"ok"'))
            elif target.startswith("/count?"):
                key = urllib.parse.unquote(target[len("/count?") :])
                writer.write(_answer("200 OK", json.dumps({"count": COUNTS[key]}).encode()))
            else:
                COUNTS[target] += 1
                await asyncio.sleep(delay)
                body = json.dumps({"target": target, "n": COUNTS[target]}).encode()
                writer.write(_answer("200 OK", body, "Cache-Control: max-age=60\r\n"))
            await writer.drain()
            if close:
                break
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.3)
    args = parser.parse_args()
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, args.delay), "127.0.0.1", args.port, backlog=4096
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
