"""Grouped recompute: every cached count of a batch of rows in one statement.

For one target model and a batch of ids, :func:`compile_recompute` builds a single SQL statement
that computes all of the model's counts (one grouped subquery per set of joins, ``COUNT ...
FILTER``), compares them with the stored values and writes back only rows that changed,
returning old and new values. The ORM compiles each subquery from the declaration itself, so
the aggregate can never disagree with what the declaration says.

Callers lock the target rows (``SELECT ... FOR NO KEY UPDATE`` in id order) in the same
transaction before running it: the statement then reads a snapshot taken after the lock, so of
two workers recomputing one row, the later writer always computed from the later snapshot.

For counts kept incrementally (``counts.declare.modes``) the value written is not the truth but
``truth - pending - adjustment`` (:func:`_formula`): what keeps "stored + queued amounts =
what the ledgers credited" true, so a recount, reconcile or "Recompute now" never consumes a
mark, never waits for a drain, and never makes one count twice.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from django.apps import apps
from django.db import connections

from counts.base.mark import Kind, where
from counts.base.names import FRESHNESS_FIELD, MARK_TABLE, literal, q
from counts.base.prepared import arrays
from counts.compile.stale_items import adjustment_sql
from counts.declare.graph import Graph
from counts.declare.kinds import kinds_feeding
from counts.declare.modes import incremental_columns
from counts.run import multiplicity, target_truth
from counts.run.target_truth import _IDS, truth_sql

#: Largest batch one statement recomputes; bigger batches are split.
STATEMENT_IDS = 5000
#: A batch of scattered ids whose rows' stored counts add up to fewer than this is recounted
#: by index probes alone (see :func:`_planned_for_size`).
PROBES_BELOW = 100_000


@dataclass(frozen=True)
class RecomputeStatement:
    """Compiled SQL for one target model, with placeholders where the id array goes."""

    label: str
    table: str
    pk: str
    fields: tuple[str, ...]  # attnames, in the order of the returned old/new values
    columns: tuple[str, ...]  # their columns, in the same order
    sql: str  # computes, compares and writes; RETURNING pk, olds..., news...
    dry_sql: str  # the same without writing
    params: tuple

    #: The bulk passes' form (:func:`compile_recompute`): binds the ids' bounds too.
    ranged: bool = False

    def bind(self, ids: list[int]) -> list:
        return target_truth.bind(self.params, ids, self.ranged)


def compile_recompute(
    graph: Graph, label: str, using: str = "default", ranged: bool = False
) -> RecomputeStatement:
    """The statement that recomputes every count of ``label``, built once per graph, model and
    database (kept in ``graph.memo``).

    ``ranged``: the grouped subqueries read the rows between the batch's least and greatest
    id, and the children below them by the same bounds on their foreign key; the outer query
    keeps only the bound ids. The same values, read differently: for a batch that is a whole
    range of ids, as the bulk passes take them, every table is read by index range instead of
    one probe per id (5,000 captures' detections at 10^6: 18,000 buffers probed, 186 by range;
    the statement 85 -> 47 ms). Drains and "Recompute now" bind scattered ids, for which
    probes are right.
    """
    key = ("recompute", label, using, ranged)
    if key not in graph.memo:
        graph.memo[key] = _compile(graph, label, using, ranged)
    return graph.memo[key]


def _compile(graph: Graph, label: str, using: str, ranged: bool) -> RecomputeStatement:
    model = apps.get_model(label)
    specs = graph.specs_for(label)
    table, pk = model._meta.db_table, model._meta.pk.column
    fresh, columns, params = _fresh_sql(graph, model, specs, connections[using], ranged)
    # A dry run reports what the write would change: the same formula, distinct counts read
    # from the multiplicities in both (their drift, and the ledgers', is found by the item
    # pass before this one, ``counts.operate.item_sweep``; reading the base tables here instead
    # would report false drift while occurrence marks wait).
    write, dry = _compare_and_write_sql(table, pk, columns, fresh)
    return RecomputeStatement(
        label=label,
        table=table,
        pk=pk,
        fields=tuple({s.column: s.name for s in specs}[c] for c in columns),
        columns=tuple(columns),
        sql=write,
        dry_sql=dry,
        params=tuple(params),
        ranged=ranged,
    )


def _fresh_sql(
    graph: Graph, model, specs, connection, ranged: bool = False
) -> tuple[str, list[str], list]:
    """``SELECT pk, <every count>`` to store for the rows whose ids are bound at execution:
    the truth (:func:`truth_sql`), through :func:`_formula` for the counts kept incrementally.

    Returns:
        (sql, the count columns in the order selected, params with :data:`_IDS` placeholders)
    """
    truth, columns, params = truth_sql(model, specs, connection, ranged=ranged)
    fresh, more = _formula(graph, model._meta.label_lower, truth, columns)
    return fresh, columns, params + more


def pending_deltas_sql(label: str, columns: list[str]) -> str:
    """``(SELECT pk, <each column>)``: the amounts delta marks queue for the rows of ``label``
    among the bound ids, summed per row and column. Binds the ids twice."""
    sums = ", ".join(f"sum(u.d) FILTER (WHERE m.field = {literal(c)}) AS {q(c)}" for c in columns)
    return (
        f"(SELECT u.id AS pk, {sums} FROM {MARK_TABLE} m"
        " CROSS JOIN LATERAL unnest(m.ids, m.deltas) AS u(id, d)"
        f" WHERE m.target = {literal(label)} AND {where(Kind.DELTA)}"
        " AND m.ids && %s::bigint[] AND u.id = ANY(%s::bigint[]) GROUP BY u.id)"
    )


def _formula(graph: Graph, label: str, truth: str, columns: list[str]) -> tuple[str, list]:
    """``truth - pending - adjustment`` for the columns kept incrementally, in one statement.

    Invariant I (``counts.run.items``) says stored + pending = what the ledgers credited. So the
    value to store is not the truth but the truth less what is still on its way: delta marks
    not yet applied, and for items whose change is not yet credited, the difference between
    their truth and their ledger. All three terms read one snapshot — the statement's — which
    is what makes a recount exact while drains run beside it, and why it consumes no mark.
    """
    incremental = incremental_columns(graph).get(label, frozenset())
    wanted = [c for c in columns if c in incremental]
    if not wanted:
        return truth, []
    params: list = []
    joins = [f"LEFT JOIN {pending_deltas_sql(label, wanted)} p ON p.pk = f.pk"]
    params += [_IDS, _IDS]
    minus: dict[str, list[str]] = {c: [f"coalesce(p.{q(c)}, 0)"] for c in wanted}
    base = {c: f"f.{q(c)}" for c in columns}
    for n, kind in enumerate(kinds_feeding(graph, label)):
        for part in kind.parts_for(label):
            if part.distinct and part.column in minus:
                # Pairs counted by the multiplicities (invariant M): no distinct scan again.
                base[part.column] = multiplicity.count_sql(part.key, "f.pk")
        summed = kind.summed_parts(label)
        if not summed:
            continue
        sql, binds = adjustment_sql(kind, label, n)
        joins.append(f"LEFT JOIN ({sql}) a{n} ON a{n}.pk = f.pk")
        params += [_IDS] * binds
        for i, part in enumerate(summed):
            if part.column in minus:
                minus[part.column].append(f"coalesce(a{n}.a{n}_{i}, 0)")
    selects = ", ".join(
        f"{base[c]} - " + " - ".join(minus[c]) + f" AS {q(c)}" if c in minus else base[c]
        for c in columns
    )
    return f"SELECT f.pk, {selects} FROM ({truth}) f {' '.join(joins)}", params


def _compare_and_write_sql(table: str, pk: str, columns: list[str], fresh: str) -> tuple[str, str]:
    """The statements around ``fresh``: keep the rows whose stored counts differ, then write them
    (stamping freshness) or, for a dry run, only select them; both return pk, olds, news.

    Returns:
        (write sql, dry-run sql)
    """
    old = ", ".join(f"t.{q(c)}" for c in columns)
    new = ", ".join(f"f.{q(c)}" for c in columns)
    changed = (
        f"SELECT t.{q(pk)} AS pk, "
        + ", ".join(f"t.{q(c)} AS {q('old_' + c)}" for c in columns)
        + ", "
        + ", ".join(f"f.{q(c)} AS {q('new_' + c)}" for c in columns)
        + f" FROM {q(table)} t JOIN fresh f ON f.pk = t.{q(pk)}"
        + f" WHERE ({old}) IS DISTINCT FROM ({new})"
    )
    returning = ", ".join(
        ["changed.pk"]
        + [f"changed.{q('old_' + c)}" for c in columns]
        + [f"changed.{q('new_' + c)}" for c in columns]
    )
    head = f"WITH fresh AS ({fresh}), changed AS ({changed}) "
    sets = ", ".join(f"{q(c)} = changed.{q('new_' + c)}" for c in columns)
    write = (
        f"{head}UPDATE {q(table)} t SET {sets}, {q(FRESHNESS_FIELD)} = statement_timestamp()"
        f" FROM changed WHERE t.{q(pk)} = changed.pk RETURNING {returning}"
    )
    dry = f"{head}SELECT {returning} FROM changed ORDER BY changed.pk"
    return write, dry


@dataclass(frozen=True)
class Change:
    """One row whose stored counts differed from the truth."""

    pk: int
    old: dict[str, int]
    new: dict[str, int]

    @property
    def fields(self) -> list[str]:
        return [f for f in self.old if self.old[f] != self.new[f]]


def lock(cursor, statement: RecomputeStatement, ids: list[int]) -> list[int]:
    """Lock the target rows that nobody else holds, in id order; returns the ids locked.

    ``FOR NO KEY UPDATE`` (the lock our own UPDATE takes) orders two recomputes of one row just
    as ``FOR UPDATE`` would, but does not conflict with the ``FOR KEY SHARE`` lock a writer's
    foreign-key check takes on the parent of a row it inserts: ``FOR UPDATE`` would make every
    write under a target queue behind its recompute, and could deadlock with one.

    ``SKIP LOCKED``: a row held by someone else (an admin transaction left open, another
    drainer, a ``bulk_update`` locking rows in its own order) is left out instead of waited
    for here, so one busy row cannot stall every other target of its batch. Callers decide
    what happens to the rows left out (see :func:`held_elsewhere`; a drain then locks its
    targets again in one order with a short wait, ``counts.run.target_locks``).
    """
    cursor.execute(
        f"SELECT {q(statement.pk)} FROM {q(statement.table)} WHERE {q(statement.pk)} = ANY(%s)"
        f" ORDER BY {q(statement.pk)} FOR NO KEY UPDATE SKIP LOCKED",
        [ids],
    )
    return [row[0] for row in cursor.fetchall()]


def held_elsewhere(cursor, statement: RecomputeStatement, ids: list[int], locked) -> list[int]:
    """Which of ``ids`` :func:`lock` left out although the row exists (someone holds it)."""
    missing = sorted(set(ids) - set(locked))
    if not missing:
        return []
    cursor.execute(
        f"SELECT {q(statement.pk)} FROM {q(statement.table)} WHERE {q(statement.pk)} = ANY(%s)"
        f" ORDER BY {q(statement.pk)}",
        [missing],
    )
    return [row[0] for row in cursor.fetchall()]


def run(cursor, statement: RecomputeStatement, ids: list[int], *, write: bool) -> list[Change]:
    """Recompute ``ids`` (already locked when writing) and return the rows that changed."""
    changes: list[Change] = []
    n = len(statement.fields)
    for start in range(0, len(ids), STATEMENT_IDS):
        chunk = ids[start : start + STATEMENT_IDS]
        sql = statement.sql if write else statement.dry_sql
        with _planned_for_size(cursor, statement, chunk):
            cursor.execute(sql, arrays(cursor, statement.bind(chunk)))
            rows = cursor.fetchall()
        for row in rows:
            changes.append(
                Change(
                    pk=row[0],
                    old=dict(zip(statement.fields, row[1 : 1 + n], strict=True)),
                    new=dict(zip(statement.fields, row[1 + n :], strict=True)),
                )
            )
    return changes


@contextlib.contextmanager
def _planned_for_size(cursor, statement: RecomputeStatement, ids: list[int]):
    """Plan the recount of a small batch as index probes: hash and merge joins off for the
    statement, when the rows' stored counts say it reads few rows.

    The planner sizes a target its statistics do not know yet by the average of the others:
    a new capture set of 200 images beside eleven that share 1.27M memberships is taken for
    106,000, and its recount hashes every detection and occurrence ("Recompute now" of it at
    10^6: 481 ms; by probes, 9.5 ms, ``manage.py bench``'s recompute section; a drain that
    recounts it paid the same). The stored counts are a far better guess of what a recount
    reads; drifted, they only cost speed. Scattered ids only: a bulk pass's ranged statement
    binds its bounds, which the planner sizes well, and a batch whose counts add up to many
    rows keeps the planner's choice, where a hash join over a whole table is what it should be.
    """
    if statement.ranged or not statement.columns:
        yield
        return
    total = " + ".join(f"abs({q(c)})" for c in statement.columns)
    # Sized and, when small, switched in one statement: the aggregate keeps the subquery (and
    # its reading of the settings) from being merged into the outer list that changes them.
    cursor.execute(
        # CASE, not AND: only CASE promises not to evaluate the branch it does not take.
        "SELECT s.hash_join, s.merge_join, s.small, CASE WHEN s.small THEN"
        " concat(set_config('enable_hashjoin', 'off', true),"
        " set_config('enable_mergejoin', 'off', true)) END"
        " FROM (SELECT current_setting('enable_hashjoin') AS hash_join,"
        " current_setting('enable_mergejoin') AS merge_join,"
        f" coalesce(sum({total}), 0) < %s AS small FROM {q(statement.table)}"
        f" WHERE {q(statement.pk)} = ANY(%s)) s",
        [PROBES_BELOW, ids],
    )
    hash_join, merge_join, small, _switched = cursor.fetchone()
    yield
    if small:  # not on an error: the rollback that follows puts the settings back by itself
        cursor.execute(
            "SELECT set_config('enable_hashjoin', %s, true),"
            " set_config('enable_mergejoin', %s, true)",
            [hash_join, merge_join],
        )
