"""The response cache through the real gateway process, against a real upstream whose
`Cache-Control`, `ETag`, `Vary` and the rest each test sets by query (`cc`, `etag`,
`vary`, `cookie`, `delay`, `size`, `stream`), and which counts the requests it sees per
path; `OVERRIDE` changes a path's query parameters from some point on (an upstream that
turns slow or failing). Each test uses paths of its own, so they share one gateway."""

from __future__ import annotations

import asyncio
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from tests.integration.harness import GatewayProcess, UpstreamServer, free_port

HITS: Counter[str] = Counter()  # upstream requests by path
CONDITIONAL: Counter[str] = Counter()  # of those, conditional ones answered 304
OVERRIDE: dict[str, dict[str, str]] = {}  # query parameters replaced, by path
FLAKY: list[UpstreamServer] = []  # the `flaky` route's upstream, which a test stops
_LOCK = threading.Lock()


async def origin(request: Request) -> Response:
    path = request.url.path
    with _LOCK:
        HITS[path] += 1
        n = HITS[path]
    q = {**request.query_params, **OVERRIDE.get(path, {})}
    if "delay" in q:
        await asyncio.sleep(float(q["delay"]))
    headers: dict[str, str] = {}
    if "cc" in q:
        headers["cache-control"] = q["cc"]
    if "vary" in q:
        headers["vary"] = q["vary"]
    if "cookie" in q:
        headers["set-cookie"] = "session=1"
    etag = q.get("etag")
    if etag:
        headers["etag"] = f'"{etag}"'
        if request.headers.get("if-none-match") == f'"{etag}"':
            with _LOCK:
                CONDITIONAL[path] += 1
            return Response(status_code=304, headers=headers)
    varied = request.headers.get(q.get("vary", "x-none"), "")
    body = f"n={n} varied={varied} ".encode() + b"x" * int(q.get("size", "0"))
    if "stream" in q:
        gap = float(q.get("gap", "0"))
        if "length" in q:
            headers["content-length"] = str(len(body))

        async def pieces() -> AsyncIterator[bytes]:
            yield body[: len(body) // 2]
            await asyncio.sleep(gap)
            yield body[len(body) // 2 :]

        return StreamingResponse(pieces(), headers=headers, media_type="text/plain")
    status = int(q.get("status", "200"))
    return Response(body, status_code=status, headers=headers, media_type="text/plain")


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    app = Starlette(routes=[Route("/{rest:path}", origin, methods=["GET", "HEAD", "POST"])])
    up = UpstreamServer(app).start()
    flaky = UpstreamServer(app).start()
    FLAKY.append(flaky)
    config = {
        "server": {"access_log": False},
        "upstreams": {
            "up": {"targets": [up.url], "retries": {"attempts": 0}},
            "failing": {"targets": [up.url], "retries": {"attempts": 0}},
            "flaky": {"targets": [flaky.url], "retries": {"attempts": 0}},
            "dead": {"targets": [f"http://127.0.0.1:{free_port()}"], "retries": {"attempts": 0}},
        },
        "cache": {"max_object_size": "64KiB"},
        "compression": {},
        "routes": [
            {"name": "cached", "path": "/c/{rest:path}", "upstream": "up", "cache": {}},
            {
                "name": "ttl",
                "path": "/t/{rest:path}",
                "upstream": "up",
                "cache": {"default_ttl": "60s"},
            },
            {"name": "plain", "path": "/p/{rest:path}", "upstream": "up"},
            {
                "name": "stale",
                "path": "/s/{rest:path}",
                "upstream": "failing",
                "timeout": "1s",
                "cache": {},
            },
            {"name": "flaky", "path": "/f/{rest:path}", "upstream": "flaky", "cache": {}},
            {
                "name": "standin",
                "path": "/fb/{rest:path}",
                "upstream": "dead",
                "fallback": "up",
                "cache": {},
            },
        ],
    }
    gateway = GatewayProcess(config, tmp_path_factory.mktemp("cache")).start()
    try:
        yield gateway
    finally:
        gateway.stop()
        up.stop()
        flaky.stop()
    assert "Traceback" not in gateway.stderr, gateway.stderr


@pytest.fixture
def client(gw: GatewayProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        yield c


def fresh(prefix: str = "/c") -> str:
    return f"{prefix}/{uuid.uuid4().hex}"


def hits(path: str) -> int:
    return HITS[path]


def test_miss_then_hit_with_age_and_cache_status(client: httpx.Client) -> None:
    path = fresh()
    first = client.get(path, params={"cc": "max-age=60"})
    assert first.headers["cache-status"] == "gateway; fwd=miss; stored"
    second = client.get(path, params={"cc": "max-age=60"})
    assert second.status_code == 200
    assert second.text == first.text
    assert hits(path) == 1
    assert re.fullmatch(r"gateway; hit; ttl=(58|59|60)", second.headers["cache-status"])
    assert second.headers["age"] in ("0", "1")
    assert second.headers["date"] == first.headers["date"]  # the hit keeps its own Date


def test_query_is_part_of_the_key(client: httpx.Client) -> None:
    path = fresh()
    client.get(path, params={"cc": "max-age=60", "a": "1"})
    client.get(path, params={"cc": "max-age=60", "a": "2"})
    assert hits(path) == 2


def test_not_stored_without_freshness_unless_default_ttl(client: httpx.Client) -> None:
    path = fresh()
    assert client.get(path).headers["cache-status"] == "gateway; fwd=miss"
    client.get(path)
    assert hits(path) == 2
    ttl_path = fresh("/t")
    client.get(ttl_path)
    assert client.get(ttl_path).headers["cache-status"].startswith("gateway; hit; ttl=")
    assert hits(ttl_path) == 1


@pytest.mark.parametrize(
    "params",
    [
        {"cc": "no-store"},
        {"cc": "private, max-age=60"},
        {"cc": "max-age=60", "cookie": "1"},
        {"cc": "max-age=60", "vary": "*"},
        {"cc": "max-age=60", "status": "500"},
    ],
)
def test_never_stored(client: httpx.Client, params: dict[str, str]) -> None:
    path = fresh()
    client.get(path, params=params)
    client.get(path, params=params)
    assert hits(path) == 2


def test_no_cache_is_revalidated_every_time(client: httpx.Client) -> None:
    path = fresh()
    params = {"cc": "no-cache", "etag": "v1"}
    client.get(path, params=params)
    second = client.get(path, params=params)
    assert second.status_code == 200
    assert second.headers["cache-status"] == "gateway; fwd=stale; fwd-status=304"
    assert CONDITIONAL[path] == 1


def test_authorization_needs_public(client: httpx.Client) -> None:
    auth = {"authorization": "Bearer x"}
    path = fresh()
    client.get(path, params={"cc": "max-age=60"}, headers=auth)
    client.get(path, params={"cc": "max-age=60"}, headers=auth)
    assert hits(path) == 2
    shared = fresh()
    client.get(shared, params={"cc": "public, max-age=60"}, headers=auth)
    assert (
        client.get(shared, params={"cc": "public, max-age=60"}, headers=auth)
        .headers["cache-status"]
        .startswith("gateway; hit")
    )
    assert hits(shared) == 1


def test_authorized_request_not_served_a_private_entry(client: httpx.Client) -> None:
    path = fresh()
    client.get(path, params={"cc": "max-age=60"})
    client.get(path, params={"cc": "max-age=60"}, headers={"authorization": "Bearer x"})
    assert hits(path) == 2


def test_vary_keys_on_the_named_header(client: httpx.Client) -> None:
    path = fresh()
    params = {"cc": "max-age=60", "vary": "x-lang"}
    en = client.get(path, params=params, headers={"x-lang": "en"})
    fr = client.get(path, params=params, headers={"x-lang": "fr"})
    assert "varied=en" in en.text and "varied=fr" in fr.text
    again = client.get(path, params=params, headers={"x-lang": "en"})
    assert again.text == en.text
    assert again.headers["cache-status"].startswith("gateway; hit")
    assert hits(path) == 2


def test_head_served_from_a_get_entry(client: httpx.Client) -> None:
    path = fresh()
    got = client.get(path, params={"cc": "max-age=60"})
    head = client.head(path, params={"cc": "max-age=60"})
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["cache-status"].startswith("gateway; hit")
    assert head.headers["content-length"] == str(len(got.content))
    assert hits(path) == 1


def test_large_bodies_stream_through_unstored(client: httpx.Client) -> None:
    path = fresh()
    params = {"cc": "max-age=60", "size": str(100 * 1024)}
    assert len(client.get(path, params=params).content) > 100 * 1024
    client.get(path, params=params)
    assert hits(path) == 2


def test_streamed_body_is_stored(client: httpx.Client) -> None:
    path = fresh()
    params = {"cc": "max-age=60", "stream": "1", "size": "5000"}
    first = client.get(path, params=params)
    second = client.get(path, params=params)
    assert second.content == first.content
    assert hits(path) == 1


def test_compression_applies_to_hits(client: httpx.Client) -> None:
    path = fresh()
    params = {"cc": "max-age=60", "size": "4000"}
    plain = client.get(path, params=params, headers={"accept-encoding": "identity"})
    assert "content-encoding" not in plain.headers
    gz = client.get(path, params=params, headers={"accept-encoding": "gzip"})
    assert gz.headers["content-encoding"] == "gzip"
    assert gz.headers["cache-status"].startswith("gateway; hit")
    assert gz.content == plain.content  # httpx decodes it
    assert hits(path) == 1


def test_concurrent_misses_send_one_request(gw: GatewayProcess) -> None:
    path = fresh()
    params = {"cc": "max-age=60", "delay": "0.5"}

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=gw.url, timeout=10) as c:
            return await asyncio.gather(*(c.get(path, params=params) for _ in range(50)))

    answers = asyncio.run(run())
    assert hits(path) == 1
    assert all(a.status_code == 200 for a in answers)
    assert len({a.text for a in answers}) == 1
    statuses = Counter(a.headers["cache-status"] for a in answers)
    assert statuses["gateway; fwd=miss; stored"] == 1
    assert statuses["gateway; fwd=miss; collapsed"] == 49


def test_not_storable_key_is_hit_for_miss(gw: GatewayProcess, client: httpx.Client) -> None:
    path = fresh()
    params = {"cc": "no-store", "delay": "0.3"}

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=gw.url, timeout=10) as c:
            return await asyncio.gather(*(c.get(path, params=params) for _ in range(5)))

    answers = asyncio.run(run())
    assert all(a.status_code == 200 for a in answers)
    assert hits(path) == 5  # the waiters went upstream once the answer proved private
    assert len({a.text for a in answers}) == 5
    # Remembered as not storable: no waiting, straight upstream.
    later = client.get(path, params={"cc": "no-store"})
    assert later.headers["cache-status"] == "gateway; fwd=miss"


def test_stale_entry_revalidated_with_304(client: httpx.Client) -> None:
    path = fresh()
    params = {"cc": "max-age=2", "etag": "v1"}
    first = client.get(path, params=params)
    time.sleep(2.2)  # stale; refreshed, its age (Date has whole seconds) is at most 1
    second = client.get(path, params=params)
    assert second.headers["cache-status"] == "gateway; fwd=stale; fwd-status=304"
    assert second.text == first.text
    assert CONDITIONAL[path] == 1
    third = client.get(path, params=params)
    assert third.headers["cache-status"].startswith("gateway; hit")


def test_client_conditional_answered_304(client: httpx.Client) -> None:
    path = fresh()
    params = {"cc": "max-age=60", "etag": "v7"}
    client.get(path, params=params)
    answer = client.get(path, params=params, headers={"if-none-match": '"v7"'})
    assert answer.status_code == 304
    assert answer.headers["etag"] == '"v7"'
    assert answer.headers["cache-status"].startswith("gateway; hit")
    other = client.get(path, params=params, headers={"if-none-match": '"v8"'})
    assert other.status_code == 200
    assert hits(path) == 1


def test_unsafe_method_invalidates(client: httpx.Client) -> None:
    path = fresh()
    client.get(path, params={"cc": "max-age=60"})
    post = client.post(path, params={"cc": "max-age=60"})
    assert post.headers["cache-status"] == "gateway; fwd=method"
    client.get(path, params={"cc": "max-age=60"})
    assert hits(path) == 3


def test_route_without_cache_has_no_cache_status(client: httpx.Client) -> None:
    answer = client.get(fresh("/p"), params={"cc": "max-age=60"})
    assert "cache-status" not in answer.headers


def test_purge(gw: GatewayProcess, client: httpx.Client) -> None:
    base = fresh()
    for suffix in ("/a?cc=max-age=60", "/b?cc=max-age=60", "/b?cc=max-age=60&x=1"):
        client.get(base + suffix)
    admin = httpx.Client(base_url=gw.admin_url, timeout=5)
    with admin:
        one = admin.post(
            "/cache/purge", json={"route": "cached", "path": base + "/a?cc=max-age=60"}
        )
        assert one.json() == {"purged": 1}
        rest = admin.post("/cache/purge", json={"prefix": base + "/"})
        assert rest.json() == {"purged": 2}
        assert admin.post("/cache/purge", json={"route": "ttl"}).status_code == 200
        assert admin.post("/cache/purge", json={"path": "/x"}).status_code == 400
    client.get(base + "/a?cc=max-age=60")
    assert hits(base + "/a") == 2


def test_metrics(gw: GatewayProcess, client: httpx.Client) -> None:
    path = fresh()
    client.get(path, params={"cc": "max-age=60"})
    client.get(path, params={"cc": "max-age=60"})
    text = httpx.get(gw.admin_url + "/metrics").text
    assert re.search(r'gateway_cache_requests_total\{result="hit",route="cached"\} [1-9]', text)
    assert re.search(r'gateway_cache_requests_total\{result="miss",route="cached"\} [1-9]', text)
    assert re.search(r"gateway_cache_bytes [1-9]", text)


def test_conditional_miss_does_not_mark_the_key(client: httpx.Client) -> None:
    path = fresh()
    params = {"cc": "max-age=60", "etag": "v1"}
    first = client.get(path, params=params, headers={"if-none-match": '"v1"'})
    assert first.status_code == 304  # the upstream's own answer
    assert first.headers["cache-status"] == "gateway; fwd=miss"
    assert client.get(path, params=params).headers["cache-status"].endswith("stored")
    assert client.get(path, params=params).headers["cache-status"].startswith("gateway; hit")


STALE_HIT = re.compile(r"gateway; hit; ttl=(0|-\d+)")


def test_stale_while_revalidate_one_background_refresh(gw: GatewayProcess) -> None:
    path = fresh()
    params = {"cc": "max-age=4, stale-while-revalidate=30"}
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        first = c.get(path, params=params)
        assert first.headers["cache-status"] == "gateway; fwd=miss; stored"
        time.sleep(4.1)  # stale (Date has whole seconds: the age may run 1s ahead)
        OVERRIDE[path] = {"delay": "0.5"}

        async def run() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=gw.url, timeout=10) as ac:
                return await asyncio.gather(*(ac.get(path, params=params) for _ in range(10)))

        started = time.monotonic()
        answers = asyncio.run(run())
        assert time.monotonic() - started < 0.45  # not waiting for the slow upstream
        for answer in answers:
            assert answer.status_code == 200
            assert answer.text == first.text
            assert STALE_HIT.fullmatch(answer.headers["cache-status"]), answer.headers
            assert int(answer.headers["age"]) >= 4
        deadline = time.monotonic() + 5
        while hits(path) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.8)  # the refresh's answer arrives and is stored
        assert hits(path) == 2  # exactly one refresh for the ten
        after = c.get(path, params=params)
        assert after.text.startswith("n=2 ")
        assert re.fullmatch(r"gateway; hit; ttl=[1-4]", after.headers["cache-status"])
        assert hits(path) == 2


