"""Installing count triggers never queues the application, and never half-applies.

``SyncCountTriggers`` locks its tables up front under a short ``lock_timeout`` and, when a
long transaction holds one of them, rolls back and tries again later. Here real sessions hold
those tables: a reader (an open transaction that read ``monitoring_detection``), a writer, and
a third client whose every statement must finish within about the lock timeout while the
migration waits. Timeouts are a few hundred milliseconds (settings override).
"""

from __future__ import annotations

import functools
import logging
import threading
import time

import pytest
from django.core.management import call_command
from django.db import connection, connections, transaction
from django.db.migrations import Migration, RunPython
from django.db.migrations.executor import MigrationExecutor
from django.db.migrations.loader import MigrationLoader
from django.db.migrations.recorder import MigrationRecorder
from django.db.migrations.state import ProjectState

from counts.compile.compiled import CompiledTrigger
from counts.management.migrations_writer import installed_after
from counts.operations import LockNotGranted, SyncCountTriggers
from tests.interleave import connect

TABLE = "monitoring_detection"
TIMEOUT_MS = 300
#: A statement of the third client may take this long at most (3x the lock timeout).
PATIENCE_S = 3 * TIMEOUT_MS / 1000
#: A trigger no declaration compiles to, on TABLE: dropping it needs ACCESS EXCLUSIVE.
STRAY = "counts_ins_test_stray_detection"

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def short_lock_timeout(settings):
    settings.COUNTS_TRIGGER_LOCK_TIMEOUT_MS = TIMEOUT_MS
    settings.COUNTS_TRIGGER_LOCK_ATTEMPTS = 40
    settings.COUNTS_TRIGGER_LOCK_BACKOFF_MS = 50


@pytest.fixture(autouse=True)
def exactly_the_wanted_triggers_after():
    """Whatever a test did, leave the declared triggers installed and no stray one."""
    yield
    with connection.schema_editor(atomic=False) as editor:
        SyncCountTriggers._apply(editor, current(), [stray()])
    assert installed() == wanted()


@functools.cache
def _migrated() -> tuple[dict, ...]:
    loader = MigrationLoader(None, ignore_no_migrations=True)
    return tuple(row for _app, row in installed_after(loader).triggers.values())


def current() -> list[dict]:
    """The triggers the migrations install (what the test database has, as ``migrate`` left
    it; the same as the declarations compile to whenever no trigger migration is due)."""
    return [dict(row) for row in _migrated()]


def wanted() -> dict[tuple[str, str], str]:
    """``{(table, trigger): hash}`` of :func:`current`: what ``counts status`` compares."""
    triggers = (CompiledTrigger(**row) for row in current())
    return {(t.table, t.name): t.hash for t in triggers}


def stray() -> dict:
    """A copy of TABLE's insert trigger under another name."""
    (model,) = [r for r in current() if (r["table"], r["operation"]) == (TABLE, "insert")]
    sql = model["sql"].replace(model["name"], STRAY)
    return CompiledTrigger(STRAY, TABLE, "insert", sql).as_dict()


def with_stray() -> dict[tuple[str, str], str]:
    return {**wanted(), (TABLE, STRAY): CompiledTrigger(**stray()).hash}


