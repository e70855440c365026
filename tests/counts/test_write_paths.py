"""Every way of writing a base table leaves the right marks, and draining them makes counts exact.

Each test performs one write path against :func:`tests.conftest.build_world`, then checks two
things a user would notice: the marks the triggers wrote inside the writer's own transaction
(target model *and* ids, exactly: a missing id is a count that stays stale), and that after a
drain every cached count equals the independent truth of ``tests.truth``.
"""

from __future__ import annotations

from copy import copy

import psycopg
import pytest
from django.db import connection, transaction

from counts.run.notice import _Notice, quiet
from project.monitoring.models import (
    Deployment,
    Detection,
    Event,
    Occurrence,
    SourceImage,
    SourceImageCollection,
)
from tests.conftest import ALL, build_world
from tests.truth import assert_all_counts_exact, cached, drain_all, settle

D, E, S, C = (
    "monitoring.deployment",
    "monitoring.event",
    "monitoring.sourceimage",
    "monitoring.sourceimagecollection",
)
ITEMS = "item:monitoring.sourceimage"
BOX = [10, 10, 20, 20]


def expect(marks, **wanted) -> None:
    """The queue holds exactly these targets and ids (``D=[obj, ...]``, ``C=ALL``) among the
    four models these tests are about; marks for models holding counts added since (a
    project's or a taxon's) are theirs to check. Exact marks for every shape of count are
    pinned on the engine's test app (``test_engine_write_paths``)."""
    labels = {"D": D, "E": E, "S": S, "C": C}
    want = {labels[k]: v if v == ALL else {o.pk for o in v} for k, v in wanted.items()}
    have = {label: ids for label, ids in marks.by_target().items() if label in labels.values()}
    assert have == want


def count(obj, field: str) -> int:
    obj.refresh_from_db()
    return getattr(obj, field)


def test_new_detection_dirties_its_image_night_station_and_sets(world, marks):
    Detection(source_image=world.i2, bbox=BOX).save()
    expect(marks, S=[world.i2], E=[world.e1], D=[world.d1], C=[world.c1, world.c2])
    settle()
    assert count(world.i2, "detections_count") == 1
    assert count(world.c2, "source_images_with_detections_count") == 2


def test_saving_a_null_marker_with_a_bbox_makes_it_a_valid_detection(world, marks):
    world.det3.bbox = BOX
    world.det3.save()
    expect(marks, S=[world.i2], E=[world.e1], D=[world.d1], C=[world.c1, world.c2])
    settle()
    assert count(world.c1, "source_images_with_detections_count") == 2


def test_deleted_detection_dirties_its_image_and_ancestors(world, marks):
    world.det1.delete()
    # i1 keeps det2: its capture sets still count it as a capture with a detection, but c1
    # loses o1, whose only detection it was.
    expect(marks, S=[world.i1], E=[world.e1], D=[world.d1], C=[world.c1])
    settle()
    assert count(world.i1, "detections_count") == 1
    assert count(world.c1, "occurrences_count") == 0


def test_bulk_create_writes_one_mark_per_target_model(world, marks):
    Detection.objects.bulk_create(
        [
            Detection(source_image=world.i3, bbox=BOX),
            Detection(source_image=world.i4, bbox=BOX),
            Detection(source_image=world.i5, bbox=None),
        ]
    )
    # Only counts that change: i5's marker is no detection, and i4 (in c2) already had one.
    expect(
        marks, S=[world.i3, world.i4], E=[world.e2, world.e3], D=[world.d1, world.d2], C=[world.c1]
    )
    # One mark per item kind, however many rows (the captures' own count is credited from the
    # same item recompute: ``counts.declare.modes.fold_into_items``).
    assert sorted(target for target, _ids in marks.rows()) == [ITEMS]
    settle()


def test_bulk_update_dirties_both_changed_rows(world, marks):
    world.det3.bbox, world.det4.bbox = BOX, None
    Detection.objects.bulk_update([world.det3, world.det4], ["bbox"])
    # c2 gains i2 and loses i4 as a capture with a detection: no change for it.
    expect(
        marks, S=[world.i2, world.i4], E=[world.e1, world.e3], D=[world.d1, world.d2], C=[world.c1]
    )
    settle()
    assert count(world.d2, "detections_count") == 0


def test_queryset_update_marks_only_rows_whose_counted_columns_changed(world, marks):
    # det3 on i2 already has no bbox: the statement touches it without changing it.
    Detection.objects.filter(source_image__deployment=world.d1).update(bbox=None)
    expect(marks, S=[world.i1], E=[world.e1], D=[world.d1], C=[world.c1])
    settle()
    assert count(world.d1, "detections_count") == 0


