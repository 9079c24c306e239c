"""The slow upstream of the cache-stampede and hedge scenarios: counts requests,
answers late.

Every `GET <target>` is counted per target (path and query) and answered after
`--delay` seconds with a small JSON body and `Cache-Control: max-age=60`, so one
answer is cacheable. With `--tail RATIO` only that share of answers, drawn at random
(seeded), is late and the others are answered at once: a slow tail (the hedge
scenario). `GET /count?<target>` (not counted, not delayed) answers the number of
requests that target received, `GET /total?<prefix>` the number of requests of every
target starting with the prefix; `GET /healthz` answers `ok`. `--port` may be given
several times: one listener each, one count for all. asyncio streams, HTTP/1.1
keep-alive, no dependencies.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import urllib.parse

COUNTS: collections.Counter[str] = collections.Counter()
RNG = random.Random(23)


def _answer(status: str, body: bytes, extra: str = "") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    )
    return head.encode() + body


async def handle(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float, tail: float = 1.0
) -> None:
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
            elif target.startswith("/total?"):
                prefix = urllib.parse.unquote(target[len("/total?") :])
                total = sum(n for t, n in COUNTS.items() if t.startswith(prefix))
                writer.write(_answer("200 OK", json.dumps({"count": total}).encode()))
            else:
                COUNTS[target] += 1
                if tail >= 1.0 or RNG.random() < tail:
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
    parser.add_argument("--port", type=int, action="append", required=True)
    parser.add_argument("--delay", type=float, default=0.3)
    parser.add_argument("--tail", type=float, default=1.0, help="share of answers delayed")
    args = parser.parse_args()
    servers = [
        await asyncio.start_server(
            lambda r, w: handle(r, w, args.delay, args.tail), "127.0.0.1", port, backlog=4096
        )
        for port in args.port
    ]
    await asyncio.gather(*(server.serve_forever() for server in servers))


if __name__ == "__main__":
    asyncio.run(main())
