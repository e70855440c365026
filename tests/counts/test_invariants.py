"""``tests.invariants``: I, J and M hold on a drained world and with writes in flight, and each
kind of corruption is caught and named — a count, a ledger, an orphan ledger, a multiplicity.

These commit for real (``transaction=True``): the check reads its own snapshot on a separate
connection, which sees only committed rows. One test runs in a test transaction instead, where
the check reads on the test's own connection.
"""

from __future__ import annotations

import json

import pytest
from django.db import connection

import counts
from counts.declare.modes import ledger_key
from project.monitoring.models import Detection, Occurrence, SourceImage
from tests.interleave import Harness, drain_to_empty
from tests.invariants import assert_invariants, violations
from tests.truth import assert_all_counts_exact, triggers_off

pytestmark = pytest.mark.django_db(transaction=True)

BOX = [10, 10, 20, 20]
CAPTURES = "item:monitoring.sourceimage"
#: Ledger keys: a capture's own valid detections, a station's distinct taxa.
INSERT_DETECTION = (
    "INSERT INTO monitoring_detection (source_image_id, bbox, created_at, updated_at)"
    " VALUES (%s, %s::jsonb, now(), now())"
)
OWN_DETECTIONS = ledger_key("monitoring.sourceimage.detections_count")
TAXA = ledger_key("monitoring.deployment.taxa_count")


def sql(statement: str, params=()) -> list:
    with connection.cursor() as cursor:
        cursor.execute(statement, params)
        return cursor.fetchall() if cursor.description else []


def named(found) -> set[tuple[str, str, int, str]]:
    return {(v.invariant, v.where, v.row, v.field) for v in found}


def mark_items(ids: list[int] | None) -> None:
    sql("INSERT INTO counts_dirtymark (target, ids) VALUES (%s, %s)", [CAPTURES, ids])


def test_invariants_hold_on_a_drained_world(world):
    drain_to_empty()
    assert violations() == []
    assert_invariants()
    assert sql("SELECT count(*) FROM counts_ledger") != [(0,)]  # something was checked
    assert sql("SELECT count(*) FROM counts_multiplicity") != [(0,)]


@pytest.mark.parametrize(
    "column, stored, expected, source",
    [
        ("detections_count", 3, 2, "credited by the ledgers of item:monitoring.sourceimage"),
        ("captures_count", 4, 3, "counted rows"),  # own-row: COUNT(*) from the declaration
        ("taxa_count", 2, 1, "multiplicity pairs with n > 0"),  # distinct
    ],
)
def test_a_stored_count_changed_behind_the_guards_breaks_i_until_a_recount_mark_covers_it(
    world, column, stored, expected, source
):
    with triggers_off() as cursor:
        cursor.execute(
            f"UPDATE monitoring_deployment SET {column} = {column} + 1 WHERE id = %s",
            [world.d1.pk],
        )
    found = violations()
    assert named(found) == {("I", "monitoring.deployment", world.d1.pk, column)}
    assert str(found[0]).endswith(
        f"stored {stored} + pending 0 = {stored}, expected {expected} ({source})"
    )
    with pytest.raises(AssertionError, match=r"I: monitoring\.deployment#"):
        assert_invariants()
    # A recount mark for the row: its stored value may be anything until the recount.
    sql("INSERT INTO counts_dirtymark (target, ids) VALUES ('monitoring.deployment', %s)",
        [[world.d1.pk]])  # fmt: skip
    assert violations() == []
    drain_to_empty()
    assert violations() == []
    assert_all_counts_exact()


def test_a_changed_ledger_entry_breaks_j_for_the_item_and_i_for_its_targets(world):
    sql(
        "UPDATE counts_ledger SET state = jsonb_set(state, %s, '5')"
        " WHERE kind = %s AND item_id = %s",
        [[OWN_DETECTIONS, "0"], CAPTURES, world.i1.pk],
    )
    found = named(violations())
    assert ("J", CAPTURES, world.i1.pk, "ledger") in found
    assert ("I", "monitoring.sourceimage", world.i1.pk, "detections_count") in found
    assert {v[0] for v in found} == {"I", "J"}


def test_an_orphan_ledger_row_is_caught_unless_a_mark_covers_it(world):
    gone = world.i5.pk
    (state,) = sql(
        "SELECT state FROM counts_ledger WHERE kind = %s AND item_id = %s", [CAPTURES, gone]
    )[0]
    world.i5.delete()
    drain_to_empty()
    assert violations() == []
    assert sql("SELECT 1 FROM counts_ledger WHERE item_id = %s", [gone]) == []
    sql(
        "INSERT INTO counts_ledger (kind, item_id, state) VALUES (%s, %s, %s)",
        [CAPTURES, gone, state if isinstance(state, str) else json.dumps(state)],
    )
    found = named(violations())
    assert ("J", CAPTURES, gone, "orphan ledger") in found
    mark_items([gone])
    assert ("J", CAPTURES, gone, "orphan ledger") not in named(violations())


