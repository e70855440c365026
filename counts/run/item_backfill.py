"""Marking every item of a kind at once, for the drains to recompute a chunk per batch.

Rare and large, unlike a drain's few items (``counts.run.items``): a TRUNCATE of a base table may
change any item that has a ledger; an "every item" mark (a TRUNCATE of a job table, a lapsed
backfill) any item at all. All of them are marked, ``CHUNK`` ids per mark. (A pass that brings
every item to its truth itself, for reconcile, rebuild and backfills, is
``counts.operate.item_sweep``.)
"""

from __future__ import annotations

from counts.base.names import q
from counts.compile.item_sql import mark_items_sql, mark_ledgered_sql
from counts.declare.kinds import ItemKind


def mark_every_item(cursor, kind: ItemKind) -> None:
    """Mark every item of ``kind``, with or without a ledger (a new count's backfill)."""
    cursor.execute(mark_items_sql(kind, q(kind.table.db_table), kind.table.pk))
    cursor.execute(mark_ledgered_sql(kind))