def test_queryset_delete_of_images_dirties_nights_stations_and_sets(world, marks):
    SourceImage.objects.filter(event=world.e1).delete()
    expect(marks, S=[world.i1], E=[world.e1], D=[world.d1], C=[world.c1, world.c2])
    settle()
    assert count(world.c2, "source_images_count") == 1


def test_moved_detection_dirties_both_images(world, marks):
    world.det1.source_image = world.i4
    world.det1.save()
    # i1 keeps det2 and i4 had det4: no set's captures change, but o1 (counted) moves from
    # c1's captures to c2's.
    expect(
        marks,
        S=[world.i1, world.i4],
        E=[world.e1, world.e3],
        D=[world.d1, world.d2],
        C=[world.c1, world.c2],
    )
    settle()
    assert (count(world.i1, "detections_count"), count(world.i4, "detections_count")) == (1, 2)
    assert (count(world.c1, "occurrences_count"), count(world.c2, "occurrences_count")) == (0, 1)


def test_moved_image_dirties_both_nights_and_both_stations(world, marks):
    world.i3.deployment, world.i3.event = world.d2, world.e3
    world.i3.save()
    expect(marks, E=[world.e2, world.e3], D=[world.d1, world.d2])
    settle()
    assert count(world.e3, "captures_count") == 2


@pytest.mark.parametrize(
    "change, sets",
    [
        (lambda w: w.c1.images.add(w.i4, w.i5), ["c1"]),
        (lambda w: w.c1.images.remove(w.i1), ["c1"]),
        (lambda w: w.c2.images.clear(), ["c2"]),
        (lambda w: w.c3.images.set([w.i1, w.i5]), ["c3"]),
        (lambda w: w.c1.images.set([w.i1, w.i4]), ["c1"]),
    ],
    ids=["add", "remove", "clear", "set-into-empty", "set-replacing"],
)
def test_capture_set_side_m2m_writes_dirty_the_set(world, marks, change, sets):
    change(world)
    expect(marks, C=[getattr(world, s) for s in sets])
    settle()


@pytest.mark.parametrize(
    "change, sets",
    [
        (lambda w: w.i4.collections.add(w.c1, w.c3), ["c1", "c3"]),
        (lambda w: w.i2.collections.remove(w.c1), ["c1"]),
        (lambda w: w.i2.collections.clear(), ["c1", "c2"]),
        (lambda w: w.i5.collections.set([w.c2]), ["c2"]),
        (lambda w: w.i2.collections.set([w.c3]), ["c1", "c2", "c3"]),
    ],
    ids=["add", "remove", "clear", "set", "set-replacing"],
)
def test_image_side_m2m_writes_dirty_every_set_touched(world, marks, change, sets):
    change(world)
    expect(marks, C=[getattr(world, s) for s in sets])
    settle()


def test_deleting_an_image_removes_it_from_its_capture_sets(world, marks):
    # Django sends no m2m_changed for the through rows it deletes here, and i3 has no
    # detection whose deletion would mark its set anyway.
    copy(world.i3).delete()  # a copy: delete() clears the pk the expectation reads
    expect(marks, E=[world.e2], D=[world.d1], C=[world.c1])
    settle()
    assert count(world.c1, "source_images_count") == 2


def test_deleting_a_processed_image_updates_every_set_holding_it(world, marks):
    copy(world.i2).delete()
    expect(marks, E=[world.e1], D=[world.d1], C=[world.c1, world.c2])
    settle()
    assert count(world.c2, "source_images_processed_count") == 1


def test_deleting_a_capture_set_marks_only_that_set(world, marks):
    copy(world.c1).delete()
    expect(marks, C=[world.c1])
    settle()


def test_deleting_a_station_cascades_to_its_sets(world, marks):
    copy(world.d2).delete()
    expect(marks, D=[world.d2], E=[world.e3], S=[world.i4], C=[world.c2])
    settle()
    assert count(world.c2, "source_images_count") == 1


def test_deleting_a_project_cascades_and_spares_other_projects(world, marks):
    before = cached("monitoring_deployment")[world.d3.pk]
    copy(world.p1).delete()
    expect(
        marks,
        D=[world.d1, world.d2],
        E=[world.e1, world.e2, world.e3],
        S=[world.i1, world.i4],
        C=[world.c1, world.c2],
    )
    settle()
    assert cached("monitoring_deployment") == {world.d3.pk: before}


