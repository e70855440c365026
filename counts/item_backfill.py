"""Work on every item of a kind at once: marking them all, and filling their ledgers.

Rare and large, unlike a drain's few items (``counts.items``):

- a TRUNCATE of a base table may change any item that has a ledger; a new count's backfill, and
  an "every row" mark of an item kind, any item at all: all of them are marked, ``CHUNK`` ids
  per mark, for drains to take a chunk per batch;
- a backfill, and reconcile's *ledger audit*, set ledger entries to the items' truth without
  crediting anything, then recount the targets (:func:`fill_ledgers`).
"""

from __future__ import annotations

from collections import defaultdict

from counts import multiplicity
from counts.item_locks import lock_items
from counts.items import LEDGER_TABLE, ItemKind, credit, credits_sql, truth_sql
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


def fill_ledgers(
    kind: ItemKind,
    keys: list[str],
    using: str = "default",
    chunk: int = 1000,
    dry_run: bool = False,
) -> tuple[int, int]:
    """Set the ledger entries ``keys`` of every item of ``kind`` to the items' truth, without
    crediting anything. Returns (items checked, items whose ledger differed).

    A backfill does it before recounting its targets, so the new count's ledgers and stored
    values agree from the start; reconcile does it (the *ledger audit*) before auditing
    targets, which repairs ledgers that writes the triggers could not see left behind: had the
    targets been repaired first, the next change to such an item would credit the old drift
    again. Either way the targets are recounted afterwards, by the formula, which is what
    makes writing a ledger without a credit consistent again.

    Chunk by chunk, each chunk in its own transaction under the items' locks (taken waiting,
    in id order: drains never wait on these locks, so no deadlock).
    """
    from django.db import connections, transaction

    checked, differed, last, next_analyze = 0, 0, 0, 10 * chunk
    keys_sql = "ARRAY[" + ", ".join(literal(k) for k in keys) + "]::text[]"
    kind_sql = literal(kind.mark_target)
    t = kind.table
    while True:
        with transaction.atomic(using=using), connections[using].cursor() as cursor:
            cursor.execute(
                f"SELECT {q(t.pk)} FROM {q(t.db_table)} WHERE {q(t.pk)} > %s"
                f" ORDER BY {q(t.pk)} LIMIT %s",
                [last, chunk],
            )
            ids = [row[0] for row in cursor.fetchall()]
            if not ids:
                return checked, differed
            if not dry_run:
                lock_items(cursor, kind, ids, wait=True)
            truth = truth_sql(kind, "(SELECT unnest(%s::bigint[]) AS id)")
            fresh = (
                f"WITH truth AS ({truth}),"
                f" fresh AS (SELECT t.id, l.state AS old, coalesce(l.state - {keys_sql}, '{{}}')"
                f"  || (SELECT coalesce(jsonb_object_agg(k, v), '{{}}') FROM jsonb_each(t.state)"
                f"  kv(k, v) WHERE k = ANY({keys_sql})) AS state FROM truth t"
                f"  LEFT JOIN {LEDGER_TABLE} l ON l.kind = {kind_sql} AND l.item_id = t.id),"
                f" changed AS (SELECT * FROM fresh WHERE coalesce(old, '{{}}') <> state)"
            )
            if dry_run:
                cursor.execute(f"{fresh} SELECT count(*) FROM changed", [ids])
            else:
                cursor.execute(
                    f"{fresh}, kept AS (INSERT INTO {LEDGER_TABLE} (kind, item_id, state)"
                    f"  SELECT {kind_sql}, id, state FROM changed WHERE state <> '{{}}'"
                    f"  ON CONFLICT (kind, item_id) DO UPDATE SET state = EXCLUDED.state),"
                    f" gone AS (DELETE FROM {LEDGER_TABLE} l USING fresh f"
                    f"  WHERE l.kind = {kind_sql} AND l.item_id = f.id AND f.state = '{{}}')"
                    f" {credits_sql(kind, '(SELECT old, state AS new FROM changed)')}",
                    [ids],
                )
                # Distinct counts' multiplicities follow their ledgers (invariant M); no
                # target is credited: the caller recounts the targets afterwards.
                pairs, changed = credit(kind, cursor.fetchall(), defaultdict(int))
                multiplicity.add(cursor, pairs, {}, defaultdict(int))
            differed += cursor.fetchone()[0] if dry_run else changed
            checked += len(ids)
            last = ids[-1]
            if not dry_run and checked >= next_analyze:
                # A ledger filled from empty has no statistics: without them its joins plan as
                # scans of the whole table, and a fill of 10⁷ items slows to a crawl as it grows
                # (measured: 1.8k items/s before, 20k after). Each doubling gets fresh ones.
                cursor.execute(f"ANALYZE {LEDGER_TABLE}")
                next_analyze = 2 * checked
