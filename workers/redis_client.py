"""The Redis client the workers' own keys live on (the broker keeps its own connections).

Short timeouts on purpose: this client is used on the write path, after commit, and a Redis
outage must cost a writer at most a fraction of a second, never a hung request. The
:data:`write_path` breaker then keeps later writers off Redis for a while, so only the first
writer of an outage pays even that.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlsplit

import redis
from django.conf import settings

T = TypeVar("T")

#: One client per Redis URL: ``override_settings(REDIS_URL=...)`` gets its own.
_clients: dict[str, redis.Redis] = {}


def client() -> redis.Redis:
    """The client for the current ``settings.REDIS_URL``, built on first use."""
    url = settings.REDIS_URL
    found = _clients.get(url)
    if found is None:
        timeout = settings.COUNTS_REDIS_TIMEOUT_MS / 1000
        found = _clients.setdefault(
            url,
            redis.Redis.from_url(
                url,
                socket_connect_timeout=timeout,
                socket_timeout=timeout,
                health_check_interval=30,
            ),
        )
    return found


def where(url: str | None = None) -> str:
    """``host:port`` of a Redis URL, without its password, for log lines."""
    parts = urlsplit(url or settings.REDIS_URL)
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}"


def key(*parts: str) -> str:
    """A key under the project's prefix: ``countdown:counts:debounce:monitoring.event``."""
    return ":".join([settings.COUNTS_REDIS_PREFIX, *parts])


#: Every breaker made, so that :func:`reset` closes them all.
_breakers: list[Breaker] = []


class Breaker:
    """A circuit breaker: after a failure, callers skip Redis until a cool-down has passed.

    Used by the write path only. A hung Redis costs the first writer one socket timeout; the
    writers after it skip Redis at no cost (their marks are durable in PostgreSQL and the
    scheduler's sweep sends for them). After the cool-down the next writer tries again: it
    closes the breaker if Redis answers, re-opens it if not. It also knows whether an outage
    is going on, so the caller logs its start and its end once each.
    """

    def __init__(self) -> None:
        self._open_until = 0.0
        self._outage = False
        self._lock = threading.Lock()
        _breakers.append(self)

    def allows(self) -> bool:
        return time.monotonic() >= self._open_until

    def failed(self) -> bool:
        """Open the breaker; True for the first failure of an outage."""
        with self._lock:
            self._open_until = time.monotonic() + settings.COUNTS_REDIS_COOLDOWN_MS / 1000
            first, self._outage = not self._outage, True
            return first

    def succeeded(self) -> bool:
        """Close the breaker; True when this success ends an outage."""
        with self._lock:
            ended, self._outage, self._open_until = self._outage, False, 0.0
            return ended

    def call(
        self,
        fn: Callable[[], T],
        fallback: T,
        on_down: Callable[[redis.RedisError], None] | None = None,
        on_back: Callable[[], None] | None = None,
    ) -> T:
        """``fn()``, or ``fallback`` while the breaker is open or when Redis fails.

        ``on_down(exc)`` runs at the failure that starts an outage and ``on_back()`` at the
        success that ends it: each caller logs an outage once each way, in its own words.
        """
        if not self.allows():
            return fallback
        try:
            result = fn()
        except redis.RedisError as exc:
            if self.failed() and on_down is not None:
                on_down(exc)
            return fallback
        if self.succeeded() and on_back is not None:
            on_back()
        return result


#: Guards the write path's calls to Redis (see :class:`Breaker`).
write_path = Breaker()


def reset() -> None:
    """Forget every client and close every breaker: after ``REDIS_URL`` changed, and in tests."""
    while _clients:
        _clients.popitem()[1].close()
    for breaker in _breakers:
        breaker.succeeded()
