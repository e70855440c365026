"""The bulk item pass: every item of a kind brought to its truth, as a drain would, by range.

Reconcile, rebuild and a new count's backfill all need every ledger of a kind (or some of its
counts' entries) set to the items' truth. They do it the way a drain recomputes its items
(``counts.run.items``), so the same argument covers them, with two differences that make it
set-based: items are taken by id range, ``(lo, hi]``, and their truth is read with one grouped
pass per child and through table over that range instead of a probe per item.

Per chunk, two transactions (the second only when the first found something to repair):

1. **Compare**, in plain reads that share one snapshot (``REPEATABLE READ``): the range's
   waiting marks, its items that have a ledger (deleted items' ledgers, *orphans*, included)
   or may count (a row below them passes a count's filter), their truth against their ledgers.
   Only the items that differ go on; at rest there are none, and the pass writes nothing, not
   even a row lock. In one snapshot, an item whose mark is not visible has ledger = truth
   (invariant J), so what differs outside the marks is drift, never a write that committed
   between two reads.
2. **Claim** those items as a drain claims its own (``counts.run.item_locks``: ledger rows
   ``FOR UPDATE SKIP LOCKED`` in id order, an empty row inserted for an item with none);
   whatever another transaction holds is handed back to the queue as an item mark, due a
   little later.
3. **Sweep** (a *later* statement, so a fresh snapshot that sees every change whose mark a
   previous holder of these locks consumed): read the locked items' truth, write the ledgers
   that changed, sum what the change credits per target.
4. **Credit**, in the same transaction as 2 and 3: multiplicities (invariant M; pairs
   crossing zero credit their targets), then the credits are added to the target rows nobody
   holds, and queued as delta marks for the rest (``counts.run.applying``), exactly as a
   drain adds its credits.

So every chunk's commit keeps invariants I (stored + pending = what the ledgers credited),
J (an item that was compared equal, or locked and rewritten, has ledger = truth at a snapshot
after its last mark; a later change has a mark of its own) and M, and a pass killed between
any two transactions leaves nothing to repair but what it had not reached yet. A dry run stops
after step 1 and reports what the credits would be, leaving out items whose marks are still
waiting (their ledgers lag by design, not by drift); a repair sweeps those too. A rebuild,
which then drops the item marks it covered, claims every item (``lock_all``), not only those
that differ: only a lock attempt finds an item a drain is still writing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from django.db import connections

from counts.base import checkpoints
from counts.base.names import LEDGER_TABLE, literal, q
from counts.base.prepared import arrays
from counts.compile.item_sql import credits_sql, hoisted, in_range, text_array, truth_sql
from counts.compile.stale_items import stale_sql
from counts.declare.graph import Graph
from counts.declare.kinds import ItemKind
from counts.operate.stale_marks import Stale
from counts.run import aggregate, applying, multiplicity
from counts.run.engine_transaction import engine_transaction
from counts.run.item_locks import lock_items
from counts.run.items import credit
from counts.run.marks import defer

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
    #: ``{(label, column, target id): amount}`` that repairing the items that differed credited
    #: (or, dry, would credit); not what sweeping items whose marks waited credited: that is
    #: the writes' own, a drain's to credit, and no drift (every item's, with ``lock_all``).
    credits: dict = field(default_factory=lambda: defaultdict(int))


def may_count_sql(kind: ItemKind, lo: int | None, hi: int | None) -> str:
    """``SELECT item_id``: the items of ``(lo, hi]`` with a row below them that one of their
    counts measures (a child passing the count's filter; the item itself, for a count of the
    items): only such an item can have a non-empty truth, and so need a ledger row it does not
    have yet. One range scan per child table, never a probe per item."""
    selects = set()
    for part in kind.parts:
        m = part.measure
        fk = f"r.{q(m.fk)}"
        rows, (predicate,) = hoisted([m.any_predicate], part.setting)
        where = in_range(fk, (lo, hi)) + (f" AND ({predicate})" if predicate else "")
        selects.add(f"SELECT {fk} AS item_id FROM {q(m.child.db_table)} r{rows} WHERE {where}")
    return " UNION ".join(sorted(selects)) or "SELECT NULL::bigint AS item_id WHERE false"


def _fresh_state(kind: ItemKind, keys: list[str] | None) -> str:
    """The ledger state to write (``o.state`` old, ``t.state`` truth): the truth, or only the
    entries ``keys`` replaced by the truth's, the others kept."""
    if keys is None:
        return "t.state"
    # The truth was read for these keys only (``ItemKind.only``).
    return f"(coalesce(o.state, '{{}}') - {text_array(keys)}) || t.state"


