"""A new count's backfill (``counts.operate.backfill``): what it takes, and what it leaves.

The backfill holds a lease, an "every item" mark that keeps invariant J for the drains while it
runs. The lease is the backfill's own: it must not make the backfill take every item of each
range as if each had a change waiting (it took 2.2 times the captures that can count, each
locked, given an empty ledger row and swept). Real PostgreSQL; the count is made new by
wiping its column and ledger entries with triggers off, as a deploy adding it would find them.
"""

from __future__ import annotations

import pytest
from django.db import connection

from counts.apps import graph
from counts.base.names import LEDGER_TABLE, MARK_TABLE
from counts.declare.modes import ledger_key
from counts.operate.backfill import backfill
from tests.invariants import assert_invariants
from tests.truth import assert_all_counts_exact, drain_all, triggers_off

pytestmark = pytest.mark.django_db(transaction=True)

CAPTURES = "item:monitoring.sourceimage"


def test_a_new_counts_backfill_takes_only_the_items_that_can_count(make_world):
    make_world()
    key = ledger_key("monitoring.sourceimage.detections_count")
    assert any(p.key == key for p in graph().kinds[CAPTURES].parts)
    with triggers_off() as cursor:  # the count is new: no column value, no ledger entry
        cursor.execute("UPDATE monitoring_sourceimage SET detections_count = 0")
        cursor.execute(
            f"UPDATE {LEDGER_TABLE} SET state = state - %s WHERE kind = %s", [key, CAPTURES]
        )
        cursor.execute(f"DELETE FROM {LEDGER_TABLE} WHERE state = '{{}}'")
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(DISTINCT source_image_id) FROM monitoring_detection"
            " WHERE bbox IS NOT NULL"
        )
        (can_count,) = cursor.fetchone()
        cursor.execute("SELECT count(*) FROM monitoring_sourceimage")
        (captures,) = cursor.fetchone()
    assert 0 < can_count < captures, "some captures have no valid detection"

    seen: dict[str, int] = {}
    backfill("monitoring.sourceimage", ["detections_count"], progress=seen.__setitem__)

    assert seen[CAPTURES] == can_count, "only the captures with something to count"
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM {MARK_TABLE}")
        assert cursor.fetchone() == (0,), "the lease is gone, and nothing was re-marked"
    assert_invariants()
    assert_all_counts_exact()
    drain_all()
    assert_all_counts_exact()
