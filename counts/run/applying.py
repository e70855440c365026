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

from counts.base import prepared
from counts.base.names import FRESHNESS_FIELD, MARK_TABLE, q
from counts.run.marks import LOCKED_RETRY_MS


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
    add their amounts, in one statement; returns the ids written. Rows this transaction
    already holds (being recounted beside) are simply written."""
    return lock_and_apply_all(cursor, [(statement, amounts)]).get(statement.label, set())


def lock_and_apply_all(cursor, batches) -> dict[str, set[int]]:
    """:func:`lock_and_apply` for several models (``[(statement, amounts), ...]``) in **one**
    statement, a pair of CTEs per model: a drain that only adds amounts (the common case)
    writes all its models in one round trip. Each model is still written by one statement's
    single UPDATE of its table; no lock is waited for, so the order of the CTEs is free."""
    parts, params, selects = [], [], []
    for n, (statement, amounts) in enumerate(batches):
        columns = _by_column(amounts)
        if not columns:
            continue
        ids = sorted({target_id for per_column in columns.values() for target_id in per_column})
        names = sorted(columns)
        arrays = [[columns[c].get(target_id, 0) for target_id in ids] for c in names]
        sets = ", ".join(f"{q(c)} = t.{q(c)} + d.{q(c)}" for c in names)
        unnest = ", ".join(["%s::bigint[]"] + ["%s::int[]"] * len(names))
        aliases = ", ".join(["id"] + [q(c) for c in names])
        pk, table = q(statement.pk), q(statement.table)
        parts.append(
            f"locked{n} AS (SELECT {pk} AS pk FROM {table} WHERE {pk} = ANY(%s::bigint[])"
            f" ORDER BY {pk} FOR NO KEY UPDATE SKIP LOCKED),"
            f" written{n} AS (UPDATE {table} t SET {sets},"
            f" {q(FRESHNESS_FIELD)} = statement_timestamp()"
            f" FROM unnest({unnest}) AS d({aliases}) JOIN locked{n} ON locked{n}.pk = d.id"
            f" WHERE t.{pk} = d.id RETURNING t.{pk} AS pk)"
        )
        params += [ids, ids, *arrays]
        selects.append(f"SELECT {n} AS k, pk FROM written{n}")
    if not parts:
        return {}
    hot = prepared.of(cursor, max(len(p) for p in params))
    hot.execute(
        f"WITH {', '.join(parts)} {' UNION ALL '.join(selects)}", prepared.arrays(hot, params)
    )
    written: dict[str, set[int]] = {statement.label: set() for statement, _ in batches}
    for k, pk in hot.fetchall():
        written[batches[k][0].label].add(pk)
    return written
