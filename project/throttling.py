"""Request rates and failed sign-ins, limited in Redis; a Redis outage lifts the limits.

Without limits, 60 wrong passwords to /api/auth/token/ in 22 s were all answered (400, never
429) and 40 wrong admin logins did not keep the right one out. Now:

- every API request counts against a rate per client address (anonymous) or per user
  (:class:`AnonRateThrottle`, :class:`UserRateThrottle`, DRF's, with the rates in settings);
- every sign-in (the token endpoint and the login forms, ``project.signin``) counts against
  the "login" rate (:func:`begin_attempt`), 10 failed attempts a minute per client address
  *and* username: a client guessing one account's password is stopped, the account's owner
  signing in from elsewhere is not, and neither is anybody else on the address.

The counts live in the "throttle" cache (Redis) so that every web process shares them. Limits
protect the service but are not worth an outage of their own: when Redis fails or hangs,
requests are served without limits, one WARNING line says so, and Redis is left alone for a
cool-down (``COUNTS_REDIS_COOLDOWN_MS``) so that only one request pays its socket timeout.

The client is ``REMOTE_ADDR`` unless DRF's ``NUM_PROXIES`` is set (then the address the
trusted proxies put in ``X-Forwarded-For``): DRF's default would believe whatever
``X-Forwarded-For`` a client sends, which makes every limit per client optional.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import redis
from django.conf import settings
from django.core.cache import caches
from django.utils.connection import ConnectionProxy
from rest_framework import throttling
from rest_framework.settings import api_settings

from counts.base.errors import first_line
from workers.redis_client import Breaker, where

logger = logging.getLogger("project.throttling")

#: The cache alias the counts live in (``settings.CACHES``).
ALIAS = "throttle"
#: The alias as a cache, resolved per thread on each use (like ``django.core.cache.cache``).
cache = ConnectionProxy(caches, ALIAS)
#: After a failed call, requests skip Redis for a cool-down (see the module docstring).
breaker = Breaker()

T = TypeVar("T")

_PERIODS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _where() -> str:
    location = settings.CACHES[ALIAS]["LOCATION"]
    return where(location if isinstance(location, str) else location[0])


def fail_open(call: Callable[[], T], served: T) -> T:
    """``call()``, or ``served`` (what lets the request through) when Redis fails or is resting.

    Logs the start of an outage once (WARNING) and its end once (INFO).
    """

    def down(exc: redis.RedisError) -> None:
        logger.warning(
            "redis at %s unavailable (%s); requests and sign-ins are served without rate"
            " limits until it answers",
            _where(),
            first_line(exc),
        )

    def back() -> None:
        logger.info("redis at %s is back; rate limits apply again", _where())

    return breaker.call(call, served, on_down=down, on_back=back)


def client_ident(request) -> str:
    """The client's address: ``REMOTE_ADDR``, or as trusted proxies report it (``NUM_PROXIES``)."""
    if api_settings.NUM_PROXIES is None:
        return request.META.get("REMOTE_ADDR") or ""
    return throttling.BaseThrottle().get_ident(request)


def parse_rate(scope: str) -> tuple[int, int]:
    """``(attempts, seconds)`` of a rate in ``DEFAULT_THROTTLE_RATES``, read on each use."""
    number, period = api_settings.DEFAULT_THROTTLE_RATES[scope].split("/")
    return int(number), _PERIODS[period.strip()[0]]


class _FailOpen:
    """DRF's rate throttles, in the shared cache, with rates read on each use, failing open."""

    cache = cache

    def get_rate(self):
        return api_settings.DEFAULT_THROTTLE_RATES[self.scope]

    def get_ident(self, request):
        return client_ident(request)

    def allow_request(self, request, view):
        return fail_open(lambda: super(_FailOpen, self).allow_request(request, view), True)


class AnonRateThrottle(_FailOpen, throttling.AnonRateThrottle):
    """Requests per client address, when not signed in ("anon" rate)."""


class UserRateThrottle(_FailOpen, throttling.UserRateThrottle):
    """Requests per signed-in user, or per address when not signed in ("user" rate)."""


@dataclass
class Attempt:
    """One sign-in attempt: a slot taken in the count of failures, or a refusal."""

    slot: str | None = None
    #: Seconds until the oldest counted failure expires, when refused.
    wait: float | None = None

    @property
    def refused(self) -> bool:
        return self.wait is not None

    def succeeded(self) -> None:
        """The credentials were right: this attempt is not a failure after all."""
        if self.slot is not None:
            fail_open(lambda: cache.delete(self.slot), None)


def begin_attempt(request, username: object) -> Attempt:
    """Count a sign-in attempt as failed until :meth:`Attempt.succeeded` says otherwise.

    Each failure holds one of ``limit`` slots (a key that expires after the window), taken with
    an atomic add before the password is checked: parallel guesses cannot all slip in before
    the first is counted, and "at most ``limit`` failures in any window" holds exactly. When
    every slot is held, the attempt is refused until the oldest expires; refusals take no slot,
    so retrying while locked out does not prolong the lock.
    """
    limit, window = parse_rate("login")
    name = str(username or "").strip().casefold()
    digest = hashlib.sha256(name.encode()).hexdigest()[:32]
    keys = [f"login:{client_ident(request)}:{digest}:{i}" for i in range(limit)]

    def take() -> Attempt:
        now = time.time()
        held = cache.get_many(keys)
        for key in keys:
            if key not in held and cache.add(key, now + window, window):
                return Attempt(slot=key)
        return Attempt(wait=max(1.0, min(held.values(), default=now + window) - now))

    return fail_open(take, Attempt())


def lockout_message(wait: float | None = None) -> str:
    """Why a sign-in was refused, and (given ``wait``) for how long."""
    limit, window = parse_rate("login")
    message = (
        f"Too many failed sign-in attempts for this username from your address ({limit} in"
        f" {window} seconds)."
    )
    return message if wait is None else f"{message} Try again in {math.ceil(wait)} seconds."
