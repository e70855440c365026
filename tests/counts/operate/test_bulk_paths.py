"""The bulk paths keep every count exact: rebuild, reconcile and "Recompute now" racing
writers and drains, stopped half-way, or meeting writes the triggers never saw.

Each numbered case is one that ended with wrong counts and an empty queue (rows that looked
fresh) before the bulk passes became drains of every item (``counts.operate.item_sweep``). Each test
ends by draining to empty, comparing every cached count with the truth computed from the base
tables (``tests.truth``), and checking invariants I, J and M (``tests.invariants``), so a wrong
ledger is caught before it becomes a wrong count.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from django.db import connection, transaction

import counts
from counts.base import checkpoints
from tests import truth
from tests.histories import Loop
from tests.interleave import drain_to_empty
from tests.truth import cached
from tests.worker_harness import worker_subprocess_env

pytestmark = pytest.mark.django_db(transaction=True)


def settle() -> None:
    """Drain to empty, then every count equals the truth and the invariants hold."""
    truth.settle(drain=drain_to_empty)


def without_triggers(sql: str, params=()) -> None:
    """A write the triggers never see (a restore, a hand repair): ``replica`` role."""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL session_replication_role = replica")
        cursor.execute(sql, params)


def taxa(world) -> int:
    return cached("monitoring_deployment")[world.d1.pk]["taxa_count"]


# Case 1: an occurrence is the only one of its taxon at its station, drained; it is deleted,
# then rebuild runs. Rebuild must not forget the deleted item's ledger and multiplicity.
@pytest.mark.parametrize("how", ["orm", "sql"])
def test_1_rebuild_after_deleting_the_only_occurrence_of_a_taxon(world, how):
    from project.monitoring.models import Detection, Occurrence

    assert taxa(world) == 1  # o1: moth at station A, counted
    Detection.objects.filter(occurrence=world.o1).update(occurrence=None)
    if how == "orm":
        Occurrence.objects.filter(pk=world.o1.pk).delete()
    else:
        with connection.cursor() as cursor:
            cursor.execute("DELETE FROM monitoring_occurrence WHERE id = %s", [world.o1.pk])
    counts.rebuild()
    settle()
    assert taxa(world) == 0


def test_1_rebuild_after_deleting_a_capture_then_truncating_memberships(world):
    """i1 had two valid detections; after rebuild its ledger must be gone, or a later TRUNCATE
    of the memberships marks it again and its station's and night's counts go to -2."""
    from project.monitoring.models import SourceImage

    SourceImage.objects.filter(pk=world.i1.pk).delete()
    counts.rebuild()
    settle()
    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE monitoring_sourceimagecollection_images")
    settle()


# Case 2: the same deletion with triggers off; reconcile must find and repair it.
def test_2_reconcile_repairs_a_deletion_the_triggers_never_saw(world):
    without_triggers("DELETE FROM monitoring_occurrence WHERE id = %s", [world.o1.pk])
    dry = counts.reconcile(dry_run=True)
    assert dry.models["monitoring.deployment"].drift["taxa_count"] == 1
    assert taxa(world) == 1  # a dry run writes nothing
    report = counts.reconcile()
    assert report.models["monitoring.deployment"].drift["taxa_count"] == 1
    assert report.models["monitoring.deployment"].cells[world.d1.pk] >= {"taxa_count"}
    settle()
    assert counts.reconcile(dry_run=True).drifted_rows == 0


def test_2_reconcile_repairs_a_detection_added_with_triggers_off(world):
    without_triggers(
        "INSERT INTO monitoring_detection (source_image_id, bbox, created_at, updated_at)"
        " VALUES (%s, '[1, 2, 3, 4]'::jsonb, now(), now())",
        [world.i3.pk],
    )
    report = counts.reconcile()
    assert report.drifted_rows >= 4  # i3, its station, its night, its set
    settle()


# Case 3: a pass's lock statement meets a drain that inserts or deletes an item's ledger row;
# the pass must write only the ledgers it locked, and hand the others back to the queue.
@pytest.mark.parametrize("change", ["first-detection", "last-detection-deleted"])
@pytest.mark.parametrize("bulk", ["rebuild", "reconcile"])
def test_3_a_bulk_pass_racing_a_drain_on_one_item(world, harness, change, bulk):
    from project.monitoring.models import Detection, SourceImage

    if change == "first-detection":
        image = SourceImage.objects.create(
            deployment=world.d1, event=world.e1, timestamp=world.i1.timestamp, path="a/9.jpg"
        )
        drain_to_empty()
        Detection.objects.create(source_image=image, bbox=[1, 2, 3, 4])
    else:
        image = world.i5  # one valid detection, no set
        Detection.objects.filter(source_image=image).delete()
    drainer, passer = harness.orm("drainer"), harness.orm("pass")
    drainer.begin()
    assert not drainer.drain(batch_size=100, max_ids=5000).empty  # held, uncommitted
    run = passer.start(counts.rebuild if bulk == "rebuild" else counts.reconcile)
    drainer.commit()
    run.result()
    if change == "first-detection":  # and now it goes again
        Detection.objects.filter(source_image=image).delete()
    settle()


@pytest.mark.parametrize("bulk", ["rebuild", "reconcile"])
def test_3_a_bulk_pass_while_a_drain_writes_a_change_that_was_reverted_since(world, harness, bulk):
    """A drain holds a capture's first detection, uncommitted; the detection is deleted again
    (a mark of its own) before the pass starts. The item looks right to the pass (no ledger,
    no detection), but the drain is about to write +1: a rebuild, which drops the marks it
    covered, must find out by trying the lock, and leave the item marked."""
    from project.monitoring.models import Detection, SourceImage

    image = SourceImage.objects.create(
        deployment=world.d1, event=world.e1, timestamp=world.i1.timestamp, path="a/9.jpg"
    )
    drain_to_empty()
    detection = Detection.objects.create(source_image=image, bbox=[1, 2, 3, 4])
    drainer, passer = harness.orm("drainer"), harness.orm("pass")
    drainer.begin()
    assert not drainer.drain(batch_size=100, max_ids=5000).empty  # +1 held, uncommitted
    Detection.objects.filter(pk=detection.pk).delete()
    run = passer.start(counts.rebuild if bulk == "rebuild" else counts.reconcile)
    drainer.commit()
    run.result()
    settle()


# Case 4: a valid detection committed, not yet drained, then reconcile; and reconcile dying
# between its item pass and its target pass.
def test_4_reconcile_with_an_undrained_detection(world):
    """The repair sweeps the capture whose mark waits (and credits it, as the drain would), but
    a write waiting for its drain is not drift: nothing is reported."""
    from project.monitoring.models import Detection

    Detection.objects.create(source_image=world.i3, bbox=[1, 2, 3, 4])
    report = counts.reconcile()
    assert report.drifted_rows == 0, report.as_dict()
    assert report.ledgers["item:monitoring.sourceimage"].drifted_rows == 0
    settle()


def test_4_reconcile_reports_the_drift_and_not_the_waiting_write_beside_it(world):
    """A detection added with the triggers off on one capture (drift) and one added through
    the ORM on another (a mark waits): the report names the first capture's rows, not the
    second's, though the repair sweeps and credits both."""
    from project.monitoring.models import Detection

    without_triggers(
        "INSERT INTO monitoring_detection (source_image_id, bbox, created_at, updated_at)"
        " VALUES (%s, '[1, 2, 3, 4]'::jsonb, now(), now())",
        [world.i3.pk],
    )
    Detection.objects.create(source_image=world.i5, bbox=[1, 2, 3, 4])
    report = counts.reconcile()
    assert set(report.models["monitoring.sourceimage"].cells) == {world.i3.pk}
    assert set(report.models["monitoring.deployment"].cells) == {world.d1.pk}  # not d3
    assert set(report.models["monitoring.event"].cells) == {world.e2.pk}
    assert report.ledgers["item:monitoring.sourceimage"].drifted_rows == 1
    settle()


