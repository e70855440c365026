"""``counts.run.item_locks``: which ledger rows a drain gets, and when it waits for them.

A drain must hold an item's ledger row before it reads the item's truth (invariant I rests on
it, ``counts.run.items``), yet one busy item must never stall a batch: existing rows are taken
``SKIP LOCKED`` and the rest come back to the caller as held; a new item gets an empty row
inserted, so there is one to lock; the only waits (``wait=True``, or the insert meeting
another transaction's new row) come in ``(kind, id)`` order, which is what keeps drains from
waiting on each other in a cycle (docs/engine.md §3.2-3.3). Other transactions are real
connections (``tests.interleave``): a call that waits shows in ``pg_stat_activity``, and whom
it waits for in ``pg_blocking_pids``, which is how the lock order is observed here.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict

import pytest
from django.db import connection, transaction

from counts.apps import graph
from counts.base.mark import Mark
from counts.run import applying, item_locks, items
from counts.run.engine_transaction import engine_transaction
from project.monitoring.models import Detection, SourceImage
from tests import truth
from tests.interleave import drain_to_empty

pytestmark = pytest.mark.django_db(transaction=True)  # other connections see the world

CAPTURES, OCCURRENCES = "item:monitoring.sourceimage", "item:monitoring.occurrence"


def kind():
    return graph().kinds[CAPTURES]


def lock(ids: list[int], wait: bool = False) -> list[int]:
    """``lock_items`` in an engine transaction (a savepoint of the caller's, which keeps the
    locks until the caller's transaction ends)."""
    with engine_transaction() as cursor:
        return item_locks.lock_items(cursor, kind(), ids, wait=wait)


def drain_items(ids: list[int]) -> list[int]:
    """A drain's item step: lock, recompute, queue the credits as delta marks."""
    credits: dict = defaultdict(int)
    with engine_transaction() as cursor:
        locked = item_locks.lock_items(cursor, kind(), ids)
        items.recompute(cursor, kind(), ids, credits, locked)
        for (label, column, target), amount in credits.items():
            applying.defer_credits(cursor, label, {(column, target): amount}, retry_ms=0)
    return locked


def hold(client, ids: list[int]) -> None:
    """Another engine transaction holding these items' ledger rows."""
    rows = client.execute(
        "SELECT item_id FROM counts_ledger WHERE kind = %s AND item_id = ANY(%s) FOR UPDATE",
        [CAPTURES, ids],
    )
    assert sorted(r[0] for r in rows) == sorted(ids)


def rollback(client) -> None:
    """End an ``Orm`` client's open transaction, undoing it."""
    client.do(lambda: transaction.set_rollback(True))
    client.commit()


def ledger_rows(ids: list[int], name: str = CAPTURES) -> dict[int, object]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT item_id, state::text FROM counts_ledger WHERE kind = %s AND item_id = ANY(%s)",
            [name, ids],
        )
        return dict(cursor.fetchall())


def blockers(harness, client, expected: list[int], timeout: float = 5.0) -> list[int]:
    """The pids ``client``'s backend waits for, once they are ``expected`` (or at timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        (pids,) = harness.monitor.execute("SELECT pg_blocking_pids(%s)", [client.pid]).fetchone()
        if sorted(pids) == sorted(expected) or time.monotonic() > deadline:
            return pids
        time.sleep(0.01)


def settle() -> None:
    truth.settle(drain=drain_to_empty)


def test_held_items_are_skipped_without_waiting_and_new_ones_get_a_row(world, harness):
    """i1 is held elsewhere; i2, i4 have ledgers; i3 has none (no detection): the locker gets
    i2, i3, i4 at once, each once, in order, and i3's empty row exists only for it."""
    other = harness.sql("other drain")
    hold(other, [world.i1.pk])
    locker = harness.orm("drain")
    locker.begin()
    wanted = [world.i4.pk, world.i1.pk, world.i3.pk, world.i2.pk, world.i4.pk]
    step = locker.start(lambda: lock(wanted))
    assert not step.blocked
    assert step.result() == [world.i2.pk, world.i3.pk, world.i4.pk]
    assert locker.do(lambda: ledger_rows([world.i3.pk])) == {world.i3.pk: "{}"}
    assert ledger_rows([world.i3.pk]) == {}  # nobody else sees it
    rollback(locker)
    other.rollback()
    assert ledger_rows([world.i3.pk]) == {}
    settle()


def test_with_wait_it_waits_for_the_holder_and_then_gets_every_item(world, harness):
    other = harness.sql("other drain")
    hold(other, [world.i1.pk])
    locker = harness.orm("drain")
    locker.begin()
    step = locker.start(lambda: lock([world.i1.pk, world.i2.pk], wait=True))
    assert step.blocked
    assert blockers(harness, locker, [other.pid]) == [other.pid]
    other.commit()
    assert step.result() == [world.i1.pk, world.i2.pk]
    rollback(locker)
    settle()