def test_deleting_a_night_detaches_its_captures_and_occurrences(world, marks):
    copy(world.e1).delete()  # SET_NULL on captures and occurrences
    expect(marks, D=[world.d1], E=[world.e1])
    settle()
    assert count(world.d1, "events_count") == 1


def test_raised_score_counts_the_occurrence_for_station_and_night(world, marks):
    world.o2.determination_score = 0.8
    world.o2.save()
    expect(marks, D=[world.d1], E=[world.e1], C=[world.c1])  # o2 is on i1, in c1
    settle()
    assert (count(world.d1, "taxa_count"), count(world.e1, "occurrences_count")) == (2, 2)
    assert (count(world.c1, "occurrences_count"), count(world.c1, "taxa_count")) == (2, 2)


def test_changed_determination_dirties_only_the_station_taxa(world, marks):
    world.o1.determination = None
    world.o1.save()
    expect(marks, D=[world.d1], E=[world.e1], C=[world.c1])  # the taxa of each
    settle()
    assert (count(world.d1, "taxa_count"), count(world.d1, "occurrences_count")) == (0, 1)
    assert (count(world.e1, "taxa_count"), count(world.c1, "taxa_count")) == (0, 0)
    assert count(world.c1, "occurrences_count") == 1


def test_moved_occurrence_dirties_both_stations_and_nights(world, marks):
    Occurrence.objects.filter(pk=world.o1.pk).update(deployment=world.d2, event=world.e3)
    expect(marks, D=[world.d1, world.d2], E=[world.e1, world.e3])
    settle()


def test_project_threshold_change_dirties_the_stations_and_nights_it_can_flip(world, marks):
    world.p1.default_filters_score_threshold = 0.3
    world.p1.save()
    # One job mark, however many occurrences the project holds; it can flip only o2 (0.4):
    # o3 has no score, and o1 (0.9) counts at either threshold.
    assert marks.count() == 1
    expect(marks, D=[world.d1], E=[world.e1], C=[world.c1])
    settle()
    assert (count(world.d1, "occurrences_count"), count(world.e1, "occurrences_count")) == (2, 2)


def test_station_moved_to_another_project_uses_its_threshold(world, marks):
    world.d1.project = world.p2
    world.d1.save()
    expect(marks, D=[world.d1], E=[world.e1], C=[world.c1])
    settle()
    assert count(world.d1, "taxa_count") == 2


def test_night_moved_to_another_station_dirties_both_stations(world, marks):
    # An occurrence is judged by its own station's project, so the night itself stays clean.
    Event.objects.filter(pk=world.e2.pk).update(deployment=world.d2)
    expect(marks, D=[world.d1, world.d2])
    settle()


def test_truncate_marks_every_row_and_drain_expands_it(world, marks):
    with connection.cursor() as cursor:
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")  # TRUNCATE refuses pending FK checks
        cursor.execute("TRUNCATE monitoring_detection")
    # Every capture and occurrence with a ledger is recomputed as an item: nothing is
    # recounted in full.
    assert [(t, ids) for t, ids in marks.rows() if not t.startswith("item:")] == []
    # o2 and o3 (not counted) have no ledger.
    assert marks.items()["item:monitoring.occurrence"] == {world.o1.pk, world.o4.pk}
    assert marks.items()[ITEMS] == {world.i1.pk, world.i2.pk, world.i4.pk, world.i5.pk}
    drain_all()
    assert_all_counts_exact()
    assert count(world.i1, "detections_count") == 0
    assert count(world.d1, "detections_count") == 0


def test_truncating_the_through_table_marks_every_capture_set(world, marks):
    with connection.cursor() as cursor:
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
        cursor.execute("TRUNCATE monitoring_sourceimagecollection_images")
    expect(marks, C=ALL)
    settle()
    assert count(world.c1, "source_images_count") == 0


def test_raw_sql_through_a_plain_cursor_is_captured(world, marks):
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO monitoring_detection (source_image_id, bbox, created_at, updated_at)"
            " VALUES (%s, '[1, 2, 3, 4]', now(), now())",
            [world.i3.pk],
        )
        cursor.execute(
            "INSERT INTO monitoring_sourceimagecollection_images"
            " (sourceimagecollection_id, sourceimage_id) VALUES (%s, %s)",
            [world.c3.pk, world.i3.pk],
        )
        cursor.execute("UPDATE monitoring_occurrence SET determination_score = 0.99")
        cursor.execute("DELETE FROM monitoring_detection WHERE id = %s", [world.det5.pk])
    expect(
        marks,
        S=[world.i3, world.i5],
        E=[world.e1, world.e2, world.e3],
        D=[world.d1, world.d2, world.d3],
        C=[world.c1, world.c2, world.c3],  # c2: o3, on i4, now counts
    )
    settle()
    assert count(world.c3, "source_images_count") == 1
    assert count(world.d2, "occurrences_count") == 1


