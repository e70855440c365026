"""The scheduler process: a sweep every few seconds and a periodic reconcile.

APScheduler runs the jobs; a Redis lease makes sure one scheduler acts at a time, so operators
can run a spare. Each job catches and logs its own errors: PostgreSQL or Redis being briefly
down costs a few skipped sweeps, never the process.

The sweep judges each target model by PostgreSQL, the source of truth: the age of its oldest
*due* mark. Two rules, checked every ``COUNTS_SWEEP_INTERVAL_S``:

- **stuck**: a due mark has waited ``COUNTS_RESCUE_AFTER_S`` and no drainer of the model is at
  work (``debounce.working``: a key each drainer sets at every look, with that life), or it has
  waited a whole drain budget longer even with one. Then the sweep sends ``rescue_drain``,
  whatever the broker says is queued, fetched, delayed or retrying: a message a live worker
  fetched across a Redis stall, a debounce key taken back for a retry whose worker was killed,
  a retry backing off for a minute after its cause is gone, all count as lost. A live worker
  whose fetched message is taken as lost is named in the log once, so an operator can restart
  it. Duplicates are cheap (drains are idempotent, ``SKIP LOCKED`` keeps two drainers apart);
  stale counts are not.
- **nothing coming**: fresh due marks with no message queued, fetched, delayed or retrying
  (``workers.queued``), no debounce key and no live drainer: marks written by raw SQL from
  another client, or by a writer whose Redis call failed. They get a message at once instead
  of after the rescue's patience.

What bounds the staleness: a due mark waits at most ``COUNTS_RESCUE_AFTER_S`` plus one sweep
interval plus a worker's pick-up before a drain starts for it (about 3 + 2 + 1 s by default).
What bounds the messages: at most one rescue per stuck model per sweep (30 a minute by
default), none while an earlier rescue waits unfetched in the queue, and rescues are never
retried (``workers.actors.rescue_drain``), so a failing drain does not grow its queue.

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
import time
import uuid

import redis
from apscheduler.schedulers.blocking import BlockingScheduler
from django.conf import settings
from django.db import InterfaceError, OperationalError, close_old_connections, connection

from counts.api import PendingSummary, pending_summary
from workers import debounce, heartbeat
from workers.actors import reconcile_counts, rescue_drain
from workers.outages import Outage, postgres_where
from workers.queued import Held, held_messages
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
    """Send for every model whose due marks wait with nothing coming, or nobody at work.

    Returns the labels a message was sent for (a fresh one, or a rescue).
    """
    waiting = [pending for pending in pending_summary() if pending.due]
    if not waiting:
        return []
    held = held_messages()
    at_work = debounce.working([pending.label for pending in waiting])
    sent, rescued = [], []
    for pending in waiting:
        if _stuck(pending, pending.label in at_work):
            if _rescue(pending, held):
                rescued.append(pending.label)
        elif _nothing_coming(pending, held):
            sent += debounce.request([pending.label], delay_ms=0, force=True)
    _forget_reported(held)
    if sent:
        logger.info("sweep sent recompute for %s", ", ".join(sent))
    if rescued:
        logger.info("sweep sent rescue drains for %s", ", ".join(rescued))
    return sent + rescued


def _stuck(pending: PendingSummary, at_work: bool) -> bool:
    """Due marks have waited ``COUNTS_RESCUE_AFTER_S`` with no drainer of the model at work,
    or a whole drain budget longer even with one (a drainer looking yet not getting to them)."""
    waited = pending.oldest_due_seconds
    patience = settings.COUNTS_RESCUE_AFTER_S
    return waited >= patience and (
        not at_work or waited >= patience + settings.COUNTS_DRAIN_BUDGET_S
    )


def _nothing_coming(pending: PendingSummary, held: list[Held]) -> bool:
    """Fresh due marks with no message queued, fetched by a live worker, delayed or retrying,
    no debounce key and no live drainer: the marks of raw SQL and of writers Redis failed."""
    if any(h.label == pending.label and not h.lost for h in held):
        return False
    if debounce.is_scheduled(pending.label):
        return False
    stale_after = settings.COUNTS_DRAINING_TTL_MS / 1000
    return not (debounce.is_draining(pending.label) and pending.oldest_seconds < stale_after)


#: Ids of messages already named as lost in the log (each is named once).
_reported: set[str] = set()


def _rescue(pending: PendingSummary, held: list[Held]) -> bool:
    """Send a rescue drain, unless one sent earlier still waits in the queue unfetched (then
    no worker has been free to take it, and another would only wait behind it)."""
    label = pending.label
    mine = [h for h in held if h.label == label]
    if any(h.actor == "rescue_drain" and h.worker is None for h in mine):
        return False
    due_before = time.time() * 1000 - settings.COUNTS_RESCUE_AFTER_S * 1000
    for h in mine:
        # A delayed message whose time has not come (a retry backing off) is where it should be.
        if h.worker is not None and h.eta_ms < due_before and h.message_id not in _reported:
            _reported.add(h.message_id)
            logger.warning(
                "message %s for %s, fetched by %s worker %s, has not led to progress: its due"
                " marks waited %.0f s with no drainer at work. Counted as lost, a rescue drain is"
                " sent. The broker frees the message only when that worker stops: if this"
                " repeats for a live worker, restart it.",
                h.message_id,
                label,
                "dead" if h.lost else "live",
                h.worker,
                pending.oldest_due_seconds,
            )
    rescue_drain.send(label)
    return True


def _forget_reported(held: list[Held]) -> None:
    _reported.intersection_update(h.message_id for h in held)


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
