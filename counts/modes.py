"""How each count is maintained: from its own rows' deltas, through an item's ledger, or in full.

A declaration's shape decides how cheaply the engine can keep it exact after a change:

- **own-row** (:class:`OwnRow`): every input of a counted row's contribution is a column of
  that row — ``Count("captures")``, ``Count("detections", filter=Q(detections__bbox__isnull=
  False))``, an M2M without a filter (its through rows are the counted rows). A statement's
  change to the count is ``Σ [filter(new rows)] - Σ [filter(old rows)]`` grouped by the foreign
  key, which a trigger computes from its transition tables alone: the writer records exact
  amounts (*delta marks*) and a drain adds them up. Nothing is ever recounted.
- **item** (:class:`ItemCount`): the contribution depends on rows joined to the counted chain.
  The engine picks a **junction** table J (the *item kind*: captures for the detection counts of
  a station, and for "captures with a detection" of a capture set) such that an item's
  contribution is a function of the item row and its children alone: the targets it belongs to
  (its own foreign key, or its rows in an M2M through table) times a measure (how many of its
  children pass the filter, or whether any does). Writers record only "item i may have changed"
  (*item marks*); a drain recomputes the item from the base tables and credits the difference
  from what its **ledger** says was credited before (``counts.items``).
  The item may also be the counted row itself, measured by its own filter — including a
  comparison with a **setting** reached from it by forward foreign keys (``F("project__
  default_filters_score_threshold")``): a change to the setting, or to a link on the way to
  it, writes one *job* mark that a drain expands into the items it can flip (``counts.jobs``).
  A **distinct** count over the counted rows' foreign key (distinct taxa of a station) is an
  item count too: items credit a per-(target, value) multiplicity, and the count moves when a
  multiplicity crosses zero.
- **full** (:class:`Full`): anything else (filters mixing branches, paths of three relations
  or more). Writers mark target rows, and the drain recounts them with today's aggregate.
  ``counts status`` names these counts and says why.

One decision looks at all declarations at once (:func:`fold_into_items`): an own-row count of
a row that is an item anyway, over children its kind already measures, is kept through that
item kind, so the children's writes record one mark rather than two.

Everything here is decided once, from model metadata, when the specs are built; the result is
plain frozen data that the trigger and drain compilers read.
"""

from __future__ import annotations

import datetime
import decimal
import hashlib
from dataclasses import dataclass

from django.db import connections
from django.db.models import F, Q

from counts.lookups import lookups
from counts.mark import ITEM_PREFIX
from counts.spec import FORWARD, REVERSE, Hop, Table

OWN_ROW, ITEM, FULL = "own-row", "item", "full"
#: What item marks' ``target`` starts with.


@dataclass(frozen=True)
class OwnRow:
    """Rows of ``table`` hold the target's id in ``fk``; each row passing ``predicate`` adds 1.

    ``predicate`` is SQL over the row, written against the alias ``r`` (None: every row).
    ``columns`` are the row's columns the count reads, which decide when an UPDATE matters.
    """

    table: Table
    fk: str
    predicate: str | None
    columns: frozenset[str]

    mode = OWN_ROW


@dataclass(frozen=True)
class Link:
    """How an item reaches the targets it counts towards.

    ``through`` None: the item row's own column ``target_column`` holds the target id (a
    capture's station). Otherwise rows of ``through`` with ``item_column`` = the item's id hold
    target ids in ``target_column`` (a capture's sets).
    """

    through: Table | None
    item_column: str
    target_column: str

    def rows(self, kind: Table) -> tuple[Table, str, str]:
        """``(table, column holding item ids, column holding target ids)`` of the rows that
        link items of ``kind`` to targets: the item rows themselves, or the through rows."""
        if self.through is None:
            return kind, kind.pk, self.target_column
        return self.through, self.item_column, self.target_column


@dataclass(frozen=True)
class Measure:
    """What one item is worth: its children in ``child`` (by ``fk``) passing ``predicate``,
    counted, or — ``exists`` — 1 when there is any."""

    child: Table
    fk: str
    predicate: str | None
    exists: bool

    @property
    def columns(self) -> frozenset[str]:
        return frozenset({self.fk}) | _predicate_columns(self.predicate)


