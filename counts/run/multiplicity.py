"""Distinct counts kept through multiplicities: how many counted items carry each value.

A distinct count (``Deployment.taxa_count``: distinct taxa among a station's counted
occurrences) is not a sum over items, so an item cannot credit it directly. What *is* a sum is
the multiplicity of each ``(target, value)`` pair — ``m(station, taxon)`` = the station's
counted occurrences of that taxon — and the count is the number of pairs with ``m > 0``.

So an item's ledger entry for a distinct count is ``[1, target, ..., value]`` (or nothing), a drain
adds the ledger's change to ``counts_multiplicity``, and each pair that crosses zero credits
±1 to its target. Per count, keyed by its ledger key:

- **Invariant M**: in every committed state, ``m(key, target, value) = Σ`` over items of their
  ledger entries for that pair. Every transaction that writes a ledger entry for a distinct
  count adds the same change to ``m`` (drains, and reconcile's ledger audit).
- **Flips are exact**: ``m`` is changed by ``n = n + Δ ... RETURNING n`` under the row's lock,
  so two drains changing one pair are ordered by the lock, and each sees the other's result:
  the one that takes ``m`` from 0 to 1 credits +1, the other, from 1 to 2, credits nothing.
  With invariant I of ``counts.run.items``, stored + pending = ``#{pairs of T with m > 0}``.
- **No deadlock**: a drain takes multiplicity rows in one statement, in key order, after its
  items' ledger rows and before its target rows: its place in the one global order of
  waits (docs/engine.md §3.2), which is why drains cannot wait in a cycle.
- **Recount**: a distinct count's recount (``counts.run.aggregate``) reads ``#{m > 0} - pending``
  for its rows: the same snapshot rule as every other incremental count, without reading the
  base tables' distinct values again.

Pairs whose multiplicity returns to zero are deleted in the same transaction, so the table
holds only pairs that exist.
"""

from __future__ import annotations

from django.apps import apps

from counts.base.errors import CountsError
from counts.base.names import MULTIPLICITY_TABLE, literal
from counts.compile.item_sql import entries_sql, text_array
from counts.declare.modes import ItemCount, ledger_key

TABLE = MULTIPLICITY_TABLE


def _columns(deltas: dict[tuple[str, int, int], int]) -> list[list] | None:
    """``[keys, targets, values, amounts]`` of the non-zero changes, in key order (the order
    multiplicity rows are locked in), or None when there are none."""
    rows = sorted((k, t, v, d) for (k, t, v), d in deltas.items() if d)
    return [list(col) for col in zip(*rows, strict=True)] if rows else None


def add(cursor, deltas: dict[tuple[str, int, int], int], parts: dict, credits) -> None:
    """Add ``deltas[(key, target, value)]`` to the multiplicities and credit each pair that
    crosses zero to ``credits[(label, column, target)]`` (``parts``: ledger key → ``Part``)."""
    columns = _columns(deltas)
    if columns is None:
        return
    cursor.execute(
        f"INSERT INTO {TABLE} AS m (key, target_id, value, n)"
        " SELECT * FROM unnest(%s::text[], %s::bigint[], %s::bigint[], %s::int[])"
        " ORDER BY 1, 2, 3"
        " ON CONFLICT (key, target_id, value) DO UPDATE SET n = m.n + EXCLUDED.n"
        " RETURNING m.key, m.target_id, m.value, m.n",
        columns,
    )
    emptied = []
    for key, target, value, n in cursor.fetchall():
        delta = deltas[(key, target, value)]
        flip = int(n > 0) - int(n - delta > 0)
        part = parts.get(key)
        if flip and part is not None:
            credits[(part.label, part.column, target)] += flip
        if n == 0:
            emptied.append((key, target, value))
    if emptied:
        k, t, v = (list(col) for col in zip(*emptied, strict=True))
        cursor.execute(
            f"DELETE FROM {TABLE} m USING unnest(%s::text[], %s::bigint[], %s::bigint[])"
            " AS e(key, target_id, value) WHERE m.key = e.key AND m.target_id = e.target_id"
            " AND m.value = e.value AND m.n = 0",
            [k, t, v],
        )


