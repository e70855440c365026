"""The SQL of items: an item's truth, the ledger write and its credits, marks for many items.

Pure text from an item kind (``counts.declare.kinds``); the drain (``counts.run.items``), the
recount formula (``counts.compile.stale_items``) and the bulk item pass
(``counts.operate.item_sweep``) execute it. ``tests/counts/compile/test_item_sql.py`` states what
each text must and must not contain.
"""

from __future__ import annotations

import json

from counts.base.names import LEDGER_TABLE, MARK_TABLE, literal, q
from counts.declare.kinds import ItemKind
from counts.declare.modes import Link

#: Item ids per mark when every item of a kind is marked (TRUNCATE, a new count's backfill).
CHUNK = 2000
#: Entries per ``concat_ws`` of :func:`state_sql` (a function takes at most 100 arguments).
GROUP = 90


def truth_sql(
    kind: ItemKind, items: str, within: tuple | None = None, probe_rows: bool = False
) -> str:
    """``SELECT id, state`` of the items listed by the relation ``items`` (column ``id``).

    ``state`` is what the ledger would hold if every item were credited now; an item that
    contributes nothing has ``'{}'``. By default one index probe per item and child table or
    through table: the cost follows the items, never the targets. ``within`` (``(lo, hi]``,
    either end None for open) says every listed item lies in that id range: the children and
    through rows of the range are then read in one grouped pass each, which is what a bulk
    pass over every item wants (one range scan, not a probe per item).

    ``probe_rows``: the item's own row too is probed by its key (``LATERAL``), for a list of
    items whose size the planner cannot know (the stale items of a recount,
    ``counts.compile.stale_items``), so that it never hashes the whole item table.
    """
    joins, measures, links = _truth_joins(kind, within, probe_rows)
    state = state_sql(_entries(kind, measures, links))
    return f"SELECT i.id, {state} AS state FROM {items} i {' '.join(joins)}"


def truth_entries_sql(kind: ItemKind, items: str) -> str:
    """``SELECT id, key, v, t, value``: the entries of :func:`truth_sql`'s states as rows, one
    per target (``value``: the counted value of a distinct count, else NULL), never built as
    JSON: for a reader that sums them at once (``counts.compile.stale_items``), where building
    each item's state and taking it apart again cost as much as reading its rows. Each item's
    own row is probed by its key, as ``truth_sql(..., probe_rows=True)`` does."""
    joins, measures, links = _truth_joins(kind, None, probe_rows=True)
    rows = []
    for p in kind.parts:
        value = _value(p, measures)
        counted = f"j.{q(p.distinct)}" if p.distinct else "NULL::bigint"
        rows.append(f"({literal(p.key)}, ({value})::bigint, {links[p.link]}, {counted})")
    return (
        f"SELECT i.id, e.key, e.v, t.t, e.value FROM {items} i {' '.join(joins)}"
        f" CROSS JOIN LATERAL (VALUES {', '.join(rows)}) e(key, v, targets, value)"
        " CROSS JOIN LATERAL unnest(e.targets) t(t) WHERE e.v > 0"
    )


def _truth_joins(kind: ItemKind, within: tuple | None, probe_rows: bool):
    """``(joins, measures, links)`` of :func:`truth_sql`: what an item's truth reads."""
    joins, measures = _measure_joins(kind, within)
    links, own_row = _link_joins(kind, within, joins)
    if own_row:
        t, row = kind.table, f"SELECT * FROM {q(kind.table.db_table)} j"
        # Bounded like the children: unbounded, a merge join walked the item table's key
        # from its first id for every chunk (25,001 index entries for a chunk of ids
        # 20,001-25,000; the whole table for the last chunks).
        bound = f" AND {in_range(f'j.{q(t.pk)}', within)}" if within else ""
        joins.insert(
            0,
            f"LEFT JOIN LATERAL ({row} WHERE j.{q(t.pk)} = i.id LIMIT 1) j ON true"
            if probe_rows
            else f"LEFT JOIN {q(t.db_table)} j ON j.{q(t.pk)} = i.id{bound}",
        )
    return joins, measures, links


def _value(p, measures: dict) -> str:
    """What an item is worth to part ``p``'s count (SQL over its measures and row ``j``)."""
    m = p.measure
    value = measures[(m.child.db_table, m.fk, m.predicate, m.exists)]
    if m.item_predicate:
        # Written over ``r``; the item row is ``j`` here. A row gone reads as failing.
        on_item = m.item_predicate.replace('r."', 'j."')
        other = measures[(m.child.db_table, m.fk, m.otherwise, m.exists)] if m.otherwise else 0
        value = f"(CASE WHEN {on_item} THEN {value} ELSE {other} END)"
    return value


