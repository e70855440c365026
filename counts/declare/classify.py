"""Deciding how each count is kept (``counts.declare.modes``), from its spec's shape.

Own-row when every input of a counted row's contribution is a column of that row; an item
count when a junction table's items measure it (through their children, or by their own filter
and a setting reached from them); full otherwise, with the reason ``counts status`` shows.

One decision looks at all declarations at once (:func:`fold_into_items`): an own-row count of
a row that is an item anyway, over children its kind already measures, is kept through that
item kind, so the children's writes record one mark rather than two.
"""

from __future__ import annotations

from dataclasses import replace

from django.apps import apps
from django.db import connections
from django.db.models import F, Q

from counts.base.names import q
from counts.declare.conditions import Split, has_f, relative, row_predicate, split
from counts.declare.lookups import lookups
from counts.declare.modes import (
    FALSE,
    Full,
    ItemCount,
    Link,
    Measure,
    Mode,
    OwnRow,
    Setting,
    Step,
    predicate_columns,
)
from counts.declare.spec import FORWARD, REVERSE, Hop, Table, table_of, walk


def _model(table: Table):
    return apps.get_model(table.label)


def _own_row(spec) -> Mode:
    chain = spec.counted
    if spec.filter is None:
        conditions = None
    else:
        conditions = relative(spec.filter, spec.path + "__")
        if conditions is None:
            return Full("its filter reads more than the counted rows")
    if len(chain) == 1:
        hop = chain[0]
        try:
            predicate = row_predicate(_model(hop.child), conditions)
        except ValueError as exc:
            return Full(str(exc))
        return OwnRow(hop.child, hop.column, predicate, frozenset({hop.column}) | _cols(predicate))
    # An M2M without a filter: the through rows are what is counted. With one on the related
    # rows' columns, those rows are items, each worth 1 to every row it is linked to.
    if conditions is not None:
        return _item_self(spec)
    return OwnRow(chain[0].child, chain[0].column, None, frozenset({chain[0].column}))


def _cols(predicate):
    return predicate_columns(predicate)


def _link(chain) -> tuple[Table, Link] | None:
    """The junction reached by ``chain`` from the target and how it links back."""
    if len(chain) == 1 and chain[0].kind == REVERSE:
        return chain[0].child, Link(None, chain[0].child.pk, chain[0].column)
    if _m2m(chain):
        return chain[1].child, Link(chain[0].child, chain[1].column, chain[0].column)
    return None


def _item_below(spec) -> Mode:
    """An EXISTS below the counted rows: the counted rows are the items."""
    linked = _link(spec.counted)
    if linked is None:
        return Full("the counted rows are more than one hop away")
    kind, link = linked
    conditions = relative(spec.filter, spec.path + "__")
    if conditions is None:
        return Full("its filter reads more than the counted rows' children")
    flat = not conditions.negated and conditions.connector == Q.AND
    if not flat or any(isinstance(c, Q) for c in conditions.children):
        return Full("its filter is not a plain AND below one relation")
    names = {lookup.split("__", 1)[0] for lookup, _ in conditions.children}
    if len(names) != 1:
        return Full("its filter looks below more than one relation")
    relation = _model(kind)._meta.get_field(names.pop())
    if not relation.one_to_many:
        return Full("its filter looks below a relation that is not a reverse foreign key")
    rest = [c for c in conditions.children if c != (f"{relation.name}__isnull", False)]
    inner = relative(Q(*rest), relation.name + "__")
    if inner is None:
        return Full("its filter reads more than the children's own columns")
    child_model = relation.related_model
    try:
        predicate = row_predicate(child_model, inner)
    except ValueError as exc:
        return Full(str(exc))
    measure = Measure(table_of(child_model), relation.field.column, predicate, exists=True)
    return ItemCount(kind, link, measure)


