"""Marking every item of a kind at once, for the drains to recompute a chunk per batch.

Rare and large, unlike a drain's few items (``counts.run.items``): a TRUNCATE of a base table may
change any item that has a ledger; an "every item" mark (a TRUNCATE of a job table, a lapsed
backfill) any item at all. All of them are marked, ``CHUNK`` ids per mark. (A pass that brings
every item to its truth itself, for reconcile, rebuild and backfills, is
``counts.operate.item_sweep``.)
"""

from __future__ import annotations

from counts.base.names import LEDGER_TABLE, literal, q
from counts.compile.item_sql import mark_items_sql
from counts.declare.kinds import ItemKind


def mark_every_item(cursor, kind: ItemKind) -> None:
    """Mark every item of ``kind``, with or without a ledger (a new count's backfill): the
    items that exist and those only a ledger names (deleted ones), each id once, so a drain
    recomputes each item once."""
    t = kind.table
    every = (
        f"(SELECT {q(t.pk)} AS id FROM {q(t.db_table)} UNION SELECT item_id FROM {LEDGER_TABLE}"
        f" WHERE kind = {literal(kind.mark_target)})"
    )
    cursor.execute(mark_items_sql(kind, every, "id"))
