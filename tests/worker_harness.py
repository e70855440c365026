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
from pathlib import Path

from django.conf import settings
from django.db import connection

from bench.inprocess import (  # noqa: F401  (re-exported for the tests)
    MessageCounter,
    booted_broker,
    counting_messages,
    dead_letters,
    queued_messages,
    running_worker,
)
from counts.models import DirtyMark
from tests.paths import ROOT
from workers import debounce
from workers.redis_client import client

broker = booted_broker


def reset_redis() -> None:
    """Forget every queued message, every key of ours and what this process remembers sending."""
    debounce.forget()
    broker().flush_all()
    r = client()
    for k in r.scan_iter(f"{settings.COUNTS_REDIS_PREFIX}:*"):
        r.delete(k)
    ns = broker().namespace
    for k in r.scan_iter(f"{ns}:*"):
        r.delete(k)


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


def start_rundramatiq(
    env: dict[str, str], log: Path, processes: int = 1, threads: int = 1
) -> subprocess.Popen:
    return start_command(
        env, log, "rundramatiq", "--processes", str(processes), "--threads", str(threads)
    )


def start_scheduler(env: dict[str, str], log: Path) -> subprocess.Popen:
    return start_command(env, log, "run_scheduler")


def start_command(env: dict[str, str], log: Path, *argv: str) -> subprocess.Popen:
    """``manage.py <argv>`` in a process group of its own (so :func:`kill_group` takes all)."""
    return start_python(env, log, "manage.py", *argv)


def start_python(env: dict[str, str], log: Path, *argv: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *argv],
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
