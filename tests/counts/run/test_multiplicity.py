"""``counts.run.multiplicity``: distinct counts kept as pairs, credited only when a pair flips.

``Deployment.taxa_count`` is the number of ``(station, taxon)`` pairs whose multiplicity ``n``
(counted occurrences of the taxon at the station) is positive. :func:`add` must credit ±1 to
the station exactly when a pair crosses zero, never per occurrence, and delete a pair that
returns to zero (invariant M allows no ``n <= 0`` row); :func:`preview` must say the same
without writing; :func:`drift` must find every pair whose ``n`` is not the sum of the ledgers
(reconcile's audit repairs what it reports); :func:`count_sql` is what a recount reads. The
world (:func:`tests.conftest.build_world`): station d1 has moth counted (o1) and beetle not
(o2, below 0.5); d2 has moth unscored (o3); d3 has beetle counted (o4). Pairs at rest:
(d1, moth) and (d3, beetle), each ``n = 1``.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
from django.db import connection

from counts.apps import graph
from counts.run import applying, item_locks, items, multiplicity
from counts.run.engine_transaction import engine_transaction
from project.monitoring.models import Occurrence
from tests.invariants import assert_invariants
from tests.truth import assert_all_counts_exact, cached, drain_all, triggers_off, truth

pytestmark = pytest.mark.django_db

OCCURRENCES = "item:monitoring.occurrence"
TAXA = ("monitoring.deployment", "taxa_count")


def kind():
    return graph().kinds[OCCURRENCES]


def taxa_key() -> str:
    (part,) = [p for p in kind().parts if (p.label, p.column) == TAXA]
    assert part.distinct
    return part.key


def pairs() -> dict[tuple[int, int], int]:
    """``{(station, taxon): n}`` of the taxa count's multiplicity rows."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT target_id, value, n FROM counts_multiplicity WHERE key = %s", [taxa_key()]
        )
        return {(t, v): n for t, v, n in cursor.fetchall()}


def add(deltas: dict[tuple[int, int], int], parts=None) -> dict:
    """:func:`multiplicity.add` of ``{(station, taxon): delta}``; the credits it made."""
    credits: dict = defaultdict(int)
    with engine_transaction() as cursor:
        full = {(taxa_key(), t, v): d for (t, v), d in deltas.items()}
        multiplicity.add(cursor, full, kind().parts_by_key if parts is None else parts, credits)
    return dict(credits)


def test_add_credits_a_station_only_when_its_pair_crosses_zero(world):
    pair = (world.d2.pk, world.beetle.pk)  # no counted beetle at d2: no row, no ledger
    assert pair not in pairs()
    assert add({pair: 1}) == {(*TAXA, world.d2.pk): 1}
    assert add({pair: 1}) == {} and pairs()[pair] == 2
    assert add({pair: -1}) == {} and pairs()[pair] == 1
    assert add({pair: -1}) == {(*TAXA, world.d2.pk): -1}
    assert pair not in pairs()  # back to zero: deleted, not left at n = 0
    assert_invariants()
    assert_all_counts_exact()


def test_one_call_credits_each_station_the_sum_of_its_flips(world):
    d1, d2, d3 = world.d1.pk, world.d2.pk, world.d3.pk
    moth, beetle = world.moth.pk, world.beetle.pk
    before = pairs()
    change = {(d2, beetle): 1, (d2, moth): 1, (d3, beetle): 1, (d1, moth): -1, (d1, beetle): 0}
    got = add(change)
    assert got == {(*TAXA, d2): 2, (*TAXA, d1): -1}  # d3: 1 -> 2 is no flip
    assert pairs() == {(d2, beetle): 1, (d2, moth): 1, (d3, beetle): 2}  # the 0 wrote nothing
    # A key whose count no longer exists (not in ``parts``) moves n and credits nobody.
    assert add({pair: -d for pair, d in change.items()}, parts={}) == {}
    assert pairs() == before
    assert_invariants()


