"""``counts.run.items``: what one recompute writes to a ledger and credits to targets.

A drain's exactness rests on :func:`counts.run.items.recompute`: under the ledger row's lock
(``counts.run.item_locks``) it writes the item's truth as its ledger and credits exactly
``contribution(truth) - contribution(old ledger)``. A credit of the truth instead of the
difference, a ledger left behind for an item that no longer counts, or a write to a ledger the
caller did not lock would each drift a count for good, with no mark left to repair it. These
tests call the module directly, inside ``engine_transaction``, with ledgers and credits stated
by hand from :func:`tests.conftest.build_world` (i1: station d1, night e1, two valid
detections, set c1; i2: one null-marker detection, sets c1 and c2; i3: no detection, set c1;
i4: one valid detection, station d2, night e3, set c2). The credits are then queued as delta
marks (as a drain does for rows someone holds) and everything is drained: the counts must
equal the independent truth, and invariants I, J, M must hold.
"""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
from django.db import connection

from counts.apps import graph
from counts.base.mark import Kind, Mark
from counts.run import applying, item_locks, items
from counts.run.engine_transaction import engine_transaction
from project.monitoring.models import Deployment, Detection, Occurrence, Project, SourceImage
from tests.truth import drain_all, settle

pytestmark = pytest.mark.django_db

CAPTURES, OCCURRENCES = "item:monitoring.sourceimage", "item:monitoring.occurrence"
D, E, S, C, P = (
    "monitoring.deployment",
    "monitoring.event",
    "monitoring.sourceimage",
    "monitoring.sourceimagecollection",
    "monitoring.project",
)
BOX = [1, 2, 3, 4]


def kind(name: str):
    return graph().kinds[name]


def key(name: str, label: str, column: str) -> str:
    (part,) = [p for p in kind(name).parts if (p.label, p.column) == (label, column)]
    return part.key


def recompute(name: str, ids: list[int], lock: list[int] | None = None):
    """Lock ``lock`` (default: ``ids``), recompute ``ids`` and queue the credits as delta marks
    (keeping I); returns the result and the credits, zero sums left out."""
    credits: dict = defaultdict(int)
    with engine_transaction() as cursor:
        locked = item_locks.lock_items(cursor, kind(name), sorted(ids if lock is None else lock))
        result = items.recompute(cursor, kind(name), ids, credits, locked)
        by_label: dict = defaultdict(dict)
        for (label, column, target), amount in credits.items():
            by_label[label][(column, target)] = amount
        for label, amounts in by_label.items():
            applying.defer_credits(cursor, label, amounts, retry_ms=0)
    return result, {k: v for k, v in credits.items() if v}


def ledger(name: str, item_id: int) -> dict | None:
    """The item's ledger state as this connection sees it, None when it has no row."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT state FROM counts_ledger WHERE kind = %s AND item_id = %s", [name, item_id]
        )
        row = cursor.fetchone()
    return None if row is None else json.loads(row[0]) if isinstance(row[0], str) else row[0]


def capture_state(amount: int, station: int, night: int, image: int, sets: list[int]) -> dict:
    """A capture's ledger with ``amount`` valid detections (and at least one) in ``sets``."""
    state = {
        key(CAPTURES, D, "detections_count"): [amount, station],
        key(CAPTURES, E, "detections_count"): [amount, night],
        key(CAPTURES, S, "detections_count"): [amount, image],
    }
    if sets:
        state[key(CAPTURES, C, "source_images_with_detections_count")] = [1, *sets]
        state[key(CAPTURES, C, "source_images_processed_count")] = [1, *sets]
    return state


def test_a_first_valid_detection_credits_the_capture_station_night_and_set_once(world):
    Detection.objects.create(source_image=world.i3, bbox=BOX)
    assert ledger(CAPTURES, world.i3.pk) is None  # it never counted
    result, credits = recompute(CAPTURES, [world.i3.pk])
    assert (result.locked, result.held, result.changed) == (1, [], 1)
    assert ledger(CAPTURES, world.i3.pk) == capture_state(
        1, world.d1.pk, world.e2.pk, world.i3.pk, [world.c1.pk]
    )
    assert credits == {
        (D, "detections_count", world.d1.pk): 1,
        (E, "detections_count", world.e2.pk): 1,
        (S, "detections_count", world.i3.pk): 1,
        (C, "source_images_with_detections_count", world.c1.pk): 1,
        (C, "source_images_processed_count", world.c1.pk): 1,
    }
    settle()


def test_credits_are_the_difference_from_the_old_ledger_not_the_truth(world):
    """i1 already had two valid detections: a third (and a null marker) adds 1 to the
    detection counts and nothing to its set, which counted it already."""
    Detection.objects.create(source_image=world.i1, bbox=BOX)
    Detection.objects.create(source_image=world.i1, bbox=None)
    result, credits = recompute(CAPTURES, [world.i1.pk])
    assert result.changed == 1
    assert ledger(CAPTURES, world.i1.pk) == capture_state(
        3, world.d1.pk, world.e1.pk, world.i1.pk, [world.c1.pk]
    )
    assert credits == {
        (D, "detections_count", world.d1.pk): 1,
        (E, "detections_count", world.e1.pk): 1,
        (S, "detections_count", world.i1.pk): 1,
    }
    settle()