def sweep_sql(
    kind: ItemKind, keys: list[str] | None, lo, hi, write: bool, ids: bool = False
) -> str:
    """Read the bound items' truth, compare with their ledgers and (``write``) rewrite the
    ledgers that changed; returns :func:`counts.compile.item_sql.credits_sql`'s rows, or
    (``ids``) one row: the ids whose ledger differs. One parameter: the item ids, all
    within ``(lo, hi]``."""
    k = literal(kind.mark_target)
    read = kind if keys is None else kind.only(keys)
    truth = truth_sql(read, "(SELECT unnest(%s::bigint[]) AS id)", within=(lo, hi))
    head = (
        f"WITH truth AS ({truth}),"
        f" fresh AS (SELECT t.id, o.state AS old, {_fresh_state(kind, keys)} AS new"
        # One probe of the ledger's key per item, whatever the statistics say. Joined, the
        # plan followed the ledger's estimated size: hashed whole when the truth's size was
        # misjudged (0.7 s a chunk at 10⁶), and, while a rebuild or a load fills a ledger
        # whose statistics still say empty, a nested loop over the chunk's ledger rows for
        # every item (3·10⁶ comparisons, 250 ms of a 350 ms chunk).
        f"  FROM truth t LEFT JOIN LATERAL (SELECT state FROM {LEDGER_TABLE} o"
        # (LIMIT: a plain subquery would be pulled up into a join again.)
        f"  WHERE o.kind = {k} AND o.item_id = t.id LIMIT 1) o ON true),"
        " changed AS (SELECT id, old, new FROM fresh"
        "  WHERE coalesce(old, '{}') IS DISTINCT FROM new)"
    )
    if ids:
        return f"{head} SELECT ARRAY(SELECT id FROM changed ORDER BY id)"
    if not write:
        return f"{head} {credits_sql(kind, 'changed', keys)}"
    # Every item swept is locked, so its ledger row exists (the lock inserted an empty one
    # where there was none): rewritten in place, which cost 2/3 of an INSERT ... ON CONFLICT
    # (its speculative insertion probes the key first). The insert arm stays for safety.
    return (
        f"{head}, kept AS (UPDATE {LEDGER_TABLE} l SET state = c.new FROM changed c"
        f"  WHERE l.kind = {k} AND {in_range('l.item_id', (lo, hi))} AND l.item_id = c.id"
        "  AND c.old IS NOT NULL AND c.new <> '{}'),"
        f" added AS (INSERT INTO {LEDGER_TABLE} (kind, item_id, state)"
        f"  SELECT {k}, id, new FROM changed WHERE old IS NULL AND new <> '{{}}'"
        "  ON CONFLICT (kind, item_id) DO UPDATE SET state = EXCLUDED.state),"
        # The ids as an array: a join with ``fresh`` (whose size the planner cannot guess)
        # planned as a scan of every ledger (measured: 350 ms a chunk at 10^6).
        # And the range: with the ledger's statistics saying the kind is small (a rebuild, a
        # load, autovacuum off), the ids were read as a filter over every ledger of the kind.
        f" dropped AS (DELETE FROM {LEDGER_TABLE} l WHERE l.kind = {k}"
        f"  AND {in_range('l.item_id', (lo, hi))}"
        "  AND l.item_id = ANY(ARRAY(SELECT id FROM fresh WHERE new = '{}')))"
        f" {credits_sql(kind, 'changed', keys)}"
    )


def candidates_sql(kind: ItemKind, lo, hi, stale: str = "", keys: list[str] | None = None) -> str:
    """One row: the items of the range a pass compares (those with a ledger, and those that
    may count), and those of the range whose marks are waiting (``stale``, a ``SELECT id``:
    their ledgers may lag by design, not drift). With ``keys``, only the counts of those
    ledger keys are looked at: an item whose ledger has none of them and that may not count
    for them has nothing to compare."""
    k = literal(kind.mark_target)
    has_key = "" if keys is None else f" AND state ?| {text_array(keys)}"
    counts = kind if keys is None else kind.only(keys)
    # By default the range's stale items: the bounds reach each arm of the union, which then
    # walks the item's key range instead of every item a job could reach.
    stale = stale or f"SELECT id FROM ({stale_sql(kind)}) s WHERE {in_range('s.id', (lo, hi))}"
    return (
        f"SELECT ARRAY(SELECT item_id FROM {LEDGER_TABLE} WHERE kind = {k}"
        f" AND {in_range('item_id', (lo, hi))}{has_key} UNION {may_count_sql(counts, lo, hi)}"
        " ORDER BY 1),"
        f" ARRAY({stale})"
    )