def test_preview_reports_the_flips_add_will_credit_and_writes_nothing(world):
    change = {
        (world.d2.pk, world.beetle.pk): 2,
        (world.d3.pk, world.beetle.pk): -1,
        (world.d1.pk, world.moth.pk): 1,
    }
    before = pairs()
    previewed: dict = defaultdict(int)
    with connection.cursor() as cursor:
        full = {(taxa_key(), t, v): d for (t, v), d in change.items()}
        multiplicity.preview(cursor, full, kind().parts_by_key, previewed)
    assert pairs() == before
    assert dict(previewed) == {(*TAXA, world.d2.pk): 1, (*TAXA, world.d3.pk): -1}
    assert add(change) == dict(previewed)
    add({pair: -d for pair, d in change.items()})
    assert pairs() == before
    assert_invariants()


def recompute(ids: list[int]) -> dict:
    """A drain's item step for occurrences ``ids`` (credits queued as delta marks)."""
    credits: dict = defaultdict(int)
    with engine_transaction() as cursor:
        locked = item_locks.lock_items(cursor, kind(), sorted(ids))
        items.recompute(cursor, kind(), ids, credits, locked)
        by_label: dict = defaultdict(dict)
        for (label, column, target), amount in credits.items():
            by_label[label][(column, target)] = amount
        for label, amounts in by_label.items():
            applying.defer_credits(cursor, label, amounts, retry_ms=0)
    return {k: v for k, v in credits.items() if k[:2] == TAXA and v}


@pytest.mark.parametrize("drains", ["one-drain", "a-drain-each"])
def test_two_occurrences_of_one_taxon_at_a_station_count_one_taxon(world, drains):
    """Two new counted beetles at d2: recomputed together (one change of +2) or one drain
    each (the second finds the pair at 1), the pair flips once; deleted, it flips back only
    with the last one."""
    new = [
        Occurrence.objects.create(
            deployment=world.d2, determination=world.beetle, determination_score=0.8
        ).pk
        for _ in range(2)
    ]
    pair, flip = (world.d2.pk, world.beetle.pk), (*TAXA, world.d2.pk)
    if drains == "one-drain":
        assert recompute(new) == {flip: 1}
    else:
        assert recompute(new[:1]) == {flip: 1} and pairs()[pair] == 1
        assert recompute(new[1:]) == {}
    assert pairs()[pair] == 2
    Occurrence.objects.filter(pk__in=new).delete()
    if drains == "one-drain":
        assert recompute(new) == {flip: -1}
    else:
        assert recompute(new[:1]) == {} and pairs()[pair] == 1
        assert recompute(new[1:]) == {flip: -1}
    assert pair not in pairs()
    drain_all()
    assert_all_counts_exact()
    assert_invariants()


