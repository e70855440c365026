"""Real Dramatiq workers on the real Redis broker, for tests.

No StubBroker: the broker is the one django-dramatiq configured from settings (a
``RedisBroker`` in the test namespace), workers are in-process ``dramatiq.Worker`` objects or
``rundramatiq`` subprocesses, and every key and queue is flushed around each test.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import dramatiq
from django.conf import settings
from django.db import connection
from dramatiq.middleware import Middleware

from counts.models import DirtyMark
from workers.actors import QUEUE
from workers.redis import client

ROOT = Path(__file__).resolve().parent.parent
_booted = {"done": False}


class EnqueueCounter(Middleware):
    """Counts messages sent per actor, as the broker sees them.

    A delayed message is enqueued twice (into the delay queue, then into the queue when due)
    under one message id; it is one message. Retries are counted in ``retries``.
    """

    def __init__(self) -> None:
        self.ids: dict[str, set] = {}
        self.retries: Counter = Counter()

    def after_enqueue(self, broker, message, delay):
        if message.options.get("retries"):
            self.retries[message.actor_name] += 1
        self.ids.setdefault(message.actor_name, set()).add(message.message_id)

    @property
    def sent(self) -> Counter:
        return Counter({actor: len(ids) for actor, ids in self.ids.items()})

    def clear(self) -> None:
        self.ids.clear()
        self.retries.clear()


def broker():
    b = dramatiq.get_broker()
    if not _booted["done"]:
        b.emit_after("process_boot")
        _booted["done"] = True
    return b


def reset_redis() -> None:
    """Forget every queued message and every key of ours."""
    broker().flush_all()
    r = client()
    for k in r.scan_iter(f"{settings.COUNTS_REDIS_PREFIX}:*"):
        r.delete(k)
    ns = broker().namespace
    for k in r.scan_iter(f"{ns}:*"):
        r.delete(k)


def queued_messages() -> int:
    r, ns = client(), broker().namespace
    return sum(r.hlen(f"{ns}:{q}.msgs") for q in (QUEUE, f"{QUEUE}.DQ"))


def dead_letters() -> int:
    return client().zcard(f"{broker().namespace}:{QUEUE}.XQ")


@contextlib.contextmanager
def running_worker(threads: int = 2):
    worker = dramatiq.Worker(broker(), worker_threads=threads, worker_timeout=100)
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.05) -> float:
    """Poll until ``predicate()`` is true; returns the seconds it took."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not reached within {timeout}s: {predicate.__doc__ or predicate}")
        time.sleep(interval)
    return time.monotonic() - started


def settled() -> bool:
    """No mark pending and no message queued or delayed."""
    return not DirtyMark.objects.exists() and queued_messages() == 0


def worker_subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for ``rundramatiq`` subprocesses: same test database, namespace and keys."""
    db = connection.settings_dict
    url = f"postgres://{db['USER'] or 'postgres'}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}"
    return {
        **os.environ,
        "DATABASE_URL": f"{url}/{db['NAME']}",
        "REDIS_URL": settings.REDIS_URL,
        "DRAMATIQ_NAMESPACE": broker().namespace,
        "COUNTS_REDIS_PREFIX": settings.COUNTS_REDIS_PREFIX,
        "DEBUG": "1",
        **extra,
    }


def start_rundramatiq(env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "manage.py", "rundramatiq", "--processes", "1", "--threads", "1"],
        cwd=ROOT,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def kill_group(process: subprocess.Popen, sig=signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)
    process.wait(timeout=30)