def _measure_joins(kind: ItemKind, within: tuple | None) -> tuple[list[str], dict[tuple, str]]:
    """One join per (child table, foreign key) counting the item's children under each of its
    predicates, and ``{(child, fk, predicate, exists): expression}`` over those counts."""
    joins: list[str] = []
    measures: dict[tuple, str] = {}
    # One count per (child table, predicate): "how many" and "any" of the same children share it.
    children: dict[tuple, list[str | None]] = {}
    settings: dict[tuple, object] = {}
    for p in kind.parts:
        m = p.measure
        slot = children.setdefault((m.child.db_table, m.fk), [])
        for predicate in (m.predicate, m.otherwise) if m.otherwise else (m.predicate,):
            if predicate not in slot:
                slot.append(predicate)
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
    return joins, measures


def _link_joins(kind: ItemKind, within: tuple | None, joins: list[str]) -> tuple[dict, bool]:
    """``{link: the item's targets as a bigint[] expression}``, joining each through table
    (into ``joins``); and whether a link is the item's own column (the item row is joined)."""
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
            continue
        n = len(joins)
        rows, ic, tc = link.rows_sql(kind.table)
        agg = f"array_agg(DISTINCT {tc} ORDER BY {tc}) FILTER (WHERE {tc} IS NOT NULL) AS t"
        if within is None:
            joins.append(
                f"LEFT JOIN LATERAL (SELECT {agg} FROM {rows} WHERE {ic} = i.id) l{n} ON true"
            )
        else:
            # The same rows for a range of items at once: one grouped pass.
            joins.append(
                f"LEFT JOIN (SELECT {ic} AS id, {agg} FROM {rows}"
                f" WHERE {in_range(ic, within)} GROUP BY 1) l{n} ON l{n}.id = i.id"
            )
        links[link] = f"l{n}.t"
    # A distinct count reads the value it counts from the item's own row, and so does a
    # measure filtered on the item row.
    return links, own_row or any(p.distinct or p.measure.item_predicate for p in kind.parts)


def _entries(kind: ItemKind, measures: dict, links: dict) -> list[str]:
    """Each count's ledger entry as JSON text, ``"key":[amount,target,...]``
    (``[1,target,...,value]`` for a distinct count: the value last), or NULL when the item
    contributes nothing to it. Every value is an integer (counts, and keys the checks require
    to be integers: ``counts.E009``), so its text is its JSON; a distinct count's value may be
    NULL, written ``null``."""
    entries = []
    for p in kind.parts:
        value = _value(p, measures)
        head = literal(f"{json.dumps(p.key)}:[")
        counted = ""  # a distinct count's value, last
        if p.distinct:
            counted = f" || ',' || coalesce((j.{q(p.distinct)})::text, 'null')"
        if p.link.through is None:
            # One target, the item's own column (no array built for it: that cost more than
            # the rest of a capture's truth).
            col = f"j.{q(p.link.target_column)}"
            entries.append(
                f"CASE WHEN {value} > 0 AND {col} IS NOT NULL"
                f" THEN {head} || ({value}) || ',' || {col}{counted} || ']' END"
            )
            continue
        targets = links[p.link]
        entries.append(
            f"CASE WHEN {value} > 0 AND cardinality({targets}) > 0 THEN {head} || ({value})"
            f" || ',' || array_to_string({targets}, ',', 'null'){counted} || ']' END"
        )
    return entries


def state_sql(entries: list[str]) -> str:
    """A ledger state (``jsonb``) from its entries' JSON text, NULL entries left out (all
    NULL: ``{}``).

    Written as text and parsed once: the same value as building it with ``jsonb_build_array``
    and ``jsonb_build_object`` and stripping the NULLs, at a third of the cost (each nested
    jsonb is taken apart again by the one around it, and the strip rebuilds the whole).
    Measured over 50,000 captures of 10^6: 220 ms against 330 ms, of which reading the rows
    is 170 ms. ``concat_ws`` takes at most 100 arguments: more entries are joined in groups.
    """
    if not entries:
        return "'{}'::jsonb"
    while len(entries) > GROUP:
        entries = [
            f"nullif(concat_ws(',', {', '.join(entries[i : i + GROUP])}), '')"
            for i in range(0, len(entries), GROUP)
        ]
    return f"('{{' || concat_ws(',', {', '.join(entries)}) || '}}')::jsonb"


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