def test_a_capture_in_two_sets_credits_each_set_once(world):
    """i2 was processed (a null marker) in sets c1 and c2; its first valid detection adds it
    to both sets' "with detections" counts, and to nothing "processed" already counted."""
    Detection.objects.create(source_image=world.i2, bbox=BOX)
    _result, credits = recompute(CAPTURES, [world.i2.pk])
    assert ledger(CAPTURES, world.i2.pk) == capture_state(
        1, world.d1.pk, world.e1.pk, world.i2.pk, sorted([world.c1.pk, world.c2.pk])
    )
    assert credits == {
        (D, "detections_count", world.d1.pk): 1,
        (E, "detections_count", world.e1.pk): 1,
        (S, "detections_count", world.i2.pk): 1,
        (C, "source_images_with_detections_count", world.c1.pk): 1,
        (C, "source_images_with_detections_count", world.c2.pk): 1,
    }
    settle()


def test_a_capture_moved_to_another_station_takes_its_credits_along(world):
    SourceImage.objects.filter(pk=world.i1.pk).update(deployment=world.d2, event=world.e3)
    _result, credits = recompute(CAPTURES, [world.i1.pk])
    assert credits == {
        (D, "detections_count", world.d1.pk): -2,
        (D, "detections_count", world.d2.pk): 2,
        (E, "detections_count", world.e1.pk): -2,
        (E, "detections_count", world.e3.pk): 2,
    }
    assert ledger(CAPTURES, world.i1.pk) == capture_state(
        2, world.d2.pk, world.e3.pk, world.i1.pk, [world.c1.pk]
    )
    settle()


def test_an_item_whose_truth_credits_nothing_loses_its_ledger_row(world):
    """i4's only valid detection goes: its row is deleted (no row means nothing credited); a
    new capture, given an empty row to lock, keeps none either."""
    Detection.objects.filter(source_image=world.i4).delete()
    fresh = SourceImage.objects.create(
        deployment=world.d2, event=world.e3, timestamp=world.i4.timestamp, path="b/2.jpg"
    )
    assert ledger(CAPTURES, world.i4.pk) is not None
    result, credits = recompute(CAPTURES, [world.i4.pk, fresh.pk])
    assert (result.locked, result.changed) == (2, 1)  # the new capture's ledger stays {}
    assert ledger(CAPTURES, world.i4.pk) is None and ledger(CAPTURES, fresh.pk) is None
    assert credits == {
        (D, "detections_count", world.d2.pk): -1,
        (E, "detections_count", world.e3.pk): -1,
        (S, "detections_count", world.i4.pk): -1,
        (C, "source_images_with_detections_count", world.c2.pk): -1,
        (C, "source_images_processed_count", world.c2.pk): -1,
    }
    settle()


def test_ids_the_caller_did_not_lock_come_back_held_and_keep_their_ledger(world):
    Detection.objects.create(source_image=world.i1, bbox=BOX)
    Detection.objects.create(source_image=world.i3, bbox=BOX)
    result, credits = recompute(CAPTURES, [world.i3.pk, world.i1.pk], lock=[world.i1.pk])
    assert (result.locked, result.held) == (1, [world.i3.pk])
    assert ledger(CAPTURES, world.i3.pk) is None  # not locked, so not written
    assert {target for (_label, _column, target) in credits} == {
        world.d1.pk,
        world.e1.pk,
        world.i1.pk,
    }
    nothing, none = recompute(CAPTURES, [world.i3.pk], lock=[])
    assert (nothing.locked, nothing.held, none) == (0, [world.i3.pk], {})
    settle()  # the trigger's item mark for i3 is still queued: the drain credits it


def test_a_rescored_occurrence_credits_its_counts_and_a_new_taxon_once(world):
    """o2 (beetle, 0.4) now reaches d1's threshold 0.5: beetle is a new taxon at d1."""
    Occurrence.objects.filter(pk=world.o2.pk).update(determination_score=0.8)
    _result, credits = recompute(OCCURRENCES, [world.o2.pk])
    # o2 is on i1, in c1; its project is p1.
    assert credits == {
        (D, "occurrences_count", world.d1.pk): 1,
        (E, "occurrences_count", world.e1.pk): 1,
        (C, "occurrences_count", world.c1.pk): 1,
        (D, "taxa_count", world.d1.pk): 1,
        (E, "taxa_count", world.e1.pk): 1,
        (C, "taxa_count", world.c1.pk): 1,
        (P, "taxa_count", world.p1.pk): 1,
    }
    assert ledger(OCCURRENCES, world.o2.pk) == {
        key(OCCURRENCES, D, "occurrences_count"): [1, world.d1.pk],
        key(OCCURRENCES, E, "occurrences_count"): [1, world.e1.pk],
        key(OCCURRENCES, C, "occurrences_count"): [1, world.c1.pk],
        key(OCCURRENCES, D, "taxa_count"): [1, world.d1.pk, world.beetle.pk],
        key(OCCURRENCES, E, "taxa_count"): [1, world.e1.pk, world.beetle.pk],
        key(OCCURRENCES, C, "taxa_count"): [1, world.c1.pk, world.beetle.pk],
        key(OCCURRENCES, P, "taxa_count"): [1, world.p1.pk, world.beetle.pk],
    }
    settle()