def _item_hops(spec) -> Mode:
    """Rows counted through a run of relations (detections of a station's captures, reviews of
    a library's shelves' books, reviews of a tag's books): the rows one hop above the counted
    rows are the items, each worth its counted children, and reach their targets back up the
    path (their own column, or steps through the rows above them).

    Each counted row must reach each target once, as the ORM's join counts it: every hop
    between the target and the items is a foreign key walked upwards, except an M2M next to
    the target whose through table links a pair at most once."""
    counted = spec.counted
    if counted[-1].m2m:  # an M2M at the end: its through rows are counted, once each
        counted = counted[:-1]
    above, last = counted[:-1], counted[-1]
    if not above or last.kind != REVERSE:
        return Full("the counted rows are not children of the rows above them")
    start = 2 if _m2m(above[:2]) else 0
    if any(h.kind != REVERSE for h in above[start:]):
        return Full("its path crosses a relation that can reach a counted row twice")
    if start and not _pairs_unique(above[:2]):
        return Full("its path crosses an M2M through a model that can link a pair twice")
    # The item, then each row above it up to the target: a filter may test any of them (an M2M
    # next to the target: the item only).
    names = spec.path.split("__")
    rows = ["__".join(names[:k]) + "__" if k else "" for k in range(len(names) - 1, -1, -1)]
    parts = Split((), Q.AND, True, False)
    if spec.filter is not None:
        parts = split(spec.filter, spec.path + "__", rows[:1] if start else rows)
        if isinstance(parts, str) or counted != spec.counted:
            return Full(parts if isinstance(parts, str) else "its filter reads the M2M's far rows")
    kind = last.parent
    child = _model(last.child)
    try:
        predicate = _counted_sql(child, parts.when_true)
        item_predicate, watches = _item_test(parts, above)
        otherwise = None
        if item_predicate and parts.when_false is not False:
            otherwise = _counted_sql(child, parts.when_false) or "true"
    except ValueError as exc:
        return Full(str(exc))
    link = _back_link(above)
    if link is None:
        return Full("its counted rows reach the target by a path the engine does not follow")
    measure = Measure(last.child, last.column, predicate, False, item_predicate, otherwise)
    return ItemCount(kind, link, measure, watches=watches)


def _item_test(parts: Split, above) -> tuple[str | None, tuple[Setting, ...]]:
    """The item's test (SQL over the item row ``r``) and the columns of rows above the item it
    reads, each as a :class:`Setting` reached from the item by forward foreign keys (a change
    to one starts a job over the items below that row, ``counts.declare.jobs``). A condition on
    a row above the item is an ``EXISTS`` over the foreign keys walked up to it: index probes
    per item, and a shelf's books do not each need a mark when its name changes."""
    if not parts.on_items:
        return None, ()
    up = [Hop(FORWARD, h.child, h.parent, h.column) for h in reversed(above)]
    tests, watches = [], {}
    for depth, lookup, value in parts.on_items:
        hops = tuple(up[:depth])
        table = hops[-1].child if hops else above[-1].child
        test = row_predicate(_model(table), Q((lookup, value)))
        for column in predicate_columns(test):
            watches.setdefault((hops, column), Setting(hops, column, None, None))
        if hops:
            test = _up_to(hops, test.replace('r."', f'h{depth}."'))
        tests.append(test)
    connector = " OR " if parts.connector == Q.OR else " AND "
    joined = tests[0] if len(tests) == 1 else connector.join(f"({t})" for t in tests)
    return joined, tuple(w for (h, _), w in watches.items() if h)


def _up_to(hops, test: str) -> str:
    """``test`` (over the alias ``h<len(hops)>``) of the row the item ``r`` reaches by
    ``hops``, as an ``EXISTS`` of index probes."""
    first = hops[0]
    sql = f"SELECT 1 FROM {q(first.child.db_table)} h1"
    for n, hop in enumerate(hops[1:], start=2):
        on = f"h{n}.{q(hop.child.pk)} = h{n - 1}.{q(hop.column)}"
        sql += f" JOIN {q(hop.child.db_table)} h{n} ON {on}"
    return f"EXISTS ({sql} WHERE h1.{q(first.child.pk)} = r.{q(first.column)} AND {test})"


def _counted_sql(model, side) -> str | None:
    """One side of a :class:`Split` as a predicate over the counted rows (None: every row)."""
    if isinstance(side, bool):
        return None if side else FALSE
    return row_predicate(model, side)


