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

from counts.base import prepared
from counts.base.mark import Kind, where
from counts.base.names import FRESHNESS_FIELD, MARK_TABLE, literal, q
from counts.compile.stale_items import (
    adjustment_sql,
    distinct_adjustment_sql,
    every_item_sql,
    stale_sql,
)
from counts.declare.field import cached_count_fields
from counts.declare.graph import Graph, app_graph
from counts.declare.kinds import ItemKind, kinds_feeding
from counts.declare.modes import Full, ledger_key
from counts.run import aggregate, multiplicity, target_truth

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


def within_budget_sql(kind: ItemKind, stale: str, limit: int, keys: list[str]) -> str:
    """Whether the relation ``stale`` (``kind``'s stale items) holds at most ``limit`` rows,
    counted no further than that. An "every item" mark (a TRUNCATE, a new count's backfill)
    is over any budget at once: listing every item only to count them cost a second at 10⁶
    captures, and ``AND`` stops before the count (PostgreSQL runs a subquery of an
    expression when the expression first needs it)."""
    count = f"(SELECT count(*) FROM (SELECT 1 FROM {stale} LIMIT {int(limit) + 1}) s)"
    return f"(NOT {every_item_sql(kind, keys=keys)} AND {count} <= {int(limit)})"


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
    specs = {s.column: s for s in graph.specs_for(label)}
    # A count refused by the checks is not in the graph: its column is left as loaded.
    fields = [f for f in cached_count_fields(model) if f.column in specs]
    columns = [f.column for f in fields]
    joins, params, plus, gates = _pending_terms(graph, label, pk, columns, limit)
    # "Every row" marks (a TRUNCATE of counted rows, a backfill the workers carry out): no
    # stored value of the model can be vouched for, and recounting every row is not a read.
    every_row = (
        f"EXISTS (SELECT 1 FROM {MARK_TABLE} r WHERE r.target = {literal(label)}"
        f" AND {where(Kind.EVERY_ROW, 'r')})"
    )
    exact = " AND ".join(
        [f"NOT {every_row}", *(f"(SELECT b.k{n} FROM budget b)" for n in range(len(gates)))]
    )
    # The page's rows named by a recount mark, listed once (CTE ``recount``) and joined: every
    # column reads it. Probed per row instead, the planner inlined the probe into each column
    # (eight per row), and a plan made while the mark table was empty scanned it each time:
    # 30 ms of a 60 ms read with 1,300 marks waiting.
    joins.append(f"LEFT JOIN recount rc ON rc.pk = t.{q(pk)}")
    routed = (
        f"EXISTS (SELECT 1 FROM {MARK_TABLE} r WHERE r.target = {literal(label)}"
        f" AND {where(Kind.ROUTE, 'r')})"
    )
    has_full = any(isinstance(specs[c].mode, Full) for c in columns)
    head, truth_params = _ctes(
        model, specs, gates, using, *_marked_rows(label, routed if has_full else None)
    )
    selects = [_select(specs[c], pk, plus[c], routed) for c in columns]
    # Pending: a worker has a change to store for the row. Its exact counts differ from the
    # stored ones, it waits for a recount, or the read could not tell (over the budget, an
    # "every row" mark). Read from the values themselves: probing each stale item's targets
    # again (the list's flags before exact reads) cost as much as the adjustment.
    marked = f"(rc.pk IS NOT NULL OR {routed})" if has_full else "rc.pk IS NOT NULL"
    values = ", ".join(f"{s} AS v{i}" for i, s in enumerate(selects))
    stored = ", ".join(f"t.{q(c)} AS s{i}" for i, c in enumerate(columns))
    v = ", ".join(f"r.v{i}" for i in range(len(columns)))
    s = ", ".join(f"r.s{i}" for i in range(len(columns)))
    sql = (
        f"{head}SELECT r.pk, r.exact, NOT r.exact OR r.marked OR ROW({v}) IS DISTINCT FROM"
        f" ROW({s}), r.updated, {v} FROM (SELECT t.{q(pk)} AS pk, {exact} AS exact,"
        f" {marked} AS marked, t.{q(FRESHNESS_FIELD)} AS updated, {values}, {stored}"
        f" FROM {q(table)} t {' '.join(joins)} WHERE t.{q(pk)} = ANY(%s::bigint[])) r"
    )
    # Parameters in text order: the CTEs', then the joins', then the page's ids.
    return sql, [*truth_params, *params, target_truth._IDS], [f.attname for f in fields]


