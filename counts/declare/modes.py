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
  from what its **ledger** says was credited before (``counts.run.items``).
  The item may also be the counted row itself, measured by its own filter — including a
  comparison with a **setting** reached from it by forward foreign keys (``F("project__
  default_filters_score_threshold")``): a change to the setting, or to a link on the way to
  it, writes one *job* mark that a drain expands into the items it can flip
  (``counts.declare.jobs``). A **distinct** count over the counted rows' foreign key (distinct taxa
  of a station) is an
  item count too: items credit a per-(target, value) multiplicity, and the count moves when a
  multiplicity crosses zero.
- **full** (:class:`Full`): anything else (filters mixing branches or reading rows above the
  counted ones, paths whose rows could reach a target twice). Writers mark target rows, and
  the drain recounts them with today's aggregate. ``counts status`` names these counts and
  says why.

Which mode a declaration gets is decided once, from model metadata, when the specs are built
(``counts.declare.classify``); the modes here are plain frozen data that the trigger and drain
compilers read.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from counts.base.mark import ITEM_PREFIX
from counts.base.names import q
from counts.declare.spec import Hop, Table

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
class Step:
    """One step from rows towards the targets: rows of ``table`` whose ``where`` column holds
    the values in hand, giving their ``select`` column's values (both indexed foreign keys)."""

    table: Table
    where: str
    select: str


@dataclass(frozen=True)
class Link:
    """How an item reaches the targets it counts towards.

    ``through`` None: the item row's own column ``target_column`` holds the target id (a
    capture's station). Otherwise rows of ``through`` with ``item_column`` = the item's id hold
    target ids in ``target_column`` (a capture's sets). ``via``: steps walked from the item's id
    before ``through``, whose ``item_column`` then holds the last step's values: an occurrence
    reaches the capture sets of the captures its detections are on (occurrence → detections'
    ``source_image_id`` → the sets' through rows).
    """

    through: Table | None
    item_column: str
    target_column: str
    via: tuple[Step, ...] = ()

    def rows(self, kind: Table) -> tuple[Table, str, str]:
        """``(table, column holding item ids, column holding target ids)`` of the rows that
        link items of ``kind`` to targets: the item rows themselves, or the through rows.
        Only for a link without ``via`` steps (see :meth:`targets_sql`)."""
        assert not self.via, "a link with via steps has no single table of link rows"
        if self.through is None:
            return kind, kind.pk, self.target_column
        return self.through, self.item_column, self.target_column

    @property
    def tables(self) -> tuple[Table, ...]:
        """The tables, besides the item's own, whose rows make the link."""
        return tuple(s.table for s in self.via) + ((self.through,) if self.through else ())

    @property
    def steps(self) -> tuple[Step, ...]:
        """Every step from an item's id to its targets when the link has ``via`` steps: those,
        then the through rows (``item_column`` → ``target_column``); () without them."""
        if not self.via:
            return ()
        return (*self.via, Step(self.through, self.item_column, self.target_column))

    @property
    def first(self) -> Step | None:
        """The rows that name items by a column of theirs (``where``): the first step, or the
        through rows; None for the item's own column. A write to them marks those items;
        a write to a later step starts a link job (``counts.declare.jobs``)."""
        if self.via:
            return self.via[0]
        if self.through is None:
            return None
        return Step(self.through, self.item_column, self.target_column)

    def rows_sql(self, kind: Table) -> tuple[str, str, str]:
        """``(FROM text, item id column, target column)`` of the rows linking items of ``kind``
        to their targets: rows ``x``, after the steps ``v1``, ``v2``, … joined by their foreign
        keys. A caller adds ``WHERE <item id column> = …`` (an index probe) or a range."""
        if not self.via:
            table, where, column = self.rows(kind)
            return f"{q(table.db_table)} x", f"x.{q(where)}", f"x.{q(column)}"
        # Each later step is probed per row of the one before (``LATERAL ... OFFSET 0``, which
        # the planner cannot turn into a join): a range of items reads its rows' links by
        # index, where a hash join read the whole membership table for each range (1.9k items/s
        # against ~30k/s at 10⁶ captures).
        first, *rest, last = self.steps
        sql, prev = f"{q(first.table.db_table)} v1", f"v1.{q(first.select)}"
        later = [(f"v{n}", step) for n, step in enumerate(rest, start=2)]
        for alias, step in [*later, ("x", last)]:
            sql += (
                f" CROSS JOIN LATERAL (SELECT * FROM {q(step.table.db_table)} {alias}"
                f" WHERE {alias}.{q(step.where)} = {prev} OFFSET 0) {alias}"
            )
            prev = f"{alias}.{q(step.select)}"
        return sql, f"v1.{q(self.via[0].where)}", f"x.{q(self.target_column)}"


#: A predicate no row passes (a side of an OR filter that can count nothing).
FALSE = "false"


@dataclass(frozen=True)
class Measure:
    """What one item is worth: its children in ``child`` (by ``fk``) passing ``predicate``
    (None: every child), counted, or — ``exists`` — 1 when there is any. An item row failing
    ``item_predicate`` (a filter on a middle row of the path: a library's reviews of long
    books, the books being the items) is worth its children passing ``otherwise`` instead
    (None: nothing). An OR across the two rows is kept this way: a library's reviews of four
    stars or of a book of 500 pages or more count all of a long book's reviews, and a short
    book's of four stars (``counts.declare.conditions.Split``). All are SQL over the alias
    ``r``."""

    child: Table
    fk: str
    predicate: str | None
    exists: bool
    item_predicate: str | None = None
    otherwise: str | None = None

    @property
    def columns(self) -> frozenset[str]:
        """The children's columns the measure reads (a change to one re-measures the item)."""
        read = predicate_columns(self.predicate) | predicate_columns(self.otherwise)
        return frozenset({self.fk}) | read

    @property
    def any_predicate(self) -> str | None:
        """What a child passes to count whatever its item (None: every child may count)."""
        if self.otherwise is None:
            return self.predicate
        if self.predicate is None:
            return None
        return f"({self.predicate}) OR ({self.otherwise})"

    @property
    def item_columns(self) -> frozenset[str]:
        """The item row's columns the measure reads (a change to one re-measures the item)."""
        return predicate_columns(self.item_predicate)


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
            f"SELECT h1.{q(first.child.pk)} AS anchor, h{len(self.hops)}.{q(self.column)}"
            f" AS value FROM {q(first.child.db_table)} h1"
        )
        for n, hop in enumerate(self.hops[1:], start=2):
            sql += (
                f" JOIN {q(hop.child.db_table)} h{n}"
                f" ON h{n}.{q(hop.child.pk)} = h{n - 1}.{q(hop.column)}"
            )
        return sql

    def value_sql(self, alias: str = "r") -> str:
        """The setting of the item row ``alias``, as a scalar subquery (index probes)."""
        first = self.hops[0]
        sql = f"SELECT h{len(self.hops)}.{q(self.column)} FROM {q(first.child.db_table)} h1"
        for n, hop in enumerate(self.hops[1:], start=2):
            sql += (
                f" JOIN {q(hop.child.db_table)} h{n}"
                f" ON h{n}.{q(hop.child.pk)} = h{n - 1}.{q(hop.column)}"
            )
        return f"({sql} WHERE h1.{q(first.child.pk)} = {alias}.{q(first.column)})"


