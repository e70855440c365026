"""A bulk pass reads each mark of its kind once, above a floor that rises as it goes
(``counts.operate.stale_marks``): a mark that commits late, below ids already read, must still
be read, and a backlog of marks already read must not be probed again at every chunk."""

from __future__ import annotations

import pytest
from django.db import connection

from counts.apps import graph
from counts.base.names import MARK_TABLE
from counts.operate.stale_marks import Stale
from tests.interleave import connect

pytestmark = pytest.mark.django_db(transaction=True)

CAPTURES = "item:monitoring.sourceimage"
INSERT = f"INSERT INTO {MARK_TABLE} (target, ids) VALUES (%s, %s)"


@pytest.fixture
def stale():
    kind = graph().kinds[CAPTURES]
    with connection.cursor() as cursor:
        s = Stale(cursor, kind)
    yield s
    with connection.cursor() as cursor:
        s.close(cursor)


def read(stale: Stale) -> set[int]:
    """One chunk's read of the marks (every item id, no range), in a transaction of its own,
    as a pass's chunk reads them; returns the stale items known so far."""
    absorb, select, params = stale.chunk_sql(None, None)
    with connection.cursor() as cursor:
        cursor.execute(f"{absorb} SELECT ARRAY({select}), {stale.snapshot_columns()}", params)
        items, *snapshot = cursor.fetchone()
        stale.observed(*snapshot)
    return set(items)


def test_a_mark_that_commits_late_below_the_floor_is_still_read(harness, stale):
    """A writer draws its mark's id, then waits (on an advisory lock, which gives its
    transaction no id) before its row is written; meanwhile a later mark commits and the pass
    reads twice. The early mark must not fall below the floor unread. With Django's identity
    column it did: nothing of this database was running with a transaction id, so the pass
    took every drawer of an id up to the later mark for ended."""
    holder, early, late = harness.sql("holder"), harness.sql("early"), harness.sql("late")
    holder.execute("SELECT pg_advisory_xact_lock(4242)")
    # The id is the row's first column, so it is drawn before the lock is waited for.
    waiting = early.start_execute(
        f"INSERT INTO {MARK_TABLE} (target, ids) VALUES (%s,"
        " ARRAY[(SELECT 101 FROM pg_advisory_xact_lock(4242))]) RETURNING id",
        [CAPTURES],
    )
    assert waiting.blocked
    ((drawn,),) = late.execute("SELECT last_value FROM counts_dirtymark_id_seq")
    ((late_id,),) = late.execute(f"{INSERT} RETURNING id", [CAPTURES, [202]])
    late.commit()
    assert read(stale) == {202}
    read(stale)
    holder.commit()
    ((early_id,),) = waiting.result()
    assert early_id == drawn < late_id
    early.commit()
    assert read(stale) == {101, 202}


def test_the_floor_rises_past_marks_read_once_their_writers_have_ended(harness, stale):
    """Marks read once are not probed again: the floor passes them once every transaction of
    this database that could still commit below them has ended, and not while one is open."""
    writer, other = harness.sql("writer"), harness.sql("other")
    ids = [writer.execute(f"{INSERT} RETURNING id", [CAPTURES, [n]])[0][0] for n in (1, 2, 3)]
    writer.commit()
    other.execute(INSERT, [CAPTURES, [4]])  # open: a mark that may still commit
    assert read(stale) == {1, 2, 3}
    read(stale)
    assert stale.floor == 0
    other.commit()
    assert read(stale) == {1, 2, 3, 4}
    assert stale.floor == ids[-1]
    read(stale)
    read(stale)
    ((last,),) = other.execute(f"SELECT max(id) FROM {MARK_TABLE}")
    assert stale.floor == last
    # A chunk now reads only the marks above it: none, so none is probed again.
    _absorb, _select, params = stale.chunk_sql(None, None)
    assert params == [CAPTURES, last]


def test_a_long_write_in_another_database_does_not_hold_the_floor(harness, stale):
    """Transactions of other databases cannot write this one's marks: one left open there
    (a load, a migration) must not hold every pass here back."""
    elsewhere = connect(dbname="postgres")
    try:
        elsewhere.execute("SELECT pg_current_xact_id()")  # open, with a transaction id
        writer = harness.sql("writer")
        ((mark,),) = writer.execute(f"{INSERT} RETURNING id", [CAPTURES, [1]])
        writer.commit()
        for _ in range(3):
            assert read(stale) == {1}
        assert stale.floor == mark
    finally:
        elsewhere.close()
