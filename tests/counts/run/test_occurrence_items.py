"""Occurrence counts kept through ledgers: threshold jobs, distinct taxa, recounts beside them.

The world (``tests.conftest.build_world``): project p1 at threshold 0.5 holds stations d1 and
d2; d1 has o1 (moth, 0.9, counted) and o2 (beetle, 0.4, not counted), d2 has o3 (moth, no
score). Project p2 at 0.3 holds d3 with o4 (beetle, 0.35, counted).
"""

from __future__ import annotations

import pytest
from django.db import connection

import counts
from counts.operate.recomputing import recompute_rows
from project.monitoring.models import Deployment, Detection, Event, Occurrence, Project
from tests.interleave import drain_to_empty
from tests.truth import assert_all_counts_exact, drain_all

pytestmark = pytest.mark.django_db(transaction=True)  # other connections see the world

BOX = [0, 0, 1, 1]
OCCURRENCES = "item:monitoring.occurrence"


def station(d) -> tuple[int, int]:
    row = Deployment.objects.get(pk=d.pk)
    return row.occurrences_count, row.taxa_count


def set_threshold(client, project, value: float) -> None:
    updated = client.execute(
        "UPDATE monitoring_project SET default_filters_score_threshold = %s WHERE id = %s",
        [value, project.pk],
    )
    assert updated == 1


def test_a_threshold_change_recomputes_only_the_occurrences_it_can_flip(make_world, marks):
    world = make_world()
    for k in range(40):  # scores far from both thresholds: they cannot flip
        Occurrence.objects.create(
            deployment=world.d1, determination=world.moth, determination_score=0.05 + k / 200
        )
    Occurrence.objects.create(
        deployment=world.d2, determination=world.beetle, determination_score=0.97
    )
    drain_all()
    Project.objects.filter(pk=world.p1.pk).update(default_filters_score_threshold=0.35)
    assert marks.count() == 1  # one job mark, whatever the project holds
    result = counts.drain()
    # Candidates have scores in [0.35, 0.5]: o2 (0.4) and the two seeded at 0.35 and 0.25+…
    in_range = Occurrence.objects.filter(
        deployment__project=world.p1, determination_score__range=(0.35, 0.5)
    ).count()
    assert result.targets[OCCURRENCES] == in_range < Occurrence.objects.count() / 3
    drain_all()
    assert_all_counts_exact()
    assert station(world.d1) == (
        Occurrence.objects.filter(deployment=world.d1, determination_score__gte=0.35).count(),
        2,
    )


@pytest.mark.parametrize("drain_between", [False, True], ids=["one-drain", "drain-between"])
def test_a_chain_of_threshold_changes_ends_at_the_last_threshold(make_world, drain_between):
    world = make_world()
    for value in (0.6, 0.3, 0.95, 0.5, 0.39):
        Project.objects.filter(pk=world.p1.pk).update(default_filters_score_threshold=value)
        if drain_between:
            counts.drain(batch_size=1, max_ids=1)
    drain_all()
    assert_all_counts_exact()
    assert station(world.d1) == (2, 2)


def rescore(client, occurrence, score: float) -> None:
    updated = client.execute(
        "UPDATE monitoring_occurrence SET determination_score = %s WHERE id = %s",
        [score, occurrence.pk],
    )
    assert updated == 1


@pytest.mark.parametrize("order", ["threshold-first", "score-first"])
def test_a_threshold_change_racing_a_rescore_counts_the_occurrence_once(make_world, harness, order):
    """The job is expanded while another connection's rescore of a candidate is uncommitted:
    either the expansion finds it in range or its own mark brings it; never twice."""
    world = make_world()
    admin, scorer = harness.sql("admin"), harness.sql("scorer")
    drainer = harness.orm("drain")
    writes = [
        lambda: set_threshold(admin, world.p1, 0.3),
        lambda: rescore(scorer, world.o2, 0.2),
    ]
    first, second = writes if order == "threshold-first" else writes[::-1]
    first()
    (admin if order == "threshold-first" else scorer).commit()
    second()  # uncommitted while the drain expands the first write's marks
    drainer.begin()
    while not drainer.drain(batch_size=1, max_ids=1).empty:
        pass
    (scorer if order == "threshold-first" else admin).commit()
    drainer.commit()
    drain_to_empty()
    assert_all_counts_exact()
    assert station(world.d1) == (1, 1)  # o1 only: o2 now scores 0.2 < 0.3


