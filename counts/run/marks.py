"""The dirty-mark queue as the rest of the system reads and writes it.

Triggers write marks (``counts.compile.triggers``); drains consume them (``counts.run.draining``).
This module holds what others do with the queue: mark rows again for later (a row someone holds),
mark every row of a model (a backfill the workers carry out), and read what is pending, for
list views' freshness, ``counts status``, the admin, metrics and the scheduler's sweep.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.db import connections

from counts.base.errors import UnknownTargetError
from counts.base.mark import Kind, Mark, where
from counts.base.names import FRESHNESS_FIELD, MARK_TABLE, q
from counts.compile.stale_items import pending_targets_sql
from counts.declare.field import cached_count_fields
from counts.declare.graph import Graph, app_graph
from counts.declare.kinds import kinds_feeding

#: How long a row someone else holds waits before a drain tries it again.
LOCKED_RETRY_MS = 1000


def defer(cursor, label: str, ids: list[int], retry_ms: int = LOCKED_RETRY_MS) -> None:
    """Mark ``ids`` again (rows of a model, or items of a kind), due in ``retry_ms``: they are
    held by another transaction."""
    Mark(label, tuple(ids)).insert(cursor, due_in_s=retry_ms / 1000)


def pending_ids(
    label: str, ids: list[int], using: str = "default", graph: Graph | None = None
) -> set[int]:
    """Which of ``ids`` have work waiting: a mark naming them (an "every row" mark covers them
    all), or an item mark for an item that counts towards them, now or in its ledger."""
    if not ids:
        return set()
    sql, params = _pending_sql(graph or app_graph(), label, ids)
    with connections[using].cursor() as cursor:
        cursor.execute(sql, params)
        return {row[0] for row in cursor.fetchall()}


def _pending_sql(graph: Graph, label: str, ids: list[int]) -> tuple[str, list]:
    """``SELECT x``: the ids of :func:`pending_ids`, and the statement's parameters."""
    sql = (
        f"SELECT x FROM {MARK_TABLE} m CROSS JOIN LATERAL"
        f" unnest(coalesce(m.ids, %s::bigint[])) x"
        f" WHERE m.target = %s AND (m.ids IS NULL OR m.ids && %s::bigint[]) AND x = ANY(%s)"
        f" AND NOT {where(Kind.ROUTE)}"
        # A mark still to be resolved to rows: pending for every row of the model until then.
        f" UNION SELECT x FROM unnest(%s::bigint[]) x WHERE EXISTS (SELECT 1 FROM {MARK_TABLE} m"
        f" WHERE m.target = %s AND {where(Kind.ROUTE)})"
    )
    params: list = [ids, label, ids, ids, ids, label]
    for kind in kinds_feeding(graph, label):
        more, binds = pending_targets_sql(kind, label)
        sql += f" UNION {more}"
        params += [ids] * binds
    return sql, params


def flag_pending(rows: list, using: str = "default", graph: Graph | None = None) -> None:
    """Set ``counts_pending`` on each row (all of one model) with one query for the lot, and
    take the row's counts from that same query.

    What list views show as freshness: a page of 25 rows costs one query, not 25. Flags and
    counts come from one snapshot, so a row is never shown as up to date beside numbers older
    than that: a drain committing between the page's own query and the flags' would otherwise
    leave "updated" next to the counts from before it.
    """
    if not rows:
        return
    model = type(rows[0])
    meta = model._meta
    ids = [row.pk for row in rows]
    pending, params = _pending_sql(graph or app_graph(), meta.label_lower, ids)
    fields = [*cached_count_fields(model), meta.get_field(FRESHNESS_FIELD)]
    columns = ", ".join(f"t.{q(f.column)}" for f in fields)
    pk = q(meta.pk.column)
    with connections[using].cursor() as cursor:
        cursor.execute(
            f"SELECT t.{pk}, t.{pk} IN ({pending}), {columns}"
            f" FROM {q(meta.db_table)} t WHERE t.{pk} = ANY(%s)",
            [*params, ids],
        )
        now = {found[0]: found[1:] for found in cursor.fetchall()}
    for row in rows:
        flagged, *values = now.get(row.pk, (False,))
        row.counts_pending = flagged
        for f, value in zip(fields, values, strict=False):  # none: the row is gone
            setattr(row, f.attname, value)


@dataclass(frozen=True)
class PendingSummary:
    label: str
    marks: int
    ids: int | None  # None when an "every row" mark is waiting
    oldest_seconds: float
    due: int = 0  # marks a drain may take now (the rest wait for a row someone holds)
    #: How long the oldest due mark has been due: since it was written, or since the time a
    #: mark written again for a held row became due. What the scheduler judges a model by.
    oldest_due_seconds: float = 0.0


#: A mark is due once its ``not_before`` (if any) has passed; it has been due since then.
_DUE = "(not_before IS NULL OR not_before <= now())"


def pending_summary(using: str = "default") -> list[PendingSummary]:
    """Marks waiting per target model, with the age of the oldest and of the oldest due."""
    with connections[using].cursor() as cursor:
        cursor.execute(
            f"SELECT target, count(*), CASE WHEN bool_or(ids IS NULL) THEN NULL"
            f" ELSE sum(cardinality(ids)) END,"
            f" extract(epoch FROM now() - min(created_at)),"
            f" count(*) FILTER (WHERE {_DUE}),"
            f" extract(epoch FROM now() - min(greatest(created_at, not_before))"
            f" FILTER (WHERE {_DUE}))"
            f" FROM {MARK_TABLE} GROUP BY target ORDER BY target"
        )
        return [
            PendingSummary(
                label, marks, None if n is None else int(n), float(age or 0), due, float(d or 0)
            )
            for label, marks, n, age, due, d in cursor.fetchall()
        ]


def next_due_seconds(label: str, using: str = "default") -> float | None:
    """Seconds until the next mark of ``label`` put back for later is due (None: none is)."""
    with connections[using].cursor() as cursor:
        cursor.execute(
            f"SELECT extract(epoch FROM min(not_before) - clock_timestamp()) FROM {MARK_TABLE}"
            " WHERE target = %s AND not_before > clock_timestamp()",
            [label],
        )
        due = cursor.fetchone()[0]
    return None if due is None else max(0.0, float(due))


def has_pending(labels: list[str] | None = None, using: str = "default") -> bool:
    with connections[using].cursor() as cursor:
        if labels:
            cursor.execute(
                f"SELECT EXISTS (SELECT 1 FROM {MARK_TABLE} WHERE target = ANY(%s))", [labels]
            )
        else:
            cursor.execute(f"SELECT EXISTS (SELECT 1 FROM {MARK_TABLE})")
        return cursor.fetchone()[0]


def mark_all(label: str, using: str = "default", graph: Graph | None = None) -> None:
    """Queue every row of ``label`` for recompute (a backfill the workers carry out)."""
    if label not in (graph or app_graph()).targets:
        raise UnknownTargetError(label)
    with connections[using].cursor() as cursor:
        Mark.every_row(label).insert(cursor)
