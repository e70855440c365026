"""The truth of a target's counts, compiled by the ORM from the declarations themselves.

One grouped subquery per set of joins (``COUNT ... FILTER``), LEFT JOINed to the target table
for the rows whose ids are bound at execution: what ``counts.run.aggregate`` turns into the
recount formula and ``counts.run.exact`` into exact reads. Compiled by the ORM so that the
aggregate can never disagree with what the declaration says. The ids (and, for the bulk passes'
ranged form, the least and greatest of them) are placeholders replaced at execution.
"""

from __future__ import annotations

from collections import defaultdict

from django.apps import apps
from django.db.models import Count, Exists, OuterRef, Q
from django.db.models.expressions import RawSQL

from counts.base.names import q
from counts.declare.spec import REVERSE, Chain, CountSpec


class _Ids:
    """Placeholder for the id array in compiled SQL; replaced by the real ids at execution."""

    def __repr__(self) -> str:
        return "<ids>"


_IDS = _Ids()
#: Placeholders for the least and the greatest bound id, in a ranged statement
#: (``counts.run.aggregate.compile_recompute`` with ``ranged``).
_LO, _HI = _Ids(), _Ids()


def bind(params, ids: list[int], ranged: bool) -> list:
    """``params`` with the placeholders replaced: the ids, and (``ranged``) their least and
    greatest."""
    if not ranged:  # a drain's statement: no bounds to work out
        return [ids if p is _IDS else p for p in params]
    bounds = {_LO: min(ids, default=0), _HI: max(ids, default=0)}
    return [ids if p is _IDS else bounds.get(p, p) for p in params]


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


def truth_sql(
    model, specs, connection, rows: str = "SELECT unnest(%s::bigint[])", ranged: bool = False
) -> tuple[str, list[str], list]:
    """``SELECT pk, <each count of specs>``: the truth of the rows whose ids are bound at
    execution, one grouped subquery per join signature, LEFT JOINed to the target table (a
    distinct count kept through multiplicities reads 0 here: :func:`_formula` reads it).
    ``rows``: the SQL listing the ids the subqueries count (its one parameter, the bound ids),
    when only some of them need counting (``counts.run.exact``). ``ranged``: see
    ``counts.run.aggregate.compile_recompute`` (:data:`_LO` and :data:`_HI` placeholders too).

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
        # One filter() call: its conditions share each relation's join, which the counts
        # then reuse (INNER joins: a row with no child gets COALESCE's 0 in the outer query).
        # A second call would join a to-many relation again and multiply the rows.
        if ranged:
            # By the bounds alone (a row between them that is not bound is counted and then
            # left out by the outer query): an id list and a range together look like a few
            # rows to the planner, which then probes per id after all.
            where = Q(**_bounds("pk"))
            below = _first_relation(model, joined)
            if below is not None:
                where &= Q(**_bounds(below))
        else:
            where = Q(pk__in=RawSQL(rows, (_IDS,)))
        counted_rows = _counted_rows(group)
        if counted_rows is not None:
            where &= counted_rows
        qs = model._base_manager.filter(where)
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
    )
    truth, more = _bound_rows(truth, f"t.{q(pk)}", ranged)
    return truth, [c for c, _ in selects], params + more


def _counted_rows(group: list[CountSpec]) -> Q | None:
    """The joined rows some count of ``group`` counts, as a condition its subquery can filter
    on: each count's filter, OR-ed; None when a count has none (it counts every row).

    Filtered in the WHERE, a row no count wants is dropped where it is joined instead of being
    carried to the aggregate: a capture set's counted occurrences, 1.5 s where carrying every
    detection of its half a million captures to a ``COUNT(DISTINCT ...) FILTER`` sorted on
    disk took 4.2 s. The same values: a count's ``FILTER`` keeps only rows its own filter
    passes, and each of those passes the OR. Only plain conditions are moved (no negation, no
    ``isnull=True``, no expression): for those, a filter() on a to-many relation means "a
    joined row that matches", as a count's ``FILTER`` does; and never a probed count's, whose
    filter is an ``EXISTS`` below the counted rows, not a join (moved, it would join them)."""
    if any(spec.probes or spec.filter is None or not _plain(spec.filter) for spec in group):
        return None
    where = Q()
    for spec in group:
        where |= spec.filter
    return where


def _plain(condition: Q) -> bool:
    """Whether ``condition`` is made of lookups only, none negated, none ``isnull=True``."""
    if condition.negated:
        return False
    for child in condition.children:
        if isinstance(child, Q):
            if not _plain(child):
                return False
        elif not isinstance(child, tuple) or (child[0].endswith("__isnull") and child[1]):
            return False
    return True


def _bound_rows(truth: str, pk: str, ranged: bool) -> tuple[str, list]:
    """``truth`` kept to the bound ids, and its placeholders."""
    if not ranged:
        return f"{truth} WHERE {pk} = ANY(%s::bigint[])", [_IDS]
    # The target rows too by the bounds alone, and the bound ids kept above a fence (OFFSET
    # 0): a list and a range on one key looked like one row to the planner, which then ran
    # each grouped subquery once per target row (909 captures at 10^7: 909 re-aggregations
    # of the range, 300 ms where 5,000 rows by merge join took 33 ms; the pass's chunks,
    # sized by their cost, shrank with it).
    return (
        f"SELECT * FROM ({truth} WHERE {pk} BETWEEN %s AND %s OFFSET 0) r"
        " WHERE r.pk = ANY(%s::bigint[])",
        [_LO, _HI, _IDS],
    )


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
