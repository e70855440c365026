"""Draining dirty marks: plan from marks, then lock, credit or recount, and write, in one
transaction.

The shape follows Django's deletion collector (record the work first, perform it after):

1. **take** up to ``batch_size`` marks that are due, ``FOR UPDATE SKIP LOCKED`` (other drainers
   take others), keep a prefix worth at most ``max_ids`` ids, and delete it; the same statement
   locks the items its item marks name (step 3's locks, taken early), unless it took a job
   mark;
2. **plan**: delta marks add up into credits per (model, column, row); recount marks (and
   marks of counts kept in full, resolved to rows here, ``counts.run.routes``) become rows to
   recount; item marks become items to recompute; job marks (a setting changed) are expanded
   into the items they can flip (``counts.declare.jobs``); "every row" marks expand into chunked
   marks for later batches;
3. **items**, per kind: lock each item without waiting, read its truth in a later statement,
   credit the difference from its ledger and write the ledger (``counts.run.items``); items
   someone holds are marked again, due a little later;
4. **targets**: models that only get amounts are written together, in one statement
   (``counts.run.applying``); then, per model in label order, lock the rows nobody else holds
   (``FOR NO KEY UPDATE SKIP LOCKED``, id order); recount the rows marked for it with the formula
   ``truth - pending - adjustment`` (``counts.run.aggregate``: it absorbs this batch's credits to
   them, which are not added on top); add the credits to the others in one statement
   (``counts.run.applying``); queue both again, due a little later, for rows someone holds.

All of it commits together: a crash before commit rolls the deletes back, so no mark is lost.
Why this keeps invariants I, J and M at every commit is ``docs/engine.md`` §2.3; the locks it
takes, in one global order (marks, items, multiplicities, targets), and why no wait forms a
circle, §3.

Every write runs in :func:`engine_transaction`, under the engine's setting: the only writes to
cached columns the guard triggers let through.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass, field

from counts.base import checkpoints, prepared
from counts.base.errors import CountsError
from counts.base.mark import Kind, Mark
from counts.base.names import MARK_TABLE, q
from counts.compile.item_sql import CHUNK, mark_items_sql
from counts.declare.graph import Graph, app_graph
from counts.declare.jobs import jobs_by_key
from counts.declare.modes import incremental_columns
from counts.run import aggregate, applying, item_locks, items, routes, target_locks
from counts.run.engine_transaction import SETTINGS_SQL, engine_transaction
from counts.run.item_backfill import mark_every_item
from counts.run.items import expand
from counts.run.marks import defer

#: Target ids in one expanded chunk of an "every row" mark.
EXPAND_CHUNK = 2000
#: Marks one drain transaction takes, by default.
BATCH_SIZE = 500
#: Target ids one drain transaction recomputes, by default (a single larger mark is taken whole).
MAX_IDS = 5000
#: How soon items another drain holds are tried again (it finishes within a batch's time).
BUSY_RETRY_MS = 200
#: Milliseconds a drain waits for a lock ``SKIP LOCKED`` cannot skip (a table lock), by default.
LOCK_TIMEOUT_MS = 10_000


@dataclass
class DrainResult:
    """What one drain transaction did (also the structured log line of a batch)."""

    marks: int = 0
    targets: dict[str, int] = field(default_factory=dict)  # label -> rows recomputed
    changed: dict[str, int] = field(default_factory=dict)  # label -> rows written
    expanded: dict[str, int] = field(default_factory=dict)  # label -> chunk marks created
    deferred: dict[str, int] = field(default_factory=dict)  # label -> held rows marked again
    #: Whether marks due now may be left: the batch was full, or cut short by ``max_ids``, or
    #: expanded marks for later batches. False means the take saw no other free due mark, so a
    #: caller draining to empty knows it is done without one more (empty) batch to prove it.
    more: bool = False
    ms: float = 0.0

    @property
    def empty(self) -> bool:
        return self.marks == 0

    @property
    def idle(self) -> bool:
        """No progress: no marks, or only marks for rows someone holds (marked again). Marks
        naming nothing to recompute (occurrences of a capture that has none) are progress."""
        if any(self.targets.values()) or self.expanded:
            return False
        return self.marks == 0 or bool(self.deferred)

    def as_log(self) -> dict:
        return {
            "marks": self.marks,
            "targets": sum(self.targets.values()),
            "changed": sum(self.changed.values()),
            "deferred": sum(self.deferred.values()),
            "by_model": {k: [self.targets.get(k, 0), self.changed.get(k, 0)] for k in self.targets},
            "ms": round(self.ms, 1),
        }


#: A drain commits without waiting for its WAL to reach disk. Safe: a crash can lose only a
#: whole drain transaction (asynchronous commit keeps the WAL's order), and with it the
#: deletion of its marks, so the marks are back and drained again. Writers' commits, and
#: "Recompute now", keep the server's setting.
ASYNC_COMMIT_SQL = "set_config('synchronous_commit', 'off', true)"


def _take(cursor, batch_size: int, max_ids: int, labels: list[str] | None, kinds):
    """Lock up to ``batch_size`` due marks nobody else holds, delete the prefix worth at most
    ``max_ids`` ids (the first mark whatever its size), and return it: one statement, which
    also applies the engine's settings when it took anything (a drain that finds nothing
    leaves the transaction as it found it).

    The same statement locks the items its item marks name (``counts.run.item_locks``), unless
    it took a job mark.

    Returns (marks taken, whether free due marks were left: the lock filled the batch, or
    ``max_ids`` cut it, ``{item kind: ids locked}`` or None when the items are still to be
    locked). Marks other drains hold are theirs; marks committed after this statement's
    snapshot are as invisible to it as to a confirming look a moment earlier, and their
    writers ask for a drain of their own."""
    where = "(not_before IS NULL OR not_before <= now())"
    where += " AND target = ANY(%s)" if labels else ""
    params: list = [labels] if labels else []
    lock_ctes, locked_items = item_locks.lock_marked_sql("taken")
    hot = prepared.of(cursor)
    hot.execute(
        f"WITH locked AS (SELECT id, coalesce(cardinality(ids), 1) AS size FROM {MARK_TABLE}"
        f" WHERE {where} ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED),"
        " picked AS (SELECT id FROM (SELECT id, sum(size) OVER (ORDER BY id) AS run,"
        " row_number() OVER (ORDER BY id) AS n FROM locked) x WHERE n = 1 OR run <= %s),"
        f" taken AS (DELETE FROM {MARK_TABLE} m USING picked WHERE m.id = picked.id"
        f" RETURNING m.id, m.target, m.ids, m.field, m.deltas, m.payload), {lock_ctes}"
        # InitPlans: evaluated once, and only when a row is returned, left to right: the
        # settings (the lock timeout among them) come before the item locks.
        f" SELECT taken.*, (SELECT concat({SETTINGS_SQL}, {ASYNC_COMMIT_SQL})) IS NOT NULL,"
        " (SELECT count(*) = %s OR count(*) > (SELECT count(*) FROM picked) FROM locked),"
        f" ({locked_items})::text FROM taken",
        [*params, batch_size, max_ids, sorted(kinds), *cursor.engine_params, batch_size],
    )
    rows = hot.fetchall()
    if not rows:
        return [], False, {}
    locked = rows[0][8]  # as text: Django's connections leave jsonb undecoded
    return (
        sorted(row[:6] for row in rows),
        rows[0][7],
        None if locked is None else json.loads(locked),
    )


def _expand(cursor, graph: Graph, label: str) -> int:
    """Replace an "every row" mark by chunked marks covering every current row."""
    table = graph.targets[label]
    cursor.execute(
        f"INSERT INTO {MARK_TABLE} (target, ids)"
        f" SELECT %s, array_agg(pk ORDER BY pk) FROM ("
        f"   SELECT {q(table.pk)} AS pk, (row_number() OVER (ORDER BY {q(table.pk)}) - 1) / %s"
        f"   AS chunk FROM {q(table.db_table)}) s GROUP BY chunk",
        [label, EXPAND_CHUNK],
    )
    return cursor.rowcount


@dataclass
class _Plan:
    """What one batch's marks ask for: credits to add, rows to recount, items to recompute."""

    graph: Graph  # the counts the batch is drained for
    credits: dict = field(default_factory=lambda: defaultdict(int))  # (label, column, id) -> n
    recount: dict = field(default_factory=lambda: defaultdict(set))  # label -> ids
    items: dict = field(default_factory=lambda: defaultdict(set))  # item kind -> ids


