"""Drains meeting on hot target rows (``counts.run.target_locks``; issue 27, case 5).

Each test holds a drain open on one connection and runs another on a second, with the lock
waits seen in ``pg_stat_activity`` (``tests/interleave.py``). What a user would notice: work
put back for a second when another drainer was about to let go (a backlog drained slower with
more workers), a drain stuck behind a row held for long, or a count wrong at the end.
"""

from __future__ import annotations

import pytest

from counts.models import DirtyMark
from counts.run import target_locks
from tests.counts.test_interleavings import insert_detection
from tests.interleave import drain_to_empty
from tests.truth import assert_all_counts_exact

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def long_wait(monkeypatch):
    """A wait long enough that the test, not the clock, decides when the holder lets go."""
    monkeypatch.setattr(target_locks, "WAIT_MS", 10_000)


def put_back() -> list[str]:
    """Targets of the marks a drain wrote again for later (rows someone held)."""
    return sorted(
        DirtyMark.objects.filter(not_before__isnull=False).values_list("target", flat=True)
    )


def test_a_drain_waits_for_a_station_another_drain_is_writing_and_puts_nothing_back(
    make_world, harness, long_wait
):
    world = make_world()
    writer = harness.sql("writer")
    for image in (world.i1, world.i2):  # both credit station d1 and night e1
        insert_detection(writer, image.pk)
        writer.commit()
    one, two = harness.orm("drain 1"), harness.orm("drain 2")
    one.begin()
    assert one.drain(batch_size=1, max_ids=1).marks == 1  # holds d1 and e1, uncommitted
    step = two.start_drain(batch_size=1, max_ids=1)
    assert step.blocked, "drain 2 waits for the rows drain 1 is about to release"
    one.commit()
    result = step.result()
    assert result.marks == 1 and not result.deferred, result.as_log()
    assert put_back() == []
    drain_to_empty()
    assert_all_counts_exact()


def test_a_row_held_longer_than_the_wait_gets_its_work_put_back_not_lost(make_world, harness):
    world = make_world()
    writer = harness.sql("writer")
    for image in (world.i1, world.i2):
        insert_detection(writer, image.pk)
        writer.commit()
    one, two = harness.orm("drain 1"), harness.orm("drain 2")
    one.begin()
    one.drain(batch_size=1, max_ids=1)
    step = two.start_drain(batch_size=1, max_ids=1)
    result = step.result(timeout=5)  # drain 1 never lets go while drain 2 runs
    assert result.deferred == {"monitoring.deployment": 1, "monitoring.event": 1}
    assert put_back() == ["monitoring.deployment", "monitoring.event"]
    one.commit()
    drain_to_empty()
    assert_all_counts_exact()


def test_rows_taken_before_a_wait_are_released_while_it_waits(make_world, harness, long_wait):
    """Drain 2 wants d1 (held by drain 1) and d2: it lets d2 go before it waits for d1, so a
    third drain writing d2 does not queue behind it, and no two drains wait in a circle."""
    world = make_world()
    writer = harness.sql("writer")
    insert_detection(writer, world.i1.pk)  # d1, e1
    writer.commit()
    insert_detection(writer, world.i2.pk)  # d1, e1
    insert_detection(writer, world.i4.pk)  # d2, e3
    writer.commit()
    one, two, three = harness.orm("drain 1"), harness.orm("drain 2"), harness.orm("drain 3")
    one.begin()
    assert one.drain(batch_size=1, max_ids=1).marks == 1
    waiting = two.start_drain(batch_size=500, max_ids=5000)
    assert waiting.blocked
    # A night on d2: an own-row count of the station (a delta mark), nothing drain 2 holds.
    writer.execute(
        "INSERT INTO monitoring_event (deployment_id, start, created_at, updated_at)"
        " VALUES (%s, now(), now(), now())",
        [world.d2.pk],
    )
    writer.commit()
    third = three.start_drain(batch_size=500, max_ids=5000)
    assert not third.blocked, "d2 was released before drain 2 began to wait"
    assert third.result().marks == 1
    one.commit()
    assert not waiting.result().deferred
    drain_to_empty()
    assert_all_counts_exact()
