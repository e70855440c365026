"""The write path's side: after commit, turn the engine's notice into a debounced message.

Redis being down or hung must not fail or slow a write: the marks are already committed and the
scheduler's sweep will send for them once Redis is back. The first failure opens the
``workers.redis_client.write_path`` breaker: for a cool-down, writers skip Redis altogether (a hung
Redis costs one writer one short socket timeout, not every writer). The error is logged once
per outage, not once per write, and once more when Redis answers again.
"""

from __future__ import annotations

import logging

import redis
from django.conf import settings

from workers import debounce
from workers.redis_client import where, write_path

logger = logging.getLogger(__name__)


def on_marks_committed(sender, targets, using, **kwargs) -> None:
    def down(exc: redis.RedisError) -> None:
        logger.error(
            "redis at %s unavailable: could not schedule recompute for %s (marks are safe;"
            " the sweep will send; writers skip redis for %d ms at a time): %s",
            where(),
            sorted(targets),
            settings.COUNTS_REDIS_COOLDOWN_MS,
            exc,
        )

    def back() -> None:
        logger.warning("redis at %s is back; recompute messages flow again", where())

    write_path.call(lambda: debounce.request(targets), None, on_down=down, on_back=back)