def _plan(cursor, graph: Graph, taken, result: DrainResult) -> _Plan:
    known, kinds = graph.targets, graph.kinds
    incremental = incremental_columns(graph)
    plan = _Plan(graph)
    jobs = jobs_by_key(graph)
    # Job marks without values to bound (a link job, a station's move) are expanded together,
    # one query per job for the batch: a burst of membership writes is a job mark each.
    plain_jobs: dict[tuple[str, str], set] = defaultdict(set)
    for row in taken:
        mark = Mark.from_row(*row)
        target, column = mark.target, mark.field
        ids = None if mark.ids is None else list(mark.ids)  # bound as arrays, not tuples
        if target not in kinds and target not in known:
            # A model (or item kind) whose counts were removed: its marks mean nothing any more.
            continue
        match mark.kind:
            case Kind.JOB:
                job = jobs.get(column)
                if job is not None and mark.payload is None:
                    plain_jobs[(target, column)].update(ids)
                elif job is not None:  # else the count that started it is gone
                    _plan_job(cursor, kinds[target], job, target, ids, mark.payload, plan, result)
            case Kind.EVERY_ITEM:
                mark_every_item(cursor, kinds[target])
                result.expanded[target] = result.expanded.get(target, 0) + 1
            case Kind.ITEM:
                plan.items[target].update(ids)
            case Kind.EVERY_ROW:
                result.expanded[target] = _expand(cursor, graph, target)
            case Kind.ROUTE:
                plan.recount[target].update(routes.resolve(cursor, graph, column, ids) or ())
            case Kind.RECOUNT:
                plan.recount[target].update(ids)
            case Kind.DELTA if column in incremental.get(target, ()):
                for target_id, amount in zip(ids, mark.deltas, strict=True):
                    plan.credits[(target, column, target_id)] += amount
            case Kind.DELTA:
                # The count changed mode or went away since: its amounts mean nothing, recount.
                plan.recount[target].update(ids)
    for (target, key), ids in sorted(plain_jobs.items()):
        _plan_job(cursor, kinds[target], jobs[key], target, sorted(ids), None, plan, result)
    return plan