def engine_tables(cursor) -> list:
    """Every ledger, multiplicity and mark row."""
    rows = []
    for sql in (
        "SELECT kind, item_id, state::text FROM counts_ledger ORDER BY 1, 2",
        "SELECT key, target_id, value, n FROM counts_multiplicity ORDER BY 1, 2, 3",
        "SELECT id, target, ids, field, deltas FROM counts_dirtymark ORDER BY id",
    ):
        cursor.execute(sql)
        rows.append(cursor.fetchall())
    return rows


def test_preview_reports_what_recompute_will_credit_and_writes_nothing(world):
    Detection.objects.create(source_image=world.i3, bbox=BOX)
    Detection.objects.filter(source_image=world.i4).delete()
    Occurrence.objects.filter(pk=world.o1.pk).update(determination=None)
    previewed: dict = defaultdict(int)
    with connection.cursor() as cursor:
        before = engine_tables(cursor)
        items.preview(cursor, kind(CAPTURES), [world.i3.pk, world.i4.pk, world.i4.pk], previewed)
        items.preview(cursor, kind(OCCURRENCES), [world.o1.pk], previewed)
        assert engine_tables(cursor) == before
    _result, captures = recompute(CAPTURES, [world.i3.pk, world.i4.pk])
    _result, occurrences = recompute(OCCURRENCES, [world.o1.pk])
    assert {k: v for k, v in previewed.items() if v} == captures | occurrences
    # o1 still counts, with no taxon: each taxa count of its targets loses the moth.
    assert occurrences == {
        (D, "taxa_count", world.d1.pk): -1,
        (E, "taxa_count", world.e1.pk): -1,
        (C, "taxa_count", world.c1.pk): -1,
        (P, "taxa_count", world.p1.pk): -1,
    }
    settle()


def queued_job(cursor):
    """The one setting job mark in the queue, and its job (a station's move to another
    project also writes a link job mark, for the project's taxa: not this test's)."""
    cursor.execute("SELECT id, target, ids, field, deltas, payload FROM counts_dirtymark")
    jobs = {j.key: j for j in kind(OCCURRENCES).jobs}
    marks = [Mark.from_row(*row) for row in cursor.fetchall()]
    assert all(mark.kind is Kind.JOB for mark in marks)
    (mark,) = [m for m in marks if jobs[m.field].values is None]
    return mark, jobs[mark.field]


def expand_queued_job() -> list[int]:
    with connection.cursor() as cursor:
        mark, job = queued_job(cursor)
        return items.expand(cursor, job, list(mark.ids), mark.payload)


def scores_in(project, lo: float, hi: float) -> set[int]:
    rows = Occurrence.objects.filter(
        deployment__project=project, determination_score__range=(lo, hi)
    )
    return set(rows.values_list("pk", flat=True))


def add_occurrences(world) -> None:
    stations = [world.d1, world.d2, world.d1, world.d2, world.d1, world.d3, world.d1, world.d3]
    scores = [0.3, 0.5, 0.6, 0.85, 0.95, 0.6, None, 0.45]
    for station, score in zip(stations, scores, strict=True):
        Occurrence.objects.create(
            deployment=station, determination=world.moth, determination_score=score
        )
    drain_all()


@pytest.mark.parametrize("new", [0.85, 0.35], ids=["raised", "lowered"])
def test_a_threshold_job_expands_to_the_occurrences_between_old_and_new(world, new):
    add_occurrences(world)
    counted_before = scores_in(world.p1, 0.5, 1.0)
    Project.objects.filter(pk=world.p1.pk).update(default_filters_score_threshold=new)
    found = expand_queued_job()
    assert found == sorted(found)
    lo, hi = sorted((0.5, new))
    assert set(found) == scores_in(world.p1, lo, hi)  # no other project's, none outside
    flipped = counted_before ^ scores_in(world.p1, new, 1.0)
    assert flipped and flipped <= set(found)
    settle()


def test_one_job_mark_for_two_projects_expands_each_by_its_own_old_and_new(world):
    add_occurrences(world)
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE monitoring_project SET default_filters_score_threshold ="
            " CASE WHEN id = %s THEN 0.85 ELSE 0.5 END",
            [world.p1.pk],
        )
    found = expand_queued_job()
    assert set(found) == scores_in(world.p1, 0.5, 0.85) | scores_in(world.p2, 0.3, 0.5)
    settle()


def test_a_station_moved_to_another_project_expands_to_its_occurrences_only(world):
    Deployment.objects.filter(pk=world.d2.pk).update(project=world.p2)
    with connection.cursor() as cursor:
        mark, job = queued_job(cursor)
        assert job.compared is None and mark.payload is None
        found = items.expand(cursor, job, list(mark.ids), mark.payload)
    assert found == sorted(
        Occurrence.objects.filter(deployment=world.d2).values_list("pk", flat=True)
    )
    settle()
