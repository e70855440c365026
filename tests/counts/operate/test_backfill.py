"""A new count's backfill (``counts.operate.backfill``): what it takes, and what it leaves.

The backfill holds a lease, an "every item" mark that keeps invariant J for the drains while it
runs. The lease is the backfill's own: it must not make the backfill take every item of each
range as if each had a change waiting (it took 2.2 times the captures that can count, each
locked, given an empty ledger row and swept). Real PostgreSQL; the count is made new by
wiping its column and ledger entries with triggers off, as a deploy adding it would find them.
"""

from __future__ import annotations

import random

import pytest
from django.db import connection

from counts.api import recompute
from counts.apps import graph
from counts.base import checkpoints
from counts.base.names import LEDGER_TABLE, MARK_TABLE
from counts.declare.modes import ledger_key
from counts.operate.backfill import backfill, decide, plan, run
from counts.operate.lease import Lease
from counts.run.exact import read_exact
from project.monitoring.models import (
    Detection,
    Event,
    Occurrence,
    SourceImage,
    SourceImageCollection,
)
from tests.invariants import assert_invariants
from tests.truth import assert_all_counts_exact, drain_all, settle, triggers_off

pytestmark = pytest.mark.django_db(transaction=True)

CAPTURES = "item:monitoring.sourceimage"


def make_the_count_new(label: str = "monitoring.sourceimage", column: str = "detections_count"):
    """No column value, no ledger entry, no multiplicity: as a deploy adding it finds it."""
    key = ledger_key(f"{label}.{column}")
    (kind,) = [k for k in graph().kinds.values() if any(p.key == key for p in k.parts)]
    table = graph().targets[label].db_table
    with triggers_off() as cursor:
        cursor.execute(f"UPDATE {table} SET {column} = 0")
        cursor.execute(
            f"UPDATE {LEDGER_TABLE} SET state = state - %s WHERE kind = %s",
            [key, kind.mark_target],
        )
        cursor.execute(f"DELETE FROM {LEDGER_TABLE} WHERE state = '{{}}'")
        cursor.execute("DELETE FROM counts_multiplicity WHERE key = %s", [key])
    return kind.mark_target


def test_a_new_counts_backfill_takes_only_the_items_that_can_count(make_world):
    make_world()
    make_the_count_new()
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(DISTINCT source_image_id) FROM monitoring_detection"
            " WHERE bbox IS NOT NULL"
        )
        (can_count,) = cursor.fetchone()
        cursor.execute("SELECT count(*) FROM monitoring_sourceimage")
        (captures,) = cursor.fetchone()
    assert 0 < can_count < captures, "some captures have no valid detection"

    seen: dict[str, int] = {}
    backfill("monitoring.sourceimage", ["detections_count"], progress=seen.__setitem__)

    assert seen[CAPTURES] == can_count, "only the captures with something to count"
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM {MARK_TABLE}")
        assert cursor.fetchone() == (0,), "the lease is gone, and nothing was re-marked"
    assert_invariants()
    assert_all_counts_exact()
    drain_all()
    assert_all_counts_exact()


def _capture_drained(world):
    Detection.objects.create(source_image=world.i3, bbox=[1, 2, 3, 4])
    return world.i3, world.i2


def _occurrence_drained(world):
    Occurrence.objects.create(
        deployment=world.d2, event=world.e3, determination=world.beetle, determination_score=0.9
    )
    return world.d2, world.d1


@pytest.mark.parametrize(
    ("label", "column", "write"),
    [
        ("monitoring.sourceimage", "detections_count", _capture_drained),
        ("monitoring.deployment", "taxa_count", _occurrence_drained),  # a distinct count
    ],
)
def test_a_drain_between_adding_the_column_and_its_backfill_does_not_force_a_recount(
    make_world, label, column, write
):
    """The workers drain while a deploy migrates: a drain of an item after its new column
    exists writes the new entry (and multiplicity) and credits the column together. The
    backfill then still only sweeps the items (it used to recount every row of the model
    under its lease: seconds a chunk at 10⁶), and the count ends exact. A column holding a
    value no entry accounts for (kept another way before) is still recounted."""
    world = make_world()
    kind = make_the_count_new(label, column)
    touched, other = write(world)
    drain_all()  # the item's ledger now has the new entry, and the column its credit
    touched.refresh_from_db()
    assert getattr(touched, column) > 0

    seen: dict[str, int] = {}
    backfill(label, [column], progress=seen.__setitem__)
    assert label not in seen, "every row was recounted"
    assert seen[kind] > 0
    assert_invariants()
    assert_all_counts_exact()

    make_the_count_new(label, column)
    with triggers_off() as cursor:  # a value no ledger entry accounts for
        table = graph().targets[label].db_table
        cursor.execute(f"UPDATE {table} SET {column} = 7 WHERE id = %s", [other.pk])
    seen.clear()
    backfill(label, [column], progress=seen.__setitem__)
    assert label in seen, "a column kept another way must be recounted"
    assert_invariants()
    assert_all_counts_exact()


