"""Keys of one test's own in the shared Redis on 127.0.0.1:6379."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import redis

__all__ = ["SHARED_REDIS", "scratch_prefix"]

SHARED_REDIS = "redis://127.0.0.1:6379/0"


@contextlib.contextmanager
def scratch_prefix(tag: str) -> Iterator[str]:
    """A key prefix no other test uses; every key under it is deleted afterwards."""
    prefix = f"gateway-test:{tag}:{uuid.uuid4().hex}:"
    try:
        yield prefix
    finally:
        client = redis.Redis.from_url(SHARED_REDIS, socket_timeout=2)
        try:
            keys = list(client.scan_iter(match=prefix + "*"))
            if keys:
                client.delete(*keys)
        finally:
            client.close()
