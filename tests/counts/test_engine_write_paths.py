"""Each count shape the engine supports, written every way, marks exactly and ends exact.

The engine's own test app (``tests.engine_app``) has one count per shape: plain reverse FK,
constant filter, ``F()`` setting on a parent, distinct over a forward FK, M2M from both sides,
and "members with at least one valid child". Each test writes one way (save, delete,
bulk_create, queryset update/delete, M2M add/remove/clear/set from both sides, raw SQL), checks
the marks the triggers left (targets *and* ids: a missing id is a count that stays stale), then
drains and compares every cached value with the hand-written truth of
``tests.engine_app.truth``.
"""

from __future__ import annotations

import pytest
from django.db import connection

from tests import truth
from tests.engine_app.models import Author, Book, Library, Review, Shelf, Tag
from tests.engine_app.truth import assert_engine_counts_exact
from tests.truth import drain_all

LABELS = {
    "LB": "counts_testapp.library",
    "SH": "counts_testapp.shelf",
    "BK": "counts_testapp.book",
    "TG": "counts_testapp.tag",
}

pytestmark = pytest.mark.django_db


def expect(marks, **wanted) -> None:
    """The queue holds exactly these targets and ids (``SH=[shelf, ...]``)."""
    assert marks.by_target() == {LABELS[k]: {o.pk for o in v} for k, v in wanted.items()}


def settle() -> None:
    truth.settle(assert_engine_counts_exact)


def value(obj, field: str) -> int:
    obj.refresh_from_db()
    return getattr(obj, field)


def test_a_saved_book_dirties_only_its_shelf(library, marks):
    Book(shelf=library.fiction, author=library.darwin, title="Voyage", pages=500).save()
    # The library's notable reviews count is kept in full: its marks name rows to recount.
    expect(marks, SH=[library.fiction], LB=[library.city])
    settle()
    assert value(library.fiction, "authors_count") == 2
    assert value(library.fiction, "long_books_count") == 2


def test_a_deleted_book_takes_its_reviews_and_memberships_with_it(library, marks):
    emma = Book.objects.get(pk=library.emma.pk)
    emma.delete()  # sets emma.pk to None; library.emma keeps it
    expect(marks, SH=[library.fiction], BK=[library.emma], TG=[library.classics], LB=[library.city])
    settle()
    assert value(library.classics, "rated_books_count") == 1  # Origin is still rated


def test_bulk_create_marks_every_shelf_it_touched(library, marks):
    Book.objects.bulk_create(
        [
            Book(shelf=library.poetry, author=library.austen, title="Verses", pages=40),
            Book(shelf=library.science, author=None, title="Atlas", pages=150),
        ]
    )
    expect(marks, SH=[library.poetry, library.science], LB=[library.city, library.school])
    settle()
    assert value(library.science, "long_books_count") == 2  # Origin, Atlas; not Beagle


def test_queryset_update_of_a_read_column_dirties_old_and_new_shelves(library, marks):
    Book.objects.filter(shelf=library.fiction).update(shelf=library.poetry)
    expect(marks, SH=[library.fiction, library.poetry], LB=[library.city])
    settle()
    assert value(library.fiction, "books_count") == 0


def test_queryset_update_of_an_unread_column_marks_nothing(library, marks):
    Book.objects.update(title="Untitled")
    Author.objects.update(name="Anonymous")  # the model no count reads
    assert marks.by_target() == {}


def test_queryset_delete_of_rated_reviews_dirties_books_and_their_tags(library, marks):
    Review.objects.filter(stars__isnull=False).delete()
    expect(
        marks,
        BK=[library.emma, library.origin],
        TG=[library.classics, library.nature],
        LB=[library.city, library.school],
    )
    settle()
    assert value(library.nature, "rated_books_count") == 0


def test_rating_a_review_makes_its_book_a_rated_member(library, marks):
    library.r3.stars = 5
    library.r3.save()
    # The library's notable reviews count (kept in full) reads the stars too.
    expect(marks, BK=[library.sense], TG=[library.classics], LB=[library.city])
    settle()
    assert value(library.classics, "rated_books_count") == 3
    assert value(library.sense, "good_reviews_count") == 1