def test_stale_while_revalidate_failed_refresh_keeps_the_entry(client: httpx.Client) -> None:
    path = fresh()
    params = {"cc": "max-age=1, stale-while-revalidate=30"}
    first = client.get(path, params=params)
    time.sleep(2.1)
    OVERRIDE[path] = {"status": "503"}
    stale = client.get(path, params=params)
    assert stale.text == first.text
    assert STALE_HIT.fullmatch(stale.headers["cache-status"])
    time.sleep(0.3)  # the refresh failed
    again = client.get(path, params=params)
    assert again.status_code == 200 and again.text == first.text
    assert STALE_HIT.fullmatch(again.headers["cache-status"])


def test_stale_while_revalidate_not_beyond_its_window(client: httpx.Client) -> None:
    path = fresh()
    params = {"cc": "max-age=1, stale-while-revalidate=1"}
    client.get(path, params=params)
    time.sleep(3.2)  # stale by more than 1s even with the age a second ahead
    late = client.get(path, params=params)
    assert late.headers["cache-status"] == "gateway; fwd=stale; stored"
    assert late.text.startswith("n=2 ")


def test_stale_if_error_on_an_upstream_503(client: httpx.Client) -> None:
    path = fresh("/s")
    params = {"cc": "max-age=1, stale-if-error=60", "etag": "v1"}
    first = client.get(path, params=params)
    time.sleep(2.1)
    OVERRIDE[path] = {"status": "503", "etag": ""}
    answer = client.get(path, params=params)
    assert answer.status_code == 200
    assert answer.text == first.text
    assert re.fullmatch(
        r"gateway; fwd=stale; fwd-status=503; ttl=(0|-\d+)", answer.headers["cache-status"]
    )
    assert hits(path) == 2
    del OVERRIDE[path]  # the upstream recovers: revalidated as usual
    assert client.get(path, params=params).headers["cache-status"] == (
        "gateway; fwd=stale; fwd-status=304"
    )


