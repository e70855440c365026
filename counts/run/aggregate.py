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

from collections import defaultdict
from dataclasses import dataclass

from django.apps import apps
from django.db import connections
from django.db.models import Count, Exists, OuterRef, Q
from django.db.models.expressions import RawSQL

from counts.base.mark import Kind, where
from counts.base.names import FRESHNESS_FIELD, MARK_TABLE, literal, q
from counts.compile.stale_items import adjustment_sql
from counts.declare.graph import Graph
from counts.declare.kinds import kinds_feeding
from counts.declare.modes import incremental_columns
from counts.declare.spec import REVERSE, Chain, CountSpec
from counts.run import multiplicity

#: Largest batch one statement recomputes; bigger batches are split.
STATEMENT_IDS = 5000


class _Ids:
    """Placeholder for the id array in compiled SQL; replaced by the real ids at execution."""

    def __repr__(self) -> str:
        return "<ids>"


_IDS = _Ids()
#: Placeholders for the least and the greatest bound id, in a ranged statement
#: (:func:`compile_recompute` with ``ranged``).
_LO, _HI = _Ids(), _Ids()


@dataclass(frozen=True)
class RecomputeStatement:
    """Compiled SQL for one target model, with placeholders where the id array goes."""

    label: str
    table: str
    pk: str
    fields: tuple[str, ...]  # attnames, in the order of the returned old/new values
    sql: str  # computes, compares and writes; RETURNING pk, olds..., news...
    dry_sql: str  # the same without writing
    params: tuple

    def bind(self, ids: list[int]) -> list:
        bounds = {_LO: min(ids, default=0), _HI: max(ids, default=0)}
        return [ids if p is _IDS else bounds.get(p, p) for p in self.params]


def _relative(q: Q, prefix: str) -> Q:
    """The same conditions with ``prefix`` stripped from every lookup."""
    children = [
        _relative(child, prefix) if isinstance(child, Q) else (child[0][len(prefix) :], child[1])
        for child in q.children
    ]
    return Q(*children, _connector=q.connector, _negated=q.negated)


def _probe(spec: CountSpec) -> Exists:
    """``EXISTS`` per counted row: index probes that grow with the rows counted, where a join
    to the table below could be planned as a scan of all of it.

    When the conditions are a plain AND of lookups through one reverse relation of the counted
    rows (``detections__bbox__isnull=False``, ``detections__isnull=False``), the probe starts
    from that relation's table, keyed by its foreign key: one index probe per counted row.
    """
    end = apps.get_model(spec.counted[-1].child.label)
    conditions = _relative(spec.filter, spec.path + "__")
    below = _child_conditions(end, conditions)
    if below is not None:
        relation, child_conditions = below
        return Exists(
            relation.related_model._base_manager.filter(
                child_conditions, **{relation.field.name: OuterRef(spec.path)}
            )
        )
    return Exists(end._base_manager.filter(conditions, pk=OuterRef(spec.path)))


def _child_conditions(end, conditions: Q):
    """``(reverse relation, its rows' conditions)`` when the probe can start below ``end``."""
    flat = not conditions.negated and conditions.connector == Q.AND
    if not flat or any(isinstance(c, Q) for c in conditions.children):
        return None
    names = {lookup.split("__", 1)[0] for lookup, _ in conditions.children}
    if len(names) != 1:
        return None
    relation = end._meta.get_field(names.pop())
    if not relation.one_to_many:
        return None
    exists = (f"{relation.name}__isnull", False)  # what the probe itself asserts
    rest = [c for c in conditions.children if c != exists]
    if any(not lookup.startswith(relation.name + "__") for lookup, _ in rest):
        return None
    return relation, _relative(Q(*rest), relation.name + "__")


def _count_expression(spec: CountSpec, joined: frozenset[Chain]) -> Count:
    distinct = spec.needs_distinct(joined)
    if spec.probes:
        return Count(spec.path, filter=_probe(spec), distinct=distinct)
    if spec.counted == spec.path_chain:
        return Count(spec.path, filter=spec.filter, distinct=distinct)
    # The path ends in a forward FK and rows holding one are counted, not distinct targets.
    holder = spec.path.rsplit("__", 1)[0]
    present = Q(**{f"{spec.path}__isnull": False})
    return Count(
        holder, filter=present if spec.filter is None else spec.filter & present, distinct=distinct
    )


def _groups(specs: tuple[CountSpec, ...]) -> list[list[CountSpec]]:
    """Counts that join the same relations share one subquery; others must not (joins multiply)."""
    by_signature: dict[frozenset[Chain], list[CountSpec]] = defaultdict(list)
    for spec in specs:
        by_signature[spec.join_signature].append(spec)
    return list(by_signature.values())


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
        sql=write,
        dry_sql=dry,
        params=tuple(params),
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


