"""Locust scenarios for load-testing a running gateway: yours, or the demo of `make run`.

    make load                                   # the demo on http://127.0.0.1:8080
    make load HOST=http://10.0.0.5:8080 USERS=200 SPAWN_RATE=20 DURATION=5m
    .venv/bin/locust -f load/locustfile.py --headless -u 50 -r 10 -t 1m \\
        --host http://127.0.0.1:8080 MixedRoutes     # one user class only

Four user classes, weighted (change a class's share with its `weight`, or name the
classes to run on the command line):

- `MixedRoutes` (weight 6): the demo's plain routes, reads and an echo POST.
- `FanOut` (2): the aggregate route, checked to be a JSON object with its three keys.
- `RateLimited` (1): a route meant to carry a rate limit. A 429 is the limit doing its
  job: it counts as a success, reported on its own row (`429 <name>`) rather than the
  route's, so the failure count stays for real failures and the route's latencies for
  answers that went through. (The gateway does not enforce rate limits
  yet; this class is ready for when it does, and for gateways that do.)
- `LargeBodies` (1): 1 MiB streamed downloads and 1 MiB uploads.

Every class treats 429 the same way. Paths and sizes come from the environment, so
the file works against any gateway (defaults: the demo's routes in config/gateway.yaml):

| variable | default |
|---|---|
| LOAD_USER_IDS | `1,2` |
| LOAD_MIXED_PATHS | `/api/users/{id},/api/users,/api/orders?user={id},/api/echo/{id}` |
| LOAD_FANOUT_PATH | `/api/profile/{id}` |
| LOAD_FANOUT_KEYS | `user,orders,recommendations` (keys the merged JSON must have) |
| LOAD_LIMITED_PATH | `/api/users/{id}` |
| LOAD_STREAM_PATH | `/api/stream?bytes={bytes}` |
| LOAD_UPLOAD_PATH | `/api/echo/upload` |
| LOAD_BODY_BYTES | `1048576` |
| LOAD_WAIT_MAX | `0.1` (seconds each user waits between tasks, at most) |
| LOAD_MAX_REQUESTS | `1000000` (the run stops after this many requests) |
"""

from __future__ import annotations

import os
import random
from typing import Any

from locust import FastHttpUser, between, events, task
from locust.contrib.fasthttp import ResponseContextManager
from locust.env import Environment

USER_IDS = [u.strip() for u in os.environ.get("LOAD_USER_IDS", "1,2").split(",") if u.strip()]
MIXED_PATHS = [
    p.strip()
    for p in os.environ.get(
        "LOAD_MIXED_PATHS",
        "/api/users/{id},/api/users,/api/orders?user={id},/api/echo/{id}",
    ).split(",")
    if p.strip()
]
FANOUT_PATH = os.environ.get("LOAD_FANOUT_PATH", "/api/profile/{id}")
FANOUT_KEYS = [
    k.strip()
    for k in os.environ.get("LOAD_FANOUT_KEYS", "user,orders,recommendations").split(",")
    if k.strip()
]
LIMITED_PATH = os.environ.get("LOAD_LIMITED_PATH", "/api/users/{id}")
STREAM_PATH = os.environ.get("LOAD_STREAM_PATH", "/api/stream?bytes={bytes}")
UPLOAD_PATH = os.environ.get("LOAD_UPLOAD_PATH", "/api/echo/upload")
BODY_BYTES = int(os.environ.get("LOAD_BODY_BYTES", str(1 << 20)))
WAIT_MAX = float(os.environ.get("LOAD_WAIT_MAX", "0.1"))
MAX_REQUESTS = int(os.environ.get("LOAD_MAX_REQUESTS", "1000000"))

UPLOAD_BODY = b"x" * BODY_BYTES
RATE_LIMITED = "429"  # the prefix of the rows that count 429 answers on their own


def fill(template: str) -> tuple[str, str]:
    """(path, name): the path with a user id, and the template as locust's row name."""
    uid = random.choice(USER_IDS) if USER_IDS else "1"
    path = template.replace("{id}", uid).replace("{bytes}", str(BODY_BYTES))
    name = template.replace("{bytes}", str(BODY_BYTES))
    return path, name


