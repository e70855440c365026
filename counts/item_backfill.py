"""Marking every item of a kind at once, for the drains to recompute a chunk per batch.

Rare and large, unlike a drain's few items (``counts.items``): a TRUNCATE of a base table may
change any item that has a ledger; an "every item" mark (a TRUNCATE of a job table, a lapsed
backfill) any item at all. All of them are marked, ``CHUNK`` ids per mark. (A pass that brings
every item to its truth itself, for reconcile, rebuild and backfills, is ``counts.item_sweep``.)
"""

from __future__ import annotations

from counts.items import LEDGER_TABLE, ItemKind
from counts.triggers import MARK_TABLE, literal, q

#: Item ids per mark when every item of a kind is marked (TRUNCATE, a new count's backfill).
CHUNK = 2000


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


def mark_every_item(cursor, kind: ItemKind) -> None:
    """Mark every item of ``kind``, with or without a ledger (a new count's backfill)."""
    cursor.execute(mark_items_sql(kind, q(kind.table.db_table), kind.table.pk))
    cursor.execute(mark_ledgered_sql(kind))