@pytest.mark.parametrize("first", ["writes-nothing", "writes-a-ledger"])
def test_two_drains_meeting_on_a_new_item(world, harness, first):
    """Drain A inserted i3's row and holds it; drain B's insert of the same key waits for A
    (the one wait on a ledger row). If A's recompute leaves no ledger, B gets i3 once A ends;
    if A commits a ledger, B's statement did not see that row, so it did not lock it: i3 must
    not be in what B got (B would recompute it without the lock)."""
    if first == "writes-a-ledger":
        Detection.objects.create(source_image=world.i3, bbox=[1, 2, 3, 4])
    a, b = harness.orm("drain A"), harness.orm("drain B")
    a.begin()
    assert a.do(lambda: drain_items([world.i3.pk])) == [world.i3.pk]
    b.begin()
    step = b.start(lambda: lock([world.i2.pk, world.i3.pk]))
    assert step.blocked and blockers(harness, b, [a.pid]) == [a.pid]
    a.commit()
    got = step.result()
    assert got == ([world.i2.pk, world.i3.pk] if first == "writes-nothing" else [world.i2.pk])
    rollback(b)
    assert list(ledger_rows([world.i3.pk])) == ([] if first == "writes-nothing" else [world.i3.pk])
    settle()


@pytest.mark.parametrize("rows", ["existing", "new"])
def test_items_are_locked_in_id_order(world, harness, rows):
    """Two other transactions hold the lower and the higher id; the locker, asked for them in
    the other order, first waits for the holder of the lower id, and only once that one ends
    for the holder of the higher (``pg_blocking_pids``). Existing rows: ``wait=True`` on
    ``FOR UPDATE``; new items: the insert meeting the others' uncommitted rows (no ``wait``)."""
    if rows == "existing":
        lo, hi = world.i1.pk, world.i4.pk
    else:
        extra = SourceImage.objects.create(
            deployment=world.d1, event=world.e2, timestamp=world.i3.timestamp, path="a/9.jpg"
        )
        lo, hi = world.i3.pk, extra.pk
        assert ledger_rows([lo, hi]) == {}
    first, second = harness.sql("holds lower"), harness.sql("holds higher")
    for client, item in ((first, lo), (second, hi)):
        if rows == "existing":
            hold(client, [item])
        else:
            client.execute(
                "INSERT INTO counts_ledger (kind, item_id, state) VALUES (%s, %s, '{}')",
                [CAPTURES, item],
            )
    locker = harness.orm("drain")
    locker.begin()
    step = locker.start(lambda: lock([hi, lo], wait=rows == "existing"))
    assert step.blocked
    assert blockers(harness, locker, [first.pid]) == [first.pid]
    first.rollback()
    assert blockers(harness, locker, [second.pid]) == [second.pid]
    second.rollback()
    assert step.result() == [lo, hi]
    rollback(locker)
    settle()


def locked_by_take(marks_sql: str) -> str | None:
    """``lock_marked_sql`` over the relation ``marks_sql``: its ``{kind: ids}`` as text."""
    ctes, locked = item_locks.lock_marked_sql("taken")
    with engine_transaction() as cursor:
        cursor.execute(
            f"WITH taken AS ({marks_sql}), {ctes} SELECT ({locked})::text", [sorted(graph().kinds)]
        )
        return cursor.fetchone()[0]


def test_the_take_locks_what_its_item_marks_name_unless_it_took_a_job(world, harness):
    other = harness.sql("other drain")
    hold(other, [world.i1.pk])
    with connection.cursor() as cursor:
        Mark.item(CAPTURES, [world.i1.pk, world.i3.pk]).insert(cursor)
        Mark.item(CAPTURES, [world.i2.pk]).insert(cursor)
    marks_sql = "SELECT target, field, ids FROM counts_dirtymark"
    drain = harness.orm("drain")
    drain.begin()
    got = drain.do(lambda: locked_by_take(marks_sql))
    assert json.loads(got) == {CAPTURES: [world.i2.pk, world.i3.pk]}
    rollback(drain)
    # With a job mark among them, nothing is locked or inserted: the job's items are locked
    # with these, in one ordered pass, once it is expanded.
    with_job = f"{marks_sql} UNION ALL SELECT '{OCCURRENCES}', 'job:x', ARRAY[1]"
    drain.begin()
    assert drain.do(lambda: locked_by_take(with_job)) is None
    assert drain.do(lambda: ledger_rows([world.i3.pk])) == {}
    rollback(drain)
    other.rollback()
    settle()


def test_the_take_inserts_new_items_of_several_kinds_in_kind_order(world, harness):
    """One take names two new items, a capture (i3) and an occurrence (o3, unscored: no
    ledger), whose keys two other drains are inserting: it waits for the occurrence's first
    (``(kind, id)`` order, kinds compared as ``COLLATE "C"``), then for the capture's."""
    assert ledger_rows([world.i3.pk]) == {} and ledger_rows([world.o3.pk], OCCURRENCES) == {}
    inserting = {}
    for name, item in ((CAPTURES, world.i3.pk), (OCCURRENCES, world.o3.pk)):
        inserting[name] = harness.sql(f"inserting {name}")
        inserting[name].execute(
            "INSERT INTO counts_ledger (kind, item_id, state) VALUES (%s, %s, '{}')", [name, item]
        )
    with connection.cursor() as cursor:
        Mark.item(CAPTURES, [world.i3.pk]).insert(cursor)
        Mark.item(OCCURRENCES, [world.o3.pk]).insert(cursor)
    drain = harness.orm("drain")
    drain.begin()
    step = drain.start(lambda: locked_by_take("SELECT target, field, ids FROM counts_dirtymark"))
    assert step.blocked
    occurrences, captures = inserting[OCCURRENCES], inserting[CAPTURES]
    assert blockers(harness, drain, [occurrences.pid]) == [occurrences.pid]
    occurrences.rollback()
    assert blockers(harness, drain, [captures.pid]) == [captures.pid]
    captures.rollback()
    assert json.loads(step.result()) == {CAPTURES: [world.i3.pk], OCCURRENCES: [world.o3.pk]}
    rollback(drain)
    settle()