def test_a_multiplicity_off_by_one_or_left_at_zero_breaks_m(world):
    sql("UPDATE counts_multiplicity SET n = n + 1 WHERE key = %s AND target_id = %s",
        [TAXA, world.d1.pk])  # fmt: skip
    found = violations()
    assert named(found) == {("M", f"monitoring.deployment.taxa_count [{TAXA}]", world.d1.pk,
                             f"value {world.moth.pk}")}  # fmt: skip
    assert "n = 2, ledger entries 1" in str(found[0])
    sql("UPDATE counts_multiplicity SET n = n - 1 WHERE key = %s AND target_id = %s",
        [TAXA, world.d1.pk])  # fmt: skip
    sql("INSERT INTO counts_multiplicity (key, target_id, value, n) VALUES (%s, %s, %s, 0)",
        [TAXA, world.d2.pk, world.beetle.pk])  # fmt: skip
    found = violations()
    assert [(v.invariant, v.row, v.detail) for v in found] == [
        ("M", world.d2.pk, "n = 0, ledger entries 0")
    ]


@pytest.mark.parametrize("every", [False, True], ids=["item-mark", "every-item-mark"])
def test_a_pending_item_mark_makes_a_stale_ledger_acceptable(world, every):
    with triggers_off() as cursor:  # the truth changes, and nothing says so
        cursor.execute(
            INSERT_DETECTION,
            [world.i3.pk, json.dumps(BOX)],
        )
    assert named(violations()) == {("J", CAPTURES, world.i3.pk, "ledger")}
    mark_items(None if every else [world.i3.pk])
    assert violations() == []
    drain_to_empty()
    assert violations() == []
    assert_all_counts_exact()


def test_invariants_hold_with_writes_in_flight_and_after_draining(world):
    """Every commit is a state I, J and M hold in: marks pending, partly drained, or none."""
    steps = [
        lambda: Detection.objects.create(source_image=world.i3, bbox=BOX),
        lambda: Detection.objects.create(source_image=world.i5, bbox=None),
        lambda: world.det2.delete(),
        lambda: world.c3.images.add(world.i4, world.i5),
        lambda: world.c1.images.remove(world.i2),
        lambda: SourceImage.objects.filter(pk=world.i1.pk).update(deployment=world.d2),
        lambda: setattr(world.p1, "default_filters_score_threshold", 0.35) or world.p1.save(),
        lambda: Occurrence.objects.filter(pk=world.o3.pk).update(determination_score=0.7),
    ]
    for step in steps:
        step()
        assert_invariants()
    assert sql("SELECT count(*) FROM counts_dirtymark")[0][0] > 0
    while not counts.drain(batch_size=1, max_ids=1).empty:
        assert_invariants()
    drain_to_empty()
    assert_invariants()
    assert_all_counts_exact()


def test_uncommitted_writes_and_a_held_drain_are_outside_the_snapshot(world):
    Detection.objects.create(source_image=world.i3, bbox=BOX)
    world.c2.images.add(world.i3)
    harness = Harness()
    try:
        writer, drainer = harness.sql("writer"), harness.orm("drainer")
        writer.execute(
            INSERT_DETECTION,
            [world.i4.pk, json.dumps(BOX)],
        )
        drainer.begin()
        assert not drainer.drain(batch_size=10, max_ids=100).empty
        assert_invariants()  # the drain's ledgers and credits are not committed yet
        drainer.commit()
        assert_invariants()
        writer.commit()
        assert_invariants()  # the writer's item mark covers its capture
    finally:
        harness.close()
    drain_to_empty()
    assert_invariants()
    assert_all_counts_exact()


@pytest.mark.django_db(transaction=False)
def test_in_a_test_transaction_the_check_reads_the_tests_own_rows(world):
    drain_to_empty()
    assert_invariants()
    sql("UPDATE counts_multiplicity SET n = n + 1 WHERE key = %s", [TAXA])
    assert {v.invariant for v in violations()} == {"M"}


def test_the_engine_apps_shapes_hold_in_flight_and_a_wrong_m2m_count_is_caught(library):
    """Every shape the engine supports (``tests.engine_app``): M2M counts from both sides, a
    setting reached by ``F()``, a distinct count, counts folded into an item kind."""
    from tests.engine_app.models import Book, Review
    from tests.engine_app.truth import assert_engine_counts_exact

    w = library
    drain_to_empty()
    assert_invariants()
    steps = [
        lambda: Review.objects.create(book=w.anon, stars=4),
        lambda: Book.objects.filter(pk=w.beagle.pk).update(pages=400, author=w.austen),
        lambda: setattr(w.school, "long_book_pages", 220) or w.school.save(),
        lambda: w.unused.books.add(w.anon, w.beagle),
        lambda: w.classics.books.remove(w.sense),
        lambda: w.emma.delete(),
    ]
    for step in steps:
        step()
        assert_invariants()
    drain_to_empty()
    assert_invariants()
    assert_engine_counts_exact()
    with triggers_off() as cursor:
        cursor.execute("UPDATE counts_testapp_tag SET books_count = 7 WHERE id = %s", [w.nature.pk])
        cursor.execute("UPDATE counts_testapp_book SET tags_count = 0 WHERE id = %s", [w.origin.pk])
    assert named(violations()) == {
        ("I", "counts_testapp.tag", w.nature.pk, "books_count"),
        ("I", "counts_testapp.book", w.origin.pk, "tags_count"),
    }
