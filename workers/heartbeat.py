"""Heartbeats: when the scheduler and each worker process were last seen alive.

The scheduler beats every sweep (``workers.schedule``); each worker process beats when it
boots and then every ``COUNTS_HEARTBEAT_INTERVAL_S`` from a daemon thread
(:class:`WorkerHeartbeat`, a Dramatiq middleware listed in ``DRAMATIQ_BROKER``). A beat is one
Redis key per process, ``<prefix>:heartbeat:<role>[:<host>:<pid>]``, holding the Redis
server's clock (so processes on hosts with skewed clocks still compare) and expiring after
:data:`TTL_S`: a process that died drops off the list within the hour, and until then shows
how long ago it was last seen.

Readers: ``/readyz`` (the scheduler must have been seen recently), ``counts status`` and the
admin's pending-marks page.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading

import redis
from django.conf import settings
from dramatiq.middleware import Middleware

from workers.redis_client import client, key

logger = logging.getLogger(__name__)

#: Seconds a heartbeat key lives: how long a dead process stays listed as "last seen".
TTL_S = 3600
#: The scheduler's role name (one key for all schedulers: any live one will do).
SCHEDULER = "scheduler"
#: The worker processes' role name; each process adds ``host:pid``.
WORKER = "worker"

#: Store the server's clock under KEYS[1] with a TTL of ARGV[1] seconds.
_BEAT = "return redis.call('SET', KEYS[1], redis.call('TIME')[1], 'EX', ARGV[1])"


def beat(role: str, ident: str | None = None) -> bool:
    """Record that ``role`` (and process ``ident``) is alive now; False if Redis is away.

    Never raises: a heartbeat is reporting, and Redis being down is reported elsewhere.
    """
    name = key("heartbeat", role, *([ident] if ident else []))
    try:
        client().eval(_BEAT, 1, name, TTL_S)
    except redis.RedisError as exc:
        logger.debug("heartbeat of %s not recorded: %s", role, exc)
        return False
    return True


def forget(role: str, ident: str | None = None) -> None:
    """Drop a heartbeat (a process shutting down cleanly is not "last seen", it is gone)."""
    with contextlib.suppress(redis.RedisError):
        client().delete(key("heartbeat", role, *([ident] if ident else [])))


def last_seen() -> dict[str, float]:
    """Seconds since each process was last seen: ``{"scheduler": 2.0, "worker:h:12": 4.0}``.

    Raises:
        redis.RedisError: Redis does not answer.
    """
    r = client()
    prefix = key("heartbeat", "")
    names = sorted(r.scan_iter(match=prefix + "*", count=200))
    if not names:
        return {}
    now, _micros = r.time()
    ages = {}
    for name, value in zip(names, r.mget(names), strict=True):
        if value is not None:
            ages[name.decode()[len(prefix) :]] = max(0.0, float(now - int(value)))
    return ages


def ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def stale_after_s(role: str) -> float:
    """A process of ``role`` not seen for this long is flagged: the scheduler after
    ``COUNTS_SCHEDULER_STALE_S`` (it beats every sweep), a worker after two missed heartbeats,
    at least 15 s."""
    if role == SCHEDULER:
        return float(settings.COUNTS_SCHEDULER_STALE_S)
    return max(15.0, 2.0 * settings.COUNTS_HEARTBEAT_INTERVAL_S)


def role_of(name: str) -> str:
    """The role of a process as :func:`last_seen` names it (``worker:host:pid`` -> worker)."""
    return name.partition(":")[0]


def stale(ages: dict[str, float]) -> list[str]:
    """What an operator must look at: the scheduler not seen within
    ``COUNTS_SCHEDULER_STALE_S``, or no worker seen within :func:`stale_after_s` (one dead
    worker among live ones is flagged in :func:`describe`, not here)."""
    return [
        role
        for role in (SCHEDULER, WORKER)
        if not any(role_of(name) == role and not _stale(name, age) for name, age in ages.items())
    ]


def _stale(name: str, age: float) -> bool:
    return age > stale_after_s(role_of(name))


def describe(ages: dict[str, float] | None = None) -> dict[str, str]:
    """``{process: "last seen 3 s ago"}``, the scheduler first, always listed; a process not
    seen for longer than its role allows says "STALE".

    Raises:
        redis.RedisError: Redis does not answer.
    """
    ages = dict(last_seen() if ages is None else ages)
    scheduler = ages.pop(SCHEDULER, None)
    rows = {
        SCHEDULER: "not seen in the last hour (is `manage.py run_scheduler` running?)"
        if scheduler is None
        else _seen(SCHEDULER, scheduler)
    }
    if not any(role_of(name) == WORKER for name in ages):
        rows[WORKER] = "no worker seen in the last hour (is `manage.py rundramatiq` running?)"
    rows.update({name: _seen(name, age) for name, age in sorted(ages.items())})
    return rows


def _seen(name: str, age: float) -> str:
    flag = f" STALE (over {stale_after_s(role_of(name)):.0f} s)" if _stale(name, age) else ""
    return f"last seen {ago(age)}{flag}"


def redis_address() -> str:
    pool = client().connection_pool.connection_kwargs
    return f"{pool.get('host', '127.0.0.1')}:{pool.get('port', 6379)}/{pool.get('db', 0)}"


def status_section(sender, **kwargs) -> dict:
    """``counts status``: when each process was last seen, or Redis as unreachable."""
    try:
        ages = last_seen()
        return {"processes": describe(ages), "stale_processes": stale(ages)}
    except redis.RedisError as exc:
        return {"unreachable": {"Redis": f"Redis at {redis_address()} does not answer: {exc}"}}


def context(request) -> dict:
    """Template context: ``process_heartbeats``, evaluated only by a template that shows it."""

    def rows() -> list[dict]:
        try:
            return [{"name": n, "seen": s} for n, s in describe().items()]
        except redis.RedisError as exc:
            return [{"name": "Redis", "seen": f"does not answer: {exc}"}]

    return {"process_heartbeats": rows}


class WorkerHeartbeat(Middleware):
    """Beat for this worker process on boot and every interval until it shuts down."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.ident = ""

    def after_worker_boot(self, broker, worker) -> None:
        self.ident = f"{socket.gethostname()}:{os.getpid()}"
        self.stop.clear()
        beat(WORKER, self.ident)
        threading.Thread(target=self._run, name="heartbeat", daemon=True).start()

    def _run(self) -> None:
        while not self.stop.wait(settings.COUNTS_HEARTBEAT_INTERVAL_S):
            beat(WORKER, self.ident)

    def before_worker_shutdown(self, broker, worker) -> None:
        self.stop.set()
        forget(WORKER, self.ident)
