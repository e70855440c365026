"""Items that reach their targets through several rows: a capture set's occurrences and taxa.

An occurrence counts towards every capture set holding a capture one of its detections is on
(occurrence ← detections → captures ← the sets' membership rows), judged by the threshold of
its *own* project. Each test changes one link of that chain (or the threshold) and checks
every cached count against the hand-written truth of ``tests.truth`` after draining, and the
capture-set figures a user would see.
"""

from __future__ import annotations

from django.db import connection

from project.monitoring.models import Detection, Occurrence, SourceImage, SourceImageCollection
from tests.truth import settle


def sets(world, *names) -> list[tuple[int, int]]:
    """``(occurrences_count, taxa_count)`` of the named capture sets, as stored."""
    rows = SourceImageCollection.objects.in_bulk([getattr(world, n).pk for n in names])
    found = [rows[getattr(world, n).pk] for n in names]
    return [(row.occurrences_count, row.taxa_count) for row in found]


def test_the_world_starts_with_the_counted_occurrences_of_each_set(world):
    # c1 holds i1 (o1 counted: moth; o2 below p1's 0.5) ; c2 holds i4 (o3 has no score).
    assert sets(world, "c1", "c2", "c3") == [(1, 1), (0, 0), (0, 0)]


def test_an_occurrence_is_judged_by_its_own_projects_threshold_not_the_sets(world):
    # o4 (0.35) belongs to Panama (threshold 0.3); c1 belongs to Vermont (0.5).
    world.c1.images.add(world.i5)
    settle()
    assert sets(world, "c1") == [(2, 2)]


def test_a_detection_joining_an_occurrence_counts_it_in_every_set_of_its_capture(world):
    Detection.objects.create(source_image=world.i2, bbox=[1, 1, 2, 2], occurrence=world.o4)
    settle()
    assert sets(world, "c1", "c2") == [(2, 2), (1, 1)]


def test_an_occurrence_on_two_captures_of_one_set_counts_once(world):
    Detection.objects.create(source_image=world.i3, bbox=[1, 1, 2, 2], occurrence=world.o1)
    settle()
    assert sets(world, "c1") == [(1, 1)]
    world.c1.images.remove(world.i1)  # o1 is still on i3
    settle()
    assert sets(world, "c1") == [(1, 1)]
    world.c1.images.remove(world.i3)
    settle()
    assert sets(world, "c1") == [(0, 0)]


def test_two_occurrences_of_one_taxon_are_one_taxon(world):
    o5 = Occurrence.objects.create(
        deployment=world.d1, determination=world.moth, determination_score=0.95
    )
    Detection.objects.create(source_image=world.i2, bbox=[1, 1, 2, 2], occurrence=o5)
    settle()
    assert sets(world, "c1", "c2") == [(2, 1), (1, 1)]


def test_a_threshold_change_flips_the_sets_of_the_occurrences_it_flips(world):
    world.c2.images.add(world.i5)  # o4 (0.35, Panama)
    settle()
    assert sets(world, "c2") == [(1, 1)]
    world.p2.default_filters_score_threshold = 0.4
    world.p2.save()
    settle()
    assert sets(world, "c2") == [(0, 0)]


def test_image_side_writes_and_cascades_move_the_counts(world):
    world.i5.collections.add(world.c1, world.c3)
    settle()
    assert sets(world, "c1", "c3") == [(2, 2), (1, 1)]
    SourceImage.objects.filter(pk=world.i1.pk).delete()  # cascades to det1, det2, memberships
    settle()
    assert sets(world, "c1", "c3") == [(1, 1), (1, 1)]
    Occurrence.objects.filter(pk=world.o4.pk).delete()  # its detection's occurrence is SET_NULL
    settle()
    assert sets(world, "c1", "c3") == [(0, 0), (0, 0)]


def test_raw_sql_moves_and_truncates(world):
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE monitoring_sourceimagecollection_images SET sourceimagecollection_id = %s"
            " WHERE sourceimagecollection_id = %s AND sourceimage_id = %s",
            [world.c3.pk, world.c1.pk, world.i1.pk],
        )
    settle()
    assert sets(world, "c1", "c3") == [(0, 0), (1, 1)]
    with connection.cursor() as cursor:
        cursor.execute("UPDATE monitoring_detection SET source_image_id = %s", [world.i4.pk])
    settle()
    assert sets(world, "c2", "c3") == [(2, 2), (0, 0)]
    with connection.cursor() as cursor:
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
        cursor.execute("TRUNCATE monitoring_sourceimagecollection_images")
    settle()
    assert sets(world, "c1", "c2", "c3") == [(0, 0), (0, 0), (0, 0)]
