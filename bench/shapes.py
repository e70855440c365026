"""Section: one write's drain for the declaration shapes issue 23 made incremental, at growing
target sizes, beside the full recount the same write costs a count that is still kept in full.

The shapes live in the engine's test app (``tests/engine_app``), so the section runs where that
app is installed: ``COUNTS_TEST_APP=1``, in a database of its own (it adds a million rows to
the test app's tables, which a test database must not keep). Per size N (``--shapes-sizes``,
default 50k, 200k and 800k), the section seeds (once; reused while its rows are all there) a
library with one shelf of N books, each with one review, half of them by an author and half
long, all N tagged by one tag: N children under each target, 1.05 million of each at the
defaults. Seeded in set-based statements with the triggers off, then ``counts.rebuild()``
brings every count and ledger to its truth.

Cases, each a committed single-row write on a random book (or review) of the size's shelf, then
the drain timed, then its counts checked against hand-written SQL and the write undone
(untimed):

- **three-level** (``Library.reviews_count``, ``shelves__books__reviews``): a review created;
  the drain of the books' item marks (``item:counts_testapp.book``), what the worker for that
  label does (with ``Library.notable_reviews_count``, the same path with an OR across the
  reviews and the books, and ``Library.fiction_reviews_count``, filtered on the shelf's name,
  a row above the items, both kept through the same items). Then, timed apart, the rest of
  the same write's drain: nearly all of it the recount of ``Library.picked_reviews_count``,
  whose filter tests the rows above the reviews in two places, still kept in full (the
  contrast: what a full recount of N children costs);
- **filtered middle** (``Library.rated_long_reviews_count``: a filter on the book's pages): a
  book with a rated review drops below 300 pages; the drain of the item marks;
- **FK filter** (``Shelf.authored_books_count``, ``books__author__isnull=False``, own-row, and
  ``Tag.authored_books_count``, the same filter over an M2M, an item count): a book's author set
  to NULL; the drain to empty.

Goal (issue 23): each ≤ 5 ms, and the slowest size within 1.5x of the fastest. Each figure is
the median over ``--shapes-repeats``; the cases rotate between repeats.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from django.apps import apps
from django.core.management.base import CommandError
from django.db import connection, transaction

import counts
from bench.timing import median, ms, stopwatch
from counts.api import drain_until_empty
from counts.base.names import MARK_TABLE
from counts.fields import cached_count_fields
from counts.run.notice import quiet

APP = "counts_testapp"
BOOKS = "item:counts_testapp.book"
NAME = "bench-shapes-{}"
DEFAULT_SIZES = (50_000, 200_000, 800_000)
CASES = ("three_level", "filtered_middle", "fk_filter")
#: Most drain batches per sample before the bench gives up.
MAX_BATCHES = 10_000


def require_test_app() -> None:
    if not apps.is_installed("tests.engine_app"):
        raise CommandError(
            "the shapes section runs on the engine's test app: COUNTS_TEST_APP=1, in a database"
            " of its own (DATABASE_URL=.../countdown_shapes; `manage.py migrate` first)"
        )


def _sql(sql: str, params=None) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params or [])
        return cursor.fetchall() if cursor.description else []


def _present(n: int) -> dict | None:
    """The size's library, shelf, tag and book id range, when all its rows are there."""
    rows = _sql(
        "SELECT l.id, s.id, min(b.id), max(b.id), count(b.id) FROM counts_testapp_library l"
        " JOIN counts_testapp_shelf s ON s.library_id = l.id"
        " JOIN counts_testapp_book b ON b.shelf_id = s.id WHERE l.name = %s GROUP BY 1, 2",
        [NAME.format(n)],
    )
    if len(rows) != 1 or rows[0][4] != n:
        return None
    library, shelf, lo, hi, _ = rows[0]
    (tag,) = _sql("SELECT id FROM counts_testapp_tag WHERE name = %s", [NAME.format(n)])[0]
    return {"n": n, "library": library, "shelf": shelf, "tag": tag, "lo": lo, "hi": hi}