@pytest.mark.parametrize(
    "step, nth",
    [
        ("sweep.marks_read", 2),
        ("sweep.locked", 1),
        ("bulk.between_transactions", 1),
        ("bulk.between_transactions", 2),
        ("bulk.before_model", 3),
        ("recount.before_formula", 2),
    ],
)
def test_4_reconcile_failing_at_each_step_loses_nothing(world, step, nth):
    """Writes the triggers saw are exact after the next drain, whatever step failed; one
    they never saw waits for a whole pass (it is outside the invariants until then)."""
    from project.monitoring.models import Detection, Occurrence

    Detection.objects.create(source_image=world.i3, bbox=[1, 2, 3, 4])
    Occurrence.objects.filter(pk=world.o4.pk).update(determination_score=0.1)
    with (
        checkpoints.at(step, checkpoints.nth(nth, checkpoints.fail)),
        pytest.raises(checkpoints.CheckpointFailure),
    ):
        counts.reconcile(chunk=1)
    settle()
    without_triggers("DELETE FROM monitoring_occurrence WHERE id = %s", [world.o1.pk])
    with (
        checkpoints.at(step, checkpoints.nth(nth, checkpoints.fail)),
        pytest.raises(checkpoints.CheckpointFailure),
    ):
        counts.reconcile(chunk=1)
    counts.reconcile()
    settle()