def credits_sql(kind: ItemKind, changed: str, keys: list[str] | None = None) -> str:
    """``SELECT key, target, value, amount``: what the ledgers of the relation ``changed``
    (columns ``old``, ``new``) going from old to new credit, summed per ledger key and target
    (and per counted value, for a distinct count's multiplicity), zero sums left out; then one
    row ``(NULL, NULL, NULL, number of rows in changed)``.

    Summed in the statement that wrote the ledgers: a batch's thousands of ledger states never
    travel to Python, only a row per target touched. Only the kind's keys are read (``keys``:
    only those, for a pass that changed no other entry), each looked up in the state rather
    than every entry taken apart: keys of counts that no longer exist are left out for free,
    and a new count's backfill reads its one entry, not the five others it leaves alone
    (measured on a 2,258-capture chunk: 26 ms taking states apart, 6 ms looking one key up).
    Entries equal on both sides are skipped: they would add and take back the same amount.
    """
    wanted = [p.key for p in kind.parts if keys is None or p.key in keys]
    distinct = [literal(p.key) for p in kind.parts if p.distinct]
    value = f"CASE WHEN e.key IN ({', '.join(distinct)}) THEN (e.value->>-1)::bigint END"
    return (
        f"SELECT e.key, t::bigint, {value if distinct else 'NULL::bigint'},"
        " sum(s.sign * (e.value->>0)::bigint)::bigint"
        f" FROM {changed} c CROSS JOIN LATERAL (VALUES (c.old, -1, c.new), (c.new, 1, c.old))"
        " s(state, sign, other)"
        f" CROSS JOIN LATERAL {entries_sql('s.state', wanted)} e(key, value)"
        f" CROSS JOIN LATERAL jsonb_array_elements_text({entry_targets_sql('e', kind)}) t"
        " WHERE e.value IS NOT NULL AND e.value IS DISTINCT FROM s.other->e.key"
        " GROUP BY 1, 2, 3 HAVING sum(s.sign * (e.value->>0)::bigint) <> 0"
        f" UNION ALL SELECT NULL, NULL, NULL, count(*) FROM {changed} n"
    )


def entries_sql(state: str, keys: list[str]) -> str:
    """The entries of ``keys`` in the ledger state ``state`` (an SQL expression), as a relation
    of rows ``(key, value)`` for a ``LATERAL`` join; ``value`` is NULL where the state has no
    such entry. Each is looked up by name: ``jsonb_each`` would take apart every entry of the
    state, most of them of counts the reader does not want."""
    if not keys:
        return "(SELECT NULL::text, NULL::jsonb WHERE false)"
    rows = ", ".join(f"({literal(k)}, {state} -> {literal(k)})" for k in keys)
    return f"(VALUES {rows})"


def text_array(values: list[str]) -> str:
    """A SQL ``text[]`` literal of ``values`` (ledger keys: the engine's own names)."""
    return "ARRAY[" + ", ".join(literal(v) for v in values) + "]::text[]"


def entry_targets_sql(entry: str, kind: ItemKind) -> str:
    """The target ids of a ledger entry ``entry`` (a row ``(key, value)``) as a jsonb array."""
    distinct = [literal(p.key) for p in kind.parts if p.distinct]
    if not distinct:
        return f"{entry}.value - 0"
    return (
        f"CASE WHEN {entry}.key IN ({', '.join(distinct)})"
        f" THEN ({entry}.value - 0) - -1 ELSE {entry}.value - 0 END"
    )


def mark_items_sql(kind: ItemKind, source: str, column: str) -> str:
    """Item marks for every id in ``column`` of ``source``, ``CHUNK`` ids per mark."""
    return (
        f"INSERT INTO {MARK_TABLE} (target, ids) SELECT {literal(kind.mark_target)},"
        f" array_agg(id ORDER BY id) FROM (SELECT s.{q(column)} AS id,"
        f" (row_number() OVER (ORDER BY s.{q(column)}) - 1) / {CHUNK} AS chunk"
        f" FROM {source} s) c GROUP BY chunk"
    )


def mark_ledgered_sql(kind: ItemKind) -> str:
    """Item marks for every item with a ledger row (what a TRUNCATE may have changed)."""
    source = f"(SELECT item_id FROM {LEDGER_TABLE} WHERE kind = {literal(kind.mark_target)})"
    return mark_items_sql(kind, source, "item_id")