def _marked_rows(label: str, routed: str | None) -> tuple[str, str]:
    """``(needs, recount)``: the page's rows whose truth a read needs, and those named by a
    recount mark (CTE ``recount``, binding the page's ids twice). A read needs the rows named
    by a recount mark and, while a route mark of a count kept in full waits (``routed``, None
    when the model has none), every row of the page: ``needs`` reads ``recount`` for the first
    and binds the page's ids once."""
    recount = (
        f"SELECT DISTINCT x AS pk FROM {MARK_TABLE} r CROSS JOIN LATERAL unnest(r.ids) x"
        f" WHERE r.target = {literal(label)} AND {where(Kind.RECOUNT, 'r')}"
        " AND r.ids && %s::bigint[] AND x = ANY(%s::bigint[])"
    )
    # Only the rows that read it are counted: a recount of every row of the page would cost
    # what the stored counts exist to avoid (seconds for a set of 500k captures).
    needs = "SELECT x FROM unnest(%s::bigint[]) x WHERE x IN (SELECT pk FROM recount)"
    if routed:
        needs += f" OR {routed}"
    return needs, recount


def _ctes(
    model, specs: dict, gates: list, using: str, needs: str, recount: str
) -> tuple[str, list]:
    """The statement's ``WITH``: each kind's stale items and budget gate, once for the
    statement (written inline, each reference was an InitPlan of its own: 1-4 ms each, seven
    at 10⁶ captures), the truth of the counts a recount reads (run only if read), and the
    page's rows named by a recount mark (``recount``, binding the page's ids twice)."""
    ctes, params = [f"recount AS MATERIALIZED ({recount})"], [target_truth._IDS] * 2
    if gates:
        ctes += [f"{name} AS MATERIALIZED ({sql})" for name, sql, _ in gates]
        ctes.append(
            "budget AS MATERIALIZED (SELECT "
            + ", ".join(f"{gate} AS k{n}" for n, (_, _, gate) in enumerate(gates))
            + ")"
        )
    recounted = [s for s in specs.values() if not getattr(s.mode, "distinct", None)]
    if recounted:
        truth, _, truth_params = target_truth.truth_sql(model, recounted, connections[using], needs)
        ctes.append(f"truth AS MATERIALIZED ({truth})")
        params += truth_params
    return f"WITH {', '.join(ctes)} ", params


def _select(spec, pk: str, plus: list[str], routed: str) -> str:
    """One count's exact value for the row ``t``: stored + ``plus`` (its pending deltas, then
    its stale items' adjustments). A row named by a recount mark (``rc.pk``: a count kept
    in full whose rows changed, a row inserted with made-up counts) reads its truth instead,
    and so does every row of a count kept in full while a route mark waits (it may lead to any
    row): from the CTE ``truth``, which runs only if a row reads it (PostgreSQL evaluates a
    WITH query as far as the statement asks for its rows)."""
    c = spec.column
    read = f"(SELECT f.{q(c)} FROM truth f WHERE f.pk = t.{q(pk)})"
    formula = " + ".join([f"t.{q(c)}", *plus])
    if isinstance(spec.mode, Full):
        return f"CASE WHEN {routed} OR rc.pk IS NOT NULL THEN {read} ELSE t.{q(c)} END"
    if not getattr(spec.mode, "distinct", None):
        return f"CASE WHEN rc.pk IS NOT NULL THEN {read} ELSE {formula} END"
    # A distinct count: stored + pending = its pairs (invariant M), which a row named by a
    # recount mark counts instead (a count per pair: only when it must).
    pairs = multiplicity.count_sql(ledger_key(spec.key), f"t.{q(pk)}")
    return f"CASE WHEN rc.pk IS NOT NULL THEN {' + '.join([pairs, *plus[1:]])} ELSE {formula} END"