def _pairs_unique(m2m) -> bool:
    """Whether the through rows of an M2M crossed once (``m2m``: its two hops) link a pair at
    most once: auto-created, or unique on the pair."""
    through = _model(m2m[0].child)._meta
    pair = {m2m[0].column, m2m[1].column}
    unique = [
        {through.get_field(name).column for name in names}
        for names in [
            *through.unique_together,
            *(c.fields for c in through.constraints if getattr(c, "fields", None)),
        ]
    ]
    return through.auto_created or pair in unique


_COMPARISONS = {"exact": "=", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}


def _setting(spec, item_model, prefix: str, lookup: str, ref: str, link: Link) -> Setting | str:
    """The setting ``F(ref)`` compared by ``lookup`` (relative to the item), or why not."""
    if ref.startswith(prefix):
        hops, column = walk(item_model, ref[len(prefix) :])
    elif link.through is not None:
        return "its F() is read from the target, which the counted rows reach through many rows"
    else:
        # Relative to the target, which the item reaches through its own link column.
        hops, column = walk(_model(spec.target), ref)
        link = spec.counted[0]
        hops = (Hop(FORWARD, link.child, link.parent, link.column), *hops)
    if column is None or not hops or any(h.kind != FORWARD or h.m2m for h in hops):
        return "its F() is not a column reached by forward foreign keys"
    name, _, op = lookup.partition("__")
    field = item_model._meta.get_field(name)
    if field.is_relation or (op and op not in _COMPARISONS) or "__" in op:
        return "its F() comparison is not =, <, <=, > or >= on one of the counted rows' columns"
    cast = field.db_type(connections["default"])
    return Setting(tuple(hops), column, field.column, cast)


def _back_link(chain) -> Link | None:
    """How an item at the end of ``chain`` (hops from the target) reaches its targets: the
    chain walked backwards as index probes (``Step``), each reading rows of one table by a
    foreign key and giving another (the first may read the item's own row: an occurrence's
    station, then the station's project); None for a forward hop out of the target."""
    kind = chain[-1].child
    steps: list[Step] = []
    pending = None  # (table, where): rows in hand, their next column not yet chosen
    for hop in reversed(chain):
        if hop.kind == FORWARD:
            if pending is not None:
                steps.append(Step(pending[0], pending[1], pending[0].pk))
            pending = (hop.parent, hop.column)
        else:
            table, where = pending if pending is not None else (hop.child, hop.child.pk)
            steps.append(Step(table, where, hop.column))
            pending = None
    if pending is not None or not steps:
        return None
    first, last = steps[0], steps[-1]
    if len(steps) == 1 and first.table == kind and first.where == kind.pk:
        return Link(None, kind.pk, first.select)  # the item's own column (a capture's station)
    return Link(last.table, last.where, last.select, tuple(steps[:-1]))


def _m2m(chain) -> bool:
    """An M2M crossed once: its through rows, then the related rows."""
    return (
        len(chain) == 2 and chain[0].kind == REVERSE and chain[1].kind == FORWARD and chain[1].m2m
    )


def _items_of(spec) -> tuple | str:
    """``(chain to the items, lookup prefix of their columns, distinct column)``, or why the
    count has none. A distinct count of the rows at a path's end whose filter reads them (a
    capture set's counted occurrences) makes those rows the items, each worth one to every
    target it reaches; any other distinct count counts the values of the foreign key at the
    path's end held by the rows before it (taxa of occurrences)."""
    path, chain = spec.path, spec.path_chain
    if not spec.distinct and _m2m(spec.counted):
        # The related rows, filtered on their own columns, are the items: each is worth one
        # to every row it is linked to, which is the count when a pair is linked at most once.
        if not _pairs_unique(spec.counted):
            return "a filtered M2M count through a model that can link a pair twice"
        return spec.counted, path + "__", None
    if not spec.distinct:
        if len(spec.counted) != 1 or spec.counted[0].kind != REVERSE:
            return "the counted rows are more than one relation away"
        return spec.counted, path.split("__", 1)[0] + "__", None
    last = chain[-1]
    if last.kind != FORWARD:
        return "a distinct count of something other than a foreign key's values"
    # (An M2M's last hop is its through rows' foreign key: those rows hold the values.)
    own = path + "__"
    if spec.filter is not None and all(
        lookup.startswith(own) for lookup, _ in lookups(spec.filter)
    ):
        return chain, own, None
    if len(chain) < 2:
        return "a distinct count of the target's own foreign key"
    return chain[:-1], path.rsplit("__", 1)[0] + "__", last.column


