"""The engine pinned on shapes it owns: the test app's declarations, specs, graph and triggers.

``tests.engine_app`` declares one count per shape the engine supports; these tests fix what each
shape resolves to, which tables and operations the triggers watch for it, and that every count
declared anywhere has an independent truth to end tests with. The monitoring domain's own
counts are pinned in ``test_spec_and_graph`` and ``test_trigger_sql``; nothing here depends on
them, so adding a count to the domain never breaks these.
"""

from __future__ import annotations

import re

import pytest

from counts.apps import graph
from counts.base.errors import UnknownTargetError
from counts.compile.triggers import compile_mark_triggers
from counts.declare.graph import ROOT
from counts.declare.spec import FORWARD, REVERSE
from counts.run.aggregate import compile_recompute
from counts.run.notice import WriteWatcher
from tests import truth as domain_truth
from tests.engine_app import truth as engine_truth

APP = "counts_testapp"
THROUGH = "counts_testapp_tag_books"


def spec(key: str):
    return next(s for s in graph().specs if s.key == f"{APP}.{key}")


def hops(chain) -> list[tuple[str, str, str]]:
    return [(h.kind, h.child.db_table, h.column) for h in chain]


def app_specs():
    return [s for s in graph().specs if s.target.label.startswith(f"{APP}.")]


def test_the_test_app_declares_eighteen_counts_on_four_models():
    assert [s.key for s in app_specs()] == [
        f"{APP}.book.good_reviews_count",
        f"{APP}.book.tags_count",
        f"{APP}.book.blurbs_count",
        f"{APP}.library.reviews_count",
        f"{APP}.library.rated_long_reviews_count",
        f"{APP}.library.notable_reviews_count",
        f"{APP}.library.fiction_reviews_count",
        f"{APP}.library.picked_reviews_count",
        f"{APP}.library.tags_count",
        f"{APP}.shelf.books_count",
        f"{APP}.shelf.long_books_count",
        f"{APP}.shelf.authors_count",
        f"{APP}.shelf.authored_books_count",
        f"{APP}.shelf.blurbs_count",
        f"{APP}.tag.books_count",
        f"{APP}.tag.rated_books_count",
        f"{APP}.tag.authors_count",
        f"{APP}.tag.authored_books_count",
    ]


def test_a_plain_reverse_fk_count_reads_only_the_link():
    s = spec("shelf.books_count")
    assert hops(s.counted) == [(REVERSE, "counts_testapp_book", "shelf_id")]
    assert not s.probes and s.filter is None


def test_a_constant_filter_is_read_on_the_counted_rows():
    s = spec("book.good_reviews_count")
    assert s.reads[s.counted] == {"book_id", "stars"}


def test_a_parent_setting_by_f_is_read_with_the_link_to_it():
    s = spec("shelf.long_books_count")
    library = next(c for c in s.reads if c and c[-1].child.db_table == "counts_testapp_library")
    assert hops(library) == [(FORWARD, "counts_testapp_library", "library_id")]
    assert s.reads[library] == {"long_book_pages"}
    assert s.reads[()] == {"library_id"}  # moving the shelf changes its threshold


def test_a_distinct_count_over_a_forward_fk_counts_its_targets():
    s = spec("shelf.authors_count")
    assert s.distinct and s.counted == s.path_chain
    assert hops(s.path_chain)[-1] == (FORWARD, "counts_testapp_author", "author_id")
    assert s.reads[s.path_chain[:1]] == {"shelf_id", "author_id"}


def test_an_m2m_is_crossed_through_its_table_from_either_side():
    assert hops(spec("tag.books_count").counted) == [
        (REVERSE, THROUGH, "tag_id"),
        (FORWARD, "counts_testapp_book", "book_id"),
    ]
    assert hops(spec("book.tags_count").counted) == [
        (REVERSE, THROUGH, "book_id"),
        (FORWARD, "counts_testapp_tag", "tag_id"),
    ]


def test_members_with_a_valid_child_are_probed_not_joined():
    rated, plain = spec("tag.rated_books_count"), spec("tag.books_count")
    assert rated.probes and not plain.probes
    assert rated.join_signature == plain.join_signature
    assert not rated.needs_distinct(plain.join_signature)


