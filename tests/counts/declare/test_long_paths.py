"""Counts through a run of relations (counter_culture's ``companies__managers__reviews``).

The rows one hop above the counted rows are the items, each worth its counted children, and
reach their targets back up the path. That keeps a change's cost to the rows it touches,
where a full recount read every child of the target (17 / 99 / 575 ms for one review under
50k / 200k / 800k, measured before). Declared here on the side; the test app's
``Library.reviews_count`` is written every way in ``tests/counts/test_engine_write_paths.py``.

A filter may read the counted rows and the items (a middle row: reviews of long books). What
stays a full recount says why: a path whose rows could reach a target twice (an M2M that is
not next to the target, or one through a model that can link a pair twice), and a filter
reading rows above the items, or testing the items in two places of an OR or a NOT. An OR
across the items and the counted rows stays an item count: the item is worth all its
children or those passing the other side.
"""

from __future__ import annotations

from django.db.models import Q

from counts.declare.field import CachedCountField
from counts.declare.modes import Full, ItemCount
from counts.declare.resolve import resolve
from tests.engine_app.models import Library, Reader, Tag


def declared(model, path: str, **kwargs):
    field = CachedCountField(path, **kwargs)
    field.set_attributes_from_name("side_count")
    return resolve(model, field)


def test_three_reverse_relations_make_the_books_items_linked_through_their_shelf():
    mode = declared(Library, "shelves__books__reviews").mode
    assert isinstance(mode, ItemCount)
    assert mode.kind.label == "counts_testapp.book"
    assert (mode.measure.child.label, mode.measure.fk) == ("counts_testapp.review", "book_id")
    link = mode.link
    assert [(s.table.label, s.where, s.select) for s in link.steps] == [
        ("counts_testapp.book", "id", "shelf_id"),
        ("counts_testapp.shelf", "id", "library_id"),
    ]


def test_a_filter_on_the_counted_rows_is_the_measures_predicate():
    mode = declared(
        Library, "shelves__books__reviews", filter=Q(shelves__books__reviews__stars__gte=4)
    ).mode
    assert isinstance(mode, ItemCount)
    assert mode.measure.predicate == 'r."stars" >= 4'


def test_a_filter_on_the_items_own_columns_is_the_measures_item_predicate():
    """A middle row's column (counter_culture's filtered three-level counter)."""
    mode = declared(
        Library,
        "shelves__books__reviews",
        filter=Q(shelves__books__pages__gte=300, shelves__books__reviews__stars__isnull=False),
    ).mode
    assert isinstance(mode, ItemCount)
    assert mode.measure.predicate == 'r."stars" IS NOT NULL'
    assert mode.measure.item_predicate == 'r."pages" >= 300'


def test_a_filter_on_a_row_above_the_items_is_an_item_test_watching_that_row():
    """The shelf's name, for a library's reviews: each book tests its shelf (an index probe),
    and a rename is a job over the shelf's books."""
    mode = declared(Library, "shelves__books__reviews", filter=Q(shelves__name="Fiction")).mode
    assert isinstance(mode, ItemCount) and mode.kind.label == "counts_testapp.book"
    assert mode.measure.item_predicate == (
        'EXISTS (SELECT 1 FROM "counts_testapp_shelf" h1'
        """ WHERE h1."id" = r."shelf_id" AND h1."name" = 'Fiction')"""
    )
    ((hop,), column) = mode.watches[0].hops, mode.watches[0].column
    assert (hop.child.label, hop.column, column) == ("counts_testapp.shelf", "shelf_id", "name")


def test_a_filter_on_the_target_itself_reaches_it_from_the_item_by_two_hops():
    mode = declared(Library, "shelves__books__reviews", filter=Q(name="City")).mode
    assert isinstance(mode, ItemCount)
    (watch,) = mode.watches
    assert [h.child.label for h in watch.hops] == ["counts_testapp.shelf", "counts_testapp.library"]
    assert watch.column == "name" and 'JOIN "counts_testapp_library" h2' in (
        mode.measure.item_predicate
    )


def test_a_filter_on_a_relation_off_the_path_keeps_the_count_in_full():
    mode = declared(Library, "shelves__books__reviews", filter=Q(shelves__readers__name="Ann")).mode
    assert isinstance(mode, Full) and "joins other tables" in mode.why


def test_an_m2m_next_to_the_target_links_the_items_by_its_through_rows():
    mode = declared(Tag, "books__reviews").mode
    assert isinstance(mode, ItemCount)
    assert mode.kind.label == "counts_testapp.book"
    assert (mode.link.through.label, mode.link.item_column, mode.link.target_column) == (
        "counts_testapp.tag_books",
        "book_id",
        "tag_id",
    )


def test_an_m2m_that_can_link_a_pair_twice_keeps_the_count_in_full():
    """Two loans of a shelf to one reader: the ORM's join counts its books twice."""
    mode = declared(Reader, "shelves__books").mode
    assert isinstance(mode, Full) and "link a pair twice" in mode.why


def test_an_m2m_at_the_end_counts_its_through_rows_as_the_items_children():
    """A library's books' tag memberships: each book worth its memberships."""
    mode = declared(Library, "shelves__books__tags").mode
    assert isinstance(mode, ItemCount) and mode.kind.label == "counts_testapp.book"
    assert (mode.measure.child.label, mode.measure.fk) == ("counts_testapp.tag_books", "book_id")


def test_an_m2m_below_a_reverse_relation_keeps_the_count_in_full():
    """Library ← shelf ⋈ reader ← loan: a reader of two of a library's shelves reaches it
    twice, and so would each of the reader's loans."""
    mode = declared(Library, "shelves__readers__loan").mode
    assert isinstance(mode, Full) and "twice" in mode.why


def test_an_or_across_the_items_and_the_counted_rows_makes_the_item_worth_one_side():
    """Reviews of four stars, or of a book of 500 pages: a long book is worth all its reviews,
    a short one those of four stars."""
    mode = declared(
        Library,
        "shelves__books__reviews",
        filter=Q(shelves__books__reviews__stars__gte=4) | Q(shelves__books__pages__gte=500),
    ).mode
    assert isinstance(mode, ItemCount) and mode.kind.label == "counts_testapp.book"
    m = mode.measure
    assert m.item_predicate == 'r."pages" >= 500'
    assert (m.predicate, m.otherwise) == (None, 'r."stars" >= 4')
    assert m.columns == {"book_id", "stars"} and m.item_columns == {"pages"}


def test_a_not_over_both_rows_is_taken_apart_the_same_way():
    """Not (a long book and a rated review): a long book is worth its unrated reviews, a
    short one (or one of unknown length) all of them."""
    filter = ~Q(shelves__books__pages__gte=500, shelves__books__reviews__stars__isnull=False)
    m = declared(Library, "shelves__books__reviews", filter=filter).mode.measure
    assert m.item_predicate == 'r."pages" >= 500'
    assert m.otherwise == "true" and "stars" in m.predicate and "NOT" in m.predicate


def test_items_tested_in_two_places_of_an_or_keep_the_count_in_full():
    filter = Q(shelves__books__pages__gte=300) & (
        Q(shelves__books__reviews__stars__gte=4) | Q(shelves__books__title="Emma")
    )
    mode = declared(Library, "shelves__books__reviews", filter=filter).mode
    assert isinstance(mode, Full) and "more than one place" in mode.why
