"""Item locks: a drain holds each item's ledger row while it reads the item's truth.

The lock is the ledger row's (``FOR UPDATE``), so that two drains never write one ledger at
once and the second reads the first's committed ledger (invariant I, ``counts.run.items``). Row
locks live in the rows, not in the shared lock table, so a batch may lock thousands of items.

An item with no ledger row yet gets an empty one first, so that there is a row to lock: two
drains inserting the same *new* item meet on its key, and the second waits until the first
ends: the first of the waits a drain can meet, in the global order of docs/engine.md §3.2
(items go in ``(kind, id)`` order, so two drains cannot wait on each other here). An item
that has a row is skipped when another transaction holds it (``SKIP LOCKED``).

One SQL text locks, whoever asks: a drain's take (:func:`lock_marked_sql`, the items its item
marks name, in the statement that takes them: no round trip of its own), a drain that took a
job mark and a ledger fill (:func:`lock_items`, once the items are known).
"""

from __future__ import annotations

from counts.base import prepared
from counts.base.mark import Kind, where
from counts.base.names import LEDGER_TABLE, literal
from counts.declare.kinds import ItemKind


def _lock_ctes(wanted: str, wait: bool) -> str:
    """CTEs ``made`` and ``held`` that lock the ledger rows of the ``(kind, item_id)`` pairs
    in the relation ``wanted``, in ``(kind, id)`` order; their union is what was locked."""
    # Only items with no row yet are inserted: ON CONFLICT waits for the transaction that last
    # wrote a conflicting row, so offering it a row another drain holds would make this drain
    # wait. A row this statement inserts is invisible to others until commit: it is ours.
    #
    # Both read the ledger by one probe of its key per wanted item, whatever the statistics
    # say (OFFSET 0 keeps the NOT EXISTS a probe; a locking subquery is never pulled up into a
    # join). Joined, a bulk pass's 5,000 items were hash-joined with a scan of every ledger
    # row: 228 ms a chunk with 500k ledgers, growing with each chunk a pass wrote (a rebuild
    # of 10^6 books slowed to 2,000 rows/s). The items are taken in (kind, id) order, so the
    # locks are too.
    skip = "" if wait else " SKIP LOCKED"
    return (
        f"made AS (INSERT INTO {LEDGER_TABLE} (kind, item_id, state)"
        " SELECT w.kind, w.item_id, '{}' FROM " + wanted + " w"
        f" WHERE NOT EXISTS (SELECT 1 FROM {LEDGER_TABLE} l"
        " WHERE l.kind = w.kind AND l.item_id = w.item_id OFFSET 0)"
        ' ORDER BY w.kind COLLATE "C", w.item_id'
        " ON CONFLICT (kind, item_id) DO NOTHING RETURNING kind, item_id),"
        " held AS (SELECT l.kind, l.item_id FROM (SELECT kind, item_id FROM " + wanted + " w"
        ' ORDER BY w.kind COLLATE "C", w.item_id) w'
        f" CROSS JOIN LATERAL (SELECT l.kind, l.item_id FROM {LEDGER_TABLE} l"
        f" WHERE l.kind = w.kind AND l.item_id = w.item_id FOR UPDATE OF l{skip}) l)"
    )


def lock_items(cursor, kind: ItemKind, ids: list[int], wait: bool = False) -> list[int]:
    """Lock the ledger rows of ``ids`` (creating empty ones for new items); returns the ids
    locked, in order. Without ``wait``, rows another drain holds are left out."""
    hot = prepared.of(cursor, len(ids))
    hot.execute(lock_items_sql(kind, wait), prepared.arrays(hot, [ids]))
    return [row[0] for row in hot.fetchall()]


def lock_items_sql(kind: ItemKind, wait: bool = False) -> str:
    """:func:`lock_items`'s statement; one parameter, the ids."""
    # Not materialized: each CTE reads the array itself, as a join on the ledger's key (a
    # materialized list of 1,000 ids locked 18% slower; measured on a ledger fill's chunk).
    return (
        f"WITH wanted AS NOT MATERIALIZED (SELECT {literal(kind.mark_target)}::varchar AS kind,"
        f" id AS item_id FROM unnest(%s::bigint[]) id), {_lock_ctes('wanted', wait)}"
        " SELECT item_id FROM made UNION SELECT item_id FROM held ORDER BY 1"
    )


def lock_marked_sql(marks: str) -> tuple[str, str]:
    """:func:`lock_items` for the items named by the item marks in the relation ``marks``
    (columns ``target``, ``field``, ``ids``), inside the statement that takes those marks.

    Returns CTEs (one parameter: the item kinds' mark targets, as ``text[]``) and an expression
    giving ``{kind: [ids locked, in order]}``, or NULL when ``marks`` holds a job mark: a job's
    items are only known once it is expanded, and they must be locked in the same ordered pass
    as these (two ordered passes, each in order, could meet another drain's in a cycle), so
    then every item is left to :func:`lock_items`, called kind by kind in label order, the
    order in which ``counts.run.items.recompute`` is called.
    """
    is_job = where(Kind.JOB, alias=None)
    ctes = (
        f"item_marks AS (SELECT target, field, ids FROM {marks} WHERE target = ANY(%s::text[])),"
        " wanted AS (SELECT DISTINCT m.target AS kind, x AS item_id FROM item_marks m"
        " CROSS JOIN LATERAL unnest(m.ids) x"
        f" WHERE NOT EXISTS (SELECT 1 FROM item_marks WHERE {is_job})), "
        + _lock_ctes("wanted", wait=False)
    )
    locked = (
        f"CASE WHEN NOT EXISTS (SELECT 1 FROM item_marks WHERE {is_job}) THEN"
        " (SELECT coalesce(jsonb_object_agg(kind, ids), '{}') FROM (SELECT kind,"
        " array_agg(item_id ORDER BY item_id) AS ids FROM (SELECT kind, item_id FROM made"
        " UNION SELECT kind, item_id FROM held) u GROUP BY kind) g) END"
    )
    return ctes, locked