def test_m2m_add_from_the_declaring_side(library, marks):
    library.classics.books.add(library.beagle, library.anon)
    expect(marks, BK=[library.beagle, library.anon], TG=[library.classics])
    settle()
    assert value(library.beagle, "tags_count") == 2


def test_m2m_remove_from_the_reverse_side(library, marks):
    library.origin.tags.remove(library.nature)
    expect(marks, BK=[library.origin], TG=[library.nature])
    settle()
    assert value(library.nature, "rated_books_count") == 0


def test_m2m_clear_from_both_sides(library, marks):
    library.emma.tags.clear()
    # City keeps classics through Sense: its distinct tags do not change.
    expect(marks, BK=[library.emma], TG=[library.classics])
    drain_all()
    library.nature.books.clear()
    # The membership rows are also the items of the libraries' distinct tags: School loses nature.
    expect(marks, BK=[library.origin, library.beagle], TG=[library.nature], LB=[library.school])
    settle()
    assert value(library.classics, "books_count") == 2


def test_m2m_set_from_both_sides(library, marks):
    library.beagle.tags.set([library.classics])
    # beagle loses one tag and gains one: its own tags_count does not change.
    expect(marks, TG=[library.classics, library.nature])  # School still has both tags
    drain_all()
    library.unused.books.set([library.sense])
    expect(marks, BK=[library.sense], TG=[library.unused], LB=[library.city])
    settle()
    assert value(library.unused, "rated_books_count") == 0  # Sense's review has no stars


def test_a_parent_setting_changed_by_raw_sql_dirties_the_shelves_below_it(library, marks):
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE counts_testapp_library SET long_book_pages = 200 WHERE id = %s",
            [library.city.pk],
        )
    # One job mark; it can flip only books of 200 to 300 pages: Sense, on Fiction (Poetry's
    # count cannot change, it has no book).
    assert marks.count() == 1
    expect(marks, SH=[library.fiction])
    settle()
    assert value(library.fiction, "long_books_count") == 2


def test_a_shelf_moved_to_another_library_is_recounted_under_its_threshold(library, marks):
    library.fiction.library = library.school
    library.fiction.save()
    expect(marks, SH=[library.fiction], LB=[library.city, library.school])
    settle()
    assert value(library.fiction, "long_books_count") == 2


def test_a_book_losing_its_author_leaves_the_distinct_count(library, marks):
    Book.objects.filter(author=library.darwin).update(author=None)
    # Also the distinct authors of Origin's and Beagle's tags.
    expect(marks, SH=[library.science], TG=[library.classics, library.nature])
    settle()
    assert value(library.science, "authors_count") == 0


def test_a_deleted_library_cascades_and_its_counts_stay_exact(library, marks):
    Library.objects.filter(pk=library.school.pk).delete()
    assert set(marks.by_target()) == {LABELS["LB"], LABELS["SH"], LABELS["BK"], LABELS["TG"]}
    settle()
    assert not Shelf.objects.filter(library_id=library.school.pk).exists()
    assert value(library.nature, "books_count") == 0
    assert Tag.objects.count() == 3


def test_a_librarys_distinct_tags_follow_memberships_books_and_shelves(library, marks):
    """Tags reached through two foreign keys and an M2M: City's books are tagged classics;
    School's classics and nature."""
    libraries = (library.city, library.school)
    assert [value(lib, "tags_count") for lib in libraries] == [1, 2]
    library.beagle.tags.add(library.unused)
    settle()
    assert value(library.school, "tags_count") == 3
    Book.objects.filter(pk=library.origin.pk).update(shelf=library.poetry)  # to City
    settle()
    assert [value(lib, "tags_count") for lib in libraries] == [2, 2]
    library.poetry.library = library.school  # the shelf, and Origin with it, back to School
    library.poetry.save()
    settle()
    assert [value(lib, "tags_count") for lib in libraries] == [1, 3]