def judge(response: ResponseContextManager, name: str, expect_bytes: int = -1) -> None:
    """2xx: success. 429: a success too, reported on its own row, `429 <name>`, so the
    limit working is neither a failure nor mixed into the route's own figures.
    Anything else, or a body of the wrong size: a failure with the reason."""
    status = response.status_code
    if status == 429:
        response.request_meta["name"] = f"{RATE_LIMITED} {name}"
        response.success()
    elif not 200 <= status < 300:
        response.failure(f"HTTP {status}")
    elif expect_bytes >= 0 and len(response.content or b"") != expect_bytes:
        response.failure(f"body of {len(response.content or b'')} bytes, wanted {expect_bytes}")
    else:
        response.success()


class _Base(FastHttpUser):
    abstract = True
    wait_time = between(0, WAIT_MAX)
    network_timeout = 30.0
    connection_timeout = 10.0

    def get(self, template: str, expect_bytes: int = -1, prefix: str = "") -> None:
        path, name = fill(template)
        name = prefix + name
        with self.client.get(path, name=name, catch_response=True) as response:
            judge(response, name, expect_bytes)


class MixedRoutes(_Base):
    weight = 6

    @task(10)
    def read(self) -> None:
        self.get(random.choice(MIXED_PATHS))

    @task(1)
    def echo_post(self) -> None:
        path, name = fill("/api/echo/{id}")
        with self.client.post(
            path, name=name, data=b'{"hello":"gateway"}', catch_response=True
        ) as response:
            judge(response, name)


class FanOut(_Base):
    weight = 2

    @task
    def profile(self) -> None:
        path, name = fill(FANOUT_PATH)
        with self.client.get(path, name=name, catch_response=True) as response:
            if response.status_code == 200:
                try:
                    doc = response.json()
                except ValueError:
                    response.failure("not JSON")
                    return
                missing = [k for k in FANOUT_KEYS if not isinstance(doc, dict) or k not in doc]
                if missing:
                    response.failure(f"merged answer lacks {', '.join(missing)}")
                    return
            judge(response, name)


class RateLimited(_Base):
    weight = 1
    wait_time = between(0, WAIT_MAX / 10)  # fast enough to trip a per-client limit

    @task
    def limited(self) -> None:
        self.get(LIMITED_PATH, prefix="[limited] ")


class LargeBodies(_Base):
    weight = 1

    @task
    def download(self) -> None:
        self.get(STREAM_PATH, expect_bytes=BODY_BYTES)

    @task
    def upload(self) -> None:
        path, name = fill(UPLOAD_PATH)
        with self.client.post(
            path,
            name=f"{name} ({BODY_BYTES} bytes)",
            data=UPLOAD_BODY,
            headers={"Content-Type": "application/octet-stream"},
            catch_response=True,
        ) as response:
            judge(response, f"{name} ({BODY_BYTES} bytes)")


@events.init.add_listener
def _bounded(environment: Environment, **_: Any) -> None:
    """Stop the whole run after LOAD_MAX_REQUESTS requests, whatever --run-time says."""
    stopping = False

    def count(**_: Any) -> None:
        nonlocal stopping
        runner = environment.runner
        if stopping or runner is None:
            return
        if runner.stats.total.num_requests >= MAX_REQUESTS:
            stopping = True
            print(f"\nLOAD_MAX_REQUESTS ({MAX_REQUESTS:,}) reached: stopping")
            runner.quit()

    environment.events.request.add_listener(count)


@events.test_stop.add_listener
def _report_limits(environment: Environment, **_: Any) -> None:
    limited = sum(
        entry.num_requests
        for entry in environment.stats.entries.values()
        if entry.name.startswith(f"{RATE_LIMITED} ")
    )
    total = environment.stats.total
    print(
        f"\nrequests: {total.num_requests:,}, failures: {total.num_failures:,}, "
        f"of which 429 (rate limited, counted as successes on their own rows): {limited:,}"
    )