@dataclass(frozen=True)
class Setting:
    """A value an item's filter compares with, reached from the item by forward foreign keys
    (an occurrence's project's threshold: occurrence → deployment → project).

    ``compared`` is the item column compared with it by ``=``, ``<``, ``<=``, ``>``, ``>=``
    (None for any other comparison); a change of the setting from a to b can then flip only
    items whose ``compared`` lies between a and b, which is what keeps a threshold change's
    drain proportional to the flips. ``cast`` is that column's SQL type.
    """

    hops: tuple[Hop, ...]
    column: str
    compared: str | None
    cast: str | None

    def rows_sql(self) -> str:
        """``SELECT anchor, value``: the setting of every row an item's first hop reaches (a
        station's threshold, for each station), to join once instead of probing per item."""
        first = self.hops[0]
        sql = (
            f"SELECT h1.{_q(first.child.pk)} AS anchor, h{len(self.hops)}.{_q(self.column)}"
            f" AS value FROM {_q(first.child.db_table)} h1"
        )
        for n, hop in enumerate(self.hops[1:], start=2):
            sql += (
                f" JOIN {_q(hop.child.db_table)} h{n}"
                f" ON h{n}.{_q(hop.child.pk)} = h{n - 1}.{_q(hop.column)}"
            )
        return sql

    def value_sql(self, alias: str = "r") -> str:
        """The setting of the item row ``alias``, as a scalar subquery (index probes)."""
        first = self.hops[0]
        sql = f"SELECT h{len(self.hops)}.{_q(self.column)} FROM {_q(first.child.db_table)} h1"
        for n, hop in enumerate(self.hops[1:], start=2):
            sql += (
                f" JOIN {_q(hop.child.db_table)} h{n}"
                f" ON h{n}.{_q(hop.child.pk)} = h{n - 1}.{_q(hop.column)}"
            )
        return f"({sql} WHERE h1.{_q(first.child.pk)} = {alias}.{_q(first.column)})"


@dataclass(frozen=True)
class ItemCount:
    """A count kept through the ledgers of items of ``kind`` (the junction table).

    ``setting``: the measure compares with a value reached by ``F()`` (changes to it become
    jobs). ``distinct``: the item column whose distinct values are counted per target.
    """

    kind: Table
    link: Link
    measure: Measure
    setting: Setting | None = None
    distinct: str | None = None

    mode = ITEM

    @property
    def mark_target(self) -> str:
        """What its item marks name: ``item:<label>`` of the junction."""
        return ITEM_PREFIX + self.kind.label


@dataclass(frozen=True)
class Full:
    """A count recounted in full from its targets; ``why`` is what ``counts status`` shows."""

    why: str

    mode = FULL


Mode = OwnRow | ItemCount | Full


def ledger_key(count_key: str) -> str:
    """The short, stable key an item's ledger files a count's credit under."""
    return hashlib.sha1(count_key.encode()).hexdigest()[:8]


def _q(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _literal(value) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float | decimal.Decimal):
        return repr(float(value)) if isinstance(value, float) else str(value)
    if isinstance(value, str | datetime.date | datetime.datetime):
        return "'" + str(value).replace("'", "''") + "'"
    raise ValueError(f"cannot inline {type(value).__name__}")


def _predicate_columns(predicate: str | None) -> frozenset[str]:
    if not predicate:
        return frozenset()
    # Columns are written as r."name" by row_predicate.
    parts = predicate.split('r."')[1:]
    return frozenset(p.split('"', 1)[0] for p in parts)


def row_predicate(model, conditions: Q | None) -> str | None:
    """``conditions`` (lookups on ``model``'s own columns) as SQL over the alias ``r``.

    Raises ValueError when the conditions join other tables or use values that cannot be
    written into a trigger's text (the count then stays full).
    """
    if conditions is None or not conditions.children:
        return None
    qs = model._base_manager.filter(conditions)
    compiler = qs.query.get_compiler(connection=connections["default"])
    sql, params = compiler.compile(qs.query.where)
    if set(qs.query.alias_map) - {model._meta.db_table}:
        raise ValueError("the filter joins other tables")
    table = f'"{model._meta.db_table}".'
    if '"' + model._meta.db_table + '"' in sql.replace(table, ""):
        raise ValueError("the filter refers to its own table")
    sql = sql.replace(table, "r.")
    if "%s" in sql and len(params) != sql.count("%s"):
        raise ValueError("unexpected parameters")
    for value in params:
        sql = sql.replace("%s", _literal(value), 1)
    return sql


