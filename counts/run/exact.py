"""Exact reads: a page of rows with every cached count exact in the reader's snapshot, before any
drain, with no lock taken and no writer made to wait.

The recount formula (``counts.run.aggregate``) stores ``truth - pending - adjustment``. Read the
other way, for any snapshot:

    truth = stored + pending deltas + adjustment

where the adjustment is what the stale items (marked, not yet credited) would change if
credited now: their truth against their ledger (invariants I and J, ``counts.run.items``), and
for a distinct count, the pairs whose multiplicity would cross zero (invariant M,
``counts.run.multiplicity``). Its cost follows the pending work, never the target's size. A
count kept in full is recounted for the page when a mark may have changed it.

All of it is **one statement** (stored values, delta marks, stale items, multiplicities, the
pending flag and freshness), so every term reads the same snapshot: a drain committing
meanwhile moves an amount from "pending" to "stored" between two snapshots, never into a gap
between two statements. In a writer's transaction that snapshot includes the writer's own
uncommitted writes and the marks its triggers wrote. On a read replica it is exact for the
replica's snapshot; reading one's own writes needs the primary.

**The budget.** In the same statement, a gate per item kind counts its stale items up to
``COUNTS_EXACT_BUDGET`` (a setting, default 5,000), once. A kind over it (a burst not yet drained,
a threshold change over many occurrences, a backfill's "every item" mark) is not resolved: the
page's rows get stored + pending deltas for its counts and ``counts_exact`` false, instead of a
slow page. So do the rows of a model with an "every row" mark (a TRUNCATE of counted rows, a
backfill the workers carry out), whose stored values the formula cannot vouch for and which
a read will not recount. A row named by a recount mark (a row inserted with made-up counts;
a count kept in full whose rows changed) is recounted from its truth. ``counts_exact`` is
what tells a reader which it got.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.apps import apps
from django.conf import settings
from django.db import connections

from counts.base.mark import Kind, where
from counts.base.names import FRESHNESS_FIELD, MARK_TABLE, literal, q
from counts.compile.stale_items import adjustment_sql, distinct_adjustment_sql, stale_sql
from counts.declare.field import cached_count_fields
from counts.declare.graph import Graph, app_graph
from counts.declare.kinds import ItemKind, kinds_feeding
from counts.declare.modes import Full, ledger_key
from counts.run import aggregate, multiplicity
from counts.run.marks import pending_sql

#: Stale items per item kind an exact read resolves (``COUNTS_EXACT_BUDGET``).
BUDGET = 5000
#: The per-row flags exact reads set beside the counts.
EXACT_FIELD, PENDING_FIELD = "counts_exact", "counts_pending"


def budget() -> int:
    return int(getattr(settings, "COUNTS_EXACT_BUDGET", BUDGET))


@dataclass(frozen=True)
class ExactRow:
    """One row's counts (by attname) as read, its freshness, and what the reader may trust."""

    counts: dict[str, int]
    updated_at: object
    exact: bool
    pending: bool


def within_budget_sql(kind: ItemKind, limit: int) -> str:
    """Whether ``kind`` has at most ``limit`` stale items, counted no further than that: an
    uncorrelated subquery, which PostgreSQL runs once per statement (an InitPlan)."""
    return f"((SELECT count(*) FROM ({stale_sql(kind)} LIMIT {int(limit) + 1}) s) <= {int(limit)})"


def exact_sql(
    graph: Graph, model, limit: int, using: str = "default"
) -> tuple[str, list, list[str]]:
    """The one statement of an exact read of ``model``'s rows whose ids are bound as ``%s``
    placeholders (given as ``_IDS`` in the returned params): ``pk, exact, pending,
    updated_at, <each count>``, and the counts' attnames in that order. Built once per graph,
    model, database and budget (kept in ``graph.memo``)."""
    key = ("exact", model._meta.label_lower, using, limit)
    if key not in graph.memo:
        graph.memo[key] = _exact_sql(graph, model, limit, using)
    return graph.memo[key]


def _exact_sql(graph: Graph, model, limit: int, using: str):
    meta = model._meta
    label, table, pk = meta.label_lower, meta.db_table, meta.pk.column
    fields = cached_count_fields(model)
    specs = {s.column: s for s in graph.specs_for(label)}
    columns = [f.column for f in fields]
    joins, params, plus, within = _pending_terms(graph, label, pk, columns, limit)
    # "Every row" marks (a TRUNCATE of counted rows, a backfill the workers carry out): no
    # stored value of the model can be vouched for, and recounting every row is not a read.
    every_row = (
        f"EXISTS (SELECT 1 FROM {MARK_TABLE} r WHERE r.target = {literal(label)}"
        f" AND {where(Kind.EVERY_ROW, 'r')})"
    )
    exact = " AND ".join([f"NOT {every_row}", *within])
    # A row named by a recount mark (a count kept in full whose rows changed; a row inserted
    # with made-up counts) is recounted, and so is every row of a count kept in full while a
    # route mark waits (it may lead to any row): from the truth, in a CTE that runs only if
    # read (PostgreSQL evaluates a WITH query as far as the statement asks for its rows).
    recount = (
        f"EXISTS (SELECT 1 FROM {MARK_TABLE} r WHERE r.target = {literal(label)}"
        f" AND {where(Kind.RECOUNT, 'r')} AND r.ids @> ARRAY[t.{q(pk)}]::bigint[])"
    )
    routed = (
        f"EXISTS (SELECT 1 FROM {MARK_TABLE} r WHERE r.target = {literal(label)}"
        f" AND {where(Kind.ROUTE, 'r')})"
    )
    recounted = [c for c in columns if not getattr(specs[c].mode, "distinct", None)]
    head, truth_params = "", []
    if recounted:
        truth, _, truth_params = aggregate.truth_sql(
            model, [specs[c] for c in recounted], connections[using]
        )
        head = f"WITH truth AS MATERIALIZED ({truth}) "
    selects = []
    for c in columns:
        read = f"(SELECT f.{q(c)} FROM truth f WHERE f.pk = t.{q(pk)})"
        if isinstance(specs[c].mode, Full):
            selects.append(f"CASE WHEN {routed} OR {recount} THEN {read} ELSE t.{q(c)} END")
        elif c in recounted:
            formula = " + ".join([f"t.{q(c)}", *plus[c]])
            selects.append(f"CASE WHEN {recount} THEN {read} ELSE {formula} END")
        else:
            # A distinct count: its pairs (invariant M), whatever the stored value says.
            pairs = multiplicity.count_sql(ledger_key(specs[c].key), "t", f"t.{q(pk)}")
            selects.append(" + ".join([pairs, *plus[c][1:]]))
    ids = aggregate._IDS
    flags_sql, flags_params = pending_sql(graph, label, ids)
    sql = (
        f"{head}SELECT t.{q(pk)}, {exact}, t.{q(pk)} IN ({flags_sql}),"
        f" t.{q(FRESHNESS_FIELD)}, {', '.join(selects)}"
        f" FROM {q(table)} t {' '.join(joins)} WHERE t.{q(pk)} = ANY(%s::bigint[])"
    )
    # Parameters in text order: the CTE's, then the select list's, then the joins', then ours.
    return sql, [*truth_params, *flags_params, *params, ids], [f.attname for f in fields]