def _seed(n: int) -> None:
    """N books on one shelf of one library, one review each, all tagged by one tag; triggers
    off (the rebuild afterwards sets every count and ledger)."""
    name = NAME.format(n)
    with transaction.atomic(), connection.cursor() as c:
        c.execute("SET LOCAL session_replication_role = replica")
        c.execute(
            "DELETE FROM counts_testapp_tag WHERE name = %s;"
            " DELETE FROM counts_testapp_library WHERE name = %s",
            [name, name],
        )
        c.execute(
            "INSERT INTO counts_testapp_author (name) SELECT %s WHERE NOT EXISTS"
            " (SELECT 1 FROM counts_testapp_author WHERE name = %s)",
            ["bench-shapes", "bench-shapes"],
        )
        c.execute(
            "INSERT INTO counts_testapp_library (name, long_book_pages, reviews_count,"
            " rated_long_reviews_count, notable_reviews_count, fiction_reviews_count,"
            " picked_reviews_count, tags_count) VALUES (%s, 300, 0, 0, 0, 0, 0, 0) RETURNING id",
            [name],
        )
        (library,) = c.fetchone()
        c.execute(
            "INSERT INTO counts_testapp_shelf (library_id, name, books_count, long_books_count,"
            " authors_count, authored_books_count) VALUES (%s, 'Fiction', 0, 0, 0, 0)"
            " RETURNING id",
            [library],
        )
        (shelf,) = c.fetchone()
        c.execute(
            "INSERT INTO counts_testapp_book (shelf_id, author_id, title, pages,"
            " good_reviews_count, tags_count)"
            " SELECT %s, CASE WHEN i %% 2 = 0 THEN (SELECT min(id) FROM counts_testapp_author"
            " WHERE name = 'bench-shapes') END, 'b', 100 + (i * 7) %% 400, 0, 0"
            " FROM generate_series(1, %s) i",
            [shelf, n],
        )
        c.execute(
            "INSERT INTO counts_testapp_review (book_id, stars) SELECT id,"
            " CASE WHEN id %% 5 = 0 THEN NULL ELSE id %% 5 END FROM counts_testapp_book"
            " WHERE shelf_id = %s",
            [shelf],
        )
        c.execute(
            "INSERT INTO counts_testapp_tag (name, books_count, rated_books_count,"
            " authors_count, authored_books_count) VALUES (%s, 0, 0, 0, 0) RETURNING id",
            [name],
        )
        (tag,) = c.fetchone()
        c.execute(
            "INSERT INTO counts_testapp_tag_books (tag_id, book_id)"
            " SELECT %s, id FROM counts_testapp_book WHERE shelf_id = %s",
            [tag, shelf],
        )


def ensure(sizes: list[int], log: Callable[[str], None]) -> list[dict]:
    missing = [n for n in sizes if _present(n) is None]
    if missing:
        for n in missing:
            log(f"shapes: seeding a library of {n:,} books and reviews")
            _seed(n)
        _sql("VACUUM (ANALYZE)")
        log("shapes: counts.rebuild() of the test app's counts")
        with quiet():
            models = apps.get_app_config(APP).get_models()
            counts.rebuild([m for m in models if cached_count_fields(m)])
    _drain()
    return [_present(n) for n in sizes]


def _drain(targets: list[str] | None = None) -> None:
    """Drain (``targets`` only, or everything) until a batch takes no mark."""
    drain_until_empty(MAX_BATCHES, targets=targets)


def _one(sql: str, params) -> int:
    return _sql(sql, params)[0][0]


def _check(size: dict) -> None:
    """The counts the cases touch, against hand-written SQL."""
    lib, shelf, tag = size["library"], size["shelf"], size["tag"]
    want = _sql(
        "SELECT count(*), count(*) FILTER (WHERE b.pages >= 300 AND r.stars IS NOT NULL),"
        " count(*) FILTER (WHERE r.stars >= 4 OR b.pages >= 500), count(*),"
        " count(*) FILTER (WHERE b.pages >= 300)"
        " FROM counts_testapp_review r JOIN counts_testapp_book b ON b.id = r.book_id"
        " WHERE b.shelf_id = %s",
        [shelf],
    )[0]
    got = _sql(
        "SELECT reviews_count, rated_long_reviews_count, notable_reviews_count,"
        " fiction_reviews_count, picked_reviews_count FROM counts_testapp_library"
        " WHERE id = %s",
        [lib],
    )[0]
    authored = _one(
        "SELECT count(*) FROM counts_testapp_book WHERE shelf_id = %s AND author_id IS NOT NULL",
        [shelf],
    )
    stored = _sql(
        "SELECT s.authored_books_count, t.authored_books_count FROM counts_testapp_shelf s,"
        " counts_testapp_tag t WHERE s.id = %s AND t.id = %s",
        [shelf, tag],
    )[0]
    pending = _one(f"SELECT count(*) FROM {MARK_TABLE}", [])
    if tuple(got) != tuple(want) or stored != (authored, authored) or pending:
        raise CommandError(
            f"shapes: counts differ from the truth at {size['n']:,} (library {got} vs {want},"
            f" authored {stored} vs {authored}, {pending} marks pending)"
        )