def preview(cursor, deltas: dict[tuple[str, int, int], int], parts: dict, credits) -> None:
    """What :func:`add` would credit, writing nothing."""
    columns = _columns(deltas)
    if columns is None:
        return
    cursor.execute(
        f"SELECT d.key, d.target_id, coalesce(m.n, 0), d.n"
        " FROM unnest(%s::text[], %s::bigint[], %s::bigint[], %s::int[])"
        " AS d(key, target_id, value, n)"
        f" LEFT JOIN {TABLE} m ON m.key = d.key AND m.target_id = d.target_id"
        " AND m.value = d.value",
        columns,
    )
    for key, target, now, delta in cursor.fetchall():
        part = parts.get(key)
        flip = int(now + delta > 0) - int(now > 0)
        if flip and part is not None:
            credits[(part.label, part.column, target)] += flip


def count_sql(key: str, target_id: str) -> str:
    """Pairs with a positive multiplicity for the target row whose id is the SQL expression
    ``target_id`` (a recount's value)."""
    return (
        f"(SELECT count(*) FROM {TABLE} m WHERE m.key = {literal(key)}"
        f" AND m.target_id = {target_id} AND m.n > 0)"
    )


def drift(cursor, keys: list[str], kind_target: str) -> dict[tuple[str, int, int], int]:
    """``{(key, target, value): difference}`` of the pairs of the distinct counts ``keys``
    (ledger keys) whose multiplicity is not the sum of the ledgers (invariant M).
    Reconcile adds each difference with :func:`add` (which credits the pairs crossing zero,
    like a drain) or previews it; added as amounts, so a drain committing meanwhile keeps its
    own change.

    One statement, so one snapshot, for every key: the ledgers are read once, not once per
    distinct count (an occurrence feeds four of them; four scans of 1.2M ledgers took 10 s)."""
    keys = sorted(keys)
    cursor.execute(
        "SELECT coalesce(w.key, m.key), coalesce(w.target_id, m.target_id),"
        " coalesce(w.value, m.value), coalesce(w.n, 0) - coalesce(m.n, 0)"
        f" FROM ({ledger_sums_sql(keys, kind_target)}) w"
        f" FULL JOIN (SELECT * FROM {TABLE} WHERE key = ANY(%s::text[])) m"
        " ON m.key = w.key AND m.target_id = w.target_id AND m.value = w.value"
        " WHERE coalesce(w.n, 0) <> coalesce(m.n, 0) OR m.n = 0",
        [keys],
    )
    return {(key, target, value): d for key, target, value, d in cursor.fetchall()}


def ledger_sums_sql(keys: list[str], kind_target: str) -> str:
    """``SELECT key, target_id, value, n``: each pair of the distinct counts ``keys`` (ledger
    keys) as the ledgers of ``kind_target`` sum it, what its multiplicity must be (invariant
    M). No parameter: the keys are the engine's own names, written in."""
    return (
        "SELECT e.key, t::bigint AS target_id, (e.value->>-1)::bigint AS value,"
        " sum((e.value->>0)::int)::int AS n"
        f" FROM counts_ledger l CROSS JOIN LATERAL {entries_sql('l.state', keys)} e(key, value)"
        " CROSS JOIN LATERAL jsonb_array_elements_text((e.value - 0) - -1) t"
        f" WHERE l.kind = {literal(kind_target)} AND l.state ?| {text_array(keys)}"
        " AND e.value IS NOT NULL GROUP BY 1, 2, 3"
    )


def value_counts(graph, model, field: str):
    """The grouped count a distinct count keeps: for ``model.field`` (distinct taxa of a
    project), a queryset of ``counts.models.Multiplicity`` rows ``(target_id, value, n)``, one
    per target and counted value with ``n > 0`` (a project's counted occurrences of each
    taxon). Rows appear with the first counted item of a pair and go with the last, like a
    ``GROUP BY`` view; like the count, they are exact once the count's marks are drained.

    Raises ``CountsError`` for a field that is not a distinct count kept through items.
    """
    label = model._meta.label_lower
    spec = next((s for s in graph.specs_for(label) if s.name == field), None)
    if spec is None or not isinstance(spec.mode, ItemCount) or spec.mode.distinct is None:
        raise CountsError(f"{label}.{field} is not a distinct count kept per value")
    # Looked up, not imported: the drain's modules load before the app registry is ready.
    multiplicity = apps.get_model("counts", "Multiplicity")
    return multiplicity.objects.filter(key=ledger_key(spec.key), n__gt=0)
