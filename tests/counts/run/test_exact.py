"""Exact reads (``counts.run.exact``): every count exact in the reader's snapshot, before any drain.

No worker runs and nothing is drained between a write and the read that follows it: the counts
read must still equal the truth computed independently from the base tables
(``tests.truth``, ``tests.engine_app.truth``), through every write path, including the
writer's own uncommitted writes; rows the engine cannot vouch for say so.
"""

from __future__ import annotations

import pytest
from django.db import connection, transaction
from django.test import override_settings

from counts.base.mark import Mark
from counts.run.exact import read_exact
from counts.run.marks import mark_all
from project.monitoring.models import (
    Detection,
    Occurrence,
    Project,
    SourceImage,
    SourceImageCollection,
)
from tests import truth as domain
from tests.engine_app import truth as engine_app
from tests.engine_app.models import Book, Library, Review, Shelf, Tag

pytestmark = pytest.mark.django_db


def exact_everywhere(truths=None, labels=None) -> list[str]:
    """One line per row whose exact read differs from the truth or is not vouched for."""
    truths, labels = truths or domain.TRUTH, labels or domain.LABELS
    wrong = []
    for table, label in labels.items():
        want = domain.truth(table, connection, truths)
        got = read_exact(label, list(want))
        for pk, values in want.items():
            row = got[pk]
            read = {c: row.counts[c] for c in values}
            if read != values or not row.exact:
                wrong.append(f"{label}#{pk}: read {read} exact={row.exact}, truth {values}")
    return wrong


def assert_exact(truths=None, labels=None) -> None:
    wrong = exact_everywhere(truths, labels)
    assert not wrong, "\n".join(wrong)


def assert_engine_app_exact() -> None:
    assert_exact(engine_app.TRUTH, engine_app.LABELS)


def test_every_write_path_is_exact_at_read_before_any_drain(world, marks):
    w = world
    box = [1, 1, 5, 5]
    Detection.objects.create(source_image=w.i3, bbox=box, occurrence=w.o2, score=0.8)
    assert marks.count() and domain.mismatches(), "the premise: stored counts lag"
    assert_exact()
    Detection.objects.bulk_create(
        [Detection(source_image=w.i4, bbox=box), Detection(source_image=w.i5, bbox=None)]
    )
    assert_exact()
    Detection.objects.filter(pk=w.det1.pk).update(source_image=w.i4)  # a detection moved
    assert_exact()
    w.c1.images.add(w.i4, w.i5)
    w.i1.collections.remove(w.c1)  # the other side
    w.c2.images.clear()
    assert_exact()
    Project.objects.filter(pk=w.p1.pk).update(default_filters_score_threshold=0.35)
    assert_exact()
    Occurrence.objects.filter(pk=w.o2.pk).update(determination=w.moth)  # distinct counts
    assert_exact()
    SourceImage.objects.filter(pk=w.i2.pk).update(deployment=w.d2, event=w.e3)
    assert_exact()
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO monitoring_detection (source_image_id, bbox, score, occurrence_id,"
            " created_at, updated_at) VALUES (%s, '[2, 2, 3, 3]', 0.5, %s, now(), now())",
            [w.i3.pk, w.o4.pk],
        )
    assert_exact()
    SourceImage.objects.filter(pk=w.i4.pk).delete()  # cascades to detections and memberships
    Occurrence.objects.filter(pk=w.o1.pk).delete()
    assert_exact()
    domain.drain_all()
    domain.assert_all_counts_exact()
    assert_exact()


def test_a_writer_reads_its_own_uncommitted_writes(world, marks):
    with transaction.atomic():
        Detection.objects.create(source_image=world.i3, bbox=[1, 1, 2, 2])
        world.c1.images.add(world.i4)
        got = read_exact(SourceImageCollection, [world.c1.pk])[world.c1.pk]
        stored = SourceImageCollection.objects.get(pk=world.c1.pk)
        assert got.exact and got.pending
        assert got.counts["source_images_count"] == stored.source_images_count + 1 == 4
        assert got.counts["source_images_with_detections_count"] == 3  # i1, i3 and i4
        assert_exact()
    assert_exact()


def test_the_engine_apps_shapes_are_exact_at_read(library, marks):
    """Counts kept in full, distinct counts through an M2M, a setting, a long path."""
    lib = library
    Review.objects.create(book=lib.beagle, stars=5)  # three-level, and the full count
    assert engine_app.mismatches(), "the premise: stored counts lag"
    assert_engine_app_exact()
    Book.objects.filter(pk=lib.emma.pk).update(shelf=lib.science, pages=120)
    assert_engine_app_exact()
    Library.objects.filter(pk=lib.school.pk).update(long_book_pages=50)
    lib.unused.books.add(lib.anon, lib.beagle)
    assert_engine_app_exact()
    Shelf.objects.filter(pk=lib.poetry.pk).update(library=lib.school)
    Tag.objects.filter(pk=lib.nature.pk).delete()
    assert_engine_app_exact()
    domain.drain_all()
    engine_app.assert_engine_counts_exact()
    assert_engine_app_exact()


