"""A filter on a foreign key's own column (``fk__isnull``, ``fk=None``) is the row's own column.

Django compiles ``books__author__isnull=False`` to ``author_id IS NOT NULL`` and trims the join
to the author's table, but the trimmed join stays in the query's alias map, unreferenced. The
classifier read that map and took the filter for one that joins another table, so every such
count was recounted in full on every write (1.63 s per detection at 10⁶ for "capture sets'
images with an occurrence"). Declared here on the side (never added to the models, which other
tests share), each is now kept from its rows' own column, by the same machinery as any other
filter on a column of the counted rows.
"""

from __future__ import annotations

import pytest
from django.db.models import Q

from counts.declare.field import CachedCountField
from counts.declare.resolve import resolve
from project.monitoring.models import Deployment, Event, SourceImageCollection
from tests.engine_app.models import Library, Reader, Shelf, Tag


def declared(model, path: str, **kwargs):
    field = CachedCountField(path, **kwargs)
    field.set_attributes_from_name("side_count")
    return resolve(model, field)


@pytest.mark.parametrize(
    ("model", "path", "filter_", "mode", "predicate"),
    [
        (Shelf, "books", Q(books__author__isnull=True), "own-row", 'r."author_id" IS NULL'),
        (Shelf, "books", Q(books__author=None), "own-row", 'r."author_id" IS NULL'),
        (Shelf, "books", Q(books__author__isnull=False), "own-row", 'r."author_id" IS NOT NULL'),
        (
            Event,
            "occurrences",
            Q(occurrences__determination__isnull=False),
            "own-row",
            'r."determination_id" IS NOT NULL',
        ),
        (
            Deployment,
            "occurrences",
            Q(occurrences__determination__isnull=True),
            "own-row",
            'r."determination_id" IS NULL',
        ),
        # Through a junction: the sets' images with an occurrence, and a library's books with
        # an author, measured as items by their children's own column.
        (
            SourceImageCollection,
            "images",
            Q(images__detections__occurrence__isnull=False),
            "item",
            'r."occurrence_id" IS NOT NULL',
        ),
        (Tag, "books", Q(books__author__isnull=False), "item", 'r."author_id" IS NOT NULL'),
        (
            Library,
            "shelves__books",
            Q(shelves__books__author__isnull=False),
            "item",
            'r."author_id" IS NOT NULL',
        ),
    ],
)
def test_a_filter_on_a_foreign_keys_own_column_is_kept_incrementally(
    model, path, filter_, mode, predicate
):
    spec = declared(model, path, filter=filter_)
    assert spec.mode.mode == mode, getattr(spec.mode, "why", "")
    kept = spec.mode.predicate if mode == "own-row" else spec.mode.measure.predicate
    assert kept == predicate


def test_a_filter_that_reads_the_related_row_still_joins_it():
    """``author__name`` reads the author's row, not the book's: that is a join, kept apart."""
    spec = declared(Shelf, "books", filter=Q(books__author__name="Darwin"))
    assert spec.mode.mode != "own-row"


@pytest.mark.parametrize(
    ("model", "path", "filter_"),
    [
        (Shelf, "readers", Q(readers__name="Ada")),
        (Reader, "shelves", Q(shelves__name="Fiction")),
    ],
)
def test_a_filtered_m2m_through_a_model_that_can_link_a_pair_twice_is_recounted_in_full(
    model, path, filter_
):
    """Two loans of one shelf to one reader are two counted rows; as items, the reader would
    be worth one to the shelf. Such a count stays full, and says why."""
    spec = declared(model, path, filter=filter_)
    assert spec.mode.mode == "full"
    assert "can link a pair twice" in spec.mode.why
