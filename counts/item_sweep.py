"""The bulk item pass: every item of a kind brought to its truth, as a drain would, by range.

Reconcile, rebuild and a new count's backfill all need every ledger of a kind (or some of its
counts' entries) set to the items' truth. They do it the way a drain recomputes its items
(``counts.items``), so the same argument covers them, with two differences that make it
set-based: items are taken by id range, ``(lo, hi]``, and their truth is read with one grouped
pass per child and through table over that range instead of a probe per item.

Per chunk, one transaction:

1. **Claim** (one statement): lock the kind's ledger rows in the range that nobody holds
   (``FOR UPDATE SKIP LOCKED``, id order), and insert (and so own) an empty row for each item
   of the range that may count (a row below it passes a count's filter) but has no ledger
   yet; deleted items' ledgers (*orphans*,
   no item row any more) are in the range too, so they are swept like the rest. Whatever
   another transaction holds is handed back to the queue as an item mark, due a little later.
2. **Sweep** (a *later* statement, so a fresh snapshot that sees every change whose mark a
   previous holder of these locks consumed): read the locked items' truth, write the ledgers
   that changed, sum what the change credits per target.
3. **Credit**, in the same transaction: multiplicities (invariant M; pairs crossing zero credit
   their targets), then the credits are added to the target rows nobody holds, and queued as
   delta marks for the rest (``counts.applying``), exactly as a drain adds its credits.

So every chunk's commit keeps invariants I (stored + pending = what the ledgers credited),
J (each item it locked has ledger = truth) and M, and a pass killed between any two
transactions leaves nothing to repair but what it had not reached yet. A dry run reads the
same truth without locks or writes and reports what the credits would be, leaving out items
whose marks are still waiting (their ledgers lag by design, not by drift).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from counts import aggregate, applying, checkpoints, multiplicity
from counts.engine_transaction import engine_transaction
from counts.items import LEDGER_TABLE, ItemKind, credit, credits_sql, hoisted, truth_sql
from counts.marks import defer
from counts.stale_items import stale_sql
from counts.triggers import literal, q

#: Items per transaction of a bulk pass, by default.
CHUNK = 5000
#: How soon items another transaction held during a pass are tried again by the drains.
HELD_RETRY_MS = 200


@dataclass
class SweepReport:
    """What one pass over an item kind found."""

    kind: str
    checked: int = 0
    #: Items whose ledger differed from their truth (and was rewritten, unless a dry run).
    differed: int = 0
    #: Items another transaction held, handed back to the queue.
    held: int = 0
    #: ``{(label, column, target id): amount}`` credited (or, dry, that would be).
    credits: dict = field(default_factory=lambda: defaultdict(int))


def _range(column: str, lo: int | None, hi: int | None) -> str:
    terms = [f"{column} > {int(lo)}" if lo is not None else "true"]
    if hi is not None:
        terms.append(f"{column} <= {int(hi)}")
    return " AND ".join(terms)


def may_count_sql(kind: ItemKind, lo: int | None, hi: int | None) -> str:
    """``SELECT item_id``: the items of ``(lo, hi]`` with a row below them that one of their
    counts measures (a child passing the count's filter; the item itself, for a count of the
    items): only such an item can have a non-empty truth, and so need a ledger row it does not
    have yet. One range scan per child table, never a probe per item."""
    selects = set()
    for part in kind.parts:
        m = part.measure
        fk = f"r.{q(m.fk)}"
        rows, (predicate,) = hoisted([m.predicate], part.setting)
        where = _range(fk, lo, hi) + (f" AND ({predicate})" if predicate else "")
        selects.add(f"SELECT {fk} AS item_id FROM {q(m.child.db_table)} r{rows} WHERE {where}")
    return " UNION ".join(sorted(selects)) or "SELECT NULL::bigint AS item_id WHERE false"


def claim_sql(kind: ItemKind, lo: int | None, hi: int | None) -> str:
    """One row: the ids locked (inserted or taken) and the ids of the range someone else
    holds (to be marked again), each in id order."""
    k = literal(kind.mark_target)
    in_ledger = f"kind = {k} AND {_range('item_id', lo, hi)}"
    return (
        f"WITH wanted AS (SELECT c.item_id FROM ({may_count_sql(kind, lo, hi)}) c"
        f" WHERE NOT EXISTS (SELECT 1 FROM {LEDGER_TABLE} l WHERE l.kind = {k}"
        " AND l.item_id = c.item_id)),"
        f" made AS (INSERT INTO {LEDGER_TABLE} (kind, item_id, state)"
        f" SELECT {k}, item_id, '{{}}' FROM wanted ORDER BY item_id"
        " ON CONFLICT (kind, item_id) DO NOTHING RETURNING item_id),"
        f" seen AS (SELECT item_id FROM {LEDGER_TABLE} WHERE {in_ledger}),"
        f" taken AS (SELECT item_id FROM {LEDGER_TABLE} WHERE {in_ledger}"
        " ORDER BY item_id FOR UPDATE SKIP LOCKED),"
        " mine AS (SELECT item_id FROM made UNION SELECT item_id FROM taken)"
        " SELECT ARRAY(SELECT item_id FROM mine ORDER BY 1),"
        " ARRAY(SELECT item_id FROM (SELECT item_id FROM seen UNION SELECT item_id FROM wanted"
        " EXCEPT SELECT item_id FROM mine) h ORDER BY 1)"
    )


def _fresh_state(kind: ItemKind, keys: list[str] | None) -> str:
    """The ledger state to write (``o.state`` old, ``t.state`` truth): the truth, or only the
    entries ``keys`` replaced by the truth's, the others kept."""
    if keys is None:
        return "t.state"
    arr = "ARRAY[" + ", ".join(literal(k) for k in keys) + "]::text[]"
    return (
        f"(coalesce(o.state, '{{}}') - {arr}) || (SELECT coalesce(jsonb_object_agg(e.key,"
        f" e.value), '{{}}') FROM jsonb_each(t.state) e WHERE e.key = ANY({arr}))"
    )