def test_stale_if_error_on_a_timeout(client: httpx.Client) -> None:
    path = fresh("/s")
    params = {"cc": "max-age=1, stale-if-error=60"}
    first = client.get(path, params=params)
    time.sleep(2.1)
    OVERRIDE[path] = {"delay": "3"}  # beyond the route's 1s timeout
    started = time.monotonic()
    answer = client.get(path, params=params)
    assert time.monotonic() - started < 2.5
    assert answer.status_code == 200
    assert answer.text == first.text
    assert re.fullmatch(
        r"gateway; fwd=stale; ttl=(0|-\d+); detail=upstream_timeout",
        answer.headers["cache-status"],
    )


def test_stale_if_error_not_beyond_its_window(client: httpx.Client) -> None:
    path = fresh("/s")
    params = {"cc": "max-age=1, stale-if-error=1"}
    client.get(path, params=params)
    time.sleep(3.2)  # stale by more than 1s even with the age a second ahead
    OVERRIDE[path] = {"status": "503"}
    answer = client.get(path, params=params)
    assert answer.status_code == 503
    assert answer.headers["cache-status"] == "gateway; fwd=stale"


def test_stale_if_error_on_a_dead_upstream(client: httpx.Client) -> None:
    path = fresh("/f")
    params = {"cc": "max-age=1, stale-if-error=60"}
    first = client.get(path, params=params)
    assert first.headers["cache-status"] == "gateway; fwd=miss; stored"
    FLAKY[0].stop()  # nothing listens there any more
    time.sleep(2.1)
    answer = client.get(path, params=params)
    assert answer.status_code == 200
    assert answer.text == first.text
    assert re.fullmatch(
        r"gateway; fwd=stale; ttl=(0|-\d+); detail=upstream_\w+",
        answer.headers["cache-status"],
    )