def _next_bound(cursor, kind: ItemKind, lo: int | None, chunk: int, end: int | None):
    """The upper bound of the chunk after ``lo``: the ``chunk``-th item id, or ``end`` when
    that is beyond it, or None (open: the last chunk also takes the orphans beyond the last
    item)."""
    t = kind.table
    cursor.execute(
        f"SELECT {q(t.pk)} FROM {q(t.db_table)} i WHERE {in_range(f'i.{q(t.pk)}', (lo, None))}"
        f" ORDER BY {q(t.pk)} OFFSET %s LIMIT 1",
        [chunk - 1],
    )
    row = cursor.fetchone()
    if end is not None and (row is None or row[0] >= end):
        return end
    return None if row is None else row[0]


def sweep(
    graph: Graph,
    kind: ItemKind,
    keys: list[str] | None = None,
    *,
    dry_run: bool = False,
    lock_all: bool = False,
    chunk: int = CHUNK,
    using: str = "default",
    progress: Callable[[str, int], None] | None = None,
    ignored: list[int] = (),
    within: tuple[int | None, int | None] = (None, None),
) -> SweepReport:
    """Bring every ledger of ``kind`` (only the entries ``keys``, when given) to the items'
    truth, crediting the difference; or, ``dry_run``, report what that would credit.

    ``lock_all``: claim every item of each chunk, not only those that differ. What a rebuild
    needs before it drops the item marks it covered: an item a drain holds while the pass
    compares it may look right and still be written from the drain's older snapshot, and only
    a lock attempt tells (a held item is marked again, so it stays covered).

    ``ignored``: ids of marks the pass does not count as making items stale: a backfill's
    own lease, which it is there to discharge.

    ``within``: only the items of ``(lo, hi]`` (None: open), one slice of a pass run on several
    connections (``counts.operate.parallel``).
    """
    run = _Pass(graph, kind, keys, dry_run, lock_all, SweepReport(kind.mark_target), using)
    lo, end = within
    checkpoints.reach("bulk.before_model", label=kind.mark_target)
    with connections[using].cursor() as cursor:
        run.stale = Stale(cursor, kind, ignored)
    try:
        while True:
            # The chunk's reads share one snapshot: the marks, the items' truth and their
            # ledgers. Read by statements of their own, a write committed in between (its mark
            # too) showed in the truth and not among the marks: drift reported where a mark
            # waited, while writers ran (6 of 12 seeds of the property test racing them).
            with engine_transaction(using, snapshot=True) as cursor:
                hi = _next_bound(cursor, kind, lo, chunk, end)
                ids, drifted = _compare(cursor, run, lo, hi)
                credits = _preview(cursor, run, lo, hi, ids) if dry_run and ids else {}
            if ids and not dry_run:
                with engine_transaction(using) as cursor:
                    credits = _claim(cursor, run, lo, hi, ids, drifted)
            for key, amount in credits.items():
                if amount:
                    run.report.credits[key] += amount
            if progress:
                progress(kind.mark_target, run.report.checked)
            if hi == end:
                return run.report
            lo = hi
            checkpoints.reach("bulk.between_transactions", kind=kind.mark_target, lo=lo)
    finally:
        with connections[using].cursor() as cursor:
            run.stale.close(cursor)


def sweep_keys(graph: Graph, kind: ItemKind, keys: list[str], **options) -> SweepReport:
    """:func:`sweep` for the entries ``keys``: the whole ledger when they are all the kind's
    (one truth for every count, no state merged), else only theirs."""
    whole = set(keys) == {p.key for p in kind.parts}
    return sweep(graph, kind, None if whole else keys, **options)


@dataclass
class _Pass:
    """What one pass over an item kind is doing (see :func:`sweep`)."""

    graph: Graph
    kind: ItemKind
    keys: list[str] | None
    dry_run: bool
    lock_all: bool
    report: SweepReport
    using: str
    stale: Stale | None = None


