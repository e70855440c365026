"""What the stale items mean for targets: items whose change is marked but not yet credited.

An item mark that no drain has taken yet (or a job mark, ``counts.declare.jobs``) means the item's
ledger may lag its truth (``counts.run.items``). Two readers need to know what that lag means for
a target row, without consuming the marks:

- the full recount (``counts.run.aggregate``) writes ``truth - pending - adjustment``, where the
  adjustment is what the stale items would credit now (:func:`adjustment_sql`), so that
  invariant I (stored + pending = sum of the ledgers) holds after it;
- ``counts.run.marks`` tells which targets have work pending (:func:`pending_targets_sql`).
"""

from __future__ import annotations

from collections.abc import Iterable

from counts.base.mark import Kind, where
from counts.base.names import LEDGER_TABLE, MARK_TABLE, MULTIPLICITY_TABLE, literal, q
from counts.compile.item_sql import entries_sql, entry_targets_sql, truth_entries_sql
from counts.declare.kinds import ItemKind


def stale_sql(kind: ItemKind, only: str = "true", keys: Iterable[str] | None = None) -> str:
    """Distinct item ids with an item mark visible to the statement (every item, for a mark
    whose ``ids`` is NULL), or reached by a job mark visible to it (``counts.declare.jobs``).

    ``only``: a further condition on the marks read (alias ``m``), e.g. which of them a bulk
    pass has already read (``counts.operate.item_sweep``). ``keys``: the ledger keys the
    reader computes (None: any), which leaves out a backfill's lease over other keys
    (:func:`every_item_sql`)."""
    target = literal(kind.mark_target)
    selects = [
        f"SELECT DISTINCT x AS id FROM {MARK_TABLE} m CROSS JOIN LATERAL unnest(m.ids) x"
        f" WHERE m.target = {target} AND {where(Kind.ITEM)} AND {only}"
    ]
    # An "every item" mark (``ids`` NULL: a TRUNCATE, a backfill's lease) makes every item
    # stale, and every item with a ledger (deleted ones included) until a drain expands it.
    # Without one, the gate is a one-time test and neither arm reads a row.
    every = every_item_sql(kind, only, keys)
    t = kind.table
    selects += [
        f"SELECT {q(t.pk)} FROM {q(t.db_table)} WHERE {every}",
        f"SELECT item_id FROM {LEDGER_TABLE} WHERE kind = {target} AND {every}",
    ]
    selects += [job.pending_items_sql(only) for job in kind.jobs]
    return " UNION ".join(selects)


def every_item_sql(kind: ItemKind, only: str = "true", keys: Iterable[str] | None = None) -> str:
    """Whether an "every item" mark of ``kind`` (passing ``only``) is visible: an uncorrelated
    ``EXISTS``, which PostgreSQL tests once per statement.

    With ``keys``, only a mark that may concern one of them: a TRUNCATE's concerns every key,
    a backfill's lease only the new counts' keys it names (``payload`` ``{"keys": [...]}``),
    whose entries lag until its sweep; every other entry of the kind is kept by the drains
    meanwhile. So a recount of another count (a set's, "Recompute now", an exact read) does
    not take every item as stale for the whole backfill: at 10⁶ captures, seconds a
    statement instead of milliseconds."""
    covers = ""
    if keys is not None:
        named = ", ".join(literal(k) for k in sorted(set(keys)))
        covers = f" AND (m.payload IS NULL OR m.payload->'keys' ?| ARRAY[{named}]::text[])"
    return (
        f"EXISTS (SELECT 1 FROM {MARK_TABLE} m WHERE m.target = {literal(kind.mark_target)}"
        f" AND {where(Kind.EVERY_ITEM)} AND {only}{covers})"
    )


def _ledger_of_stale(kind: ItemKind) -> str:
    """The ledger of the stale item ``s``, probed by its key; ``LIMIT 1`` (it is unique) keeps
    the planner from flattening the probe into a join over every ledger of the kind."""
    return (
        f"(SELECT l.state FROM {LEDGER_TABLE} l WHERE l.kind = {literal(kind.mark_target)}"
        f" AND l.item_id = s.id LIMIT 1)"
    )


def adjustment_sql(kind: ItemKind, label: str, n: int, stale: str | None = None) -> tuple[str, int]:
    """``SELECT pk, a0, a1, …``: per target of ``label`` among the bound ids, what the stale
    items of ``kind`` would change in each of its counts of this kind if credited now.

    The recount writes ``truth - pending - adjustment``: for an item whose change is not yet
    credited (its mark is visible), the truth already contains the change but the ledgers do
    not, and invariant I is about the ledgers. Only stale items related to the targets — by
    their current links or by their ledger — are read. ``n`` numbers the CTE aliases. Returns
    the SQL and how many times it binds the target ids.

    Every stale item is probed on its own (``LATERAL``, by primary key, behind ``LIMIT`` or
    ``OFFSET 0`` so the planner cannot flatten the probe into a join): its ledger, its links,
    its truth. The planner cannot know how few items are stale (the "every item" and job arms
    of :func:`stale_sql` look like all of them), and left to choose it hashed every ledger of
    the kind for each recount: 1.1 s for one night at 10^6 captures, 7 ms probed.
    """
    parts = kind.summed_parts(label)
    head, entries, binds = _stale_entries(kind, parts, f"c{n}", stale)
    sums = ", ".join(
        f"(sum(e.v) FILTER (WHERE e.key = {literal(p.key)}))::bigint AS a{n}_{i}"
        for i, p in enumerate(parts)
    )
    sql = (
        f"{head} SELECT e.t AS pk, {sums} FROM ({entries}) e"
        " WHERE e.t = ANY(%s::bigint[]) GROUP BY e.t"
    )
    return sql, binds + 1


