"""A drain's hot statements are prepared once per connection and planned generically
(``counts.base.prepared``); turned off, they run as before; either way the counts are exact, and
Django's own queries are never prepared."""

from __future__ import annotations

import pytest
from django.db import connection, transaction

import counts
from project.monitoring.models import Detection, SourceImage
from tests.truth import assert_all_counts_exact

#: The recompute of captures (the item kind a detection marks).
ITEM_RECOMPUTE = "WITH truth AS (%'item:monitoring.sourceimage'%"


def prepared_statements(like: str = "%") -> list[tuple[str, int, int]]:
    """``(statement head, generic plans, custom plans)`` prepared on this connection."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT left(statement, 40), generic_plans, custom_plans FROM pg_prepared_statements"
            " WHERE statement LIKE %s ORDER BY 1",
            [like],
        )
        return cursor.fetchall()


def one_detection_per_drain(world, n: int) -> None:
    images = list(SourceImage.objects.order_by("pk"))
    for i in range(n):
        with transaction.atomic():
            Detection.objects.create(source_image=images[i % len(images)], bbox=[1, 2, 3, 4])
        result = counts.drain()
        assert result.marks and not result.more


def test_small_drains_reuse_one_generic_plan(world, marks):
    one_detection_per_drain(world, 8)
    (recompute,) = prepared_statements(ITEM_RECOMPUTE)
    # One statement, planned for every array length at once: no drain paid for planning it
    # with its own ids.
    assert recompute[1] >= 8 and recompute[2] == 0
    assert_all_counts_exact()


def test_turned_off_nothing_is_prepared(world, marks, settings):
    settings.COUNTS_PREPARED_STATEMENTS = False
    before = prepared_statements()  # earlier tests' drains on this connection
    one_detection_per_drain(world, 3)
    assert prepared_statements() == before  # nothing new, and nothing executed again
    assert_all_counts_exact()


def test_django_queries_stay_unprepared(world, marks):
    one_detection_per_drain(world, 2)
    before = prepared_statements()
    for _ in range(10):
        list(SourceImage.objects.filter(pk__in=[world.i1.pk, world.i2.pk]))
    assert prepared_statements() == before


@pytest.mark.django_db(transaction=True)
def test_a_failed_drain_leaves_the_next_one_working(world, marks):
    """A rollback makes psycopg forget (and deallocate) what it prepared: the next drain
    prepares again rather than calling a statement that is gone."""
    one_detection_per_drain(world, 2)
    with pytest.raises(RuntimeError), transaction.atomic():
        Detection.objects.create(source_image=world.i1, bbox=[1, 2, 3, 4])
        counts.drain()
        raise RuntimeError("the caller fails after the drain")
    one_detection_per_drain(world, 2)
    assert_all_counts_exact()


@pytest.mark.django_db
def test_arrays_reach_the_server_whole_on_either_cursor():
    """Lists of ids travel as the array's text on Django's cursor (quoted once, not element by
    element), as lists on the prepared one; the server reads the same array either way."""
    from counts.base import prepared

    big = [2**40, 7, 0, -3]
    with transaction.atomic(), connection.cursor() as cursor:
        for on in (cursor, prepared.cursor()):
            sent = prepared.arrays(on, [big, [], "text", [1.5]])
            assert sent[2:] == ["text", [1.5]], "only lists of integers change"
            on.execute("SELECT %s::bigint[], %s::bigint[]", sent[:2])
            assert on.fetchone() == (big, [])
        assert prepared.arrays(cursor, [big])[0] == "{1099511627776,7,0,-3}"
