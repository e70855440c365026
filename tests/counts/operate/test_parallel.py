"""Reconcile and rebuild on several connections (``jobs``) find and repair what one finds.

A pass cut into key ranges run side by side must cover every row and every ledger (orphans
below the first id and beyond the last included), report the same drift as the pass on one
connection, stop every slice when one fails without losing anything, and stay on the caller's
connection inside the caller's transaction (other connections cannot see its writes). The
racing of parallel passes with writers and drains is in the property test
(``tests/counts/test_concurrent_histories.py``, whose bulk passes draw ``jobs``).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from io import StringIO

import pytest
from django.db import connection, transaction

import counts
from counts.base import checkpoints
from counts.operate import parallel
from counts.operate.progress import Progress
from counts.run.marks import has_pending
from tests import truth
from tests.interleave import connect, drain_to_empty
from tests.truth import mismatches
from tests.worker_harness import worker_subprocess_env

pytestmark = pytest.mark.django_db(transaction=True)


def without_triggers(*statements: tuple[str, list]) -> None:
    """Writes the triggers never see (a restore, a hand repair): ``replica`` role."""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL session_replication_role = replica")
        for sql, params in statements:
            cursor.execute(sql, params)


def plant_drift(world) -> None:
    """Drift in every slice: the first and the last capture and occurrence changed behind the
    triggers, one occurrence deleted (an orphan ledger), a cached column overwritten."""
    without_triggers(
        (
            "INSERT INTO monitoring_detection (source_image_id, bbox, created_at, updated_at)"
            " VALUES (%s, '[1, 2, 3, 4]', now(), now()), (%s, '[1, 2, 3, 4]', now(), now())",
            [world.i1.pk, world.i5.pk],
        ),
        (
            "UPDATE monitoring_detection SET occurrence_id = NULL WHERE occurrence_id = %s",
            [world.o1.pk],
        ),
        ("DELETE FROM monitoring_occurrence WHERE id = %s", [world.o1.pk]),
        ("UPDATE monitoring_event SET captures_count = 99 WHERE id = %s", [world.e1.pk]),
        (
            "DELETE FROM monitoring_sourceimagecollection_images"
            " WHERE sourceimagecollection_id = %s",
            [world.c1.pk],
        ),
    )
    assert mismatches()


def summary(report) -> dict:
    found = report.as_dict()
    found.pop("seconds")
    return found


def test_slices_cover_every_id_and_what_lies_beyond(world):
    with connection.cursor() as cursor:
        cursor.execute("SELECT min(id), max(id) FROM monitoring_sourceimage")
        low, high = cursor.fetchone()
        cuts = parallel.bounds(cursor, "monitoring_sourceimage", "id", 2)
        assert cuts[0][0] is None and cuts[-1][1] is None  # orphans below and beyond
        assert [hi for _lo, hi in cuts[:-1]] == [lo for lo, _hi in cuts[1:]]  # no gap
        assert len(cuts) == 2 and low <= cuts[0][1] < high
        # Fewer ids than slices: one range, the whole table.
        assert parallel.bounds(cursor, "monitoring_project", "id", 50) == [(None, None)]
        assert parallel.bounds(cursor, "monitoring_sourceimage", "id", 1) == [(None, None)]


def test_a_dry_run_on_two_connections_reports_what_one_reports(world):
    plant_drift(world)
    one = counts.reconcile(dry_run=True, chunk=1)
    two = counts.reconcile(dry_run=True, chunk=1, jobs=2)
    assert one.drifted_rows and summary(two) == summary(one)
    assert any(ledger.drifted_rows for ledger in two.ledgers.values())


def test_a_repair_on_two_connections_leaves_every_count_exact(world):
    plant_drift(world)
    expected = counts.reconcile(dry_run=True)
    report = counts.reconcile(chunk=1, jobs=3)
    assert report.drifted_rows == expected.drifted_rows
    assert {k: v.drifted_rows for k, v in report.ledgers.items()} == {
        k: v.drifted_rows for k, v in expected.ledgers.items()
    }
    truth.settle(drain=drain_to_empty)
    assert counts.reconcile(jobs=2).drifted_rows == 0


def test_a_rebuild_on_two_connections_from_wiped_ledgers(world):
    plant_drift(world)
    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM counts_ledger")
        cursor.execute("DELETE FROM counts_multiplicity")
        cursor.execute("UPDATE monitoring_sourceimage SET detections_count = 0")
    report = counts.rebuild(chunk=2, jobs=2)
    assert report.checked == sum(counts.target_rows().values())
    truth.settle(drain=drain_to_empty)


def test_a_slice_that_fails_stops_the_others_and_loses_nothing(world):
    plant_drift(world)
    seen = []
    lock = threading.Lock()

    def fail_third(name, info):
        with lock:
            seen.append(threading.current_thread().name)
            if len(seen) == 3:
                raise checkpoints.CheckpointFailure("third chunk")

    with (
        checkpoints.at("bulk.between_transactions", fail_third),
        pytest.raises(checkpoints.CheckpointFailure),
    ):
        counts.reconcile(chunk=1, jobs=2)
    assert len({name for name in seen}) == 2  # both slices ran
    assert len(seen) <= 5  # and stopped at their next chunk, not at the end of their range
    # Every chunk that committed kept the invariants: the next pass repairs the rest.
    counts.reconcile(jobs=2)
    truth.settle(drain=drain_to_empty)


def test_inside_a_transaction_the_pass_stays_on_its_connection(world):
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL session_replication_role = replica")
            cursor.execute(
                "UPDATE monitoring_detection SET source_image_id = %s WHERE source_image_id = %s",
                [world.i1.pk, world.i2.pk],
            )
            cursor.execute("SET LOCAL session_replication_role = DEFAULT")
        # Another connection would not see the moved detections, and would find nothing.
        report = counts.reconcile(jobs=2)
        assert report.drifted_rows
    truth.settle(drain=drain_to_empty)


def test_phases_side_by_side_each_get_one_line_with_their_rows(world):
    stream = StringIO()
    with Progress(stream, counts.target_rows, overlap=True) as progress:
        counts.reconcile(chunk=1, progress=progress, jobs=2)
    lines = stream.getvalue().splitlines()
    phases = [line.split(":")[0] for line in lines]
    assert len(phases) == len(set(phases))  # each once
    rows = {phase: n for phase, n, _s in progress.finished}
    for label, n in counts.target_rows().items():
        assert rows[label] == n, (label, lines)
    truth.assert_all_counts_exact()


def test_the_command_takes_jobs_and_refuses_nonsense(world):
    env = worker_subprocess_env()
    ok = subprocess.run(
        [sys.executable, "manage.py", "counts", "reconcile", "--jobs", "2", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert '"drifted_rows": 0' in ok.stdout
    bad = subprocess.run(
        [sys.executable, "manage.py", "counts", "rebuild", "--jobs", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "at least 1" in bad.stderr and "Traceback" not in bad.stderr


def test_a_rebuild_on_two_connections_adds_the_credits_its_slices_deferred(world):
    """An item chunk crediting a row someone holds queues the amount as a DELTA mark, as a
    drain does; a rebuild on several connections, whose slices hold rows from each other, adds
    such amounts itself before it returns: counts right with no worker running."""
    plant_drift(world)
    holder = HeldRow(world.d1.pk)

    def release(name, info):
        if info.get("label") == "monitoring.deployment" and holder.release():
            time.sleep(1.1)  # the deferred amounts come due (``LOCKED_RETRY_MS``)

    with checkpoints.at("bulk.before_model", release):
        counts.rebuild(chunk=1, jobs=2)
    assert holder.deferred, "the held station's credits were not deferred: nothing tested"
    assert not has_pending()
    truth.assert_all_counts_exact()
    truth.settle(drain=drain_to_empty)


class HeldRow:
    """A station's row locked by another connection until :meth:`release`."""

    def __init__(self, pk: int) -> None:
        self.conn = connect()
        self.conn.execute("SELECT 1 FROM monitoring_deployment WHERE id = %s FOR UPDATE", [pk])
        self.held, self.deferred, self.lock = True, False, threading.Lock()

    def release(self) -> bool:
        """Let the row go (once, whichever slice asks first); True if this call did."""
        with self.lock:
            if not self.held:
                return False
            self.held = False
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT EXISTS (SELECT 1 FROM counts_dirtymark"
                " WHERE target = 'monitoring.deployment' AND deltas IS NOT NULL)"
            )
            self.deferred = cursor.fetchone()[0]
        self.conn.rollback()
        self.conn.close()
        return True