def _relative(q: Q, prefix: str) -> Q | None:
    """The conditions with ``prefix`` stripped, or None when one does not start with it."""
    children = []
    for child in q.children:
        if isinstance(child, Q):
            inner = _relative(child, prefix)
            if inner is None:
                return None
            children.append(inner)
        else:
            lookup, value = child
            if not lookup.startswith(prefix) or _has_f(value):
                return None
            children.append((lookup[len(prefix) :], value))
    return Q(*children, _connector=q.connector, _negated=q.negated)


def _has_f(value) -> bool:
    if isinstance(value, F):
        return True
    return any(_has_f(s) for s in getattr(value, "get_source_expressions", lambda: [])())


def _model(table: Table):
    from django.apps import apps

    return apps.get_model(table.label)


def _own_row(spec) -> Mode:
    chain = spec.counted
    if spec.filter is None:
        conditions = None
    else:
        conditions = _relative(spec.filter, spec.path + "__")
        if conditions is None:
            return Full("its filter reads more than the counted rows")
    if len(chain) == 1:
        hop = chain[0]
        try:
            predicate = row_predicate(_model(hop.child), conditions)
        except ValueError as exc:
            return Full(str(exc))
        return OwnRow(hop.child, hop.column, predicate, frozenset({hop.column}) | _cols(predicate))
    # An M2M without a filter: the through rows are what is counted.
    if conditions is not None:
        return Full("a filtered M2M count")
    return OwnRow(chain[0].child, chain[0].column, None, frozenset({chain[0].column}))


def _cols(predicate):
    return _predicate_columns(predicate)


def _link(chain) -> tuple[Table, Link] | None:
    """The junction reached by ``chain`` from the target and how it links back."""
    if len(chain) == 1 and chain[0].kind == REVERSE:
        return chain[0].child, Link(None, chain[0].child.pk, chain[0].column)
    if len(chain) == 2 and chain[0].kind == REVERSE and chain[1].kind == FORWARD and chain[1].m2m:
        return chain[1].child, Link(chain[0].child, chain[1].column, chain[0].column)
    return None


def _item_below(spec) -> Mode:
    """An EXISTS below the counted rows: the counted rows are the items."""
    linked = _link(spec.counted)
    if linked is None:
        return Full("the counted rows are more than one hop away")
    kind, link = linked
    conditions = _relative(spec.filter, spec.path + "__")
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
    inner = _relative(Q(*rest), relation.name + "__")
    if inner is None:
        return Full("its filter reads more than the children's own columns")
    child_model = relation.related_model
    try:
        predicate = row_predicate(child_model, inner)
    except ValueError as exc:
        return Full(str(exc))
    from counts.spec import table_of

    measure = Measure(table_of(child_model), relation.field.column, predicate, exists=True)
    return ItemCount(kind, link, measure)


def _item_two_hops(spec) -> Mode:
    """Children of children (detections of a station's captures): the middle rows are items."""
    first, second = spec.counted
    conditions = None
    if spec.filter is not None:
        conditions = _relative(spec.filter, spec.path + "__")
        if conditions is None:
            return Full("its filter reads more than the counted rows")
    try:
        predicate = row_predicate(_model(second.child), conditions)
    except ValueError as exc:
        return Full(str(exc))
    kind = first.child
    link = Link(None, kind.pk, first.column)
    return ItemCount(kind, link, Measure(second.child, second.column, predicate, exists=False))


_COMPARISONS = {"exact": "=", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}


def _setting(spec, item_model, prefix: str, lookup: str, ref: str) -> Setting | str:
    """The setting ``F(ref)`` compared by ``lookup`` (relative to the item), or why not."""
    from counts.spec import walk

    if ref.startswith(prefix):
        hops, column = walk(item_model, ref[len(prefix) :])
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


