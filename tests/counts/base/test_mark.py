"""``counts.base.mark``: a mark's kind is decoded in one place, and its SQL fragments agree with it.

Every reader of the queue (drains, the recount's formula, freshness flags, stale items, the
rebuild's covered marks) selects marks by :func:`counts.base.mark.where`; the drain's plan and the
tests decode them with :func:`counts.base.mark.kind_of`. Both must say the same of every mark.
"""

from __future__ import annotations

import pytest
from django.db import connection

from counts.base.mark import Kind, Mark, kind_of, where

pytestmark = pytest.mark.django_db

#: One mark of each kind, as writers write them.
ONE_OF_EACH = {
    Kind.DELTA: Mark.delta("monitoring.event", "captures_count", {3: 1, 4: -2}),
    Kind.RECOUNT: Mark.recount("monitoring.event", [4, 3, 3]),
    Kind.EVERY_ROW: Mark.every_row("monitoring.event"),
    Kind.ROUTE: Mark("counts_testapp.library", (7,), "via:2e9714fa927f"),
    Kind.ITEM: Mark.item("item:monitoring.sourceimage", [9, 8]),
    Kind.EVERY_ITEM: Mark.every_item("item:monitoring.sourceimage"),
    Kind.JOB: Mark("item:monitoring.occurrence", (1,), "job:af1c757a0bf8", payload=[[0.5, 0.6]]),
}


def test_builders_make_marks_of_their_kind_in_id_order():
    assert {kind: mark.kind for kind, mark in ONE_OF_EACH.items()} == {k: k for k in ONE_OF_EACH}
    assert ONE_OF_EACH[Kind.DELTA].ids == (3, 4) and ONE_OF_EACH[Kind.DELTA].deltas == (1, -2)
    assert ONE_OF_EACH[Kind.RECOUNT].ids == (3, 4)


def test_each_sql_fragment_selects_exactly_the_marks_of_its_kind(marks):
    with connection.cursor() as cursor:
        ids = {kind: mark.insert(cursor) for kind, mark in ONE_OF_EACH.items()}
        # A job mark written by a trigger carries a payload; the kind does not depend on it.
        cursor.execute(
            "UPDATE counts_dirtymark SET payload = '[[0.5, 0.6]]' WHERE id = %s", [ids[Kind.JOB]]
        )
        for kind in Kind:
            cursor.execute(f"SELECT id FROM counts_dirtymark m WHERE {where(kind)}")
            assert {row[0] for row in cursor.fetchall()} == {ids[kind]}, kind
            cursor.execute(f"SELECT id FROM counts_dirtymark WHERE {where(kind, alias=None)}")
            assert {row[0] for row in cursor.fetchall()} == {ids[kind]}, kind
        cursor.execute("SELECT id, target, ids, field, deltas, payload FROM counts_dirtymark")
        decoded = {row[0]: Mark.from_row(*row).kind for row in cursor.fetchall()}
    assert decoded == {mark_id: kind for kind, mark_id in ids.items()}


def test_a_mark_due_later_is_written_with_its_time(marks):
    with connection.cursor() as cursor:
        mark_id = Mark.recount("monitoring.event", [1]).insert(cursor, due_in_s=30)
        cursor.execute(
            "SELECT not_before > now() + interval '20 seconds' FROM counts_dirtymark WHERE id = %s",
            [mark_id],
        )
        assert cursor.fetchone()[0]


@pytest.mark.parametrize(
    "target, ids, field, deltas, kind",
    [
        ("monitoring.event", [1], "captures_count", [1], Kind.DELTA),
        ("monitoring.event", [1], None, None, Kind.RECOUNT),
        ("monitoring.event", None, None, None, Kind.EVERY_ROW),
        ("monitoring.event", [1], "via:abc", None, Kind.ROUTE),
        ("item:x.y", [1], None, None, Kind.ITEM),
        ("item:x.y", None, None, None, Kind.EVERY_ITEM),
        ("item:x.y", [1], "job:abc", None, Kind.JOB),
    ],
)
def test_kind_of(target, ids, field, deltas, kind):
    assert kind_of(target, ids, field, deltas) is kind