def set_n(station: int, taxon: int, n: int | None) -> None:
    """Write a multiplicity row behind the engine (None: delete it)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "DELETE FROM counts_multiplicity WHERE key = %s AND target_id = %s AND value = %s",
            [taxa_key(), station, taxon],
        )
        if n is not None:
            cursor.execute(
                "INSERT INTO counts_multiplicity (key, target_id, value, n)"
                " VALUES (%s, %s, %s, %s)",
                [taxa_key(), station, taxon, n],
            )


def drift() -> dict:
    with connection.cursor() as cursor:
        return multiplicity.drift(cursor, [taxa_key()], OCCURRENCES)


def test_drift_finds_every_pair_whose_n_is_not_the_sum_of_its_ledgers(world):
    k, moth, beetle = taxa_key(), world.moth.pk, world.beetle.pk
    assert drift() == {}
    set_n(world.d1.pk, moth, 4)  # ledgers say 1
    set_n(world.d3.pk, beetle, None)  # ledgers say 1
    set_n(world.d2.pk, beetle, 2)  # no ledger
    set_n(world.d2.pk, moth, 0)  # a row M forbids, whatever the ledgers
    found = drift()
    assert found == {
        (k, world.d1.pk, moth): -3,
        (k, world.d3.pk, beetle): 1,
        (k, world.d2.pk, beetle): -2,
        (k, world.d2.pk, moth): 0,
    }
    # Reconcile's repair: add the differences (pairs crossing zero are credited), then drop
    # the n = 0 rows, which a zero difference cannot reach.
    credits: dict = defaultdict(int)
    with engine_transaction() as cursor:
        multiplicity.add(cursor, found, kind().parts_by_key, credits)
    assert dict(credits) == {(*TAXA, world.d3.pk): 1, (*TAXA, world.d2.pk): -1}
    assert drift() == {(k, world.d2.pk, moth): 0}
    set_n(world.d2.pk, moth, None)
    assert drift() == {}
    assert_invariants()  # the pairs are as before the damage, so is every stored count
    assert_all_counts_exact()


def test_drift_is_about_ledgers_not_base_tables(world, marks):
    """A ledger edited behind the multiplicities drifts; a base-table write the triggers never
    saw does not (ledger and n still agree: the item pass finds that one)."""
    k, d1 = taxa_key(), world.d1.pk
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE counts_ledger SET state = jsonb_set(state, ARRAY[%s, '2'], to_jsonb(%s::int))"
            " WHERE kind = %s AND item_id = %s RETURNING 1",
            [k, world.beetle.pk, OCCURRENCES, world.o1.pk],
        )
        assert cursor.fetchall() == [(1,)]
        assert drift() == {(k, d1, world.moth.pk): -1, (k, d1, world.beetle.pk): 1}
        cursor.execute(
            "UPDATE counts_ledger SET state = jsonb_set(state, ARRAY[%s, '2'], to_jsonb(%s::int))"
            " WHERE kind = %s AND item_id = %s",
            [k, world.moth.pk, OCCURRENCES, world.o1.pk],
        )
    assert drift() == {}
    with triggers_off() as cursor:
        cursor.execute(
            "UPDATE monitoring_occurrence SET determination_score = 0.1 WHERE id = %s",
            [world.o1.pk],
        )
    assert drift() == {} and marks.count() == 0
    with connection.cursor() as cursor:  # what reconcile's item pass would do for it
        cursor.execute(
            "INSERT INTO counts_dirtymark (target, ids) VALUES (%s, %s)",
            [OCCURRENCES, [world.o1.pk]],
        )
    drain_all()
    assert pairs() == {(world.d3.pk, world.beetle.pk): 1}
    assert_all_counts_exact()
    assert_invariants()


def count_pairs() -> dict[int, int]:
    """:func:`multiplicity.count_sql` for every station."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT d.pk, {multiplicity.count_sql(taxa_key(), 'd.pk')}"
            " FROM (SELECT id AS pk FROM monitoring_deployment) d"
        )
        return dict(cursor.fetchall())


def test_count_sql_counts_the_pairs_with_positive_n(world):
    true = {pk: row["taxa_count"] for pk, row in truth("monitoring_deployment").items()}
    stored = {pk: row["taxa_count"] for pk, row in cached("monitoring_deployment").items()}
    assert count_pairs() == true == stored
    set_n(world.d1.pk, world.moth.pk, 5)  # one pair still, however many occurrences
    set_n(world.d2.pk, world.beetle.pk, 0)
    set_n(world.d2.pk, world.moth.pk, -1)
    set_n(world.d3.pk, world.moth.pk, 2)
    with connection.cursor() as cursor:  # another count's pairs are not this one's
        cursor.execute(
            "INSERT INTO counts_multiplicity (key, target_id, value, n) VALUES ('0ther', %s, 1, 1)",
            [world.d2.pk],
        )
    assert count_pairs() == true | {world.d3.pk: 2}