def _book(size: dict, rng: random.Random, where: str) -> int:
    """A random book of the size's shelf meeting ``where`` (SQL over ``b``)."""
    start = rng.randint(size["lo"], size["hi"])
    row = _sql(
        f"SELECT b.id FROM counts_testapp_book b WHERE b.shelf_id = %s AND b.id >= %s AND {where}"
        " ORDER BY b.id LIMIT 1",
        [size["shelf"], start],
    ) or _sql(
        f"SELECT b.id FROM counts_testapp_book b WHERE b.shelf_id = %s AND {where}"
        " ORDER BY b.id LIMIT 1",
        [size["shelf"]],
    )
    return row[0][0]


def _write(sql: str, params) -> None:
    with quiet(), transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(sql, params)


def _sample(case: str, size: dict, rng: random.Random) -> dict:
    """One write of ``case``, its drain timed; counts checked; the write undone."""
    _sql(f"VACUUM {MARK_TABLE}")
    # VACUUM invalidates every cached plan over the mark table: the next drain re-plans its
    # prepared statements (the take twice: 0.5 ms each). A worker pays that once after
    # autovacuum visits the table, not per write; an empty drain pays it here, untimed.
    _drain()
    out = {}
    if case == "three_level":
        book = _book(size, rng, "true")
        _write("INSERT INTO counts_testapp_review (book_id, stars) VALUES (%s, 2)", [book])
        with stopwatch() as t:
            _drain([BOOKS])
        with stopwatch() as rest:
            _drain()
        out = {"ms": ms(t.seconds), "rest_ms": ms(rest.seconds)}
        _check(size)
        _write(
            "DELETE FROM counts_testapp_review WHERE id = (SELECT max(id) FROM"
            " counts_testapp_review WHERE book_id = %s)",
            [book],
        )
    elif case == "filtered_middle":
        where = (
            "b.pages >= 300 AND EXISTS (SELECT 1 FROM counts_testapp_review r"
            " WHERE r.book_id = b.id AND r.stars IS NOT NULL)"
        )
        book = _book(size, rng, where)
        pages = _one("SELECT pages FROM counts_testapp_book WHERE id = %s", [book])
        _write("UPDATE counts_testapp_book SET pages = 120 WHERE id = %s", [book])
        with stopwatch() as t:
            _drain([BOOKS])
        _drain()
        out = {"ms": ms(t.seconds)}
        _check(size)
        _write("UPDATE counts_testapp_book SET pages = %s WHERE id = %s", [pages, book])
    else:
        book = _book(size, rng, "b.author_id IS NOT NULL")
        author = _one("SELECT author_id FROM counts_testapp_book WHERE id = %s", [book])
        _write("UPDATE counts_testapp_book SET author_id = NULL WHERE id = %s", [book])
        with stopwatch() as t:
            _drain()
        out = {"ms": ms(t.seconds)}
        _check(size)
        _write("UPDATE counts_testapp_book SET author_id = %s WHERE id = %s", [author, book])
    _drain()
    return out


def measure(sizes: list[int], repeats: int, log: Callable[[str], None]) -> dict:
    require_test_app()
    found = ensure(sizes, log)
    rng = random.Random(23)
    samples: dict = {case: {s["n"]: [] for s in found} for case in CASES}
    for s in found:  # warm-up, untimed
        for case in CASES:
            _sample(case, s, rng)
    for r in range(repeats):
        order = CASES[r % len(CASES) :] + CASES[: r % len(CASES)]
        for s in found:
            for case in order:
                samples[case][s["n"]].append(_sample(case, s, rng))
        log(f"shapes: repeat {r + 1}/{repeats}")
    out: dict = {"sizes": sizes, "repeats": repeats, "samples": samples, "median": {}}
    for case in CASES:
        med = {n: median([x["ms"] for x in xs]) for n, xs in samples[case].items()}
        row = {"ms": med, "spread": max(med.values()) / max(min(med.values()), 1e-9)}
        if case == "three_level":
            row["full_ms"] = {
                n: median([x["rest_ms"] for x in xs]) for n, xs in samples[case].items()
            }
        out["median"][case] = row
    return out