def installed() -> dict[tuple[str, str], str]:
    """``{(table, trigger): hash in its comment}`` of every count trigger in the database."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.relname, t.tgname, obj_description(t.oid, 'pg_trigger')"
            " FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
            " WHERE t.tgname LIKE 'counts\\_%%' AND NOT t.tgisinternal"
        )
        return {(table, name): comment for table, name, comment in cursor.fetchall()}


def apply(operation: SyncCountTriggers) -> None:
    """Apply forwards as ``migrate`` does in a non-atomic migration (no transaction around)."""
    with connection.schema_editor(atomic=False) as editor:
        operation.database_forwards("monitoring", editor, None, None)


class InBackground:
    """Apply an operation on a thread (and a Django connection) of its own."""

    def __init__(self, operation: SyncCountTriggers) -> None:
        self.error: BaseException | None = None
        self.finished = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(operation,), daemon=True)
        self.started = time.monotonic()
        self.thread.start()

    def _run(self, operation) -> None:
        try:
            apply(operation)
        except BaseException as exc:  # handed to the test by wait()
            self.error = exc
        finally:
            self.seconds = time.monotonic() - self.started
            connections.close_all()
            self.finished.set()

    def wait(self, timeout: float = 30) -> float:
        self.thread.join(timeout)
        assert self.finished.is_set(), "the install never finished"
        if self.error:
            raise self.error
        return self.seconds


def other_client():
    """The third client; a statement that would queue for good fails instead of hanging."""
    conn = connect(autocommit=True)
    conn.execute(f"SET statement_timeout = '{10 * TIMEOUT_MS}ms'")
    return conn


def lock_waiters(conn) -> int:
    return conn.execute(
        "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = %s::regclass", [TABLE]
    ).fetchone()[0]


def until(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.005)


def timed(conn, sql: str) -> float:
    started = time.monotonic()
    conn.execute(sql)
    return time.monotonic() - started


def hammer(conn, statements: list[str], seconds: float) -> float:
    """Run ``statements`` over and over for ``seconds``; the longest one took this long."""
    longest, deadline = 0.0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        for sql in statements:
            longest = max(longest, timed(conn, sql))
    return longest


SELECT = f"SELECT count(*) FROM {TABLE}"
#: An INSERT of no row still takes the table's ROW EXCLUSIVE lock, and fires the triggers.
INSERT = f"INSERT INTO {TABLE} SELECT * FROM {TABLE} WHERE false"


def test_a_long_reader_does_not_hold_up_installing_triggers(caplog):
    """``CREATE OR REPLACE TRIGGER`` takes SHARE ROW EXCLUSIVE, which readers never block."""
    reader = connect()
    try:
        reader.execute(f"SELECT 1 FROM {TABLE} LIMIT 1")  # its transaction stays open
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="counts.operations"):
            apply(SyncCountTriggers(triggers=current()))
        assert not caplog.records  # no retry was needed
        assert time.monotonic() - started < PATIENCE_S
        assert reader.info.transaction_status.name == "INTRANS"
    finally:
        reader.close()
    assert installed() == wanted()


def test_a_drop_behind_a_long_reader_retries_and_never_queues_other_clients(caplog):
    """Dropping a trigger needs ACCESS EXCLUSIVE, which waits for the reader and makes every
    later client wait behind it: only for the lock timeout, then the step rolls back and
    tries again, until the reader is done."""
    apply(SyncCountTriggers(triggers=[stray()]))
    assert (TABLE, STRAY) in installed()
    reader, third = connect(), other_client()
    try:
        reader.execute(f"SELECT 1 FROM {TABLE} LIMIT 1")
        with caplog.at_level(logging.WARNING, logger="counts.operations"):
            install = InBackground(SyncCountTriggers(triggers=current(), previous=[stray()]))
            until(lambda: lock_waiters(third) > 0)
            # Over several tries, no SELECT or INSERT of another client waits much longer than
            # one lock timeout (without one, each would wait as long as the reader lasts).
            longest = hammer(third, [SELECT, INSERT], seconds=4 * TIMEOUT_MS / 1000)
            assert longest < PATIENCE_S, f"a client waited {longest:.2f} s"
            assert not install.finished.is_set()
            assert (TABLE, STRAY) in installed()  # nothing changed while it could not lock
            reader.commit()
            install.wait()
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warnings, "no retry was logged"
        assert f"ACCESS EXCLUSIVE on {TABLE}" in warnings[0]
        reader_pid = reader.info.backend_pid
        assert f"pid {reader_pid} holds AccessShareLock on {TABLE}" in warnings[0], warnings[0]
    finally:
        reader.close()
        third.close()
    assert installed() == wanted()


def test_an_install_behind_a_long_writer_retries_and_readers_never_wait(caplog):
    """A writer holds ROW EXCLUSIVE, which SHARE ROW EXCLUSIVE waits for: readers go on
    untouched, writers wait at most about one lock timeout, and the install completes, all of
    it at once, once the writer commits."""
    writer, third = connect(), other_client()
    try:
        writer.execute(f"UPDATE {TABLE} SET id = id WHERE false")  # ROW EXCLUSIVE, held
        with caplog.at_level(logging.WARNING, logger="counts.operations"):
            install = InBackground(SyncCountTriggers(triggers=current()))
            until(lambda: lock_waiters(third) > 0)
            assert hammer(third, [SELECT], seconds=2 * TIMEOUT_MS / 1000) < TIMEOUT_MS / 2000
            longest = hammer(third, [INSERT], seconds=4 * TIMEOUT_MS / 1000)
            assert longest < PATIENCE_S, f"a writer waited {longest:.2f} s"
            assert not install.finished.is_set()
            writer.commit()
            install.wait()
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warnings and f"SHARE ROW EXCLUSIVE on {TABLE}" in warnings[0]
        assert f"pid {writer.info.backend_pid} holds RowExclusiveLock" in warnings[0]
    finally:
        writer.close()
        third.close()
    assert installed() == wanted()


def test_giving_up_changes_nothing_and_says_who_holds_the_table(settings):
    """After the last try, the error names the table and the session; no trigger changed."""
    settings.COUNTS_TRIGGER_LOCK_ATTEMPTS = 2
    apply(SyncCountTriggers(triggers=[stray()]))
    changed = [{**row, "sql": row["sql"] + "\n-- changed"} for row in current()]
    reader = connect()
    try:
        reader.execute(f"SELECT 1 FROM {TABLE} LIMIT 1")
        # Replaces every trigger (SHARE ROW EXCLUSIVE) and drops the stray (ACCESS EXCLUSIVE):
        # the drop waits, so none of the replacements may stay.
        operation = SyncCountTriggers(triggers=changed, previous=[*current(), stray()])
        with pytest.raises(LockNotGranted) as failed:
            apply(operation)
        assert f"ACCESS EXCLUSIVE on {TABLE}" in str(failed.value)
        assert f"pid {reader.info.backend_pid}" in str(failed.value)
    finally:
        reader.close()
    assert installed() == with_stray()  # not one replaced, none dropped


def test_inside_a_transaction_it_tries_once_in_a_savepoint_and_restores_lock_timeout():
    """An atomic migration: no retry (its transaction's locks would be held meanwhile); the
    error rolls the savepoint back, and the transaction's own lock_timeout is left as it was."""
    writer = connect()
    try:
        writer.execute(f"UPDATE {TABLE} SET id = id WHERE false")
        with transaction.atomic():
            connection.cursor().execute("SET LOCAL lock_timeout = '7s'")
            started = time.monotonic()
            with pytest.raises(LockNotGranted) as failed, connection.schema_editor() as editor:
                SyncCountTriggers(triggers=[stray()]).database_forwards(
                    "monitoring", editor, None, None
                )
            assert time.monotonic() - started < 3 * TIMEOUT_MS / 1000  # one try only
            assert "inside a transaction" in str(failed.value)
            assert (TABLE, STRAY) not in installed()
            writer.commit()
            with connection.schema_editor() as editor:
                SyncCountTriggers(triggers=[stray()]).database_forwards(
                    "monitoring", editor, None, None
                )
            assert (TABLE, STRAY) in installed()
            with connection.cursor() as cursor:
                cursor.execute("SHOW lock_timeout")
                assert cursor.fetchone()[0] == "7s"
    finally:
        writer.close()


def test_installing_and_dropping_again_succeeds():
    """Idempotent: a trigger already there with the same definition, one already gone, and
    one whose table is gone."""
    apply(SyncCountTriggers(triggers=current()))
    apply(SyncCountTriggers(triggers=current()))
    apply(SyncCountTriggers(triggers=[stray()]))
    apply(SyncCountTriggers(triggers=[stray()]))
    assert installed() == with_stray()
    drop = SyncCountTriggers(triggers=[], previous=[stray()])
    apply(drop)
    apply(drop)
    gone_table = {**stray(), "table": "counts_no_such_table"}
    apply(SyncCountTriggers(triggers=[], previous=[gone_table]))
    assert installed() == wanted()


def test_migrate_again_after_a_later_operation_failed_completes():
    """A non-atomic migration commits its trigger step, then its backfill raises: the
    migration is not recorded, so the next ``migrate`` applies the trigger step again."""
    failures = [RuntimeError("backfill failed")]

    def backfill(apps, schema_editor):
        if failures:
            raise failures.pop()

    migration = type(
        "Migration",
        (Migration,),
        {
            "atomic": False,
            "operations": [
                SyncCountTriggers(triggers=[stray()]),
                RunPython(backfill, RunPython.noop),
            ],
        },
    )("0001_count_triggers", "counts_install_test")
    executor = MigrationExecutor(connection)
    try:
        with pytest.raises(RuntimeError, match="backfill failed"):
            executor.apply_migration(ProjectState(), migration)
        assert (TABLE, STRAY) in installed()
        assert ("counts_install_test", "0001_count_triggers") not in (
            executor.recorder.applied_migrations()
        )
        executor.apply_migration(ProjectState(), migration)
        assert ("counts_install_test", "0001_count_triggers") in (
            executor.recorder.applied_migrations()
        )
        assert installed() == with_stray()
    finally:
        MigrationRecorder(connection).record_unapplied("counts_install_test", "0001_count_triggers")


def test_sqlmigrate_shows_the_locks_and_the_timeout(capsys):
    call_command("sqlmigrate", "monitoring", "0007")
    out = capsys.readouterr().out
    assert "SET LOCAL lock_timeout = '300ms';" in out
    assert 'LOCK TABLE "monitoring_deployment" IN SHARE ROW EXCLUSIVE MODE;' in out
    assert "CREATE OR REPLACE TRIGGER" in out and "DROP TRIGGER" not in out
    assert out.index("BEGIN;") < out.index("SET LOCAL") < out.index("COMMIT;")


def test_an_early_backfill_marks_its_rows_when_a_later_migration_creates_an_item_table():
    """Replaying the migrations from scratch: the test app's second migration backfills the
    shelves' counts while today's declarations also count blurbs through jackets, whose tables
    a much later migration creates. The rows are marked for a later recompute; the kind whose
    table does not exist yet has nothing to mark (it failed with "relation does not exist",
    which stopped every fresh ``migrate``)."""
    from counts.models import DirtyMark
    from counts.operations import BackfillCounts
    from tests.engine_app.models import Book, Jacket
    from tests.engine_app.world import build_library

    at = MigrationLoader(connection).project_state(("counts_testapp", "0002_count_triggers"))
    assert "counts_testapp_jacket" not in {m._meta.db_table for m in at.apps.get_models()}
    # The test database has every table: a jacket here is one the code must not go looking
    # for at this point of the replay (on a real replay, its table is not there yet).
    build_library()
    Jacket.objects.create(book=Book.objects.first())
    DirtyMark.objects.all().delete()
    with connection.schema_editor(atomic=False) as editor:
        BackfillCounts(["counts_testapp.shelf"]).database_forwards("counts_testapp", editor, at, at)
    marked = set(DirtyMark.objects.values_list("target", flat=True))
    assert "counts_testapp.shelf" in marked  # every row, for the later backfill or the workers
    assert "item:counts_testapp.jacket" not in marked
    DirtyMark.objects.all().delete()


def mark_id_default() -> str | None:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_get_expr(d.adbin, d.adrelid) FROM pg_attrdef d"
            " JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum"
            " WHERE d.adrelid = 'counts_dirtymark'::regclass AND a.attname = 'id'"
        )
        row = cursor.fetchone()
    return row and row[0]


