"""``counts.run.item_backfill.mark_every_item``: every item of a kind marked, in bounded marks.

What a drain makes of an "every item" mark (a TRUNCATE of a table on the way to a setting, a
lapsed backfill lease): it must cover every item that may contribute differently now, both
the items of the table (with or without a ledger: one with none may have started to count)
and every item with a ledger (its row may be gone: the ledger still credits its targets), in
marks of at most ``CHUNK`` ids, so that later batches stay bounded. Left out, an item keeps a
wrong ledger and its targets a wrong count with an empty queue: nothing would ever repair it.
So each test damages counts behind the engine's back (``triggers_off``), marks every item, and
drains to empty: counts must equal the independent truth and invariants I, J, M must hold.
"""

from __future__ import annotations

import math
from datetime import timedelta

import pytest
from django.db import connection

import counts
from counts.apps import graph
from counts.base.mark import Kind, Mark
from counts.compile.item_sql import CHUNK
from counts.run.item_backfill import mark_every_item
from project.monitoring.models import Detection, SourceImage
from tests.truth import drain_all, mismatches, settle, triggers_off

pytestmark = pytest.mark.django_db

CAPTURES, OCCURRENCES = "item:monitoring.sourceimage", "item:monitoring.occurrence"


def mark_all(name: str) -> None:
    with connection.cursor() as cursor:
        mark_every_item(cursor, graph().kinds[name])


def item_marks(marks) -> dict[str, list[list[int]]]:
    """``{kind: [ids of each mark]}``; every mark in the queue must be an item mark."""
    found: dict[str, list[list[int]]] = {}
    with connection.cursor() as cursor:
        cursor.execute("SELECT id, target, ids, field, deltas, payload FROM counts_dirtymark")
        for row in cursor.fetchall():
            mark = Mark.from_row(*row)
            assert mark.kind is Kind.ITEM, mark
            found.setdefault(mark.target, []).append(list(mark.ids))
    return found


def ids_of(sql: str, params=()) -> set[int]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return {row[0] for row in cursor.fetchall()}


def test_every_capture_and_every_ledger_is_marked_in_chunks_of_at_most_chunk(world, marks):
    start = world.i5.timestamp
    SourceImage.objects.bulk_create(
        SourceImage(deployment=world.d3, timestamp=start + timedelta(seconds=n), path=f"c/{n}")
        for n in range(CHUNK + 50)
    )
    orphan = capture_deleted_behind_the_engine(world)
    drain_all()
    assert marks.count() == 0
    captures = ids_of("SELECT id FROM monitoring_sourceimage")
    ledgered = ids_of("SELECT item_id FROM counts_ledger WHERE kind = %s", [CAPTURES])
    assert orphan in ledgered and orphan not in captures
    assert world.i3.pk in captures and world.i3.pk not in ledgered  # no detection, no ledger
    mark_all(CAPTURES)
    found = item_marks(marks)
    assert list(found) == [CAPTURES]  # the occurrence kind is not touched
    chunks = found[CAPTURES]
    assert all(0 < len(ids) <= CHUNK and ids == sorted(set(ids)) for ids in chunks)
    assert set().union(*chunks) == captures | ledgered
    every = [i for ids in chunks for i in ids]
    assert len(every) == len(set(every)), "each item once: a drain recomputes it once"
    assert len(chunks) == math.ceil(len(captures | ledgered) / CHUNK)
    settle()


def detection_behind_the_engine(world) -> None:
    """i3 gets its first valid detection: it has no ledger, only the table names it."""
    with triggers_off() as cursor:
        cursor.execute(
            "INSERT INTO monitoring_detection (source_image_id, bbox, created_at, updated_at)"
            " VALUES (%s, '[1, 2, 3, 4]'::jsonb, now(), now())",
            [world.i3.pk],
        )


def capture_deleted_behind_the_engine(world) -> int:
    """A counted capture is deleted with its detection: only its ledger names it now. (Its
    station's and night's capture counts, own-row, are repaired by hand alongside.)"""
    gone = SourceImage.objects.create(
        deployment=world.d1, event=world.e1, timestamp=world.i1.timestamp, path="a/9.jpg"
    )
    Detection.objects.create(source_image=gone, bbox=[1, 2, 3, 4])
    drain_all()
    with triggers_off() as cursor:
        cursor.execute("DELETE FROM monitoring_detection WHERE source_image_id = %s", [gone.pk])
        cursor.execute("DELETE FROM monitoring_sourceimage WHERE id = %s", [gone.pk])
        for table, row in (("monitoring_deployment", world.d1), ("monitoring_event", world.e1)):
            cursor.execute(
                f"UPDATE {table} SET captures_count = captures_count - 1 WHERE id = %s", [row.pk]
            )
    return gone.pk


def rescore_behind_the_engine(world) -> None:
    """o2 (0.4, not counted at threshold 0.5, so no ledger) now counts."""
    with triggers_off() as cursor:
        cursor.execute(
            "UPDATE monitoring_occurrence SET determination_score = 0.9 WHERE id = %s",
            [world.o2.pk],
        )


@pytest.mark.parametrize(
    "damage, name",
    [
        (detection_behind_the_engine, CAPTURES),
        (capture_deleted_behind_the_engine, CAPTURES),
        (rescore_behind_the_engine, OCCURRENCES),
    ],
    ids=["unledgered-capture", "orphan-ledger", "unledgered-occurrence"],
)
def test_draining_every_item_repairs_what_no_mark_named(world, marks, damage, name):
    damage(world)
    assert marks.count() == 0 and mismatches()  # wrong counts, and nothing queued
    mark_all(name)
    settle()


def test_a_kind_with_no_items_and_no_ledgers_gets_no_mark(db, marks):
    """An empty chunk would be a mark with no ids, read as "every item" again: a drain would
    expand it forever."""
    assert ids_of("SELECT item_id FROM counts_ledger") == set()
    for name in (CAPTURES, OCCURRENCES):
        mark_all(name)
    assert marks.count() == 0
    assert counts.drain().empty


def test_a_drain_expands_an_every_item_mark_into_item_marks(world, marks):
    detection_behind_the_engine(world)
    with connection.cursor() as cursor:
        Mark.every_item(CAPTURES).insert(cursor)
    result = counts.drain()
    assert (result.marks, list(result.expanded), result.more) == (1, [CAPTURES], True)
    covered = set().union(*item_marks(marks)[CAPTURES])
    assert covered == ids_of("SELECT id FROM monitoring_sourceimage") | ids_of(
        "SELECT item_id FROM counts_ledger WHERE kind = %s", [CAPTURES]
    )
    settle()
