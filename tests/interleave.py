"""Drive several database clients step by step, for race tests that replay one interleaving.

A race between transactions shows only in one order of their statements, commits and drains;
threads left to the scheduler hit that order now and then. Here each client is a thread of its
own with a connection of its own, and the test hands it one call at a time. :meth:`Client.start`
returns once the call has finished *or* its backend waits on a lock (``pg_stat_activity``:
``wait_event_type = 'Lock'``), so a test can write "B's insert would wait for A; commit A; now
B finishes" and the run is the same every time.

Two kinds of client:

- :class:`Sql`: plain psycopg, its own transaction until :meth:`Sql.commit` — a writer the way
  any other client of the database writes (Django's wrappers do not see it; triggers do);
- :class:`Orm`: a Django connection on its own thread — drains (``counts.drain``) and ORM writes.
  :meth:`Orm.begin` opens a transaction that later calls join, so a drain can be *held* after
  its batch, its work done and not committed, while other clients go on.

Every client belongs to a :class:`Harness`, which closes them all (rolling back what is open)
before the test's teardown flushes the tables.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
from django.db import connection, transaction

import counts
from counts.api import drain_until_empty


class Stuck(Exception):
    """The interleaving could not be driven as written (not an AssertionError on purpose: a
    strict ``xfail(raises=AssertionError)`` must not pass because the harness got stuck)."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise Stuck(message)


#: Seconds a call may run before the harness calls it stuck (neither finished nor waiting).
STEP_TIMEOUT = 15.0
#: Seconds between two looks at ``pg_stat_activity``.
POLL = 0.005


def connect(autocommit: bool = False, dbname: str | None = None) -> psycopg.Connection:
    """A new client of the test database (the one pytest-django created), or of ``dbname``."""
    db = connection.settings_dict
    return psycopg.connect(
        host=db["HOST"] or "127.0.0.1",
        port=db["PORT"] or 5432,
        user=db["USER"],
        password=db["PASSWORD"] or None,
        dbname=dbname or db["NAME"],
        autocommit=autocommit,
    )


class Step:
    """One call handed to a client: it finishes, fails, or waits on a lock for a while."""

    def __init__(self, client: Client, fn: Callable[[], Any]) -> None:
        self.client, self.fn = client, fn
        self.finished = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None
        self.blocked = False  # seen waiting on a lock when start() returned

    def run(self) -> None:
        try:
            self.value = self.fn()
        except BaseException as exc:  # handed to the test by result()
            self.error = exc
        finally:
            self.finished.set()

    def result(self, timeout: float = STEP_TIMEOUT) -> Any:
        """Wait for the call to finish; its return value, or its exception raised here."""
        check(self.finished.wait(timeout), f"{self.client.name}: call still running")
        if self.error is not None:
            raise self.error
        return self.value