# The request's own Cache-Control (RFC 9111 5.2.1).


def test_request_no_cache_revalidates_a_fresh_entry(client: httpx.Client) -> None:
    path = fresh()
    params = {"cc": "max-age=60", "etag": "r1"}
    first = client.get(path, params=params)
    answer = client.get(path, params=params, headers={"cache-control": "no-cache"})
    assert answer.headers["cache-status"] == "gateway; fwd=request; fwd-status=304"
    assert answer.text == first.text
    assert CONDITIONAL[path] == 1
    # Without validators the entry is fetched again, and replaced.
    other = fresh()
    client.get(other, params={"cc": "max-age=60"})
    again = client.get(other, params={"cc": "max-age=60"}, headers={"cache-control": "no-cache"})
    assert again.headers["cache-status"] == "gateway; fwd=request; stored"
    assert again.text.startswith("n=2 ")
    assert client.get(other, params={"cc": "max-age=60"}).text.startswith("n=2 ")


def test_request_max_age_refuses_an_older_entry(client: httpx.Client) -> None:
    path = fresh()
    params = {"cc": "max-age=60"}
    client.get(path, params=params, headers={"cache-control": "max-age=0"})  # a miss
    time.sleep(2.1)  # the entry is at least 1 s old
    young = client.get(path, params=params, headers={"cache-control": "max-age=30"})
    assert young.headers["cache-status"].startswith("gateway; hit")
    old = client.get(path, params=params, headers={"cache-control": "max-age=0"})
    assert old.headers["cache-status"] == "gateway; fwd=request; stored"
    assert old.text.startswith("n=2 ")
    assert hits(path) == 2