def bulk_process(
    checkpoint: str, command: str = "reconcile", jobs: int = 1
) -> subprocess.CompletedProcess:
    """``manage.py counts <command>`` in a process of its own (on ``jobs`` connections),
    killed at ``checkpoint``."""
    env = worker_subprocess_env(COUNTS_CHECKPOINTS=checkpoint)
    done = subprocess.run(
        [sys.executable, "manage.py", "counts", command, "--chunk", "1", "--jobs", str(jobs)],
        env=env,
        capture_output=True,
        timeout=120,
    )
    return done


@pytest.mark.slow  # a manage.py process per case
@pytest.mark.parametrize("jobs", [1, 2])
@pytest.mark.parametrize("command", ["reconcile", "rebuild"])
@pytest.mark.parametrize(
    "checkpoint",
    [
        "sweep.marks_read@2=kill",
        "sweep.locked@2=kill",
        "bulk.between_transactions@1=kill",
        "bulk.between_transactions@4=kill",
        "bulk.before_model@4=kill",
        "recount.before_formula@3=kill",
    ],
)
def test_4_killed_at_each_step_the_next_drain_is_exact(world, command, checkpoint, jobs):
    from project.monitoring.models import Detection

    Detection.objects.create(source_image=world.i3, bbox=[1, 2, 3, 4])
    Detection.objects.filter(pk=world.det4.pk).delete()
    done = bulk_process(checkpoint, command, jobs)
    assert done.returncode == -9, done.stderr.decode()  # SIGKILL, as asked
    settle()


# Case 6: a dry run while occurrence marks wait reports no drift; an "every item" mark (a
# TRUNCATE of a job table writes one) counts as stale items in a recount's formula.
def test_6_dry_run_reports_no_drift_while_marks_wait(world):
    from project.monitoring.models import Occurrence, Taxon

    butterfly = Taxon.objects.create(name="Papilio")
    Occurrence.objects.create(
        deployment=world.d1, event=world.e1, determination=butterfly, determination_score=0.95
    )
    report = counts.reconcile(dry_run=True)
    assert report.drifted_rows == 0, report.as_dict()
    settle()


def test_6_dry_run_reports_no_drift_for_marks_written_while_it_runs(world):
    """Writes committed between a dry pass's chunks, on items of chunks still to come: their
    marks are read as the pass goes (``stale_marks.Stale``), so the change waiting for a drain
    is not reported as drift, and each new mark is read once however many chunks follow."""
    from project.monitoring.models import Detection

    written = []

    def write(name, info):
        if info.get("kind") == "item:monitoring.sourceimage" and info["lo"] == world.i1.pk:
            written.append(Detection.objects.create(source_image=world.i5, bbox=[1, 2, 3, 4]))
            Detection.objects.create(source_image=world.i4, bbox=[1, 2, 3, 4])

    with checkpoints.at("bulk.between_transactions", write):
        report = counts.reconcile(dry_run=True, chunk=1)
    assert written, "the writes happened while the pass ran"
    assert report.drifted_rows == 0, report.as_dict()
    settle()


