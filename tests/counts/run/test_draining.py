"""Draining: plan targets from marks, lock, recompute, write only what changed, lose nothing.

Cached columns are corrupted here on purpose, with triggers off (as a restore would): such a
write marks nothing, and a drain that claims to have recomputed a row must put the true value
back. Every test ends by comparing all cached counts with the independent truth.
"""

from __future__ import annotations

import datetime

import pytest
from django.db import connection

import counts
from counts.base.errors import UnknownTargetError
from counts.run import aggregate, applying, draining
from counts.run import marks as marks_module
from project.monitoring.models import Detection, Event, SourceImage
from tests.engine_app.models import Author
from tests.truth import assert_all_counts_exact, drain_all, triggers_off

S, E = "monitoring.sourceimage", "monitoring.event"
LONG_AGO = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)


def sql(statement: str, params=()) -> None:
    with connection.cursor() as cursor:
        cursor.execute(statement, params)


def add_mark(label: str, ids: list[int] | None) -> None:
    sql("INSERT INTO counts_dirtymark (target, ids) VALUES (%s, %s)", [label, ids])


def corrupt(table: str, column: str, ids: list[int], value: int = 99) -> None:
    with triggers_off() as cursor:
        cursor.execute(f"UPDATE {table} SET {column} = %s WHERE id = ANY(%s)", [value, ids])


def test_writing_a_cached_column_marks_nothing(world, marks):
    """A write to a cached column is kept out by the guards and changes no count: no mark."""
    sql("UPDATE monitoring_sourceimage SET detections_count = 99 WHERE id = %s", [world.i1.pk])
    sql("UPDATE monitoring_deployment SET counts_updated_at = now()")
    assert marks.rows() == []


def test_drain_groups_marks_per_target_and_reports_what_it_did(world, marks):
    corrupt("monitoring_sourceimage", "detections_count", [world.i2.pk])
    add_mark(S, [world.i1.pk, world.i2.pk])
    add_mark(S, [world.i2.pk, world.i3.pk])
    add_mark(E, [world.e1.pk])
    result = counts.drain()
    assert (result.marks, result.targets, result.changed) == (3, {S: 3, E: 1}, {S: 1, E: 0})
    assert result.expanded == {} and result.ms > 0 and not result.empty and not result.more
    assert result.as_log()["by_model"] == {S: [3, 1], E: [1, 0]}
    assert marks.rows() == []  # consumed, and the engine's own writes marked nothing
    assert_all_counts_exact()
    assert counts.drain().empty


def test_drain_writes_only_rows_whose_counts_changed(world, marks):
    with triggers_off() as cursor:
        for table in ("monitoring_sourceimage", "monitoring_event", "monitoring_deployment"):
            cursor.execute(f"UPDATE {table} SET counts_updated_at = %s", [LONG_AGO])
    Detection.objects.create(source_image=world.i3, bbox=[1, 2, 3, 4])
    add_mark(S, [i.pk for i in SourceImage.objects.all()])
    add_mark(E, [e.pk for e in Event.objects.all()])
    results = drain_all()
    assert sum(r.changed[S] for r in results) == 1
    assert sum(r.targets[E] for r in results) == 3
    for model, changed in ((SourceImage, world.i3), (Event, world.e2)):
        fresh = dict(model.objects.values_list("pk", "counts_updated_at"))
        assert fresh.pop(changed.pk) > LONG_AGO
        assert set(fresh.values()) == {LONG_AGO}
    assert_all_counts_exact()


def test_max_ids_bounds_one_batch(world, marks):
    images = [world.i1.pk, world.i2.pk, world.i3.pk]
    for _ in range(3):
        add_mark(S, images)
    first = counts.drain(max_ids=5)
    assert first.marks == 1  # a second mark of 3 ids would exceed the budget of 5
    assert first.more  # and the drain knows it left them
    second = counts.drain(max_ids=6)
    assert (second.marks, second.more) == (2, False)
    assert counts.drain(max_ids=6).empty


def test_a_mark_larger_than_max_ids_is_still_taken_whole(world, marks):
    add_mark(S, [i.pk for i in SourceImage.objects.all()])
    result = counts.drain(max_ids=2)
    assert (result.marks, result.targets) == (1, {S: 5})