def test_request_min_fresh(client: httpx.Client) -> None:
    path = fresh()
    params = {"cc": "max-age=60"}
    client.get(path, params=params)
    ok = client.get(path, params=params, headers={"cache-control": "min-fresh=30"})
    assert ok.headers["cache-status"].startswith("gateway; hit")
    refused = client.get(path, params=params, headers={"cache-control": "min-fresh=120"})
    assert refused.headers["cache-status"] == "gateway; fwd=request; stored"
    assert hits(path) == 2


def test_request_max_stale_accepts_a_stale_entry(client: httpx.Client) -> None:
    path = fresh()
    params = {"cc": "max-age=1"}
    first = client.get(path, params=params)
    time.sleep(2.2)
    stale = client.get(path, params=params, headers={"cache-control": "max-stale=60"})
    assert stale.text == first.text
    assert re.fullmatch(r"gateway; hit; ttl=(0|-\d+)", stale.headers["cache-status"])
    unbounded = client.get(path, params=params, headers={"cache-control": "max-stale"})
    assert unbounded.text == first.text
    too_stale = client.get(path, params=params, headers={"cache-control": "max-stale=0"})
    assert too_stale.headers["cache-status"] == "gateway; fwd=stale; stored"
    assert hits(path) == 2


def test_request_max_stale_never_overrides_must_revalidate(client: httpx.Client) -> None:
    path = fresh()
    params = {"cc": "max-age=1, must-revalidate"}
    client.get(path, params=params)
    time.sleep(2.2)
    answer = client.get(path, params=params, headers={"cache-control": "max-stale=600"})
    assert answer.headers["cache-status"] == "gateway; fwd=stale; stored"
    assert hits(path) == 2


