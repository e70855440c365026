"""Item kinds and their ledgers: how a drain credits exactly the change an item went through.

An **item** is a row of a junction table (a capture) whose contribution to some counts depends
on rows joined to it: its children (detections) and the targets it links to (its station, its
capture sets). Writers never compute contributions; they only record "item i may have changed"
(an *item mark*, ``target = 'item:<label>'``), from their own rows, in their own transaction.

Each item has a **ledger** row (``counts_ledger``): per count, what was credited for it — the
amount and the target ids it went to, ``{"<ledger key>": [amount, target, ...]}``. No row
means nothing was credited, so captures outside every set with no detections cost nothing.

To recompute items, a drain (:func:`recompute`):

1. locks each item's ledger row (``FOR UPDATE SKIP LOCKED``; an empty row is inserted first
   for a new item, so there is one to lock), every item of the batch in ``(kind, id)`` order
   (``counts.item_locks``): in the statement that takes their marks, or, when the batch holds
   a job, once the job is expanded; items another drain holds get a new item mark, due a
   little later;
2. in one *later* statement — a fresh READ COMMITTED snapshot, which sees every write whose
   item mark it took, and the ledger the previous holder of the lock committed — reads each
   item's truth from the base tables, compares it with the ledger, and writes the new ledger;
3. credits, per target, ``contribution(truth) - contribution(ledger)``.

Why this is exact under concurrency (the correctness argument, in full):

- *Marking is complete.* Every transaction that changes an input of an item's contribution
  (the item's link column, one of its children, one of its through rows) writes an item mark
  for it, from the changed rows' own old and new values, in the same transaction. So every
  snapshot that sees a change sees its mark.
- *Invariant I.* In every committed state, for every target T and item count X:
  ``stored(T) + pending deltas(T) = Σ_i contribution_T(ledger_i)``. A writer changes neither
  side. A drain writes a ledger and, in the same transaction, the credit for the difference
  (applied to T under T's row lock, or queued as a delta mark). Two drains never write one
  ledger at once (the ledger row lock), and the second reads the first's committed ledger:
  ``FOR UPDATE`` returns the newest committed version, and its truth-reading statement starts
  after it got the lock, which the first released only by committing.
- *Invariant J.* An item with no item mark visible in state S has ``ledger_i = truth_i(S)``:
  the last change to it is visible with its mark; a mark disappears only when a drain that
  held the item's lock read the truth in a snapshot taken after the mark (and so after the
  change) had committed, and committed that ledger in the same transaction as the deletion.
- *At rest* (no marks) I and J give ``stored(T) = Σ_i contribution_T(truth_i) = truth(T)``.
- Order never matters: marks carry no amounts, so any number of them, taken by any drains in
  any order, lead to the same ledgers; the credits telescope.

This is what makes the interleavings of issue 11 exact: a detection inserted while its capture
moves, two first detections on one capture, a detection racing a membership, and two drains
each holding one of an item's marks (the second finds the first's credit in the ledger).

The full recount (``counts.aggregate``) keeps I true without consuming marks; see
``counts.stale_items``. Whole-kind work (every item marked after a TRUNCATE or for a new count,
ledgers filled from the truth by a backfill or reconcile's audit) is ``counts.item_backfill``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from counts import multiplicity, prepared
from counts.jobs import jobs
from counts.modes import ITEM_PREFIX, ItemCount, Link, Measure, ledger_key
from counts.spec import Table
from counts.triggers import literal, q

LEDGER_TABLE = "counts_ledger"


@dataclass(frozen=True)
class Part:
    """One item count: where its credits go and how an item is measured."""

    key: str  # ledger key
    label: str  # target model
    column: str  # cached column
    link: Link
    measure: Measure
    #: For a distinct count: the item column whose values are counted. Its ledger entries are
    #: ``[1, target, value]`` and credit a multiplicity (``counts.multiplicity``), not a target.
    distinct: str | None = None
    #: The setting its measure compares with (``counts.modes.Setting``), if any.
    setting: object = None


@dataclass(frozen=True)
class ItemKind:
    """The item counts that share one junction table."""

    table: Table
    parts: tuple[Part, ...]
    #: Changes to settings its items read, or to links on the way (``counts.jobs``).
    jobs: tuple = ()

    @property
    def mark_target(self) -> str:
        return ITEM_PREFIX + self.table.label

    def parts_for(self, label: str) -> tuple[Part, ...]:
        return tuple(p for p in self.parts if p.label == label)

    @property
    def parts_by_key(self) -> dict[str, Part]:
        """Its counts by ledger key: how a ledger entry is read back."""
        return {p.key: p for p in self.parts}

    def summed_parts(self, label: str) -> tuple[Part, ...]:
        """The counts of ``label`` that are sums of credits (all but distinct counts)."""
        return tuple(p for p in self.parts_for(label) if not p.distinct)


#: Per graph, keyed by ``id(graph)`` but holding the graph itself: an id can be reused once a
#: graph is gone, and an entry is only used while its graph is the one asked about.
_KINDS: dict[int, tuple[object, dict[str, ItemKind]]] = {}


def item_kinds(graph) -> dict[str, ItemKind]:
    """``{mark target: ItemKind}`` for every item count of the graph."""
    cached = _KINDS.get(id(graph))
    if cached is not None and cached[0] is graph:
        return cached[1]
    parts: dict[Table, list[Part]] = defaultdict(list)
    for spec in graph.specs:
        if isinstance(spec.mode, ItemCount):
            m = spec.mode
            parts[m.kind].append(
                Part(
                    ledger_key(spec.key),
                    spec.target.label,
                    spec.column,
                    m.link,
                    m.measure,
                    m.distinct,
                    m.setting,
                )
            )
    all_jobs = jobs(graph)
    kinds = {}
    for table, ps in sorted(parts.items()):
        target = ITEM_PREFIX + table.label
        kinds[target] = ItemKind(table, tuple(ps), tuple(j for j in all_jobs if j.kind == target))
    _KINDS[id(graph)] = (graph, kinds)
    return kinds


def kinds_feeding(graph, label: str) -> list[ItemKind]:
    return [k for k in item_kinds(graph).values() if k.parts_for(label)]


# --- the truth of items, as SQL -------------------------------------------------------------


def truth_sql(kind: ItemKind, items: str, within: tuple | None = None) -> str:
    """``SELECT id, state`` of the items listed by the relation ``items`` (column ``id``).

    ``state`` is what the ledger would hold if every item were credited now; an item that
    contributes nothing has ``'{}'``. By default one index probe per item and child table or
    through table: the cost follows the items, never the targets. ``within`` (``(lo, hi]``,
    either end None for open) says every listed item lies in that id range: the children and
    through rows of the range are then read in one grouped pass each, which is what a bulk
    pass over every item wants (one range scan, not a probe per item).
    """
    t = kind.table
    joins: list[str] = []
    measures: dict[tuple, str] = {}  # (child, fk, predicate, exists) -> expression
    # One count per (child table, predicate): "how many" and "any" of the same children share it.
    children: dict[tuple, list[str | None]] = {}
    settings: dict[tuple, object] = {}
    for p in kind.parts:
        m = p.measure
        slot = children.setdefault((m.child.db_table, m.fk), [])
        if m.predicate not in slot:
            slot.append(m.predicate)
        if p.setting is not None:
            settings.setdefault((m.child.db_table, m.fk), p.setting)
    for c, ((table, fk), preds) in enumerate(sorted(children.items())):
        setting = settings.get((table, fk)) if within is not None else None
        rows, filters = hoisted(preds, setting)
        counts = ", ".join(
            f"count(*) FILTER (WHERE {pred}) AS n{n}" if pred else f"count(*) AS n{n}"
            for n, pred in enumerate(filters)
        )
        if within is None:
            joins.append(
                f"LEFT JOIN LATERAL (SELECT {counts} FROM {q(table)} r WHERE r.{q(fk)} = i.id)"
                f" c{c} ON true"
            )
        else:
            joins.append(
                f"LEFT JOIN (SELECT r.{q(fk)} AS id, {counts} FROM {q(table)} r{rows}"
                f" WHERE {in_range(f'r.{q(fk)}', within)} GROUP BY 1) c{c} ON c{c}.id = i.id"
            )
        for n, pred in enumerate(preds):
            value = f"coalesce(c{c}.n{n}, 0)"
            measures[(table, fk, pred, True)] = f"({value} > 0)::int"
            measures[(table, fk, pred, False)] = value
    links: dict[Link, str] = {}
    own_row = False
    for p in kind.parts:
        link = p.link
        if link in links:
            continue
        if link.through is None:
            own_row = True
            col = f"j.{q(link.target_column)}"
            links[link] = f"CASE WHEN {col} IS NOT NULL THEN ARRAY[{col}]::bigint[] END"
        else:
            n = len(joins)
            tc = f"x.{q(link.target_column)}"
            agg = f"array_agg(DISTINCT {tc} ORDER BY {tc}) FILTER (WHERE {tc} IS NOT NULL) AS t"
            ic = f"x.{q(link.item_column)}"
            if within is None:
                joins.append(
                    f"LEFT JOIN LATERAL (SELECT {agg} FROM {q(link.through.db_table)} x"
                    f" WHERE {ic} = i.id) l{n} ON true"
                )
            else:
                joins.append(
                    f"LEFT JOIN (SELECT {ic} AS id, {agg} FROM {q(link.through.db_table)} x"
                    f" WHERE {in_range(ic, within)} GROUP BY 1) l{n} ON l{n}.id = i.id"
                )
            links[link] = f"l{n}.t"
    if own_row:
        joins.insert(0, f"LEFT JOIN {q(t.db_table)} j ON j.{q(t.pk)} = i.id")
    entries = []
    for p in kind.parts:
        m = p.measure
        value = measures[(m.child.db_table, m.fk, m.predicate, m.exists)]
        targets = links[p.link]
        tail = f"to_jsonb({targets})"
        if p.distinct:
            tail = f"jsonb_build_array(({targets})[1], j.{q(p.distinct)})"
        entries.append(
            f"{literal(p.key)}, CASE WHEN {value} > 0 AND cardinality({targets}) > 0"
            f" THEN jsonb_build_array({value}) || {tail} END"
        )
    return (
        f"SELECT i.id, jsonb_strip_nulls(jsonb_build_object({', '.join(entries)})) AS state"
        f" FROM {items} i {' '.join(joins)}"
    )


def hoisted(preds: list[str | None], setting) -> tuple[str, list[str | None]]:
    """A join that reads ``setting`` for every child row at once, and ``preds`` reading it
    there instead of through a subquery per row: for a pass over a range of items, where a
    probe per row (two, when two counts compare with it) cost more than the rest of the
    truth. ``("", preds)`` when there is no setting."""
    if setting is None:
        return "", preds
    value = setting.value_sql()
    if not any(pred and value in pred for pred in preds):
        return "", preds
    rows = f" LEFT JOIN ({setting.rows_sql()}) sv ON sv.anchor = r.{q(setting.hops[0].column)}"
    return rows, [pred.replace(value, "sv.value") if pred else pred for pred in preds]


def in_range(column: str, within: tuple[int | None, int | None]) -> str:
    """``column`` in ``(lo, hi]`` (SQL; the bounds are the engine's own integers)."""
    lo, hi = within
    terms = [f"{column} > {int(lo)}" if lo is not None else "true"]
    if hi is not None:
        terms.append(f"{column} <= {int(hi)}")
    return " AND ".join(terms)


def recompute_sql(kind: ItemKind) -> str:
    """Read the locked items' truth, write their ledgers, return what the changes credit
    (:func:`credits_sql`). Parameters: the ids, twice."""
    truth = truth_sql(kind, "(SELECT DISTINCT unnest(%s::bigint[]) AS id)")
    kind_sql = literal(kind.mark_target)
    return (
        f"WITH truth AS ({truth}),"
        f" old AS (SELECT l.item_id, l.state FROM unnest(%s::bigint[]) i(id)"
        f"  JOIN {LEDGER_TABLE} l ON l.kind = {kind_sql} AND l.item_id = i.id),"
        f" changed AS (SELECT t.id, o.state AS old, t.state AS new FROM truth t"
        f"  LEFT JOIN old o ON o.item_id = t.id"
        f"  WHERE coalesce(o.state, '{{}}') IS DISTINCT FROM t.state),"
        f" kept AS (INSERT INTO {LEDGER_TABLE} (kind, item_id, state)"
        f"  SELECT {kind_sql}, id, new FROM changed WHERE new <> '{{}}'"
        f"  ON CONFLICT (kind, item_id) DO UPDATE SET state = EXCLUDED.state),"
        f" dropped AS (DELETE FROM {LEDGER_TABLE} l USING truth t"
        f"  WHERE l.kind = {kind_sql} AND l.item_id = t.id AND t.state = '{{}}')"
        f" {credits_sql(kind, 'changed')}"
    )


@dataclass
class ItemResult:
    locked: int = 0
    held: list[int] | None = None
    changed: int = 0


def recompute(cursor, kind: ItemKind, ids: list[int], credits, locked: list[int]) -> ItemResult:
    """Recompute ``ids`` of ``kind`` and add their credits to ``credits[(label, column, id)]``.

    ``locked``: the ids whose ledger rows the caller locked (``counts.item_locks``), in a
    statement before this one; the rest of ``ids`` another drain holds: they are returned in
    ``held`` (the caller marks them again). Must run inside the drain's transaction.
    """
    ids = sorted(set(ids))
    held = sorted(set(ids) - set(locked))
    result = ItemResult(locked=len(locked), held=held)
    if not locked:
        return result
    hot = prepared.of(cursor, len(locked))
    hot.execute(recompute_sql(kind), [locked, locked])
    pairs, result.changed = credit(kind, hot.fetchall(), credits)
    multiplicity.add(cursor, pairs, kind.parts_by_key, credits)
    return result


def credits_sql(kind: ItemKind, changed: str) -> str:
    """``SELECT key, target, value, amount``: what the ledgers of the relation ``changed``
    (columns ``old``, ``new``) going from old to new credit, summed per ledger key and target
    (and per counted value, for a distinct count's multiplicity), zero sums left out; then one
    row ``(NULL, NULL, NULL, number of rows in changed)``.

    Summed in the statement that wrote the ledgers: a batch's thousands of ledger states never
    travel to Python, only a row per target touched. Keys of counts that no longer exist are
    left out.
    """
    keys = ", ".join(literal(p.key) for p in kind.parts)
    distinct = [literal(p.key) for p in kind.parts if p.distinct]
    value = f"CASE WHEN e.key IN ({', '.join(distinct)}) THEN (e.value->>2)::bigint END"
    return (
        f"SELECT e.key, t::bigint, {value if distinct else 'NULL::bigint'},"
        " sum(s.sign * (e.value->>0)::bigint)::bigint"
        f" FROM {changed} c CROSS JOIN LATERAL (VALUES (c.old, -1), (c.new, 1)) s(state, sign)"
        " CROSS JOIN LATERAL jsonb_each(coalesce(s.state, '{}'::jsonb)) e"
        f" CROSS JOIN LATERAL jsonb_array_elements_text({entry_targets_sql('e', kind)}) t"
        f" WHERE e.key IN ({keys}) GROUP BY 1, 2, 3 HAVING sum(s.sign * (e.value->>0)::bigint) <> 0"
        f" UNION ALL SELECT NULL, NULL, NULL, count(*) FROM {changed} n"
    )


def credit(kind: ItemKind, rows, credits) -> tuple[dict[tuple[str, int, int], int], int]:
    """Add to ``credits`` the rows of :func:`credits_sql`; returns the multiplicity changes of
    the kind's distinct counts and the number of ledgers that changed."""
    by_key = kind.parts_by_key
    pairs: dict[tuple[str, int, int], int] = {}
    changed = 0
    for key, target, value, amount in rows:
        if key is None:
            changed = amount
            continue
        part = by_key[key]
        if part.distinct:
            pairs[(key, target, value)] = amount
        else:
            credits[(part.label, part.column, target)] += amount
    return pairs, changed


def entry_targets_sql(entry: str, kind: ItemKind) -> str:
    """The target ids of a ledger entry ``entry`` (``jsonb_each`` row) as a jsonb array."""
    distinct = [literal(p.key) for p in kind.parts if p.distinct]
    if not distinct:
        return f"{entry}.value - 0"
    return (
        f"CASE WHEN {entry}.key IN ({', '.join(distinct)})"
        f" THEN jsonb_build_array({entry}.value->1) ELSE {entry}.value - 0 END"
    )


def preview(cursor, kind: ItemKind, ids: list[int], credits) -> None:
    """Add to ``credits`` what recomputing ``ids`` now would credit, writing nothing (what a
    pending item mark means for its targets, for tests and operators reading the queue)."""
    if not ids:
        return
    truth = truth_sql(kind, "(SELECT DISTINCT unnest(%s::bigint[]) AS id)")
    cursor.execute(
        f"WITH changed AS (SELECT l.state AS old, t.state AS new FROM ({truth}) t"
        f" LEFT JOIN {LEDGER_TABLE} l ON l.kind = {literal(kind.mark_target)}"
        f" AND l.item_id = t.id) {credits_sql(kind, 'changed')}",
        [sorted(set(ids))],
    )
    pairs, _changed = credit(kind, cursor.fetchall(), credits)
    multiplicity.preview(cursor, pairs, kind.parts_by_key, credits)