def sweep_sql(kind: ItemKind, keys: list[str] | None, lo, hi, write: bool) -> str:
    """Read the bound items' truth, compare with their ledgers and (``write``) rewrite the
    ledgers that changed; returns :func:`counts.items.credits_sql`'s rows. One parameter: the
    item ids, all within ``(lo, hi]``."""
    k = literal(kind.mark_target)
    truth = truth_sql(kind, "(SELECT unnest(%s::bigint[]) AS id)", within=(lo, hi))
    head = (
        f"WITH truth AS ({truth}),"
        f" fresh AS (SELECT t.id, o.state AS old, {_fresh_state(kind, keys)} AS new"
        f"  FROM truth t LEFT JOIN {LEDGER_TABLE} o ON o.kind = {k} AND o.item_id = t.id),"
        " changed AS (SELECT id, old, new FROM fresh"
        "  WHERE coalesce(old, '{}') IS DISTINCT FROM new)"
    )
    if not write:
        return f"{head} {credits_sql(kind, 'changed')}"
    return (
        f"{head}, kept AS (INSERT INTO {LEDGER_TABLE} (kind, item_id, state)"
        f"  SELECT {k}, id, new FROM changed WHERE new <> '{{}}'"
        "  ON CONFLICT (kind, item_id) DO UPDATE SET state = EXCLUDED.state),"
        f" dropped AS (DELETE FROM {LEDGER_TABLE} l USING fresh f"
        f"  WHERE l.kind = {k} AND l.item_id = f.id AND f.new = '{{}}')"
        f" {credits_sql(kind, 'changed')}"
    )