@pytest.mark.parametrize("dry_run", [True, False])
def test_6_a_write_committed_between_a_chunks_reads_is_not_reported_as_drift(world, dry_run):
    """Another connection commits a detection (its mark with it) after a chunk read its
    waiting marks and before it compares its items. Read in two snapshots, the comparison saw
    the detection and the marks did not: drift reported on three rows (capture, station,
    night) where a mark simply waited. The chunk's reads share one snapshot, so the write is
    in neither; the next drain takes it."""
    from project.monitoring.models import Detection

    written = []

    def write_elsewhere(name, info):
        if info["kind"] == "item:monitoring.sourceimage" and not written:
            # A thread: a connection of its own, committing while the pass's chunk is open.
            writer = Loop(
                lambda: written.append(Detection.objects.create(source_image=world.i5, bbox=[1, 2]))
            )
            writer.start()
            writer.finish()

    with checkpoints.at("sweep.marks_read", write_elsewhere):
        report = counts.reconcile(dry_run=dry_run)
    assert written, "the write committed while the chunk was between its reads"
    assert report.drifted_rows == 0, report.as_dict()
    assert report.ledgers["item:monitoring.sourceimage"].drifted_rows == 0, report.as_dict()
    settle()


def test_6_recount_with_an_every_item_mark_waiting(world):
    without_triggers(
        "UPDATE monitoring_occurrence SET determination_score = 0.1 WHERE id = %s", [world.o1.pk]
    )
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO counts_dirtymark (target, ids) VALUES ('item:monitoring.occurrence', NULL)"
        )
    counts.recompute([world.d1, world.e1])
    settle()


# Case 5: a primary key changed in SQL (a night renumbered, its captures re-pointed in the same
# transaction) would carry the night's stored counts to the new id and credit its captures
# again. The engine refuses it, and says what to do instead.
def test_5_renumbering_a_counted_row_is_refused_and_changes_nothing(world):
    from django.db import DatabaseError

    before = cached("monitoring_event")
    with (
        pytest.raises(DatabaseError, match="primary key of monitoring_event cannot change"),
        transaction.atomic(),
        connection.cursor() as cursor,
    ):
        cursor.execute("SET CONSTRAINTS ALL DEFERRED")
        cursor.execute("UPDATE monitoring_event SET id = 1000000 WHERE id = %s", [world.e1.pk])
        cursor.execute(
            "UPDATE monitoring_sourceimage SET event_id = 1000000 WHERE event_id = %s",
            [world.e1.pk],
        )
    assert cached("monitoring_event") == before
    settle()


def test_5_an_ordinary_update_of_a_counted_row_passes(world):
    with connection.cursor() as cursor:
        cursor.execute("UPDATE monitoring_event SET id = id WHERE id = %s", [world.e1.pk])
        cursor.execute(
            "UPDATE monitoring_project SET name = 'renamed' WHERE id = %s", [world.p1.pk]
        )
    settle()


# Case 6c: kinds, jobs and compiled recount statements live on the graph they were built from
# (``Graph.kinds``, ``Graph.jobs``, ``Graph.memo``): no cache keyed by ``id(graph)`` is left to
# serve a dead graph's after its id is reused.
def test_6_each_graph_keeps_its_own_kinds_jobs_and_statements():
    from counts.apps import graph
    from counts.declare.graph import Graph
    from counts.run.aggregate import compile_recompute

    g = graph()
    label = "monitoring.deployment"
    without_sets = Graph.build(
        [s for s in g.specs if s.target.label != "monitoring.sourceimagecollection"]
    )
    assert g.kinds and g.jobs, "the app's graph has item kinds and jobs"
    assert without_sets.kinds.keys() <= g.kinds.keys()
    assert any(
        p.label == "monitoring.sourceimagecollection" for k in g.kinds.values() for p in k.parts
    )
    assert not any(
        p.label == "monitoring.sourceimagecollection"
        for k in without_sets.kinds.values()
        for p in k.parts
    ), "a graph built without the capture sets' counts has none of their parts"
    assert compile_recompute(g, label) is compile_recompute(g, label), "built once per graph"
    assert compile_recompute(without_sets, label) is not compile_recompute(g, label)


@pytest.mark.parametrize("step", ["drain.taken", "drain.before_targets", "drain.before_commit"])
def test_a_drain_failing_at_each_named_step_loses_nothing(world, step):
    """The drain's checkpoints are reached, and a drain that fails at one rolls back whole:
    its marks are back, and the next drains leave the counts exact."""
    from project.monitoring.models import Detection

    Detection.objects.create(source_image=world.i3, bbox=[1, 2, 3, 4])
    with (
        checkpoints.at(step, checkpoints.fail),
        pytest.raises(checkpoints.CheckpointFailure),
    ):
        counts.drain()
    settle()