def test_batch_size_bounds_marks_taken(world, marks):
    for image in (world.i1, world.i2, world.i3):
        add_mark(S, [image.pk])
    full = counts.drain(batch_size=2)
    assert (full.marks, full.more) == (2, True)
    assert marks.count() == 1
    last = counts.drain(batch_size=2)
    assert (last.marks, last.more) == (1, False)  # it took every due mark: no need to look again
    assert marks.count() == 0


def test_drain_can_be_limited_to_some_targets(world, marks):
    add_mark(S, [world.i1.pk])
    add_mark(E, [world.e1.pk])
    result = counts.drain(targets=[E])
    assert (result.marks, result.targets) == (1, {E: 1})
    assert marks.by_target() == {S: {world.i1.pk}}


def test_a_crash_inside_the_drain_loses_no_mark(world, marks, monkeypatch):
    Detection.objects.create(source_image=world.i4, bbox=[1, 2, 3, 4])
    before = marks.rows()

    def crash(*args, **kwargs):
        raise RuntimeError("worker died mid-recompute")

    monkeypatch.setattr(aggregate, "run", crash)
    monkeypatch.setattr(applying, "lock_and_apply_all", crash)
    with pytest.raises(RuntimeError):
        counts.drain()
    assert marks.rows() == before
    monkeypatch.undo()
    drain_all()
    assert_all_counts_exact()


def test_marks_for_deleted_targets_are_skipped(world, marks):
    corrupt("monitoring_sourceimage", "detections_count", [world.i1.pk])
    add_mark(S, [world.i1.pk, 987654321])
    add_mark("gone.model", [1])  # a model whose counts were removed
    result = counts.drain()
    assert (result.marks, result.targets, result.changed) == (2, {S: 1}, {S: 1})
    assert_all_counts_exact()


def test_every_row_mark_expands_into_chunks(world, marks, monkeypatch):
    monkeypatch.setattr(draining, "EXPAND_CHUNK", 2)
    corrupt("monitoring_sourceimage", "detections_count", [i.pk for i in SourceImage.objects.all()])
    marks_module.mark_all(S)
    assert marks.rows() == [(S, None)]
    first = counts.drain()
    assert (first.marks, first.expanded, first.targets) == (1, {S: 3}, {})
    assert first.more  # the chunks it made are due now
    ids = sorted(SourceImage.objects.values_list("pk", flat=True))
    assert [row[1] for row in marks.rows()] == [ids[0:2], ids[2:4], ids[4:]]
    drain_all()
    assert_all_counts_exact()


def test_recompute_a_queryset_returns_recomputed_and_changed(world, marks):
    corrupt("monitoring_sourceimage", "detections_count", [world.i1.pk, world.i2.pk])
    assert counts.recompute(SourceImage.objects.all()) == (5, 2)
    assert counts.recompute(SourceImage.objects.all()) == (5, 0)
    assert_all_counts_exact()


def test_recompute_instances_of_several_models(world, marks):
    corrupt("monitoring_deployment", "taxa_count", [world.d1.pk])
    corrupt("monitoring_sourceimagecollection", "source_images_count", [world.c2.pk])
    assert counts.recompute([world.d1, world.e1, world.c1, world.c2]) == (4, 2)
    assert_all_counts_exact()
    assert marks.rows() == []


def test_recompute_refuses_a_model_without_counts(db):
    Author.objects.create(name="Austen")
    with pytest.raises(UnknownTargetError, match=r"counts_testapp\.author"):
        counts.recompute(Author.objects.all())


def test_pending_marks_are_reported_per_row_and_per_model(world, marks):
    assert not marks_module.has_pending()
    add_mark(S, [world.i1.pk, world.i2.pk])
    add_mark(S, [world.i2.pk])
    assert marks_module.pending_ids(S, [world.i1.pk, world.i3.pk]) == {world.i1.pk}
    assert marks_module.has_pending([S]) and not marks_module.has_pending([E])
    (summary,) = marks_module.pending_summary()
    assert (summary.label, summary.marks, summary.ids) == (S, 2, 3)
    marks_module.mark_all(E)  # "every row" covers ids it does not list
    assert marks_module.pending_ids(E, [world.e1.pk, world.e3.pk]) == {world.e1.pk, world.e3.pk}
    assert {p.label: p.ids for p in marks_module.pending_summary()} == {E: None, S: 3}
    drain_all()
    assert marks_module.pending_ids(S, [world.i1.pk]) == set()