def _pending_terms(graph: Graph, label: str, pk: str, columns: list[str], limit: int):
    """What waits for the page's rows, as joins to the target table ``t``: ``(joins, their
    params, {column: terms to add to its stored value}, one budget gate per item kind)``.
    The first term of every column is its delta marks' amounts."""
    ids = aggregate._IDS
    pending = ", ".join(
        f"sum(u.d) FILTER (WHERE m.field = {literal(c)}) AS {q(c)}" for c in columns
    )
    joins = [
        f"LEFT JOIN (SELECT u.id AS pk, {pending} FROM {MARK_TABLE} m"
        " CROSS JOIN LATERAL unnest(m.ids, m.deltas) AS u(id, d)"
        f" WHERE m.target = {literal(label)} AND {where(Kind.DELTA)}"
        " AND m.ids && %s::bigint[] AND u.id = ANY(%s::bigint[]) GROUP BY u.id) p"
        f" ON p.pk = t.{q(pk)}"
    ]
    params: list = [ids, ids]
    plus = {c: [f"coalesce(p.{q(c)}, 0)"] for c in columns}
    within = []
    for n, kind in enumerate(kinds_feeding(graph, label)):
        # Over the budget, the kind's stale items are not read at all: the gate is a one-time
        # filter in front of them, and the row says it is not exact.
        ok = within_budget_sql(kind, limit)
        within.append(ok)
        for sql_of, parts, prefix in (
            (adjustment_sql, kind.summed_parts(label), "a"),
            (distinct_adjustment_sql, [p for p in kind.parts_for(label) if p.distinct], "d"),
        ):
            if not parts:
                continue
            sql, binds = sql_of(kind, label, n)
            alias = f"{prefix}{n}"
            joins.append(
                f"LEFT JOIN (SELECT * FROM ({sql}) x WHERE {ok}) {alias} ON {alias}.pk = t.{q(pk)}"
            )
            params += [ids] * binds
            for i, part in enumerate(parts):
                plus[part.column].append(f"coalesce({alias}.{prefix}{n}_{i}, 0)")
    return joins, params, plus, within


def read_exact(
    model, ids: list, using: str = "default", graph: Graph | None = None
) -> dict[object, ExactRow]:
    """``{pk: ExactRow}`` for the rows of ``model`` among ``ids`` (those that exist)."""
    if not ids:
        return {}
    if isinstance(model, str):
        model = apps.get_model(model)
    graph = graph or app_graph()
    with connections[using].cursor() as cursor:
        sql, params, attnames = exact_sql(graph, model, budget(), using)
        bound = [list(ids) if p is aggregate._IDS else p for p in params]
        cursor.execute(sql, bound)
        rows = cursor.fetchall()
    return {
        row[0]: ExactRow(dict(zip(attnames, row[4:], strict=True)), row[3], row[1], row[2])
        for row in rows
    }


def apply_exact(rows: list, using: str = "default", graph: Graph | None = None) -> None:
    """Set each row's counts (all rows of one model) to their exact values, with
    ``counts_exact``, ``counts_pending`` and ``counts_updated_at``, in one statement for the
    lot."""
    if not rows:
        return
    found = read_exact(type(rows[0]), [row.pk for row in rows], using, graph)
    for row in rows:
        got = found.get(row.pk)
        if got is None:  # gone since the page was read: what it showed, not vouched for
            setattr(row, EXACT_FIELD, False)
            setattr(row, PENDING_FIELD, False)
            continue
        for attname, value in got.counts.items():
            setattr(row, attname, value)
        setattr(row, FRESHNESS_FIELD, got.updated_at)
        setattr(row, EXACT_FIELD, got.exact)
        setattr(row, PENDING_FIELD, got.pending)


def exact(queryset, using: str | None = None, graph: Graph | None = None) -> list:
    """The rows of ``queryset`` with every cached count exact in this snapshot (a fixed number
    of queries, whatever the number of rows: keep it to a page). Each row carries
    ``counts_exact`` (false: a count is its stored value plus queued amounts, because its
    pending work was over the budget or it waits for a recount) and ``counts_pending``."""
    rows = list(queryset)
    apply_exact(rows, using or getattr(queryset, "db", "default"), graph)
    return rows
