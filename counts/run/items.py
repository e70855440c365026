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
   (``counts.run.item_locks``): in the statement that takes their marks, or, when the batch holds
   a job, once the job is expanded; items another drain holds get a new item mark, due a
   little later;
2. in one *later* statement — a fresh READ COMMITTED snapshot, which sees every write whose
   item mark it took, and the ledger the previous holder of the lock committed — reads each
   item's truth from the base tables, compares it with the ledger, and writes the new ledger;
3. credits, per target, ``contribution(truth) - contribution(ledger)``.

Why this is exact under concurrency — marking is complete, invariants I (stored + pending =
what the ledgers credited) and J (an unmarked item's ledger is its truth) hold at every commit,
and so at rest stored = truth whatever the order of drains — is ``docs/engine.md`` §2.1-§2.3,
with the interleavings that test it in §2.9. The recount formula (``counts.run.aggregate``)
keeps I without consuming marks (§2.4); the bulk pass over every item of a kind is
``counts.operate.item_sweep`` (§2.5).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from counts.base import prepared
from counts.base.names import LEDGER_TABLE, literal
from counts.compile.item_sql import credits_sql, recompute_sql, truth_sql
from counts.declare.jobs import Job
from counts.declare.kinds import ItemKind
from counts.run import multiplicity


@dataclass
class ItemResult:
    locked: int = 0
    held: list[int] | None = None
    changed: int = 0


def recompute(cursor, kind: ItemKind, ids: list[int], credits, locked: list[int]) -> ItemResult:
    """Recompute ``ids`` of ``kind`` and add their credits to ``credits[(label, column, id)]``.

    ``locked``: the ids whose ledger rows the caller locked (``counts.run.item_locks``), in a
    statement before this one; the rest of ``ids`` another drain holds: they are returned in
    ``held`` (the caller marks them again). Must run inside the drain's transaction.
    """
    ids = sorted(set(ids))
    held = sorted(set(ids) - set(locked))
    result = ItemResult(locked=len(locked), held=held)
    if not locked:
        return result
    hot = prepared.of(cursor, len(locked))
    hot.execute(recompute_sql(kind), prepared.arrays(hot, [locked, locked]))
    pairs, result.changed = credit(kind, hot.fetchall(), credits)
    multiplicity.add(cursor, pairs, kind.parts_by_key, credits)
    return result


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


def expand(cursor, job: Job, ids: list[int], payload) -> list[int]:
    """The items a job mark (``ids``, ``payload``) can have changed, in this snapshot."""
    if isinstance(payload, str):  # Django reads jsonb as text
        payload = json.loads(payload)
    ranged, plain = [], []
    for n, anchor in enumerate(ids):
        pair = payload[n] if job.compared and payload is not None else None
        if pair is None or pair[0] is None or pair[1] is None:
            plain.append(anchor)
        else:
            ranged.append((anchor, str(pair[0]), str(pair[1])))
    found: set[int] = set()
    if plain:
        cursor.execute(job.expand_sql(ranged=False), [plain])
        found.update(row[0] for row in cursor.fetchall())
    for anchor, old, new in ranged:
        cursor.execute(job.expand_sql(ranged=True), [anchor, old, new, old, new])
        found.update(row[0] for row in cursor.fetchall())
    return sorted(found)