@pytest.mark.parametrize("taxon", ["same-taxon", "other-taxa"])
def test_two_drains_each_adding_a_first_counted_occurrence_of_a_taxon(make_world, harness, taxon):
    """Two held drains credit the same (station, taxon) multiplicity: the second waits on the
    first's row and sees its result, so the taxon is counted once."""
    world = make_world()
    writer = harness.sql("writer")
    second_taxon = world.moth if taxon == "same-taxon" else world.beetle
    for determination in (world.moth, second_taxon):
        writer.execute(
            "INSERT INTO monitoring_occurrence (deployment_id, event_id, determination_id,"
            " determination_score, created_at, updated_at) VALUES (%s, %s, %s, 0.8, now(), now())",
            [world.d2.pk, world.e3.pk, determination.pk],
        )
        writer.commit()
    one, two = harness.orm("drain 1"), harness.orm("drain 2")
    one.begin()
    assert one.drain(batch_size=1, max_ids=1).marks == 1
    step = two.start_drain(batch_size=1, max_ids=1)
    if taxon == "same-taxon":
        assert step.blocked  # on the (d2, moth) multiplicity row, until drain 1 commits
        one.commit()
        assert step.result().marks == 1
    else:
        # Other multiplicity rows: drain 2 waits for the station and night drain 1 holds only
        # briefly (counts.run.target_locks), puts their credits back and finishes, drain 1 open.
        assert step.result(timeout=5).marks == 1
        one.commit()
    drain_to_empty()
    assert_all_counts_exact()
    assert station(world.d2) == (2, 1 if taxon == "same-taxon" else 2)


def test_moving_a_station_to_another_project_recounts_its_occurrences_there(make_world, marks):
    world = make_world()
    Deployment.objects.filter(pk=world.d1.pk).update(project=world.p2)  # threshold 0.3
    # Two job marks, whatever the station holds: its occurrences read another threshold, and
    # count towards another project's taxa.
    assert marks.count() == 2
    drain_all()
    assert_all_counts_exact()
    assert station(world.d1) == (2, 2)
    assert Project.objects.get(pk=world.p2.pk).taxa_count == 2  # its beetle, and d1's moth
    assert Project.objects.get(pk=world.p1.pk).taxa_count == 0  # d2's moth has no score


def test_a_determination_change_moves_the_taxon_and_a_delete_removes_it(make_world):
    world = make_world()
    Occurrence.objects.filter(pk=world.o1.pk).update(determination=world.beetle)
    drain_all()
    assert station(world.d1) == (1, 1)
    Occurrence.objects.filter(pk=world.o1.pk).delete()
    drain_all()
    assert station(world.d1) == (0, 0)
    assert Event.objects.get(pk=world.e1.pk).occurrences_count == 0
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM counts_multiplicity WHERE n <= 0")
        assert cursor.fetchone()[0] == 0  # emptied pairs are removed
    assert_all_counts_exact()


def test_recompute_now_while_occurrence_and_capture_marks_wait(make_world):
    world = make_world()
    Detection.objects.create(source_image=world.i1, bbox=BOX)
    Occurrence.objects.filter(pk=world.o2.pk).update(determination_score=0.95)
    Project.objects.filter(pk=world.p1.pk).update(default_filters_score_threshold=0.3)
    recompute_rows({"monitoring.deployment": [world.d1.pk, world.d2.pk]})
    drain_all()
    assert_all_counts_exact()


def test_recompute_now_counts_a_capture_with_two_waiting_marks_once(make_world):
    world = make_world()
    Detection.objects.create(source_image=world.i1, bbox=BOX)
    recompute_rows({"monitoring.deployment": [world.d1.pk]})
    Detection.objects.create(source_image=world.i1, bbox=BOX)  # a second mark for i1
    recompute_rows({"monitoring.deployment": [world.d1.pk]})
    drain_all()
    assert_all_counts_exact()


def test_reconcile_repairs_a_multiplicity_and_the_count_stays_repaired(make_world):
    world = make_world()
    with connection.cursor() as cursor:
        cursor.execute("UPDATE counts_multiplicity SET n = n + 5")  # drift behind the engine
        cursor.execute("DELETE FROM counts_multiplicity WHERE value = %s", [world.beetle.pk])
    report = counts.reconcile()
    assert sum(v for k, v in report.ledgers[OCCURRENCES].drift.items() if "pairs" in k) >= 2
    Occurrence.objects.filter(pk=world.o4.pk).update(determination_score=0.1)  # d3 loses beetle
    drain_all()
    assert_all_counts_exact()
    assert station(world.d3) == (0, 0)