def test_raw_insert_that_names_no_cached_column_succeeds_and_is_counted(world, marks):
    """Other clients know nothing of cached columns: the database defaults them to 0."""
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO monitoring_sourceimage (deployment_id, timestamp, path, created_at,"
            " updated_at) VALUES (%s, now(), 'raw.jpg', now(), now()) RETURNING id",
            [world.d1.pk],
        )
        (image_id,) = cursor.fetchone()
        cursor.execute(
            "INSERT INTO monitoring_detection (source_image_id, bbox, created_at, updated_at)"
            " VALUES (%s, '[1, 2, 3, 4]', now(), now())",
            [image_id],
        )
    assert marks.of("monitoring.sourceimage") == {image_id}
    settle()
    assert count(SourceImage.objects.get(pk=image_id), "detections_count") == 1


@pytest.mark.django_db(transaction=True)
def test_writes_from_another_client_are_captured(marks, make_world):
    """psycopg without Django: the trigger, not an execute wrapper, writes the mark."""
    world = make_world()
    settings = connection.settings_dict
    params = {"host": settings["HOST"], "port": settings["PORT"], "user": settings["USER"]}
    with psycopg.connect(dbname=settings["NAME"], autocommit=True, **params) as other:
        other.execute(
            "INSERT INTO monitoring_detection (source_image_id, bbox, created_at, updated_at)"
            " VALUES (%s, '[1, 2, 3, 4]', now(), now())",
            [world.i5.pk],
        )
    expect(marks, S=[world.i5], D=[world.d3])
    settle()


@pytest.mark.parametrize(
    "rename",
    [
        lambda w: SourceImageCollection.objects.filter(pk=w.c1.pk).update(name="July"),
        lambda w: Deployment.objects.filter(pk=w.d1.pk).update(name="Station Z"),
        lambda w: SourceImage.objects.filter(pk=w.i1.pk).update(path="moved/1.jpg"),
        lambda w: Detection.objects.update(score=0.1),
        lambda w: w.p1.__class__.objects.update(name="Renamed"),
        lambda w: w.moth.__class__.objects.filter(pk=w.moth.pk).update(name="Luna"),
        lambda w: Event.objects.update(end=w.e1.start),
    ],
    ids=["capture set", "station", "capture", "detection", "project", "taxon", "night"],
)
def test_columns_no_count_reads_mark_nothing(world, marks, rename):
    rename(world)
    assert marks.rows() == []


def test_saving_unchanged_rows_marks_nothing(world, marks):
    for obj in (world.c1, world.d1, world.i1, world.e1, world.o1, world.det1, world.p1):
        obj.save()
    assert marks.rows() == []


def test_marks_roll_back_with_the_writer(world, marks):
    with pytest.raises(RuntimeError), transaction.atomic():
        Detection.objects.create(source_image=world.i1, bbox=BOX)
        assert marks.of(S) == {world.i1.pk}  # visible inside the writer's transaction
        raise RuntimeError("abort")
    assert marks.rows() == []
    settle()


def notices(callbacks) -> list[_Notice]:
    return [c for c in callbacks if isinstance(c, _Notice)]


# A transaction holds at most one notice, so these tests build their data inside the captured
# block (or quietly) rather than use ``world``, whose writes would have registered it already.


def test_a_writing_transaction_announces_its_targets_once_after_commit(
    marks, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks() as callbacks:
        build_world()  # dozens of writes to watched tables
    (notice,) = notices(callbacks)
    assert notice.targets >= {C, D, E, ITEMS}


def test_rolled_back_writes_announce_nothing(marks, django_capture_on_commit_callbacks):
    with (
        django_capture_on_commit_callbacks() as callbacks,
        pytest.raises(RuntimeError),
        transaction.atomic(),
    ):
        build_world()
        raise RuntimeError("abort")
    assert notices(callbacks) == []


def test_the_engines_own_writes_announce_nothing(marks, django_capture_on_commit_callbacks):
    with quiet():
        build_world()
    with django_capture_on_commit_callbacks() as callbacks:
        results = drain_all()
    assert sum(sum(r.changed.values()) for r in results) > 0  # it did write counts
    assert notices(callbacks) == []