def new_mark_id() -> int:
    """Insert a mark as a trigger does (the id left to the column) and return its id."""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO counts_dirtymark (target) VALUES ('test.migration') RETURNING id"
        )
        (mark,) = cursor.fetchone()
        cursor.execute("DELETE FROM counts_dirtymark WHERE id = %s", [mark])
    return mark


def test_the_mark_id_migration_waits_behind_a_reader_of_the_queue_and_goes_both_ways(
    settings, caplog
):
    """``counts`` 0006 alters the table every write inserts into: behind a long reader it
    retries and gives up naming the reader, changing nothing (writers never queue behind
    it); once the reader is gone it applies, backwards and forwards, ids ever rising."""
    settings.COUNTS_TRIGGER_LOCK_ATTEMPTS = 2
    assert mark_id_default() == "counts_mark_id()"
    before = new_mark_id()
    reader = connect()
    try:
        reader.execute("SELECT count(*) FROM counts_dirtymark")
        with pytest.raises(LockNotGranted) as failed, caplog.at_level(logging.WARNING):
            call_command("migrate", "counts", "0005_ledger_fillfactor", verbosity=0)
        assert f"pid {reader.info.backend_pid} holds AccessShareLock" in str(failed.value)
        assert "changing counts_dirtymark" in caplog.text  # the first try, retried
        assert mark_id_default() == "counts_mark_id()"  # nothing changed
    finally:
        reader.close()
    try:
        call_command("migrate", "counts", "0005_ledger_fillfactor", verbosity=0)
        assert mark_id_default() is None  # an identity column again
        after_back = new_mark_id()
        assert after_back > before
    finally:
        call_command("migrate", "counts", verbosity=0)
    assert mark_id_default() == "counts_mark_id()"
    assert new_mark_id() > after_back