def test_a_tags_distinct_authors_follow_each_books_own_library_threshold(library, marks):
    """Authors of a tag's long books, long by the threshold of the book's library (City 300,
    School 100): classics has Emma (Austen) and Origin (Darwin), nature Origin."""
    tags = (library.classics, library.nature, library.unused)
    assert [value(tag, "authors_count") for tag in tags] == [2, 1, 0]
    Library.objects.filter(pk=library.school.pk).update(long_book_pages=250)
    settle()
    assert [value(tag, "authors_count") for tag in tags] == [1, 0, 0]
    Book.objects.filter(pk=library.sense.pk).update(pages=300)  # Austen again: one author
    settle()
    assert value(library.classics, "authors_count") == 1
    library.unused.books.add(library.emma, library.sense)
    settle()
    assert value(library.unused, "authors_count") == 1


def test_books_with_an_author_follow_every_way_an_author_id_changes(library, marks):
    """``filter=Q(books__author__isnull=False)`` reads the book's own ``author_id``: kept from
    the books' own rows (amounts, no recount), through a save, a queryset update, and an
    author's deletion (``SET_NULL``: Django's UPDATE of the books)."""
    from counts.apps import graph

    spec = next(s for s in graph().specs if s.key.endswith("shelf.authored_books_count"))
    assert spec.mode.mode == "own-row"
    assert value(library.fiction, "authored_books_count") == 2  # Emma, Sense; not Anonymous
    anon = Book.objects.get(pk=library.anon.pk)
    anon.author = library.darwin
    anon.save()
    expect(marks, SH=[library.fiction])  # the shelf alone: the library counts no authors
    settle()
    assert value(library.fiction, "authored_books_count") == 3
    Book.objects.filter(shelf=library.science).update(author=None)
    settle()
    assert value(library.science, "authored_books_count") == 0
    Author.objects.filter(pk=library.austen.pk).delete()  # Emma and Sense lose their author
    settle()
    assert value(library.fiction, "authored_books_count") == 1  # Anonymous, now Darwin's


def test_tags_count_their_books_with_an_author_through_every_m2m_write(library, marks):
    """``Tag.authored_books_count``: an M2M filtered on the related books' own column. The books
    are its items (each worth one to every tag it carries), so a book's author changing, a book
    joining or leaving a tag from either side, and an author's deletion each credit the change,
    with no recount of the tag."""
    from counts.apps import graph

    spec = next(s for s in graph().specs if s.key.endswith("tag.authored_books_count"))
    assert (spec.mode.mode, spec.mode.kind.label) == ("item", "counts_testapp.book")
    assert value(library.classics, "authored_books_count") == 3  # Emma, Sense, Origin
    assert value(library.nature, "authored_books_count") == 2  # Origin, Beagle
    library.classics.books.add(library.anon)  # no author: it does not count
    settle()
    assert value(library.classics, "authored_books_count") == 3
    anon = Book.objects.get(pk=library.anon.pk)
    anon.author = library.darwin
    anon.save()
    settle()
    assert value(library.classics, "authored_books_count") == 4
    anon.tags.remove(library.classics)  # from the book's side
    settle()
    assert value(library.classics, "authored_books_count") == 3
    Author.objects.filter(pk=library.austen.pk).delete()  # Emma and Sense lose their author
    settle()
    assert value(library.classics, "authored_books_count") == 1  # Origin
    library.nature.books.clear()
    Book.objects.filter(pk=library.origin.pk).delete()
    settle()
    assert value(library.nature, "authored_books_count") == 0
    assert value(library.classics, "authored_books_count") == 0


