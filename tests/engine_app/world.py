"""A small library exercising every shape of ``tests.engine_app.models``, and its fixture."""

from __future__ import annotations

from types import SimpleNamespace

import pytest


def build_library() -> SimpleNamespace:
    """Two libraries with different long-book thresholds, three shelves, books with and without
    authors and page counts, rated and unrated reviews, and two overlapping tags."""
    from tests.engine_app.models import Author, Book, Library, Review, Shelf, Tag

    w = SimpleNamespace()
    w.city = Library.objects.create(name="City", long_book_pages=300)
    w.school = Library.objects.create(name="School", long_book_pages=100)
    w.fiction = Shelf.objects.create(library=w.city, name="Fiction")
    w.poetry = Shelf.objects.create(library=w.city, name="Poetry")
    w.science = Shelf.objects.create(library=w.school, name="Science")
    w.austen = Author.objects.create(name="Austen")
    w.darwin = Author.objects.create(name="Darwin")
    book = Book.objects.create
    w.emma = book(shelf=w.fiction, author=w.austen, title="Emma", pages=474)
    w.sense = book(shelf=w.fiction, author=w.austen, title="Sense", pages=250)
    w.anon = book(shelf=w.fiction, author=None, title="Anonymous", pages=None)
    w.origin = book(shelf=w.science, author=w.darwin, title="Origin", pages=200)
    w.beagle = book(shelf=w.science, author=w.darwin, title="Beagle", pages=90)
    review = Review.objects.create
    w.r1 = review(book=w.emma, stars=5)
    w.r2 = review(book=w.emma, stars=3)
    w.r3 = review(book=w.sense, stars=None)  # not rated yet
    w.r4 = review(book=w.origin, stars=4)
    w.classics = Tag.objects.create(name="classics")
    w.nature = Tag.objects.create(name="nature")
    w.unused = Tag.objects.create(name="unused")
    w.classics.books.set([w.emma, w.sense, w.origin])
    w.nature.books.set([w.origin, w.beagle])
    return w


@pytest.fixture
def library(marks):
    """The library of :func:`build_library`, drained: counts exact, no mark pending."""
    from tests.truth import drain_all

    w = build_library()
    drain_all()
    marks.clear()
    return w
