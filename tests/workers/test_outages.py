"""What the scheduler and worker processes log while PostgreSQL or Redis is down.

One line when a dependency goes away, naming it and its host:port, one when it is back, and
nothing in between: no traceback every few seconds, no CRITICAL per queue. The processes are the
real commands (``run_scheduler``, ``rundramatiq``) run as subprocesses; the Redis that goes away
is a redis-server of the test's own, the PostgreSQL that is away at first is a port that starts
forwarding to the real one only later.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests import worker_harness as wh
from tests.redis_server import free_port

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


class LateForwarder:
    """A TCP port that refuses connections until :meth:`start`, then forwards them to a target."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target, self.port = target, free_port()
        self.sockets: list[socket.socket] = []

    def start(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))
        self.sockets.append(listener)
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = listener.accept()
                upstream = socket.create_connection(self.target)
                self.sockets += [client, upstream]
                for a, b in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.close()


def wait_for_line(log: Path, text: str, count: int = 1, timeout: float = 30) -> None:
    def logged():
        return log.read_text(errors="replace").count(text) >= count

    logged.__doc__ = f"{count}x {text!r} in {log.name}"
    wh.wait_until(logged, timeout=timeout, interval=0.2)


def lines_with(log: Path, text: str) -> list[str]:
    return [line for line in log.read_text(errors="replace").splitlines() if text in line]


def test_scheduler_logs_one_line_per_outage_and_one_when_back(own_redis, tmp_path):
    from django.db import connection

    db = connection.settings_dict
    postgres = LateForwarder((db["HOST"] or "127.0.0.1", int(db["PORT"] or 5432)))
    env = wh.worker_subprocess_env(REDIS_URL=own_redis.url, COUNTS_SWEEP_INTERVAL_S="1")
    env["DATABASE_URL"] = env["DATABASE_URL"].replace(
        f":{db['PORT'] or 5432}/", f":{postgres.port}/"
    )
    log = tmp_path / "scheduler.log"
    scheduler = subprocess.Popen(
        [sys.executable, "manage.py", "run_scheduler"],
        cwd=wh.ROOT,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    pg, rd = f"postgresql at 127.0.0.1:{postgres.port}", f"redis at 127.0.0.1:{own_redis.port}"
    try:
        wait_for_line(log, f"{pg} unavailable")
        time.sleep(4)  # four sweeps with PostgreSQL away
        postgres.start()
        wait_for_line(log, f"{pg} is back")
        own_redis.stop()
        wait_for_line(log, f"{rd} unavailable")
        time.sleep(4)
        own_redis.start()
        wait_for_line(log, f"{rd} is back")
    finally:
        wh.kill_group(scheduler)
        postgres.close()
    text = log.read_text(errors="replace")
    assert len(lines_with(log, f"{pg} unavailable")) == 1, text
    assert len(lines_with(log, f"{rd} unavailable")) == 1, text
    assert "Traceback" not in text, text
    assert "password" not in text


def test_worker_logs_one_line_per_redis_outage_and_one_when_back(own_redis, tmp_path):
    env = wh.worker_subprocess_env(REDIS_URL=own_redis.url)
    log = tmp_path / "worker.log"
    worker = wh.start_rundramatiq(env, log)
    where = f"redis at 127.0.0.1:{own_redis.port}"
    try:
        wait_for_line(log, "ready for action", timeout=60)
        own_redis.hang()
        wait_for_line(log, f"{where} unavailable")
        own_redis.resume()
        wait_for_line(log, f"{where} is back")
        own_redis.stop()
        wait_for_line(log, f"{where} unavailable", count=2)
        time.sleep(7)  # two of dramatiq's 3-second consumer restarts
        own_redis.start()
        wait_for_line(log, f"{where} is back", count=2)
    finally:
        wh.kill_group(worker)
    text = log.read_text(errors="replace")
    assert len(lines_with(log, f"{where} unavailable")) == 2, "one line per outage"
    assert "CRITICAL" not in text, text
    assert "Traceback" not in text, text
    assert "Restarting consumer" not in text, text