def distinct_adjustment_sql(
    kind: ItemKind, label: str, n: int, stale: str | None = None
) -> tuple[str, int]:
    """``SELECT pk, d0, d1, …``: per target of ``label`` among the bound ids, what the stale
    items of ``kind`` would change in each of its distinct counts of this kind if credited
    now: the pairs whose multiplicity would rise from 0, less those that would fall to 0
    (invariant M: a multiplicity is the sum of the ledgers' entries). What an exact read adds
    to stored + pending (``counts.run.exact``). Returns the SQL and how many times it binds
    the target ids."""
    parts = [p for p in kind.parts_for(label) if p.distinct]
    head, entries, binds = _stale_entries(kind, parts, f"c{n}", stale, values=True)
    flips = ", ".join(
        f"(sum((coalesce(m.n, 0) + d.v > 0)::int - (coalesce(m.n, 0) > 0)::int)"
        f" FILTER (WHERE d.key = {literal(p.key)}))::bigint AS d{n}_{i}"
        for i, p in enumerate(parts)
    )
    # Each pair's multiplicity is probed by its key (``LIMIT 1``: the planner merge-joined the
    # whole table, sorted, 0.5 s at 10⁶ captures, for a few dozen pairs).
    sql = (
        f"{head} SELECT d.t AS pk, {flips} FROM (SELECT e.key, e.t, e.value, sum(e.v) AS v"
        f" FROM ({entries}) e WHERE e.t = ANY(%s::bigint[]) GROUP BY 1, 2, 3"
        f" HAVING sum(e.v) <> 0) d LEFT JOIN LATERAL (SELECT p.n FROM {MULTIPLICITY_TABLE} p"
        " WHERE p.key = d.key AND p.target_id = d.t AND p.value = d.value LIMIT 1) m ON true"
        " GROUP BY d.t"
    )
    return sql, binds + 1


def _stale_entries(
    kind: ItemKind, parts, c: str, stale: str | None = None, values: bool = False
) -> tuple[str, str, int]:
    """``(WITH clause, entries, binds)``: the stale items related to the bound targets through
    ``parts``' links or their ledgers, materialized once as ``c`` with their ledgers; and
    ``SELECT key, v, t[, value]``, each entry of their truth (``v`` positive) and of their
    ledger (negative), one row per target it names. ``stale``: a relation (column ``id``)
    already holding :func:`stale_sql`'s items, when a statement computes them once for several
    readers (``counts.run.exact``)."""
    related, binds = [], 0
    for link in sorted({p.link for p in parts}, key=repr):
        rows, item_col, target_col = link.rows_sql(kind.table)
        related.append(
            f"EXISTS (SELECT 1 FROM {rows} WHERE {item_col} = s.id"
            f" AND {target_col} = ANY(%s::bigint[]) OFFSET 0)"
        )
        binds += 1
    # The candidates with their ledgers, materialized once: the truth and the ledger side both
    # read them. An item with a ledger may be related through it (it moved away).
    keys = [p.key for p in parts]
    candidates = (
        f"SELECT s.id, l.state FROM ({stale or stale_sql(kind, keys=keys)}) s"
        f" LEFT JOIN LATERAL {_ledger_of_stale(kind)} l ON true"
        f" WHERE l.state IS NOT NULL OR {' OR '.join(related)}"
    )
    # The truth of these counts only: the kind's others may read more (a capture's own row and
    # detections, for its station's counts) that these targets never need.
    only = kind.only(p.key for p in parts)
    value = ", (kv.value->>-1)::bigint AS value" if values else ""
    targets = entry_targets_sql("kv", kind)
    truth_value = ", tr.value" if values else ""
    entries = (
        f"SELECT tr.key, tr.v, tr.t{truth_value} FROM ({truth_entries_sql(only, c)}) tr"
        f" UNION ALL SELECT kv.key, -(kv.value->>0)::bigint, t::bigint{value}"
        f" FROM {c} CROSS JOIN LATERAL {entries_sql(f'{c}.state', keys)}"
        f" kv(key, value), jsonb_array_elements_text({targets}) t WHERE kv.value IS NOT NULL"
    )
    return f"WITH {c} AS MATERIALIZED ({candidates})", entries, binds


def pending_targets_sql(kind: ItemKind, label: str) -> tuple[str, int]:
    """``SELECT id`` of the targets of ``label`` among the bound ids that an item mark of
    ``kind`` may change: stale items' current links and ledger entries. Returns the SQL and
    how many times it binds the ids. Each stale item is probed on its own, as in
    :func:`adjustment_sql`: a list page's pending flags never hash every ledger of the kind."""
    keys = kind.keys_for(label)
    stale = f"({stale_sql(kind, keys=keys)}) s"
    selects = []
    for link in sorted({p.link for p in kind.parts_for(label)}, key=repr):
        rows, where, col = link.rows_sql(kind.table)
        selects.append(
            f"SELECT x.t FROM {stale} CROSS JOIN LATERAL (SELECT {col} AS t"
            f" FROM {rows} WHERE {where} = s.id AND {col} = ANY(%s::bigint[]) OFFSET 0) x"
        )
    selects.append(
        f"SELECT t::bigint FROM {stale} CROSS JOIN LATERAL {_ledger_of_stale(kind)} l"
        f" CROSS JOIN LATERAL {entries_sql('l.state', keys)} kv(key, value),"
        f" jsonb_array_elements_text({entry_targets_sql('kv', kind)}) t"
        " WHERE kv.value IS NOT NULL AND t::bigint = ANY(%s::bigint[])"
    )
    return " UNION ".join(selects), len(selects)