def _compare(cursor, run: _Pass, lo, hi) -> tuple[list[int], set[int]]:
    """The reads of one chunk (see the module docstring), all in the snapshot of the chunk's
    first statement. Returns the ids to claim (for a dry run, those that differ) and those of
    them that *drifted*: that differ with no mark waiting (every one, with ``lock_all``)."""
    kind, keys, report = run.kind, run.keys, run.report
    absorb, stale_select, params = run.stale.chunk_sql(lo, hi)
    candidates = candidates_sql(kind, lo, hi, stale_select, keys)
    cursor.execute(
        f"{absorb} SELECT c.*, {run.stale.snapshot_columns()} FROM ({candidates}) c", params
    )
    ids, stale, *snapshot = cursor.fetchone()
    run.stale.observed(*snapshot)
    checkpoints.reach("sweep.marks_read", kind=kind.mark_target, lo=lo, hi=hi)
    # A dry run leaves out the items whose marks wait: the drains' business, not drift. A
    # repair takes them too, whatever they look like now: one a drain holds (its ledger row
    # new, uncommitted) may be about to be written from an older snapshot, and only the lock
    # attempt finds out (it is then marked again).
    ids = sorted(set(ids) - set(stale)) if run.dry_run else sorted(set(ids) | set(stale))
    report.checked += len(ids)
    if not ids or run.lock_all:
        return ids, set(ids)
    # Compared first, in a plain read: only the items that differ are claimed and written (at
    # rest, none), so a pass over an exact database writes nothing, not a row lock.
    cursor.execute(sweep_sql(kind, keys, lo, hi, write=False, ids=True), arrays(cursor, [ids]))
    differ = cursor.fetchone()[0]
    drifted = set(differ) - set(stale)
    report.differed += len(drifted)
    return differ, drifted


def _preview(cursor, run: _Pass, lo, hi, differ: list[int]) -> dict:
    """What sweeping the items ``differ`` would credit, in the dry run's snapshot."""
    credits: dict = defaultdict(int)
    cursor.execute(sweep_sql(run.kind, run.keys, lo, hi, write=False), arrays(cursor, [differ]))
    pairs, _changed = credit(run.kind, cursor.fetchall(), credits)
    multiplicity.preview(cursor, pairs, run.kind.parts_by_key, credits)
    return credits


def _claim(cursor, run: _Pass, lo, hi, ids: list[int], drifted: set[int]) -> dict:
    """The writes of one chunk (see the module docstring), in a transaction after its reads:
    claim ``ids``, hand back those held, sweep and credit the others; returns what the items
    that ``drifted`` credited (the others' credits are the writes' own, not drift)."""
    kind, report = run.kind, run.report
    credits: dict = defaultdict(int)
    drift: dict = defaultdict(int)
    locked = lock_items(cursor, kind, ids)
    held = sorted(set(ids) - set(locked))
    if held:
        defer(cursor, kind.mark_target, held, retry_ms=HELD_RETRY_MS)
        report.held += len(held)
    checkpoints.reach("sweep.locked", kind=kind.mark_target, lo=lo, hi=hi)
    # Swept apart, so that what the drifted items credit is known: the report's drift.
    for group, drifting in ((set(locked) & drifted, True), (set(locked) - drifted, False)):
        if not group:
            continue
        found: dict = defaultdict(int)
        # A later statement than the lock's: a fresh snapshot, which sees every change whose
        # mark the previous holder of these locks consumed (``counts.run.items``).
        cursor.execute(
            sweep_sql(kind, run.keys, lo, hi, write=True), arrays(cursor, [sorted(group)])
        )
        pairs, changed = credit(kind, cursor.fetchall(), found)
        if run.lock_all:
            report.differed += changed
        multiplicity.add(cursor, pairs, kind.parts_by_key, found)
        for key, amount in found.items():
            credits[key] += amount
            if drifting:
                drift[key] += amount
    if locked:
        apply_credits(cursor, run.graph, credits, run.using)
    return drift


def apply_credits(cursor, graph: Graph, credits: dict, using: str) -> None:
    """Add ``credits[(label, column, id)]`` to the target rows nobody holds, in one statement,
    and queue the rest as delta marks (rows that are gone need nothing)."""
    by_label: dict[str, dict] = defaultdict(dict)
    for (label, column, target_id), amount in credits.items():
        if amount:
            by_label[label][(column, target_id)] = amount
    batches = [
        (aggregate.compile_recompute(graph, label, using), by_label[label]) for label in by_label
    ]
    written = applying.lock_and_apply_all(cursor, batches)
    for statement, amounts in batches:
        missing = sorted({t for _c, t in amounts} - written.get(statement.label, set()))
        held = set(aggregate.held_elsewhere(cursor, statement, missing, []))
        if held:
            applying.defer_credits(
                cursor, statement.label, {k: v for k, v in amounts.items() if k[1] in held}
            )