def test_request_no_store_stores_nothing(client: httpx.Client) -> None:
    path = fresh()
    params = {"cc": "max-age=60"}
    first = client.get(path, params=params, headers={"cache-control": "no-store"})
    assert first.headers["cache-status"] == "gateway; fwd=miss"
    second = client.get(path, params=params)
    assert second.headers["cache-status"] == "gateway; fwd=miss; stored"
    # A stored answer may still serve a no-store request (RFC 9111 5.2.1.5).
    third = client.get(path, params=params, headers={"cache-control": "no-store"})
    assert third.headers["cache-status"].startswith("gateway; hit")
    assert hits(path) == 2


def test_request_only_if_cached(client: httpx.Client) -> None:
    path = fresh()
    params = {"cc": "max-age=60"}
    miss = client.get(path, params=params, headers={"cache-control": "only-if-cached"})
    assert miss.status_code == 504
    assert miss.headers["content-type"] == "application/problem+json"
    assert miss.json()["code"] == "not_cached"
    assert hits(path) == 0
    client.get(path, params=params)
    hit = client.get(path, params=params, headers={"cache-control": "only-if-cached"})
    assert hit.status_code == 200
    assert hit.headers["cache-status"].startswith("gateway; hit")
    assert hits(path) == 1


def test_request_directives_skip_stale_while_revalidate(client: httpx.Client) -> None:
    path = fresh()
    params = {"cc": "max-age=1, stale-while-revalidate=60"}
    client.get(path, params=params)
    time.sleep(2.2)
    answer = client.get(path, params=params, headers={"cache-control": "max-age=600"})
    assert answer.headers["cache-status"] == "gateway; fwd=stale; stored"  # not served stale
    assert answer.text.startswith("n=2 ")