def _item_self(spec) -> Mode:
    """The counted rows are the items, measured by their own filter (which may compare with a
    setting reached by ``F()``); for a distinct count, their foreign key's values are counted,
    or the rows at the path's end are the items themselves."""
    found = _items_of(spec)
    if isinstance(found, str):
        return Full(found)
    chain, prefix, distinct = found
    link = _back_link(chain)
    if link is None:
        return Full("its counted rows reach the target by a path the engine does not follow")
    kind = chain[-1].child
    item_model = _model(kind)
    plain, setting = [], None
    if spec.filter is not None:
        flat = not spec.filter.negated and spec.filter.connector == Q.AND
        if not flat or any(isinstance(c, Q) for c in spec.filter.children):
            return Full("its filter is not a plain AND of conditions")
        for lookup, value in spec.filter.children:
            if not lookup.startswith(prefix):
                return Full("its filter reads more than the counted rows")
            relative = lookup[len(prefix) :]
            if not has_f(value):
                plain.append((relative, value))
                continue
            if not isinstance(value, F) or setting is not None:
                return Full("its filter compares with more than one value reached by F()")
            found = _setting(spec, item_model, prefix, relative, value.name, link)
            if isinstance(found, str):
                return Full(found)
            setting = found
            op = _COMPARISONS[relative.partition("__")[2] or "exact"]
            compare = f"r.{q(setting.compared)} {op} {setting.value_sql()}"
    try:
        predicate = row_predicate(item_model, Q(*plain)) if plain else None
    except ValueError as exc:
        return Full(str(exc))
    if setting is not None:
        predicate = compare if predicate is None else f"({predicate}) AND {compare}"
    if distinct is not None:
        present = f"r.{q(distinct)} IS NOT NULL"
        predicate = present if predicate is None else f"({predicate}) AND {present}"
    measure = Measure(kind, kind.pk, predicate, exists=False)
    return ItemCount(kind, link, measure, setting, distinct)


def classify(spec) -> Mode:
    """The cheapest exact way to keep ``spec`` (a ``CountSpec``) up to date."""
    reads_f = spec.filter is not None and any(has_f(v) for _, v in lookups(spec.filter))
    if spec.distinct or reads_f:
        return _item_self(spec)
    if spec.counted != spec.path_chain:
        return Full("its path ends in a foreign key")
    chain = spec.counted
    if spec.probes:
        return _item_below(spec)
    if len(chain) == 1 and chain[0].kind == REVERSE:
        return _own_row(spec)
    if _m2m(chain):
        return _own_row(spec)
    return _item_hops(spec)


def fold_into_items(specs: list) -> list:
    """Own-row counts of a row that is an item anyway, over children an item count of its
    kind already measures (a capture's own valid detections, beside the detections its
    station's count reads through it), become item counts with the item as their own target.

    The writer then records one mark per statement instead of two (the children's item mark
    already names the item), and the drain, which recomputes the item anyway, credits the
    item's own count from the same probe. Decided from all the declarations at once, so the
    result does not depend on their order.
    """
    measured = {
        (m.mode.kind, m.mode.measure.child, m.mode.measure.fk)
        for m in specs
        if isinstance(m.mode, ItemCount)
    }
    folded = []
    for spec in specs:
        mode = spec.mode
        if isinstance(mode, OwnRow) and (spec.target, mode.table, mode.fk) in measured:
            pk = spec.target.pk
            measure = Measure(mode.table, mode.fk, mode.predicate, exists=False)
            spec = replace(spec, mode=ItemCount(spec.target, Link(None, pk, pk), measure))
        folded.append(spec)
    return folded