class Client:
    """A thread with a database connection of its own, running the calls it is handed in order."""

    def __init__(self, harness: Harness, name: str) -> None:
        self.harness, self.name = harness, name
        self.calls: queue.Queue[Step | None] = queue.Queue()
        self.pid: int | None = None
        ready = Step(self, self.open)
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.calls.put(ready)
        self.thread.start()
        self.pid = ready.result()

    def open(self) -> int:
        """Connect (on the client's own thread); returns the backend pid."""
        raise NotImplementedError

    def shut(self) -> None:
        """Roll back whatever is open and disconnect (on the client's own thread)."""
        raise NotImplementedError

    def _loop(self) -> None:
        try:
            while (step := self.calls.get()) is not None:
                step.run()
        finally:
            with contextlib.suppress(Exception):  # the connection may be gone (terminated)
                self.shut()

    def start(self, fn: Callable[[], Any]) -> Step:
        """Hand ``fn`` over; return once it has finished or its backend waits on a lock."""
        step = Step(self, fn)
        self.calls.put(step)
        deadline = time.monotonic() + STEP_TIMEOUT
        while not step.finished.wait(POLL):
            if self.harness.waiting_on_lock(self.pid):
                step.blocked = True
                return step
            check(time.monotonic() < deadline, f"{self.name}: neither finished nor waiting")
        return step

    def do(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` to completion; a lock wait here is a failure of the test's premise."""
        step = self.start(fn)
        check(not step.blocked, f"{self.name} waited on a lock")
        return step.result()

    def stop(self) -> None:
        self.calls.put(None)


class Sql(Client):
    """A psycopg client: each statement joins its open transaction until commit()."""

    def open(self) -> int:
        self.conn = connect()
        return self.conn.info.backend_pid

    def shut(self) -> None:
        self.conn.close()  # an open transaction is rolled back

    def start_execute(self, sql: str, params=()) -> Step:
        """Run a statement that may wait on a lock; ``.result()`` is its rows, if any."""

        def execute():
            cursor = self.conn.execute(sql, params)
            return cursor.fetchall() if cursor.description else cursor.rowcount

        return self.start(execute)

    def execute(self, sql: str, params=()) -> Any:
        """Run a statement that must not wait; returns its rows (or its row count)."""
        step = self.start_execute(sql, params)
        check(not step.blocked, f"{self.name} waited on a lock: {sql}")
        return step.result()

    def commit(self) -> None:
        self.do(self.conn.commit)

    def rollback(self) -> None:
        self.do(self.conn.rollback)


class Orm(Client):
    """A Django connection on its own thread: drains, ORM writes, held transactions."""

    def open(self) -> int:
        self.atomic = None
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            return cursor.fetchone()[0]

    def shut(self) -> None:
        if self.atomic is not None:
            transaction.set_rollback(True)
            self.atomic.__exit__(None, None, None)
        connection.close()

    def begin(self) -> None:
        """Open a transaction: later calls run in it, uncommitted, until commit()."""

        def enter():
            check(self.atomic is None, "already in a transaction")
            self.atomic = transaction.atomic()
            self.atomic.__enter__()

        self.do(enter)

    def commit(self) -> None:
        self.start(self._leave).result()  # commit may wait, e.g. on a deferred constraint

    def _leave(self) -> None:
        atomic, self.atomic = self.atomic, None
        atomic.__exit__(None, None, None)

    def start_drain(self, batch_size: int = 1, max_ids: int = 1) -> Step:
        """One ``counts.drain`` batch; ``.result()`` is its DrainResult."""
        return self.start(lambda: counts.drain(batch_size=batch_size, max_ids=max_ids))

    def drain(self, batch_size: int = 1, max_ids: int = 1):
        return self.do(lambda: counts.drain(batch_size=batch_size, max_ids=max_ids))


class Harness:
    """Creates clients, watches their backends, and closes them all at the end of a test."""

    def __init__(self) -> None:
        self.monitor = connect(autocommit=True)  # each look is its own, fresh snapshot
        self.clients: list[Client] = []

    def sql(self, name: str) -> Sql:
        client = Sql(self, name)
        self.clients.append(client)
        return client

    def orm(self, name: str) -> Orm:
        client = Orm(self, name)
        self.clients.append(client)
        return client

    def waiting_on_lock(self, pid: int | None) -> bool:
        row = self.monitor.execute(
            "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", [pid]
        ).fetchone()
        return bool(row) and row[0] == "Lock"

    def close(self) -> None:
        """Roll back and disconnect every client; kill a backend that will not let go."""
        for client in self.clients:
            client.stop()
        for client in self.clients:
            client.thread.join(5)
            if client.thread.is_alive():  # stuck behind a lock nobody will release
                self.monitor.execute("SELECT pg_terminate_backend(%s)", [client.pid])
                client.thread.join(5)
        self.monitor.close()


def drain_to_empty(timeout: float = 20.0) -> None:
    """Drain on this connection until no mark is left, deferred ones included: at the end of a
    test, once every client has committed or rolled back (a row still held stays deferred).

    A drain that finds a row held elsewhere may mark it again "due a little later"; a test that
    has released every lock makes such marks due now rather than sleeping, when the queue has a
    ``not_before`` column, and otherwise waits for them.
    """
    deadline = time.monotonic() + timeout
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema ="
            " current_schema() AND table_name = 'counts_dirtymark' AND column_name = 'not_before')"
        )
        (has_due_time,) = cursor.fetchone()
    while True:
        drain_until_empty()
        check(time.monotonic() < deadline, "drain() never found the queue empty")
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM counts_dirtymark")
            if cursor.fetchone()[0] == 0:
                return
            if has_due_time:
                cursor.execute("UPDATE counts_dirtymark SET not_before = NULL")
            else:
                time.sleep(0.05)
        check(time.monotonic() < deadline, "marks stayed in the queue")