def test_a_librarys_reviews_follow_reviews_books_and_shelves(library, marks):
    """Three reverse relations (library ← shelf ← book ← review), kept through the books as
    items (each worth its reviews, reaching its library through its shelf) rather than by a
    recount of the library: City has Emma's two reviews and Sense's one, School Origin's."""
    from counts.apps import graph

    spec = next(s for s in graph().specs if s.key.endswith("library.reviews_count"))
    assert spec.mode.mode == "item" and spec.mode.kind.label == "counts_testapp.book"
    libraries = (library.city, library.school)
    assert [value(lib, "reviews_count") for lib in libraries] == [3, 1]
    Review.objects.create(book=library.beagle, stars=1)
    settle()
    assert [value(lib, "reviews_count") for lib in libraries] == [3, 2]
    Review.objects.filter(pk=library.r2.pk).update(book=library.origin)  # a review moved
    settle()
    assert [value(lib, "reviews_count") for lib in libraries] == [2, 3]
    emma = Book.objects.get(pk=library.emma.pk)
    emma.shelf = library.science  # a book moved, with its review
    emma.save()
    settle()
    assert [value(lib, "reviews_count") for lib in libraries] == [1, 4]
    library.science.library = library.city  # a shelf moved, with its books' reviews
    library.science.save()
    settle()
    assert [value(lib, "reviews_count") for lib in libraries] == [5, 0]
    with connection.cursor() as cursor:  # raw SQL from the shelves' side
        cursor.execute(
            "UPDATE counts_testapp_shelf SET library_id = %s WHERE id = %s",
            [library.school.pk, library.fiction.pk],
        )
    settle()
    assert [value(lib, "reviews_count") for lib in libraries] == [4, 1]
    Book.objects.filter(pk=library.sense.pk).delete()  # cascades to its review
    Shelf.objects.filter(pk=library.science.pk).delete()  # cascades to books and reviews
    settle()
    assert [value(lib, "reviews_count") for lib in libraries] == [0, 0]


def test_rated_reviews_of_long_books_follow_a_books_pages(library, marks):
    """A filter on a middle row (the book's pages) beside one on the counted rows (a review's
    stars): the books are measured only while long enough, so a book's pages changing
    re-measures it. City: Emma (474 pages) has two rated reviews; Sense (250) one unrated."""
    from counts.apps import graph

    spec = next(s for s in graph().specs if s.key.endswith("library.rated_long_reviews_count"))
    assert spec.mode.mode == "item" and spec.mode.measure.item_predicate
    libraries = (library.city, library.school)
    assert [value(lib, "rated_long_reviews_count") for lib in libraries] == [2, 0]
    Book.objects.filter(pk=library.emma.pk).update(pages=120)  # Emma no longer long
    settle()
    assert [value(lib, "rated_long_reviews_count") for lib in libraries] == [0, 0]
    sense = Book.objects.get(pk=library.sense.pk)
    sense.pages = 300
    sense.save()  # long now, but its one review is not rated
    settle()
    assert value(library.city, "rated_long_reviews_count") == 0
    Review.objects.filter(pk=library.r3.pk).update(stars=2)
    settle()
    assert value(library.city, "rated_long_reviews_count") == 1
    with connection.cursor() as cursor:  # raw SQL: Origin (School) becomes long
        cursor.execute(
            "UPDATE counts_testapp_book SET pages = 640 WHERE id = %s", [library.origin.pk]
        )
    settle()
    assert [value(lib, "rated_long_reviews_count") for lib in libraries] == [1, 1]
    Book.objects.filter(pk=library.sense.pk).update(shelf=library.science, pages=None)
    settle()
    assert [value(lib, "rated_long_reviews_count") for lib in libraries] == [0, 1]


def test_blurbs_follow_a_has_one_in_the_middle_of_the_path(library, marks):
    """A has-one (``OneToOneField``: a book's jacket) first in a path and in its middle
    (shelf ← book ← jacket ← blurb): the jackets are the items, each worth its blurbs, reaching
    a book directly and a shelf through its book. Written every way a has-one moves."""
    from counts.apps import graph
    from tests.engine_app.models import Blurb, Jacket

    for key in ("book.blurbs_count", "shelf.blurbs_count"):
        spec = next(s for s in graph().specs if s.key.endswith(key))
        assert spec.mode.mode == "item" and spec.mode.kind.label == "counts_testapp.jacket"
    books, shelves = (
        (library.emma, library.origin, library.beagle),
        (library.fiction, library.science),
    )
    emmas = Jacket.objects.create(book=library.emma, color="blue")
    origins = Jacket.objects.create(book=library.origin)
    Blurb.objects.bulk_create([Blurb(jacket=emmas), Blurb(jacket=emmas), Blurb(jacket=origins)])
    settle()
    assert [value(b, "blurbs_count") for b in books] == [2, 1, 0]
    assert [value(s, "blurbs_count") for s in shelves] == [2, 1]
    Blurb.objects.filter(jacket=emmas).first().delete()
    Blurb.objects.filter(jacket=origins).update(jacket=emmas)  # a blurb moved between jackets
    settle()
    assert [value(b, "blurbs_count") for b in books] == [2, 0, 0]
    emmas.book = library.beagle  # the jacket moved to a book on another shelf
    emmas.save()
    settle()
    assert [value(b, "blurbs_count") for b in books] == [0, 0, 2]
    assert [value(s, "blurbs_count") for s in shelves] == [0, 2]
    Book.objects.filter(pk=library.beagle.pk).update(shelf=library.fiction)  # the book moved
    settle()
    assert [value(s, "blurbs_count") for s in shelves] == [2, 0]
    with connection.cursor() as cursor:  # raw SQL: the jacket re-pointed from its own side
        cursor.execute(
            "UPDATE counts_testapp_jacket SET book_id = %s WHERE id = %s",
            [library.emma.pk, emmas.pk],
        )
        cursor.execute(
            "UPDATE counts_testapp_jacket SET book_id = %s WHERE id = %s",
            [library.beagle.pk, origins.pk],
        )
        cursor.execute(
            "INSERT INTO counts_testapp_blurb (jacket_id, quote) VALUES (%s, '')", [origins.pk]
        )
    settle()
    assert [value(b, "blurbs_count") for b in books] == [2, 0, 1]
    Jacket.objects.filter(pk=origins.pk).delete()  # cascades to its blurb
    Book.objects.filter(pk=library.emma.pk).delete()  # cascades to its jacket and blurbs
    settle()
    assert [value(s, "blurbs_count") for s in shelves] == [0, 0]
    assert not Blurb.objects.exists()


