"""Adding amounts to target rows: how a drain writes own-row deltas and item credits.

Every change the incremental counts make to a target is a sum, so the order in which drains
apply them never matters. A drain adds a batch's amounts for one model in **one statement**,
to the rows it has locked (``FOR NO KEY UPDATE SKIP LOCKED``, like a recount); amounts for rows
another transaction holds go back to the queue as delta marks, due a little later, in the same
transaction that took them — so every snapshot sees each amount exactly once, in the queue or
in the row.
"""

from __future__ import annotations

from collections import defaultdict

from counts.fields import FRESHNESS_FIELD
from counts.marks import LOCKED_RETRY_MS
from counts.triggers import MARK_TABLE, q


def _by_column(amounts: dict[tuple[str, int], int]) -> dict[str, dict[int, int]]:
    columns: dict[str, dict[int, int]] = defaultdict(dict)
    for (column, target_id), amount in amounts.items():
        if amount:
            columns[column][target_id] = amount
    return columns


def defer_credits(
    cursor, label: str, amounts: dict[tuple[str, int], int], retry_ms: int = LOCKED_RETRY_MS
) -> None:
    """Queue ``amounts`` for rows someone else holds, as delta marks due in ``retry_ms``."""
    for column, per_id in sorted(_by_column(amounts).items()):
        ids = sorted(per_id)
        cursor.execute(
            f"INSERT INTO {MARK_TABLE} (target, field, ids, deltas, not_before)"
            " VALUES (%s, %s, %s, %s, now() + make_interval(secs => %s))",
            [label, column, ids, [per_id[i] for i in ids], retry_ms / 1000],
        )


def lock_and_apply(cursor, statement, amounts: dict[tuple[str, int], int]) -> set[int]:
    """Lock the free rows among ``amounts``' (``FOR NO KEY UPDATE SKIP LOCKED``, id order) and
    add their amounts, in one statement; returns the ids written. A drain that only adds
    amounts to a model (the common case) thus costs one round trip for it; rows this
    transaction already holds (being recounted beside) are simply written."""
    columns = _by_column(amounts)
    if not columns:
        return set()
    ids = sorted({target_id for per_column in columns.values() for target_id in per_column})
    names = sorted(columns)
    arrays = [[columns[c].get(target_id, 0) for target_id in ids] for c in names]
    sets = ", ".join(f"{q(c)} = t.{q(c)} + d.{q(c)}" for c in names)
    unnest = ", ".join(["%s::bigint[]"] + ["%s::int[]"] * len(names))
    aliases = ", ".join(["id"] + [q(c) for c in names])
    pk, table = q(statement.pk), q(statement.table)
    cursor.execute(
        f"WITH locked AS (SELECT {pk} AS pk FROM {table} WHERE {pk} = ANY(%s::bigint[])"
        f" ORDER BY {pk} FOR NO KEY UPDATE SKIP LOCKED)"
        f" UPDATE {table} t SET {sets}, {q(FRESHNESS_FIELD)} = statement_timestamp()"
        f" FROM unnest({unnest}) AS d({aliases}) JOIN locked ON locked.pk = d.id"
        f" WHERE t.{pk} = d.id RETURNING t.{pk}",
        [ids, ids, *arrays],
    )
    return {row[0] for row in cursor.fetchall()}