def truth_sql(
    model, specs, connection, rows: str = "SELECT unnest(%s::bigint[])", ranged: bool = False
) -> tuple[str, list[str], list]:
    """``SELECT pk, <each count of specs>``: the truth of the rows whose ids are bound at
    execution, one grouped subquery per join signature, LEFT JOINed to the target table (a
    distinct count kept through multiplicities reads 0 here: :func:`_formula` reads it).
    ``rows``: the SQL listing the ids the subqueries count (its one parameter, the bound ids),
    when only some of them need counting (``counts.run.exact``). ``ranged``: see
    :func:`compile_recompute` (:data:`_LO` and :data:`_HI` placeholders too).

    Returns:
        (sql, the count columns in the order selected, params with :data:`_IDS` placeholders)
    """
    pk = model._meta.pk.column
    joins, selects, params = [], [], []
    # A distinct count kept through multiplicities is read from them (``_formula``), never
    # recounted from the base tables here.
    counted = [s for s in specs if not getattr(s.mode, "distinct", None)]
    selects += [(s.column, "0") for s in specs if s not in counted]
    for g, group in enumerate(_groups(tuple(counted))):
        joined = frozenset().union(*(s.join_signature for s in group))
        annotations = {f"c{i}": _count_expression(s, joined) for i, s in enumerate(group)}
        if ranged:
            # By the bounds alone (a row between them that is not bound is counted and then
            # left out by the outer query): an id list and a range together look like a few
            # rows to the planner, which then probes per id after all.
            qs = model._base_manager.filter(**_bounds("pk"))
            below = _first_relation(model, joined)
            if below is not None:
                # One filter() call: the conditions share the relation's join, which the
                # counts then reuse (an INNER join: a row with no child gets COALESCE's 0).
                qs = qs.filter(**_bounds(below))
        else:
            qs = model._base_manager.filter(pk__in=RawSQL(rows, (_IDS,)))
        qs = qs.order_by().values("pk").annotate(**annotations)
        sub_sql, sub_params = qs.query.get_compiler(connection=connection).as_sql()
        joins.append(f"LEFT JOIN ({sub_sql}) g{g} ON g{g}.pk = t.{q(pk)}")
        params.extend(sub_params)
        for i, spec in enumerate(group):
            selects.append((spec.column, f"COALESCE(g{g}.c{i}, 0)"))
    order = [s.column for s in specs]
    selects.sort(key=lambda select: order.index(select[0]))
    truth = (
        f"SELECT t.{q(pk)} AS pk, "
        + ", ".join(f"{expr} AS {q(col)}" for col, expr in selects)
        + f" FROM {q(model._meta.db_table)} t "
        + " ".join(joins)
        + f" WHERE t.{q(pk)} = ANY(%s::bigint[])"
    )
    params.append(_IDS)
    if ranged:
        truth += f" AND t.{q(pk)} BETWEEN %s AND %s"
        params += [_LO, _HI]
    return truth, [c for c, _ in selects], params


def _bounds(lookup: str) -> dict:
    """``lookup`` between the batch's least and greatest id, as filter() arguments."""
    return {
        f"{lookup}__gte": RawSQL("%s::bigint", (_LO,)),
        f"{lookup}__lte": RawSQL("%s::bigint", (_HI,)),
    }


def _first_relation(model, joined: frozenset[Chain]) -> str | None:
    """The lookup of the foreign key on the children below the target, when every join of a
    group starts down one plain reverse foreign key (``captures`` → ``captures__event``): its
    values are the target's ids, so the batch's bounds hold for it too. None otherwise (an M2M,
    a forward key, several relations)."""
    firsts = {chain[0] for chain in joined}
    if len(firsts) != 1:
        return None
    (hop,) = firsts
    if hop.kind != REVERSE or any(len(c) > 1 and c[1].m2m for c in joined):
        return None
    for relation in model._meta.related_objects:
        if (
            relation.one_to_many
            and relation.related_model._meta.db_table == hop.child.db_table
            and relation.field.column == hop.column
        ):
            return f"{relation.name}__{relation.field.name}"
    return None


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
        cursor.execute(sql, statement.bind(chunk))
        for row in cursor.fetchall():
            changes.append(
                Change(
                    pk=row[0],
                    old=dict(zip(statement.fields, row[1 : 1 + n], strict=True)),
                    new=dict(zip(statement.fields, row[1 + n :], strict=True)),
                )
            )
    return changes
