"""One clear line when PostgreSQL or Redis goes away, one when it is back; silence in between.

The scheduler and the workers retry on their own while a dependency is down; what an operator
needs from their logs is *what* is down, *where* (host:port, never a password) and *when it came
back*, not a traceback every few seconds. :class:`Outage` tracks one dependency for that.

The worker side cannot change how dramatiq's consumer threads report a lost broker (a CRITICAL
line plus "Restarting consumer" for each queue, every 3 seconds), short of forking it.
:class:`QuietRedisOutages`, a broker middleware, installs a logging filter on those threads'
loggers when the worker boots: the first such record of an outage becomes the outage's one
line, the rest are dropped, and a small thread pings Redis until it answers, then says so.
"""

from __future__ import annotations

import logging
import threading
import time

import redis
from dramatiq.common import dq_name
from dramatiq.middleware import Middleware

from counts.api import first_line

logger = logging.getLogger("workers.outages")

#: Seconds between pings of a Redis that is down, to notice it is back.
PING_INTERVAL_S = 1.0

#: How dramatiq's consumer threads report a lost broker (worker.py), and the lines that follow.
#: Should dramatiq reword them, the filter lets its lines through unchanged (it fails open).
_CONSUMER_ERRORS = ("Consumer encountered a connection error", "Consumer encountered an unexpected")
_CONSUMER_FOLLOW_UPS = ("Restarting consumer", "Failed to post_process_message")


class Outage:
    """Whether one dependency is down; logs the start and the end of an outage once each."""

    def __init__(self, what: str, where: str, consequence: str) -> None:
        self.what, self.where, self.consequence = what, where, consequence
        self.down_since: float | None = None
        self._lock = threading.Lock()

    def down(self, exc: BaseException) -> bool:
        """Note a failure; True (and one ERROR line) when it starts an outage."""
        with self._lock:
            if self.down_since is not None:
                return False
            self.down_since = time.monotonic()
        reason = first_line(exc)
        logger.error(
            "%s at %s unavailable (%s); %s", self.what, self.where, reason, self.consequence
        )
        return True

    def up(self) -> bool:
        """Note a success; True (and one WARNING line) when it ends an outage."""
        with self._lock:
            since, self.down_since = self.down_since, None
        if since is None:
            return False
        logger.warning(
            "%s at %s is back after %.0f s", self.what, self.where, time.monotonic() - since
        )
        return True


def redis_where(client: redis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"


def postgres_where(settings_dict: dict) -> str:
    return f"{settings_dict.get('HOST') or 'localhost'}:{settings_dict.get('PORT') or 5432}"


class _ConsumerLogFilter(logging.Filter):
    """Turns dramatiq's per-queue, every-3-seconds connection errors into one outage line."""

    def __init__(self, outage: Outage, on_down) -> None:
        super().__init__()
        self.outage, self.on_down = outage, on_down

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if message.startswith(_CONSUMER_ERRORS) and _is_redis_error(record):
            if self.outage.down(_exception_of(record)):
                self.on_down()
            return False
        follow_up = message.startswith(_CONSUMER_FOLLOW_UPS)
        return not (follow_up and self.outage.down_since is not None)


def _is_redis_error(record: logging.LogRecord) -> bool:
    if record.exc_info:
        return isinstance(record.exc_info[1], redis.RedisError)
    return "connection error" in str(record.msg)


def _exception_of(record: logging.LogRecord) -> BaseException:
    if record.exc_info and record.exc_info[1] is not None:
        return record.exc_info[1]
    return ConnectionError(record.getMessage().split(": ", 1)[-1])


class QuietRedisOutages(Middleware):
    """Worker middleware: one line per Redis outage instead of dramatiq's repeated CRITICALs."""

    def after_worker_boot(self, broker, worker) -> None:
        client = broker.client
        self.outage = Outage(
            "redis",
            redis_where(client),
            "the worker waits for it and resumes consuming by itself",
        )
        log_filter = _ConsumerLogFilter(self.outage, lambda: self._watch(client))
        for queue in broker.get_declared_queues():
            for name in (queue, dq_name(queue)):
                consumer_logger = logging.getLogger(f"dramatiq.worker.ConsumerThread({name})")
                for old in [
                    f for f in consumer_logger.filters if isinstance(f, _ConsumerLogFilter)
                ]:
                    consumer_logger.removeFilter(old)  # a worker booted earlier in this process
                consumer_logger.addFilter(log_filter)
        try:
            client.ping()
        except redis.RedisError as exc:
            if self.outage.down(exc):
                self._watch(client)

    def _watch(self, client: redis.Redis) -> None:
        threading.Thread(
            target=self._ping_until_back, args=(client,), name="redis-outage", daemon=True
        ).start()

    def _ping_until_back(self, client: redis.Redis) -> None:
        while True:
            time.sleep(PING_INTERVAL_S)
            try:
                client.ping()
            except redis.RedisError:
                continue
            self.outage.up()
            return