def test_a_probe_starts_at_the_table_below_the_counted_rows():
    sql = compile_recompute(graph(), f"{APP}.tag").sql
    probes = re.findall(r"EXISTS\(SELECT .*? FROM (\S+) U0 WHERE (.*?) LIMIT 1\)", sql)
    assert [table for table, _ in probes] == ['"counts_testapp_review"']
    assert '"stars" IS NOT NULL' in probes[0][1]
    truth = sql.split(" f LEFT JOIN ")[0]  # before the formula's pending terms
    # The probe's group reads the through rows alone (the tag's books with an author, a count
    # of the books' own column, are another group, which joins them).
    [group] = [part for part in re.split(r"\) g\d+ ON", truth) if "EXISTS(" in part]
    assert 'counts_testapp_book"' not in group, "no join to the members"


def test_update_triggers_compare_only_columns_a_count_reads():
    sql = next(
        t.sql
        for t in compile_mark_triggers(graph())
        if (t.table, t.operation) == ("counts_testapp_book", "update")
    )
    for read in ("shelf_id", "pages", "author_id"):
        assert f'IS NOT DISTINCT FROM s."{read}"' in sql
    assert '"title"' not in sql


def test_write_watcher_notices_writes_to_watched_tables_only():
    watcher = WriteWatcher.for_graph(graph())
    book, tag = f"{APP}.book", f"{APP}.tag"
    # A review: its book as an item (its own good reviews and the tags' rated books), and its
    # library's reviews, kept in full.
    books, library = f"item:{APP}.book", f"{APP}.library"
    assert watcher.targets_of('INSERT INTO "counts_testapp_review" ...') == {books, library}
    # A membership: its book as an item, and itself as an item of the libraries' distinct tags.
    memberships = f"item:{APP}.tag_books"
    assert watcher.targets_of(f'DELETE FROM "{THROUGH}" WHERE ...') == {
        book,
        tag,
        books,
        memberships,
    }
    assert watcher.targets_of('SELECT * FROM "counts_testapp_review"') == frozenset()
    assert watcher.targets_of('UPDATE "counts_testapp_author" SET name = 1') == frozenset()
    # A shelf moving libraries: a job over its books (their threshold), one over its books'
    # memberships (the libraries' tags), and both libraries.
    assert watcher.targets_of("UPDATE counts_testapp_shelf SET library_id = 1") == {
        books,
        library,
        memberships,
    }
    # A library's setting: one job over the books it can flip (``counts.declare.jobs``).
    assert watcher.targets_of("WITH x AS (SELECT 1) UPDATE counts_testapp_library SET a = 1") == {
        books
    }


def test_each_table_is_watched_for_the_operations_that_change_a_count():
    ops = {
        (t.table, t.operation) for t in compile_mark_triggers(graph()) if t.table.startswith(APP)
    }
    changing_rows = {"insert", "update", "delete", "truncate"}
    assert ops == (
        {("counts_testapp_book", op) for op in changing_rows}
        | {("counts_testapp_review", op) for op in changing_rows}
        | {(THROUGH, op) for op in changing_rows}
        # A parent holding a setting, and the target row holding the link to it: updates only.
        | {("counts_testapp_library", "update"), ("counts_testapp_library", "truncate")}
        # Shelves: the books' target row for their counts, and on the library's reviews path.
        | {("counts_testapp_shelf", op) for op in changing_rows}
        # The blurbs, counted, and the jackets holding them: a book's has-one.
        | {("counts_testapp_jacket", op) for op in changing_rows}
        | {("counts_testapp_blurb", op) for op in changing_rows}
    )
    root = [r for r in graph().routes["counts_testapp_shelf"] if r.reached_by == ROOT]
    assert [r.columns for r in root] == [frozenset({"library_id"})]


def test_a_model_whose_columns_no_count_reads_is_never_watched():
    assert "counts_testapp_author" not in graph().routes
    assert "counts_testapp_tag" not in graph().routes  # a tag's own columns are never read


def test_a_model_without_counts_is_refused_as_a_target():
    with pytest.raises(UnknownTargetError, match=rf"'{APP}\.author'"):
        graph().specs_for(f"{APP}.author")


def test_every_declared_count_has_an_independent_truth():
    """A count without a hand-written truth would go unchecked by every test ending in one."""
    truths = {**domain_truth.TRUTH, **engine_truth.TRUTH}
    missing = [s.key for s in graph().specs if s.column not in truths.get(s.target.db_table, {})]
    assert not missing, f"declare a truth expression in tests/truth.py or its app's: {missing}"
    declared = {(s.target.db_table, s.column) for s in graph().specs}
    stale = [(t, c) for t, cols in truths.items() for c in cols if (t, c) not in declared]
    assert not stale, f"truth expressions for counts nobody declares: {stale}"