def _random_library_write(rng, w) -> str:
    """One write a library's counts read, picked by ``rng``: reviews created, rated, moved or
    deleted; a book's pages or shelf changed; a shelf renamed or moved, by the ORM or raw SQL."""
    books = list(Book.objects.values_list("pk", flat=True))
    shelves = [w.fiction.pk, w.poetry.pk, w.science.pk]
    reviews = list(Review.objects.values_list("pk", flat=True))
    step = rng.choice(
        [
            "review",
            "rate",
            "move review",
            "drop review",
            "pages",
            "book shelf",
            "rename",
            "rename sql",
            "shelf library",
        ]
    )
    if step == "review" or not reviews:
        Review.objects.create(book_id=rng.choice(books), stars=rng.choice([None, 1, 3, 4, 5]))
    elif step == "rate":
        Review.objects.filter(pk=rng.choice(reviews)).update(stars=rng.choice([None, 2, 4, 5]))
    elif step == "move review":
        Review.objects.filter(pk=rng.choice(reviews)).update(book_id=rng.choice(books))
    elif step == "drop review":
        Review.objects.filter(pk=rng.choice(reviews)).delete()
    elif step == "pages":
        Book.objects.filter(pk=rng.choice(books)).update(pages=rng.choice([None, 90, 300, 520]))
    elif step == "book shelf":
        book = Book.objects.get(pk=rng.choice(books))
        book.shelf_id = rng.choice(shelves)
        book.save()
    elif step == "rename":
        shelf = Shelf.objects.get(pk=rng.choice(shelves))
        shelf.name = rng.choice(["Fiction", "Poetry", "Science"])
        shelf.save()
    elif step == "rename sql":
        with connection.cursor() as cursor:
            cursor.execute(
                "UPDATE counts_testapp_shelf SET name = %s WHERE id = %s",
                [rng.choice(["Fiction", "Essays"]), rng.choice(shelves)],
            )
    else:
        Shelf.objects.filter(pk=rng.choice(shelves)).update(library=rng.choice([w.city, w.school]))
    return step


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_library_histories_are_exact_at_read_and_after_the_drain(library, marks, seed):
    """Seeded histories over the library's shapes (a run of three relations filtered on the
    reviews, the books, the shelf's name, an OR across them, and the count kept in full): after
    every write the exact read equals the truth before any drain, and a drain leaves the stored
    counts equal to it."""
    import random

    rng = random.Random(seed)
    for _ in range(30):
        step = _random_library_write(rng, library)
        wrong = exact_everywhere(engine_app.TRUTH, engine_app.LABELS)
        assert not wrong, f"after {step!r}:\n" + "\n".join(wrong)
        if rng.random() < 0.3:
            domain.drain_all()
            engine_app.assert_engine_counts_exact()
    domain.drain_all()
    engine_app.assert_engine_counts_exact()


def test_over_the_budget_a_row_gets_its_stored_value_and_says_it_is_not_exact(world, marks):
    with override_settings(COUNTS_EXACT_BUDGET=1):
        Detection.objects.create(source_image=world.i3, bbox=[1, 1, 2, 2])
        assert not exact_everywhere(), "one stale capture is within a budget of 1"
        Detection.objects.create(source_image=world.i4, bbox=[1, 1, 2, 2])
        got = read_exact(SourceImageCollection, [world.c1.pk])[world.c1.pk]
        stored = SourceImageCollection.objects.get(pk=world.c1.pk)
        assert not got.exact and got.pending
        assert got.counts["source_images_with_detections_count"] == (
            stored.source_images_with_detections_count
        )
    assert_exact()  # the default budget resolves both


def test_a_row_named_by_a_recount_mark_is_read_from_its_truth(world, marks):
    """A write the triggers never saw (a restore), then the row marked for a recount: the
    formula cannot vouch for its stored value, so the read recounts that row."""
    with domain.triggers_off() as cursor:
        cursor.execute(
            "UPDATE monitoring_sourceimagecollection SET source_images_count = 70 WHERE id = %s",
            [world.c1.pk],
        )
    with connection.cursor() as cursor:
        Mark(world.c1._meta.label_lower, (world.c1.pk,)).insert(cursor)
    got = read_exact(SourceImageCollection, [world.c1.pk])[world.c1.pk]
    assert got.exact and got.pending and got.counts["source_images_count"] == 3
    assert_exact()


def test_an_every_row_mark_leaves_the_models_rows_unvouched(world, marks):
    """Every row of the model is to be recounted (a backfill the workers carry out): a read
    does not recount them all, and says so."""
    mark_all(SourceImageCollection._meta.label_lower)
    got = read_exact(SourceImageCollection, [world.c1.pk, world.c2.pk])
    assert not any(row.exact for row in got.values())
    assert all(row.pending for row in got.values())
    domain.drain_all()
    assert_exact()


def test_refresh_counts_reads_the_instances_counts_exact(world, marks):
    collection = SourceImageCollection.objects.get(pk=world.c2.pk)
    collection.images.add(world.i3, world.i5)
    collection.refresh_counts()
    assert collection.source_images_count == 4 and collection.counts_exact
    assert collection.counts_pending
    assert SourceImageCollection.objects.get(pk=world.c2.pk).source_images_count == 2  # stored


def test_an_every_item_mark_is_over_any_budget(world, marks):
    """Every capture marked at once (as a new count's backfill leases them): the rows their
    counts feed say they are not exact (listing every item to count them is not a read),
    and so are only those rows, until a drain expands the mark."""
    with connection.cursor() as cursor:
        Mark("item:monitoring.sourceimage").insert(cursor)
    got = read_exact(SourceImageCollection, [world.c1.pk, world.c2.pk])
    assert not any(row.exact for row in got.values())
    assert all(row.exact for row in read_exact(Project, [world.p1.pk]).values())  # taxa only
    domain.drain_all()
    assert_exact()


def test_a_model_whose_counts_the_engine_does_not_keep_is_read_as_loaded(world, marks):
    """A count refused by the checks is left out of the graph: the read does not fail, it
    leaves the row as loaded and says the counts are not exact."""
    from counts.declare.graph import Graph
    from counts.run.exact import apply_exact

    row = SourceImageCollection.objects.get(pk=world.c1.pk)
    apply_exact([row], graph=Graph.build([]))
    assert row.source_images_count == 3 and not row.counts_exact