def _item_self(spec) -> Mode:
    """The counted rows are the items, measured by their own filter (which may compare with a
    setting reached by ``F()``); for a distinct count, their foreign key's values are counted."""
    chain = spec.counted[:1] if spec.distinct else spec.counted
    if len(chain) != 1 or chain[0].kind != REVERSE:
        return Full("the counted rows are more than one relation away")
    kind = chain[0].child
    item_model = _model(kind)
    prefix = spec.path.split("__", 1)[0] + "__"
    distinct = None
    if spec.distinct:
        if len(spec.path_chain) != 2 or spec.path_chain[1].kind != FORWARD:
            return Full("a distinct count of something other than a foreign key's values")
        distinct = spec.path_chain[1].column
    plain, setting = [], None
    if spec.filter is not None:
        flat = not spec.filter.negated and spec.filter.connector == Q.AND
        if not flat or any(isinstance(c, Q) for c in spec.filter.children):
            return Full("its filter is not a plain AND of conditions")
        for lookup, value in spec.filter.children:
            if not lookup.startswith(prefix):
                return Full("its filter reads more than the counted rows")
            relative = lookup[len(prefix) :]
            if not _has_f(value):
                plain.append((relative, value))
                continue
            if not isinstance(value, F) or setting is not None:
                return Full("its filter compares with more than one value reached by F()")
            found = _setting(spec, item_model, prefix, relative, value.name)
            if isinstance(found, str):
                return Full(found)
            setting = found
            op = _COMPARISONS[relative.partition("__")[2] or "exact"]
            compare = f"r.{_q(setting.compared)} {op} {setting.value_sql()}"
    try:
        predicate = row_predicate(item_model, Q(*plain)) if plain else None
    except ValueError as exc:
        return Full(str(exc))
    if setting is not None:
        predicate = compare if predicate is None else f"({predicate}) AND {compare}"
    if distinct is not None:
        present = f"r.{_q(distinct)} IS NOT NULL"
        predicate = present if predicate is None else f"({predicate}) AND {present}"
    link = Link(None, kind.pk, chain[0].column)
    measure = Measure(kind, kind.pk, predicate, exists=False)
    return ItemCount(kind, link, measure, setting, distinct)


def classify(spec) -> Mode:
    """The cheapest exact way to keep ``spec`` (a ``CountSpec``) up to date."""
    has_f = spec.filter is not None and any(_has_f(v) for _, v in lookups(spec.filter))
    if spec.distinct or has_f:
        return _item_self(spec)
    if spec.counted != spec.path_chain:
        return Full("its path ends in a foreign key")
    chain = spec.counted
    if spec.probes:
        return _item_below(spec)
    if len(chain) == 1 and chain[0].kind == REVERSE:
        return _own_row(spec)
    if len(chain) == 2 and chain[0].kind == REVERSE and chain[1].kind == FORWARD and chain[1].m2m:
        return _own_row(spec)
    if len(chain) == 2 and all(h.kind == REVERSE for h in chain):
        return _item_two_hops(spec)
    return Full("its path crosses more than two relations")


def fold_into_items(specs: list) -> list:
    """Own-row counts of a row that is an item anyway, over children an item count of its
    kind already measures (a capture's own valid detections, beside the detections its
    station's count reads through it), become item counts with the item as their own target.

    The writer then records one mark per statement instead of two (the children's item mark
    already names the item), and the drain, which recomputes the item anyway, credits the
    item's own count from the same probe. Decided from all the declarations at once, so the
    result does not depend on their order.
    """
    from dataclasses import replace

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


def incremental_columns(graph=None) -> dict[str, frozenset[str]]:
    """``{label: cached columns}`` kept by deltas and credits rather than recounts."""
    if graph is None:
        from counts.apps import graph as sealed

        graph = sealed()
    out: dict[str, set[str]] = {}
    for spec in graph.specs:
        if isinstance(spec.mode, OwnRow | ItemCount):
            out.setdefault(spec.target.label, set()).add(spec.column)
    return {label: frozenset(cols) for label, cols in out.items()}