def test_fallback_answers_are_not_stored(client: httpx.Client) -> None:
    path = fresh("/fb")
    params = {"cc": "max-age=60"}
    for n in (1, 2):
        answer = client.get(path, params=params)
        assert answer.status_code == 200
        assert answer.headers["x-gateway-fallback"] == "true"
        assert answer.headers["cache-status"] == "gateway; fwd=miss"
        assert answer.text.startswith(f"n={n} ")


def test_waiters_follow_a_streamed_answer_as_it_arrives(gw: GatewayProcess) -> None:
    """Concurrent misses share one upstream request and get its body as it streams:
    their first bytes come before its last ones exist (an answer of declared length
    within max_object_size)."""
    path = fresh()
    params = {"cc": "max-age=60", "stream": "1", "length": "1", "gap": "1.5", "size": "4000"}
    started = time.monotonic()

    def fetch() -> tuple[float, bytes, str]:
        identity = {"accept-encoding": "identity"}
        with httpx.stream(
            "GET", gw.url + path, params=params, headers=identity, timeout=10
        ) as answer:
            pieces = answer.iter_raw()
            first = next(pieces)
            at = time.monotonic() - started
            return at, first + b"".join(pieces), answer.headers["cache-status"]

    with ThreadPoolExecutor(max_workers=4) as pool:
        leader = pool.submit(fetch)
        deadline = time.monotonic() + 5
        while hits(path) == 0:  # the leader's request is upstream
            assert time.monotonic() < deadline
            time.sleep(0.01)
        waiters = [pool.submit(fetch) for _ in range(3)]
        results = [leader.result(), *(w.result() for w in waiters)]
    assert hits(path) == 1
    bodies = {body for _, body, _ in results}
    assert len(bodies) == 1 and len(bodies.pop()) > 4000
    assert results[0][2] == "gateway; fwd=miss; stored"
    assert [status for _, _, status in results[1:]] == ["gateway; fwd=miss; collapsed"] * 3
    # Each waiter's first bytes came before the upstream sent its second half.
    assert all(at < 1.4 for at, _, _ in results[1:]), [at for at, _, _ in results]


def test_followers_get_the_whole_body_when_the_first_client_leaves(gw: GatewayProcess) -> None:
    path = fresh()
    params = {"cc": "max-age=60", "stream": "1", "length": "1", "gap": "1", "size": "4000"}
    identity = {"accept-encoding": "identity"}

    def leave_early() -> None:
        with httpx.stream("GET", gw.url + path, params=params, headers=identity, timeout=10) as r:
            next(r.iter_raw())  # the first half; the others join; then the client goes
            time.sleep(0.5)

    def fetch() -> tuple[bytes, str]:
        answer = httpx.get(gw.url + path, params=params, headers=identity, timeout=10)
        return answer.content, answer.headers["cache-status"]

    with ThreadPoolExecutor(max_workers=3) as pool:
        leader = pool.submit(leave_early)
        deadline = time.monotonic() + 5
        while hits(path) == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        followers = [pool.submit(fetch) for _ in range(2)]
        leader.result()
        results = [f.result() for f in followers]
    assert [status for _, status in results] == ["gateway; fwd=miss; collapsed"] * 2
    assert all(body.endswith(b"x" * 100) and len(body) > 4000 for body, _ in results)
    assert hits(path) == 1