def test_while_a_backfill_holds_its_lease_other_counts_of_the_kind_stay_exact_at_read(make_world):
    """The lease covers every capture for the new count's key only: the capture-set and night
    counts the captures also feed are kept by the drains meanwhile, so a list page reading
    them exactly still gets exact counts (it used to read every capture as stale, over any
    budget, for the whole backfill: "not exact" on every set, and seconds per recount at 10⁶),
    while the captures' own new count says it is not exact until swept."""
    make_world()
    make_the_count_new()
    read: dict[str, list[bool]] = {}

    def look(name, info):
        if read:
            return
        for model in (SourceImageCollection, Event, SourceImage):
            ids = list(model.objects.values_list("pk", flat=True))
            read[model.__name__] = [row.exact for row in read_exact(model, ids).values()]

    with checkpoints.at("bulk.between_transactions", look):
        backfill("monitoring.sourceimage", ["detections_count"], chunk=1)
    assert read, "the sweep took more than one chunk"
    assert all(read["SourceImageCollection"]) and all(read["Event"]), read
    assert not all(read["SourceImage"]), "the new count is not vouched for before its sweep"
    assert_invariants()
    assert_all_counts_exact()


def test_writes_drains_and_recomputes_between_a_backfills_chunks_keep_every_invariant(make_world):
    """Between every two chunks of a new count's backfill, the application writes (a detection
    added, one moved to another capture, one deleted, a capture added to a set), the workers
    drain what is due, and an operator recomputes every capture and every set by the formula:
    the captures' recount while the lease names their new key, the sets' while it names none of
    theirs. Invariants I, J (per key: the lease covers only the new count's entries) and M hold
    at every step, and the counts end exact."""
    world = make_world()
    for n in range(15):
        capture = SourceImage.objects.create(
            deployment=world.d1, event=world.e2, timestamp=world.i3.timestamp, path=f"x/{n}.jpg"
        )
        Detection.objects.create(source_image=capture, bbox=[1, 2, 3, 4])
    drain_all()
    make_the_count_new()
    rng = random.Random(7)
    steps = []

    def race(name, info):
        captures = list(SourceImage.objects.values_list("pk", flat=True))
        Detection.objects.create(source_image_id=rng.choice(captures), bbox=[5, 6, 7, 8])
        moved = Detection.objects.order_by("?").first()
        moved.source_image_id = rng.choice(captures)
        moved.save()
        Detection.objects.filter(pk=Detection.objects.order_by("?").first().pk).delete()
        world.c3.images.add(rng.choice(captures))
        drain_all()
        recompute(SourceImage.objects.all())
        recompute(SourceImageCollection.objects.all())
        assert_invariants()
        steps.append(info)

    with checkpoints.at("bulk.between_transactions", race):
        backfill("monitoring.sourceimage", ["detections_count"], chunk=1)
    assert len(steps) >= 3, steps
    settle()


@pytest.mark.parametrize("leased", [True, False])
def test_a_recount_by_the_formula_before_the_sweep_is_never_credited_twice(make_world, leased):
    """A drain's or an operator's recount of the captures between the deploy adding the count
    and its sweep writes what the formula says. Under the backfill's lease (the new key's
    items all stale) that is what the entries credit, so the backfill only sweeps; before the
    lease it is the truth with no entry behind it, which the backfill must find and recount.
    Were the check made before the lease and the recount after it, the sweep would credit the
    truth a second time."""
    make_world()
    make_the_count_new()
    job = plan("monitoring.sourceimage", ["detections_count"], graph())
    if not leased:
        recompute(SourceImage.objects.all())
    lease = Lease.take(job.covers(), "default")
    if leased:
        recompute(SourceImage.objects.all())
        assert_invariants()
    decide(job, lease, graph(), "default")
    assert job.recounts is not leased
    run(job, lease, chunk=1000, using="default", graph=graph())
    assert not lease.held, "every mark of the lease ended"
    assert_invariants()
    assert_all_counts_exact()
