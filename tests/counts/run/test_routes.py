"""Resolving the route marks of counts kept in full (``counts.run.routes``), late.

A count kept in full (the engine app's ``Library.picked_reviews_count``: reviews of a library's
long books, rated four stars or on a "Fiction" shelf, a filter testing the rows above the
reviews in two places) is marked with the
written rows' own link values; the drain walks the rest of the route in its own snapshot.
What is pinned: a mark resolves to exactly the libraries its rows lead to *now* (read
independently here, by a join over the base tables), each once; a book moved since resolves to
its new library, and draining then leaves every count exact; values that lead nowhere resolve
to nothing; a route the graph no longer knows resolves to None, and a drain drops its mark
without touching a count.
"""

from __future__ import annotations

import pytest
from django.db import connection

import counts
from counts.apps import graph
from counts.base.mark import Kind, kind_of
from counts.compile.trigger_rows import full_routes, via_key
from counts.declare.graph import Graph
from counts.declare.modes import Full
from counts.operate.status import count_modes
from counts.run.routes import resolve
from tests.engine_app.models import Book, Review
from tests.engine_app.truth import assert_engine_counts_exact
from tests.truth import drain_all

LIBRARY = "counts_testapp.library"
#: Libraries a book's reviews count towards, joined here without the engine.
LIBRARIES_OF_BOOKS = (
    "SELECT DISTINCT s.library_id FROM counts_testapp_book b"
    " JOIN counts_testapp_shelf s ON s.id = b.shelf_id WHERE b.id = ANY(%s) ORDER BY 1"
)
LIBRARIES_OF_SHELVES = (
    "SELECT DISTINCT library_id FROM counts_testapp_shelf WHERE id = ANY(%s) ORDER BY 1"
)


def rows(sql: str, ids: list[int]) -> list[int]:
    with connection.cursor() as cursor:
        cursor.execute(sql, [ids])
        return [row[0] for row in cursor.fetchall()]


def route_marks() -> list[tuple[str, list[int]]]:
    """``(via key, ids)`` of every route mark waiting, oldest first."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT target, ids, field, deltas FROM counts_dirtymark ORDER BY id")
        return [
            (field, ids)
            for target, ids, field, deltas in cursor.fetchall()
            if kind_of(target, ids, field, deltas) is Kind.ROUTE
        ]


def resolved(key: str, ids: list[int], g=None) -> list[int] | None:
    with connection.cursor() as cursor:
        return resolve(cursor, g or graph(), key, ids)


def route_from(db_table: str) -> str:
    (route,) = full_routes(graph())[db_table]
    return via_key(route)


@pytest.fixture(autouse=True)
def kept_in_full():
    """The premise: ``counts status`` reports the library's count as kept in full."""
    modes = {row["count"]: row["mode"] for row in count_modes()}
    assert modes[f"{LIBRARY}.picked_reviews_count"] == "full"


def test_a_review_s_mark_resolves_to_the_library_its_book_is_in(library, marks):
    Review.objects.create(book=library.emma, stars=5)
    ((key, ids),) = route_marks()
    assert key == route_from("counts_testapp_review") and ids == [library.emma.pk]
    assert resolved(key, ids) == [library.city.pk] == rows(LIBRARIES_OF_BOOKS, ids)
    drain_all()
    assert_engine_counts_exact()


def test_a_book_moved_since_resolves_to_its_new_library(library, marks):
    """The review was written on a City shelf; by the time its mark is resolved the book is
    on a School shelf: the review now counts for School, and City is marked by the move."""
    Review.objects.create(book=library.sense, stars=4)
    ((key, ids),) = route_marks()
    Book.objects.filter(pk=library.sense.pk).update(shelf=library.science)
    assert resolved(key, ids) == [library.school.pk] == rows(LIBRARIES_OF_BOOKS, ids)
    drain_all()
    assert_engine_counts_exact()


def test_many_rows_resolve_to_each_library_once_in_order(library, marks):
    """Books on two shelves of City and on one of School: City once, School once."""
    verse = Book.objects.create(shelf=library.poetry, title="Verse", pages=40)
    drain_all()
    books = [library.origin, library.emma, verse, library.beagle, library.sense]
    Review.objects.bulk_create([Review(book=book, stars=3) for book in books])
    ((key, ids),) = route_marks()
    assert sorted(ids) == sorted(b.pk for b in books)
    want = rows(LIBRARIES_OF_BOOKS, ids)
    assert want == sorted([library.city.pk, library.school.pk])
    assert resolved(key, ids) == want
    drain_all()
    assert_engine_counts_exact()


def test_a_book_s_move_resolves_through_its_old_and_new_shelf(library, marks):
    Book.objects.filter(pk=library.anon.pk).update(shelf=library.science)
    moves = [(key, ids) for key, ids in route_marks() if key == route_from("counts_testapp_book")]
    ((key, ids),) = moves
    assert sorted(ids) == sorted([library.fiction.pk, library.science.pk])
    assert resolved(key, ids) == rows(LIBRARIES_OF_SHELVES, ids)
    assert resolved(key, ids) == sorted([library.city.pk, library.school.pk])


def test_values_that_lead_nowhere_resolve_to_nothing(library, marks):
    key = route_from("counts_testapp_review")
    gone = Book.objects.create(shelf=library.poetry, title="Gone", pages=10)
    gone_pk = gone.pk
    gone.delete()
    assert resolved(key, [gone_pk]) == []
    assert resolved(key, []) == []


def test_a_route_that_no_longer_exists_resolves_to_none(library, marks):
    key, ids = route_from("counts_testapp_review"), [library.origin.pk]
    assert resolved(key, ids) == [library.school.pk]
    assert resolved("via:000000000000", ids) is None
    # The count removed: a graph without it no longer knows the route its old marks name.
    without = Graph.build([s for s in graph().specs if not isinstance(s.mode, Full)])
    assert resolved(key, ids, without) is None
    # A drain drops a mark naming an unknown route, and recounts nothing for it.
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO counts_dirtymark (target, field, ids) VALUES (%s, %s, %s)",
            [LIBRARY, "via:000000000000", ids],
        )
    result = counts.drain()
    assert result.marks == 1 and result.targets.get(LIBRARY, 0) == 0
    assert marks.rows() == []
    assert_engine_counts_exact()