def _pending_terms(graph: Graph, label: str, pk: str, columns: list[str], limit: int):
    """What waits for the page's rows, as joins to the target table ``t``: ``(joins, their
    params, {column: terms to add to its stored value}, one budget gate per item kind, read
    from the CTE ``budget`` as ``k0``, ``k1``, …)``.
    The first term of every column is its delta marks' amounts."""
    ids = target_truth._IDS
    joins = [f"LEFT JOIN {aggregate.pending_deltas_sql(label, columns)} p ON p.pk = t.{q(pk)}"]
    params: list = [ids, ids]
    plus = {c: [f"coalesce(p.{q(c)}, 0)"] for c in columns}
    gates = []
    for n, kind in enumerate(kinds_feeding(graph, label)):
        # Over the budget, the kind's stale items are not read at all: the gate is a one-time
        # filter in front of them, and the row says it is not exact. The stale items are
        # listed once (``stale{n}``, a CTE) for the gate and both adjustments.
        ok = f"(SELECT b.k{n} FROM budget b)"
        keys = kind.keys_for(label)
        gate = within_budget_sql(kind, f"stale{n}", limit, keys)
        gates.append((f"stale{n}", stale_sql(kind, keys=keys), gate))
        for sql_of, parts, prefix in (
            (adjustment_sql, kind.summed_parts(label), "a"),
            (distinct_adjustment_sql, [p for p in kind.parts_for(label) if p.distinct], "d"),
        ):
            if not parts:
                continue
            sql, binds = sql_of(kind, label, n, f"SELECT id FROM stale{n}")
            alias = f"{prefix}{n}"
            joins.append(
                f"LEFT JOIN (SELECT * FROM ({sql}) x WHERE {ok}) {alias} ON {alias}.pk = t.{q(pk)}"
            )
            params += [ids] * binds
            for i, part in enumerate(parts):
                plus[part.column].append(f"coalesce({alias}.{prefix}{n}_{i}, 0)")
    return joins, params, plus, gates


def read_exact(
    model, ids: list, using: str = "default", graph: Graph | None = None
) -> dict[object, ExactRow]:
    """``{pk: ExactRow}`` for the rows of ``model`` among ``ids`` (those that exist); none for
    a model none of whose counts the engine keeps (each refused by ``manage.py check``): the
    caller shows what it loaded and says it is not exact."""
    if not ids:
        return {}
    if isinstance(model, str):
        model = apps.get_model(model)
    graph = graph or app_graph()
    if model._meta.label_lower not in graph.targets:
        return {}
    sql, params, attnames = exact_sql(graph, model, budget(), using)
    bound = target_truth.bind(params, list(ids), ranged=False)
    rows = _run(sql, bound, using)
    return {
        row[0]: ExactRow(dict(zip(attnames, row[4:], strict=True)), row[3], row[1], row[2])
        for row in rows
    }


def _run(sql: str, bound: list, using: str) -> list[tuple]:
    """Execute the read as a server-side prepared statement when the connection allows it
    (``counts.base.prepared``): the statement is a few dozen kilobytes whose planning (14-20 ms
    at 10⁶ captures) costs more than its execution (2-7 ms with no mark waiting), and its shape
    depends only on the declarations. After five executions PostgreSQL keeps a generic plan
    (measured: 20-28 ms, then 4 ms), so a connection that lives (``CONN_MAX_AGE``) plans it five
    times, not on every page. One statement either way."""
    hot = prepared.cursor(using)
    if hot is None:
        with connections[using].cursor() as cursor:
            cursor.execute(sql, bound)
            return cursor.fetchall()
    with hot:
        hot.execute(sql, bound)
        return hot.fetchall()


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