def test_reviews_on_fiction_shelves_follow_every_way_a_shelf_s_name_changes(library, marks):
    """A filter on a row above the items (the shelf's name, for a library's reviews): the books
    stay the items, and renaming a shelf writes one job mark that the drain expands into the
    shelf's books, whichever way the name changes."""
    from counts.apps import graph

    spec = next(s for s in graph().specs if s.key.endswith("library.fiction_reviews_count"))
    assert spec.mode.mode == "item" and spec.mode.kind.label == "counts_testapp.book"
    libraries = (library.city, library.school)
    assert [value(lib, "fiction_reviews_count") for lib in libraries] == [3, 0]
    fiction = Shelf.objects.get(pk=library.fiction.pk)
    fiction.name = "Classics"  # save(): one job mark, not a mark per book
    fiction.save()
    with connection.cursor() as cursor:
        cursor.execute("SELECT target, ids FROM counts_dirtymark WHERE field LIKE 'job:%%'")
        jobs = cursor.fetchall()
    assert jobs == [("item:counts_testapp.book", [library.fiction.pk])]
    # Beside it, only the route mark of the count kept in full that reads the shelf's name.
    assert sorted(t for t, _ in marks.rows()) == [
        "counts_testapp.library",
        "item:counts_testapp.book",
    ]
    settle()
    assert [value(lib, "fiction_reviews_count") for lib in libraries] == [0, 0]
    Shelf.objects.filter(pk=library.science.pk).update(name="Fiction")  # queryset update
    settle()
    assert [value(lib, "fiction_reviews_count") for lib in libraries] == [0, 1]
    verse = Book.objects.create(shelf=library.poetry, title="Verse", pages=40)
    Review.objects.bulk_create([Review(book=verse, stars=2), Review(book=verse, stars=None)])
    with connection.cursor() as cursor:  # raw SQL from another client
        cursor.execute(
            "UPDATE counts_testapp_shelf SET name = 'Fiction' WHERE id = %s", [library.poetry.pk]
        )
    settle()
    assert [value(lib, "fiction_reviews_count") for lib in libraries] == [2, 1]
    Shelf.objects.filter(pk=library.science.pk).update(library=library.city)  # a shelf moved
    settle()
    assert [value(lib, "fiction_reviews_count") for lib in libraries] == [3, 0]
    Book.objects.filter(pk=verse.pk).update(shelf=library.fiction)  # a book left for "Classics"
    settle()
    assert [value(lib, "fiction_reviews_count") for lib in libraries] == [1, 0]
    Shelf.objects.filter(pk=library.science.pk).delete()  # cascades to its books and reviews
    settle()
    assert [value(lib, "fiction_reviews_count") for lib in libraries] == [0, 0]
    assert_engine_counts_exact()
