"""Adding amounts to target rows (``counts.run.applying``): each amount lands once, in the row or
back in the queue.

The amounts here are the drift a write with triggers off leaves (truth minus stored, read from
``tests.truth``), so a correct apply ends in exact counts and a wrong one shows as a count off by
the amount. What is pinned: amounts land on the rows and columns they name and nowhere else,
stamping ``counts_updated_at``; a row another connection holds is skipped, never waited for, and
its amount goes back to the queue as a delta mark due later (invariant I holds meanwhile); several
models are written by one statement.
"""

from __future__ import annotations

import datetime

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from counts.apps import graph
from counts.base.mark import Kind, kind_of
from counts.run import aggregate, applying
from counts.run.engine_transaction import engine_transaction
from counts.run.marks import LOCKED_RETRY_MS
from project.monitoring.models import Deployment, Event, SourceImage
from tests.invariants import assert_invariants
from tests.truth import assert_all_counts_exact, cached, drain_all, triggers_off, truth

D, E = "monitoring.deployment", "monitoring.event"
LONG_AGO = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)
#: A wait here would be a bug: it fails after this long instead of hanging the run.
NO_WAIT_MS = 2000


def statement(label: str):
    return aggregate.compile_recompute(graph(), label)


def owed(table: str) -> dict[tuple[str, int], int]:
    """``{(column, id): truth - stored}`` for every value of ``table`` that is off."""
    want, have = truth(table), cached(table)
    return {
        (column, pk): value - have[pk][column]
        for pk, row in want.items()
        for column, value in row.items()
        if value != have[pk][column]
    }


def fresh(model) -> dict[int, datetime.datetime | None]:
    return dict(model.objects.values_list("pk", "counts_updated_at"))


def drift(world) -> None:
    """Rows written with triggers off, so nothing is marked: d1 gains two nights, d2 a capture
    with no night (only deployment columns change; events stay exact)."""
    with triggers_off() as cursor:
        cursor.execute("UPDATE monitoring_deployment SET counts_updated_at = %s", [LONG_AGO])
        for hours in (1, 2):
            start = world.e1.start + datetime.timedelta(days=7, hours=hours)
            Event.objects.create(deployment=world.d1, start=start)
        SourceImage.objects.create(
            deployment=world.d2, event=None, timestamp=world.i4.timestamp, path="b/drift.jpg"
        )


def test_amounts_land_on_the_rows_and_columns_they_name_and_stamp_them(world, marks):
    drift(world)
    amounts = owed("monitoring_deployment")
    # Two columns, each on a different row: misaligned arrays would cross them over.
    assert amounts == {("events_count", world.d1.pk): 2, ("captures_count", world.d2.pk): 1}
    with engine_transaction() as cursor:
        written = applying.lock_and_apply(cursor, statement(D), amounts)
    assert written == {world.d1.pk, world.d2.pk}
    stamps = fresh(Deployment)
    assert stamps.pop(world.d1.pk) > LONG_AGO and stamps.pop(world.d2.pk) > LONG_AGO
    assert set(stamps.values()) == {LONG_AGO}, "a row with no amount was written"
    assert_all_counts_exact()
    assert_invariants()


def test_zero_amounts_and_rows_gone_write_nothing(world, marks):
    drift(world)
    before, stamps = cached("monitoring_deployment"), fresh(Deployment)
    gone = Deployment.objects.order_by("-pk").values_list("pk", flat=True)[0] + 1000
    with engine_transaction() as cursor, CaptureQueriesContext(connection) as queries:
        zero = applying.lock_and_apply(cursor, statement(D), {("events_count", world.d1.pk): 0})
        assert len(queries) == 0, "a batch of zeros costs no statement"
        missing = applying.lock_and_apply(cursor, statement(D), {("events_count", gone): 5})
        assert applying.lock_and_apply_all(cursor, []) == {}
    assert zero == set() and missing == set()
    assert cached("monitoring_deployment") == before and fresh(Deployment) == stamps


def test_rows_this_transaction_already_holds_are_written(world, marks):
    """A drain recounting rows beside adding amounts locked them itself first."""
    drift(world)
    amounts = owed("monitoring_deployment")
    with engine_transaction() as cursor:
        ids = sorted({pk for _column, pk in amounts})
        assert aggregate.lock(cursor, statement(D), ids) == ids
        assert applying.lock_and_apply(cursor, statement(D), amounts) == set(ids)
    assert_all_counts_exact()


