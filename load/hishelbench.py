"""What hishel's RFC 9111 rules would cost on the cache's hit path, against the
gateway's own (`gateway/dataplane/cacherules.py`): one hit decision each, the
request's headers converted to hishel's types as the gateway would have to on every
request. Issue 22 asked to consider hishel and measure it; docs/cache.md has the
figures ("Why not a library").

hishel is not a dependency of the gateway: run this in a throwaway virtualenv,

    python3 -m venv /tmp/hv && /tmp/hv/bin/pip install hishel httpx orjson prometheus-client
    PYTHONPATH=. /tmp/hv/bin/python load/hishelbench.py
"""

from __future__ import annotations

import time
import timeit
import uuid
from email.utils import formatdate

from hishel import Entry, Headers, IdleClient, Request, Response

from gateway.dataplane.cache import Entry as StoredAnswer
from gateway.dataplane.cacherules import freshness, request_directives

RUNS = 20_000


def main() -> None:
    now = time.time()
    request_head = [
        (b"host", b"api.example"),
        (b"user-agent", b"wrk"),
        (b"accept", b"*/*"),
        (b"x-request-id", b"abc"),
    ]
    answer_head = [
        (b"date", formatdate(now, usegmt=True).encode()),
        (b"cache-control", b"max-age=60"),
        (b"content-type", b"application/json"),
        (b"etag", b'"v1"'),
        (b"content-length", b"20"),
    ]

    def converted(raw: list[tuple[bytes, bytes]]) -> Headers:
        return Headers({n.decode("latin-1"): v.decode("latin-1") for n, v in raw})

    url = "http://api.example/item"
    entry = Entry(
        id=uuid.uuid4(),
        request=Request("GET", url, converted(request_head)),
        response=Response(200, converted(answer_head)),
    )
    idle = IdleClient(options={})

    def hishel_hit() -> object:
        return idle.next(Request("GET", url, converted(request_head)), [entry])

    stored = StoredAnswer(
        ("route", "/item", (), ()), 200, answer_head, b"x" * 20, freshness(200, answer_head, 0), now
    )

    def gateway_hit() -> object:
        any(n == b"authorization" for n, _ in request_head)
        directives = request_directives(request_head)
        at = time.time()
        return directives is None and stored.usable(at) and int(stored.ttl(at))

    assert type(hishel_hit()).__name__ == "FromCache"
    assert gateway_hit()
    for name, hit in (("hishel IdleClient.next", hishel_hit), ("gateway cacherules", gateway_hit)):
        best = min(timeit.repeat(hit, number=RUNS, repeat=5)) / RUNS * 1e6
        print(f"{name}: {best:.2f} us per hit decision")


if __name__ == "__main__":
    main()