def _plan_job(cursor, kind, job, target, ids, payload, plan: _Plan, result: DrainResult) -> None:
    """The items a job's marks (``ids``, ``payload``) reach, for this batch, or for later ones
    when they are many."""
    found = expand(cursor, job, list(ids), payload)
    if len(found) <= CHUNK:
        plan.items[target].update(found)
    else:
        # A big job is recomputed by later batches, a chunk each.
        source = "(SELECT unnest(%s::bigint[]) AS id)"
        cursor.execute(mark_items_sql(kind, source, "id"), [found])
        result.expanded[target] = result.expanded.get(target, 0) + 1


def drain(
    batch_size: int = BATCH_SIZE,
    max_ids: int = MAX_IDS,
    targets: list[str] | None = None,
    using: str = "default",
    lock_timeout_ms: int = LOCK_TIMEOUT_MS,
    graph: Graph | None = None,
) -> DrainResult:
    """Consume one batch of marks and bring their targets' counts up to date.

    Args:
        batch_size: Most marks taken.
        max_ids: Most target (or item) ids taken (a single larger mark is still taken whole).
        targets: Only marks for these model labels or item kinds (all when None).
        lock_timeout_ms: How long to wait for a lock ``SKIP LOCKED`` cannot skip.
        graph: The counts to drain for; the app's (``app_graph()``) when None.
    """
    started = time.perf_counter()
    result = DrainResult()
    graph = graph or app_graph()
    kinds = graph.kinds
    with engine_transaction(using, lock_timeout_ms, lazy=True) as cursor:
        taken, result.more, locked = _take(cursor, batch_size, max_ids, targets, kinds)
        result.marks = len(taken)
        if taken:
            cursor.engine_on(already=True)
        plan = _plan(cursor, graph, taken, result)
        if locked is None:
            # A job mark was taken: its items are known now. Every item of the batch is
            # locked before any is recomputed, as the take does (see ``_take``).
            locked = {
                kind: item_locks.lock_items(cursor, kinds[kind], sorted(plan.items[kind]))
                for kind in sorted(plan.items)
            }
        if taken:
            checkpoints.reach("drain.taken", marks=len(taken))
        for kind in sorted(plan.items):
            done = items.recompute(
                cursor, kinds[kind], sorted(plan.items[kind]), plan.credits, locked.get(kind, [])
            )
            result.targets[kind] = done.locked
            result.changed[kind] = done.changed
            if done.held:
                # Another drain has these items: it finishes within a batch's time.
                defer(cursor, kind, done.held, retry_ms=BUSY_RETRY_MS)
                result.deferred[kind] = len(done.held)
        if taken:
            checkpoints.reach("drain.before_targets", marks=len(taken))
        _write_targets(cursor, plan, result, using)
        if taken:
            checkpoints.reach("drain.before_commit", marks=len(taken))
    result.more = result.more or bool(result.expanded)
    result.ms = (time.perf_counter() - started) * 1000
    return result


def drain_until_empty(limit: int = 100_000, **options) -> list[DrainResult]:
    """Call :func:`drain` in this process until a batch takes no mark; the batches that took
    some, in order. Marks put back for later (a row someone holds) stay for when they are due.

    The one drain-to-empty of everything that is not a worker: ``seed_demo``, the bench, the
    tests. ``limit`` batches at most: a drain that keeps finding marks it cannot take is a bug,
    reported, not an endless loop.
    """
    results = []
    for _ in range(limit):
        result = drain(**options)
        if result.empty:
            return results
        results.append(result)
    raise CountsError(f"marks still pending after {limit:,} drain batches")


