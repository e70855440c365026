"""The Redis client the workers' own keys live on (the broker keeps its own connections).

Short timeouts on purpose: this client is used on the write path, after commit, and a Redis
outage must cost a writer at most a fraction of a second, never a hung request.
"""

from __future__ import annotations

import functools

import redis
from django.conf import settings


@functools.cache
def client() -> redis.Redis:
    return redis.Redis.from_url(
        settings.REDIS_URL,
        socket_connect_timeout=0.5,
        socket_timeout=1.0,
        health_check_interval=30,
    )


def key(*parts: str) -> str:
    """A key under the project's prefix: ``countdown:counts:debounce:monitoring.event``."""
    return ":".join([settings.COUNTS_REDIS_PREFIX, *parts])