@dataclass(frozen=True)
class ItemCount:
    """A count kept through the ledgers of items of ``kind`` (the junction table).

    ``setting``: the measure compares with a value reached by ``F()`` (changes to it become
    jobs). ``distinct``: the item column whose distinct values are counted per target.
    ``watches``: columns of rows above the item that its test reads (a library's reviews on
    shelves named "Fiction": the shelf's name), each reached from the item by forward foreign
    keys like a setting; a change to one becomes a job over the items below that row.
    """

    kind: Table
    link: Link
    measure: Measure
    setting: Setting | None = None
    distinct: str | None = None
    watches: tuple[Setting, ...] = ()

    mode = ITEM

    @property
    def mark_target(self) -> str:
        """What its item marks name: ``item:<label>`` of the junction."""
        return ITEM_PREFIX + self.kind.label

    @property
    def own_columns(self) -> frozenset[str]:
        """The item row's own columns the count reads: its link column (a capture's station)
        and the columns its measure filters the item on (a book's pages). A write changing
        one marks the item; none: only the rows below and beside the item matter."""
        link = frozenset({self.link.target_column}) if self.link.through is None else frozenset()
        return link | self.measure.item_columns


@dataclass(frozen=True)
class Full:
    """A count recounted in full from its targets; ``why`` is what ``counts status`` shows."""

    why: str

    mode = FULL


Mode = OwnRow | ItemCount | Full


def predicate_columns(predicate: str | None) -> frozenset[str]:
    if not predicate:
        return frozenset()
    # Columns are written as r."name" by row_predicate.
    parts = predicate.split('r."')[1:]
    return frozenset(p.split('"', 1)[0] for p in parts)


def ledger_key(count_key: str) -> str:
    """The short, stable key an item's ledger files a count's credit under."""
    return hashlib.sha1(count_key.encode()).hexdigest()[:8]


def incremental_columns(graph) -> dict[str, frozenset[str]]:
    """``{label: cached columns}`` kept by deltas and credits rather than recounts."""
    out: dict[str, set[str]] = {}
    for spec in graph.specs:
        if isinstance(spec.mode, OwnRow | ItemCount):
            out.setdefault(spec.target.label, set()).add(spec.column)
    return {label: frozenset(cols) for label, cols in out.items()}
