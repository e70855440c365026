"""One cached count per shape the engine supports, on a small library of books.

```
Library ─< Shelf ─< Book >─ Author          (book.author: nullable, SET_NULL)
                     ├─< Review             (review.stars: null means "not rated yet")
                     └── Jacket ─< Blurb    (a has-one: at most one jacket per book)
Tag >─< Book   (M2M ``Tag.books``, related_name ``tags``)
```

| count | shape |
|---|---|
| ``Shelf.books_count`` | plain reverse-FK count |
| ``Shelf.long_books_count`` | filtered by a setting of a parent reached by ``F()`` |
| ``Shelf.authors_count`` | distinct count over a forward FK at the path's end |
| ``Book.good_reviews_count`` | filtered count (a constant condition) |
| ``Book.tags_count`` | count through an M2M, from its reverse side |
| ``Tag.books_count`` | count through an M2M, from its declaring side |
| ``Tag.rated_books_count`` | M2M members with at least one valid child (EXISTS below) |
| ``Library.reviews_count`` | a path of three relations: the books are its items, each worth |
|   | its reviews, reaching the library through their shelf |
| ``Library.rated_long_reviews_count`` | the same path filtered on the counted rows and on a |
|   | middle row (the book's pages): books measured only while long enough |
| ``Library.notable_reviews_count`` | the same path, filtered by an OR across two of its rows: |
|   | a long book is worth all its reviews, a short one those of four stars |
| ``Library.fiction_reviews_count`` | the same path, filtered on a row above the items (the |
|   | shelf's name): a rename is a job over the shelf's books |
| ``Library.picked_reviews_count`` | the same path, testing the rows above the reviews in two |
|   | places of its filter: the one shape kept by a full recount |
| ``Library.tags_count`` | distinct values at the end of an M2M reached through two FKs: the |
|   | membership rows are the items, reaching the library through their book and its shelf |
| ``Book.blurbs_count`` | through a has-one (``OneToOneField``) to the rows below it |
| ``Shelf.blurbs_count`` | a has-one in the middle of a path of three relations |
| ``Tag.authors_count`` | distinct authors of the tag's books, filtered by a setting (the |
|   | shelf's library's threshold): items linked to many targets by an M2M |

``Author`` has no counts and nothing reads its columns: the model no trigger watches.
"""

from django.db import models
from django.db.models import F, Q

from counts.declare.field import CachedCountField


class Library(models.Model):
    name = models.CharField(max_length=100)
    #: Pages from which a book counts as long on this library's shelves.
    long_book_pages = models.IntegerField(default=300)

    reviews_count = CachedCountField("shelves__books__reviews")
    #: Rated reviews of books of 300 pages or more.
    rated_long_reviews_count = CachedCountField(
        "shelves__books__reviews",
        filter=Q(shelves__books__pages__gte=300, shelves__books__reviews__stars__isnull=False),
    )
    #: Reviews of four stars or more, or of a book of 500 pages or more.
    notable_reviews_count = CachedCountField(
        "shelves__books__reviews",
        filter=Q(shelves__books__reviews__stars__gte=4) | Q(shelves__books__pages__gte=500),
    )
    #: Reviews of the books on the library's shelves named "Fiction".
    fiction_reviews_count = CachedCountField(
        "shelves__books__reviews", filter=Q(shelves__name="Fiction")
    )
    #: Reviews of books of 300 pages or more, rated four stars or on a "Fiction" shelf.
    picked_reviews_count = CachedCountField(
        "shelves__books__reviews",
        filter=Q(shelves__books__pages__gte=300)
        & (Q(shelves__books__reviews__stars__gte=4) | Q(shelves__name="Fiction")),
    )
    tags_count = CachedCountField("shelves__books__tags", distinct=True)


class Author(models.Model):
    name = models.CharField(max_length=100)


class Shelf(models.Model):
    library = models.ForeignKey(Library, on_delete=models.CASCADE, related_name="shelves")
    name = models.CharField(max_length=100)

    books_count = CachedCountField("books")
    long_books_count = CachedCountField(
        "books", filter=Q(books__pages__gte=F("library__long_book_pages"))
    )
    authors_count = CachedCountField("books__author", distinct=True)
    #: A filter on a foreign key's own column: the book's ``author_id``, no join.
    authored_books_count = CachedCountField("books", filter=Q(books__author__isnull=False))
    #: A has-one in the middle of the path: shelf ← book ← its jacket ← blurbs.
    blurbs_count = CachedCountField("books__jacket__blurbs")


class Book(models.Model):
    shelf = models.ForeignKey(Shelf, on_delete=models.CASCADE, related_name="books")
    author = models.ForeignKey(
        Author, null=True, blank=True, on_delete=models.SET_NULL, related_name="books"
    )
    title = models.CharField(max_length=100)
    pages = models.IntegerField(null=True, blank=True)

    good_reviews_count = CachedCountField("reviews", filter=Q(reviews__stars__gte=4))
    tags_count = CachedCountField("tags")
    #: Through a has-one (the book's jacket) to its blurbs.
    blurbs_count = CachedCountField("jacket__blurbs")

    class Meta:
        indexes = [models.Index(fields=["shelf", "pages"], name="book_shelf_pages")]


class Jacket(models.Model):
    """A book's dust jacket: at most one per book (a has-one, ``OneToOneField``), carrying the
    blurbs printed on it."""

    book = models.OneToOneField(Book, on_delete=models.CASCADE, related_name="jacket")
    color = models.CharField(max_length=20, blank=True)


class Blurb(models.Model):
    jacket = models.ForeignKey(Jacket, on_delete=models.CASCADE, related_name="blurbs")
    quote = models.CharField(max_length=200, blank=True)


class Review(models.Model):
    book = models.ForeignKey(Book, on_delete=models.CASCADE, related_name="reviews")
    stars = models.IntegerField(null=True, blank=True)


class Tag(models.Model):
    name = models.CharField(max_length=100)
    books = models.ManyToManyField(Book, related_name="tags", blank=True)

    books_count = CachedCountField("books")
    rated_books_count = CachedCountField("books", filter=Q(books__reviews__stars__isnull=False))
    authors_count = CachedCountField(
        "books__author",
        distinct=True,
        filter=Q(books__pages__gte=F("books__shelf__library__long_book_pages")),
    )
    #: An M2M filtered on the related rows' own columns: the books are its items.
    authored_books_count = CachedCountField("books", filter=Q(books__author__isnull=False))


class Reader(models.Model):
    """Readers borrow books from shelves through :class:`Loan`, a through model that may link a
    shelf and a reader twice (two loans): no count is declared over it; tests declare them on
    the side, to see which shapes such a through model allows."""

    name = models.CharField(max_length=100)
    shelves = models.ManyToManyField(Shelf, through="Loan", related_name="readers")


class Loan(models.Model):
    shelf = models.ForeignKey(Shelf, on_delete=models.CASCADE)
    reader = models.ForeignKey(Reader, on_delete=models.CASCADE)
