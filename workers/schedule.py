"""The scheduler process: a sweep every few seconds and a periodic reconcile.

APScheduler runs the jobs; a Redis lease makes sure one scheduler acts at a time, so operators
can run a spare. Each job catches and logs its own errors: PostgreSQL or Redis being briefly
down costs a few skipped sweeps, never the process.

The sweep sends a message for every target model whose marks have none coming: marks written by
raw SQL from another client, a message lost with a dead worker, a write whose Redis call failed.
It leaves alone a model with a message queued, delayed or waiting for a retry
(``workers.queued``: a failing drain must not grow its own queue), with a debounce key set, or
with a drainer active whose oldest mark is younger than the drainer's flag could be.

Why not dramatiq-crontab (1.2.1, read from its source): it is a thin layer over the same
APScheduler ``BlockingScheduler``, and it does run sub-minute jobs (``interval(seconds=…)``),
but it does not keep this process's behaviour. (1) It schedules only actors: ``interval`` and
``cron`` decorate a Dramatiq actor and schedule ``actor.send``; the sweep would become a message
that waits in the very queues it inspects, piles up one per interval while the workers are
down, and the scheduler's heartbeat would then measure the workers, not the scheduler. (2) Its
leadership is one redis-py lock (``dramatiq-scheduler``, 10 s TTL, extended every 5 s), taken
once at start: a spare scheduler waits 15 s, prints "Another scheduler is already running" and
exits (under honcho that stops every process of the Procfile); a Redis down at start is a
traceback and an exit. (3) During a Redis outage the extend job raises ``ConnectionError`` (not
``LockError``), which APScheduler logs with a traceback every 5 s, while the TTL lapses and a
spare may lead too; once Redis is back the extend raises ``LockNotOwnedError`` and the leader
shuts down instead of resuming. The :class:`Lease` here is renewed or retaken every sweep, a
spare keeps running and takes over when the lease lapses, and an outage is one log line each
way (``workers.outages``).
"""

from __future__ import annotations

import logging
import uuid

import redis
from apscheduler.schedulers.blocking import BlockingScheduler
from django.conf import settings
from django.db import InterfaceError, OperationalError, close_old_connections, connection

from counts.marks import pending_summary
from workers import debounce, heartbeat
from workers.outages import Outage, postgres_where
from workers.queued import labels_with_messages
from workers.redis_client import client, key, where

logger = logging.getLogger("workers.schedule")

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0
"""


class Lease:
    """Leadership among scheduler processes: renewed every sweep, lapses if the holder dies."""

    def __init__(self, ttl_ms: int) -> None:
        self.token = uuid.uuid4().hex
        self.ttl_ms = ttl_ms
        self.key = key("scheduler", "leader")

    def acquire(self) -> bool:
        return bool(client().eval(_RENEW, 1, self.key, self.token, self.ttl_ms))


def sweep() -> list[str]:
    """Send for every model whose marks wait with no message coming. Returns those labels."""
    stale_after = settings.COUNTS_DRAINING_TTL_MS / 1000
    sent = []
    waiting = pending_summary()
    coming = labels_with_messages() if waiting else set()
    for pending in waiting:
        if not pending.due:  # only rows someone holds, tried again when their mark is due
            continue
        if pending.label in coming or debounce.is_scheduled(pending.label):
            continue
        if debounce.is_draining(pending.label) and pending.oldest_seconds < stale_after:
            continue
        sent += debounce.request([pending.label], delay_ms=0, force=True)
    if sent:
        logger.info("sweep sent recompute for %s", ", ".join(sent))
    return sent


class Scheduler:
    def __init__(self) -> None:
        interval = settings.COUNTS_SWEEP_INTERVAL_S
        self.lease = Lease(ttl_ms=interval * 3000)
        retrying = f"the scheduler retries every {interval} s"
        self.redis = Outage("redis", where(), retrying)
        self.postgres = Outage("postgresql", postgres_where(connection.settings_dict), retrying)
        self.scheduler = BlockingScheduler(timezone="UTC")
        self.scheduler.add_job(
            self.run_sweep,
            "interval",
            seconds=interval,
            id="sweep",
            max_instances=1,
            coalesce=True,
            misfire_grace_time=interval,
        )
        self.scheduler.add_job(
            self.run_reconcile,
            "interval",
            seconds=settings.COUNTS_RECONCILE_INTERVAL_S,
            id="reconcile",
            max_instances=1,
            coalesce=True,
        )

    def _leading(self) -> bool:
        try:
            leading = self.lease.acquire()
        except redis.RedisError as exc:
            self.redis.down(exc)
            return False
        self.redis.up()
        return leading

    def run_sweep(self) -> None:
        heartbeat.beat(heartbeat.SCHEDULER)
        if not self._leading():
            return
        close_old_connections()
        try:
            sweep()
        except (OperationalError, InterfaceError) as exc:
            self.postgres.down(exc)
        except redis.RedisError as exc:
            self.redis.down(exc)
        except Exception:
            logger.exception("sweep failed; retrying at the next interval")
        else:
            self.postgres.up()
        finally:
            close_old_connections()

    def run_reconcile(self) -> None:
        if not self._leading():
            return
        from workers.actors import reconcile_counts

        try:
            reconcile_counts.send()
            logger.info("reconcile requested")
        except redis.RedisError as exc:
            self.redis.down(exc)
        except Exception:
            logger.exception("could not request a reconcile; retrying at the next interval")

    def start(self) -> None:
        logger.info(
            "scheduler up: sweep every %ss, reconcile every %ss",
            settings.COUNTS_SWEEP_INTERVAL_S,
            settings.COUNTS_RECONCILE_INTERVAL_S,
        )
        self.scheduler.start()