def _unmarked_sql(kind: ItemKind, lo, hi) -> str:
    """The items of the range a dry run compares: those with a ledger or that may count, less
    those whose marks are waiting (their ledgers lag by design)."""
    k = literal(kind.mark_target)
    return (
        f"SELECT ARRAY(SELECT item_id FROM {LEDGER_TABLE} WHERE kind = {k}"
        f" AND {_range('item_id', lo, hi)} UNION {may_count_sql(kind, lo, hi)}"
        # Only the range's stale items: the bounds reach each arm of the union, which then
        # walks the item's key range instead of every item a job could reach.
        f" EXCEPT SELECT id FROM ({stale_sql(kind)}) s WHERE {_range('s.id', lo, hi)} ORDER BY 1)"
    )


def _next_bound(cursor, kind: ItemKind, lo: int | None, chunk: int) -> int | None:
    """The upper bound of the chunk after ``lo``: the ``chunk``-th item id, or None (open:
    the last chunk also takes the orphans beyond the last item)."""
    t = kind.table
    cursor.execute(
        f"SELECT {q(t.pk)} FROM {q(t.db_table)} i WHERE {_range(f'i.{q(t.pk)}', lo, None)}"
        f" ORDER BY {q(t.pk)} OFFSET %s LIMIT 1",
        [chunk - 1],
    )
    row = cursor.fetchone()
    return None if row is None else row[0]


def sweep(
    kind: ItemKind,
    keys: list[str] | None = None,
    *,
    dry_run: bool = False,
    chunk: int = CHUNK,
    using: str = "default",
    progress: Callable[[str, int], None] | None = None,
) -> SweepReport:
    """Bring every ledger of ``kind`` (only the entries ``keys``, when given) to the items'
    truth, crediting the difference; or, ``dry_run``, report what that would credit."""
    report = SweepReport(kind.mark_target)
    parts = kind.parts_by_key
    lo: int | None = None
    checkpoints.reach("bulk.before_model", label=kind.mark_target)
    while True:
        with engine_transaction(using) as cursor:
            hi = _next_bound(cursor, kind, lo, chunk)
            credits: dict = defaultdict(int)
            changed = 0
            if dry_run:
                cursor.execute(_unmarked_sql(kind, lo, hi))
                ids = cursor.fetchone()[0]
                if ids:
                    cursor.execute(sweep_sql(kind, keys, lo, hi, write=False), [ids])
                    pairs, changed = credit(kind, cursor.fetchall(), credits)
                    multiplicity.preview(cursor, pairs, parts, credits)
            else:
                cursor.execute(claim_sql(kind, lo, hi))
                ids, held = cursor.fetchone()
                checkpoints.reach("sweep.locked", kind=kind.mark_target, lo=lo, hi=hi)
                if ids:
                    cursor.execute(sweep_sql(kind, keys, lo, hi, write=True), [ids])
                    pairs, changed = credit(kind, cursor.fetchall(), credits)
                    multiplicity.add(cursor, pairs, parts, credits)
                    apply_credits(cursor, credits, using)
                if held:
                    defer(cursor, kind.mark_target, held, retry_ms=HELD_RETRY_MS)
                    report.held += len(held)
            report.checked += len(ids)
            report.differed += changed
            for key, amount in credits.items():
                if amount:
                    report.credits[key] += amount
        if progress:
            progress(kind.mark_target, report.checked)
        if hi is None:
            return report
        lo = hi
        checkpoints.reach("bulk.between_transactions", kind=kind.mark_target, lo=lo)


def apply_credits(cursor, credits: dict, using: str) -> None:
    """Add ``credits[(label, column, id)]`` to the target rows nobody holds, in one statement,
    and queue the rest as delta marks (rows that are gone need nothing)."""
    by_label: dict[str, dict] = defaultdict(dict)
    for (label, column, target_id), amount in credits.items():
        if amount:
            by_label[label][(column, target_id)] = amount
    batches = [(aggregate.compile_recompute(label, using), by_label[label]) for label in by_label]
    written = applying.lock_and_apply_all(cursor, batches)
    for statement, amounts in batches:
        missing = sorted({t for _c, t in amounts} - written.get(statement.label, set()))
        held = set(aggregate.held_elsewhere(cursor, statement, missing, []))
        if held:
            applying.defer_credits(
                cursor, statement.label, {k: v for k, v in amounts.items() if k[1] in held}
            )