def test_defer_credits_queues_one_delta_mark_per_column_that_a_drain_applies(world, marks):
    drift(world)
    amounts = owed("monitoring_deployment")
    with engine_transaction() as cursor:
        applying.defer_credits(cursor, D, {**amounts, ("events_count", world.d3.pk): 0}, 0)
    with connection.cursor() as cursor:
        cursor.execute("SELECT target, ids, field, deltas FROM counts_dirtymark ORDER BY field")
        rows = cursor.fetchall()
    assert rows == [
        (D, [world.d2.pk], "captures_count", [1]),
        (D, [world.d1.pk], "events_count", [2]),  # the zero for d3 is left out
    ]
    assert {kind_of(*row) for row in rows} == {Kind.DELTA}
    assert_invariants()  # stored + pending = truth: I holds with the amounts queued
    drain_all()
    assert marks.rows() == []
    assert_all_counts_exact()


def hold(harness, table: str, pk: int):
    """Another client holding ``pk``, the way an open admin transaction would."""
    holder = harness.sql(f"holder of {table}#{pk}")
    holder.execute(f"UPDATE {table} SET updated_at = now() WHERE id = %s", [pk])
    return holder


def due_in_seconds(cursor) -> list[float]:
    cursor.execute(
        "SELECT extract(epoch FROM not_before - now())::float8 FROM counts_dirtymark ORDER BY id"
    )
    return [row[0] for row in cursor.fetchall()]


@pytest.mark.django_db(transaction=True)
def test_a_held_row_is_skipped_and_its_amount_deferred_until_drained_later(world, marks, harness):
    drift(world)
    amounts = owed("monitoring_deployment")
    stored_d2 = cached("monitoring_deployment")[world.d2.pk]
    holder = hold(harness, "monitoring_deployment", world.d2.pk)
    with engine_transaction(lock_timeout_ms=NO_WAIT_MS) as cursor:
        written = applying.lock_and_apply(cursor, statement(D), amounts)
        assert written == {world.d1.pk}, "the held row is left out, not waited for"
        held = aggregate.held_elsewhere(cursor, statement(D), [world.d1.pk, world.d2.pk], written)
        assert held == [world.d2.pk]
        applying.defer_credits(cursor, D, {k: v for k, v in amounts.items() if k[1] in held})
        assert due_in_seconds(cursor) == [LOCKED_RETRY_MS / 1000]
    assert cached("monitoring_deployment")[world.d2.pk] == stored_d2
    assert_invariants()  # d2's amount is in the queue, once
    holder.rollback()
    drain_all()  # waits for the deferred mark to come due
    assert marks.rows() == []
    assert_all_counts_exact()


@pytest.mark.django_db(transaction=True)
def test_lock_and_apply_all_writes_several_models_in_one_statement(world, marks, harness):
    """Each model's free rows are written in the one statement; a row held in one model
    neither blocks nor loses the others."""
    drift(world)
    with triggers_off():  # a capture on d1 / e1 and one on d3 / no night: both models drift
        for deployment, event in ((world.d1, world.e1), (world.d3, None)):
            SourceImage.objects.create(
                deployment=deployment, event=event, timestamp=world.i1.timestamp, path="x.jpg"
            )
    deployments, events = owed("monitoring_deployment"), owed("monitoring_event")
    assert set(events) == {("captures_count", world.e1.pk)}
    holder = hold(harness, "monitoring_event", world.e1.pk)
    with engine_transaction(lock_timeout_ms=NO_WAIT_MS) as cursor:
        batches = [(statement(D), deployments), (statement(E), events)]
        with CaptureQueriesContext(connection) as queries:
            written = applying.lock_and_apply_all(cursor, batches)
        assert len(queries) == 1
        assert written == {D: {world.d1.pk, world.d2.pk, world.d3.pk}, E: set()}
        applying.defer_credits(cursor, E, events)
    assert cached("monitoring_deployment") == truth("monitoring_deployment")
    assert_invariants()
    holder.rollback()
    drain_all()
    assert_all_counts_exact()
