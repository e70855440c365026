"""An independent truth for the test app's counts: hand-written SQL, one subquery per count.

Like ``tests.truth`` for the domain, and for the same reason: the engine computes counts from
the declarations, so a truth derived from them would agree with any mistake. These follow the
meaning written in ``tests.engine_app.models`` word for word.
"""

from __future__ import annotations

from django.db import connection

from tests import truth as domain_truth

#: Per table: ``{cached column: truth expression}``, each a subquery correlated with ``t``.
TRUTH: dict[str, dict[str, str]] = {
    "counts_testapp_library": {
        "reviews_count": (
            "SELECT count(*) FROM counts_testapp_review r JOIN counts_testapp_book b"
            " ON b.id = r.book_id JOIN counts_testapp_shelf s ON s.id = b.shelf_id"
            " WHERE s.library_id = t.id"
        ),
        "rated_long_reviews_count": (
            "SELECT count(*) FROM counts_testapp_review r JOIN counts_testapp_book b"
            " ON b.id = r.book_id JOIN counts_testapp_shelf s ON s.id = b.shelf_id"
            " WHERE s.library_id = t.id AND b.pages >= 300 AND r.stars IS NOT NULL"
        ),
        "notable_reviews_count": (
            "SELECT count(*) FROM counts_testapp_review r JOIN counts_testapp_book b"
            " ON b.id = r.book_id JOIN counts_testapp_shelf s ON s.id = b.shelf_id"
            " WHERE s.library_id = t.id AND (r.stars >= 4 OR b.pages >= 500)"
        ),
        "fiction_reviews_count": (
            "SELECT count(*) FROM counts_testapp_review r JOIN counts_testapp_book b"
            " ON b.id = r.book_id JOIN counts_testapp_shelf s ON s.id = b.shelf_id"
            " WHERE s.library_id = t.id AND s.name = 'Fiction'"
        ),
        "picked_reviews_count": (
            "SELECT count(*) FROM counts_testapp_review r JOIN counts_testapp_book b"
            " ON b.id = r.book_id JOIN counts_testapp_shelf s ON s.id = b.shelf_id"
            " WHERE s.library_id = t.id AND b.pages >= 300"
            " AND (r.stars >= 4 OR s.name = 'Fiction')"
        ),
        "tags_count": (
            "SELECT count(DISTINCT m.tag_id) FROM counts_testapp_tag_books m"
            " JOIN counts_testapp_book b ON b.id = m.book_id"
            " JOIN counts_testapp_shelf s ON s.id = b.shelf_id WHERE s.library_id = t.id"
        ),
    },
    "counts_testapp_shelf": {
        "books_count": "SELECT count(*) FROM counts_testapp_book b WHERE b.shelf_id = t.id",
        "long_books_count": (
            "SELECT count(*) FROM counts_testapp_book b WHERE b.shelf_id = t.id"
            " AND b.pages >= (SELECT l.long_book_pages FROM counts_testapp_library l"
            " WHERE l.id = t.library_id)"
        ),
        "authors_count": (
            "SELECT count(DISTINCT b.author_id) FROM counts_testapp_book b WHERE b.shelf_id = t.id"
        ),
        "authored_books_count": (
            "SELECT count(*) FROM counts_testapp_book b WHERE b.shelf_id = t.id"
            " AND b.author_id IS NOT NULL"
        ),
        "blurbs_count": (
            "SELECT count(*) FROM counts_testapp_blurb x JOIN counts_testapp_jacket j"
            " ON j.id = x.jacket_id JOIN counts_testapp_book b ON b.id = j.book_id"
            " WHERE b.shelf_id = t.id"
        ),
    },
    "counts_testapp_book": {
        "good_reviews_count": (
            "SELECT count(*) FROM counts_testapp_review r WHERE r.book_id = t.id AND r.stars >= 4"
        ),
        "tags_count": "SELECT count(*) FROM counts_testapp_tag_books m WHERE m.book_id = t.id",
        "blurbs_count": (
            "SELECT count(*) FROM counts_testapp_blurb x JOIN counts_testapp_jacket j"
            " ON j.id = x.jacket_id WHERE j.book_id = t.id"
        ),
    },
    "counts_testapp_tag": {
        "books_count": "SELECT count(*) FROM counts_testapp_tag_books m WHERE m.tag_id = t.id",
        "rated_books_count": (
            "SELECT count(*) FROM counts_testapp_tag_books m WHERE m.tag_id = t.id"
            " AND EXISTS (SELECT 1 FROM counts_testapp_review r WHERE r.book_id = m.book_id"
            " AND r.stars IS NOT NULL)"
        ),
        "authors_count": (
            "SELECT count(DISTINCT b.author_id) FROM counts_testapp_tag_books m"
            " JOIN counts_testapp_book b ON b.id = m.book_id"
            " JOIN counts_testapp_shelf s ON s.id = b.shelf_id"
            " JOIN counts_testapp_library l ON l.id = s.library_id"
            " WHERE m.tag_id = t.id AND b.pages >= l.long_book_pages"
        ),
        "authored_books_count": (
            "SELECT count(*) FROM counts_testapp_tag_books m"
            " JOIN counts_testapp_book b ON b.id = m.book_id"
            " WHERE m.tag_id = t.id AND b.author_id IS NOT NULL"
        ),
    },
}

#: Model label of each table, for readable reports.
LABELS = {
    "counts_testapp_library": "counts_testapp.library",
    "counts_testapp_shelf": "counts_testapp.shelf",
    "counts_testapp_book": "counts_testapp.book",
    "counts_testapp_tag": "counts_testapp.tag",
}


def truth(table: str, conn=connection) -> dict[int, dict[str, int]]:
    return domain_truth.truth(table, conn, TRUTH)


def cached(table: str, conn=connection) -> dict[int, dict[str, int]]:
    return domain_truth.cached(table, conn, TRUTH)


def mismatches(conn=connection) -> list[str]:
    return domain_truth.mismatches(conn, TRUTH, LABELS)


def assert_engine_counts_exact(conn=connection) -> None:
    """Every cached count of the test app equals its truth."""
    domain_truth.assert_all_counts_exact(conn, TRUTH, LABELS)