class _Contended(Exception):
    """A target row is held by another transaction: start the targets again, in order."""


def _write_targets(cursor, plan: _Plan, result: DrainResult, using: str) -> None:
    """Write every target of the batch: first taking only the rows nobody holds; if one is
    held, that attempt is rolled back (to a savepoint: the items' work stays) and every target
    row of the batch is locked in (label, id) order, waiting briefly for each
    (``counts.run.target_locks``), before the writes run again. Rows still held after the wait get
    their work put back in the queue, due a little later."""
    by_label: dict[str, dict[tuple[str, int], int]] = defaultdict(dict)
    for (label, column, target_id), amount in plan.credits.items():
        if amount:
            by_label[label][(column, target_id)] = amount
    before = (dict(result.targets), dict(result.changed), dict(result.deferred))
    cursor.execute("SAVEPOINT counts_targets")
    try:
        _write(cursor, plan, by_label, result, using, first=True)
        return
    except _Contended:
        cursor.execute("ROLLBACK TO SAVEPOINT counts_targets")
    result.targets, result.changed, result.deferred = (dict(d) for d in before)
    wanted = [
        (statement.table, statement.pk, ids)
        for label, ids in sorted(_target_ids(plan, by_label).items())
        for statement in [aggregate.compile_recompute(plan.graph, label, using)]
    ]
    target_locks.lock_in_order(cursor, wanted)
    _write(cursor, plan, by_label, result, using, first=False)


def _target_ids(plan: _Plan, by_label: dict) -> dict[str, list[int]]:
    ids: dict[str, set[int]] = defaultdict(set)
    for label, credits in by_label.items():
        ids[label].update(target_id for _column, target_id in credits)
    for label, recount in plan.recount.items():
        ids[label].update(recount)
    return {label: sorted(found) for label, found in ids.items() if found}


def _write(cursor, plan: _Plan, by_label: dict, result: DrainResult, using: str, first: bool):
    """Add the amounts of every model that only gets amounts, in one statement; then, per
    model with rows to recount, in label order: lock what is free, recount the rows marked
    for it (the formula absorbs this batch's credits to them), add the credits to the others.
    Amounts and recounts for rows someone else holds are queued again; on the ``first``
    attempt, a held row raises :class:`_Contended` instead."""
    # Models that only need amounts added: every one of them in one statement; the rows it
    # left out are held by someone (or gone), and their amounts go back to the queue.
    only_credits = sorted(label for label in by_label if not plan.recount.get(label))
    batches = [
        (aggregate.compile_recompute(plan.graph, label, using), by_label[label])
        for label in only_credits
    ]
    written = applying.lock_and_apply_all(cursor, batches)
    for statement, credits in batches:
        label, applied = statement.label, written.get(statement.label, set())
        result.targets[label] = result.changed[label] = len(applied)
        missing = sorted({target_id for _column, target_id in credits} - applied)
        if missing:
            # Held by someone (their amounts go back to the queue) or gone (they need none).
            held = set(aggregate.held_elsewhere(cursor, statement, missing, []))
            if held and first:
                raise _Contended
            if held:
                deferred = {k: v for k, v in credits.items() if k[1] in held}
                applying.defer_credits(cursor, label, deferred)
                result.deferred[label] = len(held)
    for label in sorted(label for label in plan.recount if plan.recount[label]):
        statement = aggregate.compile_recompute(plan.graph, label, using)
        credits = by_label.get(label, {})
        recount = plan.recount[label]
        ids = sorted(recount | {target_id for _column, target_id in credits})
        locked = aggregate.lock(cursor, statement, ids)
        held = aggregate.held_elsewhere(cursor, statement, ids, locked)
        if held and first:
            raise _Contended
        locked_set = set(locked)
        to_recount = sorted(recount & locked_set)
        changes = aggregate.run(cursor, statement, to_recount, write=True)
        applied = {k: v for k, v in credits.items() if k[1] in locked_set and k[1] not in recount}
        changed = len(applying.lock_and_apply(cursor, statement, applied))
        result.targets[label] = len(locked)
        result.changed[label] = len(changes) + changed
        if held:
            held_set = set(held)
            if recount & held_set:
                defer(cursor, label, sorted(recount & held_set))
            applying.defer_credits(
                cursor, label, {k: v for k, v in credits.items() if k[1] in held_set}
            )
            result.deferred[label] = len(held)
